"""--report-to (alignkit/tracking.py; transformers' integrations for the TRL trainers) and --push-to-hub /
`alignkit push` (alignkit/hub.py), offline: the trackers and the hub client are faked at their boundary."""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from pathlib import Path

import pytest
from helpers import one_line_error, run_cli

from alignkit import config, hub, tracking
from alignkit.runs import RunDir
from alignkit.trainers import _hf, config_class
from alignkit.trainers.loop import Loop


class FakeWriter:
    """torch.utils.tensorboard.SummaryWriter's surface that tracking.py uses."""

    instances: list[FakeWriter] = []

    def __init__(self, log_dir: str):
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        FakeWriter.instances.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


@pytest.fixture
def fake_tensorboard(monkeypatch):
    FakeWriter.instances = []
    mod = types.ModuleType("torch.utils.tensorboard")
    mod.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", mod)
    monkeypatch.setitem(tracking.PACKAGES, "tensorboard", ("json", "tensorboard"))  # "installed"
    yield FakeWriter
    tracking.close()


@pytest.fixture
def fake_wandb(monkeypatch):
    calls: list[tuple] = []
    mod = types.ModuleType("wandb")
    mod.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    mod.init = lambda **kw: calls.append(("init", kw))
    mod.log = lambda values, step=None: calls.append(("log", values, step))
    mod.finish = lambda: calls.append(("finish",))
    monkeypatch.setitem(sys.modules, "wandb", mod)
    yield calls
    tracking.close()


def _loop(tmp_path: Path) -> Loop:
    return Loop.open(tmp_path / "run", overwrite=False, resume=False, config_yaml="command: ppo\n", total=2,
                     progress=False)


# ------------------------------------------------------------------------------------------ trackers


def test_a_missing_tracker_package_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(tracking.PACKAGES, "wandb", ("alignkit_no_such_module", "wandb"))
    out = tmp_path / "run"
    code, _, err = run_cli(["ppo", "--device", "cpu", "-o", str(out), "--set", "output.report_to=wandb"],
                           monkeypatch, capsys)
    one_line_error(code, err, "--report-to wandb", "pip install wandb")
    assert not out.exists() and not Path(f"{out}.partial").exists()


def test_loop_rows_go_to_tensorboard_in_the_run_directory(tmp_path, fake_tensorboard):
    tracking.use("tensorboard")
    loop = _loop(tmp_path)
    loop.log({"reward": 0.5, "note": "text is left to metrics.jsonl"})
    loop.advance()
    loop.log({"reward": 0.75})
    tracking.close()
    (writer,) = fake_tensorboard.instances
    assert writer.log_dir == str(loop.run.work / "tensorboard") and writer.closed
    assert writer.scalars == [("reward", 0.5, 0), ("reward", 0.75, 1)]
    assert len(loop.run.read_metrics()) == 2  # metrics.jsonl is written as well


def test_loop_rows_go_to_wandb_only_when_chosen(tmp_path, fake_wandb):
    loop = _loop(tmp_path)
    loop.log({"reward": 1.0})  # no tracker chosen (a library caller): nothing is sent
    assert fake_wandb == []
    tracking.use("wandb", config={"command": "ppo"})
    loop.advance()
    loop.log({"reward": 2.0, "kl": 0.1})
    tracking.close()
    assert fake_wandb[0] == ("init", {"project": "alignkit", "name": "run", "config": {"command": "ppo"}})
    assert fake_wandb[1] == ("log", {"reward": 2.0, "kl": 0.1}, 1)
    assert fake_wandb[2] == ("finish",)


def test_trl_trainers_report_to_the_chosen_tracker_in_the_run_directory(tmp_path, monkeypatch, fake_tensorboard):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)  # restored after the test
    cfg = config.build_config(config_class("sft"), {"command": "sft", "output": {"report_to": "tensorboard"}})
    run = RunDir(tmp_path / "run")
    args = _hf.training_args(cfg, run, bf16=False)
    assert args["report_to"] == "tensorboard"
    import os

    assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(run.work / "tensorboard")
    cfg = config.build_config(config_class("sft"), {"command": "sft"})
    assert _hf.training_args(cfg, run, bf16=False)["report_to"] == "none"


def test_trl_trainers_log_to_wandb_and_trackio_under_the_alignkit_project(tmp_path, monkeypatch, fake_wandb):
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    cfg = config.build_config(config_class("dpo"), {"command": "dpo", "output": {"report_to": "wandb"}})
    args = _hf.training_args(cfg, RunDir(tmp_path / "my-dpo"), bf16=False)
    import os

    assert args["report_to"] == "wandb" and args["run_name"] == "my-dpo"
    assert os.environ["WANDB_PROJECT"] == "alignkit"
    monkeypatch.setitem(tracking.PACKAGES, "trackio", ("json", "trackio"))  # "installed"
    cfg = config.build_config(config_class("dpo"), {"command": "dpo", "output": {"report_to": "trackio"}})
    args = _hf.training_args(cfg, RunDir(tmp_path / "my-dpo"), bf16=False)
    assert args["report_to"] == "trackio" and args["project"] == "alignkit"  # TrackioCallback reads `project`


def test_ppo_from_the_cli_logs_every_iteration_to_the_tracker(tmp_path, tiny_model_dir, monkeypatch, capsys,
                                                              fake_tensorboard):
    out = tmp_path / "ppo"
    code, _, err = run_cli(["ppo", "--device", "cpu", "--advantage", "grpo", "--k", "2", "--iterations", "2",
                            "--prompts-per-iteration", "2", "--max-new-tokens", "4", "--max-samples", "8",
                            "-o", str(out), "--set", "output.report_to=tensorboard"], monkeypatch, capsys)
    assert code == 0, err
    (writer,) = fake_tensorboard.instances
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert writer.closed and {s for _, _, s in writer.scalars} == {r["step"] for r in rows}
    assert writer.log_dir.endswith("ppo.partial/tensorboard")  # DIR/tensorboard once finished


# ------------------------------------------------------------------------------------------- the hub


@pytest.fixture
def fake_hub(monkeypatch):
    """HfApi's methods replaced: each call is recorded (README.md's bytes kept); no network."""
    from huggingface_hub import HfApi

    calls: list[tuple[str, dict]] = []

    def record(name):
        def method(self, *args, **kw):
            if name == "upload_folder":
                kw["files"] = sorted(str(p.relative_to(kw["folder_path"])) for p in Path(kw["folder_path"]).rglob("*")
                                     if p.is_file())
            calls.append((name, {"args": args, **kw}))
            return f"https://huggingface.co/{args[0] if args else kw.get('repo_id')}"
        return method

    for name in ("create_repo", "upload_folder", "upload_file"):
        monkeypatch.setattr(HfApi, name, record(name))
    monkeypatch.setattr("huggingface_hub.get_token", lambda: "hf_fake")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # only hub.check_can_push reads it; the client stays offline
    return calls


SFT = ["sft", "--device", "cpu", "--max-samples", "16", "--max-steps", "2", "--batch-size", "4", "--max-length", "64"]


def test_push_failure_keeps_the_finished_run_and_alignkit_push_uploads_it_later(tmp_path, tiny_model_dir,
                                                                                 monkeypatch, capsys, fake_hub):
    from huggingface_hub import HfApi

    def offline(self, **kw):
        raise OSError("cannot reach huggingface.co")

    real_upload = HfApi.upload_folder
    monkeypatch.setattr(HfApi, "upload_folder", offline)
    out = tmp_path / "run"
    code, _, err = run_cli([*SFT, "-o", str(out), "--set", "output.push_to_hub=me/tiny-sft"], monkeypatch, capsys)
    line = one_line_error(code, err, "push to me/tiny-sft failed", "cannot reach", f"alignkit push {out} me/tiny-sft")
    assert (out / "summary.json").is_file() and (out / "model").is_dir(), line  # the run is finished
    assert not Path(f"{out}.partial").exists()

    monkeypatch.setattr(HfApi, "upload_folder", real_upload)  # the recording fake again
    fake_hub.clear()
    code, stdout, err = run_cli(["push", str(out), "me/tiny-sft"], monkeypatch, capsys)
    assert code == 0, err
    assert [c[0] for c in fake_hub] == ["create_repo", "upload_folder", "upload_file"]
    folder = fake_hub[1][1]
    assert folder["repo_id"] == "me/tiny-sft" and folder["folder_path"] == str(out)
    assert "model/model.safetensors" in folder["files"] and "summary.json" in folder["files"]
    card = fake_hub[2][1]
    assert card["path_in_repo"] == "README.md"
    text = card["path_or_fileobj"].decode()
    summary = json.loads((out / "summary.json").read_text())
    for fact in ("- **Base model**: `tiny`", "`builtin:sft`", "- **Method**: `sft`", "learning_rate:",
                 "max_steps: 2", f"| steps | {summary['steps']} |", "| train_loss |", "tags:\n- alignkit\n- sft"):
        assert fact in text, (fact, text)
    assert "pushed to https://huggingface.co/me/tiny-sft" in stdout


def test_nothing_is_uploaded_without_the_flag(tmp_path, tiny_model_dir, monkeypatch, capsys, fake_hub):
    out = tmp_path / "run"
    code, _, err = run_cli([*SFT, "-o", str(out)], monkeypatch, capsys)
    assert code == 0, err
    assert fake_hub == [] and (out / "summary.json").is_file()


def test_a_push_that_cannot_work_is_refused_before_training(tmp_path, monkeypatch, capsys, fake_hub):
    out = tmp_path / "run"
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    code, _, err = run_cli(["sft", "--device", "cpu", "-o", str(out), "--set", "output.push_to_hub=me/x"],
                           monkeypatch, capsys)
    one_line_error(code, err, "--push-to-hub me/x", "no hub token")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli(["sft", "--device", "cpu", "-o", str(out), "--set", "output.push_to_hub=me/x"],
                           monkeypatch, capsys)
    one_line_error(code, err, "HF_HUB_OFFLINE", "alignkit push RUN_DIR REPO")
    code, _, err = run_cli(["push", str(tmp_path / "nothing"), "me/x"], monkeypatch, capsys)
    one_line_error(code, err, "not a finished alignkit run")
    assert fake_hub == [] and not out.exists() and not Path(f"{out}.partial").exists()


def test_the_card_names_a_hub_base_model_and_hub_datasets_in_its_front_matter(tmp_path):
    run = tmp_path / "dpo-run"
    run.mkdir()
    (run / "config.yaml").write_text("command: dpo\nmodel:\n  name: mistralai/Mistral-7B-v0.1\n  lora:\n"
                                     "    enabled: true\n    r: 16\ndata:\n  source: Anthropic/hh-rlhf\n"
                                     "train:\n  learning_rate: 5.0e-07\npref:\n  loss: ipo\n  beta: 0.1\n")
    (run / "summary.json").write_text(json.dumps({"steps": 10, "train_loss": 0.5, "eval": {"accuracy": 0.75}}))
    text = hub.model_card(run)
    front = text.split("---")[1]
    assert "base_model: mistralai/Mistral-7B-v0.1" in front and "- Anthropic/hh-rlhf" in front
    assert "library_name: peft" in front
    assert "- **Method**: `dpo` (loss `ipo`)" in text and "beta: 0.1" in text and "r: 16" in text
    assert "| eval.accuracy | 0.75 |" in text
