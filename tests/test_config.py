"""Config blocks, recipes and overrides: precedence, unknown keys with suggestions, range checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignkit.cli import recipes_dir, validate_recipe
from alignkit.config import build_config, parse_override, read_recipe
from alignkit.errors import UserError
from alignkit.quickstart import QuickstartConfig
from alignkit.trainers import TRAINERS
from alignkit.trainers.sft import SFTConfig


def test_precedence_defaults_recipe_overrides_flags():
    recipe = {"command": "sft", "train": {"learning_rate": 1e-3, "epochs": 2}, "model": {"name": "tiny"}}
    cfg = build_config(SFTConfig, recipe, ["train.epochs=3", "train.batch_size=4"], {"train.batch_size": 16})
    assert cfg.train.learning_rate == 1e-3  # recipe over default
    assert cfg.train.epochs == 3  # override over recipe
    assert cfg.train.batch_size == 16  # flag over override
    assert cfg.train.max_length == 512  # default kept


def test_override_values_are_yaml_scalars():
    assert parse_override("train.learning_rate=1e-4") == ("train.learning_rate", 1e-4)
    assert parse_override("model.lora.enabled=true") == ("model.lora.enabled", True)
    assert parse_override("model.lora.target_modules=[q_proj, v_proj]")[1] == ["q_proj", "v_proj"]
    with pytest.raises(UserError, match="key=value"):
        parse_override("train.learning_rate")


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.learnin_rate=1", 'did you mean "learning_rate"'),
        ("trian.epochs=1", 'did you mean "train"'),
        ("model.lora.rank=4", 'did you mean "r"'),
    ],
)
def test_unknown_override_key_names_the_closest(override, message):
    with pytest.raises(UserError, match=message):
        build_config(SFTConfig, {}, [override])


def test_unknown_recipe_key_names_the_closest(tmp_path: Path):
    f = tmp_path / "r.yaml"
    f.write_text("# alignkit run r\ncommand: sft\ntrain:\n  epoch: 2\n")
    with pytest.raises(UserError, match=r"unknown key 'train.epoch'.*did you mean \"epochs\""):
        build_config(SFTConfig, read_recipe(f), origin=str(f))


@pytest.mark.parametrize(
    "flags, field",
    [
        ({"train.learning_rate": -1.0}, "train.learning_rate"),
        ({"train.batch_size": 0}, "train.batch_size"),
        ({"data.eval_fraction": 1.5}, "data.eval_fraction"),
        ({"model.dtype": "float8"}, "model.dtype"),
        ({"launch.accelerate_config": "zero4"}, "launch.accelerate_config"),
    ],
)
def test_out_of_range_values_name_the_field(flags, field):
    with pytest.raises(UserError, match=field.replace(".", r"\.")):
        build_config(SFTConfig, {}, None, flags)


def test_cross_field_check():
    with pytest.raises(UserError, match="overwrite and output.resume"):
        build_config(SFTConfig, {}, None, {"output.overwrite": True, "output.resume": True})


def test_invalid_yaml_names_the_line(tmp_path: Path):
    f = tmp_path / "bad.yaml"
    f.write_text("command: sft\ntrain:\n  epochs: [1\n")
    with pytest.raises(UserError, match="bad.yaml line"):
        read_recipe(f)


def test_every_shipped_recipe_validates():
    files = sorted(recipes_dir().glob("*.yaml"))
    assert files, "no recipes shipped"
    commands = set()
    for f in files:
        cfg = validate_recipe(f)
        if cfg.command == "pipeline":  # a pipeline recipe: the commands of its steps
            commands.update(s.command for s in cfg.steps)
        else:
            commands.add(cfg.command)
        assert f.read_text().startswith("# alignkit"), f"{f.name} must open with the command that runs it"
    assert set(TRAINERS) <= commands, "every command needs at least one recipe"


def test_quickstart_recipe_matches_the_quickstart_defaults():
    shipped = validate_recipe(recipes_dir() / "quickstart.yaml")
    assert shipped.model_dump() == QuickstartConfig().model_dump()


def test_recipe_needs_header_comment(tmp_path: Path):
    f = tmp_path / "noheader.yaml"
    f.write_text("command: sft\n")
    with pytest.raises(UserError, match="first line"):
        validate_recipe(f)


@pytest.mark.parametrize("recipe", sorted(p.stem for p in recipes_dir().glob("*.yaml")))
def test_every_recipe_dry_runs_without_downloading(recipe, monkeypatch, capsys, tmp_path):
    """`alignkit run NAME --dry-run` resolves the config and prints the plan: no download, no writes."""
    import sys

    from alignkit import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["alignkit", "run", recipe, "--dry-run"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    out = capsys.readouterr().out
    assert exit_info.value.code in (0, None), out
    command = validate_recipe(recipes_dir() / f"{recipe}.yaml").command
    assert "nothing is downloaded or written" in out and f"command: {command}" in out
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------- values that used to be misread
def test_a_plain_model_value_is_the_model_name_even_when_a_flag_sets_a_model_key():
    recipe = {"command": "sft", "model": "mistral-7b"}
    cfg = build_config(SFTConfig, recipe, ["model.lora.r=4"], {"model.lora.enabled": True})
    assert cfg.model.name == "mistral-7b" and cfg.model.lora.enabled and cfg.model.lora.r == 4
    assert build_config(SFTConfig, {}, ["model=tiny-too"]).model.name == "tiny-too"


@pytest.mark.parametrize("recipe, overrides, flags", [
    ({"train": 5}, None, {"train.learning_rate": 1e-3}),
    ({"train": 5}, None, None),
    ({}, ["train=5"], {"train.learning_rate": 1e-3}),
    ({"model": {"lora": "yes"}}, None, {"model.lora.r": 4}),
    ({"model": 7}, None, {"model.dtype": "float32"}),
])
def test_a_section_given_a_plain_value_is_an_error(recipe, overrides, flags):
    with pytest.raises(UserError, match="is a section of keys"):
        build_config(SFTConfig, {"command": "sft", **recipe}, overrides, flags)


@pytest.mark.parametrize("override, field", [
    ("train.max_steps=true", "train.max_steps"),
    ("train.epochs=false", "train.epochs"),
    ("data.max_samples=true", "data.max_samples"),
    ("model.lora.enabled=1", "model.lora.enabled"),
    ("train.learning_rate=.inf", "train.learning_rate"),
    ("train.learning_rate=nan", "train.learning_rate"),
    ("train.warmup_ratio=.nan", "train.warmup_ratio"),
    ("train.seed=-1", "train.seed"),
    ("data.seed=-1", "data.seed"),
])
def test_bools_for_numbers_non_finite_numbers_and_negative_seeds_are_refused(override, field):
    with pytest.raises(UserError, match=field.replace(".", r"\.")):
        build_config(SFTConfig, {}, [override])


def test_a_non_utf8_recipe_is_one_error_naming_the_file(tmp_path: Path):
    f = tmp_path / "latin1.yaml"
    f.write_bytes("# alignkit run latin1\ncommand: sft\nmodel:\n  name: café\n".encode("latin-1"))
    with pytest.raises(UserError, match="latin1.yaml: not UTF-8"):
        read_recipe(f)
