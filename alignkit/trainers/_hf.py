"""What every trainer built on a transformers/TRL `Trainer` shares: TrainingArguments from our config
blocks, metrics streamed into the run directory, a loss plot, data-parallel bookkeeping, resume, and
the run's safety rails: a stop on non-finite loss or weights, a resume hint on Ctrl-C, a `max_length`
capped at the model's positions.

SFT, reward modelling, DPO/IPO and KTO all go through these (that is their three-plus call sites).
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from alignkit.config import JobConfig
from alignkit.errors import TrainingDiverged
from alignkit.runs import RunDir, last_checkpoint
from alignkit.tracking import PROJECT


def training_args(cfg: JobConfig, run: RunDir, bf16: bool) -> dict[str, Any]:
    """Keyword arguments for a TRL `*Config` (a `TrainingArguments` subclass) from our blocks, then the
    recipe's `trainer:` keys (checked: `config.check_trainer_block`; none may be a key set here from a
    block, and one that replaces a default of `config.ALIGNKIT_DEFAULTS` is said on stderr)."""
    from alignkit.config import check_trainer_block

    t = cfg.train
    args = dict(
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
        gradient_checkpointing=t.gradient_checkpointing,  # explicit: TRL's configs default to True
        max_grad_norm=t.max_grad_norm,
        **({"optim": t.optim} if t.optim else {}),  # None: transformers' default (fused AdamW on recent torch)
        logging_steps=t.logging_steps,
        eval_steps=t.eval_steps,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit,
        save_only_model=False,
        seed=t.seed,
        data_seed=t.seed,
        bf16=bf16,
        report_to=report_to(cfg, run),
        run_name=run.final.name,
        # trackio's project (wandb's: WANDB_PROJECT, see report_to); only then: older transformers lack the field
        **({"project": PROJECT} if cfg.output.report_to == "trackio" else {}),
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=cfg.model.device != "cpu" and _cuda(),
        logging_first_step=True,
        logging_nan_inf_filter=False,  # a NaN loss must reach the log (and DivergenceGuard), not be averaged away
        ddp_find_unused_parameters=False,
        use_cpu=cfg.model.device == "cpu",
    )
    passed = check_trainer_block(cfg)
    if run.is_main:
        for key in sorted(passed.keys() & args.keys()):  # only ALIGNKIT_DEFAULTS get here (JobConfig._check_trainer)
            print(f"note: trainer.{key}={passed[key]!r} replaces alignkit's default {args[key]!r}", file=sys.stderr)
    return {**args, **passed}


def eval_strategy(cfg: JobConfig, eval_split: Any) -> str:
    """When the trainer evaluates: every `train.eval_steps` steps, else once per epoch; never without
    a held-out split (`data.eval_fraction`)."""
    if eval_split is None:
        return "no"
    return "steps" if cfg.train.eval_steps else "epoch"


def report_to(cfg: JobConfig, run: RunDir) -> str:
    """`output.report_to` for transformers' `report_to`; TensorBoard writes into DIR/tensorboard (the
    callback reads TENSORBOARD_LOGGING_DIR; its default would be inside the checkpoints, deleted at the end)."""
    import os

    from alignkit.tracking import TENSORBOARD_DIR, require

    kind = cfg.output.report_to
    require(kind)
    if kind == "tensorboard":
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run.work / TENSORBOARD_DIR)
    if kind == "wandb":  # the loops' project too (tracking.py); the user's own WANDB_PROJECT wins
        os.environ.setdefault("WANDB_PROJECT", PROJECT)
    return kind


def begin(cfg: JobConfig) -> tuple[str, bool]:
    """Every trainer's first step: quiet the libraries, pick the run directory, and (on the main
    rank, before anything is loaded) refuse what the run-directory contract refuses.
    Returns (output dir, is_main). The rank comes from the launcher's environment: no accelerate
    state may exist before the TrainingArguments, which configure it (gloo on CPU)."""
    from alignkit.config import check_trainer_block, to_yaml
    from alignkit.launch import rank_info
    from alignkit.runs import default_dir
    from alignkit.tracking import require

    check_trainer_block(cfg)  # cheap checks before anything is loaded
    require(cfg.output.report_to)
    quiet_libraries()
    if cfg.model.load_in_4bit:  # no bitsandbytes, or none that runs 4-bit here: one line before the data loads
        from alignkit.models import check_load_in_4bit

        check_load_in_4bit(cfg.model.device)
    out = cfg.output.dir or str(default_dir(cfg.command))
    is_main = rank_info()["is_main"]
    if is_main:  # also: is another process on this run? on --resume, does the checkpoint honour the settings?
        RunDir.check(Path(out), cfg.output.overwrite, cfg.output.resume, to_yaml(cfg))
    return out, is_main


def cap_max_length(max_length: int, model, what: str = "train.max_length") -> int:
    """`max_length` capped at the model's position limit (`models.max_positions`): longer sequences
    would index past the position table. One warning line when it caps."""
    from alignkit.launch import rank_info
    from alignkit.models import max_positions

    limit = max_positions(model)
    if limit is None or max_length <= limit:
        return max_length

    if rank_info()["is_main"]:
        print(f"warning: {what}={max_length} is beyond the model's {limit} positions: using {limit}",
              file=sys.stderr)
    return limit


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def quiet_libraries() -> None:
    """alignkit shows its own rich progress: silence datasets'/transformers' bars and info logs."""
    import warnings

    import datasets
    import transformers

    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)
    datasets.disable_progress_bars()
    import huggingface_hub

    huggingface_hub.utils.logging.set_verbosity_error()  # no "Retrying in Ns" lines before our one-line error
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def drop_printer(trainer) -> None:
    """With tqdm off, transformers prints every log dict; metrics go to metrics.jsonl instead."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)


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


class DivergenceGuard(TrainerCallback):
    """Stops training at the first logged loss, gradient norm or eval loss that is not finite (every
    rank sees the same, already reduced values). `fit` adds it to every trainer."""

    KEYS = ("loss", "grad_norm", "train_loss", "eval_loss")

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in self.KEYS:
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                raise TrainingDiverged(state.global_step, key, value, learning_rate=args.learning_rate)


def check_weights(trainer) -> None:
    """Raise TrainingDiverged when a trained parameter holds NaN/inf (checked before anything is saved)."""
    import torch

    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if param.requires_grad and param.numel() and not bool(torch.isfinite(param).all()):
                raise TrainingDiverged(trainer.state.global_step, f"parameter {name}", "not finite",
                                       learning_rate=trainer.args.learning_rate)


class ShardRecorder:
    """Wraps a data collator and fingerprints every example this rank trains on.

    Used to report (and test) real data parallelism: with N processes each rank must see a different
    shard. The report covers the whole run: the sampler reshuffles every epoch, so ranks share
    examples across epochs, and accelerate repeats a few to even out the last batch. Cost: one hash
    per example, only in multi-process runs.
    """

    def __init__(self, collator):
        self.collator = collator
        self.fingerprints: list[str] = []

    def __call__(self, features):
        for f in features:  # every field (e.g. chosen_ids AND rejected_ids): duplicates are rare
            key = repr([(k, list(v) if hasattr(v, "__len__") else v) for k, v in sorted(f.items())])
            self.fingerprints.append(hashlib.sha1(key.encode()).hexdigest()[:16])
        return self.collator(features)


def record_shards(trainer) -> ShardRecorder | None:
    """Fingerprint each rank's examples, only in a multi-process run (it costs ~1.5 ms a batch)."""
    if trainer.accelerator.num_processes < 2:
        return None
    trainer.data_collator = ShardRecorder(trainer.data_collator)
    return trainer.data_collator


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


def save_final(trainer, tokenizer, run: RunDir, title: str, subdir: str = "model") -> list[dict[str, Any]]:
    """Save weights (safetensors; a peft adapter for LoRA) + tokenizer and plots/loss.png; drop what a
    finished run does not need (the resume checkpoints, transformers' pickled training_args.bin).
    Returns the logged metrics. Every rank calls it; rank 0 writes."""
    import shutil

    target = run.path(subdir)
    trainer.save_model(str(target))
    metrics = run.read_metrics()
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(target))
        (target / "training_args.bin").unlink(missing_ok=True)
        shutil.rmtree(run.path("checkpoints"), ignore_errors=True)
        loss_plot(metrics, run.path("plots", "loss.png"), title=title)
    trainer.accelerator.wait_for_everyone()
    return metrics


def training_summary(trainer, result, metrics: list[dict[str, Any]], trainable: int, total: int) -> dict[str, Any]:
    """The summary.json entries every trainer reports: steps, losses, time, throughput, GPU memory, sizes."""
    resumed_from = result.metrics.get("resumed_from_step", 0)
    return {
        "steps": trainer.state.global_step,
        "train_loss": whole_run_loss(metrics, resumed_from, result.training_loss, trainer.state.global_step),
        **({"resumed_from_step": resumed_from} if resumed_from else {}),
        **loss_summary(metrics),
        "train_runtime_s": result.metrics.get("train_runtime"),
        "train_samples_per_s": result.metrics.get("train_samples_per_second"),
        **token_throughput(metrics, resumed_from, result.metrics.get("train_runtime")),
        "peak_gpu_memory_gib": result.metrics.get("peak_gpu_memory_gib"),
        "trainable_params": trainable,
        "total_params": total,
        "trainable_pct": 100.0 * trainable / total,
        "world_size": trainer.accelerator.num_processes,
    }


def whole_run_loss(metrics: list[dict[str, Any]], resumed_from: int, segment_loss: float, steps: int) -> float:
    """The mean training loss over the whole run. transformers' `training_loss` covers only the steps
    this process trained (after a resume: from the checkpoint on); the steps before the checkpoint are
    counted from metrics.jsonl, each logged loss being the mean over its logging window (weighted by
    the window's length). Exact when train.save_steps is a multiple of train.logging_steps."""
    if not resumed_from:
        return segment_loss
    total, counted, last = 0.0, 0, 0
    for m in metrics:
        if m.get("loss") is not None and last < m["step"] <= resumed_from:
            total += m["loss"] * (m["step"] - last)
            counted += m["step"] - last
            last = m["step"]
    segment = steps - resumed_from
    return (total + segment_loss * segment) / max(counted + segment, 1)


def token_throughput(metrics: list[dict[str, Any]], resumed_from: int, runtime_s: float | None) -> dict[str, Any]:
    """`train_tokens` (TRL's `num_tokens`: non-padding tokens of every process) and `train_tokens_per_s`
    over this process's training time. TRL's count lives in the trainer, not the checkpoint, so it restarts
    at 0 on every resume: the tokens of this segment are the last count logged after the resumed step; the
    run's total adds, for each earlier segment (a drop in the count starts one), its count at its end, the
    last one at the resumed step (None when that step was not logged). Empty for trainers that log no
    `num_tokens`."""
    seen = [(m["step"], m["num_tokens"]) for m in metrics if m.get("num_tokens") is not None]
    segment = [t for step, t in seen if step > resumed_from]
    if not segment:
        return {}
    before: float | None = 0.0
    if resumed_from:
        earlier = [(step, t) for step, t in seen if step <= resumed_from]
        ends = [t for (_, t), (_, nxt) in zip(earlier, earlier[1:]) if nxt < t]  # counts where a resume reset it
        at_resume = next((t for step, t in earlier if step == resumed_from), None)
        before = None if at_resume is None else sum(ends) + at_resume
    return {"train_tokens": int(before + segment[-1]) if before is not None else None,
            "train_tokens_per_s": segment[-1] / runtime_s if runtime_s else None}


def loss_summary(metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """First and last logged training loss (evidence that the loss fell)."""
    losses = [(m["step"], m["loss"]) for m in metrics if m.get("loss") is not None]
    if not losses:
        return {}
    return {"first_loss": losses[0][1], "last_loss": losses[-1][1], "last_loss_step": losses[-1][0]}


def fit(trainer, run: RunDir):
    """The training loop every trainer shares: metrics to the run directory only (no printer), shard
    fingerprints in multi-process runs, resume from DIR.partial's newest complete checkpoint when asked,
    the peak GPU memory of the loop (`result.metrics["peak_gpu_memory_gib"]`, None on CPU).
    A non-finite loss or weight stops it (TrainingDiverged, DIR.partial marked `diverged`); Ctrl-C
    prints how to resume and propagates (the CLI exits 130).
    Returns (TrainOutput, data-parallel report or None)."""
    import torch

    drop_printer(trainer)
    trainer.add_callback(DivergenceGuard())
    recorder = record_shards(trainer)
    cuda = torch.cuda.is_available() and trainer.args.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(trainer.args.device)
    ckpt = resume_checkpoint(run)
    try:
        result = trainer.train(resume_from_checkpoint=ckpt)
        check_weights(trainer)
    except TrainingDiverged as exc:
        run.mark(diverged={"step": exc.step, "what": exc.what, "value": str(exc.value)})
        raise
    except KeyboardInterrupt:
        if run.is_main:
            print(_interrupt_hint(run, trainer.state.global_step, trainer.args.save_steps
                                 if trainer.args.save_strategy == "steps" else 0), file=sys.stderr, flush=True)
        raise
    result.metrics["resumed_from_step"] = int(Path(ckpt).name.split("-")[1]) if ckpt else 0
    # peak GPU memory of this rank during training (weights, optimiser state, activations): None on CPU
    result.metrics["peak_gpu_memory_gib"] = (
        torch.cuda.max_memory_allocated(trainer.args.device) / 2**30 if cuda else None)
    return result, (gather_shards(recorder) if recorder else None)


def _interrupt_hint(run: RunDir, step: int, save_steps: int) -> str:
    from alignkit.runs import interrupt_hint

    ckpt = last_checkpoint(run.work)
    every = f" (saved every {save_steps} steps)" if save_steps else " (train.save_steps=0: never saved)"
    return interrupt_hint(run, f"step {step}", ckpt and f"the checkpoint of step {Path(ckpt).name.split('-')[1]}",
                          no_checkpoint=every)


def resume_checkpoint(run: RunDir) -> str | None:
    """The newest complete checkpoint to resume from (one half-written by a kill while saving is
    skipped, `runs.checkpoint_complete`); metrics.jsonl is cut back to that step so that no step is
    logged twice (with no checkpoint the run restarts from step 0 and the log starts empty)."""
    if not run.resumed:
        return None
    ckpt = last_checkpoint(run.work)
    step = int(Path(ckpt).name.split("-")[1]) if ckpt else 0
    run.truncate_metrics(step)
    return ckpt


def loss_plot(metrics: list[dict[str, Any]], path: Path, keys: tuple[str, ...] = ("loss",), title: str = "") -> None:
    """A PNG of the logged training curves."""
    from alignkit.runs import pyplot, save_figure

    fig, ax = pyplot().subplots(figsize=(5, 3.2))
    for key in keys:
        pts = [(m["step"], m[key]) for m in metrics if m.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=".", label=key)
    ax.set_xlabel("step")
    ax.set_title(title)
    if ax.lines:
        ax.legend()
    save_figure(fig, path)
