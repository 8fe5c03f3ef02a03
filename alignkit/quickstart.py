"""`alignkit quickstart`: the whole loop on the built-in task in about a minute on a laptop CPU.

Builds the tiny model, runs SFT on the built-in review task, labels on-policy pairs (best-worst of k SFT
samples under the oracle: `alignkit pairs`), runs DPO from the SFT model, fits a Q-probe on the SFT
model's hidden states, then evaluates the untrained, SFT and DPO policies on held-out prompts with
`alignkit eval`'s machinery (gold reward, oracle win rate against SFT, KL to SFT, EOS and repetition
rates). The steps, the table and the outputs: docs/quickstart.md.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, model_validator

from alignkit.config import Block, DataSection, JobConfig, TrainSection

if TYPE_CHECKING:  # the config classes import without torch or numpy: `--help` and `--dry-run` stay fast
    import numpy as np


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


class QuickstartDPO(Block):
    """The DPO step: on-policy pairs from the SFT policy, then `alignkit dpo` from the SFT model."""

    enabled: bool = Field(True, description="run the pairs + DPO step (false: SFT only)")
    pair_prompts: int = Field(512, ge=1, description="training prompts to sample pairs on")
    k: int = Field(4, ge=2, description="samples per prompt; chosen/rejected = best/worst under the oracle")
    beta: float = Field(0.3, gt=0.0, description="DPO β (0.3: the best point of the β sweep in docs/benchmarks.md)")
    learning_rate: float = Field(5e-4, gt=0.0)
    epochs: float = Field(1.0, gt=0.0)
    batch_size: int = Field(16, ge=1)


class QuickstartQProbe(Block):
    """The Q-probe step: a probe on the SFT model's hidden states picks one of k SFT samples."""

    enabled: bool = Field(True, description="run the Q-probe step (false: skip it)")
    train_prompts: int = Field(128, ge=8, description="training prompts to collect features on")
    n: int = Field(16, ge=2, description="SFT samples per prompt (training and held-out)")
    k: int = Field(8, ge=1, description="samples the probe policy chooses from")
    loss: Literal["q", "pg"] = Field("pg", description="probe loss (Q-probe eq. 2 or eq. 5) on the gold reward")

    @model_validator(mode="after")
    def _k_fits(self) -> QuickstartQProbe:
        if self.k > self.n:
            raise ValueError(f"qprobe.k ({self.k}) cannot exceed qprobe.n ({self.n}), the samples per prompt")
        return self


class QuickstartConfig(JobConfig):
    command: str = "quickstart"
    REPORTS_ITSELF: ClassVar[bool] = True  # prints its own comparison table
    data: QuickstartData = Field(default_factory=QuickstartData)
    train: QuickstartTrain = Field(default_factory=QuickstartTrain)
    dpo: QuickstartDPO = Field(default_factory=QuickstartDPO)
    qprobe: QuickstartQProbe = Field(default_factory=QuickstartQProbe)
    eval: QuickstartEval = Field(default_factory=QuickstartEval)

    @model_validator(mode="after")
    def _single_process(self) -> QuickstartConfig:
        if self.launch.num_processes != 1 or self.launch.accelerate_config is not None:
            raise ValueError("the quickstart runs in one process: drop launch.num_processes/accelerate_config")
        return self


def heldout_prompts(sft_cfg: Any, n: int, seed: int) -> list[str]:
    """n prompts of the built-in task that the SFT data never showed (sampled without replacement)."""
    import random

    from alignkit import arena, data

    ds, _ = data.load_source(sft_cfg.data)
    seen = set(ds["prompt"])
    pool = [p for p, _ in arena.all_prompts() if p not in seen]
    return random.Random(seed).sample(pool, min(n, len(pool)))


def run(cfg: QuickstartConfig, progress: Any | None = None, console: Any | None = None) -> dict[str, Any]:
    import datasets
    import numpy as np
    from rich.console import Console

    from alignkit import data, evaluate, models, pairs
    from alignkit.config import to_yaml
    from alignkit.rewards import OraclePreference
    from alignkit.runs import RunDir, checked_output, run_readme
    from alignkit.trainers import preference, sft

    console = console or Console()
    t0 = time.perf_counter()
    # a fixed default: `make quickstart` overwrites it
    out = checked_output(cfg.output.dir or "runs/quickstart", cfg.output.overwrite, "quickstart")
    steps = 3 + 2 * cfg.dpo.enabled + cfg.qprobe.enabled
    console.print(f"[bold]1/{steps}[/bold] building the tiny model (cached after the first time)")
    base_dir = models.resolve(cfg.model.name)
    if not Path(base_dir).is_dir():
        models.load_tokenizer(base_dir)  # a hub id: fails with one line while offline, before writing
    work = out.with_name(out.name + ".partial")
    sft_cfg = sft.SFTConfig(
        model=cfg.model, data=cfg.data.model_dump(), train=cfg.train.model_dump(), output={"dir": str(work / "sft")},
    )
    prompts = heldout_prompts(sft_cfg, cfg.eval.n_prompts, cfg.eval.seed)  # validates the data too
    run_dir = RunDir.open(out, cfg.output.overwrite, False, to_yaml(cfg))

    console.print(f"[bold]2/{steps}[/bold] SFT on the built-in review task")
    t = time.perf_counter()
    sft_summary = sft.run(sft_cfg, progress=progress)
    seconds = {"sft": time.perf_counter() - t}
    sft_dir = str(run_dir.path("sft", "model"))
    policies = {"untrained": base_dir, "sft": sft_dir}
    summary: dict[str, Any] = {"command": "quickstart"}

    if cfg.dpo.enabled:
        console.print(f"[bold]3/{steps}[/bold] on-policy pairs: {cfg.dpo.k} SFT samples per prompt, best vs worst "
                      "under the oracle")
        t = time.perf_counter()
        held = set(prompts)
        train_prompts = [p for p in data.load("builtin:prompts", max_samples=cfg.dpo.pair_prompts + len(held),
                                              seed=cfg.data.seed)[0]["prompt"] if p not in held]
        lm, tok = models.load_causal_lm(sft_dir, dtype=cfg.model.dtype, device=cfg.model.device)
        rows, pair_stats = pairs.build(lm, tok, train_prompts[: cfg.dpo.pair_prompts], OraclePreference(),
                                       k=cfg.dpo.k, seed=cfg.eval.seed)
        del lm
        data.to_jsonl(datasets.Dataset.from_list(rows), run_dir.path("pairs.jsonl"))
        seconds["pairs"] = time.perf_counter() - t
        console.print(f"[bold]4/{steps}[/bold] DPO from the SFT model ({pair_stats['pairs']} pairs, β={cfg.dpo.beta})")
        t = time.perf_counter()
        dpo_summary = preference.run(preference.DPOConfig(
            model={**cfg.model.model_dump(), "name": sft_dir}, data={"source": str(run_dir.path("pairs.jsonl"))},
            train={"learning_rate": cfg.dpo.learning_rate, "epochs": cfg.dpo.epochs, "batch_size": cfg.dpo.batch_size,
                   "max_length": cfg.train.max_length, "logging_steps": 4, "save_steps": 0, "seed": cfg.train.seed},
            pref={"loss": "dpo", "beta": cfg.dpo.beta}, output={"dir": str(work / "dpo")},
        ), progress=progress)
        seconds["dpo"] = time.perf_counter() - t
        policies["dpo"] = str(run_dir.path("dpo", "model"))
        summary["pairs"] = pair_stats
        summary["dpo"] = {k: dpo_summary[k] for k in ("steps", "train_loss", "last_loss", "rewards_accuracy_last")}

    if cfg.qprobe.enabled:
        step = 3 + 2 * cfg.dpo.enabled
        console.print(f"[bold]{step}/{steps}[/bold] Q-probe: {cfg.qprobe.n} SFT samples per prompt with their hidden "
                      f"states, a {cfg.qprobe.loss} probe fitted on the gold reward")
        t = time.perf_counter()
        summary["qprobe"] = _qprobe_step(cfg, sft_dir, prompts, run_dir, work)
        seconds["qprobe"] = time.perf_counter() - t

    console.print(f"[bold]{steps}/{steps}[/bold] sampling every policy on {len(prompts)} held-out prompts, "
                  "scoring with the gold reward and the oracle")
    t = time.perf_counter()
    ev = cfg.eval
    result = evaluate.evaluate_policies(
        policies, prompts, reward="gold", preference="oracle", baseline="sft", reference="sft", k=ev.k,
        max_new_tokens=ev.max_new_tokens, temperature=ev.temperature, seed=ev.seed, device=cfg.model.device,
        dtype=cfg.model.dtype,
    )
    seconds["eval"] = time.perf_counter() - t
    console.print(evaluate.table(result["policies"], result["settings"], compact=True))
    examples = {}
    for rec in result["samples"]:
        examples.setdefault(rec["policy"], rec["completion"])
    for name, text in examples.items():
        console.print(f"  {name:>9}: {text[:100]!r}", highlight=False)
    if "qprobe" in summary:
        q = summary["qprobe"]
        console.print(
            f"Q-probe ({q['loss']} probe on layer {q['layer']}, argmax over k = {q['k']} SFT samples, held-out "
            f"prompts, expected gold): [bold]{q['probe']:+.3f}[/bold] vs {q['base']:+.3f} for one SFT sample "
            f"(oracle best-of-{q['k']}: {q['best_of_k']:+.3f})", highlight=False)
    gold = {name: np.array([r["reward"] for r in result["samples"] if r["policy"] == name]) for name in policies}
    _plot(gold, run_dir.path("plots", "gold_reward.png"))
    evaluate.plot(result["policies"], result["settings"], run_dir.path("plots", "reward_vs_kl.png"))
    summary.update({
        "policies": {name: _row(m) for name, m in result["policies"].items()},
        "eval_settings": {k: result["settings"][k] for k in ("n_prompts", "k", "temperature", "baseline", "reference")},
        "sft": {k: sft_summary[k] for k in ("steps", "train_loss", "last_loss", "train_samples_per_s")},
        "sft_seconds": seconds["sft"],
        "seconds": seconds,
        "wall_seconds": time.perf_counter() - t0,
    })
    final = run_dir.finish(summary, readme=run_readme(
        "quickstart", "See summary.json and plots/ (gold_reward.png, reward_vs_kl.png); pairs.jsonl holds the DPO "
        "step's on-policy pairs."))
    console.print(f"wall time {summary['wall_seconds']:.0f} s; results in {final}/")
    return {**summary, "output_dir": str(final)}


def _qprobe_step(cfg: QuickstartConfig, sft_dir: str, held_out: list[str], run_dir: Any, work: Path) -> dict[str, Any]:
    """Collect features of the SFT model on training and held-out prompts, fit a probe on the gold reward, and
    compute the probe policy's expected gold reward over chunks of k held-out samples (argmax, as the paper)."""
    import json

    import torch

    from alignkit import data
    from alignkit.trainers import qprobe

    qp, quiet = cfg.qprobe, _Quiet()
    held = set(held_out)
    pool = [p for p in dict.fromkeys(data.load("builtin:prompts", max_samples=4 * qp.train_prompts,
                                               seed=cfg.data.seed + 1)[0]["prompt"]) if p not in held]
    dirs = {}
    for name, prompts in (("train", pool[: qp.train_prompts]), ("eval", held_out)):
        src = work / f"qprobe-{name}-prompts.jsonl"
        src.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        dirs[name] = work / "qprobe" / f"features-{name}"
        qprobe.collect(qprobe.CollectConfig(
            model=sft_dir, prompts=str(src), max_samples=None, n=qp.n, device=cfg.model.device, chat="off",
            dtype=cfg.model.dtype, seed=cfg.eval.seed + (name == "eval"), output={"dir": str(dirs[name])},
        ), progress=False, console=quiet)
        src.unlink()
    fit_cfg = qprobe.FitConfig(features=str(dirs["train"]), loss=qp.loss, k=min(10, qp.n), seed=cfg.train.seed,
                               output={"dir": str(work / "qprobe" / "probe")})
    fitted = qprobe.fit(fit_cfg, progress=False, console=quiet)
    probe, _ = qprobe.load_probe(fitted["output_dir"])
    feats = qprobe.load_features(dirs["eval"])
    with torch.no_grad():
        q = probe(feats.x)
    table = qprobe.policy_table({"probe": q}, feats.rewards(), feats.prompt_index(), [qp.k], [0.0])
    k = str(qp.k)
    return {
        "loss": qp.loss, "layer": feats.meta["layer"], "k": qp.k, "train_prompts": len(pool[: qp.train_prompts]),
        "n": qp.n, "fit_seconds": fitted["fit_seconds"], "probe": table["probes"]["probe"]["0"][k]["mean"],
        "probe_se": table["probes"]["probe"]["0"][k]["se"], "base": table["base"]["mean"],
        "base_se": table["base"]["se"], "best_of_k": table["best_of_k"][k]["mean"],
    }


class _Quiet:
    def print(self, *args: Any, **kwargs: Any) -> None:
        pass


def _row(m: dict[str, Any]) -> dict[str, Any]:
    """One policy's quickstart row: the eval metrics, with the gold-reward names the quickstart always used."""
    row = {"gold_mean": m["reward_mean"], "gold_sd": m["reward_sd"], "gold_se": m["reward_se"]}
    row.update({k: m.get(k) for k in ("win_rate", "win_rate_se", "hard_win_rate", "kl", "kl_se", "mean_length",
                                      "eos_rate", "repetition_rate", "samples_per_s")})
    return row


def _plot(gold: dict[str, np.ndarray], path: Path) -> None:
    import numpy as np

    from alignkit.runs import pyplot, save_figure

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    bins = np.linspace(-2.5, 1.0, 36)
    for name, g in gold.items():
        ax.hist(np.clip(g, -2.5, 1.0), bins=bins, alpha=0.55, label=f"{name} ({g.mean():+.2f})")
    ax.set_xlabel("gold reward")
    ax.set_ylabel("samples")
    ax.set_title("built-in task: gold reward of samples")
    ax.legend()
    save_figure(fig, path)
