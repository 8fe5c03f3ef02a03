"""Plumbing shared by the data modules: in-memory batched maps, quiet progress bars, row locations."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import datasets


def where(src: str, i: int) -> str:
    """'SOURCE: row N' for the row at index `i` (rows counted from 1)."""
    return f"{src}: row {i + 1}" if src else f"row {i + 1}"


def rows(batch: dict) -> Iterator[dict]:
    """The rows of a column batch, one dict each."""
    keys = list(batch)
    return (dict(zip(keys, vals, strict=True)) for vals in zip(*batch.values(), strict=True))


def is_messages(v: Any) -> bool:
    return isinstance(v, list)


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Hide datasets' per-map progress bars (restoring the caller's setting)."""
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def batch_map(
    ds: datasets.Dataset, fn: Callable[[dict, list[int]], dict], remove: list[str]
) -> datasets.Dataset:
    """Batched, in-memory map (never writes cache files next to a source; no function hashing)."""
    with quiet():
        return ds.map(
            fn,
            batched=True,
            batch_size=1000,
            with_indices=True,
            remove_columns=remove,
            keep_in_memory=True,
            load_from_cache_file=False,
            new_fingerprint=uuid.uuid4().hex,
        )
