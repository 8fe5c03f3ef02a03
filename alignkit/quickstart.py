"""`alignkit quickstart`: the whole loop on the built-in task in a few minutes on a laptop CPU.

Builds the tiny model, runs SFT on the built-in review task, samples from the untrained and the SFT
policy on held-out prompts, scores both with the gold reward, and prints/writes the comparison.
Later algorithms add their rows (one `Row` each) to the same table.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import Field, model_validator

from alignkit.config import Block, DataSection, JobConfig, TrainSection


class QuickstartEval(Block):
    n_prompts: int = Field(64, ge=1, description="held-out prompts to sample")
    k: int = Field(4, ge=1, description="samples per prompt")
    max_new_tokens: int = Field(48, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    seed: int = Field(1234, description="seed of the held-out prompts and of sampling")


class QuickstartTrain(TrainSection):
    # re-declared with their constraints: a bare default would drop the base class's checks
    learning_rate: float = Field(3e-3, gt=0.0)
    epochs: float = Field(3.0, gt=0.0)
    batch_size: int = Field(32, ge=1)
    max_length: int = Field(128, ge=8)
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0)


class QuickstartData(DataSection):
    source: str = "builtin:sft"
    max_samples: int | None = Field(3000, ge=1)


class QuickstartConfig(JobConfig):
    command: str = "quickstart"
    REPORTS_ITSELF: ClassVar[bool] = True  # prints its own comparison table
    data: QuickstartData = Field(default_factory=QuickstartData)
    train: QuickstartTrain = Field(default_factory=QuickstartTrain)
    eval: QuickstartEval = Field(default_factory=QuickstartEval)

    @model_validator(mode="after")
    def _single_process(self) -> QuickstartConfig:
        if self.launch.num_processes != 1 or self.launch.accelerate_config is not None:
            raise ValueError("the quickstart runs in one process: drop launch.num_processes/accelerate_config")
        return self


def evaluate_policy(model: Any, tokenizer: Any, prompts: list[str], ev: QuickstartEval) -> dict[str, Any]:
    """Sample k completions per prompt and score them with the built-in task's gold reward."""
    from alignkit import arena, generation

    stats: dict[str, float] = {}
    samples = generation.generate(
        model, tokenizer, prompts, k=ev.k, max_new_tokens=ev.max_new_tokens, temperature=ev.temperature,
        seed=ev.seed, progress=True, stats=stats,
    )
    texts = [s.completion for s in samples]
    finished = [s.finished for s in samples]
    gold = arena.gold_reward(texts, finished)
    return {
        "gold": gold,
        "gold_mean": float(gold.mean()),
        "gold_sd": float(gold.std()),
        "eos_rate": float(np.mean(finished)),
        "repetition_rate": float(arena.repetition_rate(texts).mean()),
        "samples_per_s": stats["samples_per_s"],
        "example": texts[0],
    }


def heldout_prompts(sft_cfg: Any, n: int, seed: int) -> list[str]:
    """n prompts of the built-in task that the SFT data never showed (sampled without replacement)."""
    import random

    from alignkit import arena, data

    ds, _ = data.load_source(sft_cfg.data)
    seen = set(ds["prompt"])
    pool = [p for p, _ in arena.all_prompts() if p not in seen]
    return random.Random(seed).sample(pool, min(n, len(pool)))


def run(cfg: QuickstartConfig, progress: Any | None = None, console: Any | None = None) -> dict[str, Any]:
    from rich.console import Console
    from rich.table import Table

    from alignkit import models
    from alignkit.config import to_yaml
    from alignkit.runs import RunDir
    from alignkit.trainers import sft

    console = console or Console()
    t0 = time.perf_counter()
    out = Path(cfg.output.dir or "runs/quickstart")  # a fixed default: `make quickstart` overwrites it
    RunDir.check(out, cfg.output.overwrite, resume=False)
    console.print("[bold]1/4[/bold] building the tiny model (cached after the first time)")
    base_dir = models.resolve(cfg.model.name)
    if not Path(base_dir).is_dir():
        models.load_tokenizer(base_dir)  # a hub id: fails with one line while offline, before writing
    sft_cfg = sft.SFTConfig(
        model=cfg.model, data=cfg.data.model_dump(), train=cfg.train.model_dump(),
        output={"dir": str(out.with_name(out.name + ".partial") / "sft")},
    )
    prompts = heldout_prompts(sft_cfg, cfg.eval.n_prompts, cfg.eval.seed)  # validates the data too
    run_dir = RunDir.open(out, cfg.output.overwrite, False, to_yaml(cfg))

    console.print("[bold]2/4[/bold] SFT on the built-in review task")
    t_sft = time.perf_counter()
    sft_summary = sft.run(sft_cfg, progress=progress)
    sft_seconds = time.perf_counter() - t_sft

    console.print("[bold]3/4[/bold] sampling from the untrained and the SFT policy")
    rows: dict[str, dict[str, Any]] = {}
    for name, path in (("untrained", base_dir), ("sft", str(run_dir.path("sft", "model")))):
        model, tok = models.load_causal_lm(path, dtype=cfg.model.dtype, device=cfg.model.device)
        rows[name] = evaluate_policy(model, tok, prompts, cfg.eval)

    console.print("[bold]4/4[/bold] scoring with the gold reward")
    table = Table(title=f"quickstart: built-in review task, {cfg.eval.n_prompts} prompts x {cfg.eval.k} samples")
    for col in ("policy", "gold reward (mean ± sd)", "EOS rate", "repetition", "samples/s"):
        table.add_column(col)
    for name, r in rows.items():
        table.add_row(
            name, f"{r['gold_mean']:+.3f} ± {r['gold_sd']:.3f}", f"{r['eos_rate']:.0%}",
            f"{r['repetition_rate']:.0%}", f"{r['samples_per_s']:.0f}",
        )
    console.print(table)
    for name, r in rows.items():
        console.print(f"  {name:>9}: {r['example'][:100]!r}", highlight=False)
    _plot(rows, run_dir.path("plots", "gold_reward.png"))
    summary = {
        "command": "quickstart",
        "policies": {k: {m: v for m, v in r.items() if m != "gold"} for k, r in rows.items()},
        "sft": {k: sft_summary[k] for k in ("steps", "train_loss", "last_loss", "train_samples_per_s")},
        "sft_seconds": sft_seconds,
        "wall_seconds": time.perf_counter() - t0,
    }
    final = run_dir.finish(summary, readme="# quickstart\n\nSee summary.json and plots/gold_reward.png.\n")
    console.print(f"wall time {summary['wall_seconds']:.0f} s; results in {final}/")
    return {**summary, "output_dir": str(final)}


def _plot(rows: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    bins = np.linspace(-2.5, 1.0, 36)
    for name, r in rows.items():
        ax.hist(np.clip(r["gold"], -2.5, 1.0), bins=bins, alpha=0.55, label=f"{name} ({r['gold_mean']:+.2f})")
    ax.set_xlabel("gold reward")
    ax.set_ylabel("samples")
    ax.set_title("built-in task: gold reward of samples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
