"""Throughput benchmarks: the quickstart's wall time, generation with log-probs or capture, the Q-probe fit,
reward-ensemble scoring. Each returns a JSON-ready dict with the machine it ran on (docs/benchmarks.md).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from alignkit.bench.common import machine, random_llama

SCORING_BACKBONES = ("tiny", "minilm", "random-llama")  # the reward-model backbones `rm_scoring` knows how to build

def quickstart_time(output_dir: str | Path | None = None) -> dict[str, Any]:
    """Run `alignkit quickstart` once (default config) and report its wall time and table values."""
    from rich.console import Console

    from alignkit import quickstart

    with tempfile.TemporaryDirectory(prefix="alignkit-bench-qs-") as tmp:
        out = Path(output_dir) if output_dir else Path(tmp) / "quickstart"
        cfg = quickstart.QuickstartConfig(output={"dir": str(out), "overwrite": True})
        t0 = time.perf_counter()
        summary = quickstart.run(cfg, console=Console(quiet=True))
        wall = time.perf_counter() - t0
    policies = {
        name: {k: p[k] for k in ("gold_mean", "gold_sd", "eos_rate", "repetition_rate", "samples_per_s")}
        for name, p in summary["policies"].items()
    }
    return {
        "machine": machine(),
        "wall_s": wall,
        "quickstart_wall_seconds": summary["wall_seconds"],
        "sft_seconds": summary["sft_seconds"],
        "sft": summary["sft"],
        "policies": policies,
        "settings": {
            "rows": cfg.data.max_samples, "epochs": cfg.train.epochs, "batch_size": cfg.train.batch_size,
            "eval_prompts": cfg.eval.n_prompts, "k": cfg.eval.k,
        },
    }


# --------------------------------------------------------------------------- reward scoring cost

SCORING_CONFIGS = ("one", "separate", "mixed", "loop", "shared", "shared-loop", "shared-loop-unpooled")
ENSEMBLE_CONFIGS = SCORING_CONFIGS[2:]


def scoring_child(backbone: str, config: str, n_members: int, batch: int, rows: int, repeats: int,
                  top_layers: int = 1, device: str = "cpu") -> dict[str, Any]:
    """One scoring configuration, measured in THIS (fresh) process: median seconds to score `rows`
    built-in (prompt, chosen) texts, and peak RSS minus the RSS after imports (on a GPU also the peak
    GPU memory allocated, models included). `backbone`: a model spec or directory.

    one: one plain reward model (`RewardModelScorer`); separate: `n_members` plain reward models of the
    same backbone, each loaded (its own weights) and scored one after another; mixed / loop: a
    `RewardEnsemble` of `n_members` LoRA members (trainer defaults: r 32, α 64, query/value) through
    `EnsembleScorer` in that mode; shared / shared-loop: the same ensemble with its LoRA on the top
    `top_layers` blocks only (`lora.layers_to_transform`), the blocks below run once per batch, in
    that mode. Every ensemble runs its last block at the pooled position only (`pooled_block`) except
    shared-loop-unpooled: shared-loop with the full last block, the forward before the pooled block.
    Every configuration includes tokenisation, batches of `batch`.
    """
    import resource

    import peft  # noqa: F401  (imported before the RSS baseline, as torch and transformers)
    import torch

    from alignkit import arena, models, rewards

    pairs = arena.build_pairwise_offline(rows)
    prompts, texts = [r["prompt"] for r in pairs], [r["chosen"] for r in pairs]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    if config in ENSEMBLE_CONFIGS:
        top = list(range(-top_layers, 0)) if config.startswith("shared") else None
        ens = rewards.RewardEnsemble.build(backbone, n_members=n_members, lora=models.LoraSpec(
            r=32, alpha=64, dropout=0.0, target_modules=None), device=device, layers_to_transform=top)
        with torch.no_grad():  # non-zero B: members that differ, as after training
            for name, p in ens.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        if config.endswith("-unpooled"):
            ens.pooled_block = None
        mode = config.removesuffix("-unpooled")
        scorers: list[Any] = [rewards.EnsembleScorer(ens, mode=mode, batch_size=batch)]
    else:
        k = 1 if config == "one" else n_members
        scorers = []
        for _ in range(k):
            model, tok = models.load_sequence_classifier(backbone, num_labels=1, device=device)
            scorers.append(rewards.RewardModelScorer(model, tok, batch_size=batch))

    def once() -> None:
        for s in scorers:
            s.score(prompts, texts)
        if cuda:
            torch.cuda.synchronize(device)

    for s in scorers:  # warm-up: first-call allocations
        s.score(prompts[:batch], texts[:batch])
    times, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        once()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sec = statistics.median(times)
    # CPU seconds of this process: what a pass costs even while other processes share the cores
    return {"config": config, "seconds": times, "median_s": sec, "samples_per_s": rows / sec,
            "cpu_seconds": cpu, "samples_per_cpu_s": rows / statistics.median(cpu),
            "peak_rss_delta_mib": (peak - rss0) / 1024,
            **({"peak_gpu_mib": torch.cuda.max_memory_allocated(device) / 2**20} if cuda else {})}


def rm_scoring(backbone: str = "tiny", n_members: int = 5, batch: int = 32, rows: int = 512,
               repeats: int = 3, configs: tuple[str, ...] = SCORING_CONFIGS, top_layers: int = 1,
               device: str = "cpu") -> dict[str, Any]:
    """Scoring throughput and peak memory of an N-member ensemble (mixed, loop; shared: LoRA on the top
    `top_layers` blocks, the trunk below run once; shared-loop-unpooled: without the pooled last block)
    vs N separate plain reward models vs one, each configuration in a FRESH subprocess
    (`scoring_child`), in one run.

    samples/s counts (prompt, completion) texts scored, i.e. N member rewards per sample for the
    ensemble and the separate models. Ratios are relative to one model (`configs` must include "one").
    `random-llama`: `random_llama`'s ~0.8 B stand-in (a GPU backbone; built once, in a temporary directory).
    On a GPU (`device` cuda[:N]) the memory ratios are of the peak GPU memory allocated.
    """
    if backbone not in SCORING_BACKBONES:
        raise ValueError(f"backbone must be one of {SCORING_BACKBONES}, got {backbone!r}")
    if "one" not in configs or not set(configs) <= set(SCORING_CONFIGS):
        raise ValueError(f"configs must include 'one' and be among {SCORING_CONFIGS}, got {configs!r}")
    from alignkit import models

    if backbone == "tiny":
        models.build_tiny()  # built once here, not inside a timed child
    with tempfile.TemporaryDirectory() as tmp:
        spec = str(random_llama(Path(tmp) / "random-llama")) if backbone == "random-llama" else backbone
        return _rm_scoring_children(backbone, spec, n_members, batch, rows, repeats, configs, top_layers, device)


def _rm_scoring_children(backbone: str, spec: str, n_members: int, batch: int, rows: int, repeats: int,
                         configs: tuple[str, ...], top_layers: int, device: str) -> dict[str, Any]:
    import json
    import subprocess
    import sys

    cuda = device.startswith("cuda")
    memory_key = "peak_gpu_mib" if cuda else "peak_rss_delta_mib"
    result: dict[str, Any] = {
        "machine": machine(),
        "settings": {"backbone": backbone, "n_members": n_members, "batch": batch, "rows": rows,
                     "repeats": repeats, "ensemble_lora": "r 32, alpha 64, peft default targets (query/value)",
                     "shared_top_layers": top_layers,
                     "pooled_last_block": "every ensemble configuration except shared-loop-unpooled",
                     "texts": "builtin:pairwise (prompt, chosen)", "device": device,
                     "memory": ("peak GPU memory allocated (torch.cuda.max_memory_allocated), models included, "
                                if cuda else "peak ru_maxrss minus ru_maxrss after imports (torch, transformers, "
                                "peft), ") + "fresh process per configuration"},
        "configs": {},
    }
    code = ("import json, sys; from alignkit.bench.throughput import scoring_child; "
            "print('RESULT ' + json.dumps(scoring_child(*sys.argv[1:3], *map(int, sys.argv[3:8]), sys.argv[8])))")
    for config in configs:
        cmd = [sys.executable, "-c", code, spec, config, str(n_members), str(batch), str(rows), str(repeats),
               str(top_layers), device]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            raise RuntimeError(f"scoring child {config} failed: {proc.stderr[-2000:]}")
        result["configs"][config] = json.loads(line[-1][len("RESULT "):])
    c = result["configs"]
    one_sps, one_mem = c["one"]["samples_per_s"], c["one"][memory_key]
    result["ratios"] = {
        name: {"throughput_vs_one": c[name]["samples_per_s"] / one_sps,
               # tiny runs can peak before the baseline is taken (delta 0): no ratio then
               "memory_vs_one": c[name][memory_key] / one_mem if one_mem > 0 else None}
        for name in configs
    }
    for mode in ENSEMBLE_CONFIGS:
        if mode in c and "separate" in c:
            ratio = c[mode]["samples_per_s"] / c["separate"]["samples_per_s"]
            result["ratios"][f"{mode}_vs_separate_throughput"] = ratio
            ratio = c[mode]["samples_per_cpu_s"] / c["separate"]["samples_per_cpu_s"]
            result["ratios"][f"{mode}_vs_separate_per_cpu_s"] = ratio
    if "shared-loop" in c and "shared-loop-unpooled" in c:  # what the pooled last block gains
        result["ratios"]["shared-loop_vs_unpooled_throughput"] = (
            c["shared-loop"]["samples_per_s"] / c["shared-loop-unpooled"]["samples_per_s"])
    result["load_avg_1m_end"] = os.getloadavg()[0]
    return result


# ------------------------------------------------------------- generation: what capture and log-probs cost
GEN_MODES = {"plain": {}, "logprobs": {"return_logprobs": True}, "capture": {"capture_layer": -2}}


def generation_overhead(model: str = "tiny", n_prompts: int = 64, k: int = 4, max_new_tokens: int = 48,
                        batch_size: int = 64, repeats: int = 5, device: str = "cpu", dtype: str = "float32",
                        seed: int = 0) -> dict[str, Any]:
    """Sampling time of `generation.generate` plain vs with log-probs (what `alignkit eval` needs for KL)
    vs with hidden-state capture (Q-probe's features), interleaved (plain, logprobs, capture, plain, ...),
    same prompts and seed. The generated token ids are checked to be identical across modes."""
    import torch

    from alignkit import arena, generation, models
    from alignkit.trainers import _hf

    _hf.quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="alignkit-bench-gen-") as tmp:
        model_dir = random_llama(Path(tmp) / "random-1b") if model == "random-1b" else models.resolve(model)
        lm, tok = models.load_causal_lm(str(model_dir), device=device, dtype=dtype)
        prompts = [p for p, _ in arena.all_prompts()[:n_prompts]]
        kw = dict(k=k, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, progress=False)
        generation.generate(lm, tok, prompts[:batch_size // k], **kw)  # warm-up
        times: dict[str, list[float]] = {m: [] for m in GEN_MODES}
        ids: dict[str, list] = {}
        for _ in range(repeats):
            for mode, extra in GEN_MODES.items():
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = generation.generate(lm, tok, prompts, **kw, **extra)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                times[mode].append(time.perf_counter() - t0)
                ids[mode] = [s.token_ids for s in out]
        n_params = sum(p.numel() for p in lm.parameters())
    med = {m: statistics.median(t) for m, t in times.items()}
    return {
        "machine": machine(),
        "settings": {"model": model, "params": n_params, "n_prompts": n_prompts, "k": k,
                     "max_new_tokens": max_new_tokens, "batch_size": batch_size, "repeats": repeats,
                     "device": device, "dtype": dtype, "capture_layer": -2},
        "seconds": times, "median_s": med,
        "samples_per_s": {m: n_prompts * k / med[m] for m in med},
        "ratio_logprobs": med["logprobs"] / med["plain"], "ratio_capture": med["capture"] / med["plain"],
        "same_tokens": ids["plain"] == ids["logprobs"] == ids["capture"],
        "load_avg_1m_end": os.getloadavg()[0],
    }


def qprobe_fit_time(n: int = 10_000, d: int = 4096, per_prompt: int = 10, loss: str = "pg", epochs: int = 150,
                    repeats: int = 3, seed: int = 0) -> dict[str, Any]:
    """Wall time of `alignkit qprobe fit` (paper defaults: Linear(d, 1), AdamW lr 5e-5, 150 epochs, batch 1000)
    on n synthetic features of dimension d (a linear reward plus noise), written as a collect directory."""
    import json

    import torch
    from rich.console import Console
    from safetensors.torch import save_file

    from alignkit.trainers import qprobe

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, generator=g) / d**0.5
    r = x @ w + 0.5 * torch.randn(n, generator=g)
    times, fits = [], []
    with tempfile.TemporaryDirectory(prefix="alignkit-bench-qfit-") as tmp:
        feats = Path(tmp) / "feats"
        feats.mkdir()
        save_file({"features": x.contiguous()}, str(feats / qprobe.FEATURES_FILE))
        rows = [{"prompt_id": i // per_prompt, "prompt": f"p{i // per_prompt}", "sample": i % per_prompt,
                 "completion": "", "finished": True, "n_tokens": 0, "reward": float(v)} for i, v in enumerate(r)]
        (feats / qprobe.INDEX_FILE).write_text("".join(json.dumps(row) + "\n" for row in rows))
        (feats / qprobe.META_FILE).write_text(json.dumps({
            "format": qprobe.FORMAT, "kind": "samples", "mode": "hidden", "model": "synthetic", "layer": 0, "d": d,
            "n_prompts": n // per_prompt, "n_per_prompt": per_prompt, "n_rows": n, "reward": "synthetic"}))
        for i in range(repeats):
            cfg = qprobe.FitConfig(features=str(feats), loss=loss, epochs=epochs, seed=seed,
                                   output={"dir": str(Path(tmp) / f"fit-{i}"), "overwrite": True})
            t0 = time.perf_counter()
            s = qprobe.fit(cfg, progress=False, console=Console(quiet=True))
            times.append(time.perf_counter() - t0)
            fits.append(s)
    return {"machine": machine(), "settings": {"n": n, "d": d, "per_prompt": per_prompt, "loss": loss,
                                               "epochs": epochs, "repeats": repeats, "batch_size": 1000, "lr": 5e-5},
            "wall_s": times, "fit_s": [f["fit_seconds"] for f in fits], "median_wall_s": statistics.median(times),
            "median_fit_s": statistics.median(f["fit_seconds"] for f in fits),
            "optimizer_steps": fits[0]["optimizer_steps"],
            "last_train_loss": fits[0]["last_train_loss"], "first_train_loss": fits[0]["first_train_loss"]}




# ------------------------------------------------------------- PPO: rollout throughput and the loop's time split
ROLLOUT_MODES = ("generate", "sample", "sample_score")


def ppo_rollout(model: str = "tiny", n_prompts: int = 64, k: int = 1, max_new_tokens: int = 48, batch_size: int = 64,
                repeats: int = 5, score_minibatch: int = 8, iterations: int = 10, ppo_prompts: int = 16,
                device: str = "cpu", dtype: str = "float32", seed: int = 0) -> dict[str, Any]:
    """Issue 10's rollout figures, in one process.

    1. Throughput on the same prompts and seed, interleaved (generate, sample, sample_score, generate, ...):
       `generate`: `generation.generate` alone (what `alignkit generate` runs); `sample`: `rollout.sample`
       (the PPO rollout's sampling stage: generate + padding into a Batch); `sample_score`: `rollout.sample`
       + `rollout.score_tokens` with policy, reference (a copy) and critic (its own copy), the whole rollout
       stage of a GAE iteration (minibatch `score_minibatch`, PPO's default 8). The token ids of generate
       and sample are checked to be identical.
    2. The time split of `ppo.run` (GAE, KL in reward, defaults otherwise) over `iterations` iterations of
       `ppo_prompts` prompts × k, from the run's summary.json `time_split_s` (`iterations` 0: skipped).
    """
    import copy
    import json

    import torch

    from alignkit import arena, generation, models
    from alignkit.online import rollout
    from alignkit.trainers import _hf

    _hf.quiet_libraries()
    model_dir = str(models.resolve(model))
    lm, tok = models.load_causal_lm(model_dir, device=device, dtype=dtype)
    reference = copy.deepcopy(lm).requires_grad_(False)
    critic = rollout.Critic(models.load_causal_lm(model_dir, device=device, dtype=dtype)[0])
    for m in (lm, reference, critic):
        m.eval()
    prompts = [p for p, _ in arena.all_prompts()[:n_prompts]]
    kw = dict(k=k, max_new_tokens=max_new_tokens, temperature=1.0, batch_size=batch_size, seed=seed)

    def run_mode(mode: str, ps: list[str]) -> list[list[int]]:
        if mode == "generate":
            return [s.token_ids for s in generation.generate(lm, tok, ps, **kw, progress=False)]
        batch = rollout.sample(lm, tok, ps, **kw)
        if mode == "sample_score":
            rollout.score_tokens(batch, lm, reference, critic, 1.0, score_minibatch)
        P = batch.prompt_len
        return [batch.input_ids[i, P : P + int(n)].tolist() for i, n in enumerate(batch.lengths)]

    for mode in ROLLOUT_MODES:  # warm-up: first-call allocations
        run_mode(mode, prompts[: max(1, batch_size // k)])
    times: dict[str, list[float]] = {m: [] for m in ROLLOUT_MODES}
    ids: dict[str, list] = {}
    with torch.no_grad():
        for _ in range(repeats):
            for mode in ROLLOUT_MODES:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = run_mode(mode, prompts)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                times[mode].append(time.perf_counter() - t0)
                ids[mode] = out
    n_params = sum(p.numel() for p in lm.parameters())
    med = {m: statistics.median(t) for m, t in times.items()}
    result: dict[str, Any] = {
        "machine": machine(),
        "settings": {"model": model, "params": n_params, "n_prompts": n_prompts, "k": k,
                     "max_new_tokens": max_new_tokens, "batch_size": batch_size, "repeats": repeats,
                     "score_minibatch": score_minibatch, "temperature": 1.0, "device": device, "dtype": dtype,
                     "seed": seed},
        "seconds": times, "median_s": med,
        "samples_per_s": {m: n_prompts * k / med[m] for m in med},
        "ratio_sample_vs_generate": med["generate"] / med["sample"],  # throughput ratio (ii)/(i)
        "ratio_sample_score_vs_generate": med["generate"] / med["sample_score"],  # (iii)/(i)
        # the same ratios per interleaved round (generate and sample ran back to back), then the median
        "median_round_ratio_sample_vs_generate": statistics.median(
            g / x for g, x in zip(times["generate"], times["sample"], strict=True)),
        "median_round_ratio_sample_score_vs_generate": statistics.median(
            g / x for g, x in zip(times["generate"], times["sample_score"], strict=True)),
        "same_tokens": ids["generate"] == ids["sample"] == ids["sample_score"],
    }
    if iterations > 0:
        from alignkit.trainers import ppo

        with tempfile.TemporaryDirectory(prefix="alignkit-bench-ppo-") as tmp:
            cfg = ppo.PPOConfig(model={"name": model_dir, "device": device, "dtype": dtype},
                                ppo={"iterations": iterations, "prompts_per_iteration": ppo_prompts, "k": k,
                                     "max_new_tokens": max_new_tokens, "advantage": "gae"},
                                train={"save_steps": 0, "seed": seed}, output={"dir": str(Path(tmp) / "ppo")})
            t0 = time.perf_counter()
            summary = ppo.run(cfg)
            wall = time.perf_counter() - t0
            split = json.loads((Path(summary["output_dir"]) / "summary.json").read_text())["time_split_s"]
        total = sum(split.values())
        result["ppo"] = {
            "settings": {"iterations": iterations, "prompts_per_iteration": ppo_prompts, "k": k,
                         "max_new_tokens": max_new_tokens, "advantage": "gae", "kl_mode": "reward",
                         "ppo_epochs": cfg.ppo.ppo_epochs, "minibatch_size": cfg.ppo.minibatch_size,
                         "reward": cfg.ppo.reward},
            "wall_s": wall, "time_split_s": split,
            "time_split_share": {name: s / total for name, s in split.items()},
            "outside_timers_s": wall - total,
            "first_gold": summary["first_gold"], "last_gold": summary["last_gold"],
        }
    result["load_avg_1m_end"] = os.getloadavg()[0]
    return result
