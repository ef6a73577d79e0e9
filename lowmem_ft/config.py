"""The configuration of a run: what the user asked for, validated, with defaults filled in.

It is frozen, and a run flows one way: the request (``job.json``'s "requested") → the planner fills
in what the user left open (prepare.plan_run) → the resolved run (``job.json``'s "config"), which
the methods and the recipe read. A change during the run (an out-of-memory retry with a smaller
micro-batch) is a new resolved run, recorded in the job, not an edit. Every check names the flag
it is about, so an error tells the user what to change.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lowmem_ft.choices import BASE_QUANTS as QUANTS
from lowmem_ft.choices import (
    DTYPE_NAMES,
    METHOD_NAMES,
    OPTIMIZERS,
    ORDERS,
    SCHEDULES,
    SELECTION_SCORES,
    SPAFIT_VARIANTS,
    STATE_POLICIES,
)
from lowmem_ft.errors import UserError
from lowmem_ft.registry import METHOD_OPTIONS, methods_taking

if TYPE_CHECKING:  # torch only where a run needs it: the command line starts without it
    import torch


@dataclass(frozen=True)
class RunConfig:
    model: str
    data: Path
    out: Path | None = None
    method: str = "full"
    # data
    format: str = "auto"
    seq_len: int = 512
    pack: bool = False
    eval_data: Path | None = None
    eval_fraction: float = 0.1
    eval_every: int = 50
    skip_bad_lines: bool = False
    # optimisation
    lr: float = 2e-5
    schedule: str = "cosine"
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    batch_size: int = 16
    micro_batch_size: int | None = None  # None: the planner chooses
    epochs: float = 1.0
    max_steps: int | None = None
    optimizer: str = "adamw"
    # hift
    units_per_group: int | None = None  # None: the planner chooses
    groups: int | None = None  # alternative to units_per_group
    order: str = "bottom-up"
    switch_every: int = 1
    state_policy: str | None = None  # None: the planner chooses
    # sparse methods (sift, random, magnitude)
    sparsity: float | None = None  # fraction of each target weight that trains; None: the planner chooses
    targets: str = "all-linear"
    base_quant: str | None = None  # none | int8 | nf4; None: the planner chooses
    selection_batches: int = 1  # sift
    selection_score: str = "grad"  # sift: grad | grad2
    selection_passes: int | None = None  # sift; None: the planner chooses
    # structured methods (bitfit, lora, spafit): lowmem_ft/selections.py
    lora_rank: int = 8  # lora, spafit
    lora_alpha: float | None = None  # None: 2 × rank
    lora_dropout: float = 0.0
    cutoffs: str | None = None  # spafit "N1,N2"; None: the paper's 4 and 9 of 24 layers, scaled
    variant: str = "I"  # spafit: I | II
    add_biases: bool = False  # bitfit, spafit: zero-initialised biases on the decoder's linear layers
    freeze_layers: str | None = None  # bitfit, lora: decoder layers left out, e.g. "0-15"
    # streaming (hift and the sparse methods): decoder layers whose frozen weights stay in host memory
    stream: bool = False  # --stream: every layer (the plan's choice otherwise)
    streamed_layers: int | None = None  # None: the planner chooses
    # precision and device
    dtype: str = "auto"
    device: str = "auto"
    gradient_checkpointing: bool | None = None  # None: the planner chooses
    gpu_mem: str | None = None
    cpu_mem: str | None = None
    save_dtype: str = "auto"
    seed: int = 0
    # checkpoints and faults (they change nothing in the result, so a resume may change them)
    save_every: int = 0  # optimizer steps between checkpoints; 0: by time only
    save_every_minutes: float = 30.0  # 0: by steps only
    keep_checkpoints: int = 2
    max_bad_steps: int = 5  # NaN/Inf losses in a row before the job stops
    # model access
    allow_download: bool = False
    trust_remote_code: bool = False

    def validate(self, data_files: bool = True) -> None:
        """Every option's check, in one place (``run``, ``plan`` and ``resume`` all come here);
        ``data_files``: also that the data files can be read (``plan`` has none)."""
        from lowmem_ft.data import FORMAT_NAMES

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise UserError(message)

        # inf and nan pass every range check below (nan compares false to everything, inf is > 0),
        # and train a model into NaN that the job then marks done.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                need(False, f"--{f.name.replace('_', '-')} must be a finite number, got {value}")
        # Sizes are read only on the device they apply to: check them wherever they are given.
        from lowmem_ft.sizes import parse_size

        for flag, size in (("--gpu-mem", self.gpu_mem), ("--cpu-mem", self.cpu_mem)):
            if size is not None:
                parse_size(size, flag)

        need(
            self.method in METHOD_NAMES,
            f"--method {self.method!r} is not known; choose one of: {', '.join(METHOD_NAMES)}",
        )
        # A method-specific option given to a method that does not take it is an error, not ignored
        # (lowmem_ft/registry.py says which method takes which).
        for f in dataclasses.fields(self):
            if f.name in METHOD_OPTIONS and getattr(self, f.name) != f.default:
                takers = methods_taking(f.name)
                flag = "--" + f.name.replace("_", "-")
                need(
                    self.method in takers,
                    f"{flag} applies to --method {' / '.join(takers)}, not {self.method}"
                    + (" (their streamed weights are frozen)" if f.name == "stream" else ""),
                )
        need(
            self.format == "auto" or self.format in FORMAT_NAMES,
            f"--format {self.format!r} is not known; choose auto or one of: {', '.join(FORMAT_NAMES)}",
        )
        need(self.seq_len >= 8, f"--seq-len must be at least 8 tokens, got {self.seq_len}")
        need(0.0 <= self.eval_fraction < 1.0, f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        need(
            self.eval_every >= 0,
            f"--eval-every must be >= 0 (0 = only at start and end), got {self.eval_every}",
        )
        need(self.lr > 0, f"--lr must be positive, got {self.lr}")
        need(
            self.schedule in SCHEDULES,
            f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}",
        )
        need(0.0 <= self.warmup_ratio < 1.0, f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        need(0.0 <= self.min_lr_ratio <= 1.0, f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        need(self.grad_clip >= 0, f"--grad-clip must be >= 0 (0 disables clipping), got {self.grad_clip}")
        need(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}")
        if self.micro_batch_size is not None:  # None: the planner chooses
            need(
                self.micro_batch_size >= 1,
                f"--micro-batch-size must be at least 1, got {self.micro_batch_size}",
            )
        need(
            self.micro_batch_size is None or self.micro_batch_size <= self.batch_size,
            f"--micro-batch-size ({self.micro_batch_size}) cannot exceed --batch-size ({self.batch_size})",
        )
        need(
            self.optimizer in OPTIMIZERS,
            f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}",
        )
        need(self.order in ORDERS, f"--order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        need(self.switch_every >= 1, f"--switch-every must be at least 1 step, got {self.switch_every}")
        need(
            self.state_policy is None or self.state_policy in STATE_POLICIES,
            f"--state-policy must be one of {', '.join(STATE_POLICIES)}, got {self.state_policy!r}",
        )
        need(
            self.units_per_group is None or self.units_per_group >= 1, "--units-per-group must be at least 1"
        )
        need(self.groups is None or self.groups >= 1, "--groups must be at least 1")
        need(
            self.units_per_group is None or self.groups is None,
            "--units-per-group and --groups say the same thing; give one of them",
        )
        self._validate_sparse(need)
        self._validate_structured(need)
        need(
            not self.stream or self.gradient_checkpointing is not False,
            "--stream needs activation checkpointing (a streamed layer is rebuilt in the backward); "
            "drop --no-gradient-checkpointing",
        )
        need(self.epochs > 0, f"--epochs must be positive, got {self.epochs}")
        need(
            self.max_steps is None or self.max_steps >= 1,
            f"--max-steps must be at least 1, got {self.max_steps}",
        )
        need(
            self.dtype in ("auto", *DTYPE_NAMES),
            f"--dtype must be auto, fp32, bf16 or fp16, got {self.dtype!r}",
        )
        need(
            self.save_dtype in ("auto", *DTYPE_NAMES),
            f"--save-dtype must be auto, fp32, bf16 or fp16, got {self.save_dtype!r}",
        )
        need(
            re.fullmatch(r"auto|cpu|cuda(:(0|[1-9][0-9]*))?", self.device) is not None,
            f"--device must be auto, cpu, cuda or cuda:N (N counts the visible GPUs from 0), "
            f"got {self.device!r}",
        )
        if self.device.startswith("cuda"):
            import torch

            need(
                torch.cuda.is_available(),
                f"--device {self.device} was asked for but no CUDA device is visible; use --device cpu",
            )
            # N counts the devices CUDA shows (after CUDA_VISIBLE_DEVICES), as torch does.
            count = torch.cuda.device_count()
            shown = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
            need(
                (torch.device(self.device).index or 0) < count,
                f"--device {self.device} is not visible: CUDA shows {count} device(s), {shown} "
                "(CUDA_VISIBLE_DEVICES decides which)",
            )
        if data_files:
            self._validate_data_files(need)
        need(
            self.save_every >= 0, f"--save-every must be >= 0 steps (0 = by time only), got {self.save_every}"
        )
        need(
            self.save_every_minutes >= 0,
            f"--save-every-minutes must be >= 0 (0 = by steps only), got {self.save_every_minutes}",
        )
        need(
            self.keep_checkpoints >= 1,
            f"--keep-checkpoints must be at least 1 (the newest is always kept), got {self.keep_checkpoints}",
        )
        need(self.max_bad_steps >= 1, f"--max-bad-steps must be at least 1, got {self.max_bad_steps}")

    def _validate_data_files(self, need) -> None:
        need(not self.data.is_dir(), f"{self.data}: is a directory; expected a JSONL file")
        need(
            self.data.is_file() or not self.data.exists(),
            f"{self.data}: is not a regular file (a pipe or a device); save the data to a .jsonl file",
        )
        if self.eval_data is not None:
            need(self.eval_data.exists(), f"{self.eval_data}: no such file (given as --eval-data)")

    def _validate_sparse(self, need) -> None:
        from lowmem_ft.targets import parse_targets

        if self.sparsity is not None:
            need(
                0 < self.sparsity <= 1,
                f"--sparsity is the fraction of each weight that trains, in (0, 1], e.g. 0.01; "
                f"got {self.sparsity}",
            )
        need(
            self.base_quant is None or self.base_quant in QUANTS,
            f"--base-quant must be one of {', '.join(QUANTS)}, got {self.base_quant!r}",
        )
        need(
            self.selection_batches >= 1,
            f"--selection-batches must be at least 1, got {self.selection_batches}",
        )
        need(
            self.selection_score in SELECTION_SCORES,
            f"--selection-score must be grad (|sum of gradients|) or grad2 (sum of squares), "
            f"got {self.selection_score!r}",
        )
        need(
            self.selection_passes is None or self.selection_passes >= 1,
            f"--selection-passes must be at least 1, got {self.selection_passes}",
        )
        parse_targets(self.targets)

    def _validate_structured(self, need) -> None:

        method = self.method
        need(self.lora_rank >= 1, f"--lora-rank must be at least 1, got {self.lora_rank}")
        need(
            self.lora_alpha is None or self.lora_alpha > 0,
            f"--lora-alpha must be positive, got {self.lora_alpha}",
        )
        need(0 <= self.lora_dropout < 1, f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        need(self.variant in SPAFIT_VARIANTS, f"--variant must be I or II, got {self.variant!r}")
        need(
            method != "lora" or self.base_quant in (None, "none", "nf4"),
            f"--base-quant for --method lora is none or nf4 (QLoRA), got {self.base_quant!r}",
        )

    # -- derived values -------------------------------------------------------------------------
    def resolved_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def compute_dtype(self) -> torch.dtype:
        """The precision the forward and backward run in.

        On CPU the default is fp32 (bf16 autocast on CPU is slower than fp32 on most machines); on
        CUDA it is bf16 where the GPU supports it, because fp16 needs loss scaling and overflows.
        """
        import torch

        from lowmem_ft.precision import DTYPES

        if self.dtype != "auto":
            return DTYPES[self.dtype]
        device = self.resolved_device()
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32

    def to_json(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, saved: dict) -> RunConfig:
        """The configuration a job directory recorded (options added since then take defaults)."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in saved.items() if k in known}
        for key in ("data", "eval_data", "out"):
            if values.get(key) is not None:
                values[key] = Path(values[key])
        return cls(**values)
