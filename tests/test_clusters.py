"""clusters/: every file is valid for Ray's cluster launcher (or KubeRay), offers what distrl's
packaged cluster configs ask for and turns token authentication on, and `ray job submit`, as the
files document it, runs distrl.run on a real Ray head that requires the token."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile
from collections import Counter
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import ray
import yaml
from ray._private import ray_constants
from ray._private.runtime_env.packaging import create_package
from ray.autoscaler._private.util import prepare_config

from distrl.clusters import check_cluster_file
from distrl.config import RunConfig, load_config
from distrl.errors import ConfigError
from distrl.outputs.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "clusters"
CONFIGS = ROOT / "distrl" / "config" / "presets"
RUNTIME_ENV = CLUSTERS / "runtime-env.yaml"  # the job's, not a cluster's
CLUSTER_FILES = sorted(p for p in CLUSTERS.glob("*.yaml") if p != RUNTIME_ENV)
KUBERAY = CLUSTERS / "kuberay-rayjob.yaml"
# What the cluster files tell a user to run on their machine to submit a job: token auth on, and
# the upload's excludes from RUNTIME_ENV alone (no .gitignore reading, no built-in list).
CLIENT_ENV = {
    "RAY_AUTH_MODE": "token",
    "RAY_RUNTIME_ENV_IGNORE_GITIGNORE": "1",
    "RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES": "",
}
SUBMIT = "ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env"

# Packaged cluster configs (distrl/config/presets/cluster_*.yaml) -> the cluster files sized for
# them.
CLUSTER_RUNS = {
    "cluster_gpu": ["aws-gpu.yaml", "gcp-gpu.yaml", "onprem-local.yaml", "kuberay-rayjob.yaml"],
}
EPS = 1e-9


# ---- what a config asks for, what a cluster offers --------------------------------------


def actor_demands(config: RunConfig) -> list[tuple[str, dict[str, float]]]:
    """(role, resources) of every actor the driver starts, as ``actors.actor_options`` asks."""
    res = config.resources

    def demand(role: str, cpus: float, gpus: float) -> dict[str, float]:
        asked = {"CPU": cpus, "GPU": gpus, **res.custom.get(role, {})}
        return {k: float(v) for k, v in asked.items() if v > 0}

    out = [("learner", demand("learner", res.learner_cpus, res.learner_gpus))]
    out += [("rollout", demand("rollout", res.rollout_cpus, res.rollout_gpus))] * (
        config.rollout.num_workers
    )
    out += [("reward", demand("reward", res.reward_cpus, res.reward_gpus))] * (
        config.reward.num_actors
    )
    if config.algo == "dqn":
        out.append(("replay", demand("replay", res.replay_cpus, 0.0)))
    return out


@dataclass(frozen=True)
class NodeType:
    name: str
    resources: dict[str, float]
    max_count: int  # nodes of this type the cluster may hold (the head: 1)
    detected: bool = False  # CPUs and GPUs are whatever the host has (on-premise)


def fits(demand: dict[str, float], offer: dict[str, float], detected: bool = False) -> bool:
    return all(
        (detected and key in ("CPU", "GPU")) or offer.get(key, 0.0) + EPS >= amount
        for key, amount in demand.items()
    )


def launcher_node_types(path: Path) -> tuple[list[NodeType], int]:
    """Node types of a cluster launcher YAML and its global ``max_workers``."""
    config = prepare_config(yaml.safe_load(path.read_text()))
    if config["provider"]["type"] == "local":
        # One node type; each host's role resource comes from worker_start_ray_commands.
        commands = " ".join(config["worker_start_ray_commands"])
        roles = [json.loads(r) for r in re.findall(r"role='(\{[^']*\})'", commands)]
        hosts = len(config["provider"]["worker_ips"])
        types = [NodeType(f"host{i}", r, hosts, detected=True) for i, r in enumerate(roles)]
        return types, hosts
    types = [
        NodeType(
            name,
            {k: float(v) for k, v in spec["resources"].items()},
            1 if name == config["head_node_type"] else spec["max_workers"],
        )
        for name, spec in config["available_node_types"].items()
    ]
    return types, config["max_workers"]


def kuberay_documents(path: Path = KUBERAY) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _quantity(value: str | int | float) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def kuberay_group(group: dict, max_count: int, name: str) -> NodeType:
    """What a KubeRay group's pods offer Ray: container limits, overridden by rayStartParams."""
    container = group["template"]["spec"]["containers"][0]
    limits = container.get("resources", {}).get("limits", {})
    params = group.get("rayStartParams", {})
    offer = {
        "CPU": _quantity(params.get("num-cpus", limits.get("cpu", 0))),
        "GPU": _quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0))),
    }
    custom = params.get("resources")
    if custom:
        # KubeRay's format: a JSON string inside a quoted string, '"{\"name\": 1}"'.
        offer.update(json.loads(json.loads(custom) if custom.startswith('"') else custom))
    return NodeType(name, {k: float(v) for k, v in offer.items()}, max_count)


def kuberay_node_types(path: Path = KUBERAY) -> tuple[list[NodeType], int]:
    (job,) = [d for d in kuberay_documents(path) if d["kind"] == "RayJob"]
    spec = job["spec"]["rayClusterSpec"]
    types = [kuberay_group(spec["headGroupSpec"], 1, "head")]
    types += [kuberay_group(g, g["maxReplicas"], g["groupName"]) for g in spec["workerGroupSpecs"]]
    return types, sum(g["maxReplicas"] for g in spec["workerGroupSpecs"])


def node_types(path: Path) -> tuple[list[NodeType], int]:
    return kuberay_node_types(path) if path == KUBERAY else launcher_node_types(path)


def pack(demands, types: list[NodeType], max_workers: int) -> tuple[list[str], Counter]:
    """Place every actor, starting worker nodes as the autoscaler would (first fit, biggest
    demands first) within each type's and the cluster's maximum; return (unplaced, started)."""
    head = types[0] if not types[0].detected else None
    nodes = [(head, dict(head.resources))] if head else []
    started: Counter = Counter()
    unplaced = []
    for role, demand in sorted(demands, key=lambda d: (-d[1].get("GPU", 0), -d[1].get("CPU", 0))):
        node = next((n for n in nodes if fits(demand, n[1])), None)
        if node is None:
            kind = next(
                (
                    t
                    for t in types[1:]
                    if started[t.name] < t.max_count
                    and sum(started.values()) < max_workers
                    and fits(demand, t.resources)
                ),
                None,
            )
            if kind is None:
                unplaced.append(role)
                continue
            started[kind.name] += 1
            node = (kind, dict(kind.resources))
            nodes.append(node)
        for key, amount in demand.items():
            node[1][key] = node[1].get(key, 0.0) - amount
    return unplaced, started


def cluster_config(name: str) -> RunConfig:
    return load_config(str(CONFIGS / f"{name}.yaml"))  # by path: not yet in NAMED_CONFIGS


# ---- every file in clusters/ is valid ---------------------------------------------------


@pytest.mark.parametrize("path", [p for p in CLUSTER_FILES if p != KUBERAY], ids=lambda p: p.name)
def test_launcher_yaml_validates_and_installs_distrl(path):
    raw = yaml.safe_load(path.read_text())
    config = check_cluster_file(path)  # Ray's JSON schema, offline
    setup = " && ".join(config["setup_commands"])
    # distrl with the vLLM engine cluster_gpu generates with, then its offline assets.
    assert 'pip install -q -e "$HOME/distrl[vllm]"' in setup and "python -m distrl.assets" in setup
    # Token auth: the token made on the user's machine reaches every node, and every later
    # command there (ray start, a job's driver) runs with RAY_AUTH_MODE=token.
    assert raw["file_mounts"] == {"~/distrl": ".", "~/.ray/auth_token": "~/.ray/auth_token"}
    assert "echo 'export RAY_AUTH_MODE=token' >> ~/.bashrc" in setup
    assert_documents_the_submission(path)
    start = " ".join(config["head_start_ray_commands"])
    # The dashboard and job server stay on the head's loopback (reached via `ray dashboard`).
    assert "--dashboard-host=127.0.0.1" in start and "0.0.0.0" not in start
    assert "--disable-usage-stats" in start
    if config["provider"]["type"] == "local":  # hosts given roles by IP are cluster hosts
        named = re.findall(
            r'"\s(\d+\.\d+\.\d+\.\d+)\s"', " ".join(raw["worker_start_ray_commands"])
        )
        assert named and set(named) <= set(raw["provider"]["worker_ips"])


def assert_documents_the_submission(path: Path) -> None:
    """The file's comment gives the token and submission steps with the client environment."""
    header = " ".join(line.lstrip("# ").rstrip(" \\") for line in path.read_text().splitlines())
    assert "ray get-auth-token --generate" in header
    exports = "export " + " ".join(f"{k}={v}" for k, v in CLIENT_ENV.items())
    assert exports in header and f"{SUBMIT} clusters/runtime-env.yaml --" in header, path


def test_kuberay_manifest_is_a_rayjob_running_distrl():
    docs = kuberay_documents()
    (job,) = [d for d in docs if d["kind"] == "RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "distrl.run"]
    config_name = argv[argv.index("--config") + 1]
    assert (CONFIGS / f"{config_name}.yaml").is_file()
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"].split(".")[:2] == ray.__version__.split(".")[:2]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"
    yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    # The run directory is on a volume both the driver (head) and the learner pods mount.
    output = argv[argv.index("--output-dir") + 1]
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        mounts = pod["containers"][0]["volumeMounts"]
        assert any(output.startswith(m["mountPath"] + "/") for m in mounts), group
        assert {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]} <= claims


def test_kuberay_turns_token_auth_on_everywhere():
    """Every Ray container, the autoscaler and the submitter Job read the token from the Secret
    the manifest's comment tells the user to create from their own ~/.ray/auth_token."""
    (job,) = [d for d in kuberay_documents() if d["kind"] == "RayJob"]
    (secret,) = re.findall(
        r"kubectl create secret generic (\S+) --from-file=auth_token=\$HOME/\.ray/auth_token",
        KUBERAY.read_text(),
    )
    expected = [
        {"name": "RAY_AUTH_MODE", "value": "token"},
        {
            "name": "RAY_AUTH_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": secret, "key": "auth_token"}},
        },
    ]
    cluster = job["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    pods = [job["spec"]["submitterPodTemplate"], *(g["template"] for g in groups)]
    for pod in pods:
        assert pod["spec"]["containers"][0]["env"] == expected, pod
    assert cluster["autoscalerOptions"]["env"] == expected
    assert "RAY_AUTH_MODE=token ray job logs" in KUBERAY.read_text()


# ---- the job's runtime environment -------------------------------------------------------


class KeepRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def packed_files(root: Path, gitignore: bool, excludes: list[str], out: Path) -> tuple[set, list]:
    """The files Ray's job client packs from ``root``, and what it logged meanwhile."""
    log = logging.getLogger(f"distrl-test-packaging-{gitignore}")
    log.setLevel(logging.INFO)
    log.propagate = False
    log.handlers = [kept := KeepRecords()]
    target = out / f"package-{root.name}-{gitignore}.zip"
    create_package(str(root), target, include_gitignore=gitignore, excludes=excludes, logger=log)
    with zipfile.ZipFile(target) as package:
        return {n for n in package.namelist() if not n.endswith("/")}, kept.messages


def checkout_with_every_ignored_kind(folder: Path) -> Path:
    """A folder holding the repository's .gitignore and, for each of its patterns, a matching
    folder at the top and one level down (a checkout's runs/, build/, caches...), plus files
    that must ship."""
    folder.mkdir()
    (folder / ".gitignore").write_text((ROOT / ".gitignore").read_text())
    names = [p.strip().strip("/").replace("*", "x") for p in (ROOT / ".gitignore").open()]
    for name in [n for n in names if n and not n.startswith("#")] + [".git"]:
        for parent in (folder, folder / "pkg"):
            (parent / name).mkdir(parents=True, exist_ok=True)
            (parent / name / "file").write_text("left home")
    (folder / "pkg" / "module.py").write_text("shipped")
    (folder / "README.md").write_text("shipped")
    return folder


def test_runtime_env_uploads_what_gitignore_leaves_and_logs_nothing(tmp_path):
    """The documented submission packs exactly the files Ray's defaults (.gitignore + its
    built-in excludes) pack, without Ray logging each .gitignore it reads (three times each)."""
    env = check_cluster_file(RUNTIME_ENV)
    assert set(env) == {"excludes"}  # working_dir is --working-dir, so local edits ship
    defaults = [x.strip() for x in ray_constants.RAY_RUNTIME_ENV_DEFAULT_EXCLUDES.split(",")]
    assert set(defaults) <= set(env["excludes"])  # so Ray's built-in list can be switched off
    every_kind = checkout_with_every_ignored_kind(tmp_path / "checkout")
    for root in (ROOT, every_kind):
        by_gitignore, logged = packed_files(root, True, defaults, tmp_path)
        documented, quiet = packed_files(root, False, env["excludes"], tmp_path)
        assert documented == by_gitignore, root
        assert any("Ignoring upload to cluster for these files" in m for m in logged)
        assert not any("Ignoring upload" in m for m in quiet), quiet
    assert "distrl/loop/driver.py" in packed_files(ROOT, False, env["excludes"], tmp_path)[0]
    assert documented == {".gitignore", "README.md", "pkg/module.py"}


def test_bad_runtime_env_names_file_and_field(tmp_path):
    path = tmp_path / "env.yaml"
    path.write_text("exclude: [runs]\n")
    with pytest.raises(ConfigError, match=f"runtime environment {path}: unknown field 'exclude'"):
        check_cluster_file(path)
    path.write_text("excludes: runs\n")
    with pytest.raises(ConfigError, match=r"excludes.*List\[str\]"):
        check_cluster_file(path)


def test_every_cluster_file_and_cluster_config_is_paired():
    assert {p.name for p in CLUSTER_FILES} == {f for fs in CLUSTER_RUNS.values() for f in fs}
    assert {p.stem for p in CONFIGS.glob("cluster_*.yaml")} == set(CLUSTER_RUNS)


# ---- what distrl asks for is offered ----------------------------------------------------


@pytest.mark.parametrize(
    "config_name, cluster_file",
    [(c, f) for c, files in CLUSTER_RUNS.items() for f in files],
)
def test_cluster_config_fits_cluster(config_name, cluster_file):
    config = cluster_config(config_name)
    assert config.resources.address is None and config.resources.num_cpus is None
    types, max_workers = node_types(CLUSTERS / cluster_file)
    for role, demand in actor_demands(config):
        homes = [t.name for t in types if fits(demand, t.resources, t.detected)]
        assert homes, (
            f"{config_name}: a {role} actor asks for {demand}; {cluster_file} offers {types}"
        )
    if not any(t.detected for t in types):
        unplaced, started = pack(actor_demands(config), types, max_workers)
        assert not unplaced, f"{cluster_file} cannot hold {unplaced} once it has {dict(started)}"


def test_fit_check_catches_what_no_node_offers():
    config = cluster_config("cluster_gpu")
    types, max_workers = node_types(CLUSTERS / "aws-gpu.yaml")
    demands = dict(actor_demands(config))
    assert not fits({**demands["rollout"], "tpu_node": 0.01}, types[1].resources)
    assert not any(fits({**demands["learner"], "GPU": 2}, t.resources) for t in types)
    too_many = actor_demands(config) + [("rollout", demands["rollout"])]
    assert pack(too_many, types, max_workers)[0] == ["rollout"]


# ---- a real head, a real job --------------------------------------------------------------


def process_tree(root_pid: int, markers: list[str]) -> list[int]:
    """PIDs of ``root_pid``'s descendants plus any process whose command line names one of
    ``markers`` (this head's own temp dir or run dir) and their descendants."""
    roots = []
    with_markers = (p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"])
    roots += [p for p in with_markers if any(m in " ".join(p.info["cmdline"]) for m in markers)]
    with suppress(psutil.NoSuchProcess):
        roots.append(psutil.Process(root_pid))
    pids = set()
    for proc in roots:
        pids.add(proc.pid)
        with suppress(psutil.NoSuchProcess):
            pids.update(c.pid for c in proc.children(recursive=True))
    pids.discard(os.getpid())
    return sorted(pids)


def stop_head(root_pid: int, markers: list[str]) -> None:
    """Stop exactly the processes a head started, by PID (what ``distrl.head stop`` left).

    ``ray stop`` would stop every Ray on the machine (a concurrent pytest session's too). GCS,
    raylet, dashboard, agents, workers and the job's driver are descendants of ``ray start
    --block``; anything re-parented still names the head's temp dir.
    """

    def signal_all(procs: list[psutil.Process], sig: int) -> None:
        for proc in procs:
            with suppress(psutil.NoSuchProcess):
                proc.send_signal(sig)  # psutil refuses a PID reused by another process

    def processes(pids: list[int]) -> list[psutil.Process]:
        out = []
        for pid in pids:
            with suppress(psutil.NoSuchProcess):
                out.append(psutil.Process(pid))
        return out

    # One snapshot before any signal: once a parent dies its children are re-parented.
    procs = processes(process_tree(root_pid, markers))
    signal_all(procs, signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=5)
    known = {p.pid for p in procs}
    alive += processes([p for p in process_tree(root_pid, markers) if p not in known])
    signal_all(alive, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=5)


def http_status(url: str) -> int:
    """The status of a GET without any token."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def file_state(path: Path) -> tuple | None:
    """(content hash, mtime) of ``path``, or None if it does not exist."""
    if not path.exists():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


# The ports a Ray started with its defaults holds: GCS, dashboard, client server, agent.
DEFAULT_RAY_PORTS = (6379, 8265, 10001, 52365)


def env_sh(path: Path) -> dict[str, str]:
    """The variables ``distrl.head``'s env.sh exports."""
    out = {}
    for line in path.read_text().splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        out[name] = shlex.split(value)[0] if value else ""
    return out


@pytest.mark.slow
def test_a_head_of_its_own_runs_a_submitted_job_beside_another_ray_and_stops_alone(
    ray_session, tmp_path
):
    """The one-machine recipe: ``python -m distrl.head start`` while another Ray runs here (this
    session's) and the default ports are taken; its head refuses requests without its token and
    runs the documented ``ray job submit``; the run's outputs are where --output-dir says;
    ``python -m distrl.head stop`` ends that head's processes and no others."""
    bin_dir = Path(sys.executable).parent
    head_dir, run_dir = tmp_path / "ray-head", tmp_path / "run"
    users_token = Path.home() / ".ray" / "auth_token"
    users_token_before = file_state(users_token)
    with ExitStack() as held:  # what another Ray started with its defaults would hold
        for port in DEFAULT_RAY_PORTS:
            with suppress(OSError):  # already held by a real one: as good
                sock = held.enter_context(socket.socket())
                sock.bind(("127.0.0.1", port))
                sock.listen()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
        env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
        start = subprocess.run(
            [sys.executable, "-m", "distrl.head", "start", "--dir", str(head_dir)]
            + ["--num-cpus", "2"],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert start.returncode == 0, start.stdout + start.stderr
        info = json.loads((head_dir / "head.json").read_text())
        try:
            assert f"a Ray head of its own at {info['address']}" in start.stdout
            assert f"python -m distrl.head stop --dir {head_dir}" in start.stdout
            assert int(info["address"].rsplit(":", 1)[1]) not in DEFAULT_RAY_PORTS
            assert http_status(f"{info['address']}/api/version") == 401  # no token, no jobs
            client = {**env, **env_sh(head_dir / "env.sh")}
            assert client["DISTRL_HEAD"] == info["address"]
            assert Path(client["RAY_AUTH_TOKEN_PATH"]).stat().st_mode & 0o077 == 0
            submit = subprocess.run(  # the command distrl.head prints, as the shell runs it
                [
                    str(bin_dir / "ray"),
                    *("job", "submit", "--address", client["DISTRL_HEAD"], "--working-dir", "."),
                    *("--runtime-env", str(RUNTIME_ENV.relative_to(ROOT)), "--"),
                    *("python", "-m", "distrl.run", "--config", "tiny"),
                    *("--output-dir", str(run_dir), "--output.progress", "false"),
                ],
                cwd=ROOT, env=client, capture_output=True, text=True, timeout=480,
            )  # fmt: skip
            console = submit.stdout + submit.stderr
            (tmp_path / "submit.log").write_text(console)  # what the user sees
            assert submit.returncode == 0, console[-4000:]
            assert re.search(r"Job 'raysubmit_\w+' succeeded", console), console[-4000:]
            assert "distrl: finished 4 iterations" in console
            # The driver attached to this head (an embedded Ray would print its own dashboard).
            assert f"Connecting to existing Ray cluster at address: {info['gcs']}" in console
            assert "distrl: local Ray dashboard" not in console
            for noise in ("Ignoring upload", "ignored by default", "Traceback"):
                assert noise not in console, console
            # Outputs where --output-dir says, not in Ray's temporary copy of the checkout.
            assert (run_dir / "final" / "config.json").is_file()
            assert (run_dir / "final" / "tokenizer.json").is_file()
            records = read_metrics(run_dir / "metrics.jsonl")
            assert [r["step"] for r in records] == [1, 2, 3, 4]
            assert math.isfinite(records[-1]["reward/total"])
        finally:
            stop = subprocess.run(
                [sys.executable, "-m", "distrl.head", "stop", "--dir", str(head_dir)],
                env=env, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            stray = process_tree(info["pid"], [info["temp_dir"]])
            stop_head(info["pid"], [info["temp_dir"]])  # whatever survived, for the next tests
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert stop.stdout.startswith(f"distrl.head: stopped the head of {head_dir} (")
        assert stray == [], "processes of the head survived distrl.head stop"
    # The other Ray on this machine (this session's) still runs.
    assert ray.get(ray.remote(lambda: 42).remote(), timeout=120) == 42
    assert file_state(users_token) == users_token_before, "the user's ~/.ray/auth_token changed"


def test_a_job_without_an_absolute_output_dir_is_refused_before_ray_starts(monkeypatch, tmp_path):
    from distrl.loop import driver

    monkeypatch.setenv(driver.JOB_ENV, "{}")  # as Ray sets it in a submitted job's driver
    monkeypatch.setattr(driver, "init_ray", lambda config: pytest.fail("Ray was started"))
    for out in (None, "runs/relative"):
        overrides = {"output.dir": out} if out else {}
        with pytest.raises(ConfigError, match="in a Ray job, pass --output-dir as an absolute"):
            driver.train(load_config("tiny", overrides))
    assert not (tmp_path / "runs").exists()
