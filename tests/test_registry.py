"""The algorithm registry: one declaration per algorithm, read by everything else."""

import ast
import typing
from pathlib import Path

import pytest
import torch

from distrl import run
from distrl.algos import pg, registry
from distrl.algos.registry import ALGOS, Algo
from distrl.config import field_type, load_config

PACKAGE = Path(__file__).resolve().parent.parent / "distrl"
NAMES = set(ALGOS)


def _names_in(node: ast.AST) -> set[str]:
    """Algorithm names among the string constants of ``node`` (a constant or a collection)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value} & NAMES
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return set().union(*(_names_in(e) for e in node.elts)) if node.elts else set()
    return set()


def _is_algo(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "algo") or (
        isinstance(node, ast.Name) and node.id == "algo"
    )


def name_comparisons(source: str) -> list[tuple[int, str]]:
    """``(line, what)`` for each place ``source`` compares or keys on an algorithm name."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            names = set().union(*(_names_in(o) for o in operands))
            if names or any(_is_algo(o) for o in operands):
                found.append((node.lineno, f"compares {sorted(names) or 'the algo'}"))
        elif isinstance(node, ast.Dict):
            names = set().union(*(_names_in(k) for k in node.keys if k is not None))
            if names:
                found.append((node.lineno, f"a table keyed by {sorted(names)}"))
        elif isinstance(node, ast.Match) and _is_algo(node.subject):
            found.append((node.lineno, "matches on the algo"))
    return found


def test_no_algorithm_name_is_compared_outside_the_registry():
    own = PACKAGE / "algos" / "registry.py"
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: {what}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != own
        for line, what in name_comparisons(path.read_text(encoding="utf-8"))
    ]
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize(
    "code",
    [
        'if config.algo == "dqn": pass',
        'kl = self.algo in ("ppo", "reinforce_pp")',
        "critic = algo != other",
        'PLUGINS = {"grpo": 1}',
        "match self.algo:\n    case _: pass",
    ],
)
def test_the_name_check_sees_every_form(code):
    assert name_comparisons(code), code


def test_the_name_check_leaves_other_strings_alone():
    assert not name_comparisons('if spec.family == "policy_gradient" and x == "token_mean": pass')


def test_the_config_and_the_command_line_offer_exactly_the_registry():
    assert typing.get_args(field_type("algo")) == tuple(ALGOS)
    help_text = run.parser([]).format_help()
    for name in ALGOS:
        assert f"{name}:" in help_text


def test_register_refuses_a_second_entry_and_an_inconsistent_one():
    with pytest.raises(ValueError, match="registered twice"):
        registry.register(ALGOS["grpo"])
    with pytest.raises(ValueError, match="estimator without a critic"):
        registry.register(Algo("half", "policy_gradient", "nothing"))
    with pytest.raises(ValueError, match="loss aggregation"):
        registry.register(Algo("odd", "policy_gradient", "x", critic=True, loss_agg="sum"))
    assert "half" not in ALGOS and "odd" not in ALGOS


@pytest.mark.parametrize("name", [a.name for a in ALGOS.values() if a.estimator is not None])
def test_every_estimator_takes_the_one_signature(name):
    scores = torch.tensor([1.0, 0.0, 3.0, 1.0])
    mask = torch.ones(4, 2)
    adv = ALGOS[name].estimator(
        scores=scores,
        groups=torch.tensor([0, 0, 1, 1]),
        token_rewards=torch.stack([torch.zeros(4), scores], dim=1),
        mask=mask,
        gamma=1.0,
        min_std=0.0,
    )
    assert adv.shape == (4, 2) and torch.isfinite(adv).all()
    assert adv[0, 0] > adv[1, 0]  # the better completion of a pair is pushed up


def test_a_group_algorithm_without_a_group_size_gets_its_own():
    for name, algo in ALGOS.items():
        config = load_config("tiny", {"algo": name})
        expected = algo.group_size if algo.family == "policy_gradient" else 1
        assert config.rollout.samples_per_prompt == expected, name
    assert (
        load_config(
            "tiny", {"algo": "grpo", "rollout.samples_per_prompt": 2}
        ).rollout.samples_per_prompt
        == 2
    )


def test_gspo_and_cispo_are_one_loss_each_on_grpos_advantage():
    grpo, gspo, cispo = ALGOS["grpo"], ALGOS["gspo"], ALGOS["cispo"]
    assert gspo.estimator is grpo.estimator and cispo.estimator is grpo.estimator
    assert gspo.policy_loss is pg.gspo_loss and cispo.policy_loss is pg.cispo_loss
    assert gspo.loss_agg == "seq_mean_token_mean" and gspo.clip == (3e-4, 4e-4)


def test_the_readme_table_is_the_registrys():
    readme = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
    start = "<!-- algorithms: generated from the registry, do not edit by hand -->\n"
    end = "\n<!-- /algorithms -->"
    assert start in readme and end in readme
    table = readme.split(start, 1)[1].split(end, 1)[0].strip()
    assert table == registry.markdown_table(), (
        "README's algorithm table differs from distrl.algos.registry.markdown_table(); "
        "paste its output between the markers"
    )


def imported_modules(source: str) -> set[str]:
    """The ``distrl`` modules ``source`` imports, at any depth (``TYPE_CHECKING`` blocks too)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m == "distrl" or m.startswith("distrl.")}


# distrl.assets also installs the offline assets, but models and data read their paths from it.
APPLICATIONS = {"run", "chat", "validate", "tune", "bench", "clusters", "head", "env"}
# The folders below the loop: roles, engines, weights, models, data, rewards, maths, config.
LOWER = {"runtime", "pg", "dqn", "engines", "weights", "models", "data", "rewards", "outputs"}
LOWER |= {"config", "algos"}


def _importers(target: str, under: set[str]) -> list[str]:
    """Files of the folders ``under`` that import ``target`` or anything below it."""
    return sorted(
        str(path.relative_to(PACKAGE.parent))
        for name in under
        for path in (PACKAGE / name).rglob("*.py")
        if any(
            m == target or m.startswith(target + ".")
            for m in imported_modules(path.read_text(encoding="utf-8"))
        )
    )


def test_no_lower_folder_imports_the_loop_or_an_application():
    """Roles, engines, weights, models, data, rewards, outputs, config and maths never import
    the loop or the applications above them (a plug-in sees the loop through a Crew)."""
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} >= LOWER
    for upper in ("distrl.loop", *(f"distrl.{app}" for app in APPLICATIONS)):
        assert _importers(upper, LOWER) == [], upper


def test_only_the_driver_imports_the_trainer():
    """Inside the loop, the plug-ins and run folders know nothing of the trainer; outside it,
    only the applications that run training import the driver."""
    assert _importers("distrl.loop.trainer", {"loop"}) == ["distrl/loop/driver.py"]
    outside = {p.name for p in PACKAGE.iterdir() if p.is_dir()} - {"loop", "__pycache__"}
    top = sorted(
        p.name
        for p in PACKAGE.glob("*.py")
        if any(m.startswith("distrl.loop") for m in imported_modules(p.read_text()))
    )
    # The benches that time whole runs.
    benches = ["distrl/bench/asynchrony.py", "distrl/bench/pipeline.py"]
    assert _importers("distrl.loop", outside) == benches
    assert top == ["run.py", "tune.py"]


def test_the_import_check_sees_a_type_checking_import():
    code = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from distrl.loop.trainer import Trainer\n"
    )
    assert "distrl.loop.trainer" in imported_modules(code)
