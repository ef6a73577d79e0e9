"""The interface every fine-tuning method implements.

A method is a *policy over the model's parameters*: it decides which parameters train (and, for
methods like HiFT, which train at *this* step), owns the optimizer that updates them, carries any
state of its own for checkpoints, and writes the result. The recipe in ``lowmem_ft/train.py``
calls these hooks in a fixed order and never branches on the method's name:

    method = build_method(config)          the resolved run's options, read once
    method.place(model, device)            once: put the weights on the compute device
    method.setup(model)                    once, before training
    method.select(window, backward)        once, if method.selection_batches() > 0
    for step in range(max_steps):
        method.begin_step(step)            e.g. HiFT picks the active group, prefetches its state
        ... forward / backward over micro-batches ...
        method.reduce_gradients()          e.g. all-reduce across ranks (none on one GPU)
        clip(method.trainable_parameters())
        method.optimizer.step(); method.optimizer.zero_grad()
        method.end_step(step)              e.g. HiFT writes the group's optimizer state back
    method.export(model, tokenizer, job_dir, save_dtype, base)   (finish.py: rank 0, on a disk checked first)

For checkpoints (train_state.py, checkpoint.py) a method gives ``changed_weights(model)`` (the parameters
training may have changed; the rest is reloaded from the base) and ``state_dict()`` (its optimizer
state and anything else it needs to continue exactly); ``load_state_dict`` puts them back after
``setup``, and the next ``begin_step`` must then behave as in a run that never stopped.

Moving tensors between devices (streaming, offloaded optimizer state) belongs to the engine, not
to the method; a method asks the engine, it does not copy tensors itself.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lowmem_ft.distributed.group import ONE
from lowmem_ft.distributed.ranks import SHARDED_METHODS
from lowmem_ft.methods.optimizers import STATE_BYTES_PER_VALUE
from lowmem_ft.registry import METHOD_SPECS

if TYPE_CHECKING:
    from lowmem_ft.config import RunConfig
    from lowmem_ft.models import ResolvedModel


class Method(ABC):
    name: str  # its line in lowmem_ft/registry.py says what it is and what it takes

    def __init__(self, config: RunConfig):
        # The resolved run (frozen): the user's options with the plan's choices filled in. Every
        # piece of state a method has is created here or in setup(), never on first use.
        self.config = config
        self.streamer = None  # engine.streaming.LayerStreamer, when decoder layers are streamed
        # The job's ranks (distributed/group.py); one unless the run has several (--nproc)
        self.group = ONE

    @property
    def summary(self) -> str:
        return METHOD_SPECS[self.name].summary

    @property
    def exports_full_model(self) -> bool:
        """False: export writes something smaller (a sparse delta, an adapter) that `lowmem-ft
        export --merge` turns into a full model."""
        return METHOD_SPECS[self.name].result == "model"

    optimizer: torch.optim.Optimizer

    def weight_dtype(self) -> torch.dtype:
        """The dtype the model's weights are loaded in for this method."""
        return torch.float32

    def frozen_base_dtype(self) -> torch.dtype:
        """For methods whose base is frozen: the compute precision is enough to store it (bf16 or
        fp16 on a GPU, fp32 on a CPU); what trains carries its own fp32."""
        compute = self.config.compute_dtype()
        return compute if compute in (torch.bfloat16, torch.float16) else torch.float32

    def place(self, model: torch.nn.Module, device: torch.device) -> None:
        """Move the model to the compute device, except what the plan streams (the frozen weights
        of ``config.streamed_layers`` decoder layers stay in host memory). Methods that store
        weights differently (SIFT's quantised base) convert them here one tensor at a time, so the
        full-precision model never has to fit on the device."""
        from lowmem_ft.engine.streaming import place_model

        if self.group.several and self.name in SHARDED_METHODS:
            return  # sharded over the ranks as it was loaded, each rank's shards on its device
        self.streamer = place_model(model, device, self.config.streamed_layers or 0)

    @abstractmethod
    def setup(self, model: torch.nn.Module) -> None:
        """Mark trainable parameters (``requires_grad``) and build ``self.optimizer`` (or, for a
        method that chooses its entries from data, build it in ``select``)."""

    def selection_batches(self) -> int:
        """Micro-batches the method needs to see before training starts (0: none)."""
        return 0

    def select(self, window: list[dict | None], backward: Callable[[dict | None], None]) -> str:
        """Choose what trains from ``window``; ``backward(batch)`` runs the loss's backward for one
        micro-batch and must not be followed by an update. Returns a line for the run's output."""
        return ""

    def begin_step(self, step: int) -> None:  # noqa: B027 (optional hook)
        """Called before the first micro-batch of optimizer step ``step``."""

    def reduce_gradients(self) -> None:  # noqa: B027 (optional hook)
        """Called after the backward of the last micro-batch, before clipping and the update."""

    def progress(self) -> dict[str, str]:
        """Extra fields for the progress bar (e.g. HiFT's active group)."""
        return {}

    def end_step(self, step: int) -> None:  # noqa: B027 (optional hook)
        """Called after the optimizer update of step ``step`` (not for a step whose update was
        skipped because its loss or gradient was NaN/Inf)."""

    @abstractmethod
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters that receive gradients in the current step (used for clipping and counts)."""

    def trainable_count(self) -> int:
        """Number of values the method can change over the whole run."""
        return sum(p.numel() for p in self.trainable_parameters())

    def describe_trainable(self) -> str:
        """What trains, for the run header."""
        return f"{self.trainable_count():,} trainable"

    def changed_weights(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The model's parameters that training may have changed, by name, for checkpoints (the
        rest is reloaded from the base model on resume). Default: all of them."""
        return dict(model.named_parameters())

    def checkpoint_bytes(self, model: torch.nn.Module) -> int:
        """What a checkpoint of this run holds at the least once every value that trains has its
        optimizer state: the changed weights and that state. Checked against the free disk before
        step 1 (start.py); the small things (data order, random states, counters) are left out."""
        weights = sum(t.numel() * t.element_size() for t in self.changed_weights(model).values())
        return weights + math.ceil(self.trainable_count() * self.state_bytes_per_trained_value())

    def state_bytes_per_trained_value(self) -> float:
        """The bytes a checkpoint's method state holds per trainable value: its optimizer's state."""
        return STATE_BYTES_PER_VALUE[self.config.optimizer]

    def state_dict(self) -> dict:
        """Method state for checkpoints (optimizer state included). Tensors may be references to
        live state, as in torch's own state_dicts: copy them before training on."""
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])

    # -- checkpoints of a sharded model (several ranks, FSDP2) ------------------------------------
    def sharded_state(self, model: torch.nn.Module) -> tuple[dict, dict]:
        """What a checkpoint of several ranks holds: (the method's plain state, for the manifest;
        the tree of sharded tensors every rank writes its part of, through DCP). Default: the
        model's weights and the optimizer's state, as torch.distributed.checkpoint lays them out."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(model, self.optimizer)
        return {}, {"model": model_state, "optimizer": optimizer_state}

    def load_sharded_state(self, model: torch.nn.Module, plain: dict, read: Callable[[dict], None]) -> None:
        """Restore what ``sharded_state`` saved: ``read(tree)`` fills a tree of the same keys with
        this rank's part, from any number of ranks (DCP reshards)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optimizer_state = get_state_dict(model, self.optimizer)
        read({"model": model_state, "optimizer": optimizer_state})
        set_state_dict(model, self.optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)

    def export(
        self, model: torch.nn.Module, tokenizer, job_dir: Path, save_dtype: torch.dtype, base: ResolvedModel
    ) -> Path:
        """Write the fine-tuned result into the job directory; the default is a full Hugging Face
        model directory ``job_dir/model``. ``base`` is the model the run started from."""
        from lowmem_ft.models.saving import save_hf_model

        return save_hf_model(model, tokenizer, job_dir / "model", save_dtype, base.weights_dir)
