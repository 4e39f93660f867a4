"""Run untrusted Python code in a throwaway, resource-limited subprocess.

Used as a tool a model calls during an episode (`run_python`) and as a reward that runs a
candidate solution against hidden unit tests (`run_tests`). Linux first; other POSIX systems get
everything but the network namespace.

What each run gets:

- A fresh Python interpreter in its own session and process group, with a fresh temporary
  directory as working directory, `HOME` and `TMPDIR`; the directory is removed afterwards.
- An environment built from scratch (a minimal `PATH`, `C.UTF-8` locale, `HOME`, `TMPDIR`,
  `PYTHONDONTWRITEBYTECODE=1`, `PYTHONHASHSEED=0`): nothing of the caller's environment, so no
  tokens or keys, and the same hashes (set order) on every run.
- Resource limits set before the program starts: CPU seconds (`RLIMIT_CPU`), address space
  (`RLIMIT_AS`), size of any file written, stdout and stderr included (`RLIMIT_FSIZE`), no core
  files (`RLIMIT_CORE`), and processes (`RLIMIT_NPROC`). `RLIMIT_NPROC` counts every process of
  the *user*, not of the run, and root ignores it: under a user that already runs more processes
  than the limit the code cannot fork at all, and as root it limits nothing.
- A wall-clock deadline at which the whole process group is killed with SIGKILL. The group is
  also killed when the program ends on its own, so background children do not outlive the run.
- No network where the kernel lets the child enter a new, empty network namespace
  (`unshare(CLONE_NEWNET)`: root, or CAP_SYS_ADMIN). `network_isolated()` says whether that
  works here; when it does, every run is isolated or fails, never silently connected.

What it does not give. This is containment of mistakes and runaway programs (infinite loops,
memory bombs, fork loops, huge outputs), not a security boundary against a determined attacker:

- Same kernel and same user as the caller: the code can read every file that user can read (the
  whole filesystem outside the temporary directory included), write where that user can write,
  and signal or trace that user's other processes, the caller's included. There is no seccomp
  filter, no chroot, no container.
- Run as root, the code can raise its own limits back (CAP_SYS_RESOURCE); only the wall-clock
  kill still holds.
- A process that leaves the group (`setsid()`, `setpgid()`) escapes the group kill.
- The network is open wherever `network_isolated()` is False.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

# Runs as `python -I -c _BOOTSTRAP cpu_s memory_mb file_mb processes isolate_net program...`: sets
# the limits, leaves the network namespace if asked, then becomes the program. A bootstrap
# process rather than a preexec_fn, which is unsafe in a threaded parent such as a Ray worker.
_BOOTSTRAP = """\
import os, resource, sys
cpu_s, memory_mb, file_mb, processes, isolate_net = map(int, sys.argv[1:6])
for limit, value in (
    (resource.RLIMIT_CPU, cpu_s),
    (resource.RLIMIT_AS, memory_mb * 2**20),
    (resource.RLIMIT_FSIZE, file_mb * 2**20),
    (resource.RLIMIT_CORE, 0),
    (resource.RLIMIT_NPROC, processes),
):
    hard = resource.getrlimit(limit)[1]
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(limit, (value, value))
if isolate_net:
    import ctypes
    if ctypes.CDLL(None, use_errno=True).unshare(0x40000000) != 0:  # CLONE_NEWNET
        sys.exit("sandbox: unshare(CLONE_NEWNET) failed: " + os.strerror(ctypes.get_errno()))
os.execv(sys.argv[6], sys.argv[6:])
"""

# The program runs without -I (whose -E would ignore PYTHONHASHSEED): its environment is built
# here from nothing, so -E has nothing to guard against; -s and -P are the rest of -I.
_PYTHON_FLAGS = ("-s", "-B", "-P") if sys.version_info >= (3, 11) else ("-s", "-B")
_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True)
class Limits:
    """What one run may use."""

    timeout_s: float = 5.0
    """Wall clock; the whole process group is killed at the deadline."""
    cpu_s: int = 5
    """CPU seconds (RLIMIT_CPU, soft = hard): the kernel then kills the program (SIGKILL)."""
    memory_mb: int = 512
    """Address space (RLIMIT_AS); allocations beyond it raise MemoryError."""
    file_mb: int = 16
    """Largest file the program may write, stdout and stderr included (RLIMIT_FSIZE)."""
    processes: int = 16
    """RLIMIT_NPROC: counts all processes of the user, and root ignores it."""
    output_bytes: int = 64_000
    """Bytes of stdout and of stderr kept, each; the rest is cut with a marker."""

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")
        for name in ("cpu_s", "memory_mb", "file_mb", "processes", "output_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class Result:
    """What a run printed and how it ended."""

    stdout: str
    stderr: str
    returncode: int | None
    """Exit status (negative: killed by that signal); None when killed at the timeout."""
    timed_out: bool
    seconds: float
    """Wall-clock time from start to the end of the group kill."""

    @property
    def ok(self) -> bool:
        """Whether the program exited with status 0 before the deadline."""
        return self.returncode == 0 and not self.timed_out


@functools.cache
def network_isolated() -> bool:
    """Whether runs get a network namespace of their own (no network); probed once, cached."""
    if not sys.platform.startswith("linux"):
        return False
    probe = [sys.executable, "-I", "-c", "pass"]
    proc = _start(probe, Limits(), isolate_net=True, cwd=None, env={"PATH": _PATH})
    try:
        return proc.wait(timeout=30) == 0
    except subprocess.TimeoutExpired:
        return False
    finally:
        _kill_group(proc)


def run_python(code: str, *, stdin: str = "", limits: Limits = Limits()) -> Result:
    """Run `code` as a script in a fresh, limited Python subprocess (see the module docstring).

    Args:
        code: Python source, run as `__main__` from `main.py` in a fresh temporary directory.
        stdin: Text the program reads on its standard input.
        limits: Time, CPU, memory, file, process and output limits.

    Returns:
        Its output (utf-8, undecodable bytes replaced, each stream cut to `limits.output_bytes`
        with a `[... N bytes cut]` marker), exit status and wall-clock time. Output beyond
        `limits.file_mb` fails the program's writes (OSError: File too large).
    """
    with (
        tempfile.TemporaryDirectory(prefix="distrl-sandbox-", ignore_cleanup_errors=True) as tmp,
        tempfile.TemporaryFile() as stdin_file,
        tempfile.TemporaryFile() as stdout_file,
        tempfile.TemporaryFile() as stderr_file,
    ):
        # Files, not pipes: nothing to deadlock on, nothing held open by a stray child, and the
        # file-size limit bounds what the caller has to read.
        Path(tmp, "main.py").write_text(code, encoding="utf-8")
        stdin_file.write(stdin.encode("utf-8"))
        stdin_file.seek(0)
        env = {
            "PATH": _PATH,
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "HOME": tmp,
            "TMPDIR": tmp,
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONHASHSEED": "0",
        }
        program = [sys.executable, *_PYTHON_FLAGS, "main.py"]
        start = time.monotonic()
        proc = _start(
            program,
            limits,
            isolate_net=network_isolated(),
            cwd=tmp,
            env=env,
            stdin=stdin_file,
            stdout=stdout_file,
            stderr=stderr_file,
        )
        try:
            returncode, timed_out = proc.wait(timeout=limits.timeout_s), False
        except subprocess.TimeoutExpired:
            returncode, timed_out = None, True
        finally:
            _kill_group(proc)
        seconds = time.monotonic() - start
        return Result(
            stdout=_read_cut(stdout_file, limits.output_bytes),
            stderr=_read_cut(stderr_file, limits.output_bytes),
            returncode=returncode,
            timed_out=timed_out,
            seconds=seconds,
        )


def _start(
    program: list[str],
    limits: Limits,
    *,
    isolate_net: bool,
    cwd: str | None,
    env: dict[str, str],
    stdin: IO[bytes] | int = subprocess.DEVNULL,
    stdout: IO[bytes] | int = subprocess.DEVNULL,
    stderr: IO[bytes] | int = subprocess.DEVNULL,
) -> subprocess.Popen:
    """Start `program` through the bootstrap, as the leader of a new session and process group."""
    numbers = (limits.cpu_s, limits.memory_mb, limits.file_mb, limits.processes, int(isolate_net))
    return subprocess.Popen(
        [sys.executable, "-I", "-c", _BOOTSTRAP, *map(str, numbers), *program],
        cwd=cwd,
        env=env,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        start_new_session=True,
    )


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL every process left in `proc`'s process group, then reap `proc`."""
    # ProcessLookupError: the leader has exited and no one is left in its group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _read_cut(file: IO[bytes], limit: int) -> str:
    """The first `limit` bytes of `file` as text, with a marker saying how many more there were."""
    file.seek(0)
    head = file.read(limit)
    cut = os.fstat(file.fileno()).st_size - len(head)
    text = head.decode("utf-8", errors="replace")
    return f"{text}\n[... {cut} bytes cut]" if cut > 0 else text


# The child's side of `run_tests`. The solution's own prints go to stderr, so stdout ends with the
# result line; the nonce, fresh per call, keeps a solution from passing off a line of its own.
_RUNNER = """\
import contextlib, json, sys, traceback

def _run(solution, tests, nonce):
    namespace = {"__name__": "__main__"}
    passed = 0
    with contextlib.redirect_stdout(sys.stderr):
        exec(compile(solution, "solution.py", "exec"), namespace)
        for number, line in enumerate(tests, 1):
            try:
                exec(compile(line, f"<test {number}>", "exec"), namespace)
                passed += 1
            except BaseException as error:
                message = "".join(traceback.format_exception_only(type(error), error))
                print(f"test {number} failed: {line}\\n{message}", end="")
    print(nonce, json.dumps({"passed": passed, "total": len(tests)}), flush=True)

"""


def run_tests(solution: str, tests: str, *, limits: Limits = Limits()) -> tuple[int, int, Result]:
    """Run `solution`, then each line of `tests` as one test, in one sandboxed subprocess.

    Each non-blank line of `tests` that is not a comment (typically one `assert`) is a test,
    run on its own in the solution's namespace; it passes when it raises nothing. The child
    reports its count on its last stdout line, prefixed with a nonce made here for this call;
    anything else is ignored. This stops accidental or copied result lines; a solution written to
    attack the runner shares its interpreter (it can read the nonce from the runner's frame, or
    return objects whose `__eq__` is always true) and is not stopped.

    Args:
        solution: Python source defining what the tests call; run as `__main__`.
        tests: One test per line.
        limits: Limits for the whole run, solution and tests together.

    Returns:
        (passed, total, result): a solution that crashes, times out or exits nonzero passes 0
        of `total`. The solution's prints and one line per failed test are in `result.stderr`.
    """
    lines = [
        line for line in tests.splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]
    nonce = f"DISTRL-RESULT-{secrets.token_hex(16)}"
    code = f"{_RUNNER}_run({solution!r}, {lines!r}, {nonce!r})\n"
    result = run_python(code, limits=limits)
    return _parse_count(result, nonce, len(lines)), len(lines), result


def _parse_count(result: Result, nonce: str, total: int) -> int:
    """The passed count from the child's last stdout line, or 0 unless it is exactly as expected."""
    last = result.stdout.rstrip("\n").rpartition("\n")[2]
    match = re.fullmatch(re.escape(nonce) + r" (\{.*\})", last)
    if not result.ok or match is None:
        return 0
    try:
        report = json.loads(match.group(1))
    except ValueError:
        return 0
    if not isinstance(report, dict) or report.keys() != {"passed", "total"}:
        return 0
    passed, reported_total = report["passed"], report["total"]
    if type(passed) is int and type(reported_total) is int and reported_total == total:
        return passed if 0 <= passed <= total else 0
    return 0
