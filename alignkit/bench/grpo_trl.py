"""`alignkit bench grpo-trl`: `alignkit ppo --advantage grpo` against TRL's GRPOTrainer on the same job.

Both run in ONE process, order alternating seed by seed: the built-in `tiny` model (full fine-tuning,
fp32, CPU), the same `builtin:prompts` at every step, the gold reward, K samples per prompt, one AdamW
step per rollout batch, no KL. Each side is timed from model load to its saved model; the result holds
wall time, s/step, the ratio alignkit/TRL and both mean-reward curves, with a test of whether the curves
agree within the noise. How the two objectives line up, and the figures: docs/benchmarks.md.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from alignkit.bench.common import machine

# The job both sides run (TRL's GRPOConfig names in the comments).
LEARNING_RATE = 1e-3  # constant, no warm-up (lr_scheduler_type constant, warmup_steps 0)
WEIGHT_DECAY = 0.01  # torch.optim.AdamW's default, which `alignkit ppo` uses; transformers' default is 0.0
MAX_GRAD_NORM = 1.0  # both defaults
CLIP_EPS = 0.2  # ppo.clip_eps = GRPOConfig.epsilon (both defaults; inactive here: one step per batch, ratio 1)
# TRL's loss_type whose normalisation is `rl_losses.policy_loss`'s: the sum over every completion token of
# the batch divided by their count. "dapo" (TRL's default) divides by the tokens of the generation batch,
# "bnpo" by those of the local batch: with one process, one step per generation batch and no gradient
# accumulation both are that same count. "grpo" would average per sequence first, "dr_grpo" divide by
# batch × max_completion_length: neither is ours.
TRL_LOSS_TYPE = "dapo"
TRL_SCALE_REWARDS = "group"  # TRL's default: (r − group mean) / (group std + 1e-4), `rl_losses.grpo_advantages`


def step_prompts(pool: Sequence[str], steps: int, n_prompts: int, seed: int) -> list[list[str]]:
    """The prompts of each of `steps` iterations of `alignkit ppo` with this seed (`rollout.prompt_indices`,
    one process): TRL gets them as an unshuffled dataset, so that its step t sees our step t's prompts."""
    from alignkit.online.rollout import prompt_indices

    return [[pool[i] for i in prompt_indices(len(pool), it, n_prompts, seed)] for it in range(steps)]


def trl_gold_reward(eos_token_ids: Sequence[int]) -> Callable[..., list[float]]:
    """The `gold` scorer (`rewards.load_scorer("gold")`) as a TRL reward function. TRL hands over the decoded
    completions (special tokens skipped) and their token ids, which end with EOS when the sample finished:
    `finished` is read from those ids, as `alignkit ppo` reads it from `generate`."""
    from alignkit import rewards

    scorer = rewards.load_scorer("gold")
    eos = set(eos_token_ids)

    def gold(prompts: list, completions: list, completion_ids: list, **_: Any) -> list[float]:
        finished = [bool(ids) and ids[-1] in eos for ids in completion_ids]
        return [float(x) for x in scorer.score(prompts, completions, finished).mean]

    gold.__name__ = "gold"
    return gold


def alignkit_config(model: str, out: Path, steps: int, n_prompts: int, k: int, max_new_tokens: int, lr: float,
                    seed: int) -> Any:
    """The `alignkit ppo` config of the job (what `alignkit ppo --advantage grpo ...` builds from its flags)."""
    from alignkit.trainers.ppo import PPOConfig

    return PPOConfig(
        model={"name": model, "device": "cpu", "dtype": "float32"},
        data={"source": "builtin:prompts"},
        train={"learning_rate": lr, "max_grad_norm": MAX_GRAD_NORM, "save_steps": 0, "seed": seed},
        ppo={"reward": "gold", "iterations": steps, "prompts_per_iteration": n_prompts, "k": k,
             "advantage": "grpo", "kl_mode": "reward", "kl_coef": 0.0, "clip_eps": CLIP_EPS, "ppo_epochs": 1,
             "minibatch_size": n_prompts * k, "whiten_advantages": False, "max_new_tokens": max_new_tokens,
             "temperature": 1.0},
        output={"dir": str(out), "overwrite": True},
    )


def trl_config(out: Path, steps: int, n_prompts: int, k: int, max_new_tokens: int, lr: float, seed: int) -> Any:
    """TRL's GRPOConfig of the same job: one generation batch (n_prompts × k) = one optimiser step."""
    import trl

    return trl.GRPOConfig(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=n_prompts * k,
        steps_per_generation=1,
        gradient_accumulation_steps=1,
        num_iterations=1,
        num_generations=k,
        max_completion_length=max_new_tokens,
        temperature=1.0, top_p=1.0, top_k=0,
        beta=0.0,
        epsilon=CLIP_EPS,
        loss_type=TRL_LOSS_TYPE,
        scale_rewards=TRL_SCALE_REWARDS,
        learning_rate=lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=WEIGHT_DECAY,
        optim="adamw_torch",  # torch.optim.AdamW, as ours (transformers' default is the fused variant)
        max_grad_norm=MAX_GRAD_NORM,
        shuffle_dataset=False,  # the dataset already holds our per-step prompt order
        disable_dropout=True,  # ours runs every model in eval mode
        gradient_checkpointing=False,  # TRL's default is True
        bf16=False,  # TRL's default is True (bf16 autocast, even on CPU)
        use_cpu=True,
        seed=seed,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        dataloader_pin_memory=False,
    )


class _Quiet:
    """A stand-in for the CLI's rich Progress: `ppo.run` draws no bar of its own when given one."""

    def add_task(self, *args: Any, **kwargs: Any) -> int:
        return 0

    def update(self, *args: Any, **kwargs: Any) -> None:
        pass


def run_alignkit(model: str, out: Path, steps: int, n_prompts: int, k: int, max_new_tokens: int, lr: float,
                 seed: int) -> dict[str, Any]:
    """`alignkit ppo` (advantage grpo) on the job: wall time from the call (model load included) to its saved
    run directory, the loop's own timers, and the mean reward per step."""
    from alignkit.trainers import ppo

    cfg = alignkit_config(model, out, steps, n_prompts, k, max_new_tokens, lr, seed)
    t0, c0 = time.perf_counter(), time.process_time()
    summary = ppo.run(cfg, progress=_Quiet())
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    run_dir = Path(summary["output_dir"])
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    split = json.loads((run_dir / "summary.json").read_text()).get("time_split_s", {})
    return {
        "wall_s": wall, "cpu_s": cpu, "steps": summary["iterations"],
        "loop_s": sum(split.values()), "time_split_s": split,
        "rewards": [float(m["reward"]) for m in metrics if "reward" in m],
        "lengths": [float(m["length"]) for m in metrics if "length" in m],  # EOS not counted (TRL counts it)
    }


def trl_trainer(model_dir: Path, pool: Sequence[str], out: Path, steps: int, n_prompts: int, k: int,
                max_new_tokens: int, lr: float, seed: int) -> Any:
    """TRL's GRPOTrainer of the job, the policy loaded from `model_dir`; its dataset is `step_prompts`,
    flattened and unshuffled."""
    import datasets
    import torch
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback

    prompts = [p for batch in step_prompts(pool, steps, n_prompts, seed) for p in batch]
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    trainer = trl.GRPOTrainer(
        model=policy, reward_funcs=trl_gold_reward(_eos_ids(policy, tokenizer)),
        args=trl_config(out, steps, n_prompts, k, max_new_tokens, lr, seed),
        train_dataset=datasets.Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer,
    )
    trainer.remove_callback(PrinterCallback)  # with disable_tqdm it prints every step's logs
    return trainer


def run_trl(model_dir: Path, pool: Sequence[str], out: Path, steps: int, n_prompts: int, k: int,
            max_new_tokens: int, lr: float, seed: int) -> dict[str, Any]:
    """TRL's GRPOTrainer on the job, timed like `run_alignkit`: model load, trainer set-up, train, save."""
    t0, c0 = time.perf_counter(), time.process_time()
    trainer = trl_trainer(model_dir, pool, out, steps, n_prompts, k, max_new_tokens, lr, seed)
    result = trainer.train()
    trainer.save_model(str(out / "model"))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    logs = [r for r in trainer.state.log_history if "reward" in r]
    return {
        "wall_s": wall, "cpu_s": cpu, "steps": trainer.state.global_step,
        "loop_s": float(result.metrics["train_runtime"]),
        "rewards": [float(r["reward"]) for r in logs],
        "lengths": [float(r["completions/mean_length"]) for r in logs if "completions/mean_length" in r],
    }


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends a completion in TRL: the tokenizer's EOS and the model's generation_config ones."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return [tokenizer.eos_token_id, *[i for i in ids if i != tokenizer.eos_token_id]]


# ------------------------------------------------------------------------------ the reward curves
def curve_stats(rewards: Sequence[float]) -> dict[str, float]:
    """A reward curve in three numbers: the mean of its first and last quarters (at least one step each),
    their difference (`gain`), and the mean over its last half."""
    n = len(rewards)
    if n == 0:
        raise ValueError("an empty reward curve")
    q, h = max(1, n // 4), max(1, n // 2)
    first, last = statistics.fmean(rewards[:q]), statistics.fmean(rewards[-q:])
    return {"first_quarter": first, "last_quarter": last, "gain": last - first,
            "last_half": statistics.fmean(rewards[-h:])}


def _mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (sd / √n; NaN with one value)."""
    m = statistics.fmean(values)
    return m, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan)


def compare_curves(ours: Sequence[Sequence[float]], theirs: Sequence[Sequence[float]],
                   z: float = 2.0) -> dict[str, Any]:
    """Do two sets of reward curves (one per seed, same steps) agree in distribution?

    For `last_half` and `gain`: each side's mean over seeds, the difference and its standard error. With
    two or more seeds the SE comes from the spread over seeds (what a rerun with another seed moves);
    with one, from the step-to-step spread inside the windows (which ignores autocorrelation, so it is
    too small). Paired by step (both sides see the same prompts at step t): the mean of
    r_ours(t) − r_TRL(t) over all steps and seeds, SE from the per-step differences. A difference within
    `z` SEs counts as agreement."""
    if not ours or len(ours) != len(theirs) or any(len(a) != len(b) for a, b in zip(ours, theirs, strict=True)):
        raise ValueError("compare_curves needs the same number of curves on each side, pairwise of equal length")
    out: dict[str, Any] = {"seeds": len(ours), "z": z}
    for key in ("last_half", "gain"):
        a = [curve_stats(c)[key] for c in ours]
        b = [curve_stats(c)[key] for c in theirs]
        (ma, sa), (mb, sb) = _mean_se(a), _mean_se(b)
        if len(ours) == 1:
            sa, sb = _window_se(ours[0], key), _window_se(theirs[0], key)
        se = math.hypot(sa, sb)
        out[key] = {"alignkit": ma, "trl": mb, "alignkit_se": sa, "trl_se": sb, "diff": ma - mb, "diff_se": se,
                    "agree": bool(abs(ma - mb) <= z * se)}
    d = [x - y for a, b in zip(ours, theirs, strict=True) for x, y in zip(a, b, strict=True)]
    md, sd = _mean_se(d)
    out["paired_by_step"] = {"mean_diff": md, "diff_se": sd, "n": len(d),
                             "agree": bool(len(d) > 1 and abs(md) <= z * sd)}
    out["agree"] = out["last_half"]["agree"] and out["gain"]["agree"] and out["paired_by_step"]["agree"]
    return out


def _window_se(rewards: Sequence[float], key: str) -> float:
    """The SE of `curve_stats(rewards)[key]` from the per-step spread inside its window(s)."""
    n = len(rewards)
    q, h = max(1, n // 4), max(1, n // 2)
    se = lambda xs: statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else math.nan  # noqa: E731
    if key == "last_half":
        return se(rewards[-h:])
    return math.hypot(se(rewards[:q]), se(rewards[-q:]))


# ------------------------------------------------------------------------------ the benchmark
def grpo_trl(steps: int = 30, n_prompts: int = 8, k: int = 4, max_new_tokens: int = 32, lr: float = LEARNING_RATE,
             seeds: Sequence[int] = (0, 1, 2), model: str = "tiny") -> dict[str, Any]:
    """Both jobs once per seed, in one process, the order alternating (seed i: alignkit first when i is
    even). Returns the settings, each run's timings and curve, the ratios and `compare_curves`."""
    from alignkit import data, models
    from alignkit.trainers.ppo import PPODataSection

    model_dir = Path(models.build_tiny()) if model == "tiny" else Path(model)
    pool = list(data.load_source(PPODataSection(), expected=("prompts",))[0]["prompt"])
    result: dict[str, Any] = {"machine": machine(), "settings": {
        "model": model, "steps": steps, "prompts_per_step": n_prompts, "k": k, "max_new_tokens": max_new_tokens,
        "learning_rate": lr, "weight_decay": WEIGHT_DECAY, "max_grad_norm": MAX_GRAD_NORM, "clip_eps": CLIP_EPS,
        "seeds": list(seeds), "trl_loss_type": TRL_LOSS_TYPE, "trl_scale_rewards": TRL_SCALE_REWARDS,
        "full_finetuning": True, "dtype": "float32", "device": "cpu", "prompt_pool": len(pool),
        "timed": "model load + set-up + training + saving the model, on both sides",
        "torch_threads": _threads(),
    }}
    runs: dict[str, list[dict[str, Any]]] = {"alignkit": [], "trl": []}
    with tempfile.TemporaryDirectory(prefix="alignkit-bench-grpo-") as tmp:
        # untimed warm-up, 2 steps each: first-call costs (imports, the gold scorer's set-up, allocator
        # growth) would otherwise land on whichever side runs first
        warm = [run_alignkit(model, Path(tmp) / "warm-alignkit", 2, n_prompts, k, max_new_tokens, lr, seeds[0]),
                run_trl(model_dir, pool, Path(tmp) / "warm-trl", 2, n_prompts, k, max_new_tokens, lr, seeds[0])]
        result["warmup_wall_s"] = {"alignkit": warm[0]["wall_s"], "trl": warm[1]["wall_s"]}
        for i, seed in enumerate(seeds):
            order = ("alignkit", "trl") if i % 2 == 0 else ("trl", "alignkit")
            for side in order:
                out = Path(tmp) / f"{side}-{seed}"
                r = (run_alignkit(model, out, steps, n_prompts, k, max_new_tokens, lr, seed) if side == "alignkit"
                     else run_trl(model_dir, pool, out, steps, n_prompts, k, max_new_tokens, lr, seed))
                tokens = sum(r["lengths"]) * n_prompts * k  # completion tokens sampled over the run
                r |= {"seed": seed, "order": order.index(side), "s_per_step": r["wall_s"] / max(r["steps"], 1),
                      "completion_tokens": tokens, "ms_per_completion_token": 1e3 * r["wall_s"] / max(tokens, 1)}
                runs[side].append(r)
    a, t = runs["alignkit"], runs["trl"]
    med = lambda rs, key: statistics.median(r[key] for r in rs)  # noqa: E731
    keys = ("wall_s", "cpu_s", "loop_s", "s_per_step", "ms_per_completion_token")
    result |= {
        "alignkit": {"runs": a, **{f"median_{x}": med(a, x) for x in keys},
                     "mean_length": statistics.fmean(x for r in a for x in r["lengths"])},
        "trl": {"runs": t, **{f"median_{x}": med(t, x) for x in keys},
                "mean_length": statistics.fmean(x for r in t for x in r["lengths"])},
        "alignkit_median_time_split_s": {x: statistics.median(r["time_split_s"][x] for r in a)
                                         for x in a[0]["time_split_s"]},
        "ratio_wall": med(a, "wall_s") / med(t, "wall_s"),
        # the sampled lengths differ run to run (and so the work): wall time per completion token sampled
        "ratio_wall_per_token": med(a, "ms_per_completion_token") / med(t, "ms_per_completion_token"),
        "ratio_cpu": med(a, "cpu_s") / med(t, "cpu_s"),  # process CPU time: less sensitive to other load
        "ratio_loop": med(a, "loop_s") / med(t, "loop_s"),
        "pair_ratios_wall": [x["wall_s"] / y["wall_s"] for x, y in zip(a, t, strict=True)],
        "reward_curves": {"alignkit": [r["rewards"] for r in a], "trl": [r["rewards"] for r in t]},
        "curves": compare_curves([r["rewards"] for r in a], [r["rewards"] for r in t]),
        "load_avg_1m_end": os.getloadavg()[0],
    }
    result["median_pair_ratio_wall"] = statistics.median(result["pair_ratios_wall"])
    return result


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def grpo_trl_plot(result: dict[str, Any], path: str | Path) -> Path:
    """Mean reward per step, alignkit (solid) and TRL (dashed), one line per seed, and their means."""
    from alignkit.runs import pyplot, save_figure

    fig, ax = pyplot().subplots(figsize=(6, 3.6))
    for side, style, colour in (("alignkit", "-", "C0"), ("trl", "--", "C3")):
        curves = result["reward_curves"][side]
        for c in curves:
            ax.plot(range(1, len(c) + 1), c, style, color=colour, alpha=0.25, linewidth=0.8)
        mean = [statistics.fmean(xs) for xs in zip(*curves, strict=True)]
        label = "alignkit ppo --advantage grpo" if side == "alignkit" else "TRL GRPOTrainer"
        ax.plot(range(1, len(mean) + 1), mean, style, color=colour, linewidth=2,
                label=f"{label} (mean of {len(curves)} seed{'s' if len(curves) > 1 else ''})")
    st = result["settings"]
    ax.set_xlabel("optimiser step (= rollout batch)")
    ax.set_ylabel("mean gold reward")
    ax.set_title(f"GRPO on {st['model']}: {st['prompts_per_step']} prompts × {st['k']}, "
                 f"{st['max_new_tokens']} tokens, lr {st['learning_rate']:g}", fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


__all__ = ["CLIP_EPS", "LEARNING_RATE", "TRL_LOSS_TYPE", "TRL_SCALE_REWARDS", "WEIGHT_DECAY", "alignkit_config",
           "compare_curves", "curve_stats", "grpo_trl", "grpo_trl_plot", "run_alignkit", "run_trl", "step_prompts",
           "trl_config", "trl_gold_reward", "trl_trainer"]
