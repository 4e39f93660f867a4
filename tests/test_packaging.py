"""pyproject.toml's dependencies: RLlib and gymnasium are optional (the ``bench`` extra), and the
``test`` extra installs what the tests of the optional parts need; distrl.envs.gym says what to
install when gymnasium is missing."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from 3.11")
ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
# The only modules that may import RLlib or gymnasium: the optional Gymnasium example and the
# replay benchmark's comparison (which imports RLlib inside the function that needs it).
OPTIONAL_USERS = {"distrl/envs/gym.py", "distrl/bench/replay.py"}


def parse(requirement: str) -> tuple[str, set[str]]:
    """A requirement's normalised name and extras: 'ray[tune, default]>=2' -> ('ray', {...})."""
    match = re.match(r"\s*([A-Za-z0-9._-]+)\s*(?:\[([^\]]*)\])?", requirement)
    assert match, requirement
    name = re.sub(r"[-_.]+", "-", match[1]).lower()
    extras = {e.strip().lower() for e in (match[2] or "").split(",") if e.strip()}
    return name, extras


def expand(requirements: list[str]) -> list[str]:
    """``requirements`` with distrl's own extras (``distrl[vllm-cpu]``) replaced by theirs."""
    out: list[str] = []
    for requirement in requirements:
        name, extras = parse(requirement)
        if name == "distrl":
            for extra in sorted(extras):
                out += expand(PROJECT["optional-dependencies"][extra])
        else:
            out.append(requirement)
    return out


def pulls_rllib(requirements: list[str]) -> bool:
    return any(
        (name == "ray" and "rllib" in extras) or name in ("gymnasium", "gym")
        for name, extras in map(parse, expand(requirements))
    )


def ray_requirement(requirements: list[str], extra: str) -> str:
    """The one ray requirement with ``extra`` among ``requirements``."""
    found = [r for r in expand(requirements) if parse(r)[0] == "ray" and extra in parse(r)[1]]
    assert len(found) == 1, (extra, requirements)
    return found[0]


def version_range(requirement: str) -> str:
    return re.sub(r"\s", "", requirement.split("]", 1)[-1])


def test_the_runtime_dependencies_pull_neither_rllib_nor_gymnasium():
    runtime = PROJECT["dependencies"]
    assert not pulls_rllib(runtime), runtime
    # Ray itself stays, with Tune (distrl.tune) and the job server / dashboard.
    assert parse(ray_requirement(runtime, "tune"))[1] == {"tune", "default"}


def test_the_bench_extra_pulls_rllib_in_the_runtime_ray_range():
    extras = PROJECT["optional-dependencies"]
    runtime_range = version_range(ray_requirement(PROJECT["dependencies"], "tune"))
    assert version_range(ray_requirement(extras["bench"], "rllib")) == runtime_range
    assert "trl" in {parse(r)[0] for r in extras["bench"]}


def test_the_test_extra_pulls_what_the_rllib_and_gymnasium_tests_need():
    """CI installs ``.[test]``: tests/test_envs_gym.py (gymnasium, RLlib's PPO and DQN) and the
    replay benchmark's RLlib column must run there, not be skipped."""
    test = PROJECT["optional-dependencies"]["test"]
    runtime_range = version_range(ray_requirement(PROJECT["dependencies"], "tune"))
    assert version_range(ray_requirement(test, "rllib")) == runtime_range
    assert {"pytest", "ruff"} <= {parse(r)[0] for r in expand(test)}


def test_only_the_optional_modules_import_rllib_or_gymnasium():
    pattern = re.compile(r"^\s*(?:import|from)\s+(?:gymnasium|gym|ray\.rllib)\b", re.M)
    users = {
        str(path.relative_to(ROOT))
        for path in (ROOT / "distrl").rglob("*.py")
        if pattern.search(path.read_text(encoding="utf-8"))
    }
    assert users <= OPTIONAL_USERS, users - OPTIONAL_USERS


def test_distrl_env_without_gymnasium_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gymnasium", None)  # "import gymnasium" now fails
    monkeypatch.delitem(sys.modules, "distrl.envs.gym", raising=False)  # restored afterwards
    with pytest.raises(ModuleNotFoundError) as info:
        importlib.import_module("distrl.envs.gym")
    assert info.value.name == "gymnasium"
    assert str(info.value).count("\n") == 0  # one line
    assert 'pip install -e ".[bench]"' in str(info.value)
