import errno
import json
import os
import signal
import socket
import textwrap
import time

import pytest

from distrl.envs.sandbox import Limits, network_isolated, run_python, run_tests

KILL = Limits(timeout_s=1.0)


def _gone(pid: int, within_s: float = 1.0) -> bool:
    """Whether `pid` is dead (or a zombie nobody has reaped yet) within `within_s`."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:
            with open(f"/proc/{pid}/stat") as stat:  # the state follows the ")" of the name
                if stat.read().rpartition(")")[2].split()[0] in ("Z", "X"):
                    return True
        except FileNotFoundError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def _pids(stdout: str) -> list[int]:
    return [int(word) for word in stdout.split() if word.isdigit()]


def test_runs_code_with_stdin_and_reports_how_it_ended():
    result = run_python("print('hello', input())", stdin="world\n")
    assert result.ok and result.stdout == "hello world\n" and result.stderr == ""
    assert result.returncode == 0 and not result.timed_out and result.seconds > 0

    failed = run_python("import sys\nprint('partial')\nraise ValueError('boom')")
    assert not failed.ok and failed.returncode == 1 and not failed.timed_out
    assert failed.stdout == "partial\n" and "ValueError: boom" in failed.stderr


def test_each_run_gets_a_fresh_temporary_directory_that_is_removed():
    code = "import json, os\nopen('left.txt', 'w')\nprint(json.dumps([os.getcwd(), os.listdir()]))"
    (first_dir, listed), (second_dir, _) = (json.loads(run_python(code).stdout) for _ in range(2))
    assert sorted(listed) == ["left.txt", "main.py"]
    assert first_dir != second_dir
    assert not os.path.exists(first_dir) and not os.path.exists(second_dir)


def test_environment_is_built_from_nothing(monkeypatch):
    monkeypatch.setenv("DISTRL_TEST_SECRET", "hunter2")
    code = "import json, os\nprint(json.dumps({**os.environ, 'cwd': os.getcwd(), 'h': hash('a')}))"
    first, second = (json.loads(run_python(code).stdout) for _ in range(2))
    cwd = first.pop("cwd")
    assert first.pop("h") == second["h"]  # PYTHONHASHSEED=0 is honoured: same hashes every run
    assert "hunter2" not in json.dumps(first)
    assert first == {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": cwd,
        "TMPDIR": cwd,
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONHASHSEED": "0",
    }


def test_resource_limits_are_set_inside_the_child():
    limits = Limits(cpu_s=3, memory_mb=300, file_mb=2, processes=7)
    code = textwrap.dedent("""
        import resource
        for name in ("CPU", "AS", "FSIZE", "CORE", "NPROC"):
            print(name, *resource.getrlimit(getattr(resource, "RLIMIT_" + name)))
    """)
    lines = run_python(code, limits=limits).stdout.splitlines()
    mb = 2**20
    expected = {"CPU": 3, "AS": 300 * mb, "FSIZE": 2 * mb, "CORE": 0, "NPROC": 7}
    for line in lines:
        name, soft, hard = line.split()
        assert int(soft) == int(hard) == expected.pop(name), line
    assert expected == {}


def test_cpu_limit_stops_a_busy_loop_before_the_wall_clock():
    result = run_python("while True: pass", limits=Limits(cpu_s=1, timeout_s=20))
    assert not result.timed_out and result.returncode == -signal.SIGKILL


def test_busy_loop_is_killed_at_the_wall_clock_deadline():
    result = run_python("while True: pass", limits=Limits(timeout_s=1.0, cpu_s=30))
    assert result.timed_out and result.returncode is None and not result.ok
    assert 1.0 <= result.seconds < 2.0


def test_grandchildren_are_killed_at_the_deadline():
    code = textwrap.dedent("""
        import subprocess, time
        print(subprocess.Popen(["sleep", "100"]).pid, flush=True)
        time.sleep(100)
    """)
    start = time.monotonic()
    result = run_python(code, limits=KILL)
    assert time.monotonic() - start < KILL.timeout_s + 1
    assert result.timed_out
    (pid,) = _pids(result.stdout)
    assert _gone(pid)


def test_background_children_do_not_outlive_a_program_that_exits():
    code = "import subprocess\nprint(subprocess.Popen(['sleep', '100']).pid)"
    result = run_python(code, limits=KILL)
    assert result.ok and not result.timed_out
    (pid,) = _pids(result.stdout)
    assert _gone(pid)


def test_fork_loop_is_stopped_by_the_group_kill():
    # We run as root, whom RLIMIT_NPROC does not stop, so only the group kill ends this. The tree
    # is bounded (2**5 processes) to spare a shared machine; each process reports its pid.
    code = textwrap.dedent("""
        import os
        for _ in range(5):
            try:
                os.fork()
            except OSError:
                pass
        os.write(1, f"{os.getpid()}\\n".encode())
        while True:
            pass
    """)
    start = time.monotonic()
    result = run_python(code, limits=KILL)
    assert time.monotonic() - start < KILL.timeout_s + 1
    assert result.timed_out
    pids = _pids(result.stdout)
    assert len(pids) > 1
    assert all(_gone(pid) for pid in pids)


@pytest.mark.parametrize(
    "code",
    ["x = bytearray(10**10)", "x = []\nwhile True:\n    x.append(bytearray(10**7))"],
    ids=["one-allocation", "growing-list"],
)
def test_memory_bomb_fails_fast(code):
    limits = Limits(timeout_s=5.0, memory_mb=256)
    start = time.monotonic()
    result = run_python(code, limits=limits)
    assert time.monotonic() - start < limits.timeout_s + 1
    assert not result.ok and not result.timed_out
    assert "MemoryError" in result.stderr


def test_writing_past_the_file_size_limit_fails():
    code = textwrap.dedent("""
        import errno, os
        try:
            with open("big", "wb") as f:
                f.write(b"x" * (3 * 2**20))
        except OSError as error:
            print(error.errno, os.path.getsize("big"))
        open("big", "wb").write(b"x" * (3 * 2**20))
    """)
    result = run_python(code, limits=Limits(file_mb=1))
    assert not result.ok
    code, size = map(int, result.stdout.split())
    assert code == errno.EFBIG and size <= 2**20


def test_output_is_cut_with_a_marker():
    result = run_python(
        "print('x' * 5000)\nprint('é' * 10, file=__import__('sys').stderr)",
        limits=Limits(output_bytes=1000),
    )
    assert result.stdout == "x" * 1000 + "\n[... 4001 bytes cut]"
    assert result.stderr == "é" * 10 + "\n"


def test_network_is_unreachable_when_isolated():
    isolated = network_isolated()
    assert isolated is network_isolated()  # probed once
    if not isolated:
        pytest.skip("no network namespace here (unshare(CLONE_NEWNET) not permitted)")
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        code = textwrap.dedent(f"""
            import socket
            try:
                socket.create_connection(("127.0.0.1", {port}), timeout=0.5)
                print("connected")
            except OSError as error:
                print("refused", type(error).__name__)
        """)
        result = run_python(code, limits=Limits(timeout_s=3.0))
    assert result.ok and result.stdout.startswith("refused"), result.stdout


SOLUTION = "def add(a, b):\n    return a + b\n"
TESTS = "assert add(1, 2) == 3\n\n# a comment is not a test\nassert add(2, 2) == 4\n"


def test_run_tests_counts_the_lines_that_pass():
    passed, total, result = run_tests(SOLUTION, TESTS + "assert add(2, 2) == 5\n")
    assert (passed, total) == (2, 3) and result.ok
    assert "test 3 failed: assert add(2, 2) == 5" in result.stderr


@pytest.mark.parametrize(
    "solution, limits",
    [
        ("raise SystemExit(3)", Limits()),
        ("def add(a, b):\n    return a +", Limits()),
        (SOLUTION + "while True: pass", KILL),
        (SOLUTION + "import os\nos._exit(0)", Limits()),
        (SOLUTION + "import atexit, os\natexit.register(os._exit, 1)", Limits()),
    ],
    ids=["exits", "syntax-error", "times-out", "exits-before-the-tests", "exits-1-after-them"],
)
def test_run_tests_gives_nothing_to_a_solution_that_does_not_finish(solution, limits):
    passed, total, result = run_tests(solution, TESTS, limits=limits)
    assert (passed, total) == (0, 2)
    assert result.seconds < limits.timeout_s + 1


FAKE = '{"passed": 3, "total": 3}'


@pytest.mark.parametrize(
    "trick, passed",
    [
        # a result line of its own, printed before the runner's: only the last line counts
        (f"import sys\nprint({FAKE!r}, file=sys.__stdout__)", 1),
        # a line after the runner's, at exit: the last line is not the runner's, so nothing
        (f"import atexit\natexit.register(print, {FAKE!r})", 0),
        # the same in the runner's format, with a guessed nonce
        (f"import atexit\natexit.register(print, 'DISTRL-RESULT-00', {FAKE!r})", 0),
    ],
    ids=["earlier-line", "last-line", "guessed-nonce"],
)
def test_run_tests_accepts_only_its_own_result_line(trick, passed):
    tests = "assert add(1, 2) == 3\nassert add(1, 1) == 0\nassert False\n"
    assert run_tests(SOLUTION + trick, tests)[:2] == (passed, 3)


@pytest.mark.parametrize(
    "forged, passed",
    [
        ('{"passed": 3, "total": 3}', 3),  # control: the forgery itself works (see run_tests)
        ('{"passed": 9, "total": 3}', 0),
        ('{"passed": -1, "total": 3}', 0),
        ('{"passed": 2, "total": 2}', 0),
        ('{"passed": true, "total": 3}', 0),
        ('{"passed": 3.0, "total": 3}', 0),
        ('{"passed": 3, "total": 3, "x": 1}', 0),
        ("[3, 3]", 0),
        ("{not json}", 0),
    ],
    ids=["forgery", "above", "negative", "total", "bool", "float", "key", "list", "json"],
)
def test_run_tests_checks_the_shape_of_a_result_line_with_the_right_nonce(forged, passed):
    # A solution that reads the nonce from the runner's frame, the documented limit of the nonce.
    nonce = "sys._getframe(1).f_locals['nonce']"
    steal = f"import atexit, sys\natexit.register(print, {nonce}, {forged!r})"
    tests = "assert add(1, 2) == 3\nassert False\nassert False\n"
    assert run_tests(SOLUTION + steal, tests)[:2] == (passed, 3)
