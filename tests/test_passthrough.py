"""The `trainer:` block (keys passed to the command's TRL config) and the training knobs a recipe reaches:
max_grad_norm, optim, eval_steps, save_total_limit (docs/recipes.md)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from helpers import one_line_error, run_cli

from alignkit import config
from alignkit.runs import RunDir
from alignkit.trainers import _hf, config_class


def _cfg(command: str, **tree):
    return config.build_config(config_class(command), {"command": command, "model": {"device": "cpu"}, **tree})


# ------------------------------------------------------------------------------ errors, before any work


def test_unknown_trainer_key_is_one_line_with_the_closest_field(monkeypatch, capsys):
    code, _, err = run_cli(["sft", "--set", "trainer.neftune_noise_alfa=5", "--dry-run"], monkeypatch, capsys)
    one_line_error(code, err, "trainer.neftune_noise_alfa", "trl.SFTConfig", '"neftune_noise_alpha"')


def test_a_typo_of_a_key_alignkit_sets_names_the_alignkit_field(monkeypatch, capsys):
    code, _, err = run_cli(["sft", "--set", "trainer.lerning_rate=1e-4", "--dry-run"], monkeypatch, capsys)
    one_line_error(code, err, '"learning_rate"', "train.learning_rate")


@pytest.mark.parametrize("command,key,field", [
    ("sft", "learning_rate", "train.learning_rate"),
    ("sft", "max_grad_norm", "train.max_grad_norm"),
    ("sft", "packing", "train.packing"),
    ("dpo", "beta", "pref.beta"),
    ("kto", "loss_type", "kto.loss"),
    ("rm", "report_to", "output.report_to"),
    ("dpo", "push_to_hub", "output.push_to_hub"),
])
def test_a_key_alignkit_sets_from_its_blocks_is_refused_naming_the_field(command, key, field, monkeypatch, capsys):
    code, _, err = run_cli([command, "--set", f"trainer.{key}=1", "--dry-run"], monkeypatch, capsys)
    one_line_error(code, err, f"trainer.{key}", field, "set that instead")


def test_a_key_alignkit_fixes_is_refused_with_the_reason(tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("command: rm\ntrainer:\n  disable_dropout: false\n")
    code, _, err = run_cli(["run", str(recipe), "--dry-run"], monkeypatch, capsys)
    one_line_error(code, err, "trainer.disable_dropout", "alignkit fixes it")


@pytest.mark.parametrize("command", ["ppo", "sppo", "quickstart"])
def test_commands_without_a_trl_config_refuse_the_block(command, monkeypatch, capsys):
    argv = [command, "--set", "trainer.max_grad_norm=0.5"] + (["--dry-run"] if command != "quickstart" else [])
    code, _, err = run_cli(argv, monkeypatch, capsys)
    one_line_error(code, err, "trainer.max_grad_norm", f"alignkit {command}` builds no TRL config")


def test_the_block_is_checked_before_anything_is_loaded(tmp_path, monkeypatch, capsys):
    from alignkit import models

    def boom(*a, **k):
        raise AssertionError("loaded a model before checking trainer:")

    monkeypatch.setattr(models, "load_causal_lm", boom)
    out = tmp_path / "run"
    code, _, err = run_cli(["sft", "--device", "cpu", "-o", str(out), "--set", "trainer.no_such_knob=1"],
                           monkeypatch, capsys)
    one_line_error(code, err, "trainer.no_such_knob")
    assert not out.exists() and not Path(str(out) + ".partial").exists()


# ----------------------------------------------------------------------------------- what is passed


def test_trainer_keys_and_new_train_fields_reach_the_trl_config(tmp_path, capsys):
    from trl import DPOConfig

    cfg = _cfg("dpo", train={"max_grad_norm": 0.25, "optim": "adafactor", "eval_steps": 3, "save_total_limit": 2},
               data={"eval_fraction": 0.1}, trainer={"label_smoothing": 0.1, "dataloader_drop_last": True})
    args = DPOConfig(**_hf.training_args(cfg, RunDir(tmp_path / "run"), bf16=False), beta=0.1)
    assert args.label_smoothing == 0.1 and args.dataloader_drop_last is True
    assert args.max_grad_norm == 0.25 and args.optim == "adafactor"
    assert args.eval_steps == 3 and args.save_total_limit == 2
    assert capsys.readouterr().err == ""  # nothing of alignkit's was replaced


def test_optim_left_unset_keeps_the_transformers_default(tmp_path):
    assert "optim" not in _hf.training_args(_cfg("sft"), RunDir(tmp_path / "run"), bf16=False)


def test_a_trainer_key_replacing_an_alignkit_default_says_so(tmp_path, capsys):
    cfg = _cfg("sft", trainer={"dataloader_num_workers": 2})
    args = _hf.training_args(cfg, RunDir(tmp_path / "run"), bf16=False)
    assert args["dataloader_num_workers"] == 2
    err = capsys.readouterr().err
    assert "note: trainer.dataloader_num_workers=2 replaces alignkit's default 0" in err


def test_eval_steps_evaluates_every_n_steps():
    held_out = {"eval_fraction": 0.1}
    assert _hf.eval_strategy(_cfg("sft", train={"eval_steps": 5}, data=held_out), eval_split=[1]) == "steps"
    assert _hf.eval_strategy(_cfg("sft", data=held_out), eval_split=[1]) == "epoch"
    assert _hf.eval_strategy(_cfg("sft"), eval_split=None) == "no"


@pytest.mark.parametrize("argv,words", [
    (["dpo", "--set", "train.eval_steps=5"], ("train.eval_steps=5", "data.eval_fraction")),
    (["rm", "--set", "train.eval_steps=5", "--set", "data.eval_fraction=0.1"], ("train.eval_steps", "alignkit rm")),
])
def test_eval_steps_that_would_never_evaluate_are_refused(argv, words, monkeypatch, capsys):
    code, _, err = run_cli([*argv, "--dry-run"], monkeypatch, capsys)
    one_line_error(code, err, *words)


def test_an_sft_run_trains_with_the_passed_keys(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """End to end: `--set trainer.KEY=VALUE` and the new train fields are what SFTTrainer trains with."""
    seen = {}
    real_fit = _hf.fit

    def spy(trainer, run):
        seen["args"] = trainer.args
        return real_fit(trainer, run)

    monkeypatch.setattr(_hf, "fit", spy)
    out = tmp_path / "run"
    code, _, err = run_cli(["sft", "--device", "cpu", "--max-samples", "16", "--max-steps", "1", "--batch-size", "4",
                            "--max-length", "64", "-o", str(out), "--set", "trainer.neftune_noise_alpha=5",
                            "--set", "train.max_grad_norm=0.5", "--set", "train.save_total_limit=1"],
                           monkeypatch, capsys)
    assert code == 0, err
    args = seen["args"]
    assert args.neftune_noise_alpha == 5 and args.max_grad_norm == 0.5 and args.save_total_limit == 1
    saved = (out / "config.yaml").read_text()
    assert "neftune_noise_alpha: 5" in saved  # config.yaml keeps the block: --resume compares it
    assert json.loads((out / "summary.json").read_text())["steps"] == 1


# ------------------------------------------------------------- the tables match what the trainers set


def _keywords(path: Path, names: set[str]) -> set[str]:
    """Keyword names of every call to one of `names` (a TRL config class) in a module, and of the
    `dict(...)` that `preference._trl_common` builds for both DPO and KTO."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "_trl_common":
            found |= {k.arg for n in ast.walk(node) if isinstance(n, ast.Call) for k in n.keywords if k.arg}
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in names:
            found |= {k.arg for k in node.keywords if k.arg}
    return found


@pytest.mark.parametrize("command,module,names", [
    ("sft", "sft.py", {"TRLSFTConfig"}),
    ("dpo", "preference.py", {"TRLDPOConfig"}),
    ("kto", "preference.py", {"TRLKTOConfig"}),
    ("rm", "reward.py", {"RewardConfig"}),
])
def test_every_key_a_trainer_sets_is_known_to_the_passthrough_check(command, module, names, tmp_path):
    """A key a trainer sets but the tables miss would reach the TRL config twice (a TypeError, not one line)."""
    set_here = _keywords(Path(_hf.__file__).parent / module, names)
    set_here |= set(_hf.training_args(_cfg(command), RunDir(tmp_path / "r"), bf16=False))
    known = (config.ALIGNKIT_SETS.keys() | config.ALIGNKIT_FIXES.keys() | set(config.ALIGNKIT_DEFAULTS)
             | config.COMMAND_SETS.get(command, {}).keys() | config.COMMAND_FIXES.get(command, {}).keys())
    assert set_here - known == set(), "add these keys to config.ALIGNKIT_SETS / COMMAND_SETS / ..."
