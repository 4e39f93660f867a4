import json

import numpy as np
import pytest
import torch

from distrl.config import load_config
from distrl.data.examples import Example, Message
from distrl.envs.base import Environment, Step, load_environment
from distrl.envs.episodes import Renderer, run_episodes
from distrl.envs.guess import GuessNumber
from distrl.errors import ConfigError, ModelError
from distrl.pg.learner import Learner
from distrl.pg.rollout import RolloutWorker

needs_vllm = pytest.mark.skipif(
    __import__("importlib").util.find_spec("vllm") is None, reason="vLLM is not installed"
)
EXAMPLES = [
    Example((Message("user", "Guess my number from 1 to 8."),), target=str(n)) for n in (3, 6)
]


def likely_eos(model, eos_id, boost=4.0):
    """Make the tiny random model end its turns after a few tokens (a bias on EOS's logit)."""
    bias = torch.zeros(model.config.vocab_size)
    bias[eos_id] = boost
    model.get_output_embeddings().register_forward_hook(lambda m, i, out: out + bias)


@pytest.fixture(scope="module")
def played():
    config = load_config(
        "tiny",
        {
            "env.name": "guess",
            "env.max_turns": 4,
            "env.max_total_tokens": 60,
            "rollout.max_new_tokens": 8,
            "rollout.temperature": 1.0,
        },
    )
    worker = RolloutWorker(**RolloutWorker.arguments(config))
    learner = Learner(**Learner.arguments(config))
    worker.set_weights(learner.weights())
    eos = worker.tokenizer.eos_token_id
    likely_eos(worker.model, eos)
    likely_eos(learner.net.model, eos)
    turns = []  # what generate returned, per call, row by row
    generate = worker.generate

    def recorded(prompts, ids, **kw):
        batch = generate(prompts, ids, **kw)
        n = batch.response_mask.sum(1).astype(int)
        turns.append([row[:k].tolist() for row, k in zip(batch.response_ids, n)])
        return batch

    worker.generate = recorded
    examples = EXAMPLES * 3
    batch = worker.generate_episodes(examples, list(range(len(examples))))
    return worker, learner, batch, turns


def test_the_trained_tokens_are_the_sampled_ones_and_the_rest_is_the_template(played):
    worker, _, batch, turns = played
    assert not worker.tokenizer.has_chat_template  # distrl's plain format: User:/Assistant:
    assert batch.turns.max() >= 2, "no episode went past its first turn"
    rows = range(len(batch.texts))
    for row in rows:
        sampled = batch.response_mask[row] > 0
        live = batch.response_attention[row] > 0
        ids = batch.response_ids[row]
        # The model's tokens are exactly what generate returned for this episode, turn by turn
        # (generate call k held the episodes that took more than k turns, in order).
        mine = []
        for k in range(int(batch.turns[row])):
            going = [r for r in rows if batch.turns[r] > k]
            mine += turns[k][going.index(row)]
        assert ids[sampled].tolist() == mine
        # Everything else is the environment's turns as the plain template writes them.
        transcript = json.loads(str(batch.transcripts[row]))
        hints = [t["content"] for t in transcript if t["role"] == "user"]
        env_text = worker.tokenizer.decode(ids[live & ~sampled], skip_special_tokens=False)
        assert env_text == "".join(f"\nUser: {h}\nAssistant:" for h in hints)
        assert batch.logprobs[row][~sampled].sum() == 0
        assert live[: int(live.sum())].all(), "attention is not contiguous"


def test_the_learner_scores_model_tokens_as_the_worker_sampled_them(played):
    _, learner, batch, _ = played
    sampled = batch.response_mask > 0
    recomputed = learner.logprobs(batch)
    np.testing.assert_allclose(recomputed[sampled], batch.logprobs[sampled], atol=2e-4)
    assert np.abs(recomputed[~sampled]).sum() == 0


class Rewrites(Environment):
    def reset(self, example, seed):
        return example.prompt_messages

    def step(self, message):
        return Step([{"role": "user", "content": "again"}])


class Raises(Environment):
    def reset(self, example, seed):
        return example.prompt_messages

    def step(self, message):
        raise RuntimeError("the verifier fell over")


class FailsToStart(Rewrites):
    def reset(self, example, seed):
        raise KeyError("no such task")


HI = Example((Message("user", "hi"),))


class DropsOldReplies:
    """A template that shows only the latest assistant reply (as reasoning-stripping ones do)."""

    name, eos_token_id = "drops-old-replies", 0

    def apply_chat_template(self, messages, *, add_generation_prompt):
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
        shown = [m for i, m in enumerate(messages) if m["role"] != "assistant" or i == last]
        text = "".join(f"<{m['role']}>{m['content']}" for m in shown)
        return text + ("<assistant>" if add_generation_prompt else "")

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i or not skip_special_tokens)


class ChatML(DropsOldReplies):
    """One character a token; every turn ends with EOS ('$') and a newline, as ChatML does."""

    name, eos_token_id = "chatml-like", ord("$")

    def apply_chat_template(self, messages, *, add_generation_prompt):
        text = "".join(f"<{m['role']}>{m['content']}$\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


def scripted(replies, eos=0):
    """A generate that answers every episode with the next of ``replies`` (ids ending in 0)."""
    it = iter(replies)

    def generate(seqs):
        ids = [[ord(c) for c in next(it)] + [eos] for _ in seqs]
        return ids, {"logprobs": [np.full(len(i), -1.0) for i in ids]}

    return generate


def test_a_template_that_rewrites_earlier_turns_is_refused():
    with pytest.raises(ModelError, match="does not append"):
        run_episodes(
            generate=scripted(["a", "b", "c"]),
            environments=[Rewrites()],
            examples=[HI],
            seeds=[0],
            renderer=Renderer(DropsOldReplies()),
            eos_id=0,
            max_turns=3,
            max_total_tokens=100,
        )


def test_the_episode_is_the_templates_text_of_its_conversation_token_for_token():
    eos = ChatML.eos_token_id
    (episode,) = run_episodes(
        generate=scripted(["a", "bb", "c"], eos=eos),
        environments=[Rewrites()],
        examples=[HI],
        seeds=[0],
        renderer=Renderer(ChatML()),
        eos_id=eos,
        max_turns=3,
        max_total_tokens=100,
    )
    text = "".join(chr(i) for i in episode.prompt + episode.tokens)
    assert (
        text
        == "<user>hi$\n<assistant>a$\n<user>again$\n<assistant>bb$\n<user>again$\n<assistant>c$"
    )
    model = "".join(chr(i) for i, s in zip(episode.tokens, episode.sampled) if s)
    assert model == "a$bb$c$"
    assert episode.column("logprobs").tolist() == [-1.0 * s for s in episode.sampled]


def test_an_environment_that_raises_ends_its_episode_and_marks_it_failed():
    episodes = run_episodes(
        generate=scripted(["a", "b"]),
        environments=[Raises(), Rewrites(), FailsToStart()],
        examples=[HI] * 3,
        seeds=[0, 1, 2],
        renderer=Renderer(DropsOldReplies()),
        eos_id=0,
        max_turns=1,
        max_total_tokens=100,
    )
    assert episodes[0].failed == "step raised RuntimeError: the verifier fell over"
    assert episodes[1].failed is None and episodes[1].done
    assert episodes[2].failed == "reset raised KeyError: 'no such task'"
    assert episodes[2].tokens == [] and episodes[2].done


def test_an_environment_is_named_by_import_path_and_a_bad_one_is_refused():
    assert load_environment("guess") is GuessNumber
    assert load_environment("distrl.envs.guess:GuessNumber") is GuessNumber
    for name, why in [
        ("nope", "neither a packaged"),
        ("distrl.nowhere:Env", "cannot import"),
        ("distrl.envs.guess:PROMPT", "not a subclass"),
    ]:
        with pytest.raises(ConfigError, match=why):
            load_environment(name)
    with pytest.raises(ConfigError, match="env.options"):
        load_environment("guess", {"colour": "red"})


def early_stopping_model(folder, config):
    """A tiny random model that ends its turns after a few tokens, saved as a folder: hidden
    dimension 0 holds a constant no layer writes to, and only EOS reads it (P(EOS) about 0.2)."""
    from distrl.models.policy import build_model, build_tokenizer

    tokenizer = build_tokenizer(config.model, config.tokenizer)
    model = build_model(config.model, tokenizer, seed=0)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 4.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[tokenizer.eos_token_id, 0] = 1.2
    model.save_pretrained(folder)
    return str(folder)


@pytest.mark.slow  # a run on Ray per algorithm
@pytest.mark.parametrize(
    "algo, env, data, engine",
    [
        ("ppo", "guess", "guess", "hf"),
        ("ppo", "calculator", "arithmetic", "hf"),
        ("grpo", "calculator", "arithmetic", "hf"),
        pytest.param("grpo", "guess", "guess", "vllm", marks=needs_vllm),
    ],
)
def test_a_multi_turn_run_trains_on_whole_episodes_and_logs_them(
    ray_session, tmp_path, algo, env, data, engine
):
    from distrl.loop.driver import train
    from distrl.outputs.metrics import read_metrics

    overrides = {
        "algo": algo,
        "iterations": 2,
        "env.name": env,
        "env.max_turns": 3,
        "env.max_total_tokens": 48,
        "data.train": data,
        "reward.components": [],
        "rollout.samples_per_prompt": 2,
        "output.dir": str(tmp_path / "run"),
        "output.progress": False,
        "output.plots": False,
        "output.samples_logged": 16,
        "rollout.engine": engine,
    }
    if engine == "vllm":  # one engine: two would not fit beside the learner on 2 cores
        overrides["rollout.num_workers"] = 1
    model = early_stopping_model(tmp_path / "model", load_config("tiny"))
    run_dir = train(load_config("tiny", {**overrides, "model.name": model}))
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert records[-1]["learner/version"] == 2 and records[-1]["faults/env_errors"] == 0
    assert records[-1]["episode/tool_calls"] == 0  # a random model calls no tool
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert all(s["reward/total"] == s["reward/env"] for s in samples)
    assert all(s["response"] == s["turns"][-1]["content"] for s in samples)
    from distrl.validate import run_config_for, validate

    final = str(run_dir / "final")  # validate plays the run's episodes too
    report = validate(run_config_for(final, None), examples=2, checkpoint=final, progress=False)
    assert report["validate/examples"] == 2 and report["validate/episode_turns"] >= 1
    if env == "guess":  # the random model's replies hold no number: told so, it tries again
        assert max(r["episode/turns"] for r in records) > 1
        longest = max(samples, key=lambda s: len(s["turns"]))
        assert [t["role"] for t in longest["turns"]][:3] == ["assistant", "user", "assistant"]
        assert longest["turns"][1]["content"] in ("Higher.", "Lower.", "Reply with only a number.")


@needs_vllm
@pytest.mark.slow  # builds a vLLM engine
def test_vllm_plays_episodes_from_token_ids_and_the_learner_agrees(tmp_path):
    model = early_stopping_model(tmp_path / "model", load_config("tiny"))
    config = load_config(
        "tiny",
        {
            "model.name": model,
            "rollout.engine": "vllm",
            "rollout.temperature": 1.0,
            "env.name": "guess",
            "env.max_turns": 4,
            "env.max_total_tokens": 60,
        },
    )
    worker = RolloutWorker(**RolloutWorker.arguments(config))
    try:
        learner = Learner(**Learner.arguments(config))
        examples = EXAMPLES * 4
        batch = worker.generate_episodes(examples, list(range(len(examples))))
        assert batch.turns.max() >= 2, "no episode went past its first turn"
        sampled = batch.response_mask > 0
        assert (batch.response_attention[sampled] == 1).all()
        assert ((batch.response_attention > 0) & ~sampled).any()  # environment turns
        gap = np.abs(learner.logprobs(batch)[sampled] - batch.logprobs[sampled]).max()
        assert gap < 1e-4
    finally:
        worker.engine.close()


@pytest.mark.slow  # a DQN run on Ray
def test_a_dqn_run_acts_over_multi_turn_episodes_and_replays_their_transitions(
    ray_session, tmp_path
):
    from distrl.loop.driver import train
    from distrl.outputs.metrics import read_metrics

    overrides = {
        "algo": "dqn",
        "iterations": 2,
        "env.name": "guess",
        "env.max_turns": 3,
        "env.max_total_tokens": 40,
        "data.train": "guess",
        "reward.components": [],
        "dqn.learning_starts": 8,
        "dqn.batch_size": 8,
        "dqn.updates_per_iteration": 2,
        "dqn.action_top_k": 8,
        "output.dir": str(tmp_path / "run"),
        "output.progress": False,
        "output.plots": False,
    }
    model = early_stopping_model(tmp_path / "model", load_config("tiny"))
    run_dir = train(load_config("tiny", {**overrides, "model.name": model}))
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert max(r["episode/turns"] for r in records) > 1
    assert records[-1]["learner/updates"] == 4 and records[-1]["faults/env_errors"] == 0
    # Every model token is one transition; the environment's tokens are none.
    assert 0 < records[0]["replay/size"] <= 2 * 4 * 3 * 8
