"""The run-directory contract: atomic finish, refusal to overwrite, resume bookkeeping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignkit.errors import UserError
from alignkit.runs import RunDir, last_checkpoint


def test_work_happens_in_partial_then_renamed(tmp_path: Path):
    final = tmp_path / "run"
    run = RunDir.open(final, overwrite=False, resume=False, config_yaml="a: 1\n")
    assert run.work == tmp_path / "run.partial" and not final.exists()
    run.log({"step": 1, "loss": 2.0})
    run.log({"step": 2, "loss": 1.5})
    assert run.read_metrics()[-1]["loss"] == 1.5
    run.finish({"ok": True}, readme="# r\n")
    assert final.is_dir() and not run.work.exists()
    assert (final / "config.yaml").read_text() == "a: 1\n"
    assert json.loads((final / "summary.json").read_text())["ok"] is True
    assert [json.loads(x)["step"] for x in (final / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (final / "plots").is_dir() and (final / "README.md").exists()


def test_existing_dir_refused_unless_overwrite(tmp_path: Path):
    final = tmp_path / "run"
    RunDir.open(final, False, False, "command: sft\n").finish({})
    (final / "keep.txt").write_text("old")
    with pytest.raises(UserError, match="already exists.*--overwrite"):
        RunDir.open(final, False, False, "")
    assert (final / "keep.txt").read_text() == "old"
    run = RunDir.open(final, True, False, "b: 2\n")
    assert (final / "keep.txt").exists(), "the old run is only replaced when the new one finishes"
    run.finish({})
    assert not (final / "keep.txt").exists() and (final / "summary.json").exists()


def test_interrupted_run_needs_resume_or_overwrite(tmp_path: Path):
    final = tmp_path / "run"
    RunDir.open(final, False, False, "")  # never finished
    with pytest.raises(UserError, match="--resume"):
        RunDir.open(final, False, False, "")
    run = RunDir.open(final, False, True, "")
    assert run.resumed and run.work.exists()


def test_resume_without_partial_is_an_error(tmp_path: Path):
    with pytest.raises(UserError, match="nothing to resume"):
        RunDir.open(tmp_path / "none", False, True, "")
    done = tmp_path / "done"
    RunDir.open(done, False, False, "").finish({})
    with pytest.raises(UserError, match="already finished"):
        RunDir.open(done, False, True, "")


def test_non_main_process_writes_nothing(tmp_path: Path):
    run = RunDir.open(tmp_path / "r", False, False, "", is_main=False)
    run.log({"step": 1})
    run.finish({"x": 1})
    assert not (tmp_path / "r").exists() and not (tmp_path / "r.partial").exists()


def test_last_checkpoint_is_numeric_max(tmp_path: Path):
    for n in (5, 40, 100, 7):
        (tmp_path / "checkpoints" / f"checkpoint-{n}").mkdir(parents=True)
        (tmp_path / "checkpoints" / f"checkpoint-{n}" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoints" / "checkpoint-x").mkdir()
    assert last_checkpoint(tmp_path).endswith("checkpoint-100")
    assert last_checkpoint(tmp_path / "nope") is None
