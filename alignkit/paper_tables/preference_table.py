"""`alignkit bench pref`: preference optimisation from SFT on the built-in task (issue 4's experiment).

SFT → on-policy pairs → DPO (a β sweep), IPO, KTO and pairwise SPPO → `alignkit eval` of every policy
against the SFT policy; `pref_plot` draws reward against KL. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from alignkit.bench.common import machine
from alignkit.paper_tables import quickstart_sft

PREF_JOBS: dict[str, dict[str, Any]] = {  # name -> (command, its section, train overrides)
    "dpo": {"command": "dpo", "pref": {"loss": "dpo", "beta": 0.1}},
    "ipo": {"command": "dpo", "pref": {"loss": "ipo", "beta": 1.0}},
    "sppo (pairwise, eq. 4.12)": {"command": "dpo", "pref": {"loss": "sppo", "beta": 0.1}},
    "kto": {"command": "kto", "kto": {"loss": "kto", "beta": 0.1}},
}


def pref_table(
    n_prompts: int = 1024, k: int = 4, eval_prompts: int = 64, eval_k: int = 4,
    betas: tuple[float, ...] = (0.03, 0.3, 1.0),
    epochs: float = 1.0, lr: float = 5e-4, batch_size: int = 16, seed: int = 0, out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Issue 4's experiment: SFT → on-policy pairs (the SFT policy's own samples, best-worst of k under the
    oracle) → DPO, IPO, KTO and pairwise SPPO from the SFT model → `alignkit eval` of every policy against the
    SFT policy (gold reward, oracle win rate, KL to SFT) on held-out prompts; plus DPO at more β values."""
    import datasets

    from alignkit import arena, data, evaluate, models, pairs
    from alignkit.rewards import OraclePreference
    from alignkit.trainers import _hf, preference

    _hf.quiet_libraries()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="alignkit-bench-pref-") as tmp:
        root = Path(out_dir) if out_dir else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        sft_model, held_out = quickstart_sft(root, eval_prompts, seed)
        timings = {"sft_s": time.perf_counter() - t}
        train_prompts = [p for p in data.load("builtin:prompts", max_samples=n_prompts, seed=seed)[0]["prompt"]
                         if p not in set(held_out)]
        lm, tok = models.load_causal_lm(sft_model, device="cpu")
        t = time.perf_counter()
        rows, pair_stats = pairs.build(lm, tok, train_prompts, OraclePreference(), k=k, seed=seed, progress=False)
        timings["pairs_s"] = time.perf_counter() - t
        del lm
        pairs_file = root / "pairs.jsonl"
        data.to_jsonl(datasets.Dataset.from_list(rows), pairs_file)
        gold_gap = float(np.mean(arena.gold_reward([r["chosen"] for r in rows])
                                 - arena.gold_reward([r["rejected"] for r in rows])))

        jobs = dict(PREF_JOBS)
        for b in betas:
            jobs[f"dpo β={b:g}"] = {"command": "dpo", "pref": {"loss": "dpo", "beta": b}}
        trained: dict[str, dict[str, Any]] = {}
        for name, job in jobs.items():
            cls, run = ((preference.DPOConfig, preference.run) if job["command"] == "dpo"
                        else (preference.KTOConfig, preference.run_kto))
            section = {key: v for key, v in job.items() if key != "command"}
            cfg = cls(model={"name": sft_model, "device": "cpu"}, data={"source": str(pairs_file)},
                      train={"learning_rate": lr, "epochs": epochs, "batch_size": batch_size, "max_length": 128,
                             "logging_steps": 8, "save_steps": 0, "seed": seed},
                      output={"dir": str(root / name.replace(" ", "_")), "overwrite": True}, **section)
            t = time.perf_counter()
            s = run(cfg)
            trained[name] = {"dir": s["output_dir"], "train_s": time.perf_counter() - t, "steps": s["steps"],
                             "beta": s["beta"], "last_loss": s.get("last_loss")}
        t = time.perf_counter()
        ev = evaluate.evaluate_policies({"sft": sft_model, **{n: j["dir"] for n, j in trained.items()}}, held_out,
                               baseline="sft", reference="sft", k=eval_k, seed=seed, device="cpu", progress=False)
        timings["eval_s"] = time.perf_counter() - t
    rows_out = {}
    for name, m in ev["policies"].items():
        keys = ("reward_mean", "reward_sd", "reward_se", "win_rate", "win_rate_se", "hard_win_rate", "kl", "kl_se",
                "mean_length", "eos_rate", "repetition_rate")
        rows_out[name] = {key: m.get(key) for key in keys}
        if name in trained:
            rows_out[name].update({key: trained[name][key] for key in ("beta", "steps", "train_s")})
    return {
        "eval_settings": ev["settings"],
        "machine": machine(),
        "settings": {"sft": "quickstart defaults (tiny, 3000 builtin:sft rows, 3 epochs)", "pair_prompts":
                     len(train_prompts), "k": k, "select": "best-worst", "judge": "oracle", "lr": lr,
                     "epochs": epochs, "batch_size": batch_size, "eval_prompts": len(held_out), "eval_k": eval_k,
                     "seed": seed, "full_fine_tuning": True},
        "pairs": {**pair_stats, "mean_gold_gap": gold_gap},
        "policies": rows_out,
        "timings": {**timings, "total_s": time.perf_counter() - t_start},
        "load_avg_1m_end": os.getloadavg()[0],
    }


def pref_plot(result: dict[str, Any], path: str | Path) -> Path:
    """Reward vs KL to SFT for `pref_table`'s result: the DPO β sweep as one line (β labelled), the other
    methods as their own markers, ± standard errors."""
    from alignkit.runs import pyplot

    plt = pyplot()

    pol = result["policies"]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    sweep = sorted((x["beta"], x) for n, x in pol.items() if n == "dpo" or n.startswith("dpo β="))
    ax.errorbar([x["kl"] for _, x in sweep], [x["reward_mean"] for _, x in sweep],
                xerr=[x["kl_se"] for _, x in sweep], yerr=[x["reward_se"] for _, x in sweep],
                marker="o", capsize=3, label="DPO, β sweep")
    for b, x in sweep:
        ax.annotate(f"β={b:g}", (x["kl"], x["reward_mean"]), textcoords="offset points", xytext=(5, -12), fontsize=8)
    markers = iter("s^Dv*P")
    for name, x in pol.items():
        if name == "dpo" or name.startswith("dpo β="):
            continue
        ax.errorbar([x["kl"]], [x["reward_mean"]], xerr=[x["kl_se"]], yerr=[x["reward_se"]], marker=next(markers),
                    linestyle="none", capsize=3, label=name)
    ax.set_xlabel("KL to the SFT policy (nats per completion, k1 estimate)")
    ax.set_ylabel("gold reward (mean ± se)")
    ax.set_title("built-in task: preference optimisation from SFT")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    from alignkit.runs import save_figure

    return save_figure(fig, path)


