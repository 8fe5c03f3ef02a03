"""The stages of one SPPO iteration that write files: sampling in saved chunks (with the reference log-probs
taken right after), the batched K×K preference scoring, and the per-iteration evaluation.

Each stage's output is written atomically into the iteration's directory and read back on `--resume`, so
a stopped run redoes at most one chunk. On N ranks each rank works on its shard (rows r, r + N, ...) and
the results are gathered in prompt order; only the main rank writes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from alignkit.online import ranks, rollout, selfplay


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    from alignkit.runs import atomic_write_text, strict_json

    atomic_write_text(path, "".join(strict_json(r) + "\n" for r in rows))


def _unshard(parts: list[list[Any]]) -> list[Any]:
    """Rank r held items r, r + N, ...: back to one list in the original order."""
    out: list[Any] = []
    for i in range(max(map(len, parts), default=0)):
        out += [part[i] for part in parts if i < len(part)]
    return out


@torch.no_grad()
def sequence_logprobs(model: Any, batch: rollout.Batch, minibatch: int) -> torch.Tensor:
    """(B,) Σ_t log π(y_t | x, y_<t) of every completion of `batch` (EOS included when emitted), at
    temperature 1: one teacher-forced forward per `minibatch` rows."""
    out = []
    for lo in range(0, len(batch), minibatch):
        rows = slice(lo, lo + minibatch)
        out.append(rollout.token_logprobs(rollout.completion_logits(model, batch, rows), batch, rows).sum(-1).cpu())
    return torch.cat(out).double()


def sample_chunks(policy: Any, tokenizer: Any, prompts: list[Any], where: Path, *, k: int, max_new_tokens: int,
                  temperature: float, top_p: float, seed: int, chunk_prompts: int, batch_size: int,
                  minibatch: int, world: int, rank: int, is_main: bool, loop: Any,
                  on_chunk: Any = None, chat: str = "off") -> list[dict[str, Any]]:
    """K completions per prompt from `policy`, with their summed log-probs under it (the reference π_t of
    the iteration, computed right after sampling so that training holds one model). Chunk c of
    `chunk_prompts` prompts goes to `where/chunk-0000c.pt`; chunks already there are read, not redone.
    Returns one record per prompt: prompt, prompt_ids, completions, completion_ids (EOS included when
    emitted), finished, n_tokens, ref_logp."""
    where.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    starts = list(range(0, len(prompts), chunk_prompts))
    if len(starts) > 1 and len(prompts) - starts[-1] < world:  # every rank gets a prompt of every chunk
        starts.pop()
    n_chunks = len(starts)
    for c, lo in enumerate(starts):
        path = where / f"chunk-{c:05d}.pt"
        if path.is_file():
            records += torch.load(path, weights_only=True)
            continue
        hi = starts[c + 1] if c + 1 < n_chunks else len(prompts)
        mine = prompts[lo:hi][rank::world]
        with loop.timer("sample"), ranks.gathered(policy):
            batch = rollout.sample(policy, tokenizer, mine, k=k, max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_p=top_p, seed=seed + 100_003 * c + 7919 * rank,
                                   batch_size=batch_size, chat=chat) if mine else None
        with loop.timer("reference"):
            ref = sequence_logprobs(policy, batch, minibatch) if mine else torch.zeros(0)
        local = _records(batch, mine, k, ref) if mine else []
        chunk = _unshard(ranks.gather_objects(local, world))
        if is_main:
            _atomic_save(chunk, path)
        records += chunk
        if on_chunk is not None:
            on_chunk(c + 1, n_chunks)
    return records


def _records(batch: rollout.Batch, prompts: list[Any], k: int, ref: torch.Tensor) -> list[dict[str, Any]]:
    P = batch.prompt_len
    rows = []
    for i, prompt in enumerate(prompts):
        sl = range(i * k, (i + 1) * k)
        ids = batch.input_ids[i * k]
        prompt_ids = ids[:P][batch.attention_mask[i * k, :P].bool()].tolist()
        rows.append({
            "prompt": prompt, "prompt_ids": prompt_ids,
            "completions": [batch.completions[j] for j in sl],
            "completion_ids": [batch.input_ids[j, P : P + int(batch.mask[j].sum())].tolist() for j in sl],
            "finished": [bool(batch.finished[j]) for j in sl],
            "n_tokens": [int(batch.lengths[j]) for j in sl],
            "ref_logp": [float(ref[j]) for j in sl],
        })
    return rows


def score(preference: Any, records: list[dict[str, Any]], path: Path, *, world: int, rank: int, is_main: bool,
          batch_prompts: int = 256) -> torch.Tensor:
    """(N, K, K) P(y_i ≻ y_j | x) for every prompt's K completions, in batched `preference.matrices` calls of
    `batch_prompts` prompts, each rank its shard; saved to `path` (read back when it is there)."""
    if path.is_file():
        return torch.load(path, weights_only=True)
    mine = records[rank::world]
    parts = []
    for lo in range(0, len(mine), batch_prompts):
        chunk = mine[lo : lo + batch_prompts]
        matrices = preference.matrices([r["prompt"] for r in chunk], [r["completions"] for r in chunk])
        parts.append(matrices.double().cpu())
    k = len(records[0]["completions"])
    local = list(torch.cat(parts)) if parts else []
    matrix = torch.stack(_unshard(ranks.gather_objects(local, world))) if records else torch.zeros(0, k, k)
    if is_main:
        _atomic_save(matrix, path)
    return matrix


def write_samples(where: Path, records: list[dict[str, Any]], p: torch.Tensor, winner: torch.Tensor,
                  loser: torch.Tensor, kept: torch.Tensor) -> None:
    """samples.jsonl (every prompt: completions, P̂, finished, the reference log-probs) and pairs.jsonl (the
    kept winner/loser in the pairwise format `alignkit dpo` reads: prompt, chosen, rejected)."""
    samples, pairs = [], []
    for n, r in enumerate(records):
        w, lo = int(winner[n]), int(loser[n])
        samples.append({"prompt": r["prompt"], "completions": r["completions"], "p_hat": p[n].tolist(),
                        "finished": r["finished"], "n_tokens": r["n_tokens"], "ref_logp": r["ref_logp"],
                        "winner": w, "loser": lo, "kept": bool(kept[n])})
        if kept[n]:
            pairs.append({"prompt": r["prompt"], "chosen": r["completions"][w], "rejected": r["completions"][lo],
                          "p_hat_chosen": float(p[n, w]), "p_hat_rejected": float(p[n, lo])})
    _write_jsonl(where / "samples.jsonl", samples)
    _write_jsonl(where / "pairs.jsonl", pairs)


# ------------------------------------------------------------------------------ evaluation
def eval_samples(policy: Any, tokenizer: Any, prompts: list[Any], path: Path, *, base_logp: Any, seed: int,
                 max_new_tokens: int, temperature: float, top_p: float, batch_size: int,
                 minibatch: int, write: bool = True, chat: str = "off") -> list[dict[str, Any]]:
    """One completion per evaluation prompt from `policy`, with log π(y) and log π_0(y) (`base_logp(batches)`:
    the starting policy's summed log-probs, one tensor per batch), saved to `path` as JSON lines when `write`
    (read back when there). A sharded policy: every rank runs it (the forwards are collectives), one writes."""
    if path.is_file():
        return [json.loads(line) for line in path.read_text().splitlines()]
    batches, logps = [], []
    for lo in range(0, len(prompts), batch_size):
        with ranks.gathered(policy):
            batches.append(rollout.sample(policy, tokenizer, prompts[lo : lo + batch_size], k=1,
                                          max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                          seed=seed + lo, batch_size=batch_size, chat=chat))
        logps.append(sequence_logprobs(policy, batches[-1], minibatch))
    base = base_logp(batches)  # one call for all batches: π_0 is loaded (or switched to) once
    rows: list[dict[str, Any]] = []
    for b, (batch, logp, logp0) in enumerate(zip(batches, logps, base, strict=True)):
        chunk = prompts[b * batch_size : (b + 1) * batch_size]  # the prompts as given (text or messages)
        rows += [{"prompt": prompt, "completion": batch.completions[i], "n_tokens": int(batch.lengths[i]),
                  "finished": bool(batch.finished[i]), "logp": float(logp[i]), "logp_base": float(logp0[i])}
                 for i, prompt in enumerate(chunk)]
    if write:
        _write_jsonl(path, rows)
    return rows


def win_rates(preference: Any, gold: Any, new: list[dict[str, Any]], base: list[dict[str, Any]],
              previous: list[dict[str, Any]]) -> dict[str, float]:
    """The iteration's figures on the evaluation prompts: win rate (mean P(new ≻ old)) against π_0 and against
    the previous iteration's policy, the length-controlled win rate against π_0, gold reward (when the task
    has one), mean length and KL(π ‖ π_0) (k1 per sequence, on the policy's own samples)."""
    prompts = [r["prompt"] for r in new]
    texts = [r["completion"] for r in new]
    vs_base = preference.prob(prompts, texts, [r["completion"] for r in base]).double().cpu()
    vs_prev = preference.prob(prompts, texts, [r["completion"] for r in previous]).double().cpu()
    len_diff = torch.tensor([a["n_tokens"] - b["n_tokens"] for a, b in zip(new, base, strict=True)])
    out = {
        "win_rate_vs_base": float(vs_base.mean()), "win_rate_vs_previous": float(vs_prev.mean()),
        "lc_win_rate_vs_base": selfplay.length_controlled_win_rate(vs_base, len_diff),
        "length": sum(r["n_tokens"] for r in new) / len(new),
        "kl_to_base": sum(r["logp"] - r["logp_base"] for r in new) / len(new),
    }
    if gold is not None:
        out["gold"] = float(gold.score(prompts, texts, [r["finished"] for r in new]).mean.mean())
    return out


__all__ = ["eval_samples", "sample_chunks", "score", "sequence_logprobs", "win_rates", "write_samples"]
