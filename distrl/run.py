"""``python -m distrl.run``: train a causal LM against a reward with Ray actors.

Runs locally on an embedded Ray by default; inside ``ray job submit`` (or with
``--resources.address auto``) it attaches to the cluster instead.

Examples:
    python -m distrl.run                                  # packaged default: SmolLM2, PPO
    python -m distrl.run --config tiny                    # random tiny model, seconds
    python -m distrl.run --learner.lr 3e-5 --rollout.num_workers 4
    python -m distrl.run --resume --output-dir runs/ppo-20261126-101500
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distrl.config import cli
from distrl.errors import ConfigError


def parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser: run options plus one flag per config field, whose help shows the
    values of the ``--config`` in ``argv`` (``default`` when none)."""
    p = argparse.ArgumentParser(
        prog="python -m distrl.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--output-dir",
        dest="output_dir",
        metavar="DIR",
        help="run directory (same as --output.dir)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --output-dir from its last complete checkpoint "
        "(its config.yaml is the base config)",
    )
    cli.add_config_arguments(p, cli.chosen_config(argv or []))
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse, validate (before Ray starts), train."""
    argv = sys.argv[1:] if argv is None else list(argv)
    p = parser(argv)
    args, _ = p.parse_known_args(argv)
    if args.resume:
        if not args.output_dir:
            raise ConfigError("--resume needs --output-dir, the run to continue")
        if any(a == "--config" or a.startswith("--config=") for a in argv):
            raise ConfigError(
                "--resume continues with the run's own config.yaml; drop --config "
                "(override single fields with their flags, e.g. --iterations)"
            )
        saved = Path(args.output_dir) / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"--resume: {saved} does not exist; there is no run to resume")
        argv = [*argv, "--config", str(saved)]
    _, config = cli.parse_config(p, argv, aliases={"output_dir": "output.dir"})
    from distrl.loop.driver import train  # heavy imports (ray, torch) only after validation

    train(config, resume=args.resume)
    return 0


def entry_point() -> None:
    """Console-script entry point (``distrl``)."""
    cli.run_main(main)


if __name__ == "__main__":
    entry_point()
