"""HiFT: full-parameter fine-tuning one group of units at a time (Liu et al., arXiv 2401.15207).

The model's units (embedding, each decoder layer, final norm + head; see models/units.py) form
groups of ``units_per_group`` consecutive units. One group trains per optimizer step (or per
``switch_every`` steps, as in BAdam) and the groups take turns in a fixed order: bottom-up,
top-down, or a seeded random permutation fixed for the run.

Why it is cheap:
- gradients and optimizer state exist only for the active group; the other groups' optimizer
  state waits in host memory (engine/state_store.py) and is copied in when their turn comes;
- only the active group's parameters require grad, so the units *below* it see inputs that need
  no gradient and autograd records nothing for them: no stored activations, and the backward
  stops at the lowest active unit. Units above it stay on the gradient path with frozen weights.

Each group has its own optimizer, so its step counter advances only when it trains (HiFT keeps
state across visits; ``drop`` restarts it on each visit, as BAdam does). The learning-rate schedule
belongs to the recipe and counts optimizer steps of the whole run.

With several ranks (--nproc) FSDP2 shards the model as for `full` (distributed/fsdp.py), with fp32
weights computed under autocast: each rank holds 1/N of every weight, of the active group's
gradients and state, and of every waiting group's state in its host memory. Only the active group
requires grad, so FSDP gathers every layer the backward passes through but reduce-scatters the
active group's gradients alone. The updates are the one-process run's.
"""

from __future__ import annotations

import math
import random

import torch
from torch.distributed.tensor import DTensor

from lowmem_ft.distributed.sharded import reshard
from lowmem_ft.engine.master_weights import MasterWeights
from lowmem_ft.engine.shards import local_part, shaped_like
from lowmem_ft.engine.state_store import OptimizerStateStore
from lowmem_ft.methods.base import Method
from lowmem_ft.methods.hift.options import HiFTOptions
from lowmem_ft.methods.hift.plan import hift_groups
from lowmem_ft.methods.optimizers import make_optimizer
from lowmem_ft.models.units import model_units
from lowmem_ft.planner.accounting import DEVICE_STATE_BYTES, HOST_STATE_BYTES


def visit_order(n_groups: int, order: str, seed: int, cycle: int = 0) -> list[int]:
    """The groups in the order they train during ``cycle`` (each cycle visits every group once)."""
    if order == "bottom-up":
        return list(range(n_groups))
    if order == "top-down":
        return list(reversed(range(n_groups)))
    # random: one order from the seed; random-cycle (BAdam): a new one every cycle, from the seed and
    # the cycle alone. Python's generator, not torch's: no tensor is made (under the memory trace's
    # fake tensors a permutation's values would not be real).
    cycle = cycle if order == "random-cycle" else 0
    return random.Random(seed * 1_000_003 + cycle).sample(range(n_groups), n_groups)


class HiFT(Method):
    name = "hift"

    def __init__(self, config):
        super().__init__(config)
        self.options: HiFTOptions = config.method_options
        self.switch_every = self.options.switch_every
        # Its own generator for stochastic rounding: reproducible, saved in checkpoints, and it
        # leaves the global RNG to everything else (made on the model's device in setup).
        self.generator: torch.Generator | None = None
        self.groups: list[list[torch.nn.Parameter]] = []  # from setup(): the model's units, grouped
        self.group_layers: list[list[int]] = []
        self.group_names: list[str] = []
        self.order: list[int] = []
        self.store: OptimizerStateStore | None = None
        self.active: int | None = None
        self.position = 0  # the active group's place in the current cycle, from 1 (begin_step)
        self.masters: MasterWeights | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._all_params: list[torch.nn.Parameter] = []
        self._model: torch.nn.Module | None = None  # from setup()

    @property
    def summary(self) -> str:
        if self.options.trained_units == "layers":  # (the registry's line says all parameters)
            return (
                "the decoder layers (embedding and head frozen, as BAdam), one group of layers per step, "
                "optimizer state of the others in host memory"
            )
        return super().summary

    def weight_dtype(self) -> torch.dtype:
        if self.group.several:  # sharded fp32 weights, as `full` (module doc): no masters to keep
            return torch.float32
        # bf16 weights on a GPU that computes in bf16 (fp32 masters for the active group only);
        # fp32 everywhere else, with fp16 compute under autocast like `full`.
        return torch.bfloat16 if self.config.compute_dtype() == torch.bfloat16 else torch.float32

    def setup(self, model) -> None:
        config = self.config
        # With several ranks the model came sharded (distributed/fsdp.load_sharded), and the groups
        # below hold the sharded parameters (never with keep-8bit: RunConfig refuses it).
        self._model = model
        units = model_units(model)
        # The planner's grouping (plan.py): every unit, or the decoder layers only (BAdam)
        groups = hift_groups(len(units), self.options.units_per_group or 1, self.options.trained_units)
        self.groups = [[p for k in group for p in units[k].params] for group in groups]
        # Decoder layers of each group (unit k is layer k-1; units 0 and -1 are embedding and head):
        # a streamed layer gets device memory of its own while its group trains.
        self.group_layers = [[k - 1 for k in group if 0 < k < len(units) - 1] for group in groups]
        self.group_names = [
            units[group[0]].name + (f"..{units[group[-1]].name}" if len(group) > 1 else "")
            for group in groups
        ]
        self.order = visit_order(len(self.groups), self.options.order, config.seed)
        device = next(model.parameters()).device
        self.store = OptimizerStateStore(self.options.state_policy or "keep", device)
        self.generator = torch.Generator(device).manual_seed(config.seed)
        self._all_params = [p for group in self.groups for p in group]
        model.requires_grad_(False)

    # -- which group trains when ------------------------------------------------------------------
    def group_at(self, step: int) -> int:
        cycle, position = divmod(step // self.switch_every, len(self.order))
        if self.options.order != "random-cycle":
            return self.order[position]
        return visit_order(len(self.order), "random-cycle", self.config.seed, cycle)[position]

    def begin_step(self, step: int) -> None:
        group = self.group_at(step)
        self.position = (step // self.switch_every) % len(self.order) + 1  # in this cycle, for progress
        if group != self.active:
            if self.active is not None:
                self._deactivate()
            # Sharded (several ranks): a weight FSDP holds gathered keeps the requires_grad it was
            # gathered with, so a group would train, or not, a step late. Sharded, they are gathered
            # again at the next forward with the new group's flags.
            reshard(self._model)
            self._activate(group)
        if self.group_at(step + 1) != group:
            self.store.prefetch(self.group_at(step + 1))  # copies in while this step computes

    def _activate(self, group: int) -> None:
        if self.streamer is not None:
            for layer in self.group_layers[group]:
                self.streamer.pin(layer)
        params = self.groups[group]
        for p in params:
            p.requires_grad_(True)
        self.masters = MasterWeights(params, self.generator) if _needs_masters(params) else None
        trained = self.masters.masters if self.masters else params
        self._optimizer = make_optimizer(
            self.config.optimizer, trained, self.config.lr, self.config.weight_decay
        )
        self.store.load(group, self._optimizer, trained)
        self.active = group

    def _deactivate(self) -> None:
        trained = self.trainable_parameters()
        self.store.save(self.active, self._optimizer, trained)
        if self.masters:
            self.masters.remove_hooks()
        for p in self.groups[self.active]:
            p.requires_grad_(False)
            p.grad = None
        if self.streamer is not None:  # its updated weights go back to their host copies
            for layer in self.group_layers[self.active]:
                self.streamer.unpin(layer)
        self._optimizer, self.masters, self.active = None, None, None

    # -- the update -------------------------------------------------------------------------------
    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._optimizer

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        if self.active is None:
            return []
        return self.masters.masters if self.masters else self.groups[self.active]

    def end_step(self, step: int) -> None:
        if self.masters:
            self.masters.masters_to_params()

    def trainable_count(self) -> int:
        return sum(p.numel() for p in self._all_params)

    def progress(self) -> dict[str, str]:
        if self.active is None:
            return {}
        return {"group": f"{self.position}/{len(self.groups)} {self.group_names[self.active]}"}

    # -- checkpoints --------------------------------------------------------------------------------
    def checkpoint_bytes(self, model) -> int:
        """The weights a checkpoint keeps, every waiting group's optimizer state as the state policy
        stores it (fp32, 8-bit, or none), and the active group's as its optimizer holds it (fp32),
        with its fp32 masters when the weights are 16-bit. Counted with the smallest group active:
        a figure that every checkpoint of the run reaches, whichever group it is taken in."""
        weights = sum(t.numel() * t.element_size() for t in self.changed_weights(model).values())
        fp32_state = self.state_bytes_per_trained_value()
        # (the planner's bytes of each policy are AdamW's, DEVICE_STATE_BYTES in fp32: in proportion)
        stored = fp32_state * HOST_STATE_BYTES[self.store.policy] / DEVICE_STATE_BYTES
        sizes = [sum(p.numel() for p in group) for group in self.groups]
        smallest = min(range(len(sizes)), key=sizes.__getitem__)
        masters = 4 if _needs_masters(self.groups[smallest]) else 0
        active = sizes[smallest] * (fp32_state - stored + masters)
        return weights + math.ceil(sum(sizes) * stored + active)

    def state_dict(self) -> dict:
        """Everything needed to continue exactly: the order, which group is active, every group's
        optimizer state (the active one from its optimizer, the others from the host store), and
        the active group's fp32 masters (they carry precision the bf16 weights do not)."""
        trained = self.trainable_parameters()
        states = {g: self.store.export(g) for g in range(len(self.groups)) if g != self.active}
        if self.active is not None:
            states[self.active] = [dict(self._optimizer.state.get(p, {})) for p in trained]
        return {
            "order": list(self.order),
            "active": self.active,
            "group_states": {g: st for g, st in states.items() if st},  # groups not visited yet have none
            # references, not copies: the checkpoint writer copies to the host one shard at a time,
            # and a clone here would cost the active group's fp32 size again on the GPU
            "masters": [m.detach() for m in self.masters.masters] if self.masters else None,
            "rounding_rng": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        if self.active is not None:
            self._deactivate()
        self.order = list(state["order"])
        self.generator.set_state(state["rounding_rng"])
        active = state["active"]
        group_states = state["group_states"]
        for group in [g for g in group_states if g != active]:
            self.store.put(group, group_states.pop(group))  # popped: one copy of a state at a time
        # The active group is activated again now (the store holds nothing for it), and its state
        # goes straight back to its optimizer as it was (through the store it would be dropped or
        # rounded to 8 bits mid-visit). It then leaves through the store at the next switch,
        # exactly as in a run that never stopped.
        if active is not None:
            self._activate(active)
            self._restore_active(group_states.get(active, []), state["masters"])

    # -- checkpoints of several ranks (FSDP2) ------------------------------------------------------
    def sharded_state(self, model) -> tuple[dict, dict]:
        """The order, the active group and which state each group holds go in the manifest; the
        weights and every group's state (each rank's shard, from its optimizer or its host store) go
        through DCP as DTensors sharded as their parameters, so they reshard to any number of ranks."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        states: dict[int, list[dict]] = {}
        for g, params in enumerate(self.groups):
            if g == self.active:
                states[g] = [dict(self._optimizer.state.get(p, {})) for p in params]
            else:  # as stored: this rank's shard, on the host ([] for a group not visited yet)
                stored = self.store.export(g)
                pairs = zip(params, stored, strict=True) if stored else []
                states[g] = [{k: shaped_like(p, v) for k, v in st.items()} for p, st in pairs]
        layout = {
            str(g): [{k: [str(v.dtype), v.ndim == 0] for k, v in st.items()} for st in group_states]
            for g, group_states in states.items()
            if any(group_states)
        }
        plain = {
            "order": list(self.order), "active": self.active, "layout": layout,
            "rounding_rng": self.generator.get_state(),
        }  # fmt: skip
        groups = {g: {str(i): st for i, st in enumerate(states[int(g)]) if st} for g in layout}
        return plain, {"model": get_model_state_dict(model), "groups": groups}

    def load_sharded_state(self, model, plain: dict, read) -> None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        if self.active is not None:
            self._deactivate()
        self.order = list(plain["order"])
        self.generator.set_state(plain["rounding_rng"])
        active = plain["active"]
        device = next(model.parameters()).device

        def empty(param, where, dtype: str, scalar: bool) -> torch.Tensor:
            """A tensor for this rank's part of a state tensor of ``param`` to be read into."""
            dtype = getattr(torch, dtype.removeprefix("torch."))
            if scalar:  # a step count: where the optimizer keeps it (fused AdamW: with its parameter)
                return torch.zeros((), dtype=dtype, device=where)
            shard = param.to_local() if isinstance(param, DTensor) else param
            return shaped_like(param, torch.zeros(shard.shape, dtype=dtype, device=where))

        model_state = get_model_state_dict(model)
        read({"model": model_state})
        set_model_state_dict(model, model_state)
        del model_state
        active_state: dict[str, dict] = {}
        # One group at a time: host memory holds a group's state twice only while it is stored.
        for g, group_layout in plain["layout"].items():
            params = self.groups[int(g)]
            # The active group's state goes to its device, the others' wait in host memory.
            where = device if int(g) == active else "cpu"
            saved = {
                str(i): {k: empty(params[i], where, *spec) for k, spec in param_layout.items()}
                for i, param_layout in enumerate(group_layout)
                if param_layout
            }
            read({"groups": {g: saved}})
            if int(g) == active:
                active_state = saved
            else:
                states = [saved.get(str(i), {}) for i in range(len(params))]
                self.store.put(int(g), [{k: local_part(v) for k, v in st.items()} for st in states])
        if active is not None:
            self._activate(active)
            for i, p in enumerate(self.trainable_parameters()):
                if str(i) in active_state:
                    self._optimizer.state[p] = active_state[str(i)]

    def _restore_active(self, states: list[dict], masters: list[torch.Tensor] | None) -> None:
        for p, st in zip(self.trainable_parameters(), states, strict=True):
            if st:
                self._optimizer.state[p] = {
                    k: v.to(p.device) if isinstance(v, torch.Tensor) else v for k, v in st.items()
                }
        if masters is not None and self.masters is not None:
            with torch.no_grad():
                for m, saved in zip(self.masters.masters, masters, strict=True):
                    m.copy_(saved)


def _needs_masters(params: list[torch.nn.Parameter]) -> bool:
    """16-bit weights train through fp32 masters (engine/master_weights.py): an update smaller than a
    bf16 step would otherwise be lost."""
    return any(p.dtype in (torch.bfloat16, torch.float16) for p in params)
