"""`--device` and `--dtype` as `run` and `generate` both take them: checked, resolved to a torch
device, and the compute precision that goes with it. torch is imported only when a device is
resolved (or a CUDA device is asked for), so the command line's option checks start without it."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_DEVICE = re.compile(r"auto|cpu|cuda(:(0|[1-9][0-9]*))?")


def device_problem(spec: str) -> str | None:
    """What is wrong with ``--device spec`` on this machine, in one line, or None."""
    if _DEVICE.fullmatch(spec) is None:
        return f"--device must be auto, cpu, cuda or cuda:N (N counts the visible GPUs from 0), got {spec!r}"
    if not spec.startswith("cuda"):
        return None
    import torch

    if not torch.cuda.is_available():
        return f"--device {spec} was asked for but no CUDA device is visible; use --device cpu"
    # N counts the devices CUDA shows (after CUDA_VISIBLE_DEVICES), as torch does.
    count = torch.cuda.device_count()
    shown = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
    if (torch.device(spec).index or 0) >= count:
        return (
            f"--device {spec} is not visible: CUDA shows {count} device(s), {shown} "
            "(CUDA_VISIBLE_DEVICES decides which)"
        )
    return None


def resolve_device(spec: str) -> torch.device:
    """``auto``: the GPU when there is one."""
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def compute_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The precision the forward (and backward) run in: ``dtype`` unless it is auto. On CPU the
    default is fp32 (bf16 autocast on CPU is slower than fp32 on most machines); on CUDA it is bf16
    where the GPU supports it, because fp16 needs loss scaling and overflows."""
    import torch

    from lowmem_ft.precision import DTYPES

    if dtype != "auto":
        return DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def measures_free_memory(device: torch.device) -> bool:
    """Whether ``device`` can be asked what is free before work is placed on it: a GPU can; a CPU's
    memory is the host's, planned from psutil. A seam: the tests fake a device that answers."""
    return device.type == "cuda"
