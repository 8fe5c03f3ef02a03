"""Using normalised data of one kind as another: pairwise -> unpaired (KTO), pairwise -> sft,
anything with a prompt -> prompts. The table is `CONVERSIONS`; docs/data.md lists it."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import datasets

from alignkit.data._util import batch_map
from alignkit.data.kinds import EXTRAS
from alignkit.errors import UserError


def unpair(ds: datasets.Dataset) -> datasets.Dataset:
    """pairwise -> unpaired (for KTO): each pair gives (prompt, chosen, True) and (prompt, rejected, False).

    Within each batch of 1000 pairs the chosen rows come first, then the rejected ones (as TRL's
    `unpair_preference_dataset`)."""
    missing = {"prompt", "chosen", "rejected"} - set(ds.column_names)
    if missing:
        raise UserError(
            f"unpair needs pairwise data (prompt, chosen, rejected); missing {', '.join(sorted(missing))}"
        )

    def fn(batch: dict, idx: list[int]) -> dict:
        n = len(batch["prompt"])
        return {
            "prompt": batch["prompt"] * 2,
            "completion": batch["chosen"] + batch["rejected"],
            "label": [True] * n + [False] * n,
        }

    return batch_map(ds, fn, ds.column_names)


def select(ds: datasets.Dataset, cols: Sequence[str]) -> datasets.Dataset:
    """The columns of `cols` that `ds` has, in that order."""
    return ds.select_columns([c for c in cols if c in ds.column_names])


def _chosen_as_sft(ds: datasets.Dataset) -> datasets.Dataset:
    return select(ds, ("prompt", "chosen")).rename_column("chosen", "completion")


def _to_prompts(ds: datasets.Dataset) -> datasets.Dataset:
    if "prompt" not in ds.column_names:
        raise UserError(
            f"cannot take prompts from data with columns {', '.join(ds.column_names)}: no 'prompt'"
        )
    return select(ds, ("prompt", *EXTRAS["prompts"]))


# (have, want) -> converter for normalised data; e.g. UP-RLHF takes sft, rm and rl parts from one
# pairwise dataset, KTO takes unpaired rows from pairwise data.
CONVERSIONS: dict[tuple[str, str], Callable[[datasets.Dataset], datasets.Dataset]] = {
    ("pairwise", "unpaired"): unpair,
    ("pairwise", "sft"): _chosen_as_sft,
    ("pairwise", "prompts"): _to_prompts,
    ("sft", "prompts"): _to_prompts,
    ("unpaired", "prompts"): _to_prompts,
    ("scored", "prompts"): _to_prompts,
}


def convert(ds: datasets.Dataset, have: str, want: str) -> datasets.Dataset:
    """Turn normalised data of kind `have` into kind `want` (see `CONVERSIONS`)."""
    if have == want:
        return ds
    if (have, want) not in CONVERSIONS:
        ways = ", ".join(w for h, w in CONVERSIONS if h == have) or "nothing"
        raise UserError(f"cannot use '{have}' data as '{want}' (it converts to: {ways})")
    return CONVERSIONS[(have, want)](ds)
