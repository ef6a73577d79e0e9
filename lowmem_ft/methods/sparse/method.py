"""The sparse methods' one engine: a fixed sparse mask over the target weights, trained as an fp32
increment on a frozen base. SIFT, random and magnitude differ only in how they choose the entries,
and each gives ``SparseIncrement`` a chooser (sift/, random/, magnitude/) rather than subclassing it.

- the target linear weights (``--targets``) become ``SparseDeltaLinear`` layers
  (engine/sparse_delta.py): a frozen base, bf16 on a GPU or quantised to int8/NF4
  (``--base-quant``), plus fp32 values at k = rate·numel fixed flat int32 indices per weight;
- the optimizer (AdamW by default) sees only the values, so its state is 8 bytes per entry, and
  weight decay acts on the increment Δ, pulling the model back towards the base;
- dense weight gradients exist one at a time inside the backward, gathered at the indices and freed;
- the result is ``delta.safetensors`` (indices, values, and the base it applies to).

With several ranks (--nproc) they run data-parallel: each rank scores its share of SIFT's selection
window, the scores are summed over the ranks, and every rank trains rank 0's entries; the values'
gradients are summed over ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch

from lowmem_ft.engine.sparse_delta import SparseDeltaLinear, wrap_linears
from lowmem_ft.methods.base import Method
from lowmem_ft.methods.optimizers import make_optimizer
from lowmem_ft.methods.sparse.options import SparseOptions
from lowmem_ft.models.units import is_linear
from lowmem_ft.planner.accounting import SIFT_BYTES_PER_ENTRY, sparse_entries
from lowmem_ft.targets import match_targets

if TYPE_CHECKING:
    from lowmem_ft.config import RunConfig

DEFAULT_SPARSITY = 0.01  # without a plan (an architecture the planner does not know)

Layers = dict[str, SparseDeltaLinear]
Backward = Callable[[dict], None]


class EntryChooser(Protocol):
    """Chooses which entries of each target weight train."""

    def window_batches(self) -> int:
        """Micro-batches it must look at first (0: it chooses without data)."""
        ...

    def choose(
        self,
        layers: Layers,
        k_for: Callable[[SparseDeltaLinear], int],
        window: list[dict | None],
        backward: Backward,
        sum_over_ranks: Callable[[torch.Tensor], None],
    ) -> tuple[dict[str, torch.Tensor], str]:
        """Flat indices of the ``k_for(layer)`` entries of each layer that train, and how they were
        chosen (for the run's output: "by |Σg| over 1 micro-batch"). ``backward(batch)`` runs the
        loss's backward over one micro-batch of ``window`` (never followed by an update; None: a
        pass that adds nothing, for a rank whose share of the window is one short); choosers
        without a window get none. ``sum_over_ranks(scores)``: sums a tensor of scores over the
        ranks in place, where each rank looked at its share of the window (a no-op on one)."""
        ...


class SparseIncrement(Method):
    """A fixed sparse mask over the target weights, trained with an optimizer over its values."""

    def __init__(self, name: str, config: RunConfig, chooser: EntryChooser):
        super().__init__(config)
        self.name = name
        self.chooser = chooser
        self.options: SparseOptions = config.method_options
        self.rate = self.options.sparsity or DEFAULT_SPARSITY
        self.layers: Layers = {}  # target name -> its wrapped layer, from place() (or setup())
        self.selected = False  # entries fixed (chosen, or restored from a checkpoint)
        self._optimizer: torch.optim.Optimizer | None = None

    def weight_dtype(self) -> torch.dtype:
        return self.frozen_base_dtype()  # only the increment needs fp32, and it has it

    # -- setting up -------------------------------------------------------------------------------
    def place(self, model, device) -> None:
        from lowmem_ft.engine.streaming import place_model

        # A quantised base is made on the device, a layer at a time; an unquantised base that is
        # streamed must not visit the device in full, so it is wrapped where it is (the host).
        config = self.config
        streaming, quantised = bool(config.streamed_layers), (self.options.base_quant or "none") != "none"
        self._wrap(model, device if quantised or not streaming else None)
        # The increments train: they stay on the device however many layers are streamed.
        resident = frozenset(id(layer.values) for layer in self.layers.values())
        self.streamer = place_model(model, device, config.streamed_layers or 0, resident)

    def setup(self, model) -> None:
        if not self.layers:  # not placed (a model already where it computes)
            self._wrap(model, None)
        model.requires_grad_(False)
        for layer in self.layers.values():
            layer.values.requires_grad_(True)
        if not self.chooser.window_batches():
            self._fix_entries(self.chooser.choose(self.layers, self.k_for, [], _no_backward, _sum)[0])

    def reduce_gradients(self) -> None:
        """With several ranks: data-parallel, the values' gradients summed over the ranks (each
        rank's loss is already divided by the whole global batch's target tokens)."""
        if self.group.several:
            for layer in self.layers.values():
                if layer.values.grad is None:  # (every rank must send the same tensors)
                    layer.values.grad = torch.zeros_like(layer.values)
            self.group.sum_tensors([layer.values.grad for layer in self.layers.values()])

    def _wrap(self, model, device) -> None:
        embed = model.get_input_embeddings()
        linear_names, other_names, tied_names = [], [], []
        for name, module in model.named_modules():
            if is_linear(module):
                # A head tied to the embedding: an increment on it would change the embedding too.
                (tied_names if module.weight is embed.weight else linear_names).append(name)
            elif name and next(module.parameters(recurse=False), None) is not None:
                other_names.append(name)
        names = match_targets(linear_names, self.options.targets, other_names, tied_names)
        self.layers = wrap_linears(model, names, self.options.base_quant or "none", device)

    def k_for(self, layer: SparseDeltaLinear) -> int:
        return sparse_entries(layer.weight_numel, self.rate)

    def selection_batches(self) -> int:
        return 0 if self.selected else self.chooser.window_batches()

    def select(self, window: list[dict | None], backward: Backward) -> str:
        def sum_over_ranks(scores: torch.Tensor) -> None:
            self.group.sum_tensors([scores])

        indices, how = self.chooser.choose(self.layers, self.k_for, window, backward, sum_over_ranks)
        self._fix_entries(indices)
        return f"top {self.rate:.2%} of each weight {how}"

    def _fix_entries(self, indices: dict[str, torch.Tensor]) -> None:
        # Several ranks train the same entries: rank 0's. Every rank chose from the same summed
        # scores (or the same seed and weights), so they agree already; sending rank 0's makes sure
        # a difference in the last bit of a score cannot make one rank train other entries.
        indices = self.group.broadcast(indices)
        for name, layer in self.layers.items():
            # Sorted: gathers and scatters then walk memory in order.
            layer.set_entries(torch.sort(indices[name].to(torch.int64)).values)
        self._optimizer = self._make_optimizer()
        self.selected = True

    def _make_optimizer(self) -> torch.optim.Optimizer:
        config = self.config
        return make_optimizer(
            config.optimizer, self.trainable_parameters(), config.lr, config.weight_decay, decay_1d=True
        )

    # -- training -----------------------------------------------------------------------------------
    @property
    def optimizer(self) -> torch.optim.Optimizer:
        if self._optimizer is None:
            raise RuntimeError("entries are not chosen yet: call select() before training")
        return self._optimizer

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [layer.values for layer in self.layers.values()]

    def trainable_count(self) -> int:
        return sum(self.k_for(layer) for layer in self.layers.values())

    def describe_trainable(self) -> str:
        from lowmem_ft.sizes import format_bytes

        count = self.trainable_count()
        targeted = sum(layer.weight_numel for layer in self.layers.values())
        return (
            f"{count:,} trainable ({count / targeted:.2%} of {targeted:,} values in {len(self.layers)} "
            f"weights; {format_bytes(SIFT_BYTES_PER_ENTRY * count)} with indices, gradients and "
            f"{self.config.optimizer} state)"
        )

    # -- checkpoints and export -----------------------------------------------------------------------
    def changed_weights(self, model) -> dict[str, torch.Tensor]:
        return {}  # the base never changes; the increment is in state_dict

    def state_bytes_per_trained_value(self) -> float:
        """Each entry's int32 index and fp32 value are method state too, beside the optimizer's."""
        return 4 + 4 + super().state_bytes_per_trained_value()

    def state_dict(self) -> dict:
        return {
            "selected": self.selected,
            "entries": {
                name: {"indices": layer.indices, "values": layer.values.detach()}  # references; see base
                for name, layer in self.layers.items()
            },
            "optimizer": self._optimizer.state_dict() if self._optimizer else None,
        }

    def load_state_dict(self, state: dict) -> None:
        if not state["selected"]:
            return  # selection had not finished: it runs again, deterministically
        for name, layer in self.layers.items():
            saved = state["entries"][name]
            layer.set_entries(saved["indices"], saved["values"])
        self._optimizer = self._make_optimizer()
        self._optimizer.load_state_dict(state["optimizer"])
        self.selected = True

    def delta_entries(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per weight (by its name in the model's state dict): indices and fp32 values."""
        return {
            f"{name}.weight": (layer.indices, layer.values.detach()) for name, layer in self.layers.items()
        }

    def export(self, model, tokenizer, job_dir, save_dtype, base):
        from lowmem_ft.delta import DELTA_FILE, save_delta
        from lowmem_ft.results import base_metadata

        meta = {
            **base_metadata(self.name, base, self.options, self.config.trust_remote_code),
            "sparsity": self.rate,
            "shapes": {
                f"{name}.weight": list(layer.base.shape)  # as stored (GPT-2's Conv1D: in, out)
                for name, layer in self.layers.items()
            },
        }
        return save_delta(job_dir / DELTA_FILE, self.delta_entries(), meta)


def _no_backward(batch: dict) -> None:
    raise RuntimeError("a chooser without a selection window ran a backward")


def _sum(scores: torch.Tensor) -> None:
    """No window, no scores to sum (a chooser that chooses without data)."""
