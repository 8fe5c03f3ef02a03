"""Pipeline recipes (`steps:`): references between steps, checks before anything runs, --dry-run, a real
sft → pairs → dpo run, --resume skipping finished steps, and the shipped UP-RLHF pipeline (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import assert_python_runs, one_line_error, run_cli

from alignkit import pipeline
from alignkit.cli import recipes_dir, validate_recipe
from alignkit.config import to_yaml
from alignkit.errors import UserError

FAST = {"max_steps": 2, "batch_size": 4, "max_length": 64, "save_steps": 0, "logging_steps": 1}


def _tree(**extra) -> dict:
    """sft → pairs → dpo on the built-in task, as small as a run can be."""
    return {
        "command": "pipeline",
        "steps": {
            "sft": {"model": "tiny", "data": {"source": "builtin:sft", "max_samples": 16}, "train": FAST},
            "pairs": {"model": "${sft.model}", "data": {"max_samples": 6}, "pairs": {"k": 2, "max_new_tokens": 12}},
            "dpo": {"model": "${sft.model}", "data": {"source": "${pairs.data}"}, "train": FAST},
        },
        **extra,
    }


def _write(tmp_path: Path, tree: dict, name: str = "pipe.yaml") -> Path:
    f = tmp_path / name
    f.write_text(f"# alignkit run {name}\n" + yaml.safe_dump(tree, sort_keys=False))
    return f


# ------------------------------------------------------------------------------ pure: load and plan
def test_references_resolve_to_the_earlier_steps_directories(tmp_path):
    root = tmp_path / "out"
    pipe = pipeline.load(_tree(), "pipe.yaml", [f"output.dir={root}", "sft.train.learning_rate=1e-4",
                                                "dpo.pref.beta=0.2"])
    assert pipe.names == ["sft", "pairs", "dpo"] and pipe.dir == root
    sft, pairs, dpo = pipe.steps
    assert [s.cfg.output.dir for s in pipe.steps] == [str(root / n) for n in ("sft", "pairs", "dpo")]
    assert pairs.cfg.model.name == dpo.cfg.model.name == str(root / "sft" / "model")
    assert dpo.cfg.data.source == str(root / "pairs" / "pairs.jsonl")
    assert dpo.inputs == {"model": "${sft.model}", "data.source": "${pairs.data}"}
    # an override addresses one step only
    assert sft.cfg.train.learning_rate == 1e-4 and dpo.cfg.train.learning_rate == 1e-6
    assert dpo.cfg.pref.beta == 0.2
    # a reference inside a longer string, and one given as an override
    tree = _tree()
    tree["steps"]["dpo"]["data"]["source"] = "${pairs.dir}/pairs.jsonl"
    pipe = pipeline.load(tree, "pipe.yaml", ["output.dir=o", "dpo.pref.ref_model=${sft.dir}/model"])
    assert pipe.steps[2].cfg.data.source == str(Path("o/pairs/pairs.jsonl"))
    assert pipe.steps[2].cfg.pref.ref_model == str(Path("o/sft/model"))


@pytest.mark.parametrize("edit, overrides, words", [
    (("dpo", "model", "${sft.modle}"), [], ["step 'dpo'", "modle", "did you mean \"model\"", "dir, model"]),
    (("dpo", "model", "${sfx.model}"), [], ["no step 'sfx'", "did you mean \"sft\"", "sft, pairs"]),
    (("pairs", "model", "${dpo.model}"), [], ["step 'pairs'", "'dpo'", "runs after it"]),
    (("dpo", "model", "${dpo.model}"), [], ["runs as this step"]),
    (("dpo", "model", "${sft}"), [], ["no output ''"]),
    (("dpo", "model", "${sft.model"), [], ["unclosed"]),
    (("dpo", "command", "dpoo"), [], ["unknown command 'dpoo'", "did you mean \"dpo\""]),
    (("dpo", "output", {"dir": "x"}), [], ["DIR/dpo", "output.dir"]),
    (None, ["sfx.train.epochs=2"], ["'sfx' is not a step", "did you mean \"sft\""]),
    (None, ["sft.train.lr=1"], ["step 'sft'", "unknown key 'train.lr'"]),
    (None, ["output.dri=x"], ["output.dri", "did you mean \"dir\""]),
])
def test_a_bad_reference_or_override_is_one_error_naming_the_step(edit, overrides, words):
    tree = _tree()
    if edit:
        step, key, value = edit
        tree["steps"][step][key] = value
    with pytest.raises(UserError) as info:
        pipeline.load(tree, "pipe.yaml", overrides)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)


def test_a_trainer_added_to_the_table_is_a_step_with_its_declared_outputs(monkeypatch):
    """How sppo plugs in: a new TRAINERS row is a step command; its outputs default to dir + model, or come
    from its config class's OUTPUTS (a dict, or a function of the step's config)."""
    from typing import ClassVar

    from alignkit import trainers
    from alignkit.trainers.sft import SFTConfig

    class IteratedConfig(SFTConfig):
        OUTPUTS: ClassVar = staticmethod(lambda cfg: {"model": f"iter-{cfg.train.max_steps}/model"})

    monkeypatch.setitem(trainers.TRAINERS, "newsft", ("alignkit.trainers.sft", "SFTConfig", "run"))
    monkeypatch.setattr(trainers, "config_class", lambda c: IteratedConfig if c == "iterated" else SFTConfig)
    monkeypatch.setitem(trainers.TRAINERS, "iterated", ("x", "y", "z"))
    tree = {"steps": {"a": {"command": "newsft", "train": {"max_steps": 3}},
                      "b": {"command": "iterated", "model": "${a.model}", "train": {"max_steps": 3}},
                      "c": {"command": "newsft", "model": "${b.model}"}}}
    pipe = pipeline.load(tree, "p", ["output.dir=o"])
    assert pipe.step("b").cfg.model.name == str(Path("o/a/model"))
    assert pipe.step("c").cfg.model.name == str(Path("o/b/iter-3/model"))


def _fake_finished(step: pipeline.Step, finished: bool = True) -> None:
    """What a step leaves behind: a finished run dir (config.yaml + summary.json) or an interrupted DIR.partial."""
    where = step.dir if finished else step.partial
    where.mkdir(parents=True)
    (where / "config.yaml").write_text(to_yaml(step.cfg))
    (where / ".alignkit-run").write_text(json.dumps({"command": step.command}))
    if finished:
        (where / "summary.json").write_text("{}")


def _marked(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / ".alignkit-run").write_text(json.dumps({"command": "pipeline"}))


def test_resume_plan_skips_finished_steps_and_resumes_the_interrupted_one(tmp_path):
    root = tmp_path / "out"
    fresh = pipeline.load(_tree(), "p", [f"output.dir={root}"])
    assert [a for _, a in pipeline.plan(fresh)] == ["run"] * 3
    _marked(root)
    _fake_finished(fresh.steps[0])
    _fake_finished(fresh.steps[2], finished=False)
    pipe = pipeline.load(_tree(), "p", [f"output.dir={root}"], {"output.resume": True})
    actions = pipeline.plan(pipe)
    assert [a for _, a in actions] == ["skip", "run", "resume"]
    assert pipe.steps[2].cfg.output.resume and not pipe.steps[1].cfg.output.resume
    # without --resume the directory is refused; with other settings for the finished step, --resume is
    with pytest.raises(UserError, match="already exists: pass --resume"):
        pipeline.plan(fresh)
    changed = pipeline.load(_tree(), "p", [f"output.dir={root}", "sft.train.max_steps=3"], {"output.resume": True})
    with pytest.raises(UserError, match="step 'sft' finished with other settings: .*max_steps"):
        pipeline.plan(changed)


def test_resume_refuses_a_finished_step_after_one_that_runs_again(tmp_path):
    root = tmp_path / "out"
    pipe = pipeline.load(_tree(), "p", [f"output.dir={root}"], {"output.resume": True})
    _marked(root)
    _fake_finished(pipe.steps[2])  # dpo finished, but sft and pairs have to run: dpo would be stale
    with pytest.raises(UserError, match="step 'dpo' finished but step 'sft' before it runs again"):
        pipeline.plan(pipe)


def test_overwrite_and_resume_touch_only_a_pipeline_directory(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("keep me")
    for flag in ("output.overwrite", "output.resume"):
        pipe = pipeline.load(_tree(), "p", [f"output.dir={root}"], {flag: True})
        with pytest.raises(UserError, match="not an alignkit pipeline directory"):
            pipeline.plan(pipe)
    assert (root / "notes.txt").read_text() == "keep me"


# ------------------------------------------------------------------------------------------ CLI
def test_unknown_output_is_one_line_exit_2_and_nothing_is_written(tmp_path, monkeypatch, capsys):
    tree = _tree()
    tree["steps"]["dpo"]["data"]["source"] = "${pairs.jsonl}"
    f = _write(tmp_path, tree)
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["run", str(f)], monkeypatch, capsys)
    one_line_error(code, err, "step 'dpo'", "${pairs.jsonl}", "no output 'jsonl'", "dir, data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe.yaml"]


def test_dry_run_shows_every_step_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_cli(["run", "up-rlhf-tiny-pipeline", "--dry-run", "ppo.ppo.iterations=3"], monkeypatch, capsys)
    assert code == 0, out
    assert "nothing is downloaded or written" in out and "command: pipeline" in out
    for line in ("step 1/3 sft: alignkit sft", "step 2/3 rm-ensemble: alignkit rm-ensemble",
                 "step 3/3 ppo: alignkit ppo", "input  : model = ${sft.model}",
                 "input  : ppo.reward = ${rm-ensemble.dir}"):
        assert line in out, line
    resolved = yaml.safe_load(out.split("resolved pipeline:", 1)[1])
    ppo = resolved["steps"]["ppo"]
    assert ppo["ppo"]["reward"] == str(Path("runs/up-rlhf-tiny-pipeline/rm-ensemble")) and ppo["ppo"]["beta2"] > 0
    assert ppo["ppo"]["iterations"] == 3 and ppo["model"]["name"] == str(Path("runs/up-rlhf-tiny-pipeline/sft/model"))
    assert list(tmp_path.iterdir()) == []


PAIRS_STEP = """# alignkit run pipe.yaml
output: {dir: out}
steps:
  pairs:
    model: tiny
    data: {max_samples: 3}
    pairs: {k: 2, max_new_tokens: 4, seed: 5, chat: %s, backend: %s}
"""


def _record_write_pairs(monkeypatch) -> list[dict]:
    """`pairs.write_pairs` replaced by a recorder (nothing sampled); the vLLM backend check made a no-op."""
    from alignkit import pairs, vllm_backend

    calls: list[dict] = []

    def record(model, prompts, out, **kwargs):
        calls.append({"model": model, "prompts": len(prompts), **kwargs})
        Path(out).write_text("")
        return {"pairs": 0, "dropped_identical": 0, "mean_prob": 0.5, "eos_rate": 0.0}

    monkeypatch.setattr(pairs, "write_pairs", record)
    monkeypatch.setattr(vllm_backend, "check_backend", lambda backend, device=None: None)
    return calls


def test_a_pairs_step_passes_chat_and_backend_to_the_function_alignkit_pairs_runs(tmp_path, monkeypatch, capsys):
    """The pipeline's pairs step and `alignkit pairs` make the same `pairs.write_pairs` call: a recipe's
    `chat: off` (YAML reads it as false) and `backend: vllm` reach it as the CLI's --chat / --backend do."""
    calls = _record_write_pairs(monkeypatch)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pipe.yaml").write_text(PAIRS_STEP % ("off", "vllm"))
    code, _, err = run_cli(["run", "pipe.yaml"], monkeypatch, capsys)
    assert code == 0, err
    code, _, err = run_cli(["pairs", "-m", "tiny", "--max-samples", "3", "--k", "2", "--max-new-tokens", "4",
                            "--seed", "5", "--chat", "off", "--backend", "vllm", "--out", "cli.jsonl"],
                           monkeypatch, capsys)
    assert code == 0, err
    step, cli = calls
    assert step["chat"] == "off" and step["backend"] == "vllm" and step["source"] == "builtin:prompts"
    assert {k: v for k, v in step.items() if k != "progress"} == {k: v for k, v in cli.items() if k != "progress"}
    assert (tmp_path / "out" / "pairs" / "summary.json").is_file()


def test_a_bad_chat_value_in_a_pairs_step_is_one_line_before_anything_runs(tmp_path, monkeypatch, capsys):
    calls = _record_write_pairs(monkeypatch)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pipe.yaml").write_text(PAIRS_STEP % ("maybe", "hf"))
    code, _, err = run_cli(["run", "pipe.yaml"], monkeypatch, capsys)
    one_line_error(code, err, "step 'pairs'", "pairs.chat", "'auto', 'on' or 'off'", "maybe")
    assert calls == [] and sorted(p.name for p in tmp_path.iterdir()) == ["pipe.yaml"]
    tree = _tree()  # after a step that would train first: refused when the pipeline is read
    tree["steps"]["pairs"]["pairs"]["chat"] = "sometimes"
    with pytest.raises(UserError, match="pairs.chat"):
        pipeline.load(tree, "pipe.yaml", ["output.dir=o"])


def test_pipeline_dry_run_imports_no_torch():
    assert_python_runs(
        "import sys\n"
        "from alignkit import cli\n"
        "sys.argv = ['alignkit', 'run', 'up-rlhf-tiny-pipeline', '--dry-run']\n"
        "try:\n    cli.main()\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )


def test_shipped_pipelines_validate_and_name_their_steps(monkeypatch, capsys):
    for name, steps in (("up-rlhf-tiny-pipeline", ["sft", "rm-ensemble", "ppo"]),
                        ("sft-pairs-dpo-tiny", ["sft", "pairs", "dpo"]),
                        ("up-rlhf-opt-1.3b-tldr-pipeline", ["sft", "rm-ensemble", "ppo"])):
        pipe = validate_recipe(recipes_dir() / f"{name}.yaml")
        assert pipe.command == "pipeline" and pipe.names == steps
    up = validate_recipe(recipes_dir() / "up-rlhf-tiny-pipeline.yaml").step("ppo").cfg
    assert up.ppo.beta2 > 0 and up.ppo.kl_mode == "loss" and up.ppo.reward.endswith("rm-ensemble")
    code, out, _ = run_cli(["recipes", "ls"], monkeypatch, capsys)
    assert code == 0 and "pipeline:" in out


def _files(root: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes()) for p in root.rglob("*") if p.is_file()}


def test_a_small_pipeline_runs_and_resume_skips_the_finished_steps(tmp_path, monkeypatch, capsys, tiny_model_dir):
    f = _write(tmp_path, _tree(output={"dir": "out"}))
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["run", str(f)], monkeypatch, capsys)
    assert code == 0, err
    root = tmp_path / "out"
    assert (root / "sft" / "model" / "model.safetensors").is_file() and (root / "dpo" / "model").is_dir()
    rows = [json.loads(x) for x in (root / "pairs" / "pairs.jsonl").read_text().splitlines()]
    assert rows and {"prompt", "chosen", "rejected"} <= set(rows[0])
    dpo_cfg = yaml.safe_load((root / "dpo" / "config.yaml").read_text())
    assert dpo_cfg["model"]["name"] == "out/sft/model" and dpo_cfg["data"]["source"] == "out/pairs/pairs.jsonl"
    summary = json.loads((root / "summary.json").read_text())
    assert list(summary["steps"]) == ["sft", "pairs", "dpo"] and summary["steps"]["dpo"]["steps"] == 2
    assert summary["steps"]["pairs"]["pairs"] == len(rows)

    code, _, err = run_cli(["run", str(f)], monkeypatch, capsys)
    one_line_error(code, err, "already exists", "--resume")
    code, _, err = run_cli(["run", str(f), "--resume"], monkeypatch, capsys)
    one_line_error(code, err, "already finished")

    # dpo lost (as if killed before it finished): --resume leaves sft and pairs byte for byte as they were
    import shutil

    shutil.rmtree(root / "dpo")
    (root / "summary.json").unlink()
    before = {step: _files(root / step) for step in ("sft", "pairs")}
    code, out, err = run_cli(["run", str(f), "--resume"], monkeypatch, capsys)
    assert code == 0, err
    assert "step 1/3 sft (alignkit sft): finished" in out and "skipped" in out
    assert {step: _files(root / step) for step in ("sft", "pairs")} == before
    summary = json.loads((root / "summary.json").read_text())
    assert summary["steps"]["sft"]["skipped"] and not summary["steps"]["dpo"]["skipped"]
    assert (root / "dpo" / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_shipped_up_rlhf_tiny_pipeline_runs(tmp_path, monkeypatch, capsys, tiny_model_dir):
    """sft → rm-ensemble → ppo with the ensemble's uncertainty penalty (β2 > 0), the shipped file as it is."""
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["run", "up-rlhf-tiny-pipeline"], monkeypatch, capsys)
    assert code == 0, err
    root = tmp_path / "runs" / "up-rlhf-tiny-pipeline"
    summary = json.loads((root / "summary.json").read_text())
    assert list(summary["steps"]) == ["sft", "rm-ensemble", "ppo"]
    ppo = json.loads((root / "ppo" / "summary.json").read_text())
    assert ppo["reward"] == "runs/up-rlhf-tiny-pipeline/rm-ensemble" and ppo["model"].endswith("sft/model")
    metrics = [json.loads(x) for x in (root / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all("u" in m and "reward_penalised" in m for m in metrics)
    assert (root / "ppo" / "model").is_dir()


@pytest.mark.slow
def test_a_step_with_two_processes_is_launched_on_its_own(tmp_path, monkeypatch, capsys, tiny_model_dir):
    """A step with launch.num_processes 2 runs as `alignkit run RECIPE --step NAME` in 2 ranks (~50 s on CPU)."""
    tree = _tree(output={"dir": "out"})
    del tree["steps"]["pairs"], tree["steps"]["dpo"]
    tree["steps"]["sft"]["launch"] = {"num_processes": 2}
    f = _write(tmp_path, tree)
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["run", str(f)], monkeypatch, capsys)
    assert code == 0, err
    assert "--num_processes 2" in err and "--step sft" in err
    assert json.loads((tmp_path / "out" / "sft" / "summary.json").read_text())["world_size"] == 2
    assert (tmp_path / "out" / "summary.json").is_file()
