"""The run-directory contract (docs/architecture.md, docs/launch.md#run-directory-safety).

`--output-dir DIR` receives config.yaml, metrics.jsonl, summary.json, plots/*.png, weights as
safetensors, a README and alignkit's marker `.alignkit-run`. Work happens in the sibling
`DIR.partial/`, renamed to DIR only when the job finishes. An existing DIR is refused unless
`--overwrite` (and then only if it is an alignkit run or empty); `--resume` continues from
`DIR.partial/` with the same settings. One process at a time holds a run (a lock beside it, `DIR.lock`).

In a multi-process launch only the main process writes and locks; the others get a RunDir whose
writes are no-ops, so trainers do not need rank checks of their own.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from alignkit.errors import UserError

PARTIAL_SUFFIX = ".partial"
LOCK_SUFFIX = ".lock"
MARKER = ".alignkit-run"  # JSON {command, created_at[, diverged]}: "this directory is alignkit's"
# keys a checkpoint honours when they change on --resume (everything else is refused, see check_resume)
RESUMABLE_KEYS = ("output.", "launch.", "model.device", "train.logging_steps", "train.save_steps")
# the first word of the `command:` in the config.yaml of a run written before the marker existed
OLD_RUN_COMMANDS = frozenset({"sft", "rm", "dpo", "kto", "quickstart", "eval", "qprobe"})


def default_dir(command: str) -> Path:
    return Path("runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"


def checked_output(output_dir: str | None, overwrite: bool, command: str) -> Path:
    """The run directory of a command that does not resume (eval, rm eval, qprobe steps, quickstart):
    `output_dir` or `runs/<command>-<time>`, checked by `RunDir.check` before any work."""
    out = Path(output_dir or default_dir(command))
    RunDir.check(out, overwrite, resume=False, resumable=False)
    return out


def _nonempty(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def is_run(path: Path) -> bool:
    """Is `path` a directory alignkit wrote? It has the marker; runs written before the marker existed
    are recognised by a config.yaml naming an alignkit command beside summary.json (finished) or
    metrics.jsonl (interrupted)."""
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / MARKER).is_file():
        return True
    if not ((path / "config.yaml").is_file() and any((path / f).is_file() for f in ("summary.json", "metrics.jsonl"))):
        return False
    try:
        command = (_yaml_tree((path / "config.yaml").read_text()) or {}).get("command")
    except (OSError, UnicodeDecodeError):
        return False
    return isinstance(command, str) and command.replace("-", " ").split(" ")[0] in OLD_RUN_COMMANDS


def strict_json(obj: Any, **kwargs: Any) -> str:
    """JSON that every parser reads: NaN/±Infinity become null, tensors and paths become values."""
    return json.dumps(_finite(obj), allow_nan=False, **kwargs)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    if hasattr(obj, "tolist"):  # tensors, numpy arrays and scalars
        return _finite(obj.tolist())
    if hasattr(obj, "item"):
        return _finite(obj.item())
    return str(obj)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------ checks


def check_writable(final: Path, flag: str = "--output-dir") -> None:
    """Refuse an output path alignkit cannot create: a path component that is a regular file, or a
    parent directory it cannot write to. Probed by creating (and removing) a temporary file, since
    `os.access` answers yes to root even on a read-only mount."""
    final = Path(final)
    parent = final.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {final}: {parent} is a file, not a directory: choose another {flag}")
    try:
        with tempfile.TemporaryFile(prefix=".alignkit-probe-", dir=parent):
            pass
    except OSError as exc:
        raise UserError(f"{flag} {final}: cannot write in {parent} ({exc.strerror}): choose another {flag}") from None


def check_resume(partial: Path, config_yaml: str) -> None:
    """On --resume the checkpoint was trained with DIR.partial/config.yaml: refuse a setting it
    cannot honour (the learning rate, the data, LoRA, ...) so that config.yaml never lies.
    Changes to the keys in RESUMABLE_KEYS (where things are written, how often) are allowed."""
    import yaml

    saved_file = partial / "config.yaml"
    if not saved_file.is_file():
        return
    try:
        old, new = _flat(yaml.safe_load(saved_file.read_text()) or {}), _flat(yaml.safe_load(config_yaml) or {})
    except yaml.YAMLError:
        raise UserError(f"{saved_file} is not valid YAML: the run cannot be resumed (use --overwrite)") from None
    changed = sorted(k for k in old.keys() | new.keys()
                     if old.get(k) != new.get(k) and not any(k == a or k.startswith(a) for a in RESUMABLE_KEYS))
    if changed:
        shown = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in changed[:4])
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        raise UserError(f"--resume: {shown}{more} differ from {saved_file}; the checkpoint cannot honour them: "
                        "resume with the same settings, or start a new run (--overwrite or another --output-dir)")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict) or (prefix and not tree):
        return {prefix.rstrip("."): tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}."))
    return out


# ------------------------------------------------------------------------------------- locks


class RunLock:
    """An exclusive `flock` on `DIR.lock`, held for the run's lifetime. The OS drops it when the
    process dies (crash, kill -9), so a stale lock file never blocks anyone; the file holds the
    holder's pid for the message the second process gets."""

    _held: dict[Path, RunLock] = {}  # per process: a run checks, then opens, under one lock
    _atexit = False

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd

    @staticmethod
    def _path(final: Path) -> Path:
        return Path(final).absolute().with_name(Path(final).name + LOCK_SUFFIX)

    @staticmethod
    def _try_lock(fd: int, final: Path) -> None:
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"{final} is in use by another alignkit process (pid {holder}): wait for it to "
                            "finish or stop it, or choose another --output-dir") from None

    @classmethod
    def check_free(cls, final: Path) -> None:
        """Refuse a run another process holds, without taking (or creating) the lock."""
        import fcntl

        path = cls._path(final)
        if path in cls._held:
            return
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return  # no lock file: nobody holds the run
        cls._try_lock(fd, final)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    @classmethod
    def acquire(cls, final: Path) -> RunLock:
        """Take the run's lock (kept until `release`, or the end of the process) or refuse with the holder's pid."""
        path = cls._path(final)
        if path in cls._held:
            return cls._held[path]
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            cls._try_lock(fd, final)
            try:  # the holder may have released and removed the file between our open and flock
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        if not cls._atexit:
            import atexit

            # also after an error or Ctrl-C: no DIR.lock left behind
            cls._atexit = bool(atexit.register(cls.release_all))
        lock = cls._held[path] = cls(path, fd)
        return lock

    @classmethod
    def release(cls, final: Path) -> None:
        cls._release(cls._path(final))

    @classmethod
    def release_all(cls) -> None:
        for path in list(cls._held):
            cls._release(path)

    @classmethod
    def _release(cls, path: Path) -> None:
        lock = cls._held.pop(path, None)
        if lock is not None:
            path.unlink(missing_ok=True)  # while still holding it: a waiter re-checks the inode
            os.close(lock.fd)


# --------------------------------------------------------------------------------- run dir


class RunDir:
    """A run directory being written. Create with `RunDir.open(...)` once the inputs are validated."""

    def __init__(self, final: Path, is_main: bool = True, resumed: bool = False):
        self.final = final
        self.work = final.with_name(final.name + PARTIAL_SUFFIX)
        self.is_main = is_main
        self.resumed = resumed

    # -- life cycle -----------------------------------------------------------------------------
    @staticmethod
    def check(final: Path, overwrite: bool, resume: bool, config_yaml: str | None = None,
              resumable: bool = True) -> None:
        """Refuse what the contract refuses, BEFORE any expensive work; writes nothing. An output path
        that cannot be written, a run another process holds, an existing DIR without --overwrite,
        --overwrite onto something that is not an alignkit run, --resume without DIR.partial or with
        settings the checkpoint cannot honour (when `config_yaml` is given)."""
        final = Path(final)
        partial = final.with_name(final.name + PARTIAL_SUFFIX)
        check_writable(final)
        RunLock.check_free(final)
        diverged = _marker(partial).get("diverged")
        if diverged and not overwrite:  # resuming would repeat it: the settings cannot change on --resume
            raise UserError(f"the run at {partial} diverged at step {diverged.get('step')}: start again with "
                            "--overwrite and a lower learning rate")
        if resume:
            if not partial.is_dir():
                if _nonempty(final):
                    raise UserError(f"{final} already finished: nothing to resume (use a new --output-dir)")
                raise UserError(f"nothing to resume: {partial} does not exist (drop --resume to start a run)")
            if config_yaml is not None:
                check_resume(partial, config_yaml)
            return
        if _nonempty(final) and not overwrite:
            raise UserError(f"{final} already exists: pass --overwrite to replace it, or choose --output-dir")
        if _nonempty(partial) and not overwrite:
            todo = ("pass --resume to continue it or --overwrite to restart" if resumable
                    else "pass --overwrite to restart")
            raise UserError(f"an interrupted run is at {partial}: {todo}")
        for path in (final, partial):
            if overwrite and _nonempty(path) and not is_run(path):
                raise UserError(f"{path} is not an alignkit run (no {MARKER}): --overwrite replaces only runs; "
                                "choose another --output-dir (alignkit never deletes your files)")

    @classmethod
    def open(
        cls, final: str | Path, overwrite: bool, resume: bool, config_yaml: str, is_main: bool = True
    ) -> RunDir:
        final = Path(final)
        if is_main:  # the other ranks would see the main rank's fresh DIR.partial
            check_writable(final)  # before the lock file is made beside the run
            RunLock.acquire(final)  # held until finish (or the process ends): one process per run
            try:
                cls.check(final, overwrite, resume, config_yaml)
            except UserError:
                RunLock.release(final)
                raise
        run = cls(final, is_main=is_main, resumed=resume)
        if is_main:
            if not resume and run.work.exists():
                shutil.rmtree(run.work)  # an alignkit run or empty: check() refused anything else
            (run.work / "plots").mkdir(parents=True, exist_ok=True)
            if not resume or not (run.work / MARKER).exists():
                command = (_yaml_tree(config_yaml) or {}).get("command")
                atomic_write_text(run.work / MARKER, strict_json(
                    {"command": command, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S")}))
            atomic_write_text(run.work / "config.yaml", config_yaml)
            if not resume:
                (run.work / "metrics.jsonl").write_text("")
        return run

    def finish(self, summary: dict[str, Any], readme: str | None = None) -> Path:
        """Write summary.json (and README.md), then move DIR.partial -> DIR atomically."""
        if not self.is_main:
            return self.final
        summary = {**summary, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_text(self.work / "summary.json", strict_json(summary, indent=2))
        if readme:
            atomic_write_text(self.work / "README.md", readme)
        if self.final.exists():  # --overwrite: swap the old one out only now that the new one is complete
            if _nonempty(self.final) and not is_run(self.final):  # appeared while we trained
                raise UserError(f"{self.final} is not an alignkit run; the finished run is kept at {self.work}")
            trash = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.replaced-", dir=self.final.parent))
            os.replace(self.final, trash / self.final.name)
            os.replace(self.work, self.final)
            shutil.rmtree(trash, ignore_errors=True)  # ours: made just now, holds only the old run
        else:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.work, self.final)
        RunLock.release(self.final)
        return self.final

    def discard(self) -> None:
        """Give up a fresh run that stopped before any work (e.g. no row was left): remove the DIR.partial
        this process just made and release the lock, so that nothing is left that looks like a run.
        A resumed run is never discarded."""
        if self.is_main and not self.resumed:
            shutil.rmtree(self.work, ignore_errors=True)  # ours: opened by this process, nothing trained
            RunLock.release(self.final)

    def truncate_metrics(self, step: int) -> None:
        """On resume: keep metrics.jsonl's rows up to `step` (the checkpoint's), so no step is logged twice."""
        if self.is_main:
            kept = [m for m in self.read_metrics() if int(m.get("step", 0)) <= step]
            atomic_write_text(self.work / "metrics.jsonl", "".join(strict_json(m) + "\n" for m in kept))

    def mark(self, **facts: Any) -> None:
        """Add facts to the marker of DIR.partial (e.g. `diverged={...}`), for whoever looks at it next."""
        if not self.is_main:
            return
        atomic_write_text(self.work / MARKER, strict_json({**_marker(self.work), **facts}))

    # -- writing --------------------------------------------------------------------------------
    def log(self, metrics: dict[str, Any]) -> None:
        if self.is_main:
            with open(self.work / "metrics.jsonl", "a") as fh:
                fh.write(strict_json(metrics) + "\n")

    def path(self, *parts: str) -> Path:
        """A path inside the work directory (the final location once finished)."""
        return self.work.joinpath(*parts)

    def read_metrics(self) -> list[dict[str, Any]]:
        f = self.work / "metrics.jsonl"
        if not f.exists():
            return []
        return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def _marker(path: Path) -> dict[str, Any]:
    try:
        tree = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return tree if isinstance(tree, dict) else {}


def _yaml_tree(text: str) -> dict[str, Any] | None:
    import yaml

    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    return tree if isinstance(tree, dict) else None


def checkpoint_complete(ckpt: Path) -> bool:
    """Did transformers finish writing this checkpoint? It writes the weights, optimizer.pt,
    scheduler.pt and the RNG state first and trainer_state.json LAST (Trainer._save_checkpoint), so a
    kill while saving leaves no (or a truncated) trainer_state.json."""
    try:
        json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def last_checkpoint(work: Path) -> str | None:
    """The newest complete `checkpoint-N` directory under work/checkpoints, as transformers writes them."""
    ckpt_root = work / "checkpoints"
    if not ckpt_root.is_dir():
        return None
    ckpts = [p for p in ckpt_root.iterdir() if p.name.startswith("checkpoint-") and p.name[11:].isdigit()]
    ckpts = [p for p in ckpts if checkpoint_complete(p)]
    if not ckpts:
        return None
    return str(max(ckpts, key=lambda p: int(p.name[11:])))


def parse_named(items: list[str], what: str = "policy", short_names: bool = False) -> dict[str, str]:
    """CLI items `SPEC` or `NAME=SPEC` -> {name: spec}; an unnamed item is named by itself (or, with
    `short_names`, by its last path part). Names must be unique. Used by `eval` and `qprobe eval`."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, spec = str(item).partition("=")
        if not (sep and name.strip() and spec.strip() and "/" not in name):
            spec = str(item)
            name = (Path(spec.rstrip("/")).name or spec) if short_names else spec.rstrip("/")
        name, spec = name.strip(), spec.strip()
        if not spec:
            raise UserError(f"{what} {item!r} is empty: pass SPEC or NAME=SPEC")
        if name in out:
            raise UserError(f"{what} name '{name}' is given twice: name them apart with NAME=SPEC")
        out[name] = spec
    return out


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend (no display needed); import it through here."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike) -> Path:
    """Lay out, save (110 dpi, parent folders made) and close a matplotlib figure; returns the path."""
    plt = pyplot()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_readme(title: str, *paragraphs: str | None) -> str:
    """The README.md of a run directory: a title and the paragraphs that are given (None/"" skipped)."""
    return f"# {title}\n\n" + "\n\n".join(p for p in paragraphs if p) + "\n"


def interrupt_hint(run: RunDir, where: str, checkpoint: str | None, resumable: bool = True,
                   no_checkpoint: str = "") -> str:
    """The one line printed on Ctrl-C: where the run stopped and how to go on (shared by the
    transformers trainers and the explicit loops)."""
    if not resumable:
        return f"interrupted at {where}: the unfinished run is left at {run.work}; start again with --overwrite"
    if checkpoint:
        return (f"interrupted at {where}: resume with the same command plus --resume (it continues from "
                f"{checkpoint} in {run.work})")
    return (f"interrupted at {where}, before any checkpoint{no_checkpoint}: the same command plus --resume starts "
            "it again from the beginning")
