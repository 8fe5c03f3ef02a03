"""The five data kinds, their canonical columns, and telling a kind from column names.

The rules are listed in docs/data.md ("How the kind is found").
"""

from __future__ import annotations

from collections.abc import Callable

from alignkit.data.schemas import SCHEMAS, recognise_schema

KINDS = ("sft", "pairwise", "unpaired", "prompts", "scored")

# Normalised columns per kind. sft takes exactly one of three forms, chosen in this order of
# preference: (prompt, completion) > (messages,) > (text,).
CANONICAL: dict[str, tuple] = {
    "sft": (("prompt", "completion"), ("messages",), ("text",)),
    "pairwise": ("prompt", "chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
    "prompts": ("prompt",),
    "scored": ("prompt", "completion", "reward"),
}
# Optional columns kept when present (e.g. MBPP's tests for a later code-execution reward).
EXTRAS: dict[str, tuple[str, ...]] = {
    "sft": ("test_list", "test_setup_code"),
    "pairwise": ("prob", "score_chosen", "score_rejected", "p_hat_chosen", "p_hat_rejected"),
    "unpaired": (),
    "prompts": ("test_list", "test_setup_code"),
    "scored": (),
}
FIELDS = tuple(
    dict.fromkeys(
        ["prompt", "completion", "chosen", "rejected", "messages", "text", "label", "reward"]
        + [c for extras in EXTRAS.values() for c in extras]
    )
)
# Column types after normalisation (map() keeps a reused column's old type, e.g. an int64 label).
DTYPES = {
    "label": "bool",
    "reward": "float64",
    "prob": "float64",
    "score_chosen": "float64",
    "score_rejected": "float64",
    "p_hat_chosen": "float64",
    "p_hat_rejected": "float64",
}


def sft_form(cols: set[str]) -> tuple[str, ...] | None:
    """The first sft form whose columns are all present."""
    return next((form for form in CANONICAL["sft"] if set(form) <= cols), None)


# Required columns per kind (pairwise's prompt may be implicit), checked in this order.
REQUIRED: dict[str, Callable[[set[str]], bool]] = {
    "pairwise": lambda c: {"chosen", "rejected"} <= c,
    "scored": lambda c: {"prompt", "completion", "reward"} <= c,
    "unpaired": lambda c: {"prompt", "completion", "label"} <= c,
    "sft": lambda c: sft_form(c) is not None,
    "prompts": lambda c: "prompt" in c,
}
NEEDS = {  # (what the error says, the --columns hint)
    "pairwise": ("chosen, rejected (prompt optional)", "prompt=<col>,chosen=<col>,rejected=<col>"),
    "scored": ("prompt, completion, reward", "prompt=<col>,completion=<col>,reward=<col>"),
    "unpaired": ("prompt, completion, label", "prompt=<col>,completion=<col>,label=<col>"),
    "sft": ("prompt+completion, or messages, or text", "prompt=<col>,completion=<col>"),
    "prompts": ("prompt", "prompt=<col>"),
}


def detect_kind(columns: list[str]) -> str | None:
    """The kind a set of column names looks like (a recognised real schema first), or None."""
    schema = recognise_schema(columns)
    if schema:
        return SCHEMAS[schema].kind
    cols = set(columns)
    return next((kind for kind, ok in REQUIRED.items() if ok(cols)), None)


def column_order(kind: str) -> tuple[str, ...]:
    """Canonical then optional columns of `kind`, in the order normalised data holds them."""
    canonical = CANONICAL[kind]
    if kind == "sft":
        canonical = tuple(c for form in canonical for c in form)
    return (*canonical, *EXTRAS[kind])
