"""The sandbox contains what generated code can do wrong, and the evaluator goes on.

Each test runs a real misbehaving program (infinite loop, unbounded allocation, fork bomb, writes
outside its directory, sockets, early exits, a segfault) and checks it is reported as not passed
with the right status, that nothing escaped, and that the next run still works. Layer tests bypass
the Python guard (ctypes / posix) to check the OS layers underneath it on their own.
Run: .venv/bin/python -m pytest tests/test_sandbox.py -q   (about 15 s)
"""

import os
import socket
import time

import pytest

from nanochat.eval.sandbox import UID_BASE, run_program, sandbox_layers

TIMEOUT = 2.0
MEMORY_MB = 256


def run(source: str):
    return run_program(source, timeout=TIMEOUT, memory_mb=MEMORY_MB)


def assert_still_works():
    result = run("assert sum(range(10)) == 45\nprint('fine')")
    assert result.status == "passed", result
    assert result.stdout == "fine"


def live_sandbox_pids() -> list[int]:
    """Processes still running under the throw-away uids of this test process."""
    first = UID_BASE + (os.getpid() % 100_000) * 100
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            st = os.stat(f"/proc/{entry}")
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if first <= st.st_uid < first + 100 and state != "Z":
            pids.append(int(entry))
    return pids


def test_good_program_passes_and_assert_fails():
    assert_still_works()
    result = run("assert 1 + 1 == 3, 'arithmetic is broken'")
    assert result.status == "failed"
    assert "AssertionError: arithmetic is broken" in result.reason


def test_infinite_loop_times_out():
    start = time.monotonic()
    result = run("while True:\n    pass")
    assert result.status == "timeout"
    assert time.monotonic() - start < TIMEOUT + 3
    assert_still_works()


def test_sleeping_child_process_is_killed_with_its_group():
    result = run("import subprocess, sys, time\n"
                 "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
                 "time.sleep(60)")
    assert result.status == "timeout"
    assert live_sandbox_pids() == []


def test_unbounded_allocation_hits_memory_limit():
    result = run("blocks = []\nwhile True:\n    blocks.append(bytearray(10 ** 7))")
    assert result.status == "failed"
    assert "MemoryError" in result.reason
    assert_still_works()


def test_fork_bomb_is_bounded_and_cleaned_up():
    start = time.monotonic()
    result = run("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass")
    assert not result.passed
    assert result.status in ("timeout", "failed", "error")
    assert time.monotonic() - start < TIMEOUT + 5
    assert live_sandbox_pids() == []
    assert_still_works()


def test_escaped_session_is_killed_after_the_run():
    if not sandbox_layers()["own_uid"]:
        pytest.skip("needs root for the throw-away uid that finds escaped processes")
    result = run("import os, time\n"
                 "if os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"
                 "print('parent done')")
    assert result.status == "passed"
    assert live_sandbox_pids() == []


def test_write_outside_directory_is_blocked(tmp_path):
    target = tmp_path / "escaped.txt"
    for source in (f"open({str(target)!r}, 'w').write('x')",
                   f"import pathlib; pathlib.Path({str(target)!r}).write_text('x')",
                   f"import os; os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)",
                   "open('/tmp/nanochat-sandbox-escape.txt', 'w').write('x')",
                   f"import os; os.remove({str(tmp_path / 'keep.txt')!r})"):
        (tmp_path / "keep.txt").write_text("keep")
        result = run(source)
        assert result.status == "failed", (source, result)
        assert "PermissionError" in result.reason
    assert not target.exists()
    assert not os.path.exists("/tmp/nanochat-sandbox-escape.txt")
    assert (tmp_path / "keep.txt").read_text() == "keep"


def test_write_inside_directory_is_allowed():
    result = run("with open('scratch.txt', 'w') as f:\n    f.write('ok')\nprint(open('scratch.txt').read())")
    assert result.status == "passed", result
    assert result.stdout == "ok"


def test_uid_layer_blocks_writes_that_bypass_the_guard(tmp_path):
    if not sandbox_layers()["own_uid"]:
        pytest.skip("needs root for the throw-away uid layer")
    target = tmp_path / "escaped.txt"
    result = run(f"import posix\nposix.open({str(target)!r}, posix.O_WRONLY | posix.O_CREAT)")
    assert result.status == "failed"
    assert "PermissionError" in result.reason
    assert not target.exists()


def test_socket_is_refused():
    result = run("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)")
    assert result.status == "failed"
    assert "network access is disabled" in result.reason


def test_network_namespace_blocks_sockets_that_bypass_the_guard():
    if not sandbox_layers()["network_namespace"]:
        pytest.skip("no network namespace on this machine (needs root and unshare)")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    # Raw libc socket()/connect() to the host's listening port: the guard never sees it.
    source = f"""
import ctypes, socket, struct
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.socket(socket.AF_INET, socket.SOCK_STREAM, 0)
assert fd >= 0, 'socket() failed'
addr = struct.pack('=HH4s8x', socket.AF_INET, socket.htons({port}), socket.inet_aton('127.0.0.1'))
rc = libc.connect(fd, ctypes.c_char_p(addr), len(addr))
assert rc == 0, 'connect failed with errno %d' % ctypes.get_errno()
"""
    try:
        result = run(source)
    finally:
        server.close()
    assert result.status == "failed"
    assert "connect failed" in result.reason


def test_sys_exit_and_os_exit_do_not_pass():
    for source in ("import sys\nsys.exit(0)", "import os\nos._exit(0)", "raise SystemExit", "quit()"):
        result = run(source + "\nassert False, 'never reached'")
        assert result.status == "failed", (source, result)
        assert "before the tests finished" in result.reason or "SystemExit" in result.reason
    assert_still_works()


def test_segfault_is_reported():
    result = run("import ctypes\nctypes.string_at(0)")
    assert result.status == "error"
    assert "SIGSEGV" in result.reason
    assert_still_works()


def test_endless_output_is_bounded():
    result = run("while True:\n    print('x' * 1000)")
    assert not result.passed
    assert len(result.stdout) <= 2000


def test_without_root_layers_the_guard_still_blocks_processes_and_writes(monkeypatch, tmp_path):
    """What a non-root machine gets: no uid switch, no network namespace, only limits and the guard."""
    import sys

    from nanochat.eval import sandbox

    monkeypatch.setattr(sandbox, "_setup", lambda: sandbox._Setup(sys.executable, own_uid=False, network_namespace=False))
    for source in ("import os\nos.fork()", "import subprocess\nsubprocess.run(['true'])", "import os\nos.system('true')"):
        result = run(source)
        assert result.status == "failed", (source, result)
        assert "starting processes is disabled" in result.reason
    result = run(f"open({str(tmp_path / 'x.txt')!r}, 'w')")
    assert result.status == "failed" and "PermissionError" in result.reason
    assert run("blocks = []\nwhile True:\n    blocks.append(bytearray(10 ** 7))").status == "failed"
    assert run("assert sum(range(10)) == 45").status == "passed"
