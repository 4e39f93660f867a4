"""Bad input is answered with one line naming the file, line or field, and a run's own bad input
(output directory, model, prompts, reward values) before Ray starts."""

from pathlib import Path

import pytest

from distrl.chat import read_history
from distrl.clusters import check_cluster_file
from distrl.config import ModelConfig, TokenizerConfig, load_config
from distrl.config.space import read_space
from distrl.data.examples import load_examples
from distrl.errors import ConfigError, DataError, DistrlError, ModelError, RewardError
from distrl.loop import driver
from distrl.loop.driver import train
from distrl.models.loading import load_policy, tiny_model
from distrl.models.policy import build_model, build_tokenizer
from distrl.rewards import check_reward_config

USER_MODULE = """
def boom(completions):
    raise ValueError("bad thing")

def nan(completions):
    return [float("nan")] * len(completions)

def short(completions):
    return [1.0]

def text(completions):
    return ["1.0"] * len(completions)

def slow(completions):
    import time
    time.sleep(30)
    return [0.0] * len(completions)
"""


def write(tmp: Path, name: str, data: str | bytes) -> str:
    path = tmp / name
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data)
    return str(path)


def reward_config(name: str):
    return load_config("tiny", {"reward.components": [{"name": name}]}).reward


def user_reward(name: str, **overrides):
    """A run of the tiny config rewarded by the user function ``name`` alone."""
    return lambda tmp: run(tmp, **{"reward.components": [{"name": name}], **overrides})


TRIAL = r" \(on a trial batch of 2 empty replies before Ray starts\)"


def mismatched_vocab(tmp: Path):
    folder = tmp / "small-vocab-model"
    tiny_model("tiny-llama", vocab_size=1000, seed=0).save_pretrained(folder)
    tokenizer = build_tokenizer(ModelConfig(), TokenizerConfig(name="tiktoken:gpt2"))
    return build_model(ModelConfig(name=str(folder)), tokenizer, seed=0)


def run(tmp: Path, **overrides):
    """``train`` as ``python -m distrl.run --config tiny`` would, into ``tmp/run``."""
    return train(load_config("tiny", {"output.dir": str(tmp / "run"), **overrides}))


def output_under_a_file(tmp: Path):
    (tmp / "a-file").write_text("not a folder")
    return run(tmp, **{"output.dir": str(tmp / "a-file" / "run")})


def output_is_a_file(tmp: Path):
    (tmp / "a-file").write_text("not a folder")
    return run(tmp, **{"output.dir": str(tmp / "a-file")})


def model_is_a_file(tmp: Path):
    return run(tmp, **{"model.name": write(tmp, "model.safetensors", b"\0" * 64)})


def prompt_beyond_context(tmp: Path):
    data = write(tmp, "long.jsonl", '{"text": "hi"}\n{"text": "' + "word " * 600 + '"}\n')
    overrides = {"data.train": data, "data.max_prompt_tokens": 1024, "model.name": "tiny-gpt2"}
    return run(tmp, **overrides)


# (case, error type, what the message must contain; {tmp} is the test's folder), and the call.
BAD_INPUTS = {
    "malformed JSONL line": (
        DataError,
        r"{tmp}/a\.jsonl:2: malformed JSON",
        lambda t: load_examples(write(t, "a.jsonl", '{"text": "ok"}\n{"text": oops}\n')),
    ),
    "empty data file": (
        DataError,
        r"{tmp}/e\.jsonl: no examples",
        lambda t: load_examples(write(t, "e.jsonl", "\n\n")),
    ),
    "missing messages/text": (
        DataError,
        r'{tmp}/m\.jsonl:2: no "messages", "prompt" or "text" key \(keys: foo\)',
        lambda t: load_examples(write(t, "m.jsonl", '{"text": "ok"}\n{"foo": 1}\n')),
    ),
    "wrong types in a line": (
        DataError,
        r'{tmp}/t\.jsonl:1: "messages" must be a list',
        lambda t: load_examples(write(t, "t.jsonl", '{"messages": "hi"}\n')),
    ),
    "non-UTF-8 bytes": (
        DataError,
        r"{tmp}/u\.jsonl:2: not UTF-8 at byte 10",
        lambda t: load_examples(write(t, "u.jsonl", b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')),
    ),
    "an enormous line": (
        DataError,
        r"{tmp}/h\.jsonl:1: line is longer than 1048576 bytes",
        lambda t: load_examples(write(t, "h.jsonl", '{"text": "' + "x" * (2 << 20) + '"}\n')),
    ),
    "unknown config key": (
        ConfigError,
        r"unknown config key 'learner\.lrr' \(did you mean 'learner\.lr'\?\)",
        lambda t: load_config("tiny", {"learner.lrr": 1}),
    ),
    "wrong config type": (
        ConfigError,
        r"rollout\.batch_size: expected an integer, got str 'eight'",
        lambda t: load_config("tiny", {"rollout.batch_size": "eight"}),
    ),
    "negative learning rate": (
        ConfigError,
        r"learner\.lr: -0\.0001 is out of range \(allowed: > 0\.0",
        lambda t: load_config("tiny", {"learner.lr": -1e-4}),
    ),
    "invalid YAML": (
        ConfigError,
        r"{tmp}/c\.yaml: line 3, column 1 invalid YAML",
        lambda t: load_config(write(t, "c.yaml", "algo: ppo\nlearner: [\n")),
    ),
    "missing model path": (
        ModelError,
        r"model path {tmp}/nope does not exist",
        lambda t: load_policy(str(t / "nope")),
    ),
    "a folder that is not a model": (
        ModelError,
        r"{tmp} is not a Hugging Face model folder \(no config\.json\)",
        lambda t: load_policy(str(t)),
    ),
    "tokenizer/model vocabulary mismatch": (
        ModelError,
        r"tokenizer 'tiktoken:gpt2' has vocab size 50257 but the model's vocab size is 1000",
        mismatched_vocab,
    ),
    "reward function import error": (
        RewardError,
        r"reward component 'nosuchmod:f': cannot import module 'nosuchmod'",
        lambda t: check_reward_config(reward_config("nosuchmod:f")),
    ),
    "reward function that raises": (
        RewardError,
        r"reward component 'usermod:boom' failed on sample 0 \(''\): ValueError: bad thing" + TRIAL,
        user_reward("usermod:boom"),
    ),
    "reward function returns NaN": (
        RewardError,
        r"reward component 'usermod:nan' failed on sample 0 \(''\): returned nan" + TRIAL,
        user_reward("usermod:nan"),
    ),
    "reward function returns the wrong length": (
        RewardError,
        r"reward component 'usermod:short' .*returned 1 values for 2 samples" + TRIAL,
        user_reward("usermod:short"),
    ),
    "reward function that does not return": (
        RewardError,
        r"reward function usermod:slow did not return within faults\.score_timeout_s=0\.5 s "
        r"on a trial batch of 2 empty replies before Ray starts",
        user_reward("usermod:slow", **{"faults.score_timeout_s": 0.5}),
    ),
    "tune space with bad bounds": (
        ConfigError,
        r"{tmp}/s\.yaml: params 'learner\.lr': low \(0\.1\) must be below high \(0\.01\)",
        lambda t: read_space(
            write(
                t,
                "s.yaml",
                "base: tiny\nmetric: eval/reward\nmode: max\n"
                "params:\n  learner.lr: {low: 0.1, high: 0.01}\n",
            )
        ),
    ),
    "invalid cluster YAML": (
        ConfigError,
        r"cluster file {tmp}/k\.yaml: max_workers: -3 is less than the minimum of 0",
        lambda t: check_cluster_file(
            write(
                t,
                "k.yaml",
                "cluster_name: x\nprovider: {type: aws, region: us-west-2}\nmax_workers: -3\n",
            )
        ),
    ),
    "a history file that is not a history": (
        DataError,
        r"history file {tmp}/hist\.json: message 0 has role 'robot'",
        lambda t: read_history(
            write(t, "hist.json", '{"messages": [{"role": "robot", "content": "x"}]}')
        ),
    ),
    "reward function returns strings": (
        RewardError,
        r"reward component 'usermod:text' failed on sample 0 \(''\): returned str '1\.0', "
        r"not a number" + TRIAL,
        user_reward("usermod:text"),
    ),
    "an output directory under a regular file": (
        DistrlError,
        r"output directory {tmp}/a-file/run cannot be created: {tmp}/a-file is a file",
        output_under_a_file,
    ),
    "an output directory that is a regular file": (
        DistrlError,
        r"output directory {tmp}/a-file is a file, not a folder",
        output_is_a_file,
    ),
    "a model name that is a regular file": (
        ModelError,
        r"model {tmp}/model\.safetensors is a file; a model is a Hugging Face folder or a name",
        model_is_a_file,
    ),
    "a prompt longer than the model's context": (
        ModelError,
        r"{tmp}/long\.jsonl:2: the prompt is 60\d tokens; with rollout\.max_new_tokens 8 that "
        r"is 6\d\d, beyond the 512 positions of model 'tiny-gpt2'; lower data\.max_prompt_tokens",
        prompt_beyond_context,
    ),
}


def ray_must_not_start(config):
    raise AssertionError("Ray was started before the bad input was found")


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_answered_clearly(case, tmp_path, monkeypatch):
    error, message, call = BAD_INPUTS[case]
    (tmp_path / "usermod.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(driver, "init_ray", ray_must_not_start)
    with pytest.raises(error) as caught:
        call(tmp_path)
    pattern = message.replace("{tmp}", str(tmp_path))
    assert caught.match(pattern), str(caught.value)
    assert "\n" not in str(caught.value).strip() or case == "invalid YAML"
