"""The commands that sample from policies: `eval` (reward, win rate, KL), `generate` (JSONL of
samples) and `pairs` (on-policy preference pairs). Cheap checks (settings, output path) come
before any model is loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from alignkit.cli.common import (
    ColumnsOpt,
    DeviceOpt,
    DtypeOpt,
    MaxSamplesOpt,
    OutOpt,
    OverwriteOutOpt,
    app,
    check_output_file,
    check_seed,
    console,
)
from alignkit.errors import UserError

BackendOpt = Annotated[str, typer.Option("--backend", help="sampler: hf (transformers generate) or vllm "
                                                         "(pip install 'alignkit\\[vllm]', a CUDA GPU)")]
SkipInvalidOpt = Annotated[bool, typer.Option("--skip-invalid", help="drop prompt rows the validator refuses "
                                                                   "(counted per reason) instead of stopping")]
ChatOpt = Annotated[str, typer.Option("--chat", help="chat template for plain prompts: auto (when the tokenizer has "
                                                     "one; not builtin: prompts), on, off; messages always use it")]


@app.command("eval")
def eval_cmd(
    policies: Annotated[list[str], typer.Argument(help="SPEC or NAME=SPEC: run dir, model dir, adapter dir, tiny")],
    prompts: Annotated[str, typer.Option("--prompts", "-p", help="prompt source")] = "builtin:prompts",
    max_samples: Annotated[int | None, typer.Option("--max-samples", help="use only the first N prompts")] = 64,
    reward: Annotated[str, typer.Option("--reward", help="gold, module:function or a reward model dir")] = "gold",
    preference: Annotated[str, typer.Option("--preference", help="oracle[:TAU], pairrm, scorer spec, none")] = "oracle",
    baseline: Annotated[str | None, typer.Option("--baseline", help="policy name or spec for win rates")] = None,
    reference: Annotated[str | None, typer.Option("--reference", help="KL reference (default: baseline; none)")] = None,
    k: Annotated[int, typer.Option("--k", help="samples per prompt")] = 4,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="tokens per completion")] = 48,
    temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy; KL is exact at 1")] = 1.0,
    top_p: Annotated[float, typer.Option("--top-p", help="nucleus sampling; KL is exact at 1")] = 1.0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="sequences per generate/forward")] = 32,
    seed: Annotated[int, typer.Option("--seed", help="sampling seed (>= 0)")] = 0,
    backend: BackendOpt = "hf", chat: ChatOpt = "auto", skip_invalid: SkipInvalidOpt = False,
    dtype: DtypeOpt = None, device: DeviceOpt = None, output_dir: OutOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing run directory")] = False,
) -> None:
    """Sample K completions per prompt from each policy: reward, win rate vs a baseline, KL to a reference."""
    from alignkit import evaluate
    from alignkit.config import build_config

    flags = {
        "policies": evaluate.parse_policies(policies), "prompts": prompts, "max_samples": max_samples,
        "reward": reward, "preference": preference, "baseline": baseline, "reference": reference, "k": k,
        "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "batch_size": batch_size,
        "seed": seed, "backend": backend, "chat": chat, "skip_invalid": skip_invalid, "dtype": dtype,
        "device": device, "output.dir": output_dir,
        "output.overwrite": overwrite,
    }
    evaluate.run(build_config(evaluate.PolicyEvalConfig, {}, None, flags, origin="eval"))


# sampling options shared by generate and pairs
TopPOpt = Annotated[float, typer.Option(help="nucleus sampling")]
NewTokensOpt = Annotated[int, typer.Option(help="tokens per completion")]
GenBatchOpt = Annotated[int, typer.Option(help="sequences (prompts x k) per generate call")]


def _check_sampling(k: int, max_new_tokens: int, temperature: float, top_p: float, batch_size: int, seed: int,
                    backend: str, device: str | None, chat: str) -> None:
    from alignkit import generation, vllm_backend

    generation.check_settings(k, max_new_tokens, temperature, top_p, batch_size)
    generation.chat_mode(chat)
    check_seed(seed)
    vllm_backend.check_backend(backend, device)


@app.command()
def generate(
    model: Annotated[str, typer.Option("--model", "-m", help="policy: alias, dir, run dir, or tiny")],
    prompts: Annotated[str, typer.Option("--prompts", "-p", help="prompt source (any kind with a prompt column)")],
    out: Annotated[Path, typer.Option("--out", help="JSONL file to write")],
    k: Annotated[int, typer.Option("--k", help="samples per prompt")] = 1,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 1.0,
    top_p: TopPOpt = 1.0, max_new_tokens: NewTokensOpt = 48, batch_size: GenBatchOpt = 32,
    max_samples: MaxSamplesOpt = None, columns: ColumnsOpt = None, skip_invalid: SkipInvalidOpt = False,
    seed: Annotated[int, typer.Option(help="sampling seed (>= 0)")] = 0, backend: BackendOpt = "hf",
    chat: ChatOpt = "auto", dtype: DtypeOpt = None, device: DeviceOpt = None, overwrite: OverwriteOutOpt = False,
) -> None:
    """Sample K completions per prompt and write them as JSONL (prompt, completion, finished, ...)."""
    from alignkit import data as data_mod
    from alignkit import generation
    from alignkit.trainers._hf import quiet_libraries

    quiet_libraries()
    _check_sampling(k, max_new_tokens, temperature, top_p, batch_size, seed, backend, device, chat)
    check_output_file(out, overwrite)
    ds, _ = data_mod.load(prompts, kind="prompts", columns=columns, max_samples=max_samples,
                          skip_invalid=skip_invalid)
    lm, tok = generation.load_sampler(model, backend, dtype=dtype or "auto", device=device or "auto", seed=seed)
    stats: dict[str, Any] = {}
    samples = generation.generate(
        lm, tok, list(ds["prompt"]), k=k, max_new_tokens=max_new_tokens, temperature=temperature,
        top_p=top_p, batch_size=batch_size, seed=seed, progress=True, stats=stats,
        chat=generation.chat_mode(chat, prompts),
    )
    generation.write_jsonl(samples, out)
    fin = sum(s.finished for s in samples) / max(len(samples), 1)
    console.print(
        f"wrote {len(samples)} samples to {out} ({stats.get('samples_per_s', 0):.1f} samples/s, "
        f"{fin:.0%} ended with EOS)"
    )


@app.command()
def pairs(
    model: Annotated[str, typer.Option("--model", "-m", help="policy to sample: alias, dir, run dir, or tiny")],
    out: Annotated[Path, typer.Option("--out", help="pairwise JSONL to write")],
    prompts: Annotated[str, typer.Option("--prompts", "-p", help="prompt source")] = "builtin:prompts",
    preference: Annotated[str, typer.Option("--preference", help="judge: oracle, pairrm, or a reward spec")] = "oracle",
    k: Annotated[int, typer.Option("--k", help="samples per prompt (>= 2)")] = 4,
    select: Annotated[str, typer.Option("--select", help="best-worst (SPPO/iterative DPO) or random")] = "best-worst",
    label: Annotated[str, typer.Option("--label", help="random pairs: prob (judge's choice) or sample")] = "prob",
    temperature: Annotated[float, typer.Option(help="sampling temperature (> 0)")] = 1.0,
    top_p: TopPOpt = 1.0, max_new_tokens: NewTokensOpt = 48, batch_size: GenBatchOpt = 32,
    max_samples: MaxSamplesOpt = None, columns: ColumnsOpt = None, skip_invalid: SkipInvalidOpt = False,
    seed: Annotated[int, typer.Option(help="sampling and selection seed (>= 0)")] = 0, backend: BackendOpt = "hf",
    chat: ChatOpt = "auto", dtype: DtypeOpt = None, device: DeviceOpt = None, overwrite: OverwriteOutOpt = False,
) -> None:
    """On-policy preference pairs: K samples per prompt from a policy, judged, one pair per prompt."""
    from alignkit import data as data_mod
    from alignkit import pairs as pairs_mod
    from alignkit.trainers._hf import quiet_libraries

    quiet_libraries()
    if k < 2:
        raise UserError(f"--k must be at least 2 to form a pair (got {k})")
    if select not in ("best-worst", "random") or label not in ("prob", "sample"):
        raise UserError(f"--select must be best-worst or random and --label prob or sample (got {select}, {label})")
    _check_sampling(k, max_new_tokens, temperature, top_p, batch_size, seed, backend, device, chat)
    if temperature == 0:
        raise UserError("--temperature must be > 0: greedy decoding gives K identical samples")
    check_output_file(out, overwrite)
    ds, _ = data_mod.load(prompts, kind="prompts", columns=columns, max_samples=max_samples,
                          skip_invalid=skip_invalid)
    stats = pairs_mod.write_pairs(
        model, list(ds["prompt"]), out, preference=preference, source=prompts, backend=backend, chat=chat,
        dtype=dtype or "auto", device=device or "auto", k=k, select=select, label=label, seed=seed,  # type: ignore[arg-type]
        temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, batch_size=batch_size,
    )
    console.print(
        f"wrote {stats['pairs']} pairs to {out} ({stats['dropped_identical']} prompts dropped: identical samples; "
        f"mean P(chosen ≻ rejected) {stats['mean_prob']:.3f}; EOS {stats['eos_rate']:.0%})"
    )
