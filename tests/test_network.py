"""The embedded local Ray listens on loopback only.

A real ``python -m distrl.run`` on the embedded Ray: every listening TCP socket (IPv4 and IPv6)
of the driver and all its descendants (GCS, raylet and object manager, dashboard, agents,
autoscaler monitor, the actors' core workers) must be bound to 127.0.0.1 or ::1. Sockets are read
from /proc (Linux only): /proc/net/tcp{,6} rows in state LISTEN, mapped to processes through the
``socket:[inode]`` links in /proc/<pid>/fd.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PROC = Path("/proc")
LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp{,6}
LOOPBACK = {"127.0.0.1", "::1"}

needs_proc = pytest.mark.skipif(
    not (PROC / "net" / "tcp").exists(), reason="needs Linux /proc/net/tcp"
)


@dataclass(frozen=True)
class Listener:
    """One listening TCP socket: the address it is bound to, its port and its process."""

    host: str
    port: int
    pid: int
    command: str = field(default="", compare=False)  # read while the process was alive

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port} pid={self.pid} {self.command}"


def _decode(hex_address: str, ipv6: bool) -> tuple[str, int]:
    """``0100007F:1F90`` -> ("127.0.0.1", 8080); IPv4-mapped IPv6 (``::ffff:127.0.0.1``,
    what gRPC binds for 127.0.0.1 on a dual-stack host) is reported as the IPv4 address."""
    host_hex, port_hex = hex_address.split(":")
    raw = bytes.fromhex(host_hex)
    # The kernel prints the address as 32-bit words in host byte order.
    words = [raw[i : i + 4] for i in range(0, len(raw), 4)]
    packed = b"".join(w[::-1] for w in words) if sys.byteorder == "little" else raw
    address = ipaddress.ip_address(packed)
    if ipv6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address), int(port_hex, 16)


def _socket_inodes(pids) -> dict[str, int]:
    """Socket inode -> owning pid, for the open file descriptors of ``pids``."""
    owners: dict[str, int] = {}
    for pid in pids:
        try:
            fds = os.listdir(PROC / str(pid) / "fd")
        except OSError:  # exited, or not ours to read
            continue
        for fd in fds:
            try:
                target = os.readlink(PROC / str(pid) / "fd" / fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                owners.setdefault(target[len("socket:[") : -1], pid)
    return owners


def listening_sockets(pids) -> list[Listener]:
    """The listening TCP sockets (IPv4 and IPv6) held by the processes ``pids``."""
    owners = _socket_inodes(pids)
    found = []
    for table, ipv6 in (("tcp", False), ("tcp6", True)):
        path = PROC / "net" / table
        if not path.exists():
            continue
        for row in path.read_text().splitlines()[1:]:
            fields = row.split()
            if len(fields) > 9 and fields[3] == LISTEN and fields[9] in owners:
                host, port = _decode(fields[1], ipv6)
                pid = owners[fields[9]]
                found.append(Listener(host, port, pid, cmdline(pid)))
    return found


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat fields after the command name (field 3 onwards), or None if gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def descendants(root: int) -> set[int]:
    """``root`` and every live process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir(PROC):
        if entry.isdigit() and (fields := _stat(int(entry))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = {root}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in tree:
                tree.add(child)
                todo.append(child)
    return tree


def cmdline(pid: int) -> str:
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return "<exited>"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()[:160]


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat: tells a process from a later one with the same pid."""
    fields = _stat(pid)
    return fields[19] if fields else None


def _kill(seen: dict[int, str | None]) -> None:
    """SIGTERM, then SIGKILL, the processes in ``seen`` (pid -> start time) still alive."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 0.0)):
        alive = [p for p, t in seen.items() if t is not None and _start_time(p) == t]
        for pid in alive:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while alive and time.monotonic() < deadline:
            time.sleep(0.2)
            alive = [p for p in alive if _start_time(p) == seen[p]]


@needs_proc
def test_listening_sockets_sees_own_listeners():
    """The /proc reader finds this process's listeners with the right address and port."""
    opened = []
    try:
        v4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        opened.append(v4)
        v4.bind(("127.0.0.1", 0))
        v4.listen()
        expected = {("127.0.0.1", v4.getsockname()[1])}
        if socket.has_ipv6:
            try:
                v6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
                opened.append(v6)
                v6.bind(("::1", 0))
                v6.listen()
                expected.add(("::1", v6.getsockname()[1]))
            except OSError:  # no IPv6 loopback here
                pass
        mine = {(s.host, s.port) for s in listening_sockets({os.getpid()}) if s.pid == os.getpid()}
        assert expected <= mine
        # Not listening: a bound but unlistened socket is not reported.
        idle = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        opened.append(idle)
        idle.bind(("127.0.0.1", 0))
        ports = {s.port for s in listening_sockets({os.getpid()})}
        assert idle.getsockname()[1] not in ports
    finally:
        for s in opened:
            s.close()


def test_decode_addresses():
    assert _decode("0100007F:1F90", ipv6=False) == ("127.0.0.1", 8080)
    assert _decode("00000000:0050", ipv6=False) == ("0.0.0.0", 80)
    assert _decode("00000000000000000000000001000000:0016", ipv6=True) == ("::1", 22)
    assert _decode("00000000000000000000000000000000:0016", ipv6=True) == ("::", 22)
    assert _decode("0000000000000000FFFF00000100007F:0016", ipv6=True) == ("127.0.0.1", 22)


@pytest.mark.slow
@needs_proc
def test_local_ray_listens_on_loopback_only(tmp_path):
    """A tiny run on the embedded Ray: all listening sockets of its process tree are on
    loopback (sampled throughout the run, at least once after the first metrics line)."""
    run_dir = tmp_path / "run"
    log_path = tmp_path / "run.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # embedded, not attached
    env["RAY_AUTH_MODE"] = "disabled"
    command = [
        sys.executable,
        *("-m", "distrl.run", "--config", "tiny", "--iterations", "2"),
        *("--output-dir", str(run_dir), "--output.eval_every", "0"),
        *("--output.progress", "false", "--output.plots", "false"),
        *("--output.tensorboard", "false"),
    ]
    metrics = run_dir / "metrics.jsonl"
    seen: dict[int, str | None] = {}  # every pid of the run's tree, with its start time
    listeners: set[Listener] = set()
    sampled_after_metrics = False
    with log_path.open("w") as log:
        driver = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            deadline = time.monotonic() + 600
            while driver.poll() is None and time.monotonic() < deadline:
                had_metrics = metrics.exists() and metrics.read_text().strip() != ""
                tree = descendants(driver.pid)
                for pid in tree:
                    seen.setdefault(pid, _start_time(pid))
                listeners.update(listening_sockets(tree))
                sampled_after_metrics |= had_metrics
                time.sleep(0.5)
            returncode = driver.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            returncode = None
        finally:
            _kill(seen)
    output = log_path.read_text()[-3000:]
    assert returncode == 0, f"distrl.run failed (rc={returncode}):\n{output}"
    assert sampled_after_metrics, f"no sample while the run was training:\n{output}"
    assert listeners, "no listening sockets found in the run's process tree"
    exposed = sorted(
        (s for s in listeners if s.host not in LOOPBACK), key=lambda s: (s.pid, s.port)
    )
    assert not exposed, "sockets listening beyond loopback:\n" + "\n".join(map(str, exposed))
