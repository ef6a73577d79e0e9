"""Load what ``resolve.resolve_model`` found: the tokenizer, the weights (safetensors only, on CPU,
in the dtype asked for), an empty model of the architecture, and the weights' size and hash.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from lowmem_ft.errors import UserError
from lowmem_ft.files import sha256_of
from lowmem_ft.models.resolve import ResolvedModel

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide transformers' per-tensor progress bar and info logging while loading, then restore them."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars_on = hf_logging.is_progress_bar_enabled()
    hub_bars_off = are_progress_bars_disabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars_on:
            hf_logging.enable_progress_bar()  # also re-enables huggingface_hub's bars...
        if hub_bars_off:
            disable_progress_bars()  # ...which may have been off to begin with


def _require_weights_dir(resolved: ResolvedModel) -> Path:
    if resolved.weights_dir is None:
        raise UserError(f"{resolved.spec}: no weights available (resolved for planning only)")
    return resolved.weights_dir


# What a Hugging Face tokenizer is saved as (fast, sentencepiece, BPE vocabularies, tiktoken)
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
    "tokenizer.tiktoken",
)  # fmt: skip


def load_tokenizer(resolved: ResolvedModel, trust_remote_code: bool = False):
    """The model's tokenizer, with a pad token guaranteed when the model has an eos token."""
    from transformers import AutoTokenizer

    weights_dir = _require_weights_dir(resolved)
    if not any((weights_dir / name).is_file() for name in _TOKENIZER_FILES):
        # (transformers then goes on to guess, and ends on a few lines about sentencepiece)
        raise UserError(
            f"{resolved.spec}: no tokenizer in {weights_dir} (tokenizer.json, tokenizer_config.json, "
            "tokenizer.model or vocab.json); copy the tokenizer files of the model it was made from into it"
        )
    with quiet_transformers():
        try:
            tokenizer = AutoTokenizer.from_pretrained(weights_dir, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            reason = " ".join(str(exc).split())  # (one line)
            raise UserError(
                f"{resolved.spec}: cannot load the tokenizer from {weights_dir}: {reason}"
            ) from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # Llama and Mistral ship without a pad token but batches need one. Padded positions are
        # excluded by the attention mask and from the loss, so reusing eos changes no result;
        # it avoids adding a token, which would resize the embedding.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    resolved: ResolvedModel, dtype: torch.dtype, trust_remote_code: bool = False
) -> PreTrainedModel:
    """Load the weights on CPU in ``dtype``; the caller decides what goes to the GPU and when."""
    from transformers import AutoModelForCausalLM

    weights_dir = _require_weights_dir(resolved)
    with (
        quiet_transformers(),
        damaged_files_said(f"{resolved.spec}: cannot load the weights in {weights_dir}"),
    ):
        model, info = AutoModelForCausalLM.from_pretrained(
            weights_dir,
            dtype=dtype,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
        )
    # Quieting transformers also hides its report of missing tensors, which it would fill with
    # random values: training from such a model is wasted time, so stop here instead.
    missing = sorted(info["missing_keys"]) + sorted(info["mismatched_keys"])
    if missing:
        shown = ", ".join(str(key) for key in missing[:3])
        raise UserError(
            f"{resolved.spec}: the weights in {weights_dir} do not match its config.json "
            f"({len(missing)} tensors missing or of the wrong shape, e.g. {shown})"
        )
    return model


@contextlib.contextmanager
def damaged_files_said(what: str) -> Iterator[None]:
    """A damaged file read inside (a safetensors file cut short, a config.json whose values are not
    what the model class needs, weights of other shapes, broken JSON) said in one line: ``what``,
    the library's reason, and what would work. Only while reading files the user gave: a bug
    elsewhere keeps its traceback."""
    from safetensors import SafetensorError

    try:
        yield
    except PermissionError:
        raise  # (not damage: said as a path the user can mend, by the command line)
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError, KeyError) as exc:
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__  # (one line)
        raise UserError(
            f"{what}: {reason}; the files look damaged or do not belong together: copy them again "
            "(or give the model they were made from)"
        ) from None


def merge_lora_adapter(model: PreTrainedModel, adapter_dir: Path) -> PreTrainedModel:
    """``model`` with the peft LoRA adapter in ``adapter_dir`` merged in (W += (α/r)·BA)."""
    import warnings

    from peft import PeftModel

    with warnings.catch_warnings(), damaged_files_said(f"cannot read the LoRA adapter in {adapter_dir}"):
        warnings.simplefilter("ignore")  # peft's notes on merging into low-precision weights
        return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()


def empty_model(
    config: PretrainedConfig, dtype: torch.dtype, trust_remote_code: bool = False
) -> PreTrainedModel:
    """The model's modules with every tensor on the meta device: no memory and no random values,
    for the ranks that receive their weights from another (distributed/fsdp.load_sharded). Its
    buffers (rotary frequencies) are on the meta device too and must be filled like the weights."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    # A copy: from_config sets the config's dtype to ``dtype``, and the caller's config still says
    # the dtype the weights are stored in (the default for the exported model: saving.py).
    config = copy.deepcopy(config)
    with quiet_transformers(), torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)


def count_parameters(weights_dir: Path) -> int:
    """Values stored in the ``*.safetensors`` files (tied weights are stored once), from their
    headers alone: nothing is loaded."""
    from safetensors import safe_open

    total = 0
    for file in sorted(Path(weights_dir).glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())  # noqa: SIM118
    return total


def weights_hash(weights_dir: Path) -> str:
    """sha256 (hex) over the bytes of the ``*.safetensors`` files in name order.

    Exports and deltas record it so they are only ever applied to the base they were made from.
    """
    files = sorted(Path(weights_dir).glob("*.safetensors"))
    if not files:
        raise UserError(f"{weights_dir}: no *.safetensors files to hash")
    return sha256_of(files)
