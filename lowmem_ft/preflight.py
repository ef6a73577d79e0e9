"""Before step 1 on a GPU: does the plan fit in what the device really has, now?

The plan was made from NVML's free memory (or --gpu-mem) and a planned CUDA context. After setup
the truth is known: the context really created (cuBLAS, SDPA kernels, bitsandbytes), other
processes that started meanwhile, the weights already placed. If the step's peak cannot fit in
what is left, the run stops here, with nothing written, rather than at step 40.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowmem_ft.errors import UserError
from lowmem_ft.planner import Plan
from lowmem_ft.planner.accounting import GiB
from lowmem_ft.planner.plan import CUDA_CONTEXT_BYTES
from lowmem_ft.sizes import format_bytes


@dataclass
class DeviceMemory:
    free: int  # the driver's free memory (torch.cuda.mem_get_info)
    total: int
    allocated: int  # this process's live tensors
    reserved: int  # held by this process's caching allocator (allocated + cached)

    @property
    def outside_tensors(self) -> int:
        """Memory in use that is not this run's allocator: its CUDA context, and other processes."""
        return self.total - self.free - self.reserved


def device_memory(device: torch.device) -> DeviceMemory:
    free, total = torch.cuda.mem_get_info(device)
    return DeviceMemory(free, total, torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device))


def check_plan_fits_device(plan: Plan, device: torch.device, memory: DeviceMemory | None = None) -> None:
    """Raise a one-line UserError when the plan's tensor peak does not fit the device's memory."""
    memory = memory or device_memory(device)
    tensor_peak = plan.gpu_peak_bytes - CUDA_CONTEXT_BYTES  # the plan's tensors and allocator margin
    available = memory.free + memory.reserved  # for this run's allocator: free, and what it holds
    if tensor_peak <= available:
        return
    short = tensor_peak - available
    # A plan made for this budget keeps its tensors within what is free (the context exists already).
    suggestion = (available + CUDA_CONTEXT_BYTES) // (GiB // 10) * (GiB // 10)
    raise UserError(
        f"the plan needs {format_bytes(tensor_peak)} for tensors on {device} but only "
        f"{format_bytes(available)} is free there ({format_bytes(short)} short; "
        f"{format_bytes(memory.outside_tensors)} is held outside this run's tensors: the CUDA context, "
        f"planned as {format_bytes(CUDA_CONTEXT_BYTES)}, and any other process); free the GPU, or pass "
        f"--gpu-mem {format_bytes(suggestion).replace(' ', '')} to plan for what is free"
    )
