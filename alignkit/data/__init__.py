"""One dataset loader for every trainer: a source -> validated, normalised `datasets.Dataset`.

`load(source, kind, columns, ...)` reads a file, a dataset directory, a hub id or `builtin:KIND`
(sources), maps `--columns` (columns), converts recognised real schemas (schemas), normalises and
checks every row of one of five kinds (kinds, validate), and converts between kinds (conversions).
Bad input raises `UserError` with one line naming the file, row (counted from 1) and field.
The formats, rules and examples: docs/data.md.
"""

from alignkit.data.columns import parse_columns
from alignkit.data.conversions import CONVERSIONS, convert, unpair
from alignkit.data.dropped import REASONS, drop_too_long, note_dropped
from alignkit.data.kinds import CANONICAL, EXTRAS, FIELDS, KINDS, detect_kind
from alignkit.data.loader import load, load_source, normalise, split, train_eval_split
from alignkit.data.output import apply_chat_template_if_any, describe, to_jsonl
from alignkit.data.schemas import ASSISTANT_MARKER, MBPP_TEMPLATE, SCHEMAS, Schema, recognise_schema
from alignkit.data.sources import BUILTIN_PREFIX, BUILTIN_ROWS, SUFFIXES, builtin, load_raw

__all__ = [
    "ASSISTANT_MARKER", "BUILTIN_PREFIX", "BUILTIN_ROWS", "CANONICAL", "CONVERSIONS", "EXTRAS", "FIELDS",
    "KINDS", "MBPP_TEMPLATE", "REASONS", "SCHEMAS", "SUFFIXES", "Schema", "apply_chat_template_if_any",
    "builtin", "convert", "describe", "detect_kind", "drop_too_long", "load", "load_raw", "load_source",
    "normalise", "note_dropped", "parse_columns", "recognise_schema", "split", "to_jsonl",
    "train_eval_split", "unpair",
]
