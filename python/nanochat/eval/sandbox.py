"""Run untrusted generated code in a subprocess that cannot take the evaluator down.

`run_program(source)` writes `source` to `prog.py` in a fresh temporary directory (its cwd) and
runs it with `sys.executable -I` (isolated mode: no PYTHON* env vars, no user site, no cwd on
sys.path) behind these layers, outermost first. A small launcher (a fresh single-threaded
`python -I -S`) sets up layers 2-4 and then execs the sandboxed interpreter, so the evaluator
itself forks without running Python code in the child (no preexec_fn). When the throw-away uid
cannot execute sys.executable (a venv whose base Python lives under a 0700 /root), a system Python
of the same version is used instead: the program only needs the standard library.

1. Process group + wall-clock timeout: the child starts its own session (start_new_session), the
   whole group is SIGKILLed when the wall-clock limit passes. Output goes to files, not pipes, so
   a program that prints forever cannot fill the evaluator's memory.
2. A throw-away user id (when the evaluator runs as root): every run gets its own unused uid/gid,
   so it cannot write anything the evaluator owns (only world-writable places such as /tmp and
   /dev/shm), cannot signal the evaluator, and RLIMIT_NPROC bounds a fork bomb. After the run,
   every process still owned by that uid is SIGKILLed (this catches children that escaped the
   process group with setsid).
3. A new, empty network namespace (unshare(CLONE_NEWNET), root only): no interface but a down
   loopback, so no connection to anything, not even to localhost services of the host.
4. resource limits: RLIMIT_CPU (CPU seconds), RLIMIT_AS (address space = memory), RLIMIT_FSIZE
   (largest file written), RLIMIT_NOFILE, RLIMIT_CORE=0, RLIMIT_NPROC (with layer 2).
5. A Python preamble in the runner: socket.socket (and _socket.socket) raise, and open/io.open/
   os.open for writing plus the os functions that remove, rename, create or chmod paths raise
   PermissionError for any path outside the sandbox directory (this also covers /tmp, which
   layer 2 leaves open). Without layer 2 (not root) it also disables os.fork/system/exec*/spawn*
   and subprocess.Popen, since no RLIMIT_NPROC would bound a fork bomb.

What is NOT contained: reads (the code can read any world-readable file, e.g. the repository);
code that bypasses the preamble through ctypes or `_io`/`posix` directly can still write to
world-writable places (/tmp, /dev/shm) and, without root, anywhere the evaluator's user can;
without root there is no uid switch, no network namespace and no RLIMIT_NPROC (process creation is
then blocked only by the preamble; a fork through ctypes is bounded only by CPU time and the
wall-clock kill of its process group). This is a guard
against the accidents of a small model, not a security boundary against an adversary.

Success is proven, not assumed: the runner prints a random nonce (passed in on stdin, not written
to disk) only after the program ran to its end, so sys.exit(0) or os._exit(0) from inside the
program cannot pass. Result: SandboxResult(status = passed | failed | timeout | error, reason).
"failed" = the program raised (assertion, exception, SyntaxError) or exited early; "timeout" =
wall-clock or CPU limit; "error" = killed by a signal (segfault, file-size limit) or the sandbox
itself could not run it.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

UID_BASE = 1_000_000  # throw-away uids live above every real account
MAX_PROCS = 64  # RLIMIT_NPROC per run (threads count too)
MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_OPEN_FILES = 256
OUTPUT_TAIL = 2000  # characters of stdout/stderr kept in the result

_uid_counter = itertools.count()

RUNNER = r'''
import sys, os
_nonce, _block_processes = sys.stdin.readline().split()
sys.stdin.close()
import builtins, io, socket, _socket, subprocess
_root = os.path.realpath(os.getcwd())

def _inside(path):
    if isinstance(path, int):
        return True  # an already-open file descriptor
    p = os.path.realpath(os.fsdecode(path))
    return p == _root or p.startswith(_root + os.sep)

def _deny(what, path):
    raise PermissionError(f"sandbox: {what} outside the sandbox directory is blocked: {path!r}")

_real_open = builtins.open
def _open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+") and not _inside(file):
        _deny("writing", file)
    return _real_open(file, mode, *args, **kwargs)
builtins.open = io.open = _open

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_real_os_open = os.open
def _os_open(path, flags, *args, **kwargs):
    if flags & _WRITE_FLAGS and not _inside(path):
        _deny("writing", path)
    return _real_os_open(path, flags, *args, **kwargs)
os.open = _os_open

def _guard_paths(name, n_paths):
    real = getattr(os, name, None)
    if real is None:
        return
    def guarded(*args, **kwargs):
        for p in args[:n_paths]:
            if not _inside(p):
                _deny(name, p)
        return real(*args, **kwargs)
    setattr(os, name, guarded)
for _name in ("remove", "unlink", "rmdir", "mkdir", "mkfifo", "mknod", "chmod", "chown", "lchown",
              "truncate", "utime", "removedirs"):
    _guard_paths(_name, 1)
for _name in ("rename", "replace", "link", "symlink"):
    _guard_paths(_name, 2)

def _no_network(*args, **kwargs):
    raise OSError("sandbox: network access is disabled")
socket.socket = _socket.socket = socket.create_connection = socket.socketpair = _no_network

def _no_processes(*args, **kwargs):
    raise OSError("sandbox: starting processes is disabled (no throw-away uid to bound them)")
if _block_processes == "1":
    for _name in ("fork", "forkpty", "system", "popen", "posix_spawn", "posix_spawnp", "execv", "execve",
                  "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnv", "spawnve", "spawnl",
                  "spawnle", "spawnlp", "spawnlpe", "spawnvp", "spawnvpe"):
        if hasattr(os, _name):
            setattr(os, _name, _no_processes)
    subprocess.Popen = _no_processes

_source = _real_open("prog.py", encoding="utf-8").read()
exec(compile(_source, "prog.py", "exec"), {"__name__": "__main__", "__builtins__": builtins})
sys.stdout.flush()
sys.stderr.flush()
print(_nonce, flush=True)
os._exit(0)  # do not wait for threads or atexit handlers the program left behind
'''


@dataclass
class SandboxResult:
    status: str  # "passed" | "failed" | "timeout" | "error"
    reason: str
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# The launcher runs as the evaluator's user in a fresh single-threaded interpreter, sets up the
# namespace and limits, drops to the throw-away uid and execs the sandboxed interpreter. Doing this
# in a separate process instead of a preexec_fn keeps fork() of the (multi-threaded) evaluator free
# of Python code, so a lock held by another thread at fork time cannot hang the evaluator.
LAUNCHER = r'''
import ctypes, json, os, resource, sys
cfg = json.loads(sys.argv[1])
if cfg["netns"] and ctypes.CDLL(None, use_errno=True).unshare(0x40000000) != 0:
    sys.stderr.write("sandbox launcher: unshare(CLONE_NEWNET) failed: errno %d\n" % ctypes.get_errno())
    os._exit(121)
for name, value in cfg["limits"].items():
    resource.setrlimit(getattr(resource, name), (value[0], value[1]))
if cfg["uid"] is not None:
    os.setgroups([])
    os.setgid(cfg["uid"])
    os.setuid(cfg["uid"])
os.execv(cfg["argv"][0], cfg["argv"])
'''
LAUNCHER_FAILED = 121


def _launch_command(argv: list[str], uid: int | None, netns: bool, limits: dict) -> list[str]:
    cfg = {"uid": uid, "netns": netns, "limits": limits, "argv": argv}
    return [sys.executable, "-I", "-S", "-c", LAUNCHER, json.dumps(cfg)]


@dataclass(frozen=True)
class _Setup:
    python: str  # the interpreter the sandboxed program runs under
    own_uid: bool
    network_namespace: bool


def _runs(python: str, uid: int | None, netns: bool) -> bool:
    argv = [python, "-I", "-c", "import json, math, collections"]
    try:
        subprocess.run(_launch_command(argv, uid, netns, {}), cwd="/", check=True, timeout=30,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return True
    except (OSError, subprocess.SubprocessError):
        return False


@functools.cache
def _setup() -> _Setup:
    """Probe once which layers this machine supports, by running tiny children."""
    if os.geteuid() != 0:
        return _Setup(sys.executable, own_uid=False, network_namespace=False)
    netns = _runs(sys.executable, None, True)
    # A venv's interpreter may live where other users cannot reach (e.g. under /root, mode 0700):
    # then fall back to a system Python of the same version, which only needs its stdlib here.
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [sys.executable, getattr(sys, "_base_executable", sys.executable),
                  shutil.which(version, path="/usr/local/bin:/usr/bin:/bin"), f"/usr/bin/{version}"]
    for python in filter(None, dict.fromkeys(candidates)):
        if _runs(python, UID_BASE - 1, False):
            return _Setup(python, own_uid=True, network_namespace=netns)
    return _Setup(sys.executable, own_uid=False, network_namespace=netns)


def sandbox_layers() -> dict:
    """Which optional layers are active on this machine, and the interpreter the sandbox uses."""
    setup = _setup()
    return {"python": setup.python, "own_uid": setup.own_uid, "network_namespace": setup.network_namespace,
            "rlimits": True, "python_guard": True}


def _limits(uid: int | None, cpu_seconds: int, memory_bytes: int) -> dict:
    limits = {"RLIMIT_CPU": (cpu_seconds, cpu_seconds + 1), "RLIMIT_AS": (memory_bytes, memory_bytes),
              "RLIMIT_FSIZE": (MAX_FILE_BYTES, MAX_FILE_BYTES), "RLIMIT_NOFILE": (MAX_OPEN_FILES, MAX_OPEN_FILES),
              "RLIMIT_CORE": (0, 0)}
    if uid is not None:  # counted per uid: only meaningful for a uid of its own
        limits["RLIMIT_NPROC"] = (MAX_PROCS, MAX_PROCS)
    return limits


def _pids_of_uid(uid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                status = f.read()
        except OSError:
            continue  # the process is gone
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields.get("Uid", "").split()[:1] == [str(uid)] and not fields.get("State", "").strip().startswith("Z"):
            pids.append(int(entry))
    return pids


def _kill_uid(uid: int) -> None:
    """SIGKILL every live process of a throw-away uid; repeat while a fork bomb still spawns."""
    for _ in range(50):
        pids = _pids_of_uid(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)


def _tail(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4 * OUTPUT_TAIL))
            return f.read().decode("utf-8", errors="replace")[-OUTPUT_TAIL:]
    except OSError:
        return ""


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _classify(returncode: int, nonce: str, stdout: str, stderr: str, memory_mb: int) -> tuple[str, str]:
    if returncode == 0 and stdout.rstrip().endswith(nonce):
        return "passed", "ok"
    if returncode == LAUNCHER_FAILED and stderr.startswith("sandbox launcher:"):
        return "error", _last_line(stderr)
    if returncode == -signal.SIGXCPU:
        return "timeout", "CPU-time limit reached"
    if returncode == -signal.SIGXFSZ:
        return "error", f"file-size limit of {MAX_FILE_BYTES} bytes reached"
    if returncode < 0:
        return "error", f"killed by signal {signal.Signals(-returncode).name}"
    if "MemoryError" in _last_line(stderr):
        return "failed", f"MemoryError (memory limit {memory_mb} MiB)"
    if returncode == 0:
        return "failed", "exited with status 0 before the tests finished"
    return "failed", _last_line(stderr) or f"exited with status {returncode}"


def run_program(source: str, timeout: float = 5.0, memory_mb: int = 1024) -> SandboxResult:
    """Run a Python program in the sandbox; never raises for anything the program does."""
    setup = _setup()
    uid = UID_BASE + (os.getpid() % 100_000) * 100 + next(_uid_counter) % 100 if setup.own_uid else None
    nonce = secrets.token_hex(16)
    workdir = tempfile.mkdtemp(prefix="nanochat-sandbox-")
    start = time.monotonic()
    try:
        with open(os.path.join(workdir, "prog.py"), "w", encoding="utf-8") as f:
            f.write(source)
        with open(os.path.join(workdir, "runner.py"), "w", encoding="utf-8") as f:
            f.write(RUNNER)
        if uid is not None:
            os.chown(workdir, uid, uid)
        os.chmod(workdir, 0o700)
        out_path, err_path = os.path.join(workdir, "stdout"), os.path.join(workdir, "stderr")
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
        command = _launch_command([setup.python, "-I", "runner.py"], uid, setup.network_namespace,
                                  _limits(uid, int(timeout) + 1, memory_mb * 1024 * 1024))
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            try:
                proc = subprocess.Popen(command, cwd=workdir, env=env,
                                        stdin=subprocess.PIPE, stdout=out, stderr=err,
                                        start_new_session=True, close_fds=True)
            except (OSError, subprocess.SubprocessError) as e:
                return SandboxResult("error", f"sandbox could not start the program: {e}")
            try:
                block_processes = "0" if setup.own_uid else "1"
                proc.stdin.write(f"{nonce} {block_processes}\n".encode())
                proc.stdin.close()
            except BrokenPipeError:
                pass  # the child died before reading its nonce; its status says why
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            if uid is not None:
                _kill_uid(uid)
            else:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # children left behind in the group
                except ProcessLookupError:
                    pass
        stdout, stderr = _tail(out_path), _tail(err_path)
        seconds = time.monotonic() - start
        if timed_out:
            return SandboxResult("timeout", f"wall-clock limit of {timeout:g} s reached", stdout, stderr, seconds)
        status, reason = _classify(proc.returncode, nonce, stdout, stderr, memory_mb)
        stdout = stdout.replace(nonce, "").rstrip("\n")
        return SandboxResult(status, reason, stdout, stderr, seconds)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
