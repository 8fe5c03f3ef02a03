"""Reading a source into a raw `datasets.Dataset`: JSON Lines / JSON / CSV / parquet files, saved
dataset directories, other local data directories, Hugging Face hub ids, and `builtin:KIND`.

The table of sources is in docs/data.md ("Sources"). Nothing here checks rows; that is validate's job.
"""

from __future__ import annotations

import gzip
import json
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa

from alignkit.data._util import first_line, quiet
from alignkit.data.main_first import main_process_first
from alignkit.errors import UserError, closest

SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".csv", ".parquet")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?")
# Rows nested deeper than this are refused: Arrow cannot hold deep nesting, and datasets' type
# inference slows down exponentially with depth (a 20-level row with a type clash takes seconds).
MAX_DEPTH = 16


# --------------------------------------------------------------------------- built-in task sources
BUILTIN_PREFIX = "builtin:"
BUILTIN_ROWS = 2000  # rows generated when max_samples is not given


def _builtin_table() -> dict[str, Callable[[int, int], list[dict]]]:
    from alignkit import arena  # only the builtin: sources need the built-in task

    return {
        "sft": arena.build_sft,
        "pairwise": arena.build_pairwise_offline,
        "unpaired": arena.build_unpaired,
        "prompts": arena.build_prompts,
        "scored": arena.build_scored,
        "ood": arena.build_ood,
    }


def builtin(source: str, n: int, seed: int = 0) -> datasets.Dataset:
    """`builtin:KIND` -> n rows of the built-in review task (alignkit.arena), deterministic by seed.

    `builtin:ood` holds degenerate completions (prompt, completion, kind) for uncertainty checks.
    """
    name = source[len(BUILTIN_PREFIX):]
    table = _builtin_table()
    if name not in table:
        raise UserError(f"unknown built-in dataset '{source}'{closest(name, table)} — one of: "
                        + ", ".join(BUILTIN_PREFIX + k for k in table))
    rows = table[name](int(n), seed)
    if name == "ood":
        rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]
    return datasets.Dataset.from_list(rows)


# --------------------------------------------------------------------------- files, dirs, hub


def load_raw(source: str, split: str = "train") -> datasets.Dataset:
    """Read a file, a saved dataset directory, a local data directory or a hub id into a Dataset."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_dir(path, split)
    if path.is_file():
        name = path.name.lower()
        if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
            return _from_rows(*_read_jsonl(path), path)
        if name.endswith(".json"):
            return _read_json(path, split)
        if name.endswith(".csv"):
            return _read_arrow(path, "csv")
        if name.endswith(".parquet"):
            return _read_arrow(path, "parquet")
        raise UserError(
            f"{source}: unsupported file type '{''.join(path.suffixes) or path.name}' — "
            f"use one of {', '.join(SUFFIXES)}, a dataset directory, or a hub id"
        )
    if _HUB_ID.fullmatch(source) and not source.lower().endswith(SUFFIXES):
        return _load_hub(source, split)
    raise UserError(f"{source}: file not found — check the path")


def _load_dir(path: Path, split: str) -> datasets.Dataset:
    try:
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            loaded = datasets.load_from_disk(str(path), keep_in_memory=True)
        else:  # e.g. a git clone of a hub dataset repo: let datasets find the data files
            with quiet():
                loaded = datasets.load_dataset(str(path), split=split)
    except UserError:
        raise
    except Exception as e:  # datasets raises many types here; all mean "not a readable dataset"
        raise UserError(f"{path}: cannot read this directory as a dataset ({first_line(e)})") from e
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            names = list(loaded)
            raise UserError(
                f"{path}: no split '{split}'{closest(split, names)} — available: {', '.join(names)} "
                "(pass --split)"
            )
        loaded = loaded[split]
    return loaded


def _load_hub(source: str, split: str) -> datasets.Dataset:
    name, _, config = source.partition(":")
    hint = (
        f"cannot load '{source}' from the Hugging Face hub (offline?) and there is no local file of that "
        "name: download it on a machine with access and pass the local path"
    )
    # Without a network, datasets retries for ~20 s per file: fail fast instead. HF_HUB_OFFLINE=1 skips
    # the probe so a copy in the local HF cache can still be used.
    if not datasets.config.HF_HUB_OFFLINE and not _hub_reachable():
        raise UserError(f"{hint} (hub unreachable; set HF_HUB_OFFLINE=1 to use a cached copy)")
    try:  # once per machine: the local main process downloads, the others read its cache
        with main_process_first(f"{source}/{split}"), quiet():
            return datasets.load_dataset(name, config or None, split=split)
    except UserError:
        raise
    except Exception as e:  # offline, gated, missing, bad split: one line whatever the cause
        raise UserError(f"{hint} ({first_line(e)})") from e


def _hub_reachable(timeout: float = 3.0) -> bool:
    from urllib.parse import urlparse

    from huggingface_hub.constants import ENDPOINT

    url = urlparse(ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- JSON


def _too_deep(at: str) -> UserError:
    return UserError(
        f"{at}: the JSON is nested more than {MAX_DEPTH} levels deep — flatten the row "
        "(text fields are strings or lists of {role, content} messages)"
    )


def _json_loads(text: str, at: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError:  # thousands of levels: Python's parser gives up
        raise _too_deep(at) from None


def _read_jsonl(path: Path) -> tuple[list[dict], list[str]]:
    rows, where = [], []
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = _json_loads(line, f"{path} line {n}")
                except json.JSONDecodeError as e:
                    raise UserError(
                        f"{path} line {n}: invalid JSON ({e.msg}, column {e.colno}) — fix or remove the line"
                    ) from None
                if not isinstance(obj, dict):
                    raise UserError(
                        f"{path} line {n}: expected a JSON object {{...}}, got {type(obj).__name__}"
                    )
                rows.append(obj)
                where.append(f"line {n}")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path}: not UTF-8 text ({e.reason} at byte {e.start}) — re-save it as UTF-8"
        ) from None
    except (OSError, EOFError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    return rows, where


def _read_json(path: Path, split: str) -> datasets.Dataset:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason}) — re-save it as UTF-8") from None
    try:
        obj = _json_loads(text, str(path))
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines in a .json file
            return _from_rows(*_read_jsonl(path), path)
        raise UserError(
            f"{path} line {e.lineno}: invalid JSON ({e.msg}, column {e.colno}) — fix the file"
        ) from None
    if isinstance(obj, dict):  # {"train": [...], "test": [...]} or {"data": [...]}
        key = split if split in obj else "data"
        obj = obj.get(key)
    if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
        raise UserError(
            f'{path}: expected a list of JSON objects (or {{"{split}": [...]}}) — one object per row'
        )
    return _from_rows(obj, [f"row {i + 1}" for i in range(len(obj))], path)


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether `value` nests lists/objects more than `limit` levels deep (iterative: no recursion)."""
    stack = [(value, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (list, dict)):
            if d >= limit:
                return True
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return False


def _from_rows(rows: list[dict], where: list[str], path: Path) -> datasets.Dataset:
    for row, at in zip(rows, where, strict=True):
        field = next((k for k, v in row.items() if _depth_exceeds(v, MAX_DEPTH)), None)
        if field is not None:
            raise _too_deep(f"{path} {at}: field '{field}'")
    keys = list(dict.fromkeys(k for r in rows for k in r))  # union of keys, first-seen order
    columns = {k: [r.get(k) for r in rows] for k in keys}
    try:
        return datasets.Dataset.from_dict(columns)
    except (pa.ArrowException, TypeError, ValueError, OverflowError, RecursionError) as e:
        clash = _type_clash(columns, where)
        raise UserError(
            f"{path} {clash}" if clash else f"{path}: rows disagree on a field's type ({first_line(e)})"
        ) from None


def _shape(v: Any) -> str:
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    return {str: "string", list: "list", dict: "object"}.get(type(v), type(v).__name__)


def _type_clash(columns: dict[str, list], where: list[str]) -> str | None:
    for key, values in columns.items():
        first = next(((i, _shape(v)) for i, v in enumerate(values) if v is not None), None)
        for i, v in enumerate(values):
            if first and v is not None and _shape(v) != first[1]:
                return (
                    f"{where[i]}: field '{key}' is a {_shape(v)} but {where[first[0]]} has a {first[1]} "
                    "— every row must use the same layout"
                )
    return None


def _read_arrow(path: Path, fmt: str) -> datasets.Dataset:
    try:
        if fmt == "csv":
            import pyarrow.csv as pacsv

            table = pacsv.read_csv(path)
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: cannot read as {fmt} ({first_line(e)})") from None
    return datasets.Dataset(table)
