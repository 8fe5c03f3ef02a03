"""`alignkit bench qprobe`: Q-probe policies on the built-in task (issue 5's experiment; docs/benchmarks.md)."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from alignkit.bench.common import machine
from alignkit.paper_tables import quickstart_sft

QPROBE_KS = (1, 2, 4, 8, 16, 32)


def qprobe_table(
    n_train_prompts: int = 256, n_eval_prompts: int = 64, n: int = 32, threshold: float = 0.3,
    embed: str | None = None, seed: int = 0, out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Issue 5's experiment on the built-in task: the quickstart's SFT model as p0; collect n samples per prompt
    with features (hidden state, or `embed` for API mode) on training and held-out prompts; fit q and pg on the
    gold reward, and q, ce and pg on the binary success 1[gold > threshold]; evaluate every probe policy over
    k ∈ {1, …, 32}, β ∈ {0, 0.1} against base sampling, greedy and the oracle best-of-k."""
    from rich.console import Console

    from alignkit import data
    from alignkit.trainers import _hf, qprobe

    _hf.quiet_libraries()
    t_start = time.perf_counter()
    quiet = Console(quiet=True)
    with tempfile.TemporaryDirectory(prefix="alignkit-bench-qprobe-") as tmp:
        root = Path(out_dir) if out_dir else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        base, held_out = quickstart_sft(root, n_eval_prompts, seed)
        pool = [p for p in dict.fromkeys(data.load("builtin:prompts", max_samples=4 * n_train_prompts,
                                                   seed=seed)[0]["prompt"]) if p not in set(held_out)]
        files = {}
        for name, prompts in (("train", pool[:n_train_prompts]), ("eval", held_out)):
            files[name] = root / f"{name}-prompts.jsonl"
            files[name].write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        timings: dict[str, float] = {}
        feats = {}
        for name in ("train", "eval"):
            t = time.perf_counter()
            cfg = qprobe.CollectConfig(model=base, prompts=str(files[name]), max_samples=None, n=n, embed=embed,
                                       chat="off", device="cpu", seed=seed + (0 if name == "train" else 1),
                                       output={"dir": str(root / f"feats-{name}"), "overwrite": True})
            c = qprobe.collect(cfg, progress=False, console=quiet)
            timings[f"collect_{name}_s"] = time.perf_counter() - t
            feats[name] = c
        fits = {}
        jobs = {"gold": {"q": None, "pg": None}, "binary": {"q": threshold, "ce": threshold, "pg": threshold}}
        for reward, losses_ in jobs.items():
            for loss, thr in losses_.items():
                name = f"{loss} ({reward})"
                cfg = qprobe.FitConfig(features=str(root / "feats-train"), loss=loss, binary_threshold=thr, seed=seed,
                                       output={"dir": str(root / f"fit-{loss}-{reward}"), "overwrite": True})
                s = qprobe.fit(cfg, progress=False, console=quiet)
                fits[name] = {"dir": s["output_dir"], "fit_seconds": s["fit_seconds"], "steps": s["optimizer_steps"]}
        tables = {}
        for reward, thr in (("gold", None), ("binary", threshold)):
            probes = {n_: f["dir"] for n_, f in fits.items() if n_.endswith(f"({reward})")}
            cfg = qprobe.ProbeEvalConfig(probes=probes, features=str(root / "feats-eval"), ks=list(QPROBE_KS),
                                    betas=[0.0, 0.1], model=base, binary_threshold=thr, device="cpu",
                                    output={"dir": str(root / f"eval-{reward}"), "overwrite": True})
            tables[reward] = qprobe.evaluate_probes(cfg, progress=False, console=quiet)
    return {
        "machine": machine(),
        "settings": {"base": "quickstart SFT of tiny", "train_prompts": n_train_prompts, "eval_prompts": len(held_out),
                     "n_per_prompt": n, "features": embed or f"hidden state, layer {feats['train']['layer']}",
                     "binary_threshold": threshold, "ks": list(QPROBE_KS), "betas": [0.0, 0.1], "seed": seed,
                     "fit": "paper defaults (AdamW lr 5e-5, 150 epochs, batch 1000, pg k=10 β=1), standardised, "
                            "zero-init"},
        "collect": {k: {m: v[m] for m in ("d", "n_rows", "reward_mean", "eos_rate", "timings") if m in v}
                    for k, v in feats.items()},
        "fits": fits,
        "tables": {r: {k: t[k] for k in ("base", "best_of_k", "worst_of_k", "probes", "greedy", "settings")}
                   for r, t in tables.items()},
        "timings": {**timings, "total_s": time.perf_counter() - t_start},
        "load_avg_1m_end": os.getloadavg()[0],
    }
