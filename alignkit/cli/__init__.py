"""The `alignkit` command line: parse → build a config → trainer.run(config) → print the summary.

Thin on purpose (docs/architecture.md): one module per command group (train.py: the trainers and
`run`; sampling.py: eval, generate, pairs; data.py; recipes.py; info.py: models, env; bench.py;
qprobe.py), the shared training flags declared once (flags.py), libraries imported inside the
commands so that `--help` answers at once. `main` holds the error contract: bad input is ONE line
on stderr with exit code 2 (a traceback only with `--debug`).
"""

from __future__ import annotations

import sys

from alignkit.cli import bench, data, info, qprobe, recipes, sampling, train  # noqa: F401  (they register commands)
from alignkit.cli.common import app, err_console
from alignkit.cli.common import state as _state
from alignkit.cli.recipes import recipes_dir, validate_recipe
from alignkit.errors import UserError

__all__ = ["app", "main", "recipes_dir", "validate_recipe"]


def main() -> None:
    """Console entry point: the error contract lives here (usage errors are click's: exit 2)."""
    try:
        app()  # standalone: click prints usage errors and exits 2, typer.Exit(n) exits n
    except UserError as exc:
        if _state["debug"]:
            raise
        from alignkit.launch import rank_info

        rank = rank_info()
        where = "" if rank["is_main"] else f" (rank {rank['rank']})"
        from rich.markup import escape  # '[pairrm]' in "pip install 'alignkit[pairrm]'" is text, not markup

        err_console.print(f"[bold red]error{where}:[/bold red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
