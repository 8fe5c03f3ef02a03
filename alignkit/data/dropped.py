"""Rows left out on purpose, counted per reason: a pair whose chosen equals its rejected, an SFT row
whose prompt alone fills `max_length` (nothing left to learn from once it is truncated), and with
`--skip-invalid` (`skipping`) a row the validator refuses (an empty reply, a null field, a bad value).

Every drop is said in one line on stderr and kept by the trainers in summary.json (`dropped_rows`);
when no row is left the run stops with a `UserError` instead of training on nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

import datasets

from alignkit.errors import UserError

# reason -> (why, what to do): the printed line and the error quote them
REASONS: dict[str, tuple[str, str]] = {
    "chosen_equals_rejected": ("the pair prefers nothing", "fix or remove those pairs"),
    "too_long": (
        "the prompt alone fills max_length tokens, no completion token is left to learn from",
        "raise --max-length or shorten the prompts",
    ),
    "pair_too_long": (
        "the prompt with its chosen or rejected reply is longer than max_length tokens",
        "raise --max-length or shorten the rows",
    ),
    # --skip-invalid (validate.InvalidRow's reasons; any other refused row is invalid_value)
    "empty_field": ("a text field is empty or blank", "fill in or remove those rows"),
    "missing_field": ("a field is null", "fill in or remove those rows"),
    "invalid_value": ("a field has a value of the wrong type or out of range", "fix or remove those rows"),
}
INVALID_REASONS = ("empty_field", "missing_field", "invalid_value")


def note_dropped(source: str, rows_in: int, dropped: Mapping[str, int]) -> dict[str, int]:
    """Say how many of `rows_in` rows were dropped for which reason (one line on stderr, from the
    main process only) and stop with a `UserError` when none is left. Returns the non-zero counts,
    for summary.json's `dropped_rows`."""
    from alignkit.launch import rank_info

    counts = {reason: int(n) for reason, n in dropped.items() if n}
    if not counts:
        return {}
    total = sum(counts.values())
    why = "; ".join(f"{reason}: {n}, {REASONS[reason][0]}" for reason, n in counts.items())
    todo = " or ".join(dict.fromkeys(REASONS[reason][1] for reason in counts))
    if total >= rows_in:
        raise UserError(f"{source}: all {rows_in} rows were dropped ({why}) — nothing is left; {todo}")
    if rank_info()["is_main"]:
        print(f"{source}: dropped {total} of {rows_in} rows ({why}) — {todo}", file=sys.stderr)
    return counts


def skipping(fn: Callable[[dict, list[int]], dict], counts: dict[str, int]) -> Callable[[dict, list[int]], dict]:
    """`fn(batch, indices) -> batch` that leaves out the rows it refuses (`--skip-invalid`), counting them in
    `counts` by reason (`InvalidRow.reason`, else invalid_value). A batch is first run whole; only a batch
    that raises is redone row by row, so valid data costs nothing extra."""

    def run(batch: dict, idx: list[int]) -> dict:
        try:
            return fn(batch, idx)
        except UserError:
            pass
        parts = []
        for j, i in enumerate(idx):
            try:
                parts.append(fn({c: v[j : j + 1] for c, v in batch.items()}, [i]))
            except UserError as err:
                reason = getattr(err, "reason", "invalid_value")
                counts[reason] = counts.get(reason, 0) + 1
        if not parts:
            return fn({c: [] for c in batch}, [])  # the output columns, no rows
        return {c: [x for part in parts for x in part[c]] for c in parts[0]}

    return run


def drop_too_long(ds: datasets.Dataset, tokenizer: Any, max_length: int) -> tuple[datasets.Dataset, int]:
    """Drop prompt/completion rows whose prompt fills `max_length` tokens; returns (rows kept, count).

    Counts the prompt tokens as TRL's SFTTrainer does: the tokenised prompt and prompt+completion
    (EOS appended to a string completion; the chat template for message lists) share a prefix, and
    only the tokens after it are completion. A row whose completion starts at or after `max_length`
    is truncated to a prompt alone, which TRL silently filters out.
    """
    if not {"prompt", "completion"} <= set(ds.column_names) or not len(ds):
        return ds, 0
    if not isinstance(ds[0]["prompt"], str) and not getattr(tokenizer, "chat_template", None):
        return ds, 0  # message lists without a chat template: TRL refuses them itself
    prompts, completions = list(ds["prompt"]), list(ds["completion"])
    if isinstance(prompts[0], str):
        eos = tokenizer.eos_token or ""
        full_text = [p + c + ("" if c.endswith(eos) else eos) for p, c in zip(prompts, completions, strict=True)]
        prompt_ids = tokenizer(prompts)["input_ids"]
        full_ids = tokenizer(full_text)["input_ids"]
    else:
        prompt_ids = [_chat_ids(tokenizer, p, add_generation_prompt=True) for p in prompts]
        full_ids = [_chat_ids(tokenizer, p + c) for p, c in zip(prompts, completions, strict=True)]
    keep = [i for i, (p, f) in enumerate(zip(prompt_ids, full_ids, strict=True)) if _shared(p, f) < max_length]
    if len(keep) == len(ds):
        return ds, 0
    return ds.select(keep), len(ds) - len(keep)


def _chat_ids(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt
    )
    return list(out["input_ids"])


def _shared(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)
