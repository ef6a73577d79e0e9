"""What the machine has, and how much of it a run uses: the planning budget (GPU memory through
NVML, host RAM through psutil, free disk), the CUDA allocator's settings, peak-memory measurement.
Finding the card is gpus.py; memory sizes are sizes.py."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from lowmem_ft.errors import UserError
from lowmem_ft.gpus import GPUInfo, detect_cuda_gpu
from lowmem_ft.sizes import format_bytes, parse_size

if TYPE_CHECKING:  # torch is imported where it is used, so `lowmem-ft plan` starts fast
    import torch


class PeakMemory:
    """Peak memory of the run, for the progress bar and metrics.

    On CUDA this is the allocator's high-water mark (what our tensors needed). On CPU there is no
    allocator counter, so it is the largest resident set size of the process seen at the moments
    we sample (every optimizer step), which includes Python, libraries and the data.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._process = psutil.Process()
        self._cpu_peak = 0
        if device.type == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats(device)

    def sample(self) -> int:
        if self.device.type == "cuda":
            import torch

            return torch.cuda.max_memory_allocated(self.device)
        self._cpu_peak = max(self._cpu_peak, self._process.memory_info().rss)
        return self._cpu_peak


def configure_cuda_allocator() -> None:
    """Turn on the CUDA caching allocator's expandable segments, unless the user configured it.

    HiFT alternates large tensors of different sizes: the embedding and head groups (525M parameters
    each for Llama-3-8B) and decoder layers (218M). The caching allocator keeps freed blocks in
    fixed segments, and blocks freed by one size rarely fit the next, so memory fragments until an
    allocation fails with enough free in total. Expandable segments grow one mapping instead.
    The allocator reads the variable once, when CUDA initialises: call this before that.
    """
    user_set = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF")
    if not any(name in os.environ for name in user_set):
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


@dataclass
class Budget:
    """What a training plan may use, and where each number came from."""

    gpu: GPUInfo | None  # the detected (or described) GPU; None when planning without one
    gpu_bytes: int  # GPU memory the plan may use (0 without a GPU)
    host_bytes: int  # host RAM the plan may use
    host_total_bytes: int
    disk_free_bytes: int | None  # free space where the job writes; None if unknown
    link_bytes_per_s: float | None  # host<->GPU, one direction; None if unknown
    sources: dict[str, str]  # "gpu", "host", "disk" and (with a GPU) "link" -> where the number came from

    def describe(self) -> str:
        """One line for the plan header, naming the source of each number."""
        parts = []
        if self.gpu is None:
            parts.append(f"no GPU: {self.sources.get('gpu', 'none')}")
        else:
            gpu = f"GPU {self.gpu.name}: {format_bytes(self.gpu_bytes)} usable ({self.sources.get('gpu')})"
            if self.link_bytes_per_s is not None:
                gpu += (
                    f", PCIe Gen{self.gpu.pcie_gen} x{self.gpu.pcie_width}"
                    f" ≈ {self.link_bytes_per_s / 1e9:.1f} GB/s ({self.sources.get('link')})"
                )
            else:
                gpu += f", PCIe link unknown ({self.sources.get('link')})"
            parts.append(gpu)
        if self.sources.get("host") == "psutil":
            parts.append(
                f"host {format_bytes(self.host_bytes)} available of {format_bytes(self.host_total_bytes)}"
                " (psutil)"
            )
        else:
            parts.append(f"host {format_bytes(self.host_bytes)} ({self.sources.get('host')})")
        if self.disk_free_bytes is None:
            parts.append(f"disk free space unknown ({self.sources.get('disk')})")
        else:
            parts.append(f"disk {format_bytes(self.disk_free_bytes)} free ({self.sources.get('disk')})")
        return "; ".join(parts)


def detect_budget(
    gpu_mem: str | None = None,
    cpu_mem: str | None = None,
    gpu: str | None = None,
    disk_path: Path = Path("."),
    cuda_index: int = 0,
) -> Budget:
    """Work out the memory, link and disk a plan may use, from the options and the machine.

    --gpu-mem and --cpu-mem describe a machine (perhaps not this one) and win over detection;
    --gpu none plans for no GPU even when there is one. The GPU is the one torch calls
    ``cuda:<cuda_index>`` (``run --device cuda:N``), wherever NVML numbers it.
    """
    # Check the user's input before touching NVML, so that a typo fails fast and the same way
    # everywhere.
    no_gpu = False
    if gpu is not None:
        if gpu.strip().lower() != "none":
            raise UserError("--gpu accepts only 'none' (or leave it out to detect the GPU)")
        if gpu_mem is not None:
            raise UserError("--gpu none and --gpu-mem contradict each other; pass only one of them")
        no_gpu = True
    described_gpu_bytes = parse_size(gpu_mem, "--gpu-mem") if gpu_mem is not None else None
    described_host_bytes = parse_size(cpu_mem, "--cpu-mem") if cpu_mem is not None else None

    sources: dict[str, str] = {}
    info, note = (None, None) if no_gpu else detect_cuda_gpu(cuda_index)
    detected = info is not None
    if no_gpu:
        gpu_bytes = 0
        sources["gpu"] = "--gpu none"
    elif described_gpu_bytes is not None:
        # The user describes a card: plan for all of it, whatever this machine has.
        gpu_bytes = described_gpu_bytes
        if info is None:
            info = GPUInfo(
                index=0,
                name="(described by --gpu-mem)",
                total_bytes=gpu_bytes,
                free_bytes=gpu_bytes,
                pcie_gen=None,
                pcie_width=None,
            )
            sources["gpu"] = "--gpu-mem; no GPU detected" + (f" ({note})" if note else "")
            sources["link"] = "not known for a card described by --gpu-mem"
        else:
            sources["gpu"] = (
                f"--gpu-mem; NVML reports {format_bytes(info.free_bytes)} free"
                f" of {format_bytes(info.total_bytes)}"
            )
    elif info is not None:
        # Free, not total: memory other processes hold on the card is not ours to plan with.
        gpu_bytes = info.free_bytes
        sources["gpu"] = f"NVML free memory of {format_bytes(info.total_bytes)} total"
    else:
        gpu_bytes = 0
        reason = note or "NVML unavailable or no device"
        sources["gpu"] = f"none detected ({reason}); pass --gpu-mem to plan for a GPU"
    if detected and note is not None:  # what was assumed to find the card
        sources["gpu"] += f"; {note}"

    link = info.link_bytes_per_s if info is not None else None
    if info is not None and "link" not in sources:
        sources["link"] = "NVML max PCIe link" if link is not None else "not reported by NVML"

    if described_host_bytes is not None:
        host_bytes = host_total = described_host_bytes
        sources["host"] = "--cpu-mem"
    else:
        memory = psutil.virtual_memory()
        host_bytes, host_total = int(memory.available), int(memory.total)
        sources["host"] = "psutil"

    disk_free, sources["disk"] = _disk_free(disk_path)

    return Budget(
        gpu=info,
        gpu_bytes=gpu_bytes,
        host_bytes=host_bytes,
        host_total_bytes=host_total,
        disk_free_bytes=disk_free,
        link_bytes_per_s=link,
        sources=sources,
    )


def _disk_free(path: Path) -> tuple[int | None, str]:
    """Free bytes on the file system that holds ``path``, which may not exist yet (a new job dir)."""
    try:
        existing = Path(path).absolute()
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        return shutil.disk_usage(existing).free, str(existing)
    except OSError as exc:
        return None, f"{path}: {exc.strerror or exc}"
