"""Training data: read JSONL files in four formats, tokenize with loss labels, batch for training.

See docs/data.md for the user-facing description.
"""

from lowmem_ft.data.batching import Batcher, collate, eval_batches
from lowmem_ft.data.formats import FORMAT_NAMES, Rendered, detect_format, render
from lowmem_ft.data.jsonl import Record, read_jsonl
from lowmem_ft.data.tokenize import Example, TokenStats, pack_examples, split_eval, tokenize_records

__all__ = [
    "FORMAT_NAMES",
    "Batcher",
    "Example",
    "Record",
    "Rendered",
    "TokenStats",
    "collate",
    "detect_format",
    "eval_batches",
    "pack_examples",
    "read_jsonl",
    "render",
    "split_eval",
    "tokenize_records",
]
