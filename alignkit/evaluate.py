"""`alignkit eval`: sample K completions per prompt from each policy; report reward, win rate, KL.

A policy is anything `models.load_causal_lm` loads (run dir, model dir, adapter dir, alias, `tiny`).
`evaluate_policies` samples and scores (writes nothing); `run` checks the inputs, then writes the run
directory. Metric definitions, standard errors, pairing, the k1 KL estimate and its assumptions,
seeds and model loading order: docs/eval.md.
"""

from __future__ import annotations

import gc
import inspect
import os
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from alignkit.config import CHAT_HELP, Block, ChatMode, OutputSection
from alignkit.errors import UserError
from alignkit.runs import run_readme, strict_json

OFF = "none"  # `--reference none` / `--preference none`


class PolicyEvalConfig(Block):
    """`alignkit eval`: the resolved settings written to config.yaml."""

    command: Literal["eval"] = "eval"
    policies: dict[str, str] = Field(
        default_factory=dict, description="display name -> policy spec (run dir, model dir, adapter dir, alias, tiny)"
    )
    prompts: str = Field("builtin:prompts", description="prompt source: file, dataset dir, hub id or builtin:prompts")
    max_samples: int | None = Field(64, ge=1, description="use only the first N prompts (None: all)")
    skip_invalid: bool = Field(False, description="drop prompt rows the validator refuses (counted per reason in "
                               "summary.json's dropped_rows) instead of stopping at the first")
    reward: str = Field("gold", description="Scorer spec (rewards.load_scorer): gold, module:function, RM dir")
    preference: str | None = Field(
        "oracle", description="Preference spec for the win rate (rewards.load_preference); none: no win rate"
    )
    baseline: str | None = Field(None, description="policy name or spec to compute win rates against (None: skip)")
    reference: str | None = Field(
        None, description="policy name or spec for the KL estimate (None: the baseline; none: skip)"
    )
    k: int = Field(4, ge=1, description="samples per prompt")
    max_new_tokens: int = Field(48, ge=1, description="tokens per completion")
    temperature: float = Field(1.0, ge=0.0, description="sampling temperature (0: greedy); KL is exact at 1")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling; KL is exact at 1")
    batch_size: int = Field(32, ge=1, description="sequences (prompts x k) per generate / reference forward")
    seed: int = Field(0, ge=0, description="sampling seed (and seed of the built-in prompts)")
    backend: Literal["hf", "vllm"] = Field(
        "hf", description="sampler: hf (transformers generate) or vllm (extra alignkit[vllm], a CUDA GPU)"
    )
    chat: ChatMode = Field("auto", description=CHAT_HELP)
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bf16 on a capable GPU, fp32 on CPU"
    )
    output: OutputSection = Field(default_factory=OutputSection)

    @model_validator(mode="after")
    def _check(self) -> PolicyEvalConfig:
        if not self.policies:
            raise ValueError("policies: no policies to evaluate: pass at least one POLICY (SPEC or NAME=SPEC)")
        empty = [n for n, s in self.policies.items() if not str(n).strip() or not str(s).strip()]
        if empty:
            raise ValueError(f"policies: policy {empty[0]!r} has an empty name or spec: use NAME=SPEC")
        if self.output.resume:
            raise ValueError("output.resume: eval has nothing to resume; use --overwrite to redo a run")
        return self


def parse_policies(items: list[str]) -> dict[str, str]:
    """`["tiny", "sft=runs/sft-1"]` -> {"tiny": "tiny", "sft": "runs/sft-1"}; names must be unique."""
    from alignkit.runs import parse_named

    return parse_named(items, "policy")


# --------------------------------------------------------------------------- estimators


def mean_se(values: np.ndarray, n_prompts: int, k: int) -> tuple[float, float | None]:
    """Mean of prompt-major values (n_prompts × k) and its standard error, prompts as the unit."""
    values = np.asarray(values, dtype=np.float64).reshape(n_prompts, k)
    mean = float(values.mean())
    if n_prompts > 1:
        return mean, float(values.mean(1).std(ddof=1) / np.sqrt(n_prompts))
    if k > 1:
        return mean, float(values.std(ddof=1) / np.sqrt(k))
    return mean, None


def hard_wins(prob: np.ndarray) -> np.ndarray:
    """1 for P > 0.5, 0.5 for a tie (P == 0.5), 0 otherwise."""
    prob = np.asarray(prob, dtype=np.float64)
    return np.where(prob > 0.5, 1.0, np.where(prob == 0.5, 0.5, 0.0))


@torch.no_grad()
def sequence_logprobs(
    model: Any, prompts: list[list[int]], completions: list[list[int]], batch_size: int = 32, pad_id: int = 0
) -> np.ndarray:
    """Σ_t log π(y_t | x, y_<t) of each completion under `model`, one teacher-forced forward per batch.

    Sequences are left-padded with position ids from the attention mask (as `generate` feeds them),
    sorted by length to limit padding, and only the last C + 1 positions' logits are computed
    (`logits_to_keep`, C = longest completion in the batch) where the model supports it.
    """
    n = len(completions)
    out = np.zeros(n, dtype=np.float64)
    device = next(model.parameters()).device
    keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters
    order = sorted(range(n), key=lambda i: len(prompts[i]) + len(completions[i]))
    was_training = model.training
    model.eval()
    for lo in range(0, n, batch_size):
        idx = order[lo : lo + batch_size]
        lens = torch.tensor([len(completions[i]) for i in idx])
        c = int(lens.max())
        if c == 0:
            continue
        seqs = [prompts[i] + completions[i] for i in idx]
        t = max(len(s) for s in seqs)
        ids = torch.full((len(idx), t), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), t), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, t - len(s) :] = torch.tensor(s)
            mask[row, t - len(s) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        kw = {"logits_to_keep": c + 1} if keep_arg else {}
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, **kw).logits
        logits = logits[:, -(c + 1) : -1].float()  # position t predicts token t + 1
        targets = ids[:, t - c :]
        per_token = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
        valid = torch.arange(c, device=device)[None, :] >= (c - lens.to(device))[:, None]
        out[idx] = torch.where(valid, per_token, 0.0).sum(1).double().cpu().numpy()
    model.train(was_training)
    return out


# --------------------------------------------------------------------------- the Python API


def _logit_processors(model: Any) -> list[str]:
    """Settings of a checkpoint's generation_config that reshape the sampling distribution (which
    `generation.generate` does not override), e.g. a repetition penalty."""
    g = getattr(model, "generation_config", None)
    if g is None:
        return []
    found = []
    for name, neutral in (("repetition_penalty", 1.0), ("no_repeat_ngram_size", 0), ("encoder_repetition_penalty", 1.0),
                          ("min_new_tokens", 0), ("min_length", 0), ("bad_words_ids", None), ("suppress_tokens", None),
                          ("epsilon_cutoff", 0.0), ("eta_cutoff", 0.0), ("typical_p", 1.0), ("min_p", None)):
        value = getattr(g, name, None)
        if value not in (None, neutral) and value != []:
            found.append(f"{name}={value}")
    return found


def sample_seed(seed: int, spec: str) -> int:
    """The sampling seed of one model spec: its own stream, so that policies' samples are independent."""
    import zlib

    return seed + zlib.crc32(str(spec).encode()) % 1_000_003


def _role(x: str, policies: dict[str, str]) -> tuple[str | None, str]:
    """(row name, spec) of a baseline / reference given as a policy name, a policy's spec, or a spec."""
    if x in policies:
        return x, policies[x]
    for name, spec in policies.items():
        if spec == x:
            return name, spec
    return None, x


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_specs(reward: str, preference: str | None) -> None:
    """The reward and preference specs, checked without loading a model (a `module:function` is imported):
    call before any sampling. The preference is checked even when no baseline will use it."""
    from alignkit import rewards

    rewards.check_scorer_spec(reward)
    if preference not in (None, "", OFF):
        rewards.check_preference_spec(preference)


def evaluate_policies(
    policies: dict[str, str],
    prompts: list,
    *,
    reward: str = "gold",
    preference: str | None = "oracle",
    baseline: str | None = None,
    reference: str | None = None,
    k: int = 4,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 32,
    seed: int = 0,
    device: str = "auto",
    dtype: str = "auto",
    progress: bool = True,
    backend: str = "hf",
    chat: str = "off",
) -> dict[str, Any]:
    """Sample, score and compare policies; writes nothing. Definitions and choices: docs/eval.md.

    Returns {"policies": {name: metrics}, "settings": {...}, "samples": [one dict per sample]}.
    A baseline that is not one of `policies` gets a row of its own ("baseline"). `backend` samples with
    transformers (`hf`) or vLLM (`vllm`, docs/vllm.md); the reference's log-probs are always an HF forward.
    `chat` (`generation.chat_mode`) renders the prompts; the reference scores the very ids each policy read.
    """
    from alignkit import generation, models, rewards, vllm_backend

    generation.check_settings(k, max_new_tokens, temperature, top_p, batch_size)
    vllm_backend.check_backend(backend, device)
    check_specs(reward, preference)
    if not policies:
        raise UserError("no policies to evaluate: pass at least one POLICY (a run dir, model dir or tiny)")
    prompts = list(prompts)
    if not prompts:
        raise UserError("no prompts to evaluate on: the prompt source is empty")
    say = _say if progress else (lambda msg: None)

    # ---- roles: which models are sampled, which one is the reference
    rows = {str(n): str(s) for n, s in policies.items()}
    base_name, base_spec = _role(baseline, rows) if baseline else (None, None)
    if baseline and base_name is None:
        base_name = "baseline" if "baseline" not in rows else f"baseline ({base_spec})"
        rows[base_name] = base_spec
    reference = baseline if reference is None else reference
    ref_name, ref_spec = (None, None) if reference in (None, "", OFF) else _role(reference, rows)
    preference = None if preference in (None, "", OFF) else preference

    # ---- validate everything cheap before any sampling: specs, scorer, preference, tokenizers
    scorer = rewards.load_scorer(reward, device=device, dtype=dtype, batch_size=batch_size)
    pref = rewards.load_preference(preference, device=device) if preference and base_name else None
    specs = list(dict.fromkeys([*rows.values(), *([ref_spec] if ref_spec else [])]))
    tokenizers = {spec: models.load_tokenizer(_weights_dir(spec)) for spec in specs}
    for spec in set(rows.values()):
        generation.check_chat(tokenizers[spec], chat)
    if ref_spec:
        ref_vocab = tokenizers[ref_spec].get_vocab()
        for spec in specs:
            if tokenizers[spec].get_vocab() != ref_vocab:
                raise UserError(
                    f"policy '{spec}' and reference '{ref_spec}' have different tokenizers: the KL estimate "
                    "compares token log-probs, so they must share a vocabulary (or pass --reference none)"
                )

    # ---- sample each model once (reference last), score the reference's log-probs over everyone
    samples: dict[str, list[generation.Sample]] = {}
    ids: dict[str, list[list[int]]] = {}  # prompt ids per spec (policy's tokenizer)
    timing: dict[str, dict[str, float]] = {}
    sampler_warnings: list[str] = []  # the sampler is not π itself: the KL is not exact
    capped: list[str] = []  # max_new_tokens lowered to fit a model's positions
    ref_lp: dict[str, np.ndarray] = {}
    order = [s for s in specs if s != ref_spec] + ([ref_spec] if ref_spec else [])
    for spec in order:
        model = tok = None
        if spec in rows.values():
            names = [n for n, s in rows.items() if s == spec]
            sampler, tok = generation.load_sampler(spec, backend, dtype=dtype, device=device, seed=seed)
            say(f"sampling {', '.join(names)} ({spec}): {len(prompts)} prompts x {k}" +
                (" with vLLM" if backend == "vllm" else ""))
            stats: dict[str, float] = {}
            samples[spec] = generation.generate(
                sampler, tok, prompts, k=k, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                batch_size=batch_size, seed=sample_seed(seed, spec), progress=progress, stats=stats,
                return_logprobs=bool(ref_spec), chat=chat,
            )
            ids[spec] = generation.prompt_ids(tok, prompts, chat=chat)
            if stats["max_new_tokens"] < max_new_tokens:
                capped.append(f"{spec}: max_new_tokens capped at {stats['max_new_tokens']} to fit the model's "
                              "positions")
            # vLLM samples from the raw distribution (docs/vllm.md); the HF sampler applies generation_config
            shaped = _logit_processors(sampler) if backend == "hf" else []
            if ref_spec and shaped:  # the sampler is not π itself: log π from the raw logits is not its log-prob
                sampler_warnings.append(f"{spec}: its generation_config sets {', '.join(shaped)}, so samples do not "
                                        "come from the model's own distribution and the KL is not exact")
            timing[spec] = stats
            if backend == "hf":
                model = sampler  # the reference's log-probs reuse it
            else:
                sampler.close()  # its GPU memory, before the next model loads
            del sampler
        if spec == ref_spec and model is None:  # the teacher-forced forward needs the HF model
            model, tok = models.load_causal_lm(spec, dtype=dtype, device=device)
        if spec == ref_spec:
            say(f"reference log-probs under {ref_spec}")
            for s_spec, s_samples in samples.items():
                eos = tokenizers[s_spec].eos_token_id
                full = [
                    s.token_ids + ([s.eos_token_id if s.eos_token_id is not None else eos] if s.finished else [])
                    for s in s_samples
                ]
                pids = [ids[s_spec][i // k] for i in range(len(s_samples))]
                ref_lp[s_spec] = sequence_logprobs(model, pids, full, batch_size, pad_id=tok.pad_token_id or 0)
        del model, tok  # free it before the next model is loaded
        _release_memory()

    # ---- metrics per row
    from alignkit.arena import repetition_rate  # a text statistic of the built-in task, used for every policy

    n_prompts = len(prompts)
    rep_prompts = [p for p in prompts for _ in range(k)]
    base = samples[base_spec] if base_name else None
    results: dict[str, dict[str, Any]] = {}
    records: list[dict[str, Any]] = []
    for name, spec in rows.items():
        ss = samples[spec]
        texts = [s.completion for s in ss]
        finished = [s.finished for s in ss]
        r = scorer.score(rep_prompts, texts, finished).mean.double().numpy()
        m: dict[str, Any] = {"spec": spec, "n_samples": len(ss)}
        m["reward_mean"], m["reward_se"] = mean_se(r, n_prompts, k)
        m["reward_sd"] = float(r.std(ddof=1)) if len(r) > 1 else 0.0
        win = None
        if pref is not None:
            win = pref.prob(rep_prompts, texts, [s.completion for s in base]).double().numpy()
            m["is_baseline"] = name == base_name
            m["win_rate"], m["win_rate_se"] = mean_se(win, n_prompts, k)
            m["hard_win_rate"], m["hard_win_rate_se"] = mean_se(hard_wins(win), n_prompts, k)
        lp = ref = None
        if ref_spec:
            lp = np.array([s.logprob for s in ss], dtype=np.float64)
            ref = ref_lp[spec]
            m["is_reference"] = name == ref_name
            m["kl"], m["kl_se"] = mean_se(lp - ref, n_prompts, k)
        m["mean_length"] = float(np.mean([s.n_tokens for s in ss]))
        m["eos_rate"] = float(np.mean(finished))
        m["repetition_rate"] = float(repetition_rate(texts).mean())
        m["samples_per_s"] = timing[spec].get("samples_per_s")
        results[name] = m
        for i, s in enumerate(ss):
            records.append({
                "policy": name, "prompt": s.prompt, "index": s.index, "completion": s.completion,
                "reward": float(r[i]), "finished": s.finished, "n_tokens": s.n_tokens,
                "win_prob": None if win is None else float(win[i]),
                "logprob": None if lp is None else float(lp[i]),
                "ref_logprob": None if ref is None else float(ref[i]),
            })

    warnings = capped + sampler_warnings
    if ref_spec and (temperature != 1.0 or top_p != 1.0):
        warnings.append(
            f"KL is estimated from samples at temperature {temperature:g}, top-p {top_p:g}, not from the policy "
            "itself: it is E_sampler[log π − log π_ref], not KL(π ‖ π_ref) (exact in expectation only at 1, 1)"
        )
    settings = {
        "n_prompts": n_prompts, "k": k, "reward": reward, "preference": preference if pref else None,
        "baseline": base_name, "baseline_spec": base_spec, "reference": ref_name or ref_spec,
        "reference_spec": ref_spec, "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
        "batch_size": batch_size, "seed": seed, "device": device, "dtype": dtype, "backend": backend, "chat": chat,
        "kl_estimator": "k1: mean over samples of sum_t [log pi - log pi_ref], EOS included" if ref_spec else None,
        "kl_exact_in_expectation": bool(ref_spec) and temperature == 1.0 and top_p == 1.0 and not sampler_warnings,
        "se_unit": "prompt", "warnings": warnings,
    }
    return {"policies": results, "settings": settings, "samples": records}


def _weights_dir(spec: str) -> str:
    """Where the tokenizer of a policy spec lives (fails with models' own UserError, loads no weights)."""
    from alignkit import models

    path = models._resolve_for_weights(spec)
    base = models._adapter_base(path)
    if base:
        models._resolve_for_weights(base)
    return path


def _say(msg: str) -> None:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True).print(f"[dim]eval:[/dim] {escape(msg)}", highlight=False)


# --------------------------------------------------------------------------- the command


def run(cfg: PolicyEvalConfig, progress: Any | None = None, console: Any | None = None) -> dict[str, Any]:
    """`alignkit eval`: check the output directory and the specs, evaluate, then write the run directory;
    returns the summary.

    `progress` (a rich Progress, as trainers get) is accepted for the common run() signature; when one
    is given, generation's own progress bar is turned off (one live display at a time).
    """
    from rich.console import Console
    from rich.markup import escape

    from alignkit import data, generation, vllm_backend
    from alignkit.config import to_yaml
    from alignkit.runs import RunDir, atomic_write_text, checked_output
    from alignkit.trainers._hf import quiet_libraries

    quiet_libraries()
    console = console or Console()
    t0 = time.perf_counter()
    out = checked_output(cfg.output.dir, cfg.output.overwrite, "eval")  # before any work: can it be written?
    check_specs(cfg.reward, cfg.preference)
    vllm_backend.check_backend(cfg.backend, cfg.device)
    dropped: dict[str, int] = {}
    ds, _ = data.load(cfg.prompts, kind="prompts", max_samples=cfg.max_samples, seed=cfg.seed, dropped=dropped,
                      skip_invalid=cfg.skip_invalid)
    result = evaluate_policies(
        cfg.policies, list(ds["prompt"]), reward=cfg.reward, preference=cfg.preference, baseline=cfg.baseline,
        reference=cfg.reference, k=cfg.k, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
        top_p=cfg.top_p, batch_size=cfg.batch_size, seed=cfg.seed, device=cfg.device, dtype=cfg.dtype,
        progress=progress is None, backend=cfg.backend, chat=generation.chat_mode(cfg.chat, cfg.prompts),
    )
    run_dir = RunDir.open(out, cfg.output.overwrite, False, to_yaml(cfg))
    settings = {**result["settings"], "prompts": cfg.prompts}
    for name, m in result["policies"].items():
        run_dir.log({"policy": name, **m})
    atomic_write_text(
        run_dir.path("samples.jsonl"),
        "".join(strict_json(r, ensure_ascii=False) + "\n" for r in result["samples"]),
    )
    plot(result["policies"], settings, run_dir.path("plots", "reward_vs_kl.png"))
    console.print(table(result["policies"], settings))
    for w in settings["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {escape(w)}", highlight=False)
    summary = {
        "command": "eval", "settings": settings, "policies": result["policies"],
        "wall_seconds": time.perf_counter() - t0, **({"dropped_rows": dropped} if dropped else {}),
    }
    final = run_dir.finish(summary, readme=_README)
    console.print(f"results in {final}/ (summary.json, samples.jsonl, plots/reward_vs_kl.png)")
    return {**summary, "output_dir": str(final)}


_README = run_readme(
    "alignkit eval",
    '`summary.json`: per-policy metrics and the settings; `samples.jsonl`: one row per sample (policy, '
    'prompt, completion, reward, finished, logprob, ref_logprob, win_prob); `plots/reward_vs_kl.png`. '
    'Metric definitions: docs/eval.md.',
)


def _pm(mean: float | None, se: float | None, fmt: str = "{:+.3f}") -> str:
    if mean is None:
        return "–"
    shown = fmt.format(mean)
    if float(shown) == 0.0:  # float error around zero (e.g. a policy's KL to itself) shows as 0, not -0.00
        shown = fmt.format(0.0)
    return shown + ("" if se is None else "±" + fmt.format(se).lstrip("+"))


def table(policies: dict[str, dict[str, Any]], settings: dict[str, Any], compact: bool = False) -> Any:
    """The console table (rich): mean ± standard error, sd of the reward over samples. `compact` drops the
    sd and hard-win-rate columns (both stay in summary.json) so the table fits 80 columns."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    win, kl = bool(settings["preference"]), bool(settings["reference_spec"])
    notes = ["± standard error (prompts as the unit)"]
    if win:
        notes.append(f"win rate vs {settings['baseline']} under {settings['preference']} (* = the baseline)")
    if kl:
        notes.append(f"KL to {settings['reference']} in nats (k1)")
    t = Table(
        title=escape(f"alignkit eval: {settings['n_prompts']} prompts x {settings['k']}, reward {settings['reward']}, "
                     f"T={settings['temperature']:g}, top-p {settings['top_p']:g}"),
        caption=escape("; ".join(notes)), box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True,
    )
    cols = ["reward"] + ([] if compact else ["sd"]) + (["win rate"] if win else []) + (
        ["hard"] if win and not compact else []) + (["KL"] if kl else [])
    t.add_column("policy", overflow="fold", min_width=9)  # long names wrap; the numbers never do
    for c in [*cols, "len", "EOS", "rep."]:
        t.add_column(c, justify="right", no_wrap=True)
    for name, m in policies.items():
        row = [escape(name), _pm(m["reward_mean"], m["reward_se"])] + ([] if compact else [f"{m['reward_sd']:.3f}"])
        if win:
            mark = "*" if m["is_baseline"] else ""
            row += [_pm(m["win_rate"], m["win_rate_se"], "{:.3f}") + mark]
            row += [] if compact else [f"{m['hard_win_rate']:.3f}"]
        if kl:
            row += [_pm(m["kl"], m["kl_se"], "{:.2f}")]
        row += [f"{m['mean_length']:.1f}", f"{m['eos_rate']:.0%}", f"{m['repetition_rate']:.0%}"]
        t.add_row(*row)
    return t


def plot(policies: dict[str, dict[str, Any]], settings: dict[str, Any], path: str | os.PathLike) -> Path:
    """Mean reward (± se) against KL to the reference (± se), one labelled point per policy; bars of
    mean reward per policy when there is no reference."""
    from alignkit.runs import pyplot

    plt = pyplot()

    names = list(policies)
    y = np.array([policies[n]["reward_mean"] for n in names])
    yerr = np.array([policies[n]["reward_se"] or 0.0 for n in names])
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    if settings.get("reference_spec"):
        x = np.array([policies[n]["kl"] for n in names])
        xerr = np.array([policies[n]["kl_se"] or 0.0 for n in names])
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="o", capsize=3)
        for n, xi, yi in zip(names, x, y):
            ax.annotate(n, (xi, yi), textcoords="offset points", xytext=(5, 5), fontsize=9)
        ax.set_xlabel(f"KL to {settings['reference']} (nats, k1 estimate)")
        ax.set_title("reward vs KL")
    else:
        ax.bar(names, y, yerr=yerr, capsize=3)
        ax.set_xlabel("policy")
        ax.set_title("mean reward per policy (no reference: no KL)")
    ax.set_ylabel(f"mean reward ({settings['reward']})")
    ax.grid(alpha=0.3)
    from alignkit.runs import save_figure

    return save_figure(fig, path)


# The old names, until cli, quickstart and bench call the new ones (the lead removes these at merge).

__all__ = [
    "PolicyEvalConfig", "check_specs", "evaluate_policies", "hard_wins", "mean_se", "parse_policies", "plot", "run",
    "sequence_logprobs",
]
