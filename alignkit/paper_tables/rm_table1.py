"""`alignkit bench rm-table1`: UP-RLHF's Table 1 on the built-in task.

One fully fine-tuned reward model vs a LoRA ensemble (λ = 0) vs the diverse LoRA ensemble (λ > 0),
trained and evaluated in one process through the trainers' Python API (`reward.run`,
`reward.run_ensemble`). The learning rates below were chosen once, on a short pilot
(docs/benchmarks.md), and are FIXED: every row of a backbone uses its backbone's full-FT or LoRA rate.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from alignkit.bench.common import machine

RM_SETTINGS: dict[str, dict[str, Any]] = {
    # tiny: the tiny Llama after a short SFT on builtin:sft (the paper's RM starts from the SFT model)
    "tiny": {
        "pairs": 1280, "eval_fraction": 0.25, "epochs": 3, "batch_size": 32, "max_length": 96,
        "full_lr": 1e-3, "lora_lr": 1e-2, "ood_max_samples": 200, "seeds": (0, 1), "lams": (0.0, 0.1, 1.0),
        "sft": {"rows": 1024, "epochs": 2, "learning_rate": 3e-3, "batch_size": 32, "max_length": 96},
    },
    # minilm: the pretrained MiniLM-L6 encoder (BERT); peft's default LoRA targets are query/value
    "minilm": {
        "pairs": 512, "eval_fraction": 0.25, "epochs": 2, "batch_size": 32, "max_length": 96,
        "full_lr": 1e-4, "lora_lr": 3e-3, "ood_max_samples": 200, "seeds": (0,), "lams": (0.0, 0.1), "sft": None,
    },
}
RM_METRICS = ("accuracy", "ece", "ece_standard", "uncertainty_in_dist", "uncertainty_ood", "ood_auroc",
              "trainable_pct", "train_runtime_s", "wall_s")


def _rm_rows(lams: tuple[float, ...], member_losses: tuple[str, ...]) -> list[dict[str, Any]]:
    """The Table-1 rows: full FT, then per member loss the λ = 0 ensemble and the diverse ones (λ > 0)."""
    rows: list[dict[str, Any]] = [{"row": "full FT RM", "kind": "full", "lam": None, "member_loss": None}]
    for loss in member_losses:
        tag = "paper" if loss == "mean" else "alignkit option"
        for lam in lams:
            name = "LoRA ensemble" if lam == 0 else "diverse LoRA ensemble"
            rows.append({"row": f"{name} N={{n}}, λ={lam:g}, member_loss={loss} ({tag})", "kind": "ensemble",
                         "lam": lam, "member_loss": loss})
    return rows


def _sft_backbone(root: Path, s: dict[str, Any], seed: int) -> tuple[Path, dict[str, Any]]:
    """The tiny model after a short SFT on builtin:sft: the backbone every tiny reward model starts from."""
    from alignkit.trainers import sft

    out = root / "sft"
    t0 = time.perf_counter()
    summary = sft.run(sft.SFTConfig(
        model={"name": "tiny", "device": "cpu"},
        data={"source": "builtin:sft", "max_samples": s["rows"], "seed": seed},
        train={"learning_rate": s["learning_rate"], "epochs": s["epochs"], "batch_size": s["batch_size"],
               "max_length": s["max_length"], "logging_steps": 10, "save_steps": 0, "seed": seed},
        output={"dir": str(out), "overwrite": True},
    ))
    info = {"wall_s": time.perf_counter() - t0, "train_runtime_s": summary["train_runtime_s"],
            "steps": summary["steps"], "last_loss": summary.get("last_loss"), **s}
    return out / "model", info


def _rm_job(row: dict[str, Any], model: str, s: dict[str, Any], out: Path, seed: int, n_members: int,
            lora_r: int, lora_alpha: int, layers_to_transform: list[int] | None = None) -> dict[str, Any]:
    """Train + evaluate one Table-1 row for one seed; returns its metrics."""
    from alignkit.trainers import reward

    tree: dict[str, Any] = {
        "model": {"name": model, "device": "cpu"},
        # the split (data.seed) is the same for every row and seed: one held-out set
        "data": {"source": "builtin:pairwise", "max_samples": s["pairs"], "eval_fraction": s["eval_fraction"],
                 "seed": 0},
        "train": {"epochs": s["epochs"], "batch_size": s["batch_size"], "max_length": s["max_length"],
                  "logging_steps": 10, "save_steps": 0, "seed": seed,
                  "learning_rate": s["full_lr"] if row["kind"] == "full" else s["lora_lr"]},
        "eval": {"ood_source": "builtin:ood", "ood_max_samples": s["ood_max_samples"]},
        "output": {"dir": str(out), "overwrite": True},
    }
    t0 = time.perf_counter()
    if row["kind"] == "full":
        summary = reward.run(reward.RMConfig.model_validate(tree))
    else:
        tree["model"]["lora"] = {"r": lora_r, "alpha": lora_alpha, "layers_to_transform": layers_to_transform}
        tree["ensemble"] = {"n_members": n_members, "lam": row["lam"], "member_loss": row["member_loss"],
                            # top-layer members: the unadapted trunk runs once per step (same gradients)
                            "forward": "shared" if layers_to_transform is not None else "auto"}
        summary = reward.run_ensemble(reward.RMEnsembleConfig.model_validate(tree))
    wall = time.perf_counter() - t0
    ev = summary["eval"]
    return {
        **{k: ev.get(k) for k in RM_METRICS[:6]},
        "trainable_pct": summary["trainable_pct"], "train_runtime_s": summary["train_runtime_s"], "wall_s": wall,
        "trainable_params": summary["trainable_params"], "total_params": summary["total_params"],
        "steps": summary["steps"], "last_loss": summary.get("last_loss"), "eval_pairs": ev.get("pairs"),
    }


def _mean_sd(values: list[float | None]) -> dict[str, float | None]:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"mean": None, "sd": None}
    return {"mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else None}


def rm_table1(
    backbone: str = "tiny", seeds: tuple[int, ...] | None = None, n_members: int = 5,
    lams: tuple[float, ...] | None = None, member_losses: tuple[str, ...] = ("mean", "each"),
    pairs: int | None = None, epochs: float | None = None, lora_r: int = 32, lora_alpha: int = 64,
    full_lr: float | None = None, lora_lr: float | None = None, ood_max_samples: int | None = None,
    sft_rows: int | None = None, layers_to_transform: list[int] | None = None,
) -> dict[str, Any]:
    """UP-RLHF Table 1 on the built-in task: full-FT RM vs LoRA ensembles (λ = 0 and λ > 0), per seed.

    Every row trains on the same `pairs` oracle-labelled `builtin:pairwise` pairs (split with data seed
    0, so all rows and seeds share one held-out set) and is evaluated by `reward.evaluate_reward_model`: held-out
    accuracy, ECE as the paper defines it (eqs. 17–19), standard ECE of the same rescaled P(y_w ≻ y_l),
    mean uncertainty (eq. 13) on held-out completions vs `builtin:ood`, and the AUROC of uncertainty at
    telling them apart. `seeds` vary the training seed (head init, member seeds, data order). Rows:
    full FT, then for each member loss (`mean` = the paper's eq. 12, `each` = alignkit's option) one
    ensemble per λ in `lams`. `layers_to_transform` puts the members' LoRA on those blocks only
    (negative = from the top; trained with the shared-trunk forward). Defaults per backbone in
    `RM_SETTINGS`; the keyword arguments override.
    """
    if backbone not in RM_SETTINGS:
        raise ValueError(f"backbone must be one of {sorted(RM_SETTINGS)}, got {backbone!r}")
    from alignkit.trainers import _hf

    _hf.quiet_libraries()
    s = dict(RM_SETTINGS[backbone])
    overrides = {"seeds": seeds, "lams": lams, "pairs": pairs, "epochs": epochs, "full_lr": full_lr,
                 "lora_lr": lora_lr, "ood_max_samples": ood_max_samples}
    for key, value in overrides.items():
        if value is not None:
            s[key] = value
    if s.get("sft") and sft_rows is not None:
        s["sft"] = {**s["sft"], "rows": sft_rows}
    seeds, lams = tuple(s.pop("seeds")), tuple(s.pop("lams"))
    rows = _rm_rows(lams, tuple(member_losses))
    for r in rows:
        r["row"] = r["row"].format(n=n_members)
    result: dict[str, Any] = {
        "machine": machine(),
        "settings": {"backbone": backbone, "seeds": list(seeds), "lams": list(lams), "n_members": n_members,
                     "lora_r": lora_r,
                     "lora_alpha": lora_alpha, "lora_targets": "peft default (query/value projections)",
                     "lora_layers_to_transform": layers_to_transform,
                     "data": "builtin:pairwise", "ood": "builtin:ood", "data_seed": 0, "device": "cpu", **s},
    }
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="alignkit-bench-rm-") as tmp:
        root = Path(tmp)
        model = "minilm"
        if s.get("sft"):
            sft_dir, result["sft_backbone"] = _sft_backbone(root, s["sft"], seed=0)
            model = str(sft_dir)
        runs: list[list[dict[str, Any]]] = [[] for _ in rows]
        for seed in seeds:  # seed-major: machine drift spreads over all rows alike
            for i, row in enumerate(rows):
                runs[i].append(_rm_job(row, model, s, root / f"row{i}-seed{seed}", seed, n_members, lora_r,
                                       lora_alpha, layers_to_transform))
    result["rows"] = []
    for row, per_seed in zip(rows, runs, strict=True):
        agg = {k: _mean_sd([r[k] for r in per_seed]) for k in RM_METRICS}
        result["rows"].append({**row, **{k: v["mean"] for k, v in agg.items()},
                               **{f"{k}_sd": v["sd"] for k, v in agg.items()}, "per_seed": per_seed})
    result["total_wall_s"] = time.perf_counter() - t_all
    result["load_avg_1m_end"] = os.getloadavg()[0]
    return result


