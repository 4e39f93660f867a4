import numpy as np
import pytest
import torch

from distrl.config import load_config
from distrl.data.examples import load_examples
from distrl.dqn.qnets import TensorMemory
from distrl.models.policy import encode_prompts
from distrl.pg.rollout import RolloutWorker, Trajectories, response_mask
from distrl.weights.tensors import VersionedWeights, get_weights


@pytest.fixture(scope="module")
def setup():
    config = load_config("tiny", {"rollout.max_new_tokens": 6})
    worker = RolloutWorker(**RolloutWorker.arguments(config))
    examples = load_examples("default", limit=6)
    prompts = encode_prompts(examples, worker.tokenizer, config.tokenizer, config.data)
    return config, worker, prompts


def test_response_mask_stops_after_first_eos():
    ids = torch.tensor([[5, 2, 2, 7], [5, 6, 7, 8], [2, 9, 9, 9]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.float32)
    assert torch.equal(response_mask(ids, 2), expected)


def test_generate_returns_compact_arrays(setup):
    config, worker, prompts = setup
    batch = worker.generate(prompts, list(range(len(prompts))))
    b = len(prompts)
    assert batch.prompt_ids.shape[0] == b and batch.prompt_ids.dtype == np.int64
    assert batch.response_ids.shape == (b, 6)
    assert batch.logprobs.dtype == np.float32 and batch.logprobs.shape == (b, 6)
    assert np.all(batch.logprobs <= 0)
    assert np.all(batch.logprobs[batch.response_mask == 0] == 0)
    assert batch.texts.shape == (b,) and batch.texts.dtype.kind == "U"
    assert batch.version == 0
    # Left padding: each prompt's last token sits in the last column.
    for row, p in zip(batch.prompt_ids, prompts):
        assert row[-len(p) :].tolist() == p


def test_generate_never_holds_every_steps_logits(setup):
    """Sampled-token logprobs are read step by step: no (B, T, V) tensor is ever made (at
    batch 64 x 128 new tokens and SmolLM2's vocabulary that would be 1.6 GB of float32)."""
    _, worker, prompts = setup
    with TensorMemory() as memory:
        batch = worker.generate(prompts, list(range(len(prompts))))
    b, t = batch.response_ids.shape
    vocab = worker.model.get_output_embeddings().weight.shape[0]
    assert memory.largest_numel < b * t * vocab / 2


def test_sampling_is_seeded_and_greedy_is_deterministic(setup):
    config, _, prompts = setup
    a = RolloutWorker(**RolloutWorker.arguments(config))
    b = RolloutWorker(**RolloutWorker.arguments(config))
    assert np.array_equal(
        a.generate(prompts, [0] * len(prompts)).response_ids,
        b.generate(prompts, [0] * len(prompts)).response_ids,
    )
    g1 = a.generate(prompts, [0] * len(prompts), greedy=True)
    g2 = a.generate(prompts, [0] * len(prompts), greedy=True)
    assert np.array_equal(g1.response_ids, g2.response_ids)


def test_set_weights_changes_generation_and_version(setup):
    config, worker, prompts = setup
    before = worker.generate(prompts, [0] * len(prompts), greedy=True)
    state = {k: v + 0.5 * torch.randn_like(v) for k, v in get_weights(worker.model).items()}
    assert worker.set_weights(VersionedWeights(3, state)) == 3
    after = worker.generate(prompts, [0] * len(prompts), greedy=True)
    assert after.version == 3
    assert not np.array_equal(before.logprobs, after.logprobs)


def test_concat_repads(setup):
    _, worker, prompts = setup
    a = worker.generate(prompts[:2], [0, 1])
    b = worker.generate(prompts[2:], [2, 3, 4, 5])
    both = Trajectories.concat([a, b])
    assert both.prompt_ids.shape[0] == 6
    assert both.example_ids.tolist() == [0, 1, 2, 3, 4, 5]
    assert np.array_equal(
        both.prompt_mask.sum(1), np.concatenate([a.prompt_mask.sum(1), b.prompt_mask.sum(1)])
    )
