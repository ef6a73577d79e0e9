"""What the machine has, and how much of it a run uses."""

from __future__ import annotations

import psutil
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
            torch.cuda.reset_peak_memory_stats(device)

    def sample(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        self._cpu_peak = max(self._cpu_peak, self._process.memory_info().rss)
        return self._cpu_peak


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
