"""What leaves the loader: normalised rows written as JSON Lines, the `data inspect` summary, and a
prompt as one string for generation."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from alignkit.data._util import is_messages, rows


def to_jsonl(ds: datasets.Dataset, path: str | os.PathLike) -> None:
    """Write rows as JSON Lines atomically: a temporary sibling is renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for batch in ds.iter(batch_size=1000):
                for row in rows(batch):
                    f.write(json.dumps(drop_nulls(row), ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def drop_nulls(v: Any) -> Any:
    """Arrow gives every message the union of all message keys; drop the null ones again."""
    if isinstance(v, list):
        return [drop_nulls(x) for x in v]
    if isinstance(v, dict) and set(v) >= {"role", "content"}:
        return {k: x for k, x in v.items() if x is not None}
    if isinstance(v, dict):
        return {k: drop_nulls(x) for k, x in v.items()}
    return v


def _chars(v: Any) -> int:
    if isinstance(v, list):
        return sum(len(m.get("content") or "") for m in v if isinstance(m, dict))
    return len(v) if isinstance(v, str) else 0


def describe(ds: datasets.Dataset, kind: str, max_rows: int = 10_000) -> dict:
    """Summary for `alignkit data inspect`: kind, rows, columns, conversational, a sample row and
    simple stats over the first `max_rows` rows."""
    head = ds.select(range(min(len(ds), max_rows)))[:] if len(ds) else {}
    text_cols = [c for c in ("prompt", "completion", "chosen", "rejected", "messages", "text") if c in head]
    stats: dict[str, Any] = {}
    for c in text_cols:
        stats[f"mean_chars_{c}"] = round(float(np.mean([_chars(v) for v in head[c]])), 1)
    if "label" in head:
        stats["fraction_label_true"] = round(float(np.mean(head["label"])), 4)
    for c in ("reward", "prob", "score_chosen", "score_rejected"):
        if c in head:
            x = np.asarray(head[c], dtype=float)
            stats[c] = {"mean": float(x.mean()), "min": float(x.min()), "max": float(x.max())}
    return {
        "kind": kind,
        "rows": len(ds),
        "columns": list(ds.column_names),
        "conversational": any(is_messages(head[c][0]) for c in text_cols) if len(ds) else False,
        "sample": drop_nulls(ds[0]) if len(ds) else None,
        "stats": stats,
        "stats_rows": min(len(ds), max_rows),
    }


def apply_chat_template_if_any(
    tokenizer: Any, messages_or_text: str | list[dict], add_generation_prompt: bool
) -> str:
    """A prompt as one string for generation.

    Plain strings are returned unchanged (they are already formatted, e.g. hh-rlhf's
    '\\n\\nHuman: ...\\n\\nAssistant:'). Message lists go through the tokenizer's chat template when
    it has one, else become 'role: content' lines (plus 'assistant:' for a generation prompt).
    """
    if isinstance(messages_or_text, str):
        return messages_or_text
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            messages_or_text, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages_or_text)
    return text + ("assistant:" if add_generation_prompt else "")
