import os
import time

import pytest
import torch

from distrl.config import load_config
from distrl.data.examples import Example, Message
from distrl.envs.base import Environment, Step
from distrl.pg.rollout import RolloutWorker

TIMEOUT = 2.0
HANG = 600.0


class Faulty(Environment):
    """Each episode does what its example's target says: ok, raise, crash or hang."""

    def reset(self, example, seed):
        self.fault = example.target
        return example.prompt_messages

    def step(self, message):
        if self.fault == "crash":
            os._exit(1)
        if self.fault == "hang":
            time.sleep(HANG)
        if self.fault == "raise":
            raise ValueError("bad step")
        return Step(reward=1.0, done=True)


def examples(*faults):
    return [Example((Message("user", "Say something."),), target=f) for f in faults]


@pytest.fixture(scope="module")
def worker(ray_session):
    config = load_config(
        "tiny",
        {
            "env.name": "tests.test_envs_pool:Faulty",
            "env.num_actors": 2,
            "env.step_timeout_s": TIMEOUT,
            "env.cpus_per_actor": 0.0,
            "rollout.max_new_tokens": 4,
        },
    )
    worker = RolloutWorker(**RolloutWorker.arguments(config))
    bias = torch.zeros(worker.model.config.vocab_size)
    bias[worker.tokenizer.eos_token_id] = 30.0  # every turn ends at once: the steps run
    worker.model.get_output_embeddings().register_forward_hook(lambda m, i, out: out + bias)
    yield worker
    for host in worker.env_pool:
        ray_session.kill(host)


@pytest.mark.slow  # starts environment actors on Ray
def test_a_dead_environment_actor_costs_its_episodes_and_is_replaced(worker):
    batch = worker.generate_episodes(examples("ok", "crash", "raise", "ok"), [0, 1, 2, 3])
    # Episode i lives on actor i % 2: actor 1 died with episodes 1 and 3; episode 2 raised.
    assert batch.env_rewards.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert batch.failed.tolist() == [False, True, True, True]
    errors = [json_error(t) for t in batch.transcripts]
    assert errors[1] == errors[3] == "step raised RuntimeError: environment actor 1 died"
    assert errors[2] == "step raised ValueError: bad step"
    assert batch.env_restarts == 1
    again = worker.generate_episodes(examples("ok", "ok", "ok", "ok"), [0, 1, 2, 3])
    assert again.env_rewards.tolist() == [1.0] * 4 and again.env_restarts == 0


@pytest.mark.slow  # starts environment actors on Ray
def test_a_hung_step_is_cut_at_the_timeout_and_its_actor_replaced(worker):
    start = time.monotonic()
    batch = worker.generate_episodes(examples("hang", "ok", "ok", "ok"), [0, 1, 2, 3])
    assert time.monotonic() - start < HANG / 4  # cut, not waited out (the machine is shared)
    assert batch.failed.tolist() == [True, False, True, False]
    assert json_error(batch.transcripts[0]) == (
        f"step raised RuntimeError: environment actor 0 did not answer within {TIMEOUT:g} s"
    )
    assert batch.env_rewards.tolist() == [0.0, 1.0, 0.0, 1.0] and batch.env_restarts == 1


def json_error(transcript):
    import json

    return next((t["error"] for t in json.loads(str(transcript)) if "error" in t), None)
