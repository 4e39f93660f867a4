"""``python -m distrl.head start|stop``: a Ray head of its own on this machine, for ``ray job
submit``.

``start`` runs ``ray start --head`` on loopback, on ports the OS reports free (so it never meets
another Ray on the machine, whatever ports that one holds), with token authentication and a
token of its own, and waits until its job server answers. Into ``--dir`` it writes
``head.json`` (address, PID, Ray's temporary folder), ``auth_token`` (mode 600), ``env.sh`` (what
the ``ray job`` commands need: ``source`` it) and ``head.log``, then prints the submit command.
``stop`` ends that head's processes and nothing else (``ray stop`` would stop every Ray on the
machine).

Examples:
    python -m distrl.head start --dir ray-head
    source ray-head/env.sh
    ray job submit --address "$DISTRL_HEAD" --working-dir . --runtime-env \\
        clusters/runtime-env.yaml -- python -m distrl.run --config tiny --output-dir $PWD/runs/job
    python -m distrl.head stop --dir ray-head
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from distrl.config import cli
from distrl.errors import ConfigError, DistrlError

HEAD_FILE = "head.json"
# Every port a head opens; the workers' ports follow.
PORT_FLAGS = (
    "port",
    "dashboard-port",
    "ray-client-server-port",
    "node-manager-port",
    "object-manager-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
)
WORKER_PORTS = 32
# What a ``ray job`` client needs besides the token: the checkout uploaded as it is (no
# .gitignore walk per folder, no default excludes that drop the packaged assets).
CLIENT_ENV = {
    "RAY_RUNTIME_ENV_IGNORE_GITIGNORE": "1",
    "RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES": "",
}


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports the OS reports free on loopback (all held until all are chosen)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def start(folder: Path, *, num_cpus: int | None = None, timeout_s: float = 180.0) -> dict:
    """Start a head whose files live in ``folder``; returns what ``head.json`` holds.

    Raises:
        DistrlError: ``folder`` holds a running head, or the head did not answer within
            ``timeout_s`` (it is then stopped; ``head.log`` says why).
    """
    folder = folder.resolve()
    if running(folder):
        raise DistrlError(f"{folder} holds a running head; stop it with: {stop_command(folder)}")
    folder.mkdir(parents=True, exist_ok=True)
    token_path = folder / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    token_path.chmod(0o600)
    temp_dir = tempfile.mkdtemp(prefix="distrl-ray-", dir="/tmp")  # short: socket path limit
    ports = free_ports(len(PORT_FLAGS) + WORKER_PORTS)
    flags = [f"--{flag}={port}" for flag, port in zip(PORT_FLAGS, ports)]
    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_path),
        RAY_USAGE_STATS_ENABLED="0",
        # Ray's single-machine mode keeps every process on loopback.
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",  # the jobs' python: this one
    )
    ray_cli = bin_dir / "ray" if (bin_dir / "ray").is_file() else shutil.which("ray")
    if ray_cli is None:
        raise DistrlError("Ray's command line (ray) is not installed beside this Python")
    command = [
        str(ray_cli),
        *("start", "--head", "--block", "--disable-usage-stats"),
        *("--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--include-dashboard=true"),
        f"--temp-dir={temp_dir}",
        f"--worker-port-list={','.join(map(str, ports[len(PORT_FLAGS) :]))}",
        *([f"--num-cpus={num_cpus}"] if num_cpus else []),
        *flags,
    ]
    with open(folder / "head.log", "w") as log:  # its own session: Ctrl-C here does not reach it
        head = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    info = {
        "pid": head.pid,
        "address": f"http://127.0.0.1:{ports[1]}",
        "gcs": f"127.0.0.1:{ports[0]}",
        "temp_dir": temp_dir,
        "token_path": str(token_path),
    }
    (folder / HEAD_FILE).write_text(json.dumps(info, indent=1))
    client = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path), **CLIENT_ENV}
    exports = [f"export {k}={shlex.quote(v)}" for k, v in client.items()]
    exports.append(f"export DISTRL_HEAD={info['address']}")
    (folder / "env.sh").write_text("\n".join(exports) + "\n")
    try:
        _wait_for_jobs(info, head, token_path.read_text(), timeout_s, folder / "head.log")
    except DistrlError:
        stop(folder)
        raise
    return info


def _wait_for_jobs(
    info: dict, head: subprocess.Popen, token: str, timeout_s: float, log: Path
) -> None:
    """Wait until the head's job server answers with the token, at most ``timeout_s``."""
    request = urllib.request.Request(
        f"{info['address']}/api/version", headers={"Authorization": f"Bearer {token}"}
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise DistrlError(f"ray start --head exited with status {head.returncode}; see {log}")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(1)
    raise DistrlError(f"the head's job server did not answer within {timeout_s:g} s; see {log}")


def read_head(folder: Path) -> dict[str, Any] | None:
    """What ``start`` wrote into ``folder``, or None."""
    try:
        return json.loads((folder / HEAD_FILE).read_text())
    except (OSError, ValueError):
        return None


def processes(info: dict[str, Any]) -> list[Any]:
    """The head's processes: ``ray start`` and everything below it, and any process started
    with its temporary folder on the command line (Ray's own daemons)."""
    import psutil

    found: dict[int, Any] = {}
    for proc in psutil.process_iter(["cmdline"]):
        if info["temp_dir"] in " ".join(proc.info["cmdline"] or []):
            found[proc.pid] = proc
    for proc in list(found.values()):
        with contextlib.suppress(psutil.NoSuchProcess):
            found.update({c.pid: c for c in proc.children(recursive=True)})
    return list(found.values())


def running(folder: Path) -> bool:
    """Whether ``folder`` holds a head whose processes are alive."""
    info = read_head(folder)
    return info is not None and bool(processes(info))


def stop(folder: Path, *, grace_s: float = 15.0) -> int:
    """End the head of ``folder`` (SIGTERM, SIGKILL after ``grace_s``); returns how many
    processes were ended. Only processes of that head are signalled.

    Raises:
        ConfigError: ``folder`` holds no head.
        DistrlError: a process of the head survived SIGKILL.
    """
    import psutil

    folder = folder.resolve()
    info = read_head(folder)
    if info is None:
        raise ConfigError(f"{folder} holds no {HEAD_FILE}: no head was started there")
    alive = processes(info)
    ended = len(alive)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(sig)
        _, alive = psutil.wait_procs(alive, timeout=grace_s)
        if not alive:
            break
    if alive:
        raise DistrlError(f"processes {[p.pid for p in alive]} of the head survived SIGKILL")
    shutil.rmtree(info["temp_dir"], ignore_errors=True)
    (folder / HEAD_FILE).unlink(missing_ok=True)
    return ended


def stop_command(folder: Path) -> str:
    """The command that stops the head of ``folder``."""
    return f"python -m distrl.head stop --dir {shlex.quote(str(folder))}"


def main(argv: list[str] | None = None) -> int:
    """``start`` or ``stop`` a head; print what to do next."""
    p = argparse.ArgumentParser(
        prog="python -m distrl.head",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("action", choices=("start", "stop"))
    p.add_argument("--dir", type=Path, default=Path("ray-head"), help="the head's files")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs the head offers")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    folder = args.dir.resolve()
    if args.action == "stop":
        ended = stop(folder)
        print(f"distrl.head: stopped the head of {folder} ({ended} processes)")
        return 0
    info = start(folder, num_cpus=args.num_cpus)
    print(f"distrl.head: a Ray head of its own at {info['address']} (dashboard and jobs)")
    print(f"distrl.head: submit from this checkout with: source {folder / 'env.sh'}")
    print(
        '  ray job submit --address "$DISTRL_HEAD" --working-dir . --runtime-env '
        "clusters/runtime-env.yaml -- python -m distrl.run --config tiny --output-dir "
        "$PWD/runs/job"
    )
    print(f"distrl.head: stop it (and only it) with: {stop_command(folder)}")
    return 0


if __name__ == "__main__":
    cli.run_main(main)
