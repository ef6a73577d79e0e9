"""Which GPU a run trains on, and what NVML says about it: the card behind torch's ``cuda:N``
(through ``CUDA_VISIBLE_DEVICES`` indices, UUIDs and MIG slices, and the device order), its free
memory and its PCIe link. Everything here works without a GPU, a driver or pynvml: it answers None."""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

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
