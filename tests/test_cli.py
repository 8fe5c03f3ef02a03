"""The CLI: every command has --help, and the error contract holds for bad input (one clear line,
exit code 2, no traceback, nothing written that looks like a result)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers import run_cli

from alignkit import cli

COMMANDS = [
    "quickstart", "sft", "rm", "rm-ensemble", "dpo", "kto", "generate", "models", "run", "env", "data", "recipes",
    "bench", "eval", "pairs", "qprobe",
]


_run = run_cli


def test_root_help_lists_every_command(monkeypatch, capsys):
    code, out, _ = _run(["--help"], monkeypatch, capsys)
    assert code == 0
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize(
    "argv",
    [[c, "--help"] for c in COMMANDS]
    + [["data", "inspect", "--help"], ["data", "convert", "--help"], ["recipes", "ls", "--help"],
       ["recipes", "show", "--help"], ["recipes", "validate", "--help"], ["recipes", "cp", "--help"],
       ["rm", "eval", "--help"], ["rm-ensemble", "eval", "--help"]],
)
def test_every_command_has_help(argv, monkeypatch, capsys):
    code, out, _ = _run(argv, monkeypatch, capsys)
    assert code == 0 and "Usage" in out and len(out.splitlines()) > 3


@pytest.fixture
def bad_files(tmp_path: Path) -> dict[str, Path]:
    files = {
        "malformed": tmp_path / "malformed.jsonl",
        "nocol": tmp_path / "nocol.jsonl",
        "empty": tmp_path / "empty.jsonl",
        "pairs": tmp_path / "pairs.jsonl",
        "typo_recipe": tmp_path / "typo.yaml",
        "existing": tmp_path / "existing",
    }
    files["malformed"].write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": \n')
    files["nocol"].write_text('{"question": "a", "answer": "b"}\n')
    files["empty"].write_text("")
    files["pairs"].write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    files["typo_recipe"].write_text("# alignkit run typo.yaml\ncommand: sft\ntrain:\n  learnig_rate: 0.1\n")
    files["existing"].mkdir()
    (files["existing"] / "summary.json").write_text("{}")
    return files


# (argv template, words the one line must contain)
BAD_INPUTS = [
    (["data", "inspect", "{malformed}"], ["malformed.jsonl", "line 2"]),
    (["sft", "--data", "{nocol}", "-o", "{out}"], ["question", "--columns"]),
    (["sft", "--data", "{empty}", "-o", "{out}"], ["empty"]),
    (["sft", "--data", "{pairs}", "-o", "{out}"], ["sft", "pairwise", "--kind sft"]),
    (["run", "{typo_recipe}"], ["learnig_rate", "learning_rate"]),
    (["sft", "--model", "mistral-7bb", "-o", "{out}"], ["mistral-7bb", "mistral-7b"]),
    (["sft", "--lr", "-1", "-o", "{out}"], ["train.learning_rate"]),
    (["sft", "--set", "train.epochz=2", "-o", "{out}"], ["epochz", "epochs"]),
    (["sft", "--columns", "prompt", "-o", "{out}"], ["--columns", "prompt"]),
    (["sft", "--accelerate-config", "zero9", "-o", "{out}"], ["accelerate_config"]),
    (["sft", "-o", "{existing}"], ["already exists", "--overwrite"]),
    (["sft", "--resume", "-o", "{out}"], ["nothing to resume"]),
    (["generate", "--model", "tiny", "--prompts", "builtin:prompts", "--out", "{out}.jsonl", "--k", "0"], ["--k"]),
    (["run", "no-such-recipe"], ["no-such-recipe", "not found"]),
    (["data", "inspect", "builtin:sftt"], ["builtin:sftt", "sft"]),
    (["data", "inspect", "{nocol}", "--kind", "pairwise"], ["pairwise", "chosen"]),
    (["rm", "--data", "builtin:sft", "-o", "{out}"], ["needs pairwise data but got sft"]),
    (["rm-ensemble", "--n-members", "1", "-o", "{out}"], ["n_members must be at least 2"]),
    (["rm-ensemble", "--lam", "-0.1", "-o", "{out}"], ["lam", ">= 0"]),
    (["rm-ensemble", "--member-loss", "median", "-o", "{out}"], ["ensemble.member_loss"]),
    (["rm", "eval", "{existing}", "-o", "{out}"], ["not a finished alignkit rm"]),
    (["rm", "eval", "{existing}", "--bins", "0", "-o", "{out}"], ["--bins"]),
    (["quickstart", "-o", "{out}", "--set", "model.name=no-such-model"], ["no-such-model"]),
    (["quickstart", "-o", "{out}", "--set", "train.batch_size=0"], ["train.batch_size"]),
    (["rm-ensemble", "--num-processes", "2", "--set", "ensemble.forward=loop", "-o", "{out}"], ["DDP"]),
    (["rm-ensemble", "--accelerate-config", "zero3", "-o", "{out}"], ["ZeRO-3/FSDP"]),
    (["rm", "--ood", "{nocol}", "-o", "{out}"], ["nocol.jsonl", "question"]),
    (["dpo", "--data", "builtin:unpaired", "-o", "{out}"], ["needs pairwise data but got unpaired"]),
    (["dpo", "--beta", "0", "-o", "{out}"], ["β must be > 0"]),
    (["dpo", "--loss", "sppo", "--data", "{pairs}", "-o", "{out}"], ["prob column in [0,1]"]),
    (["dpo", "--ref-model", "{out}/no-such-ref", "-o", "{out}"], ["no-such-ref"]),
    (["kto", "--data", "builtin:sft", "-o", "{out}"], ["needs unpaired or pairwise data but got sft"]),
    (["kto", "--beta", "-1", "-o", "{out}"], ["β must be > 0"]),
    (["kto", "--batch-size", "1", "-o", "{out}"], ["batch_size must be >= 2"]),
    (["kto", "--ref-model", "{out}/no-such-ref", "-o", "{out}"], ["no-such-ref"]),
]


@pytest.mark.parametrize("argv, words", BAD_INPUTS, ids=[" ".join(a[:3]) for a, _ in BAD_INPUTS])
def test_bad_input_one_line_exit_2_nothing_written(argv, words, bad_files, tmp_path, monkeypatch, capsys):
    out_dir = tmp_path / "result"
    names = {k: str(v) for k, v in bad_files.items()} | {"out": str(out_dir)}
    argv = [a.format(**names) for a in argv]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = _run(argv, monkeypatch, capsys)
    assert code == 2, (code, out, err)
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error:") and "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "nothing may be written"
    assert json.loads((bad_files["existing"] / "summary.json").read_text()) == {}


def test_debug_shows_the_traceback(monkeypatch, capsys, bad_files):
    monkeypatch.setattr(sys, "argv", ["alignkit", "--debug", "data", "inspect", str(bad_files["empty"])])
    from alignkit.errors import UserError

    with pytest.raises(UserError):
        cli.main()


def test_dry_run_prints_the_plan_and_downloads_nothing(monkeypatch, capsys, tmp_path):
    code, out, _ = _run(["run", "sft-mistral-7b-lora", "--dry-run"], monkeypatch, capsys)
    assert code == 0
    assert "mistralai/Mistral-7B-Instruct-v0.2" in out and "zero3" in out and "nothing is downloaded" in out
    assert not Path("runs/sft-mistral-7b-lora").exists()


def test_recipes_ls_show_cp(monkeypatch, capsys, tmp_path):
    code, out, _ = _run(["recipes", "ls"], monkeypatch, capsys)
    assert code == 0 and "sft-tiny" in out and "quickstart" in out
    code, out, _ = _run(["recipes", "show", "sft-tiny"], monkeypatch, capsys)
    assert code == 0 and "command: sft" in out
    code, _, _ = _run(["recipes", "cp", "sft-tiny", str(tmp_path)], monkeypatch, capsys)
    assert code == 0 and (tmp_path / "sft-tiny.yaml").is_file()
    code, _, err = _run(["recipes", "cp", "sft-tiny", str(tmp_path)], monkeypatch, capsys)
    assert code == 2 and "already exists" in err
    code, out, _ = _run(["recipes", "validate"], monkeypatch, capsys)
    assert code == 0 and out.count("ok") >= 5


def test_data_inspect_and_convert(monkeypatch, capsys, tmp_path):
    code, out, _ = _run(["data", "inspect", "builtin:pairwise"], monkeypatch, capsys)
    assert code == 0 and "pairwise" in out and "chosen" in out
    target = tmp_path / "pairs.jsonl"
    code, out, _ = _run(["data", "convert", "builtin:pairwise", str(target), "--kind", "unpaired"], monkeypatch, capsys)
    assert code == 0
    rows = [json.loads(x) for x in target.read_text().splitlines()]
    assert rows and set(rows[0]) == {"prompt", "completion", "label"}


def test_models_and_env(monkeypatch, capsys):
    code, out, _ = _run(["models"], monkeypatch, capsys)
    assert code == 0 and "mistral-7b" in out and "pairrm" in out and "tiny" in out
    code, out, _ = _run(["env"], monkeypatch, capsys)
    assert code == 0 and "torch" in out and "deepspeed" in out


def test_generate_writes_jsonl(monkeypatch, capsys, tmp_path, tiny_model_dir):
    target = tmp_path / "s.jsonl"
    argv = ["generate", "--model", str(tiny_model_dir), "--prompts", "builtin:prompts", "--max-samples", "3",
            "--k", "2", "--max-new-tokens", "8", "--out", str(target)]
    code, out, err = _run(argv, monkeypatch, capsys)
    assert code == 0, err
    rows = [json.loads(x) for x in target.read_text().splitlines()]
    assert len(rows) == 6 and {"prompt", "completion", "finished", "n_tokens", "index"} <= set(rows[0])
    assert [r["index"] for r in rows] == [0, 1, 0, 1, 0, 1]


def test_rm_then_rm_eval_writes_its_own_run(monkeypatch, capsys, tmp_path, tiny_model_dir):
    run = tmp_path / "rm"
    argv = ["rm", "--model", "tiny", "--max-samples", "96", "--batch-size", "16", "--max-length", "96",
            "--device", "cpu", "-o", str(run), "--set", "eval.ood_max_samples=16"]
    code, out, err = _run(argv, monkeypatch, capsys)
    assert code == 0, err
    assert json.loads((run / "summary.json").read_text())["eval"]["pairs"] > 0
    code, out, err = _run(["rm", "eval", str(run), "-o", str(tmp_path / "ev")], monkeypatch, capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert {"accuracy", "ece", "ece_standard", "uncertainty_in_dist", "uncertainty_ood"} <= set(summary)
    assert (tmp_path / "ev" / "plots" / "reliability.png").is_file()
