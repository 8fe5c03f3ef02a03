"""`alignkit bench sft` and `alignkit bench dpo`: alignkit against the same job written directly on TRL.

Each runs the job both ways in ONE process, interleaved (TRL, alignkit, TRL, ...) so machine drift hits
both alike, checks that the two did the same computation (identical tokenised inputs and logged
losses) and reports wall time, tokens/s and their ratio. Method and results: docs/benchmarks.md.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from alignkit.bench.common import compare_losses, log_summary, machine, random_llama

# The settings both jobs share (TRL's SFTConfig names). Warm-up 0, linear schedule and weight decay 0
# are alignkit's TrainSection defaults and transformers' defaults alike.
LEARNING_RATE = 3e-3
BATCH_SIZE = 32
MAX_LENGTH = 128


class _InputProbe:
    """A TrainerCallback that fingerprints the tokenised training set the trainer actually uses."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        probe = self

        class _CB(TrainerCallback):
            def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
                probe.digest = _digest(train_dataloader.dataset)

        self.callback = _CB()
        self.digest: str | None = None


def _digest(ds: Any) -> str:
    h = hashlib.sha256()
    for col in ("input_ids", "completion_mask"):
        h.update(col.encode())
        if col in ds.column_names:
            for ids in ds[col]:
                h.update(str(list(ids)).encode())
    return h.hexdigest()[:16]


def _raw_trl(
    model_dir: Path, rows: list[dict], out: Path, steps: int, seed: int, logging_steps: int,
    bf16: bool | None = False, callbacks: list | None = None,
) -> dict[str, Any]:
    """The job written directly against TRL; returns wall time, train runtime and its logs."""
    import datasets
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0, c0 = time.perf_counter(), time.process_time()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = trl.SFTConfig(
        output_dir=str(out / "checkpoints"),
        learning_rate=LEARNING_RATE,
        per_device_train_batch_size=BATCH_SIZE,
        max_length=MAX_LENGTH,
        max_steps=steps,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_steps=logging_steps,
        seed=seed,
        use_cpu=True,
        dataloader_pin_memory=False,
        bf16=bf16,  # None = TRL's default (True: bf16 autocast, even on CPU)
    )
    trainer = trl.SFTTrainer(
        model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
        callbacks=callbacks,
    )
    result = trainer.train()
    trainer.save_model(str(out / "model"))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "train_runtime_s": float(result.metrics["train_runtime"]),
        "steps": trainer.state.global_step,
        "completion_only_loss": trainer.args.completion_only_loss,
        "bf16": trainer.args.bf16,
        "data_seed": trainer.args.data_seed,
        **log_summary(trainer.state.log_history),
    }


def alignkit_config(model_dir: Path, n_rows: int, out: Path, steps: int, seed: int, logging_steps: int):
    """The alignkit SFTConfig of the same job (what `alignkit sft` builds from its flags)."""
    from alignkit.trainers.sft import SFTConfig

    return SFTConfig(
        model={"name": str(model_dir), "device": "cpu"},
        data={"source": "builtin:sft", "max_samples": n_rows, "seed": seed},
        train={
            "learning_rate": LEARNING_RATE, "batch_size": BATCH_SIZE, "max_length": MAX_LENGTH,
            "max_steps": steps, "warmup_ratio": 0.0, "lr_scheduler": "linear", "weight_decay": 0.0,
            "logging_steps": logging_steps, "seed": seed, "gradient_checkpointing": False,
        },
        output={"dir": str(out), "overwrite": True},
    )


def _alignkit(
    model_dir: Path, n_rows: int, out: Path, steps: int, seed: int, logging_steps: int,
    callbacks: list | None = None,
) -> dict[str, Any]:
    import json

    from alignkit.trainers import sft

    cfg = alignkit_config(model_dir, n_rows, out, steps, seed, logging_steps)
    t0, c0 = time.perf_counter(), time.process_time()
    summary = sft.run(cfg, callbacks=callbacks)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    final = Path(summary["output_dir"])
    logs = [json.loads(x) for x in (final / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "train_runtime_s": float(summary["train_runtime_s"]),
        "steps": summary["steps"],
        "completion_only_loss": cfg.train.completion_only_loss,
        **log_summary(logs),
    }


def _rates(run: dict[str, Any], steps: int) -> dict[str, Any]:
    samples = steps * BATCH_SIZE
    return {
        "tokens_per_s": run["num_tokens"] / run["train_runtime_s"],
        "samples_per_s": samples / run["train_runtime_s"],
        "tokens_per_s_wall": run["num_tokens"] / run["wall_s"],
    }


def sft_overhead(
    n_rows: int = 2000, steps: int = 120, repeats: int = 7, seed: int = 0, logging_steps: int = 10,
    warmup_steps: int = 2, raw_bf16_default: bool = False,
) -> dict[str, Any]:
    """Wall time of `alignkit sft` vs the same job written against TRL, interleaved A B A B ...

    Returns per-run wall times, medians, the median ratio alignkit/TRL, tokens/s and samples/s of
    each (non-padding tokens from TRL's `num_tokens`; rates over TRL's `train_runtime`, plus tokens/s
    over the whole job's wall time), and whether the two loss curves agree to 1e-6 in every pair.
    `warmup_steps` > 0 first runs both untimed (imports, allocator, first-call costs) and checks the
    tokenised inputs are identical; `raw_bf16_default` keeps TRL's `bf16=True` default in the raw job.
    """
    from alignkit import arena, data, models
    from alignkit.trainers import _hf

    _hf.quiet_libraries()  # the same log level for both jobs (alignkit sets it on its first run anyway)
    t = time.perf_counter()
    model_dir = models.build_tiny()
    build_tiny_s = time.perf_counter() - t
    rows = arena.build_sft(n_rows, seed)
    loaded, _ = data.load(f"{data.BUILTIN_PREFIX}sft", max_samples=n_rows, seed=seed)
    rows_identical = loaded.to_list() == rows
    raw_bf16 = None if raw_bf16_default else False

    result: dict[str, Any] = {
        "machine": machine(),
        "settings": {
            "model": "tiny", "model_dir": str(model_dir), "n_rows": n_rows, "steps": steps,
            "repeats": repeats, "seed": seed, "learning_rate": LEARNING_RATE, "batch_size": BATCH_SIZE,
            "max_length": MAX_LENGTH, "logging_steps": logging_steps, "warmup_ratio": 0.0,
            "lr_scheduler": "linear", "device": "cpu",
            "raw_bf16": "TRL default" if raw_bf16_default else False,
        },
        "build_tiny_s": build_tiny_s,
        "rows_identical": rows_identical,
    }
    with tempfile.TemporaryDirectory(prefix="alignkit-bench-") as tmp:
        root = Path(tmp)
        if warmup_steps > 0:
            p_raw, p_ak = _InputProbe(), _InputProbe()
            w_raw = _raw_trl(
                model_dir, rows, root / "warm-trl", warmup_steps, seed, 1, raw_bf16, [p_raw.callback]
            )
            w_ak = _alignkit(model_dir, n_rows, root / "warm-ak", warmup_steps, seed, 1, [p_ak.callback])
            result["warmup"] = {
                "steps": warmup_steps,
                "tokenised_inputs_identical": p_raw.digest == p_ak.digest and p_raw.digest is not None,
                "loss": compare_losses(w_raw["losses"], w_ak["losses"]),
            }
        raws, aks = [], []
        for i in range(repeats):
            raws.append(_raw_trl(model_dir, rows, root / f"trl-{i}", steps, seed, logging_steps, raw_bf16))
            aks.append(_alignkit(model_dir, n_rows, root / f"ak-{i}", steps, seed, logging_steps))

    pairs = [compare_losses(r["losses"], a["losses"]) for r, a in zip(raws, aks, strict=True)]
    both = (("trl", raws), ("alignkit", aks))
    med = {name: statistics.median(r["wall_s"] for r in runs) for name, runs in both}
    med_train = {name: statistics.median(r["train_runtime_s"] for r in runs) for name, runs in both}
    for name, runs in both:
        result[name] = {
            "wall_s": [r["wall_s"] for r in runs],
            "train_runtime_s": [r["train_runtime_s"] for r in runs],
            "median_wall_s": med[name],
            "median_train_runtime_s": med_train[name],
            "cpu_s": [r["cpu_s"] for r in runs],
            "median_cpu_s": statistics.median(r["cpu_s"] for r in runs),
            # model load + dataset preparation + save (+ alignkit's run dir, plot): wall minus train loop
            "outside_train_s": [r["wall_s"] - r["train_runtime_s"] for r in runs],
            "median_outside_train_s": statistics.median(r["wall_s"] - r["train_runtime_s"] for r in runs),
            "num_tokens": runs[0]["num_tokens"],
            "steps": runs[0]["steps"],
            "completion_only_loss": runs[0]["completion_only_loss"],
            **{k: statistics.median(_rates(r, steps)[k] for r in runs) for k in _rates(runs[0], steps)},
            "losses": runs[0]["losses"],
        }
    result["trl"]["bf16"] = raws[0]["bf16"]
    result["trl"]["data_seed"] = raws[0]["data_seed"]
    result["ratio_wall"] = med["alignkit"] / med["trl"]
    # a shared machine's load spikes hit single runs: per-pair ratios and minima are the robust view
    result["pair_ratios_wall"] = [a["wall_s"] / r["wall_s"] for r, a in zip(raws, aks, strict=True)]
    result["median_pair_ratio_wall"] = statistics.median(result["pair_ratios_wall"])
    result["ratio_min_wall"] = min(a["wall_s"] for a in aks) / min(r["wall_s"] for r in raws)
    result["ratio_train_runtime"] = med_train["alignkit"] / med_train["trl"]
    result["overhead_s"] = med["alignkit"] - med["trl"]
    result["ratio_cpu"] = result["alignkit"]["median_cpu_s"] / result["trl"]["median_cpu_s"]
    result["loss_curves"] = {
        **_curves_agree(pairs),
        "same_window_steps": pairs[0]["same_window_steps"],
        "tokens_identical": all(r["num_tokens"] == a["num_tokens"] for r, a in zip(raws, aks, strict=True)),
    }
    result["load_avg_1m_end"] = os.getloadavg()[0]
    return result


# ------------------------------------------------------------------------ dpo: alignkit vs raw TRL
DPO_LR, DPO_BETA = 5e-4, 0.1


def _dpo_settings(steps: int, batch_size: int, max_length: int, seed: int, logging_steps: int) -> dict[str, Any]:
    return dict(learning_rate=DPO_LR, per_device_train_batch_size=batch_size, max_length=max_length, max_steps=steps,
                logging_steps=logging_steps, seed=seed)


def _cuda_peak_reset() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _cuda_peak_gib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def _raw_trl_dpo(model_dir: Path, rows: list[dict], out: Path, s: dict[str, Any], device: str, dtype: str,
                 lora: bool) -> dict[str, Any]:
    """`alignkit dpo`'s job written directly against TRL (what a user would write)."""
    import datasets
    import torch
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _cuda_peak_reset()
    t0 = time.perf_counter()
    torch_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).to(device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    args = trl.DPOConfig(
        output_dir=str(out / "checkpoints"), beta=DPO_BETA, report_to="none", save_strategy="no",
        gradient_checkpointing=False, use_cpu=device == "cpu", dataloader_pin_memory=False,
        bf16=torch_dtype == torch.bfloat16, **s,
    )
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tokenizer, peft_config=peft_config)
    result = trainer.train()
    trainer.save_model(str(out / "model"))
    return {"wall_s": time.perf_counter() - t0, "train_runtime_s": float(result.metrics["train_runtime"]),
            "peak_gib": _cuda_peak_gib(), **log_summary(trainer.state.log_history)}


def _alignkit_dpo(model_dir: Path, n_pairs: int, out: Path, s: dict[str, Any], device: str, dtype: str,
                  lora: bool) -> dict[str, Any]:
    import json

    from alignkit.trainers import preference

    cfg = preference.DPOConfig(
        model={"name": str(model_dir), "device": device, "dtype": dtype, "lora": {"enabled": lora}},
        data={"source": "builtin:pairwise", "max_samples": n_pairs, "seed": s["seed"]},
        train={"learning_rate": s["learning_rate"], "batch_size": s["per_device_train_batch_size"],
               "max_length": s["max_length"], "max_steps": s["max_steps"], "logging_steps": s["logging_steps"],
               "seed": s["seed"], "warmup_ratio": 0.0, "save_steps": 0},
        pref={"loss": "dpo", "beta": DPO_BETA},
        output={"dir": str(out), "overwrite": True},
    )
    _cuda_peak_reset()
    t0 = time.perf_counter()
    summary = preference.run(cfg)
    wall = time.perf_counter() - t0
    logs = [json.loads(x) for x in (Path(summary["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    return {"wall_s": wall, "train_runtime_s": float(summary["train_runtime_s"]), "peak_gib": _cuda_peak_gib(),
            **log_summary(logs)}


def dpo_overhead(
    model: str = "tiny", n_pairs: int = 512, steps: int = 32, repeats: int = 5, batch_size: int = 16,
    max_length: int = 128, seed: int = 0, logging_steps: int = 4, device: str = "cpu", dtype: str = "float32",
    lora: bool = False,
) -> dict[str, Any]:
    """`alignkit dpo` vs the same DPO job written against TRL's DPOTrainer, interleaved in one process
    (TRL, alignkit, TRL, ...): wall-time ratio, tokens/s, peak GPU memory, and the loss curves compared
    step by step. `model`: `tiny`, `random-1b` (a random 16-layer 2048-wide Llama built here), or a dir."""
    import torch

    from alignkit import arena, data, models
    from alignkit.trainers import _hf

    _hf.quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="alignkit-bench-dpo-") as tmp:
        root = Path(tmp)
        if model == "tiny":
            model_dir = models.build_tiny()
        elif model == "random-1b":
            model_dir = random_llama(root / "random-1b")
        else:
            model_dir = Path(models.resolve(model))
        n_params = sum(p.numel() for p in models.load_causal_lm(str(model_dir), device="cpu")[0].parameters())
        rows = arena.build_pairwise_offline(n_pairs, seed)
        loaded, _ = data.load("builtin:pairwise", max_samples=n_pairs, seed=seed)
        s = _dpo_settings(steps, batch_size, max_length, seed, logging_steps)
        # warm-up (imports, kernels, allocator), untimed
        _raw_trl_dpo(model_dir, rows, root / "warm-trl", {**s, "max_steps": 2}, device, dtype, lora)
        _alignkit_dpo(model_dir, n_pairs, root / "warm-ak", {**s, "max_steps": 2}, device, dtype, lora)
        raws, aks = [], []
        for i in range(repeats):
            raws.append(_raw_trl_dpo(model_dir, rows, root / f"trl-{i}", s, device, dtype, lora))
            aks.append(_alignkit_dpo(model_dir, n_pairs, root / f"ak-{i}", s, device, dtype, lora))
    pairs = [compare_losses(r["losses"], a["losses"]) for r, a in zip(raws, aks, strict=True)]
    out: dict[str, Any] = {
        "machine": machine(),
        "settings": {"model": model, "params": n_params, "n_pairs": n_pairs, "steps": steps, "repeats": repeats,
                     "batch_size": batch_size, "max_length": max_length, "beta": DPO_BETA, "lr": DPO_LR,
                     "device": device, "dtype": dtype, "lora": lora, "loss": "dpo (sigmoid)"},
        "rows_identical": [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in loaded.to_list()]
        == [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows],
    }
    for name, runs in (("trl", raws), ("alignkit", aks)):
        out[name] = {
            "wall_s": [r["wall_s"] for r in runs],
            "train_runtime_s": [r["train_runtime_s"] for r in runs],
            "outside_train_s": [r["wall_s"] - r["train_runtime_s"] for r in runs],
            "median_wall_s": statistics.median(r["wall_s"] for r in runs),
            "median_train_runtime_s": statistics.median(r["train_runtime_s"] for r in runs),
            "tokens_per_s": statistics.median(r["num_tokens"] / r["train_runtime_s"] for r in runs),
            "pairs_per_s": statistics.median(steps * batch_size / r["train_runtime_s"] for r in runs),
            "peak_gib": max((r["peak_gib"] or 0.0) for r in runs) if torch.cuda.is_available() else None,
            "losses": runs[0]["losses"],
        }
    out["ratio_wall"] = out["alignkit"]["median_wall_s"] / out["trl"]["median_wall_s"]
    out["pair_ratios_wall"] = [a["wall_s"] / r["wall_s"] for r, a in zip(raws, aks, strict=True)]
    out["median_pair_ratio_wall"] = statistics.median(out["pair_ratios_wall"])
    out["ratio_train_runtime"] = out["alignkit"]["median_train_runtime_s"] / out["trl"]["median_train_runtime_s"]
    out["loss_curves"] = _curves_agree(pairs)
    out["load_avg_1m_end"] = os.getloadavg()[0]
    return out


def _curves_agree(pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """How close alignkit's loss curves were to TRL's over every interleaved pair of runs."""
    return {
        "identical": all(p["identical"] for p in pairs),
        "max_abs_diff": max(p["max_abs_diff"] for p in pairs),
        "max_abs_diff_running_mean": max(p["max_abs_diff_running_mean"] for p in pairs),
        "steps_compared": pairs[0]["steps_compared"],
    }
