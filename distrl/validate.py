"""``python -m distrl.validate --checkpoint DIR``: score a checkpoint on held-out prompts.

Greedy generations on the validation prompts of the run's config are scored by every reward
component; the policy's perplexity and token accuracy on reference responses and the
distinct-1/2 diversity of its generations are reported beside them.
Runs in one process, without Ray.

Examples:
    python -m distrl.validate --checkpoint runs/ppo-20261126-101500/final
    python -m distrl.validate --checkpoint default --config default --json before.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from distrl import cli
from distrl.config import RunConfig, load_config
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
    from distrl.qlearner import RUN_FILE, is_dqn_checkpoint

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


def validate(config: RunConfig, examples: int, checkpoint: str | None = None) -> dict[str, float]:
    """Reward components, reference perplexity/accuracy and diversity of ``config.model``, or
    of the Q-guided greedy policy of a DQN ``checkpoint`` (no perplexity: Q is no distribution).
    """
    from safetensors.torch import load_file

    from distrl.models import VersionedWeights
    from distrl.policy import reference_metrics
    from distrl.prompts import prepare, reward_batch
    from distrl.qlearner import QNET_FILE, is_dqn_checkpoint
    from distrl.qrollout import QRolloutWorker
    from distrl.rewards import RewardBatch, RewardScorer
    from distrl.rewards.components import Diversity
    from distrl.rollout import RolloutWorker

    _, val = prepare(config)
    n = min(examples, len(val.ids))
    if checkpoint is not None and is_dqn_checkpoint(Path(checkpoint)):
        worker = QRolloutWorker(**QRolloutWorker.arguments(config))
        worker.set_weights(VersionedWeights(1, load_file(Path(checkpoint) / QNET_FILE)))
    else:
        worker = RolloutWorker(**RolloutWorker.arguments(config))
    batch = worker.generate(val.ids[:n], list(range(n)), greedy=True)
    scores = RewardScorer(config.reward, seed=config.seed).score(reward_batch(val, batch))
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
    out["validate/examples"] = float(n)
    return out


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
    p.add_argument("--examples", type=int, default=32, help="held-out prompts to generate for")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.checkpoint != "default" and not Path(args.checkpoint).is_dir():
        raise ConfigError(f"--checkpoint {args.checkpoint}: no such folder")
    config = run_config_for(args.checkpoint, args.config)
    results = validate(config, args.examples, checkpoint=args.checkpoint)
    for key, value in results.items():
        print(f"{key:36s} {value:12.4f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    cli.run_main(main)
