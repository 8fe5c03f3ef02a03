"""`alignkit models` and `alignkit env`: what this machine has (model aliases, versions, devices, extras)."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from alignkit.cli.common import app, console


@app.command("models")
def models_cmd() -> None:
    """List the model aliases (the papers' models), the built-ins, and whether each is available here."""
    from alignkit import model_names

    table = Table(title="alignkit models")
    for col in ("name", "source", "kind", "available", "notes"):
        table.add_column(col)
    for row in model_names.list_models():
        table.add_row(row["name"], row["source"], row["kind"], "yes" if row["available"] else "no", row["notes"])
    console.print(table)


@app.command()
def env() -> None:
    """Versions, devices and which optional extras are installed."""
    import importlib.metadata as md
    import importlib.util
    import platform

    import torch

    table = Table(title="alignkit env", show_header=False)
    table.add_row("python", platform.python_version())
    for pkg in ("alignkit", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "safetensors"):
        try:
            table.add_row(pkg, md.version(pkg))
        except md.PackageNotFoundError:
            table.add_row(pkg, "[red]missing[/red]")
    table.add_row("cpu threads", str(torch.get_num_threads()))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            table.add_row(f"cuda:{i}", f"{p.name}, {p.total_memory / 2**30:.0f} GiB, bf16 "
                          f"{'yes' if torch.cuda.is_bf16_supported() else 'no'}")
    else:
        table.add_row("gpu", "none (training runs on CPU in fp32)")
    for extra, module in (("deepspeed", "deepspeed"), ("pairrm", "llm_blender")):
        found = importlib.util.find_spec(module) is not None
        table.add_row(
            escape(f"extra [{extra}]"),
            "installed" if found else escape(f"not installed: pip install 'alignkit[{extra}]'"),
        )
    console.print(table)
