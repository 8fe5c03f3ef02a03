"""`alignkit bench sppo`: the SPPO paper's iteration table (its Table 1 / Fig. 1 trend) on the built-in task.

The quickstart's SFT policy → T iterations each of SPPO, iterative DPO and iterative IPO, with the same
seed, prompts, K and sampling budget (iteration 1 of every run samples the same completions from the SFT
policy), the oracle as the preference. Per iteration: win rate against π_0 (= SFT) and against the previous
iteration's policy, the length-controlled win rate, gold reward, length and KL to π_0, on held-out prompts.
Also the cost of judging the K×K pairs: one batched `Preference.matrices` call vs one `prob` call per pair.
Results and their reading: docs/benchmarks.md.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from alignkit.bench.common import machine
from alignkit.paper_tables import quickstart_sft

LOSSES = ("sppo", "dpo", "ipo")
FIGURES = ("win_rate_vs_base", "win_rate_vs_previous", "lc_win_rate_vs_base", "gold", "length", "kl_to_base")


def sppo_table(iterations: int = 3, prompts_per_iteration: int = 256, k: int = 4, eval_prompts: int = 128,
               max_new_tokens: int = 40, learning_rate: float = 5e-4, eta: float = 1000.0, beta: float = 0.1,
               seed: int = 0, sft_model: str | None = None) -> dict[str, Any]:
    """Run the three losses from one SFT policy; return per-iteration figures, time splits and the scoring ratio."""
    import os

    import torch

    from alignkit.trainers.sppo import SPPOConfig, run

    t0 = time.perf_counter()
    result: dict[str, Any] = {"machine": machine(), "runs": {}}
    with tempfile.TemporaryDirectory(prefix="alignkit-bench-sppo-") as tmp:
        root = Path(tmp)
        if sft_model is None:
            sft_model, _ = quickstart_sft(root, 1, seed)
        for loss in LOSSES:
            summary = run(SPPOConfig(
                model={"name": sft_model, "device": "cpu"},
                data={"max_samples": iterations * prompts_per_iteration + eval_prompts},
                train={"learning_rate": learning_rate, "optimizer": "adamw", "batch_size": 32, "micro_batch_size": 16,
                       "save_steps": 0, "seed": seed},
                sppo={"iterations": iterations, "k": k, "loss": loss, **({"eta": eta} if loss == "sppo" else
                                                                        {"beta": beta}),
                      "max_new_tokens": max_new_tokens, "eval_prompts": eval_prompts, "chunk_prompts": 128},
                output={"dir": str(root / loss)},
            ))
            result["runs"][loss] = summary["per_iteration"]
            result["base"] = summary["base"]  # π_0 = SFT: the same eval samples in every run
        result["scoring"] = scoring_cost(k=k, n_prompts=64, max_new_tokens=max_new_tokens, sft_model=sft_model)
    result["settings"] = {"iterations": iterations, "prompts_per_iteration": prompts_per_iteration, "k": k,
                          "eval_prompts": eval_prompts, "max_new_tokens": max_new_tokens,
                          "learning_rate": learning_rate, "optimizer": "adamw", "batch_size": 32, "eta": eta,
                          "beta_dpo_ipo": beta, "seed": seed, "preference": "oracle",
                          "torch_threads": torch.get_num_threads(), "omp": os.environ.get("OMP_NUM_THREADS")}
    result["wall_s"] = time.perf_counter() - t0
    return result


def scoring_cost(k: int, n_prompts: int, max_new_tokens: int, sft_model: str, repeats: int = 3) -> dict[str, Any]:
    """Seconds to judge all K×K pairs of `n_prompts` prompts' K samples under the oracle: one batched
    `matrices` call vs one `prob` call per ordered pair (i ≠ j), the median of `repeats`; and whether the
    two give the same matrix."""
    import statistics

    import torch

    from alignkit import arena, generation, models, rewards

    policy, tok = models.load_causal_lm(sft_model, device="cpu")
    prompts = [p for p, _ in arena.all_prompts()[:n_prompts]]
    samples = generation.generate(policy, tok, prompts, k=k, max_new_tokens=max_new_tokens, seed=1, progress=False)
    cands = [[s.completion for s in samples[i * k : (i + 1) * k]] for i in range(n_prompts)]
    pref = rewards.load_preference("oracle")
    batched, per_pair = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        m = pref.matrices(prompts, cands)
        batched.append(time.perf_counter() - t)
        t = time.perf_counter()
        loop = torch.full((n_prompts, k, k), 0.5, dtype=torch.float64)
        for n, prompt in enumerate(prompts):
            for i in range(k):
                for j in range(k):
                    if i != j:
                        loop[n, i, j] = float(pref.prob([prompt], [cands[n][i]], [cands[n][j]])[0])
        per_pair.append(time.perf_counter() - t)
    off = ~torch.eye(k, dtype=torch.bool)
    same = bool(torch.allclose(m.double()[:, off], loop[:, off], atol=1e-6))
    b, pp = statistics.median(batched), statistics.median(per_pair)
    return {"prompts": n_prompts, "k": k, "pairs": n_prompts * k * (k - 1), "batched_s": b, "per_pair_s": pp,
            "speedup": pp / b, "same_matrix": same}


def sppo_plot(result: dict[str, Any], path: str | Path) -> Path:
    """Per iteration, one line per loss: win rate vs π_0, LC win rate vs π_0, gold, KL to π_0."""
    from alignkit.runs import pyplot, save_figure

    fig, axes = pyplot().subplots(1, 4, figsize=(15, 3.2))
    panels = (("win_rate_vs_base", "win rate vs SFT"), ("lc_win_rate_vs_base", "LC win rate vs SFT"),
              ("gold", "gold reward"), ("kl_to_base", "KL to SFT (k1)"))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for loss, rows in result["runs"].items():
            ax.plot([0] + [r["iteration"] for r in rows],
                    [0.5 if "win" in key else result["base"].get(key, 0.0)] + [r[key] for r in rows],
                    marker="o", label=loss)
        ax.set_title(title)
        ax.set_xlabel("iteration")
    axes[0].legend()
    return save_figure(fig, path)


__all__ = ["FIGURES", "LOSSES", "scoring_cost", "sppo_plot", "sppo_table"]
