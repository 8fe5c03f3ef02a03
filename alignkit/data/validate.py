"""Checking and normalising rows, one normaliser per kind: every text field is a non-blank string or
a list of {role, content} messages, labels are booleans, rewards finite numbers.

Each normaliser takes (batch, row indices, source name) and returns the canonical batch; bad values
raise `UserError` naming the source, row and field (`InvalidRow` for an empty or missing field, with its
reason: what `--skip-invalid` counts, data/dropped.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from alignkit.data._util import is_messages, rows, where
from alignkit.data.kinds import EXTRAS, sft_form
from alignkit.data.schemas import split_conversations, split_implicit, user_turn
from alignkit.errors import UserError

# --------------------------------------------------------------------------- field checks
SKIP_HINT = "fill it in or drop the row (--skip-invalid drops such rows)"


class InvalidRow(UserError):
    """A row that cannot be used, with the `reason` key (data/dropped.py REASONS) it is counted under."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason



def text(v: Any, field: str, at: str) -> str | list[dict]:
    """A non-blank string or a non-empty list of {role, content} messages."""
    if isinstance(v, str):
        if not v.strip():
            raise InvalidRow(f"{at}: field '{field}' is empty — {SKIP_HINT}", "empty_field")
        return v
    if isinstance(v, list):
        if not v:
            raise InvalidRow(f"{at}: field '{field}' is an empty message list — {SKIP_HINT}", "empty_field")
        return [_message(m, field, at) for m in v]
    if v is None:
        raise InvalidRow(f"{at}: field '{field}' is missing (null) — {SKIP_HINT}", "missing_field")
    raise UserError(
        f"{at}: field '{field}' must be a string or a message list (got {type(v).__name__} {v!r:.40})"
    )


def _message(m: Any, field: str, at: str) -> dict:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
        raise UserError(
            f'{at}: field \'{field}\' must be a list of {{"role": str, "content": str}} '
            f"messages (got {m!r:.60})"
        )
    return {k: x for k, x in m.items() if x is not None}


def messages(v: Any, field: str, at: str) -> list[dict]:
    """A non-empty message list (a 'messages' column holding plain strings is refused)."""
    if isinstance(v, str):
        raise UserError(
            f"{at}: field '{field}' holds a string, not a message list "
            '[{"role": ..., "content": ...}] — for plain text name the column \'text\' '
            f"(or map it: --columns text={field})"
        )
    return text(v, field, at)


_TRUE = {"true", "1", "yes", "y", "t"}
_FALSE = {"false", "0", "no", "n", "f"}


def boolean(v: Any, field: str, at: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in _TRUE | _FALSE:
        return v.strip().lower() in _TRUE
    raise UserError(f"{at}: field '{field}' must be true/false (or 1/0), got {v!r}")


def number(v: Any, field: str, at: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    try:
        x = float(v) if not isinstance(v, bool) else math.nan
    except (TypeError, ValueError):
        x = math.nan
    if not math.isfinite(x):
        raise UserError(f"{at}: field '{field}' must be a finite number, got {v!r}")
    if not lo <= x <= hi:
        raise UserError(f"{at}: field '{field}' must be in [{lo:g}, {hi:g}], got {x:g}")
    return x


def _prompt_for(prompt: Any, completion: Any, at: str, field: str = "completion") -> tuple[Any, Any]:
    """Make prompt and completion the same form; a string prompt before messages becomes a user turn."""
    if is_messages(completion):
        if isinstance(prompt, str):
            return user_turn(prompt), completion
        n = len(prompt)
        if completion[:n] == prompt and len(completion) > n:  # full conversation: drop the prompt turns
            return prompt, completion[n:]
        return prompt, completion
    if is_messages(prompt):
        raise UserError(
            f"{at}: 'prompt' is a message list but '{field}' is a plain string — use one form per row"
        )
    return prompt, completion


# --------------------------------------------------------------------------- per-kind normalisers


def norm_pairwise(batch: dict, idx: list[int], src: str, drop_identical: bool = True) -> dict:
    """Pairs; with `drop_identical`, a pair whose chosen equals its rejected is left out (it prefers
    nothing); the caller counts the rows that went."""
    has_prompt = "prompt" in batch
    extras = [c for c in EXTRAS["pairwise"] if c in batch]
    out: dict[str, list] = {c: [] for c in ("prompt", "chosen", "rejected", *extras)}
    for row, i in zip(rows(batch), idx, strict=True):
        at = where(src, i)
        prompt = text(row["prompt"], "prompt", at) if has_prompt else None
        chosen = text(row["chosen"], "chosen", at)
        rejected = text(row["rejected"], "rejected", at)
        if drop_identical and chosen == rejected:
            continue
        if is_messages(chosen) != is_messages(rejected):
            raise UserError(
                f"{at}: 'chosen' and 'rejected' must both be strings or both message lists — use one form per row"
            )
        if is_messages(chosen):
            prompt, chosen, rejected = split_conversations(prompt, chosen, rejected, at)
        elif prompt is None:
            prompt, chosen, rejected = split_implicit(chosen, rejected, at)
        elif is_messages(prompt):
            raise UserError(
                f"{at}: 'prompt' is a message list but 'chosen' is a plain string — use one form per row"
            )
        out["prompt"].append(prompt)
        out["chosen"].append(text(chosen, "chosen", at + " (after the prompt was split off)"))
        out["rejected"].append(text(rejected, "rejected", at + " (after the prompt was split off)"))
        for c in extras:
            hi = 1.0 if c == "prob" else math.inf
            out[c].append(number(row[c], c, at, lo=0.0 if c == "prob" else -math.inf, hi=hi))
    return out


def _norm_completions(extra: str | None) -> Callable[[dict, list[int], str], dict]:
    """unpaired (extra='label'), scored (extra='reward') and sft prompt/completion (extra=None)."""

    def norm(batch: dict, idx: list[int], src: str) -> dict:
        cols = ("prompt", "completion") + ((extra,) if extra else ())
        out: dict[str, list] = {c: [] for c in cols}
        for row, i in zip(rows(batch), idx, strict=True):
            at = where(src, i)
            prompt, completion = _prompt_for(
                text(row["prompt"], "prompt", at), text(row["completion"], "completion", at), at
            )
            out["prompt"].append(prompt)
            out["completion"].append(completion)
            if extra == "label":
                out["label"].append(boolean(row["label"], "label", at))
            elif extra == "reward":
                out["reward"].append(number(row["reward"], "reward", at))
        return out

    return norm


def _norm_sft(batch: dict, idx: list[int], src: str) -> dict:
    form = sft_form(set(batch))
    if form == ("prompt", "completion"):
        out = _norm_completions(None)(batch, idx, src)
    elif form == ("messages",):
        col = batch["messages"]
        out = {"messages": [messages(v, "messages", where(src, i)) for v, i in zip(col, idx, strict=True)]}
    else:
        out = {"text": [text(v, "text", where(src, i)) for v, i in zip(batch["text"], idx, strict=True)]}
        bad = next((i for v, i in zip(out["text"], idx, strict=True) if is_messages(v)), None)
        if bad is not None:
            raise UserError(
                f"{where(src, bad)}: field 'text' holds a message list — name the column 'messages' "
                "(or map it: --columns messages=text)"
            )
    return out | {c: batch[c] for c in EXTRAS["sft"] if c in batch}


def _norm_prompts(batch: dict, idx: list[int], src: str) -> dict:
    out = {"prompt": [text(v, "prompt", where(src, i)) for v, i in zip(batch["prompt"], idx, strict=True)]}
    return out | {c: batch[c] for c in EXTRAS["prompts"] if c in batch}


NORMALISERS: dict[str, Callable[..., dict]] = {
    "sft": _norm_sft,
    "pairwise": norm_pairwise,
    "unpaired": _norm_completions("label"),
    "prompts": _norm_prompts,
    "scored": _norm_completions("reward"),
}
