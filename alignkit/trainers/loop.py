"""The base of an explicit training loop: for trainers that are not a transformers `Trainer`.

`Loop` gives such a trainer (the Q-probe fit today; PPO and SPPO next) what every run needs and
nothing else: its run directory (`runs.RunDir`), the metrics stream, a progress bar, checkpoints
it resumes from bit-exactly, the process's rank, wall time split by named phase, and a guard that
stops a run whose loss or weights are no longer finite. The trainer keeps its own `for` loop;
docs/loop.md shows a whole one.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alignkit.errors import TrainingDiverged, UserError
from alignkit.launch import rank_info
from alignkit.runs import RunDir, atomic_write_text, interrupt_hint

CHECKPOINTS = "checkpoints"  # inside the run's work directory: checkpoints/step-N/
STATE_FILE = "state.pt"
COMPLETE = "COMPLETE"  # written last, before the rename: a step-N without it is never resumed from


class Loop:
    """One run of an explicit loop. `loop.step` counts the loop's own steps (an optimiser step, an
    epoch, a PPO iteration: the trainer's choice), from 0 to `total`; `loop.stats` holds running
    statistics (plain numbers, tensors, lists, dicts) that checkpoints keep and resume restores."""

    def __init__(self, run: RunDir, total: int, *, desc: str = "training", unit: str = "step",
                 progress: bool = True, console: Any | None = None, keep: int = 2, resumable: bool = True):
        self.run, self.total, self.desc, self.unit, self.keep = run, total, desc, unit, keep
        self.resumable = resumable  # False: the trainer takes no --resume (Ctrl-C says --overwrite)
        self.sharded = False  # True: FSDP-sharded objects; every rank saves its own shards (see `save`)
        self.rank = rank_info()
        self.step = 0
        self.stats: dict[str, Any] = {}
        self.times: dict[str, float] = {}
        self._console = console
        self._show = progress and run.is_main
        self._bar: Any = None
        self._task: Any = None

    @classmethod
    def open(cls, final: str | Path, *, overwrite: bool, resume: bool, config_yaml: str, total: int,
             **kwargs: Any) -> Loop:
        """Open the run directory (`RunDir.open`; only the main rank writes) and the loop on it."""
        run = RunDir.open(final, overwrite, resume, config_yaml, is_main=rank_info()["is_main"])
        return cls(run, total, **kwargs)

    # -- progress ---------------------------------------------------------------------------------
    def __enter__(self) -> Loop:
        if self._show:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                 console=self._console or Console(stderr=True), transient=True)
            self._bar.start()
            self._task = self._bar.add_task(self.desc, total=self.total, completed=self.step, info="")
        return self

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: Any) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if kind is KeyboardInterrupt and self.run.is_main:
            last = latest_checkpoint(self.run.work)
            self._say(interrupt_hint(self.run, f"{self.unit} {self.step} of {self.total}",
                                     last and f"the checkpoint {last.name}", resumable=self.resumable))

    def advance(self, info: str = "") -> None:
        """One step done: `loop.step += 1` and the progress bar moves (`info`: text shown beside it)."""
        self.step += 1
        if self._bar is not None:
            self._bar.update(self._task, completed=self.step, info=info)

    def note(self, info: str) -> None:
        """Show `info` beside the progress bar without a step (e.g. "sampled chunk 3/10")."""
        if self._bar is not None:
            self._bar.update(self._task, info=info)

    def set_total(self, total: int) -> None:
        """Change `total` (a loop whose length is known only as it goes, e.g. SPPO's steps per iteration)."""
        self.total = total
        if self._bar is not None:
            self._bar.update(self._task, total=total)

    def _say(self, msg: str) -> None:
        from rich.console import Console
        from rich.markup import escape

        (self._console or Console(stderr=True)).print(f"[dim]{escape(self.desc)}:[/dim] {escape(msg)}",
                                                      highlight=False, soft_wrap=True)  # one line, copyable

    # -- time split and metrics -------------------------------------------------------------------
    @contextlib.contextmanager
    def timer(self, name: str) -> Iterator[None]:
        """`with loop.timer("rollout"): ...` adds the block's wall seconds to `loop.times["rollout"]`."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0

    def log(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Append one row to metrics.jsonl: `step`, the metrics, and `time_<name>_s` so far per timer; the
        same row goes to the tracker of `--report-to` (`tracking.log`) when one was chosen."""
        from alignkit import tracking

        row = {"step": self.step, **metrics, **{f"time_{k}_s": v for k, v in self.times.items()}}
        self.run.log(row)
        tracking.log(self.run, row)
        return row

    # -- the non-finite guard ---------------------------------------------------------------------
    def guard(self, loss: float | torch.Tensor | None = None, *modules: torch.nn.Module) -> None:
        """Stop the run (TrainingDiverged: one line, exit 2, DIR.partial left unfinished) when `loss` or a
        parameter of `modules` is NaN or infinite. The loss check is cheap; call it every step. The
        weight check reads every parameter: call it at log intervals."""
        if loss is not None:
            value = float(loss.detach().float().mean()) if isinstance(loss, torch.Tensor) else float(loss)
            if not math.isfinite(value):
                self._diverged("the loss", value)
        for module in modules:
            for name, p in module.named_parameters():
                local = p.to_local() if _is_dtensor(p) else p  # a sharded weight: this rank's shard
                if not bool(torch.isfinite(local.detach()).all()):
                    self._diverged(f"parameter '{name}'", "not finite")

    def _diverged(self, what: str, value: Any) -> None:
        self.run.mark(diverged={"step": self.step + 1, "what": what, "value": str(value)})
        raise TrainingDiverged(self.step + 1, what, value, desc=self.desc, unit=self.unit, total=self.total)

    # -- checkpoints ------------------------------------------------------------------------------
    def save(self, objects: dict[str, Any]) -> Path | None:
        """Checkpoint `objects` (modules, optimisers, schedulers: anything with `state_dict`; torch
        Generators) with the step, `stats`, timers and the torch / python / numpy RNG states into
        checkpoints/step-N. Written into a hidden temporary directory and renamed into place, so a kill
        mid-save leaves no step-N; then all but the newest `keep` are removed (keep 0: none removed).
        With `sharded` (FSDP: parameters and optimiser states are DTensors) every rank writes its own
        shards and RNG into state-rank{r}.pt beside rank 0's state.pt; every rank must call it then."""
        if not self.run.is_main and not self.sharded:
            return None
        root = self.run.path(CHECKPOINTS)
        final, tmp = root / f"step-{self.step}", root / f".tmp-step-{self.step}"
        state = {"step": self.step, "stats": self.stats, "times": self.times, "rng": _rng_state(),
                 "world_size": self.rank["world_size"],
                 "objects": {name: _local(_state_of(obj)) for name, obj in objects.items()}}
        if self.run.is_main:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        self._barrier()
        torch.save(state, tmp / _state_file(self.rank["rank"] if self.sharded else 0))
        self._barrier()
        if self.run.is_main:
            atomic_write_text(tmp / COMPLETE, f"step {self.step}\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            if self.keep > 0:
                for old in _complete_checkpoints(self.run.work)[: -self.keep]:
                    shutil.rmtree(old, ignore_errors=True)
        self._barrier()
        return final

    def _barrier(self) -> None:
        if self.sharded and self.rank["world_size"] > 1:
            import torch.distributed as dist

            dist.barrier()

    def peek(self) -> dict[str, Any] | None:
        """The `step` and `stats` of the newest complete checkpoint, without restoring anything (None: none).
        A loop whose objects depend on where it stopped reads this first, then calls `restore`."""
        ckpt = latest_checkpoint(self.run.work)
        if ckpt is None:
            return None
        state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True, mmap=True)
        return {"step": int(state["step"]), "stats": state["stats"], "objects": sorted(state["objects"])}

    def restore(self, objects: dict[str, Any]) -> bool:
        """Load the newest complete checkpoint into `objects` (in place) and restore step, stats, timers
        and RNG states; drop metrics rows logged after it. False (nothing changed) when there is none."""
        ckpt = latest_checkpoint(self.run.work)
        if ckpt is None:
            return False
        state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
        missing = sorted(set(objects) - set(state["objects"]))
        if missing:
            raise UserError(f"{ckpt} holds no state for {', '.join(missing)}: it was written by another trainer; "
                            "start again with --overwrite")
        if self.sharded:
            if state.get("world_size") != self.rank["world_size"]:
                raise UserError(f"{ckpt} was written by {state.get('world_size')} processes and holds their shards: "
                                f"resume with launch.num_processes={state.get('world_size')}")
            if self.rank["rank"] != 0:  # this rank's own shards and RNG
                state = {**state, **{k: v for k, v in torch.load(ckpt / _state_file(self.rank["rank"]),
                                                                 map_location="cpu", weights_only=True).items()
                                     if k in ("objects", "rng")}}
        for name, obj in objects.items():
            _load_into(obj, state["objects"][name])
        self.step, self.stats, self.times = int(state["step"]), state["stats"], state["times"]
        _set_rng_state(state["rng"])
        self.run.truncate_metrics(self.step)
        return True

    # -- the end ----------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """What `finish` adds to summary.json: `loop` (unit, steps done, total, world size) and `time_split_s`."""
        return {"loop": {"unit": self.unit, "steps": self.step, "total": self.total,
                         "world_size": self.rank["world_size"]}, "time_split_s": dict(self.times)}

    def finish(self, summary: dict[str, Any], readme: str | None = None) -> Path:
        """summary.json (the trainer's summary + `loop.summary()`), README, then DIR.partial -> DIR."""
        return self.run.finish({**summary, **self.summary()}, readme=readme)


class Trainable:
    """Named parameters as a checkpoint object: `Loop.save` stores them, `restore` copies them back in place.
    A LoRA run passes its adapters here, so that a checkpoint holds what trains, not the frozen base."""

    def __init__(self, params: dict[str, torch.nn.Parameter]) -> None:
        self.params = params

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: _local(q.detach()) if _is_dtensor(q) else q.detach().clone() for name, q in self.params.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.params):
            raise UserError("the checkpoint's trainable parameters are not this model's (another LoRA or model "
                            "setting?): start again with --overwrite")
        with torch.no_grad():
            for name, q in self.params.items():
                (q.to_local() if _is_dtensor(q) else q).copy_(state[name])


def _is_dtensor(x: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(x, DTensor)


def latest_checkpoint(work: Path) -> Path | None:
    """The newest complete checkpoints/step-N under a run's work directory (half-written ones skipped)."""
    done = _complete_checkpoints(Path(work))
    return done[-1] if done else None


def _complete_checkpoints(work: Path) -> list[Path]:
    root = work / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith("step-") and p.name[5:].isdigit()
             and (p / COMPLETE).is_file() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def _state_file(rank: int) -> str:
    return STATE_FILE if rank == 0 else f"state-rank{rank}.pt"


def _state_of(obj: Any) -> Any:
    return obj.get_state() if isinstance(obj, torch.Generator) else obj.state_dict()


def _local(state: Any) -> Any:
    """`state` with every DTensor replaced by this rank's shard (a plain tensor torch.load reads back)."""
    from torch.distributed.tensor import DTensor

    if isinstance(state, DTensor):
        return state.to_local().detach().clone()
    if isinstance(state, dict):
        return {k: _local(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(_local(v) for v in state)
    return state


def _load_into(obj: Any, state: Any) -> None:
    if isinstance(obj, torch.Generator):
        obj.set_state(state)
        return
    obj.load_state_dict(state)
    if isinstance(obj, torch.optim.Optimizer):  # states of sharded parameters are shards again
        from torch.distributed.tensor import DTensor

        for param, slots in obj.state.items():
            if isinstance(param, DTensor):
                for key, value in slots.items():
                    if isinstance(value, torch.Tensor) and not isinstance(value, DTensor) and value.dim() > 0:
                        slots[key] = DTensor.from_local(value.to(param.device), param.device_mesh, param.placements)


def _rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


__all__ = ["COMPLETE", "CHECKPOINTS", "Loop", "STATE_FILE", "Trainable", "latest_checkpoint"]
