"""The Q-probe: the probe Q_θ (`Probe`, `load_probe`) and `alignkit qprobe fit`, which trains it.

Four losses (alignkit/losses.py): q (eq. 2), ce (eq. 3), pg (eq. 5, the paper's best), pref (eqs. 6–7).
AdamW, seeded; prompts (or pairs) split into train / validation. The loop runs on `trainers.loop.Loop`
(run directory, metrics, progress, time split, non-finite guard). Defaults: docs/algorithms/qprobe.md.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from alignkit import losses
from alignkit.errors import UserError
from alignkit.runs import run_readme, strict_json
from alignkit.trainers.qprobe.config import PROBE_FILE, PROBE_INFO, FitConfig, console_or_stderr, say
from alignkit.trainers.qprobe.features import Features, load_features, read_safetensors


class Probe(torch.nn.Module):
    """Q_θ(φ) = Linear(d, 1) (or a 2-layer ReLU MLP) applied to (φ − mean) / std; mean = 0, std = 1
    unless the fit standardised. `forward` returns (N,) values."""

    def __init__(
        self, d: int, hidden: int = 0, mean: torch.Tensor | None = None, std: torch.Tensor | None = None,
        zero_init: bool = False,
    ):
        super().__init__()
        self.d, self.hidden = d, hidden
        if hidden:
            self.net = torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))
        else:
            self.net = torch.nn.Linear(d, 1)
        if zero_init:  # Q = 0 everywhere: the untrained probe policy is base sampling (ties split evenly)
            out = self.net[-1] if hidden else self.net
            torch.nn.init.zeros_(out.weight)
            torch.nn.init.zeros_(out.bias)
        self.register_buffer("mean", torch.zeros(d) if mean is None else mean.float().clone())
        self.register_buffer("std", torch.ones(d) if std is None else std.float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.d:
            raise UserError(f"features have dimension {x.shape[-1]} but the probe expects d = {self.d}")
        return self.net((x.float() - self.mean) / self.std).squeeze(-1)


def load_probe(run: str | os.PathLike) -> tuple[Probe, dict[str, Any]]:
    """(probe on CPU in eval mode, probe.json) from a `qprobe fit` run directory; damaged files: UserError."""
    run = Path(run)
    if not (run / PROBE_INFO).is_file() or not (run / PROBE_FILE).is_file():
        raise UserError(f"'{run}' is not a finished `alignkit qprobe fit` run (no {PROBE_INFO} / {PROBE_FILE})")
    redo = "fit the probe again with `alignkit qprobe fit`"
    try:
        info = json.loads((run / PROBE_INFO).read_text())
        probe = Probe(int(info["d"]), int(info.get("hidden") or 0))
        info["feature_spec"], info["mode"], info["loss"]  # noqa: B018 - the keys every reader needs
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, RuntimeError) as err:
        raise UserError(f"{run / PROBE_INFO} is not a valid probe description ({type(err).__name__}: {err}): "
                        f"{redo}") from None
    try:
        probe.load_state_dict(read_safetensors(run / PROBE_FILE, redo))
    except RuntimeError as err:  # missing / unexpected keys or shapes that do not match probe.json
        first = str(err).strip().splitlines()[-1].strip()
        raise UserError(f"{run / PROBE_FILE} does not match {PROBE_INFO} ({first}): {redo}") from None
    return probe.eval(), info


def check_compatible(info: dict[str, Any], feats: Features, name: str) -> None:
    if int(info["d"]) != feats.d:
        raise UserError(
            f"probe '{name}' expects features of dimension d = {info['d']} but '{feats.path}' has d = {feats.d}: "
            "collect the features with the probe's model and layer (or encoder)"
        )
    if info["feature_spec"] != feats.spec:
        raise UserError(
            f"probe '{name}' was fitted on {describe_spec(info['feature_spec'])} but '{feats.path}' holds "
            f"{describe_spec(feats.spec)}: collect the features the same way"
        )


def chat_mismatch(info: dict[str, Any], templated: bool, name: str, other: str) -> str | None:
    """A warning line when probe `name` meets prompts fed otherwise than its training features' (through the
    chat template or as plain text): its Q values were fitted on other inputs. None when they match."""
    fitted = bool(info.get("templated", False))  # probes from before `--chat`: plain text
    if fitted == templated:
        return None

    def how(rendered: bool) -> str:
        return "through the chat template" if rendered else "as plain text"

    return (f"probe '{name}' was fitted on features of prompts fed {how(fitted)} (--chat {info.get('chat') or 'off'}) "
            f"but {other} feeds them {how(templated)}: its Q values may not transfer")


def describe_spec(spec: dict[str, Any]) -> str:
    if spec["mode"] == "api":
        return f"encoder '{spec['encoder']}' embeddings"
    return f"layer {spec['layer']} of '{spec['model']}'"


def _split(n_groups: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) group ids: a seeded random `val_fraction` of the groups (at least 1 when > 0)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n_groups, generator=g)
    n_val = 0 if val_fraction == 0 or n_groups < 2 else min(n_groups - 1, max(1, round(val_fraction * n_groups)))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


# loss name -> f(Q, targets, baseline b, β): Q and targets (B,) for q / ce, (C, k) chunks for pg; for pref Q is
# (B, 2) = (chosen, rejected) and there are no targets. A table, not an if/elif ladder (house style 3).
LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "q": lambda q, r, b, beta: losses.qprobe_q_loss(q, r),  # eq. 2
    "ce": lambda q, r, b, beta: losses.qprobe_ce_loss(q, r),  # eq. 3
    "pg": lambda q, r, b, beta: losses.qprobe_pg_loss(q, r, b, beta),  # eq. 5
    "pref": lambda q, r, b, beta: losses.qprobe_pref_loss(q[..., 0], q[..., 1]),  # eqs. 6-7
}


def _validate_fit(cfg: FitConfig, feats: Features) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The fit's input checks (before anything is written). Returns (targets, prompt index) for sample losses."""
    if cfg.loss == "pref":
        if feats.kind != "pairs":
            raise UserError(
                f"the pref loss (eqs. 6-7) needs pairs: '{feats.path}' holds samples; collect with --pairs SOURCE"
            )
        if len(feats.rows) < 2 and cfg.val_fraction > 0:
            raise UserError(f"'{feats.path}' has {len(feats.rows)} pair: too few to hold out a validation share")
        return None, None
    if feats.kind != "samples":
        raise UserError(f"the {cfg.loss} loss needs sampled completions with rewards: '{feats.path}' holds pairs "
                        "(use --loss pref, or collect without --pairs)")
    r = feats.rewards(cfg.binary_threshold)
    if cfg.loss == "ce" and not bool(((r == 0) | (r == 1)).all()):
        bad = r[(r != 0) & (r != 1)][0].item()
        raise UserError(
            f"the ce loss (eq. 3) needs binary rewards in {{0, 1}} but '{feats.path}' has e.g. {bad:g}: "
            "pass --binary-threshold T (target = reward > T) or use --loss q / pg"
        )
    fewest, _ = feats.per_prompt()
    if cfg.loss == "pg" and cfg.k > fewest:
        raise UserError(
            f"--k {cfg.k} is more than the samples per prompt in '{feats.path}' ({fewest}): use k <= {fewest}"
        )
    return r, feats.prompt_index()


def fit(cfg: FitConfig, progress: bool = True, console: Any | None = None) -> dict[str, Any]:
    """`alignkit qprobe fit`: train a probe with the chosen loss; returns the summary (also summary.json)."""
    from safetensors.torch import save_file

    from alignkit import models
    from alignkit.config import to_yaml
    from alignkit.runs import atomic_write_text, checked_output
    from alignkit.trainers._hf import loss_plot
    from alignkit.trainers.loop import Loop

    console = console_or_stderr(console)
    out = checked_output(cfg.output.dir, cfg.output.overwrite, "qprobe-fit")
    feats = load_features(cfg.features)
    r, pidx = _validate_fit(cfg, feats)
    device = models.choose_device(cfg.device)
    k = cfg.k if feats.kind == "pairs" else min(cfg.k, feats.per_prompt()[0])  # q / ce: k only for the metric

    # ---- data on the device, split by prompt (pairs for pref)
    if cfg.loss == "pref":
        n_groups = len(feats.rows)
        groups = torch.arange(n_groups)
        x_all = torch.stack([feats.chosen, feats.rejected], dim=1)  # (P, 2, d)
    else:
        groups = torch.unique(pidx, return_inverse=True)[1]
        n_groups = int(groups.max()) + 1
        x_all = feats.x
    train_g, val_g = _split(n_groups, cfg.val_fraction, cfg.seed)
    train_mask = torch.isin(groups, train_g)
    x_tr, x_va = x_all[train_mask].to(device), x_all[~train_mask].to(device)
    if cfg.loss == "pref":
        r_tr = r_va = p_tr = p_va = None
        flat = x_tr.reshape(-1, feats.d)
    else:
        r_tr, r_va = r[train_mask].float().to(device), r[~train_mask].float().to(device)
        p_tr, p_va = pidx[train_mask], pidx[~train_mask]
        flat = x_tr
    baseline = losses.global_baseline(r[train_mask], p_tr) if cfg.loss != "pref" else 0.0

    mean = std = None
    if cfg.standardize:  # z-score with the TRAINING features; kept inside the probe
        mean, std = flat.mean(0), flat.std(0, correction=0).clamp(min=1e-6)

    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        probe = Probe(feats.d, cfg.hidden if cfg.mlp else 0, mean, std, zero_init=cfg.zero_init)
    probe.to(device).train()
    opt = torch.optim.AdamW(probe.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # Standardise ONCE here, not in every step's forward: training runs the probe's net on z-scored features
    # (the saved probe keeps mean/std and applies them itself, so inference sees raw features).
    if mean is not None:
        m_d, s_d = mean.to(device), std.to(device)
        x_tr, x_va = (x_tr.float() - m_d) / s_d, (x_va.float() - m_d) / s_d

    def q_of(z: torch.Tensor) -> torch.Tensor:
        return probe.net(z.float()).squeeze(-1)

    def batch_loss(x: torch.Tensor, idx: torch.Tensor, rr: torch.Tensor | None) -> torch.Tensor:
        """idx: (B,) samples or pairs, or (C, k) chunks for pg; x[idx] -> Q of shape (B,), (B, 2) or (C, k)."""
        return LOSSES[cfg.loss](q_of(x[idx]), None if rr is None else rr[idx], baseline, cfg.beta)

    @torch.no_grad()
    def evaluate_split(x, rr, pp) -> dict[str, float]:
        if x.shape[0] == 0:
            return {}
        probe.eval()
        try:
            if cfg.loss == "pref":
                q = q_of(x)
                return {"loss": float(batch_loss(x, torch.arange(x.shape[0], device=device), None)),
                        "accuracy": float((q[:, 0] > q[:, 1]).float().mean())}
            chunks = losses.chunk_by_prompt(pp, k).to(device)
            q = q_of(x)
            lv = batch_loss(x, chunks if cfg.loss == "pg" else torch.arange(x.shape[0], device=device), rr)
            qc, rc = q[chunks], rr[chunks]
            return {"loss": float(lv), f"reward_argmax@{k}": float(losses.policy_expected_reward(qc, rc, 0).mean()),
                    f"reward_beta{cfg.beta:g}@{k}": float(losses.policy_expected_reward(qc, rc, cfg.beta).mean()),
                    "base": float(rr.mean()), f"best_of_{k}": float(rc.max(-1).values.mean())}
        finally:
            probe.train()

    say(console, f"fitting a {'2-layer MLP' if cfg.mlp else 'linear'} probe (d = {feats.d}) with the {cfg.loss} "
                 f"loss on {int(train_g.numel())} {'pairs' if cfg.loss == 'pref' else 'prompts'} "
                 f"({int(val_g.numel())} held out), {cfg.epochs} epochs")
    history: list[dict[str, Any]] = []
    step = 0
    per_batch = max(1, cfg.batch_size // cfg.k) if cfg.loss == "pg" else cfg.batch_size
    loop = Loop.open(out, overwrite=cfg.output.overwrite, resume=False, config_yaml=to_yaml(cfg), total=cfg.epochs,
                     desc="qprobe fit", unit="epoch", progress=progress, console=console, resumable=False)
    with loop:  # one loop step = one epoch
        t0 = time.perf_counter()
        while loop.step < cfg.epochs:
            with loop.timer("train"):
                if cfg.loss == "pg":  # fresh chunks every epoch: (C, k) sample indices, k samples of one prompt
                    units = losses.chunk_by_prompt(p_tr, cfg.k, gen)
                else:
                    units = torch.arange(x_tr.shape[0])
                units = units[torch.randperm(units.shape[0], generator=gen)].to(device)
                total, seen = 0.0, 0
                for lo in range(0, units.shape[0], per_batch):
                    idx = units[lo : lo + per_batch]
                    loss = batch_loss(x_tr, idx, r_tr)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    step += 1
                    value = loss.item()
                    loop.guard(value)
                    total, seen = total + value * idx.shape[0], seen + idx.shape[0]
                loop.guard(None, probe)
            with loop.timer("validate"):
                val = evaluate_split(x_va, r_va, p_va)
            loop.advance(f"train loss {total / max(seen, 1):.4f}")
            history.append(loop.log({"epoch": loop.step, "optimizer_steps": step, "train_loss": total / max(seen, 1),
                                     **{f"val_{k}": v for k, v in val.items()},
                                     "elapsed_s": time.perf_counter() - t0}))
        fit_s = time.perf_counter() - t0
        probe.eval()
        train_metrics = evaluate_split(x_tr, r_tr, p_tr)
        val_metrics = evaluate_split(x_va, r_va, p_va)

        info = {
            "format": "alignkit-qprobe/1", "d": feats.d, "hidden": cfg.hidden if cfg.mlp else 0,
            "probe": "mlp" if cfg.mlp else "linear", "loss": cfg.loss, "k": cfg.k, "metric_k": k, "beta": cfg.beta,
            "baseline": baseline if cfg.loss == "pg" else None, "standardize": cfg.standardize,
            "zero_init": cfg.zero_init, "binary_threshold": cfg.binary_threshold, "mode": feats.meta["mode"],
            "model": feats.meta.get("model"), "layer": feats.meta.get("layer"), "encoder": feats.meta.get("encoder"),
            "feature_spec": feats.spec, "features": str(feats.path.resolve()), "reward": feats.meta.get("reward"),
            "max_new_tokens": feats.meta.get("max_new_tokens"), "temperature": feats.meta.get("temperature"),
            "top_p": feats.meta.get("top_p"), "chat": feats.meta.get("chat"),
            "templated": bool(feats.meta.get("templated", False)),
        }
        run = loop.run
        save_file({k: v.detach().float().cpu().contiguous() for k, v in probe.state_dict().items()},
                  str(run.path(PROBE_FILE)))
        atomic_write_text(run.path(PROBE_INFO), strict_json(info, indent=2) + "\n")
        loss_plot(history, run.path("plots", "loss.png"), keys=("train_loss", "val_loss"),
                  title=f"Q-probe {cfg.loss} loss (x: epoch)")
        summary = {
            "command": cfg.command, "loss": cfg.loss, "probe": info["probe"], "d": feats.d, "epochs": cfg.epochs,
            "optimizer_steps": step, "fit_seconds": fit_s, "train_units": int(train_g.numel()),
            "val_units": int(val_g.numel()), "unit": "pair" if cfg.loss == "pref" else "prompt",
            "baseline": info["baseline"], "first_train_loss": history[0]["train_loss"],
            "last_train_loss": history[-1]["train_loss"],
            "train": train_metrics, "val": val_metrics, "features": str(feats.path),
        }
        final = loop.finish(summary, readme=_FIT_README)
    shown = f"val reward argmax@{k} {val_metrics.get(f'reward_argmax@{k}', float('nan')):+.3f} vs base " \
            f"{val_metrics.get('base', float('nan')):+.3f}" if cfg.loss != "pref" and val_metrics else \
            f"val accuracy {val_metrics.get('accuracy', float('nan')):.3f}" if val_metrics else "no validation split"
    say(console, f"fitted in {fit_s:.2f} s ({step} steps): train loss {summary['first_train_loss']:.4f} -> "
                 f"{summary['last_train_loss']:.4f}; {shown} -> {final}/")
    return {**summary, **loop.summary(), "output_dir": str(final)}


_FIT_README = run_readme(
    "alignkit qprobe fit",
    "`probe.safetensors` (the probe's weights and the feature mean/std it applies, zeros/ones unless "
    'standardised) and `probe.json` (d, loss, k, β, baseline, model, layer or encoder, ...); '
    '`metrics.jsonl`: one row per epoch (train_loss, val_loss, val reward of the argmax / softmax policy at k); '
    '`plots/loss.png`. Next: `alignkit qprobe eval THIS_DIR --features HELD_OUT` or `alignkit qprobe sample`.',
)
