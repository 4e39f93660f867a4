"""The models reward components score with, each loaded once per process and shared.

A reward actor may run perplexity and fluency (one reference LM), relevance and similarity (one
MiniLM) and spaCy similarity side by side; the ``functools.cache`` loaders below make every
component that asks for the same model get the same object, so it is loaded and held once.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from distrl.assets import minilm_dir, spacy_md_dir
from distrl.errors import ModelError

if TYPE_CHECKING:
    from distrl.models.tokenizers import Tokenizer

# distrl.models (transformers) is imported where a model is built: a reward actor whose
# components need no model starts in about 2 s instead of 6.


class ReferenceLM:
    """A frozen causal LM that scores responses given their prompts.

    Args:
        model: a ``load_policy`` name ("default", "tiny-llama", a folder...).
        tokenizer: a ``load_tokenizer`` spec; "auto" is the model's own.
        device: "auto", "cpu" or "cuda[:N]".
        seed: initialisation seed of random tiny models.
    """

    def __init__(self, model: str, tokenizer: str, device: str = "auto", seed: int = 0) -> None:
        from distrl.models.loading import load_policy, model_source_dir
        from distrl.models.tokenizers import load_tokenizer

        source = model_source_dir(model)
        self.tokenizer = load_tokenizer(tokenizer, str(source) if source else None)
        tok = self.tokenizer
        special = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
        self.model = load_policy(
            model, vocab_size=tok.vocab_size, special_ids=special, device=device, seed=seed
        )
        self.model.requires_grad_(False)
        if getattr(self.model.config, "final_logit_softcapping", None):
            raise ModelError(f"reference model {model!r} soft-caps its logits; not supported")
        self.device = next(self.model.parameters()).device
        self._memo: tuple[tuple, np.ndarray] | None = None

    def mean_nll(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        *,
        max_prompt_tokens: int = 256,
        max_response_tokens: int = 256,
        micro_batch: int = 8,
    ) -> np.ndarray:
        """Mean negative log-likelihood per response token, (B,).

        The prompt is kept to its last ``max_prompt_tokens`` tokens (after a BOS when the
        tokenizer has one) and the response to its first ``max_response_tokens``. An empty
        response is scored as the EOS token: the probability of answering nothing.
        The last result is memoised, so perplexity and fluency share one forward pass.
        """
        key = (tuple(prompts), tuple(responses), max_prompt_tokens, max_response_tokens)
        if self._memo is not None and self._memo[0] == key:
            return self._memo[1]
        tok = self.tokenizer
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        prompt_ids = tok.encode_batch(list(prompts))
        response_ids = tok.encode_batch(list(responses))
        rows = []
        for p, r in zip(prompt_ids, response_ids):
            # The first response token needs a context: with no BOS and no prompt, start from
            # EOS, which GPT-2-style models also read as the start of a document.
            p = (bos or ([] if p else eos)) + p[max(0, len(p) - max_prompt_tokens) :]
            rows.append((p, r[:max_response_tokens] or eos))
        out = np.empty(len(rows), dtype=np.float64)
        # Similar lengths in a micro-batch waste less compute on padding.
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
        for start in range(0, len(order), micro_batch):
            idx = order[start : start + micro_batch]
            out[idx] = self._nll_rows([rows[i] for i in idx])
        self._memo = (key, out)
        return out

    @torch.inference_mode()
    def _nll_rows(self, rows: list[tuple[list[int], list[int]]]) -> np.ndarray:
        """Mean NLL of each row's response ids given its prompt ids, in one padded forward."""
        width = max(len(p) + len(r) for p, r in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        # target[b, t] marks that token t of row b is a response token to be predicted.
        target = torch.zeros((len(rows), width), dtype=torch.bool)
        for b, (p, r) in enumerate(rows):
            ids[b, : len(p) + len(r)] = torch.tensor(p + r)
            attention[b, : len(p) + len(r)] = 1
            target[b, len(p) : len(p) + len(r)] = True
        ids, attention, target = (
            ids.to(self.device),
            attention.to(self.device),
            target.to(self.device),
        )
        hidden = self.model.base_model(
            input_ids=ids, attention_mask=attention, use_cache=False
        ).last_hidden_state
        # Only the positions that predict a response token need the (large) vocabulary
        # projection: hidden[b, t-1] predicts ids[b, t].
        predicts = target[:, 1:]
        logits = self.model.get_output_embeddings()(hidden[:, :-1][predicts]).float()
        nll = torch.nn.functional.cross_entropy(logits, ids[:, 1:][predicts], reduction="none")
        per_row = torch.zeros(len(rows), device=nll.device)
        row_of = torch.arange(len(rows), device=nll.device)[:, None].expand_as(predicts)[predicts]
        per_row.index_add_(0, row_of, nll)
        return (per_row / predicts.sum(1)).cpu().numpy()


class SentenceEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings: mean-pooled over the attention mask, L2-normalised.

    Embeddings of texts passed with ``cache=True`` (targets, references: the same few texts
    in every batch) are kept in an LRU cache of ``cache_size`` entries.
    """

    def __init__(self, device: str = "auto", max_tokens: int = 256, cache_size: int = 4096) -> None:
        from transformers import AutoModel, AutoTokenizer

        from distrl.models.loading import select_device

        folder = minilm_dir()
        self.device = select_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = AutoModel.from_pretrained(folder, local_files_only=True).to(self.device).eval()
        self.max_tokens, self.cache_size = max_tokens, cache_size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def embed(self, texts: Sequence[str], *, cache: bool = False, batch: int = 64) -> np.ndarray:
        """Unit-norm embeddings (N, 384) of ``texts``."""
        unique = list(dict.fromkeys(texts))
        # Sorted by length, so each padded chunk wastes little compute on padding.
        todo = sorted((t for t in unique if not (cache and t in self._cache)), key=len)
        fresh = {}
        for start in range(0, len(todo), batch):
            chunk = todo[start : start + batch]
            fresh.update(zip(chunk, self._encode(chunk)))
        found = {t: self._cache[t] for t in unique if t not in fresh}
        if cache:
            for text in found:
                self._cache.move_to_end(text)
            self._cache.update(fresh)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        found.update(fresh)
        return np.stack([found[t] for t in texts]) if texts else np.zeros((0, 384), np.float32)

    @torch.inference_mode()
    def _encode(self, texts: list[str]) -> np.ndarray:
        enc = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        ).to(self.device)
        hidden = self.model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()


class SpacyVectors:
    """Document vectors of en_core_web_md: the mean of its tokens' static word vectors.

    That is what spaCy's ``Doc.similarity`` compares, so only the tokenizer and the vectors
    are loaded (no tagger, parser or NER). Vectors of ``cache=True`` texts are kept.
    """

    def __init__(self, cache_size: int = 4096) -> None:
        import spacy

        folder = spacy_md_dir()
        # exclude everything but the tokenizer and vectors; names come from the package meta.
        pipes = spacy.util.get_model_meta(folder)
        exclude = list(pipes.get("pipeline", [])) + list(pipes.get("disabled", []))
        self.nlp = spacy.load(folder, exclude=exclude)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def vectors(self, texts: Sequence[str], *, cache: bool = False) -> np.ndarray:
        """Document vectors (N, 300); zeros for texts with no known word."""
        out = []
        for text in texts:
            if cache and text in self._cache:
                self._cache.move_to_end(text)
                out.append(self._cache[text])
                continue
            vector = np.asarray(self.nlp.make_doc(text).vector, dtype=np.float32)
            if vector.shape != (300,):  # an empty doc has an empty vector
                vector = np.zeros(300, np.float32)
            if cache:
                self._cache[text] = vector
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            out.append(vector)
        return np.stack(out) if out else np.zeros((0, 300), np.float32)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of (N, D) arrays; 0 where either row is all zeros (as spaCy)."""
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = np.einsum("nd,nd->n", a.astype(np.float64), b.astype(np.float64))
    return np.divide(dots, norms, out=np.zeros(len(a)), where=norms > 0)


# Arguments are passed positionally and in full everywhere, so each model has one cache key.
@functools.cache
def reference_lm(model: str, tokenizer: str, device: str, seed: int) -> ReferenceLM:
    """The process-wide ``ReferenceLM`` for these arguments."""
    return ReferenceLM(model, tokenizer, device, seed)


@functools.cache
def sentence_embedder(device: str) -> SentenceEmbedder:
    """The process-wide MiniLM ``SentenceEmbedder``."""
    return SentenceEmbedder(device)


@functools.cache
def spacy_vectors() -> SpacyVectors:
    """The process-wide en_core_web_md ``SpacyVectors``."""
    return SpacyVectors()


@functools.cache
def counting_tokenizer(spec: str, model: str) -> Tokenizer:
    """The process-wide tokenizer ``spec``; "auto" is the tokenizer of ``model``."""
    from distrl.models.loading import model_source_dir
    from distrl.models.tokenizers import load_tokenizer

    source = model_source_dir(model) if spec == "auto" else None
    return load_tokenizer(spec, str(source) if source else None)
