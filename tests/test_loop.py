"""The explicit-loop base (alignkit/trainers/loop.py): checkpoint/resume reproduces an uninterrupted run bit
for bit, a half-written checkpoint is never resumed from, the time split is reported, and a non-finite loss
or weight stops the run, leaving nothing that looks finished."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from alignkit.errors import TrainingDiverged, UserError
from alignkit.trainers.loop import CHECKPOINTS, COMPLETE, STATE_FILE, Loop, latest_checkpoint

STEPS, SAVE_EVERY = 12, 4


def _toy_run(out: Path, *, resume: bool = False, stop_after: int | None = None, seed: int = 0) -> dict:
    """A linear model fitted by SGD with momentum on random minibatches. Randomness comes from torch's global
    RNG (batches), a torch Generator (noise), python's `random` and numpy (a jitter of the learning signal), and
    a running statistic (an EMA of the loss) lives in `loop.stats`: a resume must restore all of them."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    x = torch.randn(256, 5, generator=torch.Generator().manual_seed(123))
    y = x @ torch.arange(1.0, 6.0) + 0.1
    model = torch.nn.Linear(5, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    noise = torch.Generator().manual_seed(seed + 7)
    objects = {"model": model, "optimizer": opt, "scheduler": sched, "noise": noise}
    loop = Loop.open(out, overwrite=False, resume=resume, config_yaml="toy: 1\n", total=STEPS, desc="toy",
                     progress=False)
    with loop:
        if resume:
            assert loop.restore(objects)
        loop.stats.setdefault("ema", 0.0)
        while loop.step < STEPS:
            with loop.timer("rollout"):
                idx = torch.randint(0, 256, (16,))
                jitter = random.random() * 1e-3 + float(np.random.rand()) * 1e-3
                target = y[idx] + 0.01 * torch.randn(16, generator=noise) + jitter
            with loop.timer("update"):
                loss = torch.nn.functional.mse_loss(model(x[idx]).squeeze(-1), target)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
            loop.guard(loss, model)
            loop.stats["ema"] = 0.9 * loop.stats["ema"] + 0.1 * loss.item()
            loop.advance()
            loop.log({"loss": loss.item(), "ema": loop.stats["ema"]})
            if loop.step % SAVE_EVERY == 0:
                loop.save(objects)
            if stop_after is not None and loop.step == stop_after:
                raise KeyboardInterrupt
        loop.finish({"final_loss": loss.item()})
    return {"weight": model.weight.detach().clone(), "bias": model.bias.detach().clone(), "stats": dict(loop.stats)}


def _losses(run_dir: Path) -> list[tuple[int, float, float]]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["ema"]) for r in rows]


def test_resume_reproduces_an_uninterrupted_run_bit_exactly(tmp_path, capsys) -> None:
    whole = _toy_run(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):  # killed 2 steps after the checkpoint at step 8
        _toy_run(tmp_path / "cut", stop_after=10)
    work = tmp_path / "cut.partial"
    assert not (tmp_path / "cut").exists() and latest_checkpoint(work).name == "step-8"
    assert "interrupted at step 10 of 12: resume with the same command plus --resume" in capsys.readouterr().err
    # the resumed process starts from other RNG states and other weights: everything must come from the checkpoint
    resumed = _toy_run(tmp_path / "cut", resume=True, seed=99)
    assert torch.equal(whole["weight"], resumed["weight"]) and torch.equal(whole["bias"], resumed["bias"])
    assert whole["stats"] == resumed["stats"]
    assert _losses(tmp_path / "whole") == _losses(tmp_path / "cut")  # rows 9-10 of the killed run were dropped
    assert [s for s, _, _ in _losses(tmp_path / "cut")] == list(range(1, STEPS + 1))
    done = sorted(p.name for p in (tmp_path / "cut" / CHECKPOINTS).iterdir())
    assert done == ["step-12", "step-8"]  # keep = 2: older ones pruned


def test_a_half_written_checkpoint_is_never_resumed_from(tmp_path) -> None:
    with pytest.raises(KeyboardInterrupt):
        _toy_run(tmp_path / "run", stop_after=8)
    root = tmp_path / "run.partial" / CHECKPOINTS
    # a kill during the save of step 12: its temporary dir, and a step dir without the COMPLETE marker
    (root / ".tmp-step-12").mkdir()
    (root / ".tmp-step-12" / STATE_FILE).write_bytes(b"\x80\x02garbage")
    (root / "step-11").mkdir()
    (root / "step-11" / STATE_FILE).write_bytes(b"half")
    assert latest_checkpoint(tmp_path / "run.partial").name == "step-8"
    assert (root / "step-8" / COMPLETE).is_file()
    resumed = _toy_run(tmp_path / "run", resume=True)
    whole = _toy_run(tmp_path / "whole")
    assert torch.equal(whole["weight"], resumed["weight"])


def test_restore_without_a_checkpoint_and_with_a_foreign_one(tmp_path) -> None:
    loop = Loop.open(tmp_path / "r", overwrite=False, resume=False, config_yaml="", total=3, progress=False)
    model = torch.nn.Linear(2, 1)
    before = model.weight.detach().clone()
    assert loop.restore({"model": model}) is False and torch.equal(model.weight, before)
    loop.save({"model": model})
    with pytest.raises(UserError, match="no state for critic"):
        loop.restore({"model": model, "critic": torch.nn.Linear(2, 1)})


def test_the_time_split_is_reported_in_metrics_and_summary(tmp_path) -> None:
    loop = Loop.open(tmp_path / "t", overwrite=False, resume=False, config_yaml="", total=3, progress=True)
    with loop:
        while loop.step < 3:
            with loop.timer("rollout"):
                time.sleep(0.02)
            with loop.timer("update"):
                time.sleep(0.005)
            loop.advance()
            loop.log({"x": 1})
        final = loop.finish({"done": True})
    rows = [json.loads(x) for x in (final / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[-1]["time_rollout_s"] >= 0.06 and rows[-1]["time_update_s"] >= 0.015
    assert rows[0]["time_rollout_s"] < rows[-1]["time_rollout_s"]  # accumulated
    summary = json.loads((final / "summary.json").read_text())
    assert summary["loop"] == {"unit": "step", "steps": 3, "total": 3, "world_size": 1}
    assert set(summary["time_split_s"]) == {"rollout", "update"}
    assert summary["time_split_s"]["rollout"] > summary["time_split_s"]["update"]


@pytest.mark.parametrize("what", ["loss", "weights"])
def test_non_finite_loss_or_weights_stop_the_run(tmp_path, what) -> None:
    model = torch.nn.Linear(3, 1)
    loop = Loop.open(tmp_path / "n", overwrite=False, resume=False, config_yaml="", total=5, desc="toy",
                     progress=False)
    with pytest.raises(TrainingDiverged) as err, loop:
        loop.guard(torch.tensor(1.5), model)  # finite: nothing happens
        loop.advance()
        if what == "loss":
            loop.guard(torch.tensor(float("nan")), model)
        else:
            with torch.no_grad():
                model.weight[0, 1] = float("inf")
            loop.guard(0.5, model)
        loop.finish({})
    msg = str(err.value)
    assert isinstance(err.value, UserError) and "\n" not in msg  # the CLI prints it as one line, exit 2
    assert "toy diverged at step 2 of 5" in msg and ("loss is nan" in msg if what == "loss" else "'weight'" in msg)
    assert not (tmp_path / "n").exists() and not (tmp_path / "n.partial" / "summary.json").exists()
