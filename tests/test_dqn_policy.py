"""Q-guided decoding: KV-cached candidates, exploration rules and UCB counts."""

import numpy as np
import pytest
import torch

from distrl.config import load_config
from distrl.data.examples import load_examples
from distrl.dqn.policy import QPolicy, UCBCounts, on_device
from distrl.dqn.qnets import TensorMemory, build_qnet
from distrl.models.policy import build_model, build_tokenizer, encode_prompts, left_pad


def make(model="tiny-llama", top_k=4, **dqn):
    config = load_config(
        "tiny", {"algo": "dqn", "model.name": model, "dqn.action_top_k": top_k, **dqn}
    )
    tokenizer = build_tokenizer(config.model, config.tokenizer)
    reference = build_model(config.model, tokenizer, seed=0)
    qnet = build_qnet(config.dqn, reference, tokenizer.vocab_size, seed=0)
    policy = QPolicy(
        qnet, reference, top_k=top_k, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id
    )
    examples = load_examples("default", limit=4)
    ids, mask = left_pad(encode_prompts(examples, tokenizer, config.tokenizer, config.data), 0)
    return policy, reference, ids, mask


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
def test_greedy_q_decoding_starts_as_the_reference_greedy_decoding(model):
    """The lm_head Q-network starts as the LM's log-probabilities, so greedy Q decoding over the
    cached reference's top-k equals the LM's own greedy ``generate`` (padded prompts too)."""
    policy, reference, ids, mask = make(model)
    out = policy.decode(ids, mask, 6)
    expected = reference.generate(
        input_ids=torch.from_numpy(ids),
        attention_mask=torch.from_numpy(mask),
        do_sample=False,
        max_new_tokens=6,
        pad_token_id=0,
    )[:, ids.shape[1] :]
    assert np.array_equal(out.response_ids, expected.numpy())
    assert out.candidates.shape == (len(ids), 6, 4)
    # The greedy token is the reference's top candidate, and its Q is the max over candidates.
    assert np.array_equal(out.candidates[:, :, 0], out.response_ids)
    assert np.allclose(out.q_taken, out.q_max, atol=1e-6)


def test_exploration_stays_within_the_candidates():
    policy, _, ids, mask = make(top_k=3)
    gen = torch.Generator().manual_seed(0)
    counts = UCBCounts(2)
    for explore in ("epsilon", "boltzmann", "ucb"):
        out = policy.decode(
            ids,
            mask,
            5,
            explore=explore,
            epsilon=1.0,
            temperature=5.0,
            generator=gen,
            counts=counts,
        )
        live = out.response_mask > 0
        chosen = (out.candidates == out.response_ids[..., None]).any(-1)
        assert chosen[live].all(), explore
        assert out.ucb_bonus == 0  # unvisited contexts: ln(0 + 1) = 0, no bonus yet
    again = policy.decode(ids, mask, 5, explore="ucb", counts=counts, generator=gen)
    assert again.ucb_bonus > 0  # the same prompts' contexts now have visits


def test_decoding_reads_only_the_last_positions_logits():
    """The reference's prefill yields one position's logits, not (B, P, V): at batch 64,
    128-token prompts and SmolLM2's vocabulary those would take 800 MB in bfloat16."""
    policy, reference, ids, mask = make(top_k=4)
    with TensorMemory() as memory:
        policy.decode(ids, mask, 2)
    vocab = reference.get_output_embeddings().weight.shape[0]
    assert memory.largest_numel < ids.size * vocab / 4


def test_a_generator_on_the_policys_device_is_used_as_it_is():
    gen = torch.Generator().manual_seed(0)
    assert (
        on_device(gen, torch.device("cpu")) is gen and on_device(None, torch.device("cpu")) is None
    )


def test_full_vocabulary_has_no_candidate_columns():
    policy, _, ids, mask = make(top_k=0)
    out = policy.decode(ids, mask, 3, explore="epsilon", epsilon=1.0)
    assert out.candidates.shape == (len(ids), 3, 0)


def test_ucb_tries_every_candidate_of_a_context_before_repeating():
    """With equal Q-values, UCB picks an untried candidate before a tried one."""
    policy, _, ids, mask = make(top_k=4)
    policy.qnet.q_head.linear.weight.data.zero_()
    policy.qnet.q_head.linear.bias.data.zero_()  # all Q equal: only the bonus decides
    counts = UCBCounts(context=8)
    firsts = []
    for _ in range(4):
        out = policy.decode(ids[:1], mask[:1], 1, explore="ucb", ucb_c=1.0, counts=counts)
        firsts.append(int(out.response_ids[0, 0]))
    assert sorted(firsts) == sorted(out.candidates[0, 0].tolist())


def test_ucb_counts_lookup():
    counts = UCBCounts(context=2)
    key = counts.key([5, 6, 7])
    assert key == counts.key([9, 6, 7]) != counts.key([6, 8])
    counts.visit(key, 3)
    counts.visit(key, 3)
    counts.visit(key, 1)
    n, total = counts.lookup([key, counts.key([1])], vocab=5)
    assert n[0].tolist() == [0, 1, 0, 2, 0] and n[1].sum() == 0
    assert total.tolist() == [3.0, 0.0]
