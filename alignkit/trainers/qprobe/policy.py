"""Q-probe policy: `alignkit qprobe sample` (the policy π_{θ,k} on new prompts) and `alignkit qprobe eval`.

π_{θ,k} draws k samples from the frozen base model and picks one with probability softmax_i(Q/β)
(argmax for β = 0). `eval` computes its expected reward analytically on held-out features, against
base pass@1, greedy and the oracle best-of-k (docs/algorithms/qprobe.md).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from alignkit import losses
from alignkit.errors import UserError
from alignkit.runs import run_readme, strict_json
from alignkit.trainers.qprobe.config import ProbeEvalConfig, console_or_stderr, say
from alignkit.trainers.qprobe.features import chat_setting, feature_spec, load_features, model_facts, sample_features
from alignkit.trainers.qprobe.probe import chat_mismatch, check_compatible, describe_spec, load_probe


def sample(
    probe_run: str,
    prompts: str,
    out: str | os.PathLike,
    *,
    k: int = 48,
    beta: float = 0.1,
    model: str | None = None,
    max_samples: int | None = None,
    reward: str | None = None,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    batch_size: int = 64,
    seed: int = 0,
    device: str = "auto",
    dtype: str = "auto",
    backend: str = "hf",
    chat: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    console: Any | None = None,
) -> dict[str, Any]:
    """The probe policy π_{θ,k}: k samples per prompt, one chosen by softmax(Q/β) (a seeded draw; argmax
    for β = 0). Writes one JSONL row per prompt (prompt, completion, q, index, prob, finished[, reward]).
    Sampling settings, and the chat setting (`chat=None`), default to those the probe's features were
    collected with; prompts rendered otherwise than the features' are warned about (the probe did not see
    such inputs). `backend` samples with transformers or vLLM (`sample_features`)."""
    from alignkit import data, generation, models, rewards, vllm_backend
    from alignkit.runs import atomic_write_text
    from alignkit.trainers._hf import quiet_libraries

    quiet_libraries()
    console = console_or_stderr(console)
    generation.check_settings(k, _first(max_new_tokens, 1), _first(temperature, 1.0), _first(top_p, 1.0), batch_size)
    if not beta >= 0 or math.isinf(beta):  # NaN fails `>= 0`
        raise UserError(f"--beta must be >= 0 (0 = argmax) and finite, got {beta}")
    if seed < 0:
        raise UserError(f"--seed must be >= 0, got {seed}")
    if chat is not None:
        generation.chat_mode(chat)
    vllm_backend.check_backend(backend, device)
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists: pass --overwrite or choose another --out")
    probe, info = load_probe(probe_run)
    spec = model or info.get("model")
    if not spec:
        raise UserError(f"probe '{probe_run}' records no base model: pass --model")
    ds, _ = data.load(prompts, kind="prompts", max_samples=max_samples, seed=seed)
    prompt_list = list(ds["prompt"])
    tok, config = model_facts(spec)  # the cheap checks, before any weights load
    setting = generation.chat_mode(chat, prompts) if chat is not None else info.get("chat") or "off"
    chat_used, templated = chat_setting(tok, setting, prompt_list, prompts)
    warnings = [w for w in [chat_mismatch(info, templated, probe_run, f"--chat {chat_used} on {prompts}")] if w]
    if info["mode"] == "hidden":
        if feature_spec("hidden", spec, info.get("layer"), None) != info["feature_spec"]:
            raise UserError(f"probe '{probe_run}' was fitted on {describe_spec(info['feature_spec'])}; '{spec}' is "
                            "another model, whose hidden states the probe cannot read: sample with the probe's own "
                            "model")
        if int(config.hidden_size) != int(info["d"]):
            raise UserError(f"model '{spec}' has hidden size {config.hidden_size} but probe '{probe_run}' expects "
                            f"d = {info['d']}")
    if reward:  # checked now, loaded after sampling (a vLLM engine needs 0.9 of the GPU free to start)
        rewards.check_scorer_spec(reward)
    encoder = models.load_encoder(info["encoder"], device=device) if info["mode"] == "api" else None
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    sampler, tok = generation.load_sampler(spec, backend, dtype=dtype, device=device, seed=seed)
    samples, x, timing = sample_features(
        sampler, tok, prompt_list, k, layer=info.get("layer"), encoder=encoder, progress=progress,
        max_new_tokens=_first(max_new_tokens, info.get("max_new_tokens"), 48),
        temperature=_first(temperature, info.get("temperature"), 1.0),
        top_p=_first(top_p, info.get("top_p"), 1.0), batch_size=batch_size, seed=seed, chat=chat_used,
        load_model=lambda: models.load_causal_lm(spec, dtype=dtype, device=device)[0],
    )
    del sampler
    with torch.no_grad():
        q = probe(x).double().reshape(len(prompt_list), k)
    weights = losses.policy_weights(q, beta)
    if beta == 0:
        choice = q.argmax(dim=-1)
    else:
        choice = torch.multinomial(weights, 1, generator=torch.Generator().manual_seed(seed)).squeeze(-1)
    chosen = [samples[i * k + int(j)] for i, j in enumerate(choice)]
    rows = [
        {"prompt": p, "completion": s.completion, "q": float(q[i, choice[i]]), "index": s.index,
         "prob": float(weights[i, choice[i]]), "finished": s.finished}
        for i, (p, s) in enumerate(zip(prompt_list, chosen, strict=True))
    ]
    result: dict[str, Any] = {"n_prompts": len(rows), "k": k, "beta": beta, "out": str(out), "backend": backend,
                              "chat": chat_used, "warnings": warnings, **timing}
    if reward:
        scorer = rewards.load_scorer(reward, device=device, dtype=dtype)
        r = scorer.score(prompt_list, [s.completion for s in chosen], [s.finished for s in chosen]).mean.double()
        for row, v in zip(rows, r.tolist(), strict=True):
            row["reward"] = v
        result["reward_mean"] = float(r.mean())
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "".join(strict_json(r, ensure_ascii=False) + "\n" for r in rows))
    say(console, f"wrote {len(rows)} chosen completions (k = {k}, β = {beta:g}) to {out}"
                  + (f"; mean reward {result['reward_mean']:+.3f}" if "reward_mean" in result else ""))
    return result


def _first(*values: Any) -> Any:
    return next(v for v in values if v is not None)


def _prompt_se(values: torch.Tensor, prompt_of: torch.Tensor) -> tuple[float, float | None]:
    """Mean of per-chunk values and its standard error with prompts as the unit."""
    _, g = torch.unique(prompt_of, return_inverse=True)
    n = torch.bincount(g).double()
    per_prompt = torch.zeros_like(n).index_add_(0, g, values.double()) / n
    se = float(per_prompt.std(correction=1) / math.sqrt(len(n))) if len(n) > 1 else None
    return float(values.double().mean()), se


def policy_table(
    q: dict[str, torch.Tensor], r: torch.Tensor, prompt_index: torch.Tensor, ks: Sequence[int], betas: Sequence[float]
) -> dict[str, Any]:
    """Expected rewards on chunks of k (pure; no I/O). `q[name]` are (N,) probe values of the same samples.

    Returns {"base": {mean, se}, "best_of_k" / "worst_of_k": {k: {mean, se}},
    "probes": {name: {β: {k: {mean, se}}}}} with keys as strings (JSON-ready).
    """
    r = r.double()
    base_mean, base_se = _prompt_se(r, prompt_index)
    res: dict[str, Any] = {"base": {"mean": base_mean, "se": base_se}, "best_of_k": {}, "worst_of_k": {},
                           "probes": {name: {f"{b:g}": {} for b in betas} for name in q}}
    for k in ks:
        chunks = losses.chunk_by_prompt(prompt_index, k)
        rc, owner = r[chunks], prompt_index[chunks[:, 0]]
        m, se = _prompt_se(rc.max(-1).values, owner)
        res["best_of_k"][str(k)] = {"mean": m, "se": se}
        m, se = _prompt_se(rc.min(-1).values, owner)
        res["worst_of_k"][str(k)] = {"mean": m, "se": se}
        for name, values in q.items():
            qc = values.double()[chunks]
            for b in betas:
                m, se = _prompt_se(losses.policy_expected_reward(qc, rc, b), owner)
                res["probes"][name][f"{b:g}"][str(k)] = {"mean": m, "se": se}
    return res


def evaluate_probes(cfg: ProbeEvalConfig, progress: bool = True, console: Any | None = None) -> dict[str, Any]:
    """`alignkit qprobe eval`: validate, compute the table (+ greedy), write the run directory."""
    from alignkit import generation, models, rewards
    from alignkit.config import to_yaml
    from alignkit.runs import RunDir, atomic_write_text, checked_output
    from alignkit.trainers._hf import quiet_libraries

    quiet_libraries()
    console = console_or_stderr(console)
    t0 = time.perf_counter()
    out = checked_output(cfg.output.dir, cfg.output.overwrite, "qprobe-eval")
    feats = load_features(cfg.features)
    if feats.kind != "samples":
        raise UserError(f"'{feats.path}' holds pairs: evaluate on sampled completions (collect without --pairs)")
    r = feats.rewards(cfg.binary_threshold)
    pidx = feats.prompt_index()
    fewest, _ = feats.per_prompt()
    ks = cfg.ks or [2**i for i in range(int(math.log2(fewest)) + 1)]
    if max(ks) > fewest:
        raise UserError(f"--k {max(ks)} is more than the samples per prompt in '{feats.path}' ({fewest})")
    probes = {}
    for name, path in cfg.probes.items():
        probe, info = load_probe(path)
        check_compatible(info, feats, name)
        probes[name] = (probe, info)
    warnings = [w for name, (_, info) in probes.items()
                if (w := chat_mismatch(info, bool(feats.meta.get("templated", False)), cfg.probes[name],
                                       f"'{feats.path}'"))]
    scorer = None
    if cfg.model:
        spec = cfg.reward or feats.meta.get("reward")
        if not spec:
            raise UserError(f"greedy needs a reward: '{feats.path}' records none, pass --reward SPEC")
        scorer = rewards.load_scorer(spec, device=cfg.device, dtype=cfg.dtype, batch_size=cfg.batch_size)

    with torch.no_grad():
        q = {name: probe(feats.x) for name, (probe, _) in probes.items()}
    table_ = policy_table(q, r, pidx, ks, cfg.betas)
    greedy = None
    greedy_rows: list[dict] = []
    if cfg.model:
        first = {}
        for row in feats.rows:
            first.setdefault(int(row["prompt_id"]), row["prompt"])
        prompts = list(first.values())
        lm, tok = models.load_causal_lm(cfg.model, dtype=cfg.dtype, device=cfg.device)
        say(console, f"greedy decoding of {len(prompts)} prompts with {cfg.model}")
        gs = generation.generate(lm, tok, prompts, k=1, temperature=0.0, batch_size=cfg.batch_size,
                                 max_new_tokens=int(feats.meta.get("max_new_tokens") or 48), progress=progress,
                                 chat=feats.meta.get("chat") or "off")  # the prompts as the samples were fed
        g = scorer.score(prompts, [s.completion for s in gs], [s.finished for s in gs]).mean.double()
        if cfg.binary_threshold is not None:
            g = (g > cfg.binary_threshold).double()
        m, se = _prompt_se(g, torch.arange(len(prompts)))
        greedy = {"mean": m, "se": se, "reward": cfg.reward or feats.meta.get("reward"), "model": cfg.model}
        greedy_rows = [{"prompt": p, "completion": s.completion, "finished": s.finished, "reward": float(v)}
                       for p, s, v in zip(prompts, gs, g.tolist(), strict=True)]
    settings = {
        "features": str(feats.path), "n_prompts": int(torch.unique(pidx).numel()), "n_per_prompt": fewest,
        "ks": ks, "betas": cfg.betas, "reward": feats.meta.get("reward"), "binary_threshold": cfg.binary_threshold,
        "feature_spec": feats.spec, "greedy": "computed" if greedy else "omitted: pass --model to decode greedily",
        "warnings": warnings,
    }
    summary = {
        "command": cfg.command, "settings": settings, **table_, "greedy": greedy,
        "probe_runs": {n: {"run": cfg.probes[n], "loss": info["loss"], "probe": info["probe"]}
                       for n, (_, info) in probes.items()},
    }
    run = RunDir.open(out, cfg.output.overwrite, False, to_yaml(cfg))
    for row in _rows(summary):
        run.log(row)
    if greedy_rows:
        lines = "".join(strict_json(x, ensure_ascii=False) + "\n" for x in greedy_rows)
        atomic_write_text(run.path("greedy.jsonl"), lines)
    plot(summary, run.path("plots", "reward_vs_k.png"))
    console.print(table(summary))
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    summary["wall_seconds"] = time.perf_counter() - t0
    final = run.finish(summary, readme=_EVAL_README)
    say(console, f"results in {final}/ (summary.json, plots/reward_vs_k.png)")
    return {**summary, "output_dir": str(final)}


def _rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per (policy, k) for metrics.jsonl."""
    rows = []
    for k in summary["settings"]["ks"]:
        k = str(k)
        rows.append({"policy": "base", "k": int(k), **summary["base"]})
        for name, by_beta in summary["probes"].items():
            for b, by_k in by_beta.items():
                rows.append({"policy": name, "beta": float(b), "k": int(k), **by_k[k]})
        rows.append({"policy": "best-of-k", "k": int(k), **summary["best_of_k"][k]})
    return rows


_EVAL_README = run_readme(
    "alignkit qprobe eval",
    '`summary.json`: expected reward of each probe policy (per β and k: mean ± se over prompts, analytic '
    'Σ softmax(Q/β)·r over chunks of k), base pass@1, greedy (when --model was given), oracle best-of-k and '
    'worst-of-k; `metrics.jsonl`: the same as flat rows; `plots/reward_vs_k.png`; `greedy.jsonl` if computed.',
)


def table(summary: dict[str, Any]) -> Any:
    """The rich table: one row per policy, one column per k (means), and the largest standard error."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    st = summary["settings"]
    ks = [str(k) for k in st["ks"]]
    caption = "expected reward; probe rows: softmax(Q/β) over k samples, β=0 argmax; se: largest standard error " \
              "over k (prompts as the unit)"
    if not summary["greedy"]:
        caption += "; greedy omitted (pass --model)"
    t = Table(title=escape(f"alignkit qprobe eval: {st['n_prompts']} held-out prompts x {st['n_per_prompt']} samples, "
                           f"reward {st['reward']}"), caption=escape(caption), box=box.SIMPLE_HEAD)
    t.add_column("policy", overflow="fold", min_width=10)
    for k in ks:
        t.add_column(f"k={k}", justify="right", no_wrap=True)
    t.add_column("se", justify="right", no_wrap=True)

    def add(name: str, cells: list[dict[str, Any]]) -> None:
        ses = [c["se"] for c in cells if c.get("se") is not None]
        t.add_row(escape(name), *[f"{c['mean']:+.3f}" for c in cells], f"{max(ses):.3f}" if ses else "–")

    add("base (pass@1)", [summary["base"]] * len(ks))
    if summary["greedy"]:
        add("greedy", [summary["greedy"]] * len(ks))
    for name, by_beta in summary["probes"].items():
        for b, by_k in by_beta.items():
            add(f"{name} β={b}", [by_k[k] for k in ks])
    add("best-of-k (oracle)", [summary["best_of_k"][k] for k in ks])
    return t


def plot(summary: dict[str, Any], path: str | os.PathLike) -> Path:
    """Reward against k: one line per probe and β, plus base, greedy (if any) and best-of-k."""
    from alignkit.runs import pyplot

    plt = pyplot()

    ks = summary["settings"]["ks"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ks, [summary["best_of_k"][str(k)]["mean"] for k in ks], "k--", marker="^", label="best-of-k (oracle)")
    for name, by_beta in summary["probes"].items():
        for b, by_k in by_beta.items():
            ax.plot(ks, [by_k[str(k)]["mean"] for k in ks], marker="o", label=f"{name} β={b}")
    ax.axhline(summary["base"]["mean"], color="gray", linestyle=":", label="base (pass@1)")
    if summary["greedy"]:
        ax.axhline(summary["greedy"]["mean"], color="tab:brown", linestyle="-.", label="greedy")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (samples per prompt)")
    ax.set_ylabel(f"expected reward ({summary['settings']['reward']})")
    ax.set_title("Q-probe policies vs k")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    from alignkit.runs import save_figure

    return save_figure(fig, path)


