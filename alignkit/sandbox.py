"""Run untrusted Python programs out of process, under limits and namespaces.

`run_program` / `Sandbox.run` / `Sandbox.run_many` run programs and return a `Result` (passed, failed,
timeout, memory, killed, error). Nothing runs in this process: a separate interpreter
(`_sandbox_launcher.py`) sets up namespaces, a read-only mount, rlimits and a dedicated uid, then runs
the program; `isolation()` says which of these the host allows. Defence in depth, not a security
boundary; Linux only. The code reward built on it is `alignkit.code_reward`. Every mechanism, its
limits and weaker hosts: docs/sandbox.md.
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import marshal
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

from alignkit.errors import UserError

Status = Literal["passed", "failed", "timeout", "memory", "killed", "error"]

# Dedicated uids, one per concurrent sandbox: above systemd's container range (524288-1879048191),
# below 2**31. Nothing else on a normal host uses them.
UID_BASE = 1_990_000_000
MECHANISMS = ("net", "ipc", "mount", "readonly", "pid")  # namespaces / mount steps, in launcher order


@dataclass
class Result:
    passed: bool
    status: Status  # passed | failed (non-zero exit) | timeout | memory | killed (signal) | error (sandbox)
    seconds: float  # wall clock, launcher start to end
    stderr: str  # last `max_output` bytes; for status "error", the sandbox's reason
    stdout: str = ""
    exit_code: int | None = None  # negative: killed by that signal (subprocess convention)
    uid: int | None = None  # the uid the program ran as
    missing: tuple[str, ...] = ()  # protections not applied on this host, with the reason


@dataclass(frozen=True)
class Isolation:
    """What this host allows, probed once per process (`isolation()`)."""

    mode: Literal["root", "userns", "none"]
    available: frozenset[str]
    missing: dict[str, str]  # mechanism -> why it is unavailable
    error: str | None = None  # the sandbox cannot run programs at all


# --------------------------------------------------------------------------- the launcher


_LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_launcher.py")


def _launcher_argv(cfg: dict) -> list[str]:
    """`python -I -S -B _sandbox_launcher.py <cfg>`: the settings as hex-encoded marshal data (the
    launcher runs this very interpreter, so the marshal format matches)."""
    return [os.path.realpath(sys.executable), "-I", "-S", "-B", _LAUNCHER, marshal.dumps(cfg).hex()]


# --------------------------------------------------------------------------- uids, processes


class _UidSlots:
    """One uid per concurrent sandbox (RLIMIT_NPROC counts processes per uid), also across
    processes: a slot is held by an flock on `<lock dir>/<uid>.lock`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._busy: set[int] = set()
        self._dir: str | None = None

    def _lock_dir(self) -> str:
        if self._dir is None:
            base = "/run" if os.access("/run", os.W_OK) else tempfile.gettempdir()
            path = os.path.join(base, "alignkit-sandbox" if base == "/run" else f"alignkit-sandbox-{os.geteuid()}")
            with contextlib.suppress(FileExistsError):
                os.mkdir(path, 0o700)
            st = os.lstat(path)
            if not os.path.isdir(path) or os.path.islink(path) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
                raise UserError(f"sandbox: lock directory {path} is not a private directory of this user; remove it")
            self._dir = path
        return self._dir

    def acquire(self, base: int, count: int = 4096) -> tuple[int, int]:
        with self._lock:
            directory = self._lock_dir()
            for uid in range(base, base + count):
                if uid in self._busy:
                    continue
                fd = os.open(f"{directory}/{uid}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                self._busy.add(uid)
                return uid, fd
        raise UserError(f"sandbox: all {count} uids from {base} are in use")

    def release(self, uid: int, fd: int) -> None:
        with self._lock:
            os.close(fd)
            self._busy.discard(uid)


_SLOTS = _UidSlots()


def processes_of(uid: int) -> list[int]:
    """Live (non-zombie) processes whose real uid is `uid`."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as f:
                fields = dict(line.split(b":", 1) for line in f if line[:4] in (b"Stat", b"Uid:"))
        except (OSError, ValueError):
            continue
        if fields.get(b"State", b"").strip().startswith(b"Z"):
            continue
        if int(fields.get(b"Uid", b"-1 ").split()[0]) == uid:
            pids.append(int(name))
    return pids


def _reap_uid(uid: int, timeout: float = 2.0) -> int:
    """SIGKILL every process of a dedicated sandbox uid until none is left; the number left."""
    deadline = time.monotonic() + timeout
    while True:
        pids = processes_of(uid)
        if not pids or time.monotonic() > deadline:
            return len(pids)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.005)


def _wait_gone(pid: int, timeout: float = 2.0) -> None:
    """Wait until `pid` has exited (gone or a zombie): PID 1 of a namespace exits last."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[-1].split()[0] == b"Z":
                    return
        except OSError:
            return
        time.sleep(0.005)


class _Tail:
    """The last `cap` bytes of a stream, and how many were dropped."""

    def __init__(self, cap: int) -> None:
        self.cap, self.buf, self.dropped = cap, bytearray(), 0

    def add(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > self.cap:
            extra = len(self.buf) - self.cap
            del self.buf[:extra]
            self.dropped += extra

    def text(self) -> str:
        head = f"[... {self.dropped} bytes dropped ...]\n" if self.dropped else ""
        return head + self.buf.decode("utf-8", "replace")


# --------------------------------------------------------------------------- the sandbox


@dataclass(frozen=True)
class Sandbox:
    """Settings for running programs; `run(code)` / `run_many(codes)` (docs/sandbox.md)."""

    timeout: float = 3.0  # wall-clock seconds, launcher start to end (Q-probe: 3 s)
    memory_mb: int = 512  # RLIMIT_AS per process
    cpu_seconds: int | None = None  # RLIMIT_CPU per process; default ceil(timeout) + 1
    max_procs: int = 16  # RLIMIT_NPROC: processes + threads of the sandbox uid
    max_files: int = 64  # RLIMIT_NOFILE
    file_size_mb: int = 16  # RLIMIT_FSIZE
    max_output: int = 65536  # bytes kept (the tail) of stdout and of stderr
    workers: int | None = None  # programs run at once by run_many; default: CPUs available
    uid: int | None = None  # as root: run as this uid (gid = uid); default a dedicated uid per slot
    uid_base: int = UID_BASE
    allow_network: bool = False  # run even where no network namespace can be made
    allow_writes: bool = False  # run even where neither the read-only mount nor another uid protects files
    site_packages: bool = False  # let programs import the caller's site-packages (venv)
    tmp_dir: str | None = None  # where work dirs are made; default tempfile.gettempdir()

    def __post_init__(self) -> None:
        checks = {
            "timeout": self.timeout > 0, "memory_mb": self.memory_mb >= 64, "max_procs": self.max_procs >= 1,
            "max_files": self.max_files >= 16, "file_size_mb": self.file_size_mb >= 1,
            "max_output": self.max_output >= 0,
            "cpu_seconds": self.cpu_seconds is None or self.cpu_seconds >= 1,
            "workers": self.workers is None or self.workers >= 1, "uid": self.uid is None or self.uid > 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise UserError(f"sandbox: invalid {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)} "
                            "(timeout > 0, memory_mb >= 64, max_files >= 16, uid > 0, counts >= 1)")

    # ----------------------------------------------------------------- public

    def run(self, code: str, expect_stdout: str | None = None) -> Result:
        """Run one program; with `expect_stdout`, a pass also needs that text in its stdout."""
        iso = isolation()
        refusal = self._refusal(iso)
        if refusal:
            return Result(False, "error", 0.0, refusal, missing=_missing(iso))
        want = [m for m in MECHANISMS if m in iso.available]
        return self._execute(code, iso.mode, want, expect_stdout, _missing(iso))[0]

    def run_many(self, codes: Sequence[str], expect_stdout: Sequence[str | None] | None = None) -> list[Result]:
        """Run programs in parallel (`workers` threads, each waiting on one subprocess); results in order."""
        expect = list(expect_stdout) if expect_stdout is not None else [None] * len(codes)
        if len(expect) != len(codes):
            raise UserError(f"sandbox: {len(codes)} programs but {len(expect)} expected outputs")
        if not codes:
            return []
        workers = min(self.workers or len(os.sched_getaffinity(0)), len(codes))
        if workers == 1:
            return [self.run(c, e) for c, e in zip(codes, expect)]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox") as pool:
            return list(pool.map(self.run, codes, expect))

    def check(self) -> Isolation:
        """The host's isolation; raises UserError when this sandbox would refuse to run."""
        iso = isolation()
        refusal = self._refusal(iso)
        if refusal:
            raise UserError(refusal)
        return iso

    # ----------------------------------------------------------------- internals

    def _refusal(self, iso: Isolation) -> str | None:
        if iso.error:
            return f"sandbox unusable on this host: {iso.error}"
        if "net" not in iso.available and not self.allow_network:
            return ("sandbox refused: no network namespace can be made here "
                    f"({iso.missing.get('net', 'unknown reason')}); programs could reach the network. "
                    "Pass allow_network=True to run them anyway")
        if iso.mode != "root" and "readonly" not in iso.available and not self.allow_writes:
            # not root: the program keeps the CALLER's uid, so only the read-only mount stops it from
            # writing or deleting the caller's files
            return ("sandbox refused: no read-only mount namespace can be made here "
                    f"({iso.missing.get('readonly', 'unknown reason')}) and programs would run as your user, "
                    "able to change your files. Pass allow_writes=True to run them anyway")
        return None

    def _interpreter(self) -> tuple[list[str], list[str]]:
        """(argv prefix for the program, paths that must be visible to the sandbox uid)."""
        if self.site_packages:
            exe, flags = sys.executable, ["-I", "-B"]
            expose = [os.path.realpath(sys.base_prefix), os.path.abspath(sys.prefix)]
        else:  # the base interpreter itself: a venv adds nothing without site-packages
            exe, flags = os.path.realpath(sys.executable), ["-I", "-S", "-B"]
            expose = [os.path.realpath(sys.base_prefix)]
        return [exe, *flags], expose

    def _execute(
        self, code: str, mode: str, want: list[str], expect_stdout: str | None = None, missing: tuple[str, ...] = ()
    ) -> tuple[Result, dict]:
        """(result, the launcher's report: {"error", "step"} when the sandbox itself failed)."""
        root = mode == "root"
        slot = _SLOTS.acquire(self.uid_base) if root and self.uid is None else None
        uid = slot[0] if slot else self.uid if root and self.uid is not None else os.getuid()
        gid = uid if root else os.getgid()
        workdir = tempfile.mkdtemp(prefix="alignkit-sandbox-", dir=self.tmp_dir)
        try:
            with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8") as f:
                f.write(code)
            if root:
                os.chown(workdir, uid, gid)
            return self._spawn(workdir, uid, gid, mode, want, expect_stdout, missing, dedicated=slot is not None)
        finally:
            shutil.rmtree(workdir, onerror=_force_remove)
            if slot:
                _SLOTS.release(*slot)

    def _spawn(self, workdir, uid, gid, mode, want, expect_stdout, missing, dedicated) -> tuple[Result, dict]:
        """Start the launcher, collect output until exit or the wall clock, kill, sweep, classify."""
        argv, expose = self._interpreter()
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
               "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        cpu = self.cpu_seconds or math.ceil(self.timeout) + 1
        mib = 1 << 20
        limits = {
            "RLIMIT_CPU": (cpu, cpu + 1), "RLIMIT_AS": (self.memory_mb * mib,) * 2,
            "RLIMIT_FSIZE": (self.file_size_mb * mib,) * 2, "RLIMIT_NOFILE": (self.max_files,) * 2,
            "RLIMIT_NPROC": (self.max_procs,) * 2, "RLIMIT_CORE": (0, 0),
        }
        status_r, status_w = os.pipe()
        cfg = {
            "mode": mode, "want": want, "uid": uid, "gid": gid, "workdir": workdir, "expose": [*expose, workdir],
            "argv": [*argv, "main.py"], "env": env, "limits": limits, "status_fd": status_w, "parent": os.getpid(),
        }
        start = time.monotonic()
        try:
            proc = subprocess.Popen(
                _launcher_argv(cfg),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=workdir, env=env,
                start_new_session=True, close_fds=True, pass_fds=(status_w,),
            )
        except OSError as err:
            os.close(status_r)
            msg = f"sandbox: cannot start the launcher: {err}"
            return Result(False, "error", 0.0, msg, uid=uid, missing=missing), {"error": str(err), "step": "launcher"}
        finally:
            os.close(status_w)
        out, err_tail, status = _Tail(self.max_output), _Tail(self.max_output), bytearray()
        deadline, timed_out = start + self.timeout, False
        try:
            with selectors.DefaultSelector() as sel, os.fdopen(status_r, "rb", buffering=0) as status_file:
                sel.register(proc.stdout, selectors.EVENT_READ, out.add)
                sel.register(proc.stderr, selectors.EVENT_READ, err_tail.add)
                sel.register(status_file, selectors.EVENT_READ, status.extend)
                while sel.get_map():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        timed_out = True
                        break
                    for key, _ in sel.select(remaining):
                        data = os.read(key.fd, 1 << 16)
                        if data:
                            key.data(data)
                        else:
                            sel.unregister(key.fileobj)
                            if key.fileobj is status_file:  # launcher gone: grace for pipes held by strays
                                deadline = min(deadline, time.monotonic() + 0.2)
                stray = bool(sel.get_map())
        except BaseException:  # e.g. Ctrl-C while waiting: nothing of this run may outlive it
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if dedicated:
                _reap_uid(uid)
            raise
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            stream.close()
        seconds = time.monotonic() - start
        report: dict[str, Any] = {}
        for line in bytes(status).splitlines():
            with contextlib.suppress(ValueError, SyntaxError):
                report.update(ast.literal_eval(line.decode()))
        # Nothing of this run may outlive it: PID 1 of the namespace exits last; a dedicated uid is swept.
        if "pid" in report:
            _wait_gone(report["pid"])
        if dedicated and (timed_out or stray or "pid" not in want or "wait" not in report):
            _reap_uid(uid)
        res = dict(uid=uid, missing=missing, stdout=out.text())
        if "error" in report:
            return Result(False, "error", seconds, f"sandbox: {report.get('step')}: {report['error']}", **res), report
        if timed_out and "wait" not in report:
            return Result(False, "timeout", seconds, err_tail.text(), **res), report
        if "wait" not in report:
            msg = f"sandbox: the launcher died (exit {proc.returncode})\n{err_tail.text()}"
            return Result(False, "error", seconds, msg, **res), report
        return _classify(report, cpu, err_tail.text(), expect_stdout, seconds, res), report


def _classify(report: dict, cpu: int, stderr: str, expect: str | None, seconds: float, res: dict) -> Result:
    wait = report["wait"]
    last = stderr.rstrip().rsplit("\n", 1)[-1]
    if os.WIFSIGNALED(wait):
        sig = os.WTERMSIG(wait)
        status: Status = "timeout" if sig == signal.SIGXCPU or (sig == signal.SIGKILL and report["cpu"] >= cpu) \
            else "killed"
        return Result(False, status, seconds, stderr, exit_code=-sig, **res)
    code = os.WEXITSTATUS(wait)
    if code == 0:
        if expect is not None and expect not in res["stdout"]:
            note = "\nsandbox: exit 0 without the end-of-tests marker: the program stopped before its asserts ran"
            return Result(False, "failed", seconds, stderr + note, exit_code=0, **res)
        return Result(True, "passed", seconds, stderr, exit_code=0, **res)
    status = "memory" if last.startswith("MemoryError") else "failed"
    return Result(False, status, seconds, stderr, exit_code=code, **res)


def _force_remove(func: Any, path: str, exc_info: Any) -> None:
    """rmtree helper: a program may leave 0o000 directories behind (only matters when not root)."""
    with contextlib.suppress(OSError):  # never follow a link the program planted (it could point anywhere)
        if not os.path.islink(os.path.dirname(path)):
            os.chmod(os.path.dirname(path), 0o700)
        if not os.path.islink(path):
            os.chmod(path, 0o700)
    with contextlib.suppress(OSError):
        func(path)


def _missing(iso: Isolation) -> tuple[str, ...]:
    return tuple(f"{name}: {reason}" for name, reason in iso.missing.items())


_ISOLATION: dict[tuple, Isolation] = {}
_ISOLATION_LOCK = threading.Lock()


def isolation(refresh: bool = False) -> Isolation:
    """What this host allows, probed once per process: run `pass` with every mechanism, drop the one
    whose step fails, and repeat until a run passes. Not root: a user namespace first, else none."""
    key = (os.geteuid(), sys.executable)
    with _ISOLATION_LOCK:
        if refresh or key not in _ISOLATION:
            _ISOLATION[key] = _probe()
        return _ISOLATION[key]


def _probe() -> Isolation:
    if not sys.platform.startswith("linux"):
        return Isolation("none", frozenset(), {m: "Linux only" for m in MECHANISMS}, error="the sandbox needs Linux")
    probe = Sandbox(timeout=10.0)
    plans = [("root", list(MECHANISMS))] if os.geteuid() == 0 else [("userns", list(MECHANISMS)), ("none", [])]
    missing: dict[str, str] = {}
    error = "no plan ran"
    for mode, want in plans:
        while True:
            result, report = probe._execute("pass\n", mode, want)
            if result.passed:
                return Isolation(mode, frozenset(want), missing)  # type: ignore[arg-type]
            step = report.get("step")
            if step in want:
                missing[step] = report["error"]
                want.remove(step)
                if step == "mount" and "readonly" in want:
                    want.remove("readonly")
                    missing["readonly"] = "needs the mount namespace"
                continue
            if step == "userns":
                missing.update({m: f"no user namespace ({report['error']})" for m in MECHANISMS})
            error = result.stderr.strip() or f"the probe program ended with status {result.status}"
            break
    return Isolation(plans[-1][0], frozenset(), missing, error=error)  # type: ignore[arg-type]


def run_program(code: str, timeout: float = 3.0, memory_mb: int = 512, **settings: Any) -> Result:
    """Run one program in the sandbox (`Sandbox` holds the other settings)."""
    return Sandbox(timeout=timeout, memory_mb=memory_mb, **settings).run(code)


__all__ = ["Isolation", "Result", "Sandbox", "isolation", "processes_of", "run_program"]
