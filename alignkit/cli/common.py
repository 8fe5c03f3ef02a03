"""What every command module of the CLI shares: the typer app, the consoles, the options that mean
the same everywhere, the summary table, and the checks of an output file made before any work."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from alignkit.errors import UserError
from alignkit.runs import check_writable

console = Console()
err_console = Console(stderr=True)

# `alignkit --help` lists the commands in the order of the pipeline, whichever module registered them
ORDER = ("quickstart", "sft", "rm", "rm-ensemble", "dpo", "kto", "run", "eval", "generate", "pairs", "qprobe", "data",
         "recipes", "models", "env", "bench")


class _PipelineOrder(TyperGroup):
    def list_commands(self, ctx: Any) -> list[str]:
        names = super().list_commands(ctx)
        return sorted(names, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))


app = typer.Typer(
    name="alignkit",
    cls=_PipelineOrder,
    help="Align language models to preferences: SFT, reward ensembles (UP-RLHF), DPO/IPO/KTO, SPPO, Q-probe.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

state = {"debug": False}


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="show full tracebacks on errors")] = False,
) -> None:
    state["debug"] = debug or os.environ.get("ALIGNKIT_DEBUG") == "1"


# options that mean the same in every command that has them
RecipeOpt = Annotated[Path | None, typer.Option("--recipe", "-r", help="YAML recipe to start from")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override any config key: --set train.epochs=2")]
KindOpt = Annotated[str | None, typer.Option("--kind", help="sft, pairwise, unpaired, prompts or scored")]
ColumnsOpt = Annotated[str | None, typer.Option("--columns", help="column mapping: prompt=question,chosen=resp_j")]
MaxSamplesOpt = Annotated[int | None, typer.Option("--max-samples", help="use only the first N rows")]
OutOpt = Annotated[str | None, typer.Option("--output-dir", "-o", help="run directory (default runs/CMD-TIME)")]
OverwriteOpt = Annotated[bool | None, typer.Option("--overwrite", help="replace an existing run directory")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="seed (>= 0)")]
DtypeOpt = Annotated[str | None, typer.Option("--dtype", help="auto, float32, bfloat16 or float16")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda, cuda:N")]
DryOpt = Annotated[bool, typer.Option("--dry-run", help="resolve the config and print the plan only")]
OverwriteOutOpt = Annotated[bool, typer.Option("--overwrite", help="replace --out if it exists")]


def print_summary(title: str, summary: dict[str, Any]) -> None:
    """The scalar entries of a summary (nested results are in summary.json)."""
    table = Table(title=title, show_header=False)
    for k, v in summary.items():
        if isinstance(v, dict | list):
            continue
        table.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    console.print(table)


def check_seed(seed: int | None, flag: str = "--seed") -> None:
    if seed is not None and seed < 0:
        raise UserError(f"{flag} must be >= 0 (got {seed})")


def check_output_file(path: Path, overwrite: bool, flag: str = "--out") -> None:
    """Before any work: `path` can be written as a file (it is not a directory, no parent is a file,
    the first existing parent takes a new file) and is new unless `overwrite`.

    Writability is tried, not asked (os.access says yes to root on a read-only mount)."""
    if path.is_dir():
        raise UserError(f"{flag} {path} is a directory: give a file path (e.g. {path / 'out.jsonl'})")
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists: pass --overwrite or choose another {flag}")
    check_writable(path, flag)
