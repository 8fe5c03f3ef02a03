"""`alignkit data inspect/convert`: the shared dataset loader (the alignkit/data package) from the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from alignkit.cli.common import ColumnsOpt, KindOpt, app, check_output_file, console

data_app = typer.Typer(help="Inspect and convert datasets with the shared loader.", no_args_is_help=True)
app.add_typer(data_app, name="data")
SplitOpt = Annotated[str, typer.Option(help="split of a dataset dict / hub dataset")]


@data_app.command("inspect")
def data_inspect(
    source: Annotated[str, typer.Argument(help="file, saved dataset dir, hub id, or builtin:KIND")],
    kind: KindOpt = None,
    columns: ColumnsOpt = None,
    split: SplitOpt = "train",
) -> None:
    """Show the detected kind, columns, row count and one normalised row."""
    from alignkit import data

    ds, k = data.load(source, kind=kind, columns=columns, split=split)
    info = data.describe(ds, k)
    table = Table(title=f"{source}", show_header=False)
    for key, value in info.items():
        if key == "sample":
            continue
        table.add_row(key, json.dumps(value) if isinstance(value, list | dict) else str(value))
    console.print(table)
    console.print("[bold]sample (normalised)[/bold]:")
    console.print_json(json.dumps(info.get("sample"), default=str))


@data_app.command("convert")
def data_convert(
    source: Annotated[str, typer.Argument(help="file, saved dataset dir, hub id, or builtin:KIND")],
    out: Annotated[Path, typer.Argument(help="normalised JSONL to write")],
    kind: KindOpt = None,
    columns: ColumnsOpt = None,
    split: SplitOpt = "train",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace OUT if it exists")] = False,
) -> None:
    """Write the normalised dataset (canonical columns of its kind) as JSONL."""
    from alignkit import data

    check_output_file(out, overwrite, flag="OUT")
    ds, k = data.load(source, kind=kind, columns=columns, split=split)
    data.to_jsonl(ds, out)
    console.print(f"wrote {len(ds)} {k} rows to {out}")
