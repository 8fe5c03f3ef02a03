"""alignkit.sandbox (programs run out of process under limits and namespaces) and alignkit.code_reward
(Q-probe's code reward on top of it).

Every adversarial program is bounded (a loop count, a sleep, a 1-2 s wall clock), so a broken
sandbox costs seconds and a few GiB at most, never the machine. Where this host lacks a mechanism
(`isolation().missing`) a test asserts the documented fallback instead; `test_degraded_*` simulate
such hosts here by hiding mechanisms from the launcher.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import pytest

from alignkit import data, sandbox
from alignkit.code_reward import BODY_STOP, PROGRAM_STOP, CodeScorer, build_program, cut_at_stop
from alignkit.errors import UserError
from alignkit.sandbox import Sandbox, isolation

MBPP = Path(__file__).parent / "fixtures" / "mbpp.jsonl"
# Adversarial programs print their work dir first: every process they start carries HOME=<it>.
PRELUDE = "import os, sys, time\nos.write(1, ('HOME=' + os.environ['HOME'] + '\\n').encode())\n"
# A child that leaves the process group and sleeps (20 s at most if it escaped), a parent that sleeps.
DAEMON = PRELUDE + "if os.fork() == 0:\n    os.setsid()\n    time.sleep(20)\n    os._exit(0)\ntime.sleep(20)\n"
DOUBLING = """kids, ok = [], True
for i in range(11):
    try:
        pid = os.fork()
    except BlockingIOError:
        ok = False
        break
    kids = [] if pid == 0 else kids + [pid]
time.sleep(0.5)
for pid in kids:
    ok = os.waitpid(pid, 0)[1] == 0 and ok
os._exit(0 if ok else 1)
"""
# At most 2000 children, each sleeping 0.5 s, if RLIMIT_NPROC were broken.
FORKS = PRELUDE + "for i in range(2000):\n    if os.fork() == 0:\n        time.sleep(0.5)\n        os._exit(0)\n"

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox is Linux only")


@pytest.fixture(scope="module")
def iso():
    found = isolation()
    assert found.error is None, f"the sandbox cannot run here: {found.error}"
    return found


@pytest.fixture(scope="module")
def box(iso):
    """The default sandbox with a short wall clock; without a network namespace it must be allowed
    explicitly (the network tests check the refusal itself)."""
    return Sandbox(timeout=2.0, allow_network="net" not in iso.available)


def _fake(iso, drop: set[str]) -> sandbox.Isolation:
    return dataclasses.replace(
        iso, available=iso.available - drop, missing={**iso.missing, **{m: "simulated" for m in drop}}
    )


def _leftovers(result) -> list[int]:
    """Live processes started by the program (environment holds its HOME), plus, as root, any of its uid."""
    home = result.stdout.split("HOME=", 1)[1].split("\n", 1)[0]
    needle = f"HOME={home}\0".encode()
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/environ", "rb") as f:
                    if needle in f.read():
                        pids.append(int(name))
            except OSError:
                pass
    if os.geteuid() == 0 and result.uid:
        pids += sandbox.processes_of(result.uid)
    return pids


def _children() -> list[str]:
    """Children of this test process (every thread), i.e. launchers not waited for."""
    kids = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                kids += f.read().split()
        except FileNotFoundError:  # a kernel without CONFIG_PROC_CHILDREN, or the thread just ended
            pass
    return kids


# --------------------------------------------------------------------------- building programs


def test_body_stops_cut_only_where_a_top_level_statement_starts():
    head = 'def add(a, b):\n    """Add two numbers."""\n'

    def cut(completion):
        return cut_at_stop(completion, BODY_STOP, head)

    assert cut("    return a + b\nprint(add(1, 2))\n") == "    return a + b"
    assert cut("    return a + b\n\ndef other():\n    pass\n") == "    return a + b\n"
    assert cut('    return a + b\n"""\nprose after the function') == "    return a + b"
    assert cut("    return a + b\n# a comment after the function\nfoo()\n") == "    return a + b"
    # a column-0 comment inside the body does not end it; the one after the body does
    body = "    x = a\n# column-0 comment in the body\n    return x + b"
    assert cut(body + "\n# after\nfoo()\n") == body
    # inside a string, inside brackets, after a backslash: no new statement
    in_string = "    s = '''\nif this is text\n'''\n    return s"
    assert cut(in_string + "\nif True:\n    pass\n") == in_string
    assert cut("    return (a +\nprint(b))\n") == "    return (a +\nprint(b))\n"
    assert cut("    return a + \\\nprint\n") == "    return a + \\\nprint\n"
    # indented lines never match "\n<stop>"; no stop at all keeps everything
    assert cut("    if a:\n        return b\n    print(a)\n    return a\n") == (
        "    if a:\n        return b\n    print(a)\n    return a\n"
    )
    # text that cannot be tokenised (an unterminated docstring): any match at column 0 counts
    assert cut('    return a\n"""never closed\ndef g():\n') == "    return a"


def test_program_stops_keep_helpers_and_cut_test_scaffolding():
    completion = (
        "import math\r\ndef helper(n):\r\n    return n\r\ndef f(n):\r\n    return helper(n)\r\n"
        "assert f(1) == 1\r\nprint(f(2))"
    )
    assert cut_at_stop(completion, PROGRAM_STOP) == (
        "import math\r\ndef helper(n):\r\n    return n\r\ndef f(n):\r\n    return helper(n)\r"
    )
    assert cut_at_stop("def f():\n    return 1\n[DONE] more", PROGRAM_STOP) == "def f():\n    return 1\n"
    assert cut_at_stop("def f():\n    return 1\n```\nExplanation", PROGRAM_STOP) == "def f():\n    return 1"


def test_build_program_layout():
    program = build_program(
        "def f(x):\n", "    return x * 2\nprint(f(1))", ["assert f(1) == 2", "assert f(2) == 4"],
        setup="import math", sentinel="END",
    )
    assert program == (
        "def f(x):\n    return x * 2\nimport math\nassert f(1) == 2\nassert f(2) == 4\n"
        "__import__('os').write(1, b'END\\n')\n"
    )
    program = build_program("a prose prompt", "def f(x):\n    return x", ["assert f(1) == 1"], PROGRAM_STOP,
                            include_prompt=False)
    assert program == "def f(x):\n    return x\nassert f(1) == 1\n"


# --------------------------------------------------------------------------- the scorer on MBPP


@linux_only
def test_mbpp_correct_solutions_score_one_and_wrong_ones_zero(box):
    ds, _ = data.load(str(MBPP))
    scorer = CodeScorer.from_source(str(MBPP), sandbox=box)
    good = scorer.score(ds["prompt"], ds["completion"])
    assert good.members.tolist() == [[1.0, 1.0, 1.0]], [r.stderr for r in scorer.last_results]
    assert good.mean.tolist() == [1.0, 1.0, 1.0] and good.uncertainty.tolist() == [0.0, 0.0, 0.0]
    wrong = [
        "def similar_elements(a, b):\n    return ()",
        "def is_not_prime(n):\n    return False",
        "def reverse_words(s):\r\n  return s",
    ]
    bad = scorer.score(ds["prompt"], wrong)
    assert bad.members.tolist() == [[0.0, 0.0, 0.0]]
    assert all(r.status == "failed" and "AssertionError" in r.stderr for r in scorer.last_results)


@linux_only
def test_exiting_before_the_asserts_is_not_a_pass(box):
    ds, _ = data.load(str(MBPP))
    scorer = CodeScorer.from_source(str(MBPP), sandbox=box)
    hacks = ["import sys\nsys.exit(0)", "import os\nos._exit(0)", ds["completion"][2] + "\nraise SystemExit(0)"]
    assert scorer.score(ds["prompt"], hacks).members.tolist() == [[0.0, 0.0, 0.0]]
    assert all("before its asserts ran" in r.stderr for r in scorer.last_results)


@linux_only
def test_scorer_input_errors(box, tmp_path):
    scorer = CodeScorer({"def f(x):\n": ["assert f(1) == 1"]}, sandbox=box)
    with pytest.raises(UserError, match="no tests for prompt"):
        scorer.score(["def g(x):\n"], ["    return x\n"])
    with pytest.raises(UserError, match="1 prompts but 2 completions"):
        scorer.score(["def f(x):\n"], ["a", "b"])
    with pytest.raises(UserError, match="no tasks"):
        CodeScorer({}, sandbox=box)
    with pytest.raises(UserError, match="assert lines"):  # no assert would pass every program
        CodeScorer({"def f(x):\n": []}, sandbox=box)
    plain = tmp_path / "plain.jsonl"
    plain.write_text('{"prompt": "p", "completion": "c"}\n')
    with pytest.raises(UserError, match="test_list"):
        CodeScorer.from_source(str(plain), sandbox=box)
    with pytest.raises(UserError, match="memory_mb"):
        Sandbox(memory_mb=1)


# --------------------------------------------------------------------------- adversarial programs


@linux_only
def test_infinite_loop_and_daemons_are_killed_at_the_time_limit(iso):
    box = Sandbox(timeout=1.0, allow_network="net" not in iso.available)
    spin = box.run(PRELUDE + "while True:\n    pass\n")
    assert spin.status == "timeout" and not spin.passed
    assert 1.0 <= spin.seconds < 5.0  # killed at the 1 s wall clock (slack for a loaded machine)
    assert _leftovers(spin) == [] and _children() == []
    daemon = box.run(DAEMON)
    assert daemon.status == "timeout"
    assert _leftovers(daemon) == [] and _children() == []


@linux_only
def test_cpu_time_limit(iso):
    # a generous wall clock: on a loaded machine one CPU-second can take several wall seconds. The exit code
    # proves the CPU limit fired (a wall-clock kill leaves exit_code None and fails this test).
    box = Sandbox(timeout=15.0, cpu_seconds=1, allow_network="net" not in iso.available)
    result = box.run("while True:\n    pass\n")
    assert result.status == "timeout" and result.exit_code in (-24, -9)  # SIGXCPU, then SIGKILL at the hard limit
    assert result.seconds < 15.0


@linux_only
def test_huge_allocations_fail_with_memory_status(iso):
    # a generous wall clock: touching 512 MiB takes 1-2 s on a loaded 2-core machine
    box = Sandbox(timeout=10.0, allow_network="net" not in iso.available)
    at_once = box.run("x = bytearray(8 << 30)\n")  # 8 GiB, over RLIMIT_AS
    assert at_once.status == "memory" and not at_once.passed
    # growing: at most 48 x 64 MiB = 3 GiB actually touched if the limit were broken
    growing = box.run("chunks = []\nfor _ in range(48):\n    chunks.append(b'\\x01' * (64 << 20))\n")
    assert growing.status == "memory" and not growing.passed


@linux_only
def test_fork_storm_is_stopped_and_leaves_nothing(box):
    serial = box.run(FORKS)
    assert not serial.passed and serial.status == "failed"
    assert "BlockingIOError" in serial.stderr
    assert _leftovers(serial) == [] and _children() == []
    # doubling, at most 2**11 = 2048 processes; each waits for its children, so the first process
    # exits 0 only if every fork in the tree succeeded
    doubling = box.run(PRELUDE + DOUBLING)
    assert not doubling.passed and doubling.status == "failed"
    assert _leftovers(doubling) == [] and _children() == []


@linux_only
def test_files_outside_the_work_dir_are_not_written_or_deleted(box, iso):
    outside = tempfile.mkdtemp(prefix="alignkit-sandbox-test-")  # ours, mode 0755
    try:
        os.chmod(outside, 0o755)
        victim = Path(outside, "victim.txt")
        victim.write_text("keep")
        shared = Path(outside, "shared")  # world-writable: only the read-only mount protects it
        shared.mkdir()
        shared.chmod(0o777)
        create = box.run(f"open({outside + '/new.txt'!r}, 'w').write('x')\n")
        delete = box.run(f"import os\nos.remove({str(victim)!r})\n")
        create_shared = box.run(f"open({str(shared / 'new.txt')!r}, 'w').write('x')\n")
        inside = box.run("import tempfile\nopen('mine.txt', 'w').write('x')\nassert open('mine.txt').read() == 'x'\n"
                         "tempfile.mkstemp()\n")
        assert inside.passed, inside.stderr  # the work dir (and TMPDIR) stay writable
        assert victim.read_text() == "keep"
        if "readonly" in iso.available:
            for result in (create, delete, create_shared):
                assert not result.passed and "Read-only file system" in result.stderr
            assert not Path(outside, "new.txt").exists() and not (shared / "new.txt").exists()
        elif iso.mode == "root":  # documented fallback: file permissions against an unprivileged uid only
            assert not create.passed and not delete.passed and not Path(outside, "new.txt").exists()
            assert create_shared.passed and (shared / "new.txt").exists()
        else:  # documented fallback: the caller's own uid, its own files are writable
            assert create.passed and delete.passed
    finally:
        shutil.rmtree(outside, ignore_errors=True)


@linux_only
def test_network_is_unreachable(iso):
    strict = Sandbox(timeout=2.0)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.3)
        port = server.getsockname()[1]
        result = strict.run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).close()\n")
        assert not result.passed
        with pytest.raises(TimeoutError):
            server.accept()
    if "net" in iso.available:
        assert result.status == "failed" and "Network is unreachable" in result.stderr
    else:  # documented policy: refuse rather than run with the host's network
        assert result.status == "error" and "allow_network=True" in result.stderr
        with pytest.raises(UserError, match="allow_network"):
            CodeScorer({"p": ["assert True"]}, sandbox=strict)


@linux_only
def test_parent_environment_is_not_visible(box, monkeypatch):
    secret = "hunter2-" + secrets.token_hex(4)
    monkeypatch.setenv("ALIGNKIT_SANDBOX_SECRET", secret)
    code = f"""import os
assert "ALIGNKIT_SANDBOX_SECRET" not in os.environ
assert {secret!r} not in repr(dict(os.environ))
assert sorted(os.environ) == ["HOME", "LANG", "LC_ALL", "PATH", "TMPDIR"], sorted(os.environ)
try:
    leaked = open("/proc/{os.getpid()}/environ", "rb").read()
except OSError:
    leaked = b""
assert {secret.encode()!r} not in leaked
"""
    result = box.run(code)
    assert result.passed, result.stderr


@linux_only
def test_mechanisms_applied_on_this_host(box, iso):
    """What the program sees; each mechanism this host lacks is reported in Result.missing."""
    code = """import os, socket
status = open("/proc/self/status").read()
root_line = next(line for line in open("/proc/self/mountinfo") if line.split()[4] == "/")
print(os.getuid(), os.getpid(), os.getgroups(), socket.if_nameindex(), root_line.split()[5], sep="|")
assert "CapEff:\\t0000000000000000" in status and "NoNewPrivs:\\t1" in status
try:
    os.setuid(0)
except PermissionError:
    pass
else:
    raise SystemExit("setuid(0) worked")
"""
    result = box.run(code)
    assert result.passed, result.stderr
    uid, pid, groups, interfaces, root_opts = result.stdout.strip().split("|")
    assert set(result.missing) == {f"{m}: {why}" for m, why in iso.missing.items()}
    if os.geteuid() == 0:
        assert iso.mode == "root" and int(uid) == result.uid != 0 and groups == "[]"
    if "pid" in iso.available:
        assert pid == "2"  # under the namespace's init
    if "net" in iso.available:
        assert interfaces == "[(1, 'lo')]"
    if "readonly" in iso.available:
        assert root_opts.split(",")[0] == "ro"
    print("isolation on this host:", iso)


@linux_only
def test_output_is_captured_and_truncated(iso):
    box = Sandbox(timeout=5.0, max_output=1000, allow_network="net" not in iso.available)
    result = box.run("import sys\nsys.stdout.write('x' * 10**6 + 'END')\nsys.stderr.write('y' * 10**6)\n")
    assert result.passed
    assert result.stdout.endswith("xEND") and "bytes dropped" in result.stdout and len(result.stdout) < 1100
    assert len(result.stderr) < 1100


@linux_only
def test_parallel_scoring(iso):
    prompts = [f"def f{i}(x):\n" for i in range(32)]
    tasks = {p: [f"assert f{i}({i}) == {2 * i}"] for i, p in enumerate(prompts)}
    completions = [
        "    __import__('time').sleep(0.1)\n" + ("    return x * 2\n" if i % 2 == 0 else "    return x * 2 + 1\n")
        for i in range(32)
    ]
    scorer = CodeScorer(tasks, sandbox=Sandbox(workers=8, allow_network="net" not in iso.available))
    start = time.monotonic()
    scores = scorer.score(prompts, completions)
    wall = time.monotonic() - start
    assert scores.members.tolist() == [[1.0 if i % 2 == 0 else 0.0 for i in range(32)]]
    sequential = sum(r.seconds for r in scorer.last_results)
    assert wall < 0.6 * sequential, (wall, sequential)
    assert len({r.uid for r in scorer.last_results}) > 1  # concurrent sandboxes get distinct uids


@linux_only
def test_adversarial_completions_score_zero(iso):
    """Each completion would pass the assert if its attack went through; all must score 0."""
    outside = tempfile.mkdtemp(prefix="alignkit-sandbox-test-")
    os.chmod(outside, 0o777)  # world-writable: only the read-only mount protects it
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.3)
        port = server.getsockname()[1]
        attacks = {
            "control": "",
            "loop": "    while True:\n        pass\n",
            "memory": "    hog = bytearray(8 << 30)\n",
            "forks": "    import os, time\n    for _ in range(2000):\n        if os.fork() == 0:\n"
                     "            time.sleep(0.5)\n            os._exit(0)\n",
            "network": f"    import socket\n    socket.create_connection(('127.0.0.1', {port}), timeout=1).close()\n",
            "file": f"    open({outside + '/x'!r}, 'w').write('x')\n",
        }
        scorer = CodeScorer({"def f(x):\n": ["assert f(1) == 2"]},
                            sandbox=Sandbox(timeout=1.5, workers=6, allow_network="net" not in iso.available))
        try:
            scores = scorer.score(["def f(x):\n"] * len(attacks), [a + "    return x * 2\n" for a in attacks.values()])
        finally:
            shutil.rmtree(outside, ignore_errors=True)
        with pytest.raises(TimeoutError):
            server.accept()
    statuses = dict(zip(attacks, (r.status for r in scorer.last_results)))
    expected = [1.0] + [0.0] * (len(attacks) - 1)
    if "net" not in iso.available:  # documented fallback (allowed explicitly here): the network is reachable
        expected[list(attacks).index("network")] = 1.0
    if "readonly" not in iso.available:  # documented fallback: world-writable directories are writable
        expected[list(attacks).index("file")] = 1.0
    assert scores.members.tolist() == [expected], statuses
    assert statuses["loop"] == "timeout" and statuses["memory"] == "memory"


# --------------------------------------------------------------------------- simulated weaker hosts


@linux_only
def test_degraded_no_network_namespace_refuses_unless_allowed(iso, monkeypatch):
    monkeypatch.setattr(sandbox, "isolation", lambda refresh=False: _fake(iso, {"net"}))
    refused = Sandbox().run("print('hi')\n")
    assert refused.status == "error" and "allow_network=True" in refused.stderr
    assert "net: simulated" in refused.missing
    with pytest.raises(UserError, match="no network namespace"):
        CodeScorer({"p": ["assert True"]})
    with socket.socket() as server:  # allowed: the documented hole, the host's network is reachable
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(3)
        port = server.getsockname()[1]
        allowed = Sandbox(allow_network=True).run(
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).close()\n"
        )
        assert allowed.passed, allowed.stderr
        server.accept()[0].close()


@linux_only
def test_degraded_no_pid_namespace_still_leaves_nothing(iso, monkeypatch):
    monkeypatch.setattr(sandbox, "isolation", lambda refresh=False: _fake(iso, {"pid"}))
    box = Sandbox(timeout=1.0, allow_network="net" not in iso.available)
    result = box.run(DAEMON)
    assert result.status == "timeout"
    if iso.mode == "root":  # the process group is killed, then every process of the dedicated uid
        assert _leftovers(result) == []
    else:  # documented: without a PID namespace or a uid to sweep, a setsid() daemon survives
        for pid in _leftovers(result):
            os.kill(pid, 9)


@linux_only
def test_degraded_no_read_only_mount(iso, monkeypatch):
    monkeypatch.setattr(sandbox, "isolation", lambda refresh=False: _fake(iso, {"readonly"}))
    box = Sandbox(timeout=2.0, allow_network="net" not in iso.available, allow_writes=True)
    outside = tempfile.mkdtemp(prefix="alignkit-sandbox-test-")
    try:
        os.chmod(outside, 0o755)
        shared = Path(outside, "shared")
        shared.mkdir()
        shared.chmod(0o777)
        private = box.run(f"open({outside + '/new.txt'!r}, 'w').write('x')\n")
        public = box.run(f"open({str(shared / 'new.txt')!r}, 'w').write('x')\n")
        assert "readonly: simulated" in public.missing
        assert public.passed and (shared / "new.txt").exists()  # documented: world-writable stays writable
        if iso.mode == "root":
            assert not private.passed and "Permission denied" in private.stderr
    finally:
        shutil.rmtree(outside, ignore_errors=True)


@linux_only
@pytest.mark.skipif(not sys.platform.startswith("linux") or "net" not in sandbox.isolation().available,
                    reason="load_scorer's default sandbox refuses to run without a network namespace")
def test_load_scorer_mbpp_spec_runs_the_tests_sandboxed():
    from alignkit import data
    from alignkit.rewards import load_scorer

    scorer = load_scorer(f"mbpp:{MBPP}")
    ds, _ = data.load(str(MBPP))
    prompts = list(ds["prompt"])
    good = list(ds["completion"])
    got = scorer.score(prompts * 2, good + ["def f():\n    return 0\n"] * len(good)).mean
    assert got.tolist() == [1.0] * len(good) + [0.0] * len(good)


@linux_only
def test_not_root_without_read_only_mount_is_refused_unless_allowed(iso, monkeypatch):
    """Not root and no read-only mount: programs would run as the caller and could change the caller's files."""
    fake = sandbox.Isolation("userns", iso.available - {"readonly"}, {**iso.missing, "readonly": "test"})
    monkeypatch.setattr(sandbox, "isolation", lambda refresh=False: fake)
    refused = Sandbox(timeout=2.0, allow_network=True).run("pass\n")
    assert refused.status == "error" and "allow_writes" in refused.stderr


def test_code_scorer_retries_then_raises_on_sandbox_errors(monkeypatch):
    from alignkit.code_reward import CodeScorer
    from alignkit.sandbox import Result

    calls = []

    class Broken(Sandbox):
        def run_many(self, codes, expect=None):
            calls.append(len(codes))
            return [Result(False, "error", 0.0, "sandbox: launcher: EAGAIN") for _ in codes]

    scorer = CodeScorer({"p": ["assert True"]}, sandbox=Broken())
    with pytest.raises(UserError, match="could not run 1 of 1 programs"):
        scorer.score(["p"], ["x = 1\n"])
    assert calls == [1, 1]  # ran, retried once, then refused to score 0


def test_launcher_is_a_standalone_stdlib_file_run_by_the_child():
    """The launcher is a real file (`_sandbox_launcher.py`) the child interpreter runs with -I -S -B, not
    source text shipped from this process: it may import the standard library only."""
    import ast

    argv = sandbox._launcher_argv({"status_fd": 3})
    assert argv[1:4] == ["-I", "-S", "-B"] and Path(argv[4]).name == "_sandbox_launcher.py"
    tree = ast.parse(Path(argv[4]).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported and imported <= set(sys.stdlib_module_names), imported - set(sys.stdlib_module_names)
    assert not hasattr(sandbox, "_launcher_main")
