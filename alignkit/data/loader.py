"""The one call every trainer makes: `load(source, ...)` -> validated, normalised (Dataset, kind),
and the splits taken from it (`split`, `train_eval_split`).

Normalisation runs in memory (`keep_in_memory=True`), so nothing is ever written next to a source.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np

from alignkit.data._util import batch_map
from alignkit.data.columns import apply_columns, parse_columns
from alignkit.data.conversions import CONVERSIONS, convert, select
from alignkit.data.dropped import note_dropped, skipping
from alignkit.data.kinds import DTYPES, KINDS, NEEDS, REQUIRED, column_order, detect_kind
from alignkit.data.schemas import SCHEMAS, recognise_schema
from alignkit.data.sources import BUILTIN_PREFIX, BUILTIN_ROWS, builtin, load_raw
from alignkit.data.validate import NORMALISERS, norm_pairwise
from alignkit.errors import UserError, closest


def normalise(
    ds: datasets.Dataset,
    kind: str | None = None,
    columns: dict[str, str] | None = None,
    source_name: str = "",
    dropped: dict[str, int] | None = None,
    skip_invalid: bool = False,
) -> tuple[datasets.Dataset, str]:
    """Validate and normalise a raw dataset; returns (dataset with canonical columns, kind).

    `columns` maps canonical <- source column (dotted/indexed paths allowed) and turns off schema
    recognition. With `kind` given, data of another kind is converted when `CONVERSIONS` allows.
    Pairs whose chosen equals rejected are dropped when pairs are wanted (pairwise, or unpaired made
    from pairs); the counts per reason are added to `dropped` when given. A row the validator refuses stops
    the load with its row number, or with `skip_invalid` is dropped and counted under its reason
    (data/dropped.py `skipping`).
    """
    src = source_name or "data"
    if kind is not None and kind not in KINDS:
        raise UserError(f"unknown data kind '{kind}'{closest(kind, KINDS)} (kinds: {', '.join(KINDS)})")
    if len(ds) == 0:
        raise UserError(f"{src}: the dataset is empty — it needs at least one row")
    if columns:
        ds = apply_columns(ds, columns, src)
        schema = None
    else:
        schema = recognise_schema(ds.column_names)
    invalid: dict[str, int] = {}
    rows_in = len(ds)

    def checked(fn: Any) -> Any:
        return skipping(fn, invalid) if skip_invalid else fn

    if schema:
        convert_schema = SCHEMAS[schema].convert
        ds = batch_map(ds, checked(lambda b, idx: convert_schema(b, idx, src)), ds.column_names)
    cols = set(ds.column_names)
    have = kind if kind is not None and REQUIRED[kind](cols) else detect_kind(list(cols))
    if kind is not None and have != kind and (have, kind) not in CONVERSIONS:
        have = None  # neither the asked kind nor convertible to it: say which columns it needs
    if have is None:
        if kind is None:
            raise UserError(
                f"{src}: cannot tell the data kind from columns {', '.join(ds.column_names)} — pass "
                "--kind and map your columns with --columns, e.g. --columns prompt=question,chosen=answer"
            )
        need, hint = NEEDS[kind]
        raise UserError(
            f"{src}: kind '{kind}' needs columns {need}; the data has "
            f"{', '.join(ds.column_names)} — map yours with --columns {hint}"
        )
    want = kind or have
    norm = NORMALISERS[have]
    if have == "pairwise":
        norm = functools.partial(norm_pairwise, drop_identical=want in ("pairwise", "unpaired"))
    rows_before, invalid_before = len(ds), sum(invalid.values())
    ds = batch_map(ds, checked(lambda b, idx: norm(b, idx, src)), ds.column_names)
    identical = rows_before - len(ds) - (sum(invalid.values()) - invalid_before)
    counts = note_dropped(src, rows_in, {**invalid, "chosen_equals_rejected": identical})
    if dropped is not None:
        for reason, n in counts.items():
            dropped[reason] = dropped.get(reason, 0) + n
    ds = select(convert(ds, have, want), column_order(want))
    for col, dtype in DTYPES.items():  # map() keeps a reused column's old type (e.g. int64 label)
        if col in ds.column_names and ds.features[col] != datasets.Value(dtype):
            ds = ds.cast_column(col, datasets.Value(dtype))
    return ds, want


def load(
    source: str,
    kind: str | None = None,
    columns: str | dict | None = None,
    split: str = "train",
    max_samples: int | None = None,
    seed: int = 0,
    dropped: dict[str, int] | None = None,
    skip_invalid: bool = False,
) -> tuple[datasets.Dataset, str]:
    """Load a source and normalise it: the one call every trainer makes. Returns (dataset, kind).

    `seed` only matters for the built-in task's sources (`builtin:KIND`), which are generated.
    `dropped`, when given, receives the rows dropped per reason; `skip_invalid` drops the rows the validator
    refuses instead of stopping at the first (see `normalise`).
    """
    mapping = parse_columns(columns) if isinstance(columns, str) or columns is None else dict(columns)
    if max_samples is not None and (
        not isinstance(max_samples, int) or isinstance(max_samples, bool) or max_samples < 1
    ):
        raise UserError(f"max_samples must be a positive integer, got {max_samples!r}")
    if source.startswith(BUILTIN_PREFIX):
        ds = builtin(source, max_samples or BUILTIN_ROWS, seed)
    else:
        ds = load_raw(source, split)
    if max_samples is not None:
        ds = ds.select(range(min(max_samples, len(ds))))
    ds, kind = normalise(ds, kind, mapping, source_name=str(source), dropped=dropped, skip_invalid=skip_invalid)
    if max_samples is not None and len(ds) > max_samples:  # unpair doubles rows
        ds = ds.select(range(max_samples))
    return ds, kind


def load_source(
    section: Any, expected: Sequence[str] | None = None, dropped: dict[str, int] | None = None
) -> tuple[datasets.Dataset, str]:
    """`load` driven by a config `DataSection`; `expected` lists the kinds the trainer accepts."""
    ds, kind = load(
        section.source, kind=section.kind, columns=section.columns or None, split=section.split,
        max_samples=section.max_samples, seed=section.seed, dropped=dropped,
        skip_invalid=getattr(section, "skip_invalid", False),
    )
    if expected and kind not in expected:
        want = " or ".join(expected)
        can = [w for w in expected if (kind, w) in CONVERSIONS]
        hint = f"; pass --kind {can[0]} to convert it" if can else " (see docs/data.md)"
        raise UserError(f"{section.source}: this command needs {want} data but got {kind} data{hint}")
    return ds, kind


# --------------------------------------------------------------------------- splits


def split(
    ds: datasets.Dataset, ratios: Sequence[float], seed: int, names: Sequence[str] | None = None
) -> dict[str, datasets.Dataset]:
    """Deterministic random split by `seed` into disjoint parts covering `ds` (original order kept
    inside each part); e.g. UP-RLHF's 20/40/40: split(ds, (0.2, 0.4, 0.4), seed, ("sft", "rm", "rl"))."""
    ratios = [float(r) for r in ratios]
    if names is None:
        names = (
            ("train", "eval", "test")[: len(ratios)]
            if len(ratios) <= 3
            else [f"part{i}" for i in range(len(ratios))]
        )
    names = list(names)
    if len(names) != len(ratios) or len(set(names)) != len(names):
        raise UserError(f"split: need one distinct name per ratio, got names {names} for ratios {ratios}")
    if not ratios or any(r < 0 for r in ratios) or abs(sum(ratios) - 1.0) > 1e-6:
        raise UserError(
            f"split: ratios must be non-negative and sum to 1, got {ratios} (sum {sum(ratios):g})"
        )
    n = len(ds)
    exact = np.array(ratios) * n
    sizes = np.floor(exact).astype(int)
    # hand the leftover rows to the largest fractional parts (ties: earlier part first)
    for i in np.argsort(-(exact - sizes), kind="stable")[: n - sizes.sum()]:
        sizes[i] += 1
    for name, r, size in zip(names, ratios, sizes, strict=True):
        if r > 0 and size == 0:
            raise UserError(f"split: {n} rows are too few for ratios {ratios} — part '{name}' would be empty")
    perm = np.random.default_rng(seed).permutation(n)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return {
        name: ds.select(np.sort(perm[bounds[i] : bounds[i + 1]]).tolist()) for i, name in enumerate(names)
    }


def train_eval_split(ds: datasets.Dataset, section: Any) -> dict[str, datasets.Dataset | None]:
    """{"train": ..., "eval": ...}: `section.eval_fraction` of the rows held out by `section.seed`
    (the same rows on every run with that seed); "eval" is None when the fraction is 0."""
    f = section.eval_fraction
    if f > 0:
        return split(ds, (1 - f, f), section.seed, ("train", "eval"))
    return {"train": ds, "eval": None}
