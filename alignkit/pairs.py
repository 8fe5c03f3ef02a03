"""On-policy preference pairs: sample K completions per prompt from a policy, judge them with a
`Preference` of the shared wrapper, keep one (chosen, rejected) pair per prompt (`alignkit pairs`).

The data step of on-policy DPO/IPO/KTO and of each round of iterative DPO / SPPO (SPPO Algorithm 1,
steps 1-4). `pick` selects best-worst by P̂_i = (1/K) Σ_j P[i, j] (steps 3-4) or a random pair; every row
carries `prob` = P(chosen ≻ rejected) (pairwise SPPO eq. 4.12) and the self-play targets `p_hat_chosen`
/ `p_hat_rejected`. Prompts without two different non-empty samples, or whose samples the judge cannot
tell apart, are dropped and counted (`build`). `write_pairs` is the whole command (judge and policy
loaded, pairs built and written), shared by `alignkit pairs` and a pipeline's `pairs` step. Usage and
options: docs/algorithms/dpo.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from alignkit.errors import UserError

Select = Literal["best-worst", "random"]
Label = Literal["prob", "sample"]


@dataclass
class Picked:
    chosen: torch.Tensor  # (N,) index of the chosen sample per prompt
    rejected: torch.Tensor  # (N,) index of the rejected sample
    prob: torch.Tensor  # (N,) P(chosen ≻ rejected)
    p_hat: torch.Tensor  # (N, K) P̂(y_i ≻ π) = row means of P (SPPO Algorithm 1, step 3)


def pick(P: torch.Tensor, select: Select = "best-worst", label: Label = "prob", seed: int = 0) -> Picked:
    """Choose one (chosen, rejected) pair per prompt from preference matrices P (N, K, K). Pure function.

    `best-worst`: argmax / argmin of P̂ (first index on ties). `random`: two distinct indices drawn
    uniformly (seeded), ordered by the judge (`prob`) or by a Bernoulli(P) label (`sample`).
    """
    if P.ndim != 3 or P.shape[1] != P.shape[2] or P.shape[1] < 2:
        raise ValueError(f"P must be (N, K, K) with K >= 2, got {tuple(P.shape)}")
    n, k, _ = P.shape
    p_hat = P.double().mean(dim=2)
    rows = torch.arange(n)
    if select == "best-worst":
        a, b = p_hat.argmax(dim=1), p_hat.argmin(dim=1)
        prob = P[rows, a, b].double()
        return Picked(a, b, prob.float(), p_hat.float())
    if select != "random":
        raise ValueError(f"select must be best-worst or random, got {select!r}")
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(k, (n,), generator=g)
    b = (a + torch.randint(1, k, (n,), generator=g)) % k  # a different index, uniformly
    p_ab = P[rows, a, b].double()
    if label == "prob":
        a_wins = p_ab >= 0.5
    elif label == "sample":
        a_wins = torch.rand(n, generator=g, dtype=torch.float64) < p_ab
    else:
        raise ValueError(f"label must be prob or sample, got {label!r}")
    chosen, rejected = torch.where(a_wins, a, b), torch.where(a_wins, b, a)
    prob = torch.where(a_wins, p_ab, 1 - p_ab)
    return Picked(chosen, rejected, prob.float(), p_hat.float())


def build(
    model: Any,
    tokenizer: Any,
    prompts: list,
    preference: Any,
    k: int = 4,
    select: Select = "best-worst",
    label: Label = "prob",
    seed: int = 0,
    progress: bool = True,
    after_sampling: Any = None,
    **generate_kwargs: Any,
) -> tuple[list[dict], dict[str, Any]]:
    """Sample k completions per prompt from `model` (an HF model or a vLLM engine, `generation.load_sampler`),
    judge them in ONE `preference.matrices` call, pick. `preference` may be a zero-argument loader, called
    after sampling and `after_sampling()` (a vLLM engine's `close`: the judge then loads into the GPU memory
    the engine held). Returns
    (pairwise rows, stats). An empty sample (EOS first) is judged as a copy of the prompt's first non-empty
    one, so it is never picked; prompts whose picks are the same text or whose P̂ are all equal are dropped
    (`dropped_ties`), as are prompts without two different non-empty samples (`dropped_identical`)."""
    from alignkit import generation

    if k < 2:
        raise UserError(f"--k must be at least 2 to form a pair (got {k})")
    gen_stats: dict[str, float] = {}
    samples = generation.generate(model, tokenizer, prompts, k=k, seed=seed, progress=progress, stats=gen_stats,
                                  **generate_kwargs)
    if after_sampling is not None:
        after_sampling()
    if not hasattr(preference, "matrices"):
        preference = preference()
    texts = [[samples[i * k + j].completion for j in range(k)] for i in range(len(prompts))]
    shown = [samples[i * k].prompt for i in range(len(prompts))]
    # an empty completion (EOS first) is no usable preference text: the shared loader refuses empty fields.
    # Prompts with fewer than two distinct non-empty samples carry no preference and are dropped.
    keep = [i for i, t in enumerate(texts) if len({c for c in t if c.strip()}) > 1]
    if not keep:
        raise UserError("no prompt has two different non-empty samples: nothing to prefer (raise --temperature or --k)")
    # (prompts whose picks tie under the judge are dropped below and counted as dropped_ties)
    empty = sum(1 for i in keep for c in texts[i] if not c.strip())
    for i in keep:  # judge only the non-empty samples: repeat a prompt's first non-empty one in their place
        first = next(c for c in texts[i] if c.strip())
        texts[i] = [c if c.strip() else first for c in texts[i]]
    P = preference.matrices([shown[i] for i in keep], [texts[i] for i in keep])
    picked = pick(P, select, label, seed)
    rows, ties = [], 0
    for n, i in enumerate(keep):
        c, r = int(picked.chosen[n]), int(picked.rejected[n])
        if texts[i][c] == texts[i][r] or float(picked.p_hat[n].max()) == float(picked.p_hat[n].min()):
            ties += 1  # the judge sees no difference (or the two picks are the same text): no preference
            continue
        rows.append({
            "prompt": shown[i], "chosen": texts[i][c], "rejected": texts[i][r], "prob": float(picked.prob[n]),
            "p_hat_chosen": float(picked.p_hat[n, c]), "p_hat_rejected": float(picked.p_hat[n, r]),
        })
    stats = {
        "prompts": len(prompts), "pairs": len(rows), "dropped_identical": len(prompts) - len(keep), "k": k,
        "empty_samples_replaced": empty, "dropped_ties": ties,
        "select": select, "label": label, "mean_prob": float(picked.prob.mean()),
        "eos_rate": sum(s.finished for s in samples) / len(samples),
        "samples_per_s": gen_stats.get("samples_per_s"),
    }
    return rows, stats


def write_pairs(
    model: str,
    prompts: list,
    out: str | Path,
    preference: str = "oracle",
    source: str | None = None,
    backend: str = "hf",
    chat: str | bool = "auto",
    dtype: str = "auto",
    device: str = "auto",
    k: int = 4,
    select: Select = "best-worst",
    label: Label = "prob",
    seed: int = 0,
    progress: bool = True,
    **generate_kwargs: Any,
) -> dict[str, Any]:
    """`alignkit pairs` after its checks: load the judge (`rewards.load_preference`) and the policy's sampler
    (`generation.load_sampler`: HF or vLLM), `build` the pairs, write them to `out` as JSONL; returns the
    stats. `chat` is the --chat setting, resolved for the prompts' `source` (`generation.chat_mode`: `auto`
    is off for builtin: prompts); it and the backend are checked before anything loads."""
    import datasets

    from alignkit import generation, vllm_backend
    from alignkit.data import to_jsonl
    from alignkit.rewards import check_preference_spec, load_preference

    mode = generation.chat_mode(chat, source)
    vllm_backend.check_backend(backend, device)
    check_preference_spec(preference)  # a bad judge is one line before anything loads
    # with vLLM the judge loads after the engine is closed: the engine takes 0.9 of the GPU and will not
    # start in less free memory
    judge = (lambda: load_preference(preference, device=device)) if backend == "vllm" else load_preference(
        preference, device=device)
    sampler, tokenizer = generation.load_sampler(model, backend, dtype=dtype, device=device, seed=seed)
    try:
        rows, stats = build(sampler, tokenizer, prompts, judge, k=k, select=select, label=label, seed=seed,
                            progress=progress, chat=mode, after_sampling=sampler.close if backend == "vllm" else None,
                            **generate_kwargs)
    finally:
        if backend == "vllm":  # free the engine's GPU memory before a pipeline's next step loads a model
            sampler.close()
    to_jsonl(datasets.Dataset.from_list(rows), out)
    return {**stats, "backend": backend, "chat": mode}
