"""What the machine has, and how much of it a run uses."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
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
    index: int  # NVML's index of the card (of a MIG slice's parent card)
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


@contextlib.contextmanager
def _nvml():
    """pynvml, initialised for the block and shut down after it; None when NVML cannot be asked.

    A machine without a GPU is a normal case: no pynvml, or no driver (NVMLError_LibraryNotFound,
    DriverNotLoaded and friends), gives None, not an error.
    """
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # not installed, a broken install, no driver: all mean "cannot ask"
        pynvml = None
    if pynvml is None:
        yield None
        return
    try:
        yield pynvml
    finally:
        with contextlib.suppress(Exception):  # a failed shutdown must not hide the answer
            pynvml.nvmlShutdown()


def detect_gpu(index: int = 0) -> GPUInfo | None:
    """Ask NVML about GPU ``index``; None when there is no driver, no pynvml or no such device.

    Never raises: a broken NVML should not stop a run that the user can still describe with
    --gpu-mem.

    ``index`` is NVML's numbering (PCI bus order), which ignores CUDA_VISIBLE_DEVICES and can differ
    from torch's ``cuda:N``: detect_cuda_gpu finds the card torch means.
    """
    with _nvml() as nvml:
        if nvml is None:
            return None
        try:
            if not 0 <= index < nvml.nvmlDeviceGetCount():
                return None
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            return _gpu_info(nvml, index, handle, handle)
        except Exception:
            return None


def _gpu_info(nvml, index: int, handle, parent) -> GPUInfo:
    """``handle`` is the card or MIG slice whose name and memory count; ``parent`` the physical
    card, whose PCIe link a slice shares (NVML has no link for a MIG handle)."""
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    gen, width = _pcie_link(nvml, parent)
    return GPUInfo(
        index=index,
        name=_text(nvml.nvmlDeviceGetName(handle)),
        total_bytes=int(memory.total),
        free_bytes=int(memory.free),
        pcie_gen=gen,
        pcie_width=width,
    )


def _text(value: str | bytes) -> str:
    """Older nvidia-ml-py returns bytes, newer str."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


ORDER_ASSUMED = (
    "CUDA_DEVICE_ORDER=FASTEST_FIRST with different GPUs: assumed PCI order; "
    "set CUDA_DEVICE_ORDER=PCI_BUS_ID to be sure"
)


def detect_cuda_gpu(cuda_index: int = 0) -> tuple[GPUInfo | None, str | None]:
    """The GPU torch calls ``cuda:<cuda_index>``, read through NVML, and a note for the plan.

    NVML numbers every GPU of the machine in PCI bus order and ignores CUDA_VISIBLE_DEVICES; torch
    numbers the devices that variable lists, in CUDA's order. The note is None when the card is
    certain; otherwise it says why there is none, or what was assumed to pick it. Never raises.
    """
    with _nvml() as nvml:
        if nvml is None:
            return None, None
        try:
            return _find_cuda_gpu(nvml, cuda_index)
        except Exception:
            return None, None


def _find_cuda_gpu(nvml, cuda_index: int) -> tuple[GPUInfo | None, str | None]:
    gpus = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    entries = [str(i) for i in range(len(gpus))] if listed is None else [e.strip() for e in listed.split(",")]
    visible: list[tuple[int, int | None]] = []  # (NVML index, MIG slot or None) of each CUDA device
    for entry in entries:
        device = _resolve_entry(nvml, gpus, entry)
        if device is None:
            break  # CUDA stops at the first invalid entry: "0,2,-1,1" shows devices 0 and 2
        if device in visible:  # CUDA then shows no device at all
            return None, f"CUDA_VISIBLE_DEVICES={listed!r} names a device twice"
        visible.append(device)
    if cuda_index >= len(visible):
        shown = "NVML" if listed is None else f"CUDA_VISIBLE_DEVICES={listed!r}"
        return None, f"no cuda:{cuda_index}: {shown} shows {len(visible)} device(s)"

    index, slot = visible[cuda_index]
    notes = []
    if entries[cuda_index].isdigit() and not _cuda_order_is_pci(nvml, gpus):
        found = _nvml_index_from_torch(nvml, gpus, cuda_index)
        if found is None:
            notes.append(ORDER_ASSUMED)
        else:
            index = found
    gpu = gpus[index]
    if slot is not None:
        handle = nvml.nvmlDeviceGetMigDeviceHandleByIndex(gpu, slot)
    else:
        handle = gpu
        if _mig_slices(nvml, gpu):
            notes.append("the card is split into MIG slices: name one in CUDA_VISIBLE_DEVICES=MIG-<uuid>")
    return _gpu_info(nvml, index, handle, gpu), "; ".join(notes) or None


def _resolve_entry(nvml, gpus: list, entry: str) -> tuple[int, int | None] | None:
    """(NVML index, MIG slot or None) of one CUDA_VISIBLE_DEVICES entry; None if CUDA would reject it.

    Integers count in CUDA's order (taken here as NVML's; _find_cuda_gpu checks that). UUIDs may be
    shortened to a unique prefix, as CUDA allows.
    """
    if entry.isdigit():
        return (int(entry), None) if int(entry) < len(gpus) else None
    if entry.startswith("MIG-GPU-"):  # the older form, MIG-GPU-<uuid>/<GPU instance>/<compute instance>
        parent_uuid, _, instances = entry.removeprefix("MIG-").partition("/")
        parent = _unique_prefix(parent_uuid, [_text(nvml.nvmlDeviceGetUUID(g)) for g in gpus])
        if parent is None:
            return None
        for slot, mig in _mig_slices(nvml, gpus[parent]):
            ids = nvml.nvmlDeviceGetGpuInstanceId(mig), nvml.nvmlDeviceGetComputeInstanceId(mig)
            if instances == f"{ids[0]}/{ids[1]}":
                return parent, slot
        return None
    if entry.startswith("MIG-"):
        slices = [(i, slot, mig) for i, gpu in enumerate(gpus) for slot, mig in _mig_slices(nvml, gpu)]
        found = _unique_prefix(entry, [_text(nvml.nvmlDeviceGetUUID(mig)) for *_, mig in slices])
        return None if found is None else slices[found][:2]
    if entry.startswith("GPU-"):
        found = _unique_prefix(entry, [_text(nvml.nvmlDeviceGetUUID(g)) for g in gpus])
        return None if found is None else (found, None)
    return None


def _unique_prefix(prefix: str, uuids: list[str]) -> int | None:
    matches = [i for i, uuid in enumerate(uuids) if uuid.startswith(prefix)]
    return matches[0] if len(matches) == 1 else None


def _mig_slices(nvml, gpu) -> list[tuple[int, object]]:
    """(slot, handle) of the MIG slices of a card; none on cards without MIG or with it off.

    NVML reports the whole card's memory on the card's handle: a slice's own memory is only on the
    slice's handle.
    """
    try:
        slots = int(nvml.nvmlDeviceGetMaxMigDeviceCount(gpu))
    except Exception:  # no MIG on this card, or a pynvml without MIG calls
        return []
    slices = []
    for slot in range(slots):
        try:
            slices.append((slot, nvml.nvmlDeviceGetMigDeviceHandleByIndex(gpu, slot)))
        except Exception:  # an empty slot (NVML_ERROR_NOT_FOUND), or MIG mode off
            continue
    return slices


def _cuda_order_is_pci(nvml, gpus: list) -> bool:
    """Whether CUDA numbers the GPUs as NVML does (PCI bus order).

    CUDA_DEVICE_ORDER=PCI_BUS_ID says so. The default, FASTEST_FIRST, puts faster cards first and
    breaks ties by PCI bus, so it is PCI order too when every card is the same model.
    """
    if os.environ.get("CUDA_DEVICE_ORDER", "FASTEST_FIRST") == "PCI_BUS_ID":
        return True
    return len({_text(nvml.nvmlDeviceGetName(gpu)) for gpu in gpus}) <= 1


def _nvml_index_from_torch(nvml, gpus: list, cuda_index: int) -> int | None:
    """NVML's index of torch's ``cuda:<cuda_index>``, matched by UUID; None if torch cannot say.

    Only when torch is already imported (`lowmem-ft plan` does not import it, to start fast) and
    sees CUDA: asking initialises CUDA, which `run` does anyway.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        if not torch.cuda.is_available():
            return None
        uuid = "GPU-" + str(torch.cuda.get_device_properties(cuda_index).uuid)  # str() has no "GPU-"
    except Exception:
        return None
    uuids = [_text(nvml.nvmlDeviceGetUUID(gpu)) for gpu in gpus]
    return uuids.index(uuid) if uuid in uuids else None


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
