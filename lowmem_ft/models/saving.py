"""Writing a model in the format other tools load: a Hugging Face directory of safetensors."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from lowmem_ft.files import readable_as_umask_allows
from lowmem_ft.models.loading import quiet_transformers
from lowmem_ft.models.resolve import ResolvedModel

# A fine-tuned model is a derivative of its base, and the base's terms travel with it: Llama 2's and
# Llama 3's licenses ask for a copy of the agreement (LICENSE, USE_POLICY.md) with every copy of a
# derived model. The base's README and other files describe the base, not this model: not copied.
_NOTICE = re.compile(r"(licen[cs]e|notice|use_policy|copying)([._-].*)?", re.IGNORECASE)


def copy_notices(base_dir: Path | None, out_dir: Path) -> list[str]:
    """Copy the base model's license and notice files into ``out_dir``; returns their names."""
    if base_dir is None:
        return []
    copied = []
    for path in sorted(Path(base_dir).iterdir()):
        if path.is_file() and _NOTICE.fullmatch(path.name):
            shutil.copy2(path, out_dir / path.name)
            copied.append(path.name)
    return copied


def _code_is_here(auto_map: dict, directory: Path) -> bool:
    """Whether every module ``auto_map`` names ("modeling_x.Class", "repo--modeling_x.Class") is a
    file in ``directory``; True for an empty map."""
    references = [
        r for value in auto_map.values() for r in (value if isinstance(value, list) else [value]) if r
    ]
    return all((directory / (ref.split("--")[-1].rsplit(".", 1)[0] + ".py")).is_file() for ref in references)


def save_hf_model(
    model: torch.nn.Module,
    tokenizer,
    out_dir: Path,
    save_dtype: torch.dtype,
    base_dir: Path | None,
    state: dict | None = None,
) -> Path:
    """Save ``model`` and ``tokenizer`` so ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads them,
    with the license files of the base model in ``base_dir`` (``copy_notices``).

    Tensors are cast one at a time into the state dict that is written, so the peak extra memory
    is one copy of the model in ``save_dtype``, not a second model object. ``state``: the weights
    to write instead of the model's own (a sharded model's, gathered on rank 0).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    state = model.state_dict() if state is None else state
    state = _cast_keeping_ties(state, save_dtype)
    model.config.dtype = save_dtype
    with quiet_transformers():  # no per-shard progress bar in the middle of our output
        model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
    # save_pretrained writes the dtype of the model's parameters (fp32 in training), not that of the
    # weights it was given: from_pretrained(dtype="auto") would load a bf16 export in fp32, twice
    # the memory, and a fine-tune of it would save fp32 weights.
    config_file = out_dir / "config.json"
    config = json.loads(config_file.read_text())
    written = str(save_dtype).removeprefix("torch.")
    config.update({key: written for key in ("dtype", "torch_dtype") if key in config} or {"dtype": written})
    if not _code_is_here(config.get("auto_map", {}), out_dir):
        # The base named its own code, but transformers' class was used (its model_type is known, and
        # --trust-remote-code was not given): without the code files, from_pretrained(...,
        # trust_remote_code=True) of the result would fail. Without auto_map it loads either way.
        del config["auto_map"]
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    readable_as_umask_allows(out_dir)
    tokenizer.save_pretrained(out_dir)
    copy_notices(base_dir, out_dir)
    return out_dir


def _cast_keeping_ties(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``state`` on the host in ``dtype``, one tensor at a time. A tensor a model ties under two names
    (the input embedding and the output head of most small models) stays one tensor: save_pretrained
    then writes it once, as the base has it, where two copies would add the embedding's size again."""
    cast: dict[tuple, torch.Tensor] = {}
    out = {}
    for name, tensor in state.items():
        storage = tensor.untyped_storage().data_ptr()
        key = (tensor.device, storage, tensor.storage_offset(), tensor.shape, tensor.stride())
        if tensor.device.type == "meta" or key not in cast:
            cast[key] = tensor.detach().to("cpu", dtype)
        out[name] = cast[key]
    return out


def model_dtype_on_disk(resolved: ResolvedModel) -> torch.dtype:
    """The dtype the base model was distributed in; exports default to it (bf16 for most 7B models)."""
    dtype = getattr(resolved.config, "dtype", None) or getattr(resolved.config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32
