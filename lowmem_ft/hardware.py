"""What the machine has, and how much of it a run uses."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from lowmem_ft.errors import UserError

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


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# Decimal units (KB, MB, ...) are powers of 1000; binary ones (KiB, MiB, ...) powers of 1024. A bare
# letter (K, M, G, T) counts as binary: see parse_size.
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kib": 1024,
    "kb": 1000,
    "m": 1024**2,
    "mib": 1024**2,
    "mb": 1000**2,
    "g": 1024**3,
    "gib": 1024**3,
    "gb": 1000**3,
    "t": 1024**4,
    "tib": 1024**4,
    "tb": 1000**4,
}

# A plain or decimal number with an optional short exponent (24, 1.5, .5, 24e9), then an optional unit.
# The exponent is limited to two digits so that "1e999999999" is an error, not a huge integer.
_SIZE_RE = re.compile(r"(\d+\.?\d*|\.\d+)(e[+-]?\d{1,2})?\s*([a-z]*)")


def parse_size(text: str, flag: str) -> int:
    """Parse a memory size from the command line into bytes.

    Accepts ``24GiB``, ``24 GiB``, ``1.5TiB``, ``512MiB`` (binary), ``24GB``, ``100KB`` (decimal),
    ``24e9`` or ``24000000000`` (bytes), with units in any case. A bare ``K``, ``M``, ``G`` or ``T``
    means KiB, MiB, GiB or TiB: someone who types ``24G`` for a "24 GB" card means the card's
    marketing size, and the memory NVIDIA reports for it is close to 24 GiB, not 24e9 bytes.

    ``flag`` names the option in the error message.
    """
    match = _SIZE_RE.fullmatch(text.strip().lower())
    if match is None or match.group(3) not in _UNITS:
        raise _not_a_size(text, flag)
    number, exponent, unit = match.groups()
    # Decimal keeps byte counts above 2**53 exact, where float would round them.
    value = Decimal(number + (exponent or "")) * _UNITS[unit]
    size = int(value.to_integral_value())
    if size <= 0:
        raise _not_a_size(text, flag)
    return size


def _not_a_size(text: str, flag: str) -> UserError:
    return UserError(f"{flag} {text!r} is not a memory size; write it like 24GiB, 16GB or 512MiB")


# GB/s per lane per direction, after line encoding (8b/10b for Gen1-2, 128b/130b for Gen3-5; Gen6's
# FLIT overhead is folded in).
PCIE_GBPS_PER_LANE = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}


@dataclass
class GPUInfo:
    index: int
    name: str
    total_bytes: int
    free_bytes: int
    pcie_gen: int | None  # link generation the card reaches under load; see _pcie_link
    pcie_width: int | None  # lanes
    # Planning numbers, not measurements: the real transfer rate is lower (protocol overhead,
    # pageable host memory), and the planner accounts for that.

    @property
    def link_bytes_per_s(self) -> float | None:
        """Theoretical host<->GPU bandwidth in one direction, or None if the link is unknown."""
        if self.pcie_gen not in PCIE_GBPS_PER_LANE or not self.pcie_width:
            return None
        return PCIE_GBPS_PER_LANE[self.pcie_gen] * self.pcie_width * 1e9


def detect_gpu(index: int = 0) -> GPUInfo | None:
    """Ask NVML about GPU ``index``; None when there is no driver, no pynvml or no such device.

    Never raises: a machine without a GPU is a normal case, and a broken NVML should not stop a run
    that the user can still describe with --gpu-mem.

    ``index`` is NVML's numbering (PCI bus order), which ignores CUDA_VISIBLE_DEVICES and can differ
    from torch's ``cuda:N`` on machines with several different GPUs.
    """
    try:
        import pynvml
    except Exception:  # not installed, or a broken install: both mean "cannot ask"
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver (NVMLError_LibraryNotFound / DriverNotLoaded) and friends
        return None
    try:
        if not 0 <= index < pynvml.nvmlDeviceGetCount():
            return None
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(handle)
        if isinstance(name, bytes):  # older nvidia-ml-py returns bytes, newer str
            name = name.decode("utf-8", "replace")
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        gen, width = _pcie_link(pynvml, handle)
        return GPUInfo(
            index=index,
            name=str(name),
            total_bytes=int(memory.total),
            free_bytes=int(memory.free),
            pcie_gen=gen,
            pcie_width=width,
        )
    except Exception:
        return None
    finally:
        with contextlib.suppress(Exception):  # a failed shutdown must not hide the answer
            pynvml.nvmlShutdown()


def _pcie_link(pynvml, handle) -> tuple[int | None, int | None]:
    """The PCIe generation and width the card runs at under load.

    We report the maximum link, not the current one: an idle GPU drops its link to Gen1 to save
    power and only retrains to full speed when traffic starts, so the current generation measured
    before a run under-reports. nvmlDeviceGetMaxPcieLinkGeneration is the maximum "possible with
    this device and system" (so a Gen5 card in a Gen4 slot says 4); we also take the min with
    nvmlDeviceGetGpuMaxPcieLinkGeneration (the card's own maximum, missing in older pynvml) in case
    a driver reports the slot's capability alone. The current values are only a fallback when the
    max calls are missing or unsupported (some vGPUs, WSL). Any of them may be absent: we then
    report None rather than guess.
    """
    gen = _min_known(
        _nvml_int(pynvml, "nvmlDeviceGetMaxPcieLinkGeneration", handle),
        _nvml_int(pynvml, "nvmlDeviceGetGpuMaxPcieLinkGeneration", handle),
    )
    if gen is None:
        gen = _nvml_int(pynvml, "nvmlDeviceGetCurrPcieLinkGeneration", handle)
    width = _nvml_int(pynvml, "nvmlDeviceGetMaxPcieLinkWidth", handle)
    if width is None:
        width = _nvml_int(pynvml, "nvmlDeviceGetCurrPcieLinkWidth", handle)
    return gen, width


def _nvml_int(pynvml, function: str, handle) -> int | None:
    """Call an optional NVML query; None if pynvml lacks it or the device does not support it."""
    call = getattr(pynvml, function, None)
    if call is None:
        return None
    try:
        value = int(call(handle))
    except Exception:
        return None
    return value if value > 0 else None  # 0 means "unknown" on some drivers


def _min_known(*values: int | None) -> int | None:
    known = [v for v in values if v is not None]
    return min(known) if known else None


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


def visible_gpu_index() -> int:
    """NVML's index of the GPU torch calls ``cuda:0``.

    NVML numbers every GPU in the machine and ignores CUDA_VISIBLE_DEVICES; torch's ``cuda:0`` is
    the first GPU that variable lists. Numeric entries map directly; a UUID entry (``GPU-...``)
    or anything unexpected falls back to 0.
    """
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return int(first) if first.isdigit() else 0


def detect_budget(
    gpu_mem: str | None = None,
    cpu_mem: str | None = None,
    gpu: str | None = None,
    disk_path: Path = Path("."),
) -> Budget:
    """Work out the memory, link and disk a plan may use, from the options and the machine.

    --gpu-mem and --cpu-mem describe a machine (perhaps not this one) and win over detection;
    --gpu none plans for no GPU even when there is one.
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
    info = None if no_gpu else detect_gpu(visible_gpu_index())
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
            sources["gpu"] = "--gpu-mem; no GPU detected"
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
        sources["gpu"] = "none detected (NVML unavailable or no device); pass --gpu-mem to plan for a GPU"

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
