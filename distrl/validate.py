"""``python -m distrl.validate --checkpoint DIR``: score a checkpoint on held-out prompts.

Generations on the validation prompts of the run's config are scored by every reward
component; the policy's perplexity and token accuracy on reference responses and the
distinct-1/2 diversity of its generations are reported beside them. By default one greedy
completion per prompt; ``--samples N`` samples N per prompt (at ``--temperature``, default the
run's ``rollout.temperature``, with its top-p and top-k) and adds pass@k for k = 1, 2, 4, ...,
N: the chance that at least one of k completions drawn from a prompt's N succeeds (total reward
at least ``--success-threshold``, default 1.0, "passed" for a 0/1 reward), estimated without
bias and averaged over prompts. A DQN checkpoint samples from softmax(Q / temperature).
Runs in one process, without Ray.

Examples:
    python -m distrl.validate --checkpoint runs/ppo-20261126-101500/final
    python -m distrl.validate --checkpoint default --config default --json before.json
    python -m distrl.validate --checkpoint runs/grpo-20261126-101500/final --samples 8
    python -m distrl.validate --checkpoint DIR --samples 16 --temperature 0.7 --json k.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np

from distrl.config import RunConfig, cli, load_config
from distrl.errors import ConfigError


def run_config_for(checkpoint: str, config: str | None) -> RunConfig:
    """The config to validate with: ``--config``, else the run's own ``config.yaml``."""
    if config is None:
        path = Path(checkpoint)
        found = [
            p / "config.yaml"
            for p in (path.parent, path.parent.parent)
            if (p / "config.yaml").is_file()
        ]
        if not found:
            raise ConfigError(f"no config.yaml beside {checkpoint}; pass --config")
        config = str(found[0])
    from distrl.dqn.learner import RUN_FILE, is_dqn_checkpoint

    base = load_config(config)
    if is_dqn_checkpoint(Path(checkpoint)):  # the Q-network is rebuilt from the run's config
        run = load_config(str(Path(checkpoint) / RUN_FILE))
        return dataclasses.replace(run, data=base.data, reward=base.reward)
    tokenizer = base.tokenizer
    spec_file = Path(checkpoint) / "distrl_tokenizer.json"
    if spec_file.is_file():  # the run's tokenizer (tiktoken specs are not in the HF folder)
        spec = json.loads(spec_file.read_text())["spec"]
        tokenizer = dataclasses.replace(tokenizer, name=spec)
    model = dataclasses.replace(base.model, name=checkpoint)
    return dataclasses.replace(base, model=model, tokenizer=tokenizer)


# Sequences generated at once: whole prompts, so each prompt's samples share its prefill.
GENERATE_BATCH = 64


def pass_at_k(*, successes: np.ndarray, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): the chance that at least one of k completions drawn
    without replacement from a prompt's n succeeds, averaged over prompts.

    Args:
        successes: (P, n) bool, completion j of prompt i succeeded.
        k: completions drawn per prompt, 1 <= k <= n.

    Returns:
        mean over prompts of ``1 - C(n - c, k) / C(n, k)``, c the prompt's successes.
    """
    n = successes.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n; got k={k}, n={n}")
    counts = successes.sum(axis=1)
    return float(np.mean([1.0 - math.comb(n - int(c), k) / math.comb(n, k) for c in counts]))


def pass_ks(n: int) -> list[int]:
    """The k reported for n samples per prompt: 1, 2, 4, ... up to n, and n itself."""
    ks = [2**i for i in range(n.bit_length()) if 2**i <= n]
    return ks if ks[-1] == n else [*ks, n]


def validate(
    config: RunConfig,
    examples: int,
    checkpoint: str | None = None,
    *,
    samples: int = 1,
    temperature: float | None = None,
    max_new_tokens: int | None = None,
    success_threshold: float = 1.0,
    progress: bool = False,
) -> dict[str, float]:
    """Reward components, success rate and pass@k, reference perplexity/accuracy and diversity
    of ``config.model``, or of the Q-guided policy of a DQN ``checkpoint`` (no perplexity: Q is
    no distribution).

    Args:
        config: the run config (``run_config_for``).
        examples: held-out prompts to generate for (at most the validation set).
        checkpoint: the checkpoint folder, to recognise a DQN one.
        samples: completions per prompt.
        temperature: 0 or None with one sample: greedy; else sampling at this temperature
            (None: the run's ``rollout.temperature``, ``dqn.boltzmann_temperature`` for DQN).
        max_new_tokens: longest completion; None: the run's ``rollout.max_new_tokens``.
        success_threshold: a completion succeeds when its total reward is at least this.
        progress: show what it is doing on stderr (loading, a bar over the prompts, scoring).

    Raises:
        ConfigError: a bad ``examples``, ``samples``, ``temperature`` or ``max_new_tokens``
            (named as their flags).
    """
    from tqdm import tqdm

    from distrl.data.prompts import prepare, reward_batch
    from distrl.dqn.learner import QNET_FILE, is_dqn_checkpoint
    from distrl.dqn.rollout import QRolloutWorker
    from distrl.envs.episodes import Episodes, with_episode_rewards
    from distrl.models.policy import reference_metrics
    from distrl.pg.rollout import RolloutWorker, Trajectories
    from distrl.rewards import RewardBatch, RewardScorer
    from distrl.rewards.components import Diversity
    from distrl.runtime.checkpoint import load_weights
    from distrl.weights.tensors import VersionedWeights

    greedy = _check_flags(examples, samples, temperature, max_new_tokens)
    dqn = checkpoint is not None and is_dqn_checkpoint(Path(checkpoint))
    config = _sampling_config(config, temperature, max_new_tokens)
    _, val = prepare(config)  # checks that each prompt plus max_new_tokens fits the model

    def say(text: str) -> None:
        if progress:
            print(f"distrl.validate: {text}", file=sys.stderr, flush=True)

    say(f"loading {checkpoint or config.model.name}")
    if dqn:
        worker = QRolloutWorker(**QRolloutWorker.arguments(config))
        worker.set_weights(VersionedWeights(1, load_weights(Path(checkpoint), (QNET_FILE,))))
    else:
        worker = RolloutWorker(**RolloutWorker.arguments(config))
    n = min(examples, len(val.ids))
    per_call = max(1, GENERATE_BATCH // samples)
    parts = []
    bar = tqdm(total=n, desc="distrl.validate: generating", unit="prompt", disable=not progress)
    for start in range(0, n, per_call):
        ids = list(range(start, min(start + per_call, n)))
        rows = [i for i in ids for _ in range(samples)]  # a prompt's samples side by side
        if config.env.name:  # the run's environment plays its episodes
            examples_ = [val.examples[i] for i in rows]
            parts.append(worker.generate_episodes(examples_, rows, greedy=greedy))
        else:
            parts.append(worker.generate([val.ids[i] for i in rows], rows, greedy=greedy))
        bar.update(len(ids))
    bar.close()
    batch = Trajectories.concat(parts)
    say(f"scoring {len(batch.texts)} completions")
    scores = RewardScorer(config.reward, seed=config.seed).score(reward_batch(val, batch))
    scores = with_episode_rewards(scores, batch)
    out = {k.replace("reward/", "validate/reward_"): v for k, v in scores.metrics().items()}
    if isinstance(worker, RolloutWorker):
        out.update(
            {
                k.replace("eval/", "validate/"): v
                for k, v in reference_metrics(
                    worker.model, val.ids[:n], val.references[:n], worker.tokenizer.pad_token_id
                ).items()
            }
        )
    texts = RewardBatch([str(t) for t in batch.texts])
    for k in (1, 2):
        out[f"validate/distinct_{k}"] = float(np.mean(Diversity({"n": [k]})(texts)))
    out["validate/response_length"] = float(batch.response_mask.sum(1).mean())
    if isinstance(batch, Episodes):
        out["validate/episode_turns"] = float(batch.turns.mean())
    out["validate/examples"] = float(n)
    out["validate/samples"] = float(samples)
    used = config.dqn.boltzmann_temperature if dqn else config.rollout.temperature
    out["validate/temperature"] = 0.0 if greedy else used
    # A dropped sample (NaN total) is a failure.
    successes = np.nan_to_num(scores.total, nan=-math.inf) >= success_threshold
    out["validate/success_threshold"] = float(success_threshold)
    out["validate/success_rate"] = float(successes.mean())
    for k in pass_ks(samples):
        out[f"validate/pass@{k}"] = pass_at_k(successes=successes.reshape(n, samples), k=k)
    return out


def _check_flags(
    examples: int, samples: int, temperature: float | None, max_new_tokens: int | None
) -> bool:
    """Whether decoding is greedy; a ConfigError names the bad flag."""
    for flag, value in (("--examples", examples), ("--samples", samples)):
        if value < 1:
            raise ConfigError(f"{flag} {value}: must be at least 1")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    if temperature is not None and not (math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(f"--temperature {temperature}: must be 0 (greedy) or more")
    if temperature == 0 and samples > 1:
        raise ConfigError(
            f"--temperature 0 is greedy decoding: one completion per prompt, not {samples}; "
            f"pass --samples 1 or a temperature above 0"
        )
    return samples == 1 and not temperature


def _sampling_config(
    config: RunConfig, temperature: float | None, max_new_tokens: int | None
) -> RunConfig:
    """The run's config with validation's decoding: a DQN policy samples from softmax(Q / T),
    and generation runs in this process with Hugging Face ``generate`` (``rollout.engine hf``:
    a few prompts, and the reference metrics read the policy itself) whatever the run used."""
    rollout = dataclasses.replace(config.rollout, engine="hf")
    if max_new_tokens is not None:
        rollout = dataclasses.replace(rollout, max_new_tokens=max_new_tokens)
    dqn = dataclasses.replace(config.dqn, exploration="boltzmann")
    if temperature:
        rollout = dataclasses.replace(rollout, temperature=temperature)
        dqn = dataclasses.replace(dqn, boltzmann_temperature=temperature)
    return dataclasses.replace(config, rollout=rollout, dqn=dqn)


def main(argv: list[str] | None = None) -> int:
    """Parse, validate, print a table (and write JSON with ``--json``)."""
    p = argparse.ArgumentParser(
        prog="python -m distrl.validate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint folder, a Hugging Face folder, or 'default'",
    )
    p.add_argument(
        "--config",
        default=None,
        help="config for data and rewards (default: the run's config.yaml)",
    )
    p.add_argument(
        "--examples", type=int, default=32, help="held-out prompts to generate for (default 32)"
    )
    p.add_argument(
        "--samples",
        type=int,
        default=1,
        help="completions per prompt (default 1: greedy); pass@k is reported for k = 1, 2, 4, "
        "..., N",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="sampling temperature (0 = greedy); default: greedy for one sample, else the "
        "run's rollout.temperature (dqn.boltzmann_temperature for a DQN checkpoint)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="longest completion (default: the run's rollout.max_new_tokens)",
    )
    p.add_argument(
        "--success-threshold",
        type=float,
        default=1.0,
        help="a completion succeeds when its total reward is at least this (default 1.0: "
        "'passed' for a 0/1 reward)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.checkpoint != "default" and not Path(args.checkpoint).is_dir():
        raise ConfigError(f"--checkpoint {args.checkpoint}: no such folder")
    _check_flags(args.examples, args.samples, args.temperature, args.max_new_tokens)
    config = run_config_for(args.checkpoint, args.config)
    results = validate(
        config,
        args.examples,
        checkpoint=args.checkpoint,
        samples=args.samples,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        success_threshold=args.success_threshold,
        progress=True,
    )
    for key, value in results.items():
        print(f"{key:36s} {value:12.4f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    cli.run_main(main)
