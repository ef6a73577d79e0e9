"""What `lowmem-ft generate` takes, checked before anything loads."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lowmem_ft.choices import precision_problem
from lowmem_ft.config import SEED_RANGE, seed_in_range
from lowmem_ft.devices import compute_dtype, device_problem, resolve_device
from lowmem_ft.errors import UserError

OnText = Callable[[str], None]  # receives each piece of the reply as it becomes final

# Words that end `--chat`, besides an empty line and the end of input.
CHAT_EXIT_WORDS = ("exit", "quit")
MIN_TEMPERATURE = 1e-3  # a sampling temperature's least (0 is greedy)


@dataclass(frozen=True)
class GenerateOptions:
    """What `lowmem-ft generate` was asked for; ``validate`` checks it before anything loads."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    base: str | None = None  # the base of a delta or adapter, if not where the job found it
    raw: bool = False
    allow_download: bool = False
    trust_remote_code: bool = False

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise UserError(message)

        need(self.max_new_tokens >= 1, f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        # (inf samples every token alike, whatever the model says; below 1e-3 sampling is greedy in
        # all but name, and far below it the scaled logits overflow into NaN)
        need(
            self.temperature == 0 or MIN_TEMPERATURE <= self.temperature < math.inf,
            f"--temperature must be 0 (greedy) or a finite value from {MIN_TEMPERATURE:g} (e.g. 0.7 to "
            f"sample), got {self.temperature}",
        )
        need(
            0 < self.top_p <= 1,
            f"--top-p must be in (0, 1] (1 = off, e.g. 0.9 keeps the likeliest 90%), got {self.top_p}",
        )
        need(self.top_k >= 0, f"--top-k must be >= 0 (0 = off), got {self.top_k}")
        need(
            self.seed is None or seed_in_range(self.seed),
            f"--seed must be {SEED_RANGE}, got {self.seed}",
        )
        if self.temperature == 0:
            given = (
                ("--top-p", self.top_p != 1),
                ("--top-k", self.top_k != 0),
                ("--seed", self.seed is not None),
            )
            sampled = [flag for flag, on in given if on]
            one = len(sampled) == 1
            need(
                not sampled,
                f"{' and '.join(sampled)} only {'applies' if one else 'apply'} to sampling; add "
                f"--temperature T (e.g. 0.7), or leave {'it' if one else 'them'} out for greedy decoding",
            )
        problem = precision_problem("--dtype", self.dtype)
        need(problem is None, problem)
        problem = device_problem(self.device)  # the devices `run --device` takes, checked alike
        need(problem is None, problem)

    def resolved_device(self) -> torch.device:
        return resolve_device(self.device)

    def compute_dtype(self, device: torch.device) -> torch.dtype:
        """As training chooses (devices.compute_dtype): fp32 on CPU, bf16 on a GPU that has it."""
        return compute_dtype(self.dtype, device)
