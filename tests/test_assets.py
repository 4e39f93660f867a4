import subprocess
import sys

import pytest

from distrl import assets
from distrl.errors import AssetError


def test_every_asset_is_installed_and_found():
    assert assets.missing() == []
    assert assets.smollm2_gguf().is_file()
    assert (assets.minilm_dir() / "config.json").is_file()
    assert (assets.spacy_md_dir() / "meta.json").is_file()
    encoder, vocab = assets.gpt2_bpe_files()
    assert encoder.is_file() and vocab.is_file()


def test_check_command_reports_ok():
    result = subprocess.run(
        [sys.executable, "-m", "distrl.assets", "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "missing" not in result.stdout


def test_a_missing_asset_says_what_to_run(monkeypatch):
    ghost = assets.Asset("ghost", "distrl-ghost-asset==1.0", "distrl_ghost_asset", "a ghost")
    monkeypatch.setitem(assets.ASSETS, "ghost", ghost)
    with pytest.raises(AssetError, match=r"run `python -m distrl.assets`"):
        assets.asset_path("ghost")
    assert ghost in assets.missing()


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DISTRL_CACHE_DIR", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("DISTRL_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert assets.cache_dir() == tmp_path / "x" / "distrl"
