import numpy as np
import pytest
import torch

from distrl.config import load_config
from distrl.data.examples import load_examples
from distrl.models.loading import load_policy
from distrl.models.policy import (
    distinct_prompts,
    encode_prompts,
    left_pad,
    position_ids,
    response_hidden,
)
from distrl.pg.rollout import RolloutWorker

VOCAB = 101
SPECIAL = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def test_distinct_prompts_finds_first_rows_and_groups():
    ids = torch.tensor([[0, 5, 6], [7, 8, 9], [0, 5, 6], [7, 8, 9], [1, 1, 1]])
    first, inverse = distinct_prompts(ids)
    assert torch.equal(ids[first][inverse], ids)
    assert sorted(first.tolist()) == [0, 1, 4]  # the first occurrence of each prompt
    assert inverse[0] == inverse[2] and inverse[1] == inverse[3]
    assert len(set(inverse.tolist())) == 3


def grouped_batch() -> tuple[torch.Tensor, torch.Tensor, int]:
    """Two prompts of different lengths (left-padded), 3 and 2 samples of ragged responses."""
    gen = torch.Generator().manual_seed(0)
    prompts = [[5, 9, 14, 3], [8, 30, 7, 6, 21, 11]]
    p_ids, p_mask = left_pad([prompts[0]] * 3 + [prompts[1]] * 2, SPECIAL["pad_token_id"])
    resp = torch.randint(3, VOCAB, (5, 6), generator=gen)
    r_mask = torch.ones(5, 6, dtype=torch.long)
    r_mask[1, 3:] = 0
    r_mask[4, 1:] = 0
    ids = torch.cat([torch.from_numpy(p_ids), resp], 1)
    mask = torch.cat([torch.from_numpy(p_mask), r_mask], 1)
    return ids, mask, p_ids.shape[1]


@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("mode", ["shared", "packed"])
def test_shared_prompt_and_packed_forwards_equal_the_padded_forward(kind, mode):
    """Running each distinct prompt once and copying its KV cache (shared), or every row's real
    tokens packed into one row (packed), gives the hidden states and the gradients of running
    every padded row whole."""
    model = load_policy(kind, vocab_size=VOCAB, special_ids=SPECIAL, device="cpu", seed=0)
    ids, mask, start = grouped_batch()
    weights = torch.randn(5, ids.shape[1] - start, model.config.hidden_size)

    def run(mode: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        if mode != "padded":
            hidden = response_hidden(model, ids, mask, start, pack=mode == "packed")
        else:
            out = model.base_model(
                input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)
            )
            hidden = out.last_hidden_state[:, start - 1 : -1]
        (hidden * weights * mask[:, start:, None]).sum().backward()
        grads = [
            torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()
        ]
        return hidden.detach(), grads

    plain, plain_grads = run("padded")
    shared, shared_grads = run(mode)
    assert shared.shape == plain.shape
    real = mask[:, start:].bool()
    torch.testing.assert_close(shared[real], plain[real], atol=1e-5, rtol=1e-4)
    for a, b in zip(shared_grads, plain_grads):  # sums over rows, in another order
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_samples_of_one_prompt_share_its_prefill_and_decode_as_alone():
    """Greedy decoding of repeated prompts (prefilled once per prompt) gives each row what the
    prompt gives alone, with the same logprobs."""
    config = load_config("tiny", {"rollout.max_new_tokens": 8})
    worker = RolloutWorker(**RolloutWorker.arguments(config))
    examples = load_examples("default", limit=2)
    prompts = encode_prompts(examples, worker.tokenizer, config.tokenizer, config.data)
    alone = worker.generate(prompts, [0, 1], greedy=True)
    grouped = worker.generate([prompts[0]] * 3 + [prompts[1]] * 2, [0] * 3 + [1] * 2, greedy=True)
    rows = [0, 0, 0, 1, 1]
    np.testing.assert_array_equal(grouped.response_ids, alone.response_ids[rows])
    np.testing.assert_allclose(grouped.logprobs, alone.logprobs[rows], atol=1e-5)
