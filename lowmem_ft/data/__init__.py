"""Training data: read records (JSONL, .json, Parquet, a directory, a saved dataset) in five formats,
tokenize them with loss labels, batch them for training.

See docs/data.md for the user-facing description.
"""

from lowmem_ft.data.formats import FORMAT_NAMES, Rendered, detect_format, render
from lowmem_ft.data.jsonl import read_jsonl
from lowmem_ft.data.records import Record
from lowmem_ft.data.sources import data_files, data_path_problem, read_records

# Tokenising needs numpy and batching torch; the rest needs neither, and option checking
# (data_path_problem, FORMAT_NAMES) runs before they are imported, so the command line answers at
# once. These are imported on first use.
_LAZY = {
    "tokenize": (
        "Example",
        "ExampleTable",
        "TokenStats",
        "choose_eval_examples",
        "pack_examples",
        "split_eval",
        "tokenize_records",
    ),
    "batching": ("Batcher", "collate", "eval_batches"),
}


def __getattr__(name: str):
    import importlib

    for module, names in _LAZY.items():
        if name in names:
            return getattr(importlib.import_module(f"lowmem_ft.data.{module}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FORMAT_NAMES",
    "Batcher",
    "Example",
    "ExampleTable",
    "Record",
    "Rendered",
    "TokenStats",
    "choose_eval_examples",
    "collate",
    "data_files",
    "data_path_problem",
    "detect_format",
    "eval_batches",
    "pack_examples",
    "read_jsonl",
    "read_records",
    "render",
    "split_eval",
    "tokenize_records",
]
