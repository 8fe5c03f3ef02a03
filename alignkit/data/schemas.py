"""Real dataset layouts: converters for summarize_from_feedback and MBPP, and the prompt split of
pairs that carry no prompt column (Anthropic/hh-rlhf, HuggingFaceH4/ultrafeedback_binarized).

Which layout is recognised how: docs/data.md ("Real schemas", "Pairs without a prompt column").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from alignkit.data._util import is_messages, where
from alignkit.errors import UserError

ASSISTANT_MARKER = "\n\nAssistant:"  # Anthropic/hh-rlhf turn marker


def user_turn(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


# --------------------------------------------------------------------------- converters


def _summarize_prompt(info: dict | None, at: str) -> str:
    """summarize_from_feedback prompt (TL;DR format of Stiennon et al. 2020)."""
    info = info or {}
    lines = []
    if info.get("subreddit"):
        lines.append(f"SUBREDDIT: r/{info['subreddit']}")
    if info.get("title"):
        lines.append(f"TITLE: {info['title']}")
    if info.get("post"):
        lines.append(f"POST: {info['post']}")
    elif info.get("article"):  # CNN/DailyMail rows: post is null, article is set
        lines.append(f"ARTICLE: {info['article']}")
    else:
        raise UserError(
            f"{at}: field 'info' has neither 'post' nor 'article' — nothing to summarise; fix or drop the row"
        )
    return "\n".join(lines) + "\nTL;DR:"


def _convert_summarize(batch: dict, idx: list[int], src: str) -> dict:
    out: dict[str, list] = {"prompt": [], "chosen": [], "rejected": []}
    for info, summaries, choice, i in zip(
        batch["info"], batch["summaries"], batch["choice"], idx, strict=True
    ):
        at = where(src, i)
        if choice not in (0, 1) or not isinstance(summaries, list) or len(summaries) != 2:
            raise UserError(
                f"{at}: 'choice' must be 0 or 1 and 'summaries' must hold two summaries — fix or drop the row"
            )
        out["prompt"].append(_summarize_prompt(info, at))
        out["chosen"].append((summaries[choice] or {}).get("text"))
        out["rejected"].append((summaries[1 - choice] or {}).get("text"))
    return out


MBPP_TEMPLATE = (
    "You are an expert Python programmer, and here is your task: {text} "
    "Your code should pass these tests:\n\n{tests}\n"
)


def _convert_mbpp(text_col: str) -> Callable[[dict, list[int], str], dict]:
    def convert(batch: dict, idx: list[int], src: str) -> dict:
        tests = [t or [] for t in batch["test_list"]]
        out = {
            "prompt": [
                MBPP_TEMPLATE.format(text=text, tests="\n".join(t)) if text else None
                for text, t in zip(batch[text_col], tests, strict=True)
            ],
            "completion": batch["code"],
            "test_list": tests,
        }
        if "test_setup_code" in batch:
            out["test_setup_code"] = [s or "" for s in batch["test_setup_code"]]
        return out

    return convert


@dataclass(frozen=True)
class Schema:
    """A real dataset layout: recognised when all `signature` columns are present."""

    signature: frozenset[str]
    kind: str
    convert: Callable[[dict, list[int], str], dict]  # (batch, row indices, source) -> canonical batch


# hh-rlhf and ultrafeedback_binarized need no entry: the generic pairwise rules cover them.
SCHEMAS: dict[str, Schema] = {
    "openai/summarize_from_feedback (comparisons)": Schema(
        frozenset({"info", "summaries", "choice"}), "pairwise", _convert_summarize
    ),
    "google-research-datasets/mbpp (full)": Schema(
        frozenset({"task_id", "text", "code", "test_list"}), "sft", _convert_mbpp("text")
    ),
    "google-research-datasets/mbpp (sanitized)": Schema(
        frozenset({"task_id", "prompt", "code", "test_list"}), "sft", _convert_mbpp("prompt")
    ),
}


def recognise_schema(columns: Sequence[str]) -> str | None:
    """Name of the first entry of `SCHEMAS` whose signature columns are all present."""
    cols = set(columns)
    return next((name for name, s in SCHEMAS.items() if s.signature <= cols), None)


# --------------------------------------------------------------------------- implicit prompts


def _common_prefix(a: Sequence, b: Sequence) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def split_implicit(chosen: str, rejected: str, at: str) -> tuple[str, str, str]:
    """Split two full texts at their shared prompt: the last common '\\n\\nAssistant:' marker
    (hh-rlhf), else the longest common prefix cut back to a whitespace boundary."""
    n = _common_prefix(chosen, rejected)
    marker = chosen.rfind(ASSISTANT_MARKER, 0, n)
    if marker >= 0:
        cut = marker + len(ASSISTANT_MARKER)
    else:
        cut = max(chosen.rfind(ch, 0, n) for ch in " \n\t") + 1
    if cut <= 0:
        raise UserError(
            f"{at}: 'chosen' and 'rejected' share no prompt prefix and there is no 'prompt' "
            "column — add one or map it with --columns prompt=<column>"
        )
    return chosen[:cut], chosen[cut:], rejected[cut:]


def split_conversations(prompt: Any, chosen: list, rejected: list, at: str) -> tuple[Any, list, list]:
    """Conversational pairs: shared leading turns become the prompt (ultrafeedback_binarized)."""
    if is_messages(prompt):
        n = len(prompt)
        if chosen[:n] == prompt == rejected[:n] and len(chosen) > n and len(rejected) > n:
            return prompt, chosen[n:], rejected[n:]
    k = min(_common_prefix(chosen, rejected), len(chosen) - 1, len(rejected) - 1)
    if k > 0:
        return chosen[:k], chosen[k:], rejected[k:]
    if prompt is None:
        raise UserError(
            f"{at}: 'chosen' and 'rejected' share no leading turns and there is no 'prompt' "
            "column — add one or map it with --columns prompt=<column>"
        )
    return (user_turn(prompt) if isinstance(prompt, str) else prompt), chosen, rejected
