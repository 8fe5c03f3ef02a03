"""Bad input at the command line (issue 9, part B): each case ends with ONE line on stderr, exit code 2,
no traceback, and nothing written; the cheap checks come before any model is loaded.
Also the shape of the CLI: generated training flags, and no torch import for help/validate/dry-run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import one_line_error, run_cli

from alignkit.cli.flags import SHARED

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if a command loads a model (its checks must come first)."""
    from alignkit import models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(models, "load_causal_lm", refuse)


# ------------------------------------------------------------------------ recipes and --set values
def test_plain_model_value_in_a_recipe_is_the_model_name(tmp_path, monkeypatch, capsys):
    """`model: mistral-7b` plus a flag under model (--lora) used to plan and train the built-in tiny."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("# alignkit run r.yaml\ncommand: sft\nmodel: mistral-7b\n")
    code, out, err = run_cli(["sft", "--recipe", str(recipe), "--lora", "--dry-run"], monkeypatch, capsys)
    assert code == 0, err
    assert "model  : mistral-7b" in out and "name: mistral-7b" in out and "enabled: true" in out
    assert "name: tiny" not in out


@pytest.mark.parametrize("argv, words", [
    (["--recipe", "{recipe}", "--lr", "1e-3"], ["'train' is a section", "got 5"]),
    (["--set", "train=5", "--lr", "1e-3"], ["--set train=5", "'train' is a section"]),
    (["--set", "model.lora=4", "--lora-r", "8"], ["'model.lora' is a section"]),
])
def test_a_section_given_a_plain_value_is_one_error(argv, words, tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("# alignkit run r.yaml\ncommand: sft\ntrain: 5\n")
    argv = ["sft", *[a.format(recipe=recipe) for a in argv], "--dry-run"]
    one_line_error(*run_cli(argv, monkeypatch, capsys)[::2], *words)


@pytest.mark.parametrize("argv, words", [
    (["sft", "--set", "train.max_steps=true"], ["train.max_steps", "not true/false"]),
    (["sft", "--set", "train.learning_rate=false"], ["train.learning_rate", "not true/false"]),
    (["sft", "--set", "model.lora.enabled=1"], ["model.lora.enabled", "true or false"]),
    (["sft", "--lr", "inf"], ["train.learning_rate", "finite"]),
    (["sft", "--set", "train.learning_rate=nan"], ["train.learning_rate", "finite"]),
    (["sft", "--epochs", "inf"], ["train.epochs", "finite"]),
    (["dpo", "--beta", "inf"], ["pref.beta", "finite"]),
    (["kto", "--desirable-weight", "nan"], ["kto.desirable_weight", "finite"]),
    (["rm-ensemble", "--lam", "inf"], ["ensemble.lam", "finite"]),
    (["sft", "--seed", "-1"], ["train.seed"]),
    (["sft", "--set", "data.seed=-3"], ["data.seed"]),
])
def test_bool_number_mixups_non_finite_numbers_and_negative_seeds_are_refused(argv, words, tmp_path, monkeypatch,
                                                                              capsys):
    code, out, err = run_cli([*argv, "-o", str(tmp_path / "run")], monkeypatch, capsys)
    one_line_error(code, err, *words)
    assert list(tmp_path.iterdir()) == []


def test_every_config_block_refuses_non_finite_and_bool_numbers():
    """The rule lives in config.Block, so every config built on it has it (eval, qprobe, ...)."""
    from pydantic import ValidationError

    from alignkit.config import Block

    class Probe(Block):
        lr: float = 1.0
        steps: int = 1
        flag: bool = False
        maybe: int | None = None

    for bad in ({"lr": float("inf")}, {"lr": float("nan")}, {"steps": True}, {"maybe": False}, {"flag": 0}):
        with pytest.raises(ValidationError):
            Probe.model_validate(bad)
    assert Probe.model_validate({"lr": 3, "steps": 2, "flag": True, "maybe": None}).lr == 3.0


def test_non_utf8_recipe_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes("# alignkit run latin1.yaml\ncommand: sft\nmodel:\n  name: café\n".encode("latin-1"))
    for argv in (["run", str(recipe), "--dry-run"], ["recipes", "validate", str(recipe)],
                 ["sft", "--recipe", str(recipe), "--dry-run"], ["recipes", "show", str(recipe)]):
        code, _, err = run_cli(argv, monkeypatch, capsys)
        one_line_error(code, err, "latin1.yaml", "UTF-8")


def test_missing_recipes_directory_is_an_error_not_an_empty_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ALIGNKIT_RECIPES", str(tmp_path / "no-such-dir"))
    for argv in (["recipes", "ls"], ["recipes", "validate"]):
        code, out, err = run_cli(argv, monkeypatch, capsys)
        one_line_error(code, err, "no-such-dir", "does not exist", "ALIGNKIT_RECIPES")


# ------------------------------------------------------------------------------- sampling settings
@pytest.mark.parametrize("argv, words", [
    (["generate", "--seed", "-1"], ["--seed", ">= 0"]),
    (["generate", "--temperature", "nan"], ["--temperature", "finite"]),  # generation.check_settings (layer)
    (["generate", "--top-p", "nan"], ["--top-p"]),
    (["pairs", "--seed", "-2"], ["--seed", ">= 0"]),
    (["eval", "tiny", "--temperature", "nan"], ["temperature", "finite"]),
    (["eval", "tiny", "--seed", "-1"], ["seed", "0"]),  # evaluate's config: seed ge=0 (layer)
])
def test_bad_sampling_settings_are_refused_before_loading(argv, words, tmp_path, monkeypatch, capsys,
                                                          no_model_loading):
    extra = ["--model", "tiny", "--prompts", "builtin:prompts", "--out", str(tmp_path / "s.jsonl")]
    if argv[0] == "pairs":
        extra = ["--model", "tiny", "--out", str(tmp_path / "p.jsonl")]
    if argv[0] == "eval":
        extra = ["-o", str(tmp_path / "ev")]
    code, _, err = run_cli([*argv, *extra], monkeypatch, capsys)
    one_line_error(code, err, *words)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------- output paths
def _targets(tmp_path: Path) -> dict[str, Path]:
    a_dir = tmp_path / "existing-dir"
    a_dir.mkdir()
    (a_dir / "keep.txt").write_text("mine")
    a_file = tmp_path / "a-file.txt"
    a_file.write_text("mine")
    return {"dir": a_dir, "under_file": a_file / "sub" / "out.jsonl"}


@pytest.mark.parametrize("command", ["generate", "data convert", "pairs"])
@pytest.mark.parametrize("target, words", [("dir", ["is a directory"]), ("under_file", ["a-file.txt", "is a file"])])
def test_unusable_output_path_is_refused_before_any_work(command, target, words, tmp_path, monkeypatch, capsys,
                                                         no_model_loading):
    """Onto an existing directory (even with --overwrite) or under a regular file: one line, exit 2,
    checked before the model is loaded; the user's files are untouched."""
    out = _targets(tmp_path)[target]
    argv = {
        "generate": ["generate", "--model", "tiny", "--prompts", "builtin:prompts", "--out", str(out)],
        "pairs": ["pairs", "--model", "tiny", "--out", str(out)],
        "data convert": ["data", "convert", "builtin:sft", str(out)],
    }[command]
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    code, _, err = run_cli([*argv, "--overwrite"], monkeypatch, capsys)
    one_line_error(code, err, *words)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "existing-dir" / "keep.txt").read_text() == "mine"
    assert (tmp_path / "a-file.txt").read_text() == "mine"


def _root_bypasses_permissions(tmp_path: Path) -> bool:
    probe = tmp_path / "probe"
    probe.mkdir()
    probe.chmod(0o555)
    try:
        (probe / "x").write_text("")
        return True
    except PermissionError:
        return False
    finally:
        probe.chmod(0o755)


@pytest.mark.parametrize("command", ["generate", "data convert"])
def test_output_directory_without_write_permission_is_refused_before_any_work(command, tmp_path, monkeypatch,
                                                                               capsys, no_model_loading):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    # root writes through permission bits: then use /proc, where no one can create a file
    out = Path("/proc/alignkit-out.jsonl") if _root_bypasses_permissions(tmp_path) else locked / "out.jsonl"
    argv = {"generate": ["generate", "--model", "tiny", "--prompts", "builtin:prompts", "--out", str(out)],
            "data convert": ["data", "convert", "builtin:sft", str(out)]}[command]
    try:
        code, _, err = run_cli(argv, monkeypatch, capsys)
        one_line_error(code, err, "cannot write", str(out.parent))
        assert list(locked.iterdir()) == [] and not out.exists()
    finally:
        locked.chmod(0o755)


def test_data_convert_still_replaces_a_file_with_overwrite(tmp_path, monkeypatch, capsys):
    out = tmp_path / "rows.jsonl"
    out.write_text("old\n")
    code, _, err = run_cli(["data", "convert", "builtin:pairwise", str(out)], monkeypatch, capsys)
    one_line_error(code, err, "already exists", "--overwrite")
    code, _, err = run_cli(["data", "convert", "builtin:pairwise", str(out), "--overwrite"], monkeypatch, capsys)
    assert code == 0, err
    assert out.read_text().startswith("{") and [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]


def test_bench_json_path_is_checked_before_the_benchmark(tmp_path, monkeypatch, capsys):
    from alignkit import bench

    monkeypatch.setattr(bench, "qprobe_fit_time", lambda **kw: pytest.fail("the benchmark ran"))
    code, _, err = run_cli(["bench", "qprobe-fit", "--json", str(tmp_path)], monkeypatch, capsys)
    one_line_error(code, err, "--json", "is a directory")


# ------------------------------------------------------------------------------ the CLI's shape
@pytest.mark.parametrize("command, absent", [
    ("sft", []), ("rm", ["--kind"]), ("rm-ensemble", ["--kind", "--lora"]), ("dpo", []), ("kto", []),
])
def test_training_commands_list_the_shared_flags(command, absent, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run_cli([command, "--help"], monkeypatch, capsys)
    assert code == 0
    options = {word.rstrip(",") for line in out.splitlines() for word in line.replace("│", " ").split()
               if word.startswith("--")}
    for flag in SHARED:
        name = flag.decls[0].split("/")[0]
        assert (name in options) == (name not in absent), (command, name)
    assert {"--recipe", "--set", "--dry-run"} <= options


def test_command_specific_flags_and_defaults_come_from_the_config(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "200")
    _, dpo, _ = run_cli(["dpo", "--help"], monkeypatch, capsys)
    _, kto, _ = run_cli(["kto", "--help"], monkeypatch, capsys)
    _, ens, _ = run_cli(["rm-ensemble", "--help"], monkeypatch, capsys)
    assert "--beta" in dpo and "--preference" in dpo and "--desirable-weight" not in dpo
    assert "--desirable-weight" in kto and "--preference" not in kto
    assert "--n-members" in ens and "--member-loss" in ens and "(default 5)" in ens
    assert "(default 1e-06)" in dpo  # the DPO learning-rate default, not SFT's


def test_flags_reach_their_config_keys(monkeypatch, capsys):
    argv = ["kto", "--beta", "0.25", "--desirable-weight", "2", "--lr", "3e-4", "--lora", "--lora-r", "4",
            "--columns", "prompt=q", "--max-samples", "7", "--dry-run"]
    code, out, err = run_cli(argv, monkeypatch, capsys)
    assert code == 0, err
    for line in ("beta: 0.25", "desirable_weight: 2.0", "learning_rate: 0.0003", "enabled: true", "r: 4",
                 "prompt: q", "max_samples: 7"):
        assert line in out, line


def test_no_qprobe_help_cites_a_file_users_do_not_have(monkeypatch, capsys):
    for argv in (["qprobe", "--help"], ["--help"], ["quickstart", "--help"]):
        code, out, _ = run_cli(argv, monkeypatch, capsys)
        assert code == 0 and "ALGORITHMS.md" not in out and "30 s" not in out


def _imports_torch(code: str) -> bool:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    script = f"import sys\n{code}\nprint('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1] == "True"


def _cli(argv: list[str]) -> str:
    return (f"from alignkit.cli import main\nsys.argv = ['alignkit', *{argv!r}]\n"
            "try:\n    main()\nexcept SystemExit:\n    pass")


def test_the_cli_and_the_trainer_table_do_not_import_torch():
    assert not _imports_torch("import alignkit.cli, alignkit.trainers")
    assert not _imports_torch(_cli(["--help"]))
    assert not _imports_torch(_cli(["recipes", "validate", "sft-tiny", "rm-ensemble-tiny", "dpo-tiny", "kto-tiny"]))


def test_validating_every_recipe_does_not_import_torch():
    """Also the quickstart recipe: quickstart.py imports torch inside its functions (the layer branch)."""
    assert not _imports_torch(_cli(["recipes", "validate"]))


def test_a_dry_run_does_not_import_torch():
    assert not _imports_torch(_cli(["run", "sft-tiny", "--dry-run"]))
