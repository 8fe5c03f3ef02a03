"""`alignkit qprobe collect/fit/sample/eval`: the Q-probe steps (docs/algorithms/qprobe.md). Each
step reads the directory the previous one wrote; the work lives in alignkit.trainers.qprobe."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from alignkit.cli.common import DeviceOpt, DtypeOpt, OverwriteOpt, app, check_output_file, console

qprobe_app = typer.Typer(
    help="Q-probe: collect features -> fit a probe -> sample / eval its policy (docs/algorithms/qprobe.md).",
    no_args_is_help=True,
)
app.add_typer(qprobe_app, name="qprobe")
QpOut = Annotated[str | None, typer.Option("--output-dir", "-o", help="run directory (default runs/qprobe-*-TIME)")]
QpSeed = Annotated[int | None, typer.Option("--seed", help="seed >= 0 (sampling / probe init, split and batches)")]
QpSet = Annotated[list[str] | None, typer.Option("--set", help="override any config key: --set n=32")]
QpBackend = Annotated[str | None, typer.Option("--backend", help="sampler: hf (default) or vllm (pip install "
                                                                 "'alignkit\\[vllm]', a CUDA GPU)")]


def _qprobe(fn_name: str, cfg_name: str, sets: list[str] | None, flags: dict[str, Any], origin: str) -> None:
    from alignkit.config import build_config
    from alignkit.trainers import qprobe

    cfg = build_config(getattr(qprobe, cfg_name), {}, sets, flags, origin=origin)
    getattr(qprobe, fn_name)(cfg, console=console)


@qprobe_app.command("collect")
def qprobe_collect(
    model: Annotated[str | None, typer.Option("--model", "-m", help="alias, hub id, local dir, or tiny")] = None,
    prompts: Annotated[str | None, typer.Option("--prompts", "-p", help="prompt source")] = None,
    pairs: Annotated[str | None, typer.Option("--pairs", help="pairwise source: embed chosen/rejected (pref)")] = None,
    max_samples: Annotated[int | None, typer.Option("--max-samples", help="first N prompts/pairs (default 64)")] = None,
    n: Annotated[int | None, typer.Option("--n", help="samples per prompt (default 16)")] = None,
    layer: Annotated[int | None, typer.Option("--layer", help="hidden layer (default round(0.8 x layers))")] = None,
    embed: Annotated[str | None, typer.Option("--embed", help="API mode: encoder spec, e.g. minilm")] = None,
    reward: Annotated[str | None, typer.Option("--reward", help="gold, module:function, RM dir, or none")] = None,
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", help="tokens per completion")] = None,
    temperature: Annotated[float | None, typer.Option("--temperature", help="sampling temperature")] = None,
    top_p: Annotated[float | None, typer.Option("--top-p", help="nucleus sampling")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="sequences per generate call")] = None,
    backend: QpBackend = None,
    chat: Annotated[str | None, typer.Option("--chat", help="chat template for plain prompts: auto (default: when "
                                                            "the tokenizer has one; not builtin:), on, off")] = None,
    seed: QpSeed = None, dtype: DtypeOpt = None, device: DeviceOpt = None,
    output_dir: QpOut = None, overwrite: OverwriteOpt = None, set_: QpSet = None,
) -> None:
    """Sample n completions per prompt, score them, store their features (hidden state or encoder)."""
    flags = {"model": model, "prompts": prompts, "pairs": pairs, "max_samples": max_samples, "n": n, "layer": layer,
             "embed": embed, "reward": reward, "max_new_tokens": max_new_tokens, "temperature": temperature,
             "top_p": top_p, "batch_size": batch_size, "backend": backend, "chat": chat, "seed": seed,
             "dtype": dtype, "device": device, "output.dir": output_dir, "output.overwrite": overwrite}
    _qprobe("collect", "CollectConfig", set_, flags, "qprobe collect")


@qprobe_app.command("fit")
def qprobe_fit(
    features: Annotated[str, typer.Argument(help="directory written by `alignkit qprobe collect`")],
    loss: Annotated[str | None, typer.Option("--loss", help="q (eq. 2), ce (eq. 3), pg (eq. 5, default), pref")] = None,
    k: Annotated[int | None, typer.Option("--k", help="pg chunk size (default 10)")] = None,
    beta: Annotated[float | None, typer.Option("--beta", help="pg softmax temperature (default 1)")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="AdamW learning rate (default 5e-5)")] = None,
    weight_decay: Annotated[float | None, typer.Option("--weight-decay", help="AdamW weight decay (0)")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="epochs (default 150)")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="samples per step (default 1000)")] = None,
    mlp: Annotated[bool | None, typer.Option("--mlp/--linear", help="2-layer MLP probe instead of linear")] = None,
    standardize: Annotated[bool | None, typer.Option("--standardize/--no-standardize", help="z-score")] = None,
    val_fraction: Annotated[float | None, typer.Option("--val-fraction", help="held-out prompts (0.1)")] = None,
    binary_threshold: Annotated[float | None, typer.Option("--binary-threshold", help="target 1[r > T]")] = None,
    seed: QpSeed = None, device: DeviceOpt = None,
    output_dir: QpOut = None, overwrite: OverwriteOpt = None, set_: QpSet = None,
) -> None:
    """Fit a probe on collected features (q, ce, pg or pref loss); seconds, not minutes."""
    flags = {"features": features, "loss": loss, "k": k, "beta": beta, "lr": lr, "weight_decay": weight_decay,
             "epochs": epochs, "batch_size": batch_size, "mlp": mlp, "standardize": standardize,
             "val_fraction": val_fraction, "binary_threshold": binary_threshold, "seed": seed, "device": device,
             "output.dir": output_dir, "output.overwrite": overwrite}
    _qprobe("fit", "FitConfig", set_, flags, "qprobe fit")


@qprobe_app.command("sample")
def qprobe_sample(
    probe: Annotated[str, typer.Argument(help="run directory of `alignkit qprobe fit`")],
    out: Annotated[Path, typer.Option("--out", help="JSONL of chosen completions to write")],
    prompts: Annotated[str, typer.Option("--prompts", "-p", help="prompt source")] = "builtin:prompts",
    k: Annotated[int, typer.Option("--k", help="samples per prompt to choose from (paper: 48)")] = 48,
    beta: Annotated[float, typer.Option("--beta", help="softmax temperature; 0 = argmax (paper: 0.1)")] = 0.1,
    model: Annotated[str | None, typer.Option("--model", "-m", help="base model (default: the probe's)")] = None,
    max_samples: Annotated[int | None, typer.Option("--max-samples", help="use only the first N prompts")] = 64,
    reward: Annotated[str | None, typer.Option("--reward", help="also score the chosen completions")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="sequences per generate call")] = 64,
    seed: Annotated[int, typer.Option("--seed", help="sampling and choice seed")] = 0,
    backend: QpBackend = None,
    chat: Annotated[str | None, typer.Option("--chat", help="auto, on, off (default: the setting the probe's "
                                                            "features were collected with)")] = None,
    dtype: DtypeOpt = None, device: DeviceOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace --out if it exists")] = False,
) -> None:
    """The probe policy: k samples per prompt, one chosen by softmax(Q/β) (argmax for β = 0)."""
    from alignkit.trainers import qprobe

    check_output_file(out, overwrite)
    qprobe.sample(probe, prompts, out, k=k, beta=beta, model=model, max_samples=max_samples, reward=reward,
                  batch_size=batch_size, seed=seed, device=device or "auto", dtype=dtype or "auto",
                  backend=backend or "hf", chat=chat, overwrite=overwrite, console=console)


@qprobe_app.command("eval")
def qprobe_eval(
    probes: Annotated[list[str], typer.Argument(help="probe runs: DIR or NAME=DIR (several compare losses)")],
    features: Annotated[str, typer.Option("--features", help="held-out features (qprobe collect)")],
    k: Annotated[str | None, typer.Option("--k", help="chunk sizes, e.g. 1,2,4,8 (default powers of 2)")] = None,
    beta: Annotated[str | None, typer.Option("--beta", help="temperatures, e.g. 0,0.1,1 (0 = argmax)")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="base model for the greedy row")] = None,
    reward: Annotated[str | None, typer.Option("--reward", help="reward for greedy (default: features')")] = None,
    binary_threshold: Annotated[float | None, typer.Option("--binary-threshold", help="score 1[r > T]")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="sequences per generate call")] = None,
    dtype: DtypeOpt = None, device: DeviceOpt = None,
    output_dir: QpOut = None, overwrite: OverwriteOpt = None,
) -> None:
    """Expected reward of probe policies over k and β vs base pass@1, greedy and oracle best-of-k."""
    from alignkit.trainers import qprobe

    flags = {"probes": qprobe.parse_probes(probes), "features": features, "ks": qprobe.parse_list(k, int, "--k"),
             "betas": qprobe.parse_list(beta, float, "--beta"), "model": model, "reward": reward,
             "binary_threshold": binary_threshold, "batch_size": batch_size, "dtype": dtype, "device": device,
             "output.dir": output_dir, "output.overwrite": overwrite}
    _qprobe("evaluate_probes", "ProbeEvalConfig", None, flags, "qprobe eval")
