"""``python -m distrl.bench``, plus ``--engine hf|vllm``: the rollout section's generation
engine (vllm: a vLLM worker against a plain vLLM ``LLM.generate`` and a plain ``generate``)."""

import argparse
import functools
import sys

from distrl.bench import SECTIONS, main
from distrl.bench.rollout import bench_rollout

ENGINE_HELP = (
    "  --engine {hf,vllm}    rollout section's engine (default hf); vllm: a RolloutWorker with "
    "rollout.engine vllm against a plain vLLM LLM.generate and a plain HF generate"
)


def run(argv: list[str]) -> int:
    """Take ``--engine`` off ``argv`` for the rollout section; the rest goes to ``main``."""
    parser = argparse.ArgumentParser(prog="python -m distrl.bench", add_help=False)
    parser.add_argument("--engine", default="hf", choices=["hf", "vllm"])
    args, rest = parser.parse_known_args(argv)
    if {"-h", "--help"} & set(rest):
        print(ENGINE_HELP)
    SECTIONS["rollout"] = functools.partial(bench_rollout, engine=args.engine)
    return main(rest)


# The guard keeps the bench from running again in a process a vLLM engine may spawn.
if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
