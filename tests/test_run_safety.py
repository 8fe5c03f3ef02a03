"""Run-directory safety (issue 9, part B): a user's files are never deleted, one process per run,
diverged runs never look finished, strict JSON, resume that is honest about what it continues, a
resume hint on Ctrl-C, output paths checked before any work, and `max_length` capped at the model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import Interrupt, one_line_error, run_cli

from alignkit.config import to_yaml
from alignkit.errors import UserError
from alignkit.runs import MARKER, RunDir
from alignkit.trainers import _hf, sft

FAST = ["--max-samples", "16", "--max-steps", "3", "--batch-size", "8", "--max-length", "96", "--device", "cpu"]


def _strict(text: str):
    def refuse(c):
        raise ValueError(f"not JSON: {c}")

    return json.loads(text, parse_constant=refuse)


def _sft_cfg(out: Path, **train) -> sft.SFTConfig:
    base = {"learning_rate": 3e-3, "batch_size": 8, "max_length": 96, "logging_steps": 1, "max_steps": 8}
    return sft.SFTConfig(model={"name": "tiny", "device": "cpu"}, data={"source": "builtin:sft", "max_samples": 64},
                         train={**base, **train}, output={"dir": str(out)})


# ----------------------------------------------------------------------------------- data loss


def test_overwrite_refuses_a_directory_that_is_not_a_run(tmp_path: Path, monkeypatch, capsys):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("years of work")
    code, _, err = run_cli(["sft", *FAST, "-o", str(mine), "--overwrite"], monkeypatch, capsys)
    assert "not an alignkit run" in one_line_error(code, err)
    assert (mine / "chapter1.tex").read_text() == "years of work"
    assert not (tmp_path / "thesis.partial").exists()


def test_overwrite_accepts_runs_old_runs_and_empty_dirs_only(tmp_path: Path):
    user_file = tmp_path / "notes.txt"
    user_file.write_text("keep")
    with pytest.raises(UserError, match="not an alignkit run"):
        RunDir.check(user_file, overwrite=True, resume=False)
    partial = tmp_path / "x.partial"  # a user's folder that happens to be named like our work dir
    partial.mkdir()
    (partial / "data.csv").write_text("1,2")
    with pytest.raises(UserError, match="not an alignkit run"):
        RunDir.check(tmp_path / "x", overwrite=True, resume=False)
    assert (partial / "data.csv").exists()
    (tmp_path / "empty").mkdir()
    RunDir.check(tmp_path / "empty", overwrite=True, resume=False)
    old = tmp_path / "old"  # finished before the marker existed: config.yaml + summary.json
    old.mkdir()
    (old / "config.yaml").write_text("command: sft\n")
    (old / "summary.json").write_text("{}")
    RunDir.open(old, True, False, "command: sft\n").finish({})
    assert (old / MARKER).is_file() and json.loads((old / MARKER).read_text())["command"] == "sft"
    other = tmp_path / "other-tool"  # another tool's experiment folder with the same file names
    other.mkdir()
    (other / "config.yaml").write_text("command: train_gpt\n")
    (other / "metrics.jsonl").write_text("")
    with pytest.raises(UserError, match="not an alignkit run"):
        RunDir.check(other, overwrite=True, resume=False)


def test_a_command_that_cannot_resume_is_told_to_overwrite(tmp_path: Path):
    (tmp_path / "fit.partial").mkdir()
    (tmp_path / "fit.partial" / MARKER).write_text("{}")
    with pytest.raises(UserError, match="--overwrite to restart") as err:
        RunDir.check(tmp_path / "fit", overwrite=False, resume=False, resumable=False)
    assert "--resume" not in str(err.value)


# ------------------------------------------------------------------------- two processes, one run


def _release(out: Path) -> None:
    """Let go of the lock this test process took by opening `out` (as if that process had ended)."""
    from alignkit import runs

    if hasattr(runs, "RunLock"):
        runs.RunLock.release(out)


def _hold_lock(path: Path) -> subprocess.Popen:
    code = textwrap.dedent(f"""
        import sys, time
        from alignkit.runs import RunLock
        RunLock.acquire({str(path)!r})
        print("locked", flush=True)
        sys.stdin.read()
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                              text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_second_process_on_a_live_run_is_refused_with_the_holders_pid(tmp_path: Path, monkeypatch, capsys):
    out = tmp_path / "run"
    RunDir.open(out, False, False, to_yaml(_sft_cfg(out)))  # a run in progress: DIR.partial exists
    _release(out)  # ... held by another process:
    holder = _hold_lock(out)
    try:
        for flags in (["--overwrite"], ["--resume"], []):
            code, _, err = run_cli(["sft", *FAST, "-o", str(out), *flags], monkeypatch, capsys)
            assert f"pid {holder.pid}" in one_line_error(code, err), err
            assert "interrupted run" not in err
        assert (out.with_name("run.partial") / "config.yaml").exists()
    finally:
        holder.communicate("")
    assert not out.with_name("run.lock").exists(), "the holder removes its lock file when it exits"
    with pytest.raises(UserError, match="interrupted run"):  # free again: the usual message
        RunDir.check(out, overwrite=False, resume=False)


# ---------------------------------------------------------------------- silent wrong results


def test_diverging_learning_rate_stops_and_leaves_no_finished_run(tmp_path: Path, monkeypatch, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(["sft", *FAST, "--lr", "1e10", "-o", str(out)], monkeypatch, capsys)
    assert "diverged at step" in one_line_error(code, err) and "lower the learning rate" in err
    assert not out.exists()
    marker = json.loads((tmp_path / "run.partial" / MARKER).read_text())
    assert marker["diverged"]["step"] >= 1
    for line in (tmp_path / "run.partial" / "metrics.jsonl").read_text().splitlines():
        _strict(line)
    code, _, err = run_cli(["sft", *FAST, "--lr", "1e10", "-o", str(out), "--resume"], monkeypatch, capsys)
    assert "diverged" in one_line_error(code, err) and "--overwrite" in err


def test_infinite_beta_is_refused(tmp_path: Path, monkeypatch, capsys):
    from alignkit.trainers import preference

    with pytest.raises(ValueError, match="beta"):
        preference.DPOConfig(pref={"beta": float("inf")})
    with pytest.raises(ValueError, match="beta"):
        preference.KTOConfig(kto={"beta": float("inf")})
    code, _, err = run_cli(["dpo", "--beta", "inf", "--dry-run", "-o", str(tmp_path / "d")], monkeypatch, capsys)
    assert "beta" in one_line_error(code, err)


def test_summary_and_metrics_are_strict_json(tmp_path: Path):
    run = RunDir.open(tmp_path / "run", False, False, "command: sft\n")
    run.log({"step": 1, "loss": float("nan"), "grad_norm": float("inf")})
    final = run.finish({"train_loss": float("nan"), "nested": {"x": [float("-inf"), 1.0]}})
    summary = _strict((final / "summary.json").read_text())
    assert summary["train_loss"] is None and summary["nested"]["x"] == [None, 1.0]
    assert _strict((final / "metrics.jsonl").read_text().splitlines()[0])["loss"] is None


# ------------------------------------------------------------------------------------- resume


def test_resume_refuses_settings_the_checkpoint_cannot_honour(tmp_path: Path, monkeypatch, capsys):
    out = tmp_path / "run"
    cfg = _sft_cfg(out)
    RunDir.open(out, False, False, to_yaml(cfg))
    _release(out)
    saved = (tmp_path / "run.partial" / "config.yaml").read_text()
    common = ["sft", "--max-samples", "64", "--batch-size", "8", "--max-length", "96", "--max-steps", "8",
              "--device", "cpu", "--set", "train.logging_steps=1", "-o", str(out), "--resume"]
    for change, key in ((["--lr", "1e-4"], "train.learning_rate"), (["--lr", "3e-3", "--lora"], "model.lora.enabled"),
                        (["--lr", "3e-3", "--data", "builtin:pairwise"], "data.source")):
        code, _, err = run_cli([*common, *change], monkeypatch, capsys)
        assert key in one_line_error(code, err) and "--resume" in err
        assert (tmp_path / "run.partial" / "config.yaml").read_text() == saved, "config.yaml must not lie"
    # where things are written and how often may change
    allowed = cfg.model_copy(deep=True)
    allowed.train.logging_steps, allowed.train.save_steps, allowed.output.resume = 5, 7, True
    RunDir.check(out, overwrite=False, resume=True, config_yaml=to_yaml(allowed))


def test_resume_skips_a_half_written_checkpoint_and_reports_the_whole_run(tmp_path: Path, capsys):
    straight = sft.run(_sft_cfg(tmp_path / "a", save_steps=2))
    with pytest.raises(KeyboardInterrupt):
        sft.run(_sft_cfg(tmp_path / "b", save_steps=2), callbacks=[Interrupt(5)])
    err = capsys.readouterr().err
    ckpts = tmp_path / "b.partial" / "checkpoints"
    # a kill while checkpoint-4 was being saved: transformers writes trainer_state.json last
    (ckpts / "checkpoint-4" / "trainer_state.json").unlink()
    (ckpts / "checkpoint-4" / "optimizer.pt").unlink()
    again = _sft_cfg(tmp_path / "b", save_steps=2)
    again.output.resume = True
    resumed = sft.run(again)
    assert resumed["steps"] == straight["steps"] == 8 and resumed["resumed_from_step"] == 2
    for key in ("train_loss", "first_loss", "last_loss"):  # the whole run, not the resumed segment
        assert resumed[key] == pytest.approx(straight[key], rel=1e-4, abs=1e-5), key
    assert "interrupted at step 5: resume with the same command plus --resume" in err, err


def test_ctrl_c_prints_how_to_resume_and_exits_130(tmp_path: Path, monkeypatch, capsys):
    step_end = _hf.RunDirMetrics.on_step_end

    def interrupt(self, args, state, control, **kwargs):  # Ctrl-C during step 2
        if state.global_step == 2:
            raise KeyboardInterrupt
        return step_end(self, args, state, control, **kwargs)

    monkeypatch.setattr(_hf.RunDirMetrics, "on_step_end", interrupt)
    out = tmp_path / "run"
    code, _, err = run_cli(["sft", *FAST, "--set", "train.save_steps=1", "-o", str(out)], monkeypatch, capsys)
    assert code == 130, err
    assert "interrupted at step 2: resume with the same command plus --resume" in err and "Traceback" not in err
    assert not out.exists() and (tmp_path / "run.partial" / "checkpoints" / "checkpoint-1").is_dir()
    assert "checkpoint of step 1" in err


# ------------------------------------------------------------------------ fail before the work


def test_output_under_a_file_or_unwritable_is_refused_before_loading(tmp_path: Path, monkeypatch, capsys):
    from alignkit import models

    def no_loading(*args, **kwargs):
        raise AssertionError("the output path must be checked before the model is loaded")

    monkeypatch.setattr(models, "load_causal_lm", no_loading)
    a_file = tmp_path / "results.txt"
    a_file.write_text("x")
    code, _, err = run_cli(["sft", *FAST, "-o", str(a_file / "run")], monkeypatch, capsys)
    assert "is a file" in one_line_error(code, err)
    if os.geteuid() == 0:  # root writes through permission bits: use a directory no one can write
        locked = Path("/proc/alignkit-no-such-dir/run")
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        locked = ro / "run"
    code, _, err = run_cli(["sft", *FAST, "-o", str(locked)], monkeypatch, capsys)
    assert "cannot write" in one_line_error(code, err)
    assert a_file.read_text() == "x"


def test_rm_eval_on_a_policy_run_is_aone_line_error(tmp_path: Path, monkeypatch, capsys):
    run = tmp_path / "sft-run"
    RunDir.open(run, False, False, to_yaml(_sft_cfg(run))).finish({"command": "sft"})
    code, _, err = run_cli(["rm", "eval", str(run), "-o", str(tmp_path / "ev")], monkeypatch, capsys)
    assert "is an `alignkit sft` run; rm eval needs a run of alignkit rm or rm-ensemble" in one_line_error(code, err)
    assert not (tmp_path / "ev").exists() and not (tmp_path / "ev.partial").exists()


def test_max_length_is_capped_at_the_models_positions(capsys):
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=256))
    assert _hf.cap_max_length(96, model) == 96
    assert capsys.readouterr().err == ""
    assert _hf.cap_max_length(4096, model) == 256
    err = capsys.readouterr().err
    assert "train.max_length=4096" in err and "256" in err and len(err.strip().splitlines()) == 1
    assert _hf.cap_max_length(4096, SimpleNamespace(config=SimpleNamespace())) == 4096
