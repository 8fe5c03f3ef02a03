"""`alignkit recipes ls/show/validate/cp`, and how a recipe name becomes a file (`recipe_path`).

Shipped recipes live in recipes/ (a wheel carries them as alignkit/recipes/; or $ALIGNKIT_RECIPES);
`alignkit run NAME` lives in cli/train.py, a pipeline recipe's steps (`steps:`) in alignkit/pipeline.py.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from alignkit.cli.common import app, console
from alignkit.errors import UserError, closest

recipes_app = typer.Typer(help="List, show, validate and copy the shipped recipes.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")


def recipes_dir() -> Path:
    """$ALIGNKIT_RECIPES, else the recipes an installed wheel carries (alignkit/recipes/, copied from
    recipes/ at build time: pyproject.toml's force-include), else the checkout's recipes/ (editable or
    source installs)."""
    env = os.environ.get("ALIGNKIT_RECIPES")
    if env:
        return Path(env)
    package = Path(__file__).resolve().parents[1]
    packaged = package / "recipes"
    return packaged if packaged.is_dir() else package.parent / "recipes"


def shipped_recipes() -> list[Path]:
    """The recipe files of `recipes_dir()`; a missing directory is an error, not an empty list."""
    where = recipes_dir()
    if not where.is_dir():
        env = " (ALIGNKIT_RECIPES)" if os.environ.get("ALIGNKIT_RECIPES") else ""
        raise UserError(f"recipe directory {where}{env} does not exist: point ALIGNKIT_RECIPES at a directory")
    return sorted(where.glob("*.yaml"))


def recipe_path(name: str) -> Path:
    """A recipe file from a path or the name of a shipped recipe (with or without .yaml)."""
    p = Path(name)
    if p.is_file():
        return p
    for cand in (recipes_dir() / name, recipes_dir() / f"{name}.yaml"):
        if cand.is_file():
            return cand
    names = [f.stem for f in recipes_dir().glob("*.yaml")]
    raise UserError(f"recipe '{name}' not found{closest(Path(name).stem, names)} (see `alignkit recipes ls`)")


def recipe_command(path: Path, tree: dict[str, Any] | None = None) -> str:
    """The `command:` of a recipe (read from `path` unless its `tree` is given), checked against the table."""
    from alignkit.config import read_recipe
    from alignkit.trainers import TRAINERS

    command = (read_recipe(path) if tree is None else tree).get("command")
    if command not in TRAINERS:
        raise UserError(f"{path}: 'command' must be one of {sorted(TRAINERS)}{closest(str(command), TRAINERS)}")
    return command


def validate_recipe(path: Path) -> Any:
    """Validate one recipe file; returns the resolved config (a `pipeline.Pipeline` for a pipeline recipe:
    every step's config, every reference resolved)."""
    from alignkit import pipeline
    from alignkit.config import build_config, read_recipe, read_text
    from alignkit.trainers import config_class

    tree = read_recipe(path)
    command = None if pipeline.is_pipeline(tree) else recipe_command(path, tree)
    text = read_text(path)
    first = text.lstrip().splitlines()[0] if text.strip() else ""
    if not (first.startswith("#") and "alignkit" in first):
        raise UserError(f"{path}: the first line must be a comment with the command that runs it")
    if command is None:
        return pipeline.load(tree, str(path))
    return build_config(config_class(command), tree, origin=str(path))


@recipes_app.command("ls")
def recipes_ls() -> None:
    """List the shipped recipes with their command and first-line description."""
    import yaml

    from alignkit.config import read_text

    files = shipped_recipes()
    table = Table(title=f"recipes in {recipes_dir()}")
    for col in ("name", "command", "runs with"):
        table.add_column(col)
    for f in files:
        text = read_text(f)
        try:
            tree = yaml.safe_load(text)
        except yaml.YAMLError:
            tree = None
        command = tree.get("command") if isinstance(tree, dict) else "(invalid: see `alignkit recipes validate`)"
        if isinstance(tree, dict) and isinstance(tree.get("steps"), dict):  # a pipeline: its steps in order
            command = "pipeline: " + " → ".join(map(str, tree["steps"]))
        first = text.splitlines()[0].lstrip("# ").strip() if text.strip() else ""
        table.add_row(f.stem, str(command), first)
    console.print(table)


@recipes_app.command("show")
def recipes_show(name: Annotated[str, typer.Argument(help="recipe name or path")]) -> None:
    """Print a recipe file."""
    from alignkit.config import read_text

    console.print(read_text(recipe_path(name)), markup=False, highlight=False)


@recipes_app.command("validate")
def recipes_validate(
    names: Annotated[list[str] | None, typer.Argument(help="recipes to check (default: all shipped)")] = None,
) -> None:
    """Validate recipes against their command's config (unknown keys, ranges, cross-field rules)."""
    paths = [recipe_path(n) for n in names] if names else shipped_recipes()
    for p in paths:
        validate_recipe(p)
        console.print(f"[green]ok[/green] {p}")


@recipes_app.command("cp")
def recipes_cp(
    name: Annotated[str, typer.Argument(help="recipe to copy")],
    dest: Annotated[Path, typer.Argument(help="file or directory to copy to")],
) -> None:
    """Copy a shipped recipe to edit it."""
    from alignkit.cli.common import check_output_file

    src = recipe_path(name)
    target = dest / src.name if dest.is_dir() else dest
    if target.exists():
        raise UserError(f"{target} already exists: choose another destination")
    check_output_file(target, overwrite=False, flag="DEST")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, target)
    console.print(f"copied {src} -> {target}")
