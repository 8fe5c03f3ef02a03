"""What every trainer built on a transformers/TRL `Trainer` shares: TrainingArguments from our config
blocks, metrics streamed into the run directory, a loss plot, data-parallel bookkeeping, resume.

SFT, reward modelling, DPO/IPO and KTO all go through these (that is their three-plus call sites).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from alignkit.config import JobConfig
from alignkit.runs import RunDir, last_checkpoint


def training_args(cfg: JobConfig, run: RunDir, bf16: bool) -> dict[str, Any]:
    """Keyword arguments for a TRL `*Config` (a `TrainingArguments` subclass) from our blocks."""
    t = cfg.train
    return dict(
        output_dir=str(run.work / "checkpoints"),
        learning_rate=t.learning_rate,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float < 1 is a ratio of the total steps
        weight_decay=t.weight_decay,
        lr_scheduler_type=t.lr_scheduler,
        gradient_checkpointing=t.gradient_checkpointing,
        logging_steps=t.logging_steps,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_only_model=False,
        seed=t.seed,
        data_seed=t.seed,
        bf16=bf16,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=cfg.model.device == "cpu",
    )


class RunDirMetrics(TrainerCallback):
    """Streams the trainer's logs into metrics.jsonl and a rich progress line."""

    def __init__(self, run: RunDir, progress: Any | None = None):
        self.run = run
        self.progress = progress
        self.task = None
        self.t0 = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        if self.progress is not None and state.is_world_process_zero:
            self.task = self.progress.add_task("training", total=state.max_steps, completed=state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.task is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        row.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})
        row["elapsed_s"] = round(time.perf_counter() - self.t0, 3)
        self.run.log(row)


class ShardRecorder:
    """Wraps a data collator and fingerprints every example this rank trains on.

    Used to report (and test) real data parallelism: with N processes each rank must see a different
    shard. Cost: one hash of the input ids per example.
    """

    def __init__(self, collator):
        self.collator = collator
        self.fingerprints: list[str] = []

    def __call__(self, features):
        for f in features:
            ids = f.get("input_ids", f.get("chosen_input_ids", f.get("prompt_input_ids")))
            if ids is not None:
                self.fingerprints.append(hashlib.sha1(str(list(ids)).encode()).hexdigest()[:16])
        return self.collator(features)


def gather_shards(recorder: ShardRecorder) -> dict[str, Any] | None:
    """On every rank: gather fingerprints; returns the data-parallel report (None when 1 process)."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState()
    if state.num_processes < 2:
        return None
    per_rank = gather_object([sorted(set(recorder.fingerprints))])
    sets = [set(s) for s in per_rank]
    overlap = len(set.intersection(*sets)) if sets else 0
    return {
        "world_size": state.num_processes,
        "examples_per_rank": [len(s) for s in sets],
        "examples_seen_by_every_rank": overlap,
    }


def resume_checkpoint(run: RunDir) -> str | None:
    return last_checkpoint(run.work) if run.resumed else None


def loss_plot(metrics: list[dict[str, Any]], path: Path, keys: tuple[str, ...] = ("loss",), title: str = "") -> None:
    """A PNG of the logged training curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for key in keys:
        pts = [(m["step"], m[key]) for m in metrics if key in m]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=".", label=key)
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
