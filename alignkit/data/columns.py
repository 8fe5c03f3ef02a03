"""`--columns`: mapping canonical columns from a source's own (possibly nested) columns.

'prompt=question,chosen=response_j' builds `prompt` from `question` and `chosen` from `response_j`;
the right-hand side may reach into nested fields ('info.post', 'summaries[0].text').
"""

from __future__ import annotations

import re
from typing import Any

import datasets

from alignkit.data._util import batch_map, where
from alignkit.data.kinds import FIELDS
from alignkit.errors import UserError, closest


def parse_columns(spec: str | None) -> dict[str, str]:
    """'prompt=question,chosen=response_j' -> {'prompt': 'question', 'chosen': 'response_j'}."""
    if spec is None or not spec.strip():
        return {}
    mapping: dict[str, str] = {}
    for part in spec.split(","):
        name, eq, src = (s.strip() for s in part.partition("="))
        if not eq or not name or not src:
            raise UserError(
                f"--columns: '{part.strip()}' is not of the form canonical=source "
                "(e.g. --columns prompt=question,chosen=response_j)"
            )
        _check_field(name)
        if name in mapping:
            raise UserError(f"--columns: '{name}' is mapped twice — give each canonical column once")
        mapping[name] = src
    check_mapping(mapping)
    return mapping


def check_mapping(mapping: dict[str, str]) -> None:
    """Every target a known canonical column, no source read into two targets."""
    seen: dict[str, str] = {}
    for name, src in mapping.items():
        _check_field(name)
        if src in seen:
            raise UserError(
                f"--columns: '{src}' is mapped to both '{seen[src]}' and '{name}' — "
                "map each canonical column from a column of its own"
            )
        seen[src] = name


def _check_field(name: str) -> None:
    if name not in FIELDS:
        raise UserError(
            f"--columns: unknown canonical column '{name}'{closest(name, FIELDS)} "
            f"(known: {', '.join(FIELDS)})"
        )


def _path_tokens(path: str) -> list[str]:
    return re.findall(r"[^.\[\]]+", path)


def _resolve(value: Any, tokens: list[str], path: str, at: str) -> Any:
    for tok in tokens:
        if value is None:
            return None  # a null parent reads as a missing value; the field check names it
        if isinstance(value, dict):
            if tok not in value:
                raise UserError(
                    f"{at}: cannot read '{path}': no key '{tok}'{closest(tok, value)} — check --columns"
                )
            value = value[tok]
        elif isinstance(value, list) and tok.lstrip("-").isdigit():
            if not -len(value) <= int(tok) < len(value):
                raise UserError(
                    f"{at}: cannot read '{path}': index {tok} out of range (list has {len(value)})"
                )
            value = value[int(tok)]
        else:
            raise UserError(
                f"{at}: cannot read '{path}': '{tok}' does not index a {type(value).__name__} — check --columns"
            )
    return value


def apply_columns(ds: datasets.Dataset, mapping: dict[str, str], src: str) -> datasets.Dataset:
    """Build canonical columns from (possibly nested) source columns; consumed sources are dropped."""
    check_mapping(mapping)
    cols = ds.column_names
    plan: dict[str, tuple[str, list[str]]] = {}
    for name, path in mapping.items():
        if path in cols:
            plan[name] = (path, [])
            continue
        tokens = _path_tokens(path)
        if not tokens or tokens[0] not in cols:
            head = tokens[0] if tokens else path
            raise UserError(
                f"{src}: --columns {name}={path}: no column '{head}'{closest(head, cols)} "
                f"(columns: {', '.join(cols)})"
            )
        plan[name] = (tokens[0], tokens[1:])
    consumed = {col for col, _ in plan.values()} - set(plan)
    keep = [c for c in cols if c not in consumed and c not in plan]

    def fn(batch: dict, idx: list[int]) -> dict:
        out = {c: batch[c] for c in keep}
        for name, (col, tokens) in plan.items():
            out[name] = [
                _resolve(v, tokens, mapping[name], where(src, i))
                for v, i in zip(batch[col], idx, strict=True)
            ]
        return out

    return batch_map(ds, fn, cols)
