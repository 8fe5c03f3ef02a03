"""`alignkit bench up-rlhf`: UP-RLHF's RL experiment (its RQ1–RQ3, Figs. 3–5) on the built-in task.

SFT policy (the quickstart's) → on one small slice of oracle-labelled `builtin:pairwise` pairs, a fully
fine-tuned Bradley–Terry reward model (the paper's "RLHF" proxy) and a diverse LoRA ensemble (λ > 0,
UP-RLHF eq. 12) → three PPO runs from the SFT policy with the same seed, prompts and iterations:

- (a) `rlhf`: the full-FT RM, KL to π_SFT inside the reward (`kl_mode: reward`), β2 = 0 — the paper's baseline;
- (b) `ensemble`: the ensemble's mean r̄, the k2 KL loss of eq. 15 (`kl_mode: loss`, same β1 as (c)) and no
  uncertainty penalty (β2 = 0) — (c) with the penalty switched off, so (b) vs (c) isolates eq. 14;
- (c) `up_rlhf`: the ensemble, r̄ − β2·(u − ū) (eq. 14) and the k2 KL loss β1 (eqs. 15–16).

The built-in task has an exact gold reward (`arena.gold_reward`), logged by `alignkit ppo` at every
iteration beside the proxy reward and the KL to π_SFT (k1), so over-optimisation — proxy rising while gold
peaks and falls — is read straight off each run's metrics.jsonl. Deviations from the paper: the gold reward
is the task's hand-written one, not a learned GPT-J / SteamSHP model; the policy is the tiny Llama; the
proxy is deliberately weak (a few hundred pairs, a short training: 0.58–0.61 held-out accuracy), chosen
so that over-optimisation shows within a short CPU run; a stronger proxy was not measured. The KL
coefficient of (a) (0.01) and the learning rate were set after one pilot so that the runs reach the
regime where gold falls within 60 iterations. Results and their reading: docs/benchmarks.md.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from alignkit.bench.common import machine
from alignkit.paper_tables import quickstart_sft

# the three PPO runs: name -> label, which proxy, the ppo section's KL/penalty fields (filled from arguments)
UP_RUNS: dict[str, dict[str, str]] = {
    "rlhf": {"label": "(a) RLHF: full-FT RM, KL in the reward", "reward": "rm"},
    "ensemble": {"label": "(b) ensemble mean, k2 KL loss, β2 = 0", "reward": "ensemble"},
    "up_rlhf": {"label": "(c) UP-RLHF: ensemble, k2 KL loss, β2 > 0", "reward": "ensemble"},
}
# kept from each iteration's metrics row (alignkit ppo's metrics.jsonl)
CURVE_KEYS = ("reward", "gold", "u", "u_bar", "reward_penalised", "kl_k1", "kl_k3", "length", "eos_rate")


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what exists so far): per-iteration gold is a mean
    over only `prompts_per_iteration` samples, too noisy to take its maximum raw."""
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1): i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def run_stats(curve: dict[str, list[float]], window: int) -> dict[str, Any]:
    """Peak and final gold, final proxy and KL of one run's per-iteration curves, on the trailing
    `window`-iteration average (iterations counted from 1). Over-optimised = the smoothed gold's peak is
    followed by a fall larger than twice the standard error of the last window's iteration means, while
    the smoothed proxy at the end is above its value at the gold peak (proxy rising, gold falling)."""
    gold, proxy, kl = curve["gold"], curve["reward"], curve["kl_k1"]
    n = len(gold)
    w = max(1, min(window, n))
    g_s, p_s, k_s = _smooth(gold, w), _smooth(proxy, w), _smooth(kl, w)
    peak_i = max(range(n), key=lambda i: g_s[i])
    tail = gold[-w:]
    se = statistics.stdev(tail) / math.sqrt(len(tail)) if len(tail) > 1 else 0.0
    drop = g_s[peak_i] - g_s[-1]
    proxy_rise = p_s[-1] - p_s[peak_i]
    return {
        "iterations": n, "window": w,
        "start_gold": gold[0], "start_proxy": proxy[0],
        "peak_gold": g_s[peak_i], "peak_gold_iteration": peak_i + 1, "peak_gold_kl": k_s[peak_i],
        "peak_gold_raw": max(gold),
        "final_gold": g_s[-1], "final_gold_se": se, "final_proxy": p_s[-1], "final_kl": k_s[-1],
        "gold_drop_after_peak": drop, "proxy_rise_after_gold_peak": proxy_rise,
        "over_optimised": bool(peak_i < n - 1 and drop > 2 * se and proxy_rise > 0),
    }


def _curves(metrics: list[dict[str, Any]]) -> dict[str, list[float]]:
    curve: dict[str, list[float]] = {"iteration": [m["step"] for m in metrics]}
    for key in CURVE_KEYS:
        if all(m.get(key) is not None for m in metrics):
            curve[key] = [float(m[key]) for m in metrics]
    return curve


def up_rlhf_table(
    pairs: int = 256, rm_epochs: float = 2.0, eval_fraction: float = 0.25, n_members: int = 5, lam: float = 0.1,
    rm_lr: float = 1e-3, lora_lr: float = 1e-2, lora_r: int = 32, iterations: int = 60,
    prompts_per_iteration: int = 16, max_new_tokens: int = 40, ppo_epochs: int = 4, lr: float = 3e-4,
    kl_coef: float = 0.01, beta1: float = 0.05, beta2: float = 1.0, plain_ensemble: bool = False,
    window: int = 5, seed: int = 0, ppo_seeds: tuple[int, ...] | None = None, out_dir: str | Path | None = None,
    sft_model: str | None = None,
) -> dict[str, Any]:
    """UP-RLHF's RL experiment on the built-in task: runs (a)–(c) of `UP_RUNS` from one SFT policy, with
    proxies trained on the same `pairs` oracle-labelled pairs (`eval_fraction` of them held out for the
    proxies' accuracy). With `plain_ensemble`, also a λ = 0 ensemble and a fourth PPO run on its mean
    (as (b)), whose uncertainty curve is the paper's Fig. 3 baseline. Returns settings, the proxies'
    held-out accuracy, per-run curves (every iteration) and `run_stats` per run. `ppo_seeds` (default:
    `seed`): each PPO run is repeated per seed; its curve is then the per-iteration mean over seeds and
    `per_seed` keeps each seed's curve and stats. `sft_model`: an SFT model
    directory to start from instead of training the quickstart's (the tests pass a shorter one)."""
    from alignkit.trainers import _hf, ppo, reward

    _hf.quiet_libraries()
    ppo_seeds = tuple(ppo_seeds) if ppo_seeds else (seed,)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    runs = dict(UP_RUNS)
    if plain_ensemble:
        runs["plain_ensemble"] = {"label": "(b') plain ensemble (λ = 0) mean, k2 KL loss, β2 = 0",
                                  "reward": "plain_ensemble"}
    with tempfile.TemporaryDirectory(prefix="alignkit-bench-up-rlhf-") as tmp:
        root = Path(out_dir) if out_dir else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        sft_given = sft_model is not None
        if sft_model is None:
            sft_model, _ = quickstart_sft(root, 1, seed)
        timings["sft_s"] = time.perf_counter() - t

        # -- proxies: one slice of oracle-labelled pairs, the SFT model as the backbone (as the paper) ----
        common: dict[str, Any] = {
            "data": {"source": "builtin:pairwise", "max_samples": pairs, "eval_fraction": eval_fraction,
                     "seed": seed},
            "eval": {"ood_source": None},
        }
        train = {"epochs": rm_epochs, "batch_size": 32, "max_length": 96, "logging_steps": 5, "save_steps": 0,
                 "seed": seed}
        proxies: dict[str, dict[str, Any]] = {}
        jobs = {"rm": None, "ensemble": lam, **({"plain_ensemble": 0.0} if plain_ensemble else {})}
        for name, job_lam in jobs.items():
            t = time.perf_counter()
            tree = {**common, "output": {"dir": str(root / name), "overwrite": True}}
            if job_lam is None:
                s = reward.run(reward.RMConfig.model_validate(
                    {**tree, "model": {"name": sft_model, "device": "cpu"},
                     "train": {**train, "learning_rate": rm_lr}}))
            else:
                s = reward.run_ensemble(reward.RMEnsembleConfig.model_validate({
                    **tree, "model": {"name": sft_model, "device": "cpu", "lora": {"r": lora_r, "alpha": 2 * lora_r}},
                    "train": {**train, "learning_rate": lora_lr},
                    "ensemble": {"n_members": n_members, "lam": job_lam, "member_loss": "mean"}}))
            ev = s["eval"]
            proxies[name] = {"dir": s["output_dir"], "accuracy": ev.get("accuracy"), "ece": ev.get("ece"),
                             "uncertainty_in_dist": ev.get("uncertainty_in_dist"), "eval_pairs": ev.get("pairs"),
                             "steps": s["steps"], "wall_s": time.perf_counter() - t}
        timings["proxies_s"] = sum(p["wall_s"] for p in proxies.values())

        # -- the PPO runs: same seeds, prompts, iterations; only the reward and the KL/penalty differ ------
        results: dict[str, dict[str, Any]] = {}
        for name, run in runs.items():
            section: dict[str, Any] = (
                {"kl_mode": "reward", "kl_coef": kl_coef} if name == "rlhf"
                else {"kl_mode": "loss", "beta1": beta1, "beta2": beta2 if name == "up_rlhf" else 0.0})
            per_seed: dict[int, dict[str, Any]] = {}
            for ppo_seed in ppo_seeds:
                cfg = ppo.PPOConfig.model_validate({
                    "model": {"name": sft_model, "device": "cpu"},
                    "data": {"source": "builtin:prompts", "max_samples": 512, "seed": seed},
                    "train": {"learning_rate": lr, "save_steps": 0, "seed": ppo_seed},
                    "ppo": {"reward": proxies[run["reward"]]["dir"], "iterations": iterations,
                            "prompts_per_iteration": prompts_per_iteration, "k": 1, "advantage": "gae",
                            "ppo_epochs": ppo_epochs, "minibatch_size": prompts_per_iteration,
                            "max_new_tokens": max_new_tokens, **section},
                    "output": {"dir": str(root / f"ppo-{name}-seed{ppo_seed}"), "overwrite": True},
                })
                t = time.perf_counter()
                summary = ppo.run(cfg)
                wall = time.perf_counter() - t
                metrics_file = Path(summary["output_dir"]) / "metrics.jsonl"
                metrics = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
                curve = _curves(metrics)
                per_seed[ppo_seed] = {"wall_s": wall, "stats": run_stats(curve, window), "curve": curve}
            # the run's curve: the per-iteration mean over PPO seeds (each seed samples its own prompts)
            mean_curve = {key: [statistics.fmean(v) for v in zip(*(x["curve"][key] for x in per_seed.values()),
                                                                  strict=True)]
                          for key in next(iter(per_seed.values()))["curve"]}
            results[name] = {"label": run["label"], "reward": run["reward"], "ppo": section,
                             "wall_s": sum(x["wall_s"] for x in per_seed.values()),
                             "stats": run_stats(mean_curve, window), "curve": mean_curve,
                             "per_seed": per_seed if len(per_seed) > 1 else {}}
            timings[f"ppo_{name}_s"] = results[name]["wall_s"]
    return {
        "machine": machine(),
        "settings": {
            "task": "built-in (arena): gold = arena.gold_reward, pairs labelled by the Bradley-Terry oracle",
            "sft": "given" if sft_given else "quickstart defaults (tiny, builtin:sft, full FT)",
            "policy_init": "the SFT model",
            "reference": "the SFT model (π_SFT)", "rm_backbone": "the SFT model",
            "pairs": pairs, "eval_fraction": eval_fraction, "rm_epochs": rm_epochs, "rm_lr": rm_lr,
            "lora_lr": lora_lr, "lora_r": lora_r, "n_members": n_members, "lam": lam,
            "member_loss": "mean (eq. 12)", "prompts": "builtin:prompts (first 512)", "iterations": iterations,
            "prompts_per_iteration": prompts_per_iteration, "k": 1, "advantage": "gae", "ppo_epochs": ppo_epochs,
            "minibatch_size": prompts_per_iteration, "max_new_tokens": max_new_tokens, "learning_rate": lr,
            "kl_coef": kl_coef, "beta1": beta1, "beta2": beta2, "smoothing_window": window, "seed": seed,
            "ppo_seeds": list(ppo_seeds),
            "device": "cpu", "full_fine_tuning": True,
        },
        "proxies": {k: {key: v for key, v in p.items() if key != "dir"} for k, p in proxies.items()},
        "runs": results,
        "timings": {**timings, "total_s": time.perf_counter() - t_start},
        "load_avg_1m_end": os.getloadavg()[0],
    }


def up_rlhf_plot(result: dict[str, Any], path: str | Path) -> Path:
    """UP-RLHF Figs. 4–5 on the built-in task: per run, gold (left axis) and proxy (right axis) reward
    against KL to π_SFT, raw iterations as dots and the smoothed curve as a line; a last panel with
    uncertainty u against KL for the ensemble runs (Fig. 3: the λ = 0 ensemble too when it was run)."""
    from alignkit.runs import pyplot, save_figure

    plt = pyplot()
    runs = result["runs"]
    w = result["settings"]["smoothing_window"]
    main = [n for n in ("rlhf", "ensemble", "up_rlhf") if n in runs]
    fig, axes = plt.subplots(1, len(main) + 1, figsize=(4.2 * (len(main) + 1), 3.6))
    for ax, name in zip(axes, main, strict=False):
        r = runs[name]
        c, st = r["curve"], r["stats"]
        kl = _smooth(c["kl_k1"], w)
        ax.plot(c["kl_k1"], c["gold"], ".", color="C0", alpha=0.35)
        ax.plot(kl, _smooth(c["gold"], w), "-", color="C0", label="gold")
        ax.axvline(st["peak_gold_kl"], color="C0", linestyle=":", alpha=0.6)
        ax.set_xlabel("KL(π ‖ π_SFT), k1 per sequence")
        ax.set_ylabel("gold reward", color="C0")
        ax2 = ax.twinx()
        ax2.plot(c["kl_k1"], c["reward"], ".", color="C3", alpha=0.35)
        ax2.plot(kl, _smooth(c["reward"], w), "--", color="C3", label="proxy")
        ax2.set_ylabel("proxy reward (r̄ for ensembles)", color="C3")
        ax.set_title(r["label"], fontsize=8)
        ax.grid(alpha=0.3)
        lines = ax.get_lines()[1:2] + ax2.get_lines()[1:2]
        ax.legend(lines, [ln.get_label() for ln in lines], fontsize=7, loc="lower right")
    ax = axes[-1]
    for i, r in enumerate(runs.values()):
        if "u" in r["curve"]:
            c = r["curve"]
            ax.plot(_smooth(c["kl_k1"], w), _smooth(c["u"], w), "-", color=f"C{i}", label=r["label"].split(",")[0])
    ax.set_xlabel("KL(π ‖ π_SFT), k1 per sequence")
    ax.set_ylabel("ensemble uncertainty u (eq. 13)")
    ax.set_title("uncertainty vs KL", fontsize=8)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=6)
    fig.suptitle(f"UP-RLHF on the built-in task (curves: {w}-iteration trailing mean; dotted: gold peak)",
                 fontsize=9)
    return save_figure(fig, path)
