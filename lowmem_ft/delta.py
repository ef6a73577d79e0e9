"""Sparse increments on disk: ``delta.safetensors``, and merging one into its base model.

A delta holds, for each trained weight ``NAME``, the tensors ``NAME.indices`` (int32 flat positions)
and ``NAME.values`` (fp32 increments), and in its metadata the base model it was trained from and
the sha256 of that base's safetensors files. It is a few percent of the model's size at 1%, and
it is only ever applied to the exact base it was made from.

Merging works shard by shard on the safetensors files, without building a model: the peak memory
is one shard, so a 7B model merges on a machine that could not hold it in fp32. Each changed
weight is upcast to fp32, incremented, and written in the requested dtype (by default the base's
own), so a merge into an fp32 copy is exactly base + Δ.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lowmem_ft.errors import UserError
from lowmem_ft.files import readable_as_umask_allows

FORMAT = "lowmem-ft-delta"
VERSION = 1
DELTA_FILE = "delta.safetensors"


@dataclass
class Delta:
    entries: dict[str, tuple[torch.Tensor, torch.Tensor]]  # weight name -> (indices, values)
    meta: dict

    @property
    def count(self) -> int:
        return sum(len(indices) for indices, _ in self.entries.values())


def save_delta(path: Path, entries: dict[str, tuple[torch.Tensor, torch.Tensor]], meta: dict) -> Path:
    tensors = {}
    for name, (indices, values) in entries.items():
        tensors[f"{name}.indices"] = indices.detach().to("cpu", torch.int32).contiguous()
        tensors[f"{name}.values"] = values.detach().to("cpu", torch.float32).contiguous()
    header = {"format": FORMAT, "version": VERSION, **meta}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, partial, metadata={"lowmem_ft": json.dumps(header)})
    readable_as_umask_allows(partial)
    partial.replace(path)  # never a half-written delta under the final name
    return path


def read_delta(path: Path) -> Delta:
    if not path.is_file():
        raise UserError(f"{path}: no such delta file")
    try:
        with safe_open(path, "pt") as handle:
            header = json.loads((handle.metadata() or {}).get("lowmem_ft", "{}"))
        tensors = load_file(path)
    except Exception as exc:  # OSError, JSON errors, and safetensors' own SafetensorError
        raise UserError(f"{path}: not a readable delta file ({exc})") from None
    if header.get("format") != FORMAT:
        raise UserError(f"{path}: not a lowmem-ft delta (no '{FORMAT}' metadata)")
    if header.get("version", 0) > VERSION:
        raise UserError(f"{path}: delta format version {header['version']} is newer than this lowmem-ft")
    names = sorted({key.rsplit(".", 1)[0] for key in tensors})
    entries = {name: (tensors[f"{name}.indices"], tensors[f"{name}.values"]) for name in names}
    return Delta(entries, header)


def merged_weight(
    name: str, base: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, shapes: dict
) -> torch.Tensor:
    """Base weight ``name`` plus its Δ, in fp32 (the caller rounds it once, to the dtype it keeps):
    the one merge `export --merge` writes and `generate` applies in memory. ``shapes``: the weight
    shapes the delta recorded, checked so a delta never lands on another layout."""
    if name in shapes and list(base.shape) != shapes[name]:
        raise UserError(f"the delta's {name} is for a {shapes[name]} weight; the base has {list(base.shape)}")
    merged = base.detach().float().reshape(-1)
    if len(indices) and int(indices.max()) >= merged.numel():
        raise UserError(f"delta entry for {name} lies outside the base weight ({list(base.shape)})")
    merged[indices.long()] += values
    return merged.view(base.shape)


def merge_into_files(delta: Delta, base_dir: Path, out_dir: Path, save_dtype: torch.dtype | None) -> Path:
    """Write base + Δ as a Hugging Face model directory (safetensors), shard by shard."""
    shards = sorted(base_dir.glob("*.safetensors"))
    remaining = dict(delta.entries)
    shapes = delta.meta.get("shapes", {})
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in base_dir.iterdir():  # config, tokenizer, generation config, shard index
        if path.is_file() and path.suffix != ".safetensors":
            shutil.copy2(path, out_dir / path.name)
    for shard in shards:
        tensors = load_file(shard)
        for name, tensor in tensors.items():
            dtype = save_dtype if save_dtype is not None and tensor.is_floating_point() else tensor.dtype
            if name in remaining:
                tensor = merged_weight(name, tensor, *remaining.pop(name), shapes)
            tensors[name] = tensor.to(dtype).contiguous()
        with safe_open(shard, "pt") as handle:
            metadata = handle.metadata() or {"format": "pt"}
        save_file(tensors, out_dir / shard.name, metadata=metadata)
        readable_as_umask_allows(out_dir / shard.name)
        del tensors
    if remaining:
        raise UserError(
            f"the base model has no weight named {next(iter(remaining))} "
            f"({len(remaining)} delta tensors unmatched); is it the same architecture?"
        )
    if save_dtype is not None:
        _set_config_dtype(out_dir / "config.json", save_dtype)
    return out_dir


def _set_config_dtype(config_path: Path, dtype: torch.dtype) -> None:
    if not config_path.is_file():
        return
    config = json.loads(config_path.read_text())
    name = str(dtype).removeprefix("torch.")
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = name
    config_path.write_text(json.dumps(config, indent=2) + "\n")
