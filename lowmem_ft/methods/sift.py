"""SIFT: train only the entries of each weight whose gradients matter most (Song et al., ICML 2024).

Every sparse method works the same way once its entries are chosen, and shares ``SparseIncrement``:

- the target linear weights (``--targets``) become ``SparseDeltaLinear`` layers
  (engine/sparse_delta.py): a frozen base, bf16 on a GPU or quantised to int8/NF4
  (``--base-quant``), plus fp32 values at k = rate·numel fixed flat int32 indices per weight;
- the optimizer (AdamW by default) sees only the values, so its state is 8 bytes per entry, and
  weight decay acts on the increment Δ, pulling the model back towards the base;
- dense weight gradients exist one at a time inside the backward, gathered at the indices and freed;
- the result is ``delta.safetensors`` (indices, values, and the base it applies to).

Subclasses choose the entries. SIFT chooses them from gradients: per weight, the top k of |Σg|
(``--selection-score grad``) or Σg² (``grad2``, Fisher-like, as Fu et al.'s SAM) over a window of
``--selection-batches`` micro-batches, which are only looked at, never trained on. The window's
running scores are fp32 and dense, so with a window of more than one micro-batch the targets are
scored in ``--selection-passes`` slices (planner's choice), each a full pass over the window; with
one micro-batch, each gradient is reduced to its top k as soon as it exists and no scores are kept.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from lowmem_ft.engine.sparse_delta import SparseDeltaLinear, wrap_linears
from lowmem_ft.methods.base import Method
from lowmem_ft.methods.optimizers import make_optimizer
from lowmem_ft.planner.accounting import SIFT_BYTES_PER_ENTRY, sparse_entries
from lowmem_ft.targets import match_targets

DEFAULT_SPARSITY = 0.01  # without a plan (an architecture the planner does not know)


class SparseIncrement(Method):
    """A fixed sparse mask over the target weights, trained with an optimizer over its values."""

    def weight_dtype(self, config) -> torch.dtype:
        return self.frozen_base_dtype(config)  # only the increment needs fp32, and it has it

    # -- setting up -------------------------------------------------------------------------------
    def place(self, model, config, device) -> None:
        from lowmem_ft.engine.streaming import place_model

        # A quantised base is made on the device, a layer at a time; an unquantised base that is
        # streamed must not visit the device in full, so it is wrapped where it is (the host).
        streaming, quantised = bool(config.streamed_layers), (config.base_quant or "none") != "none"
        self._wrap(model, config, device if quantised or not streaming else None)
        # The increments train: they stay on the device however many layers are streamed.
        resident = frozenset(id(layer.values) for layer in self.layers.values())
        self.streamer = place_model(model, device, config.streamed_layers or 0, resident)

    def setup(self, model, config) -> None:
        self.config = config
        self.rate = config.sparsity or DEFAULT_SPARSITY
        if not getattr(self, "layers", None):
            self._wrap(model, config, None)
        model.requires_grad_(False)
        for layer in self.layers.values():
            layer.values.requires_grad_(True)
        self.selected = False
        self._optimizer: torch.optim.Optimizer | None = None
        if not self.selection_batches(config):
            self._fix_entries({name: self.choose(name, layer) for name, layer in self.layers.items()})

    def _wrap(self, model, config, device) -> None:
        embed = model.get_input_embeddings()
        linear_names, other_names, tied_names = [], [], []
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                # A head tied to the embedding: an increment on it would change the embedding too.
                (tied_names if module.weight is embed.weight else linear_names).append(name)
            elif name and next(module.parameters(recurse=False), None) is not None:
                other_names.append(name)
        names = match_targets(linear_names, config.targets, other_names, tied_names)
        self.layers: dict[str, SparseDeltaLinear] = wrap_linears(
            model, names, config.base_quant or "none", device
        )

    def k_for(self, layer: SparseDeltaLinear) -> int:
        return sparse_entries(layer.weight_numel, self.rate)

    def choose(self, name: str, layer: SparseDeltaLinear) -> torch.Tensor:
        """Flat indices of the entries of ``layer`` that train (methods without a selection window)."""
        raise NotImplementedError

    def _fix_entries(self, indices: dict[str, torch.Tensor]) -> None:
        for name, layer in self.layers.items():
            # Sorted: gathers and scatters then walk memory in order.
            layer.set_entries(torch.sort(indices[name].to(torch.int64)).values)
        config = self.config
        self._optimizer = make_optimizer(
            config.optimizer, self.trainable_parameters(), config.lr, config.weight_decay, decay_1d=True
        )
        self.selected = True

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
        count = self.trainable_count()
        targeted = sum(layer.weight_numel for layer in self.layers.values())
        from lowmem_ft.hardware import format_bytes

        return (
            f"{count:,} trainable ({count / targeted:.2%} of {targeted:,} values in {len(self.layers)} "
            f"weights; {format_bytes(SIFT_BYTES_PER_ENTRY * count)} with indices, gradients and "
            f"{self.config.optimizer} state)"
        )

    # -- checkpoints and export -----------------------------------------------------------------------
    def changed_weights(self, model) -> dict[str, torch.Tensor]:
        return {}  # the base never changes; the increment is in state_dict

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
        config = self.config
        self._optimizer = make_optimizer(
            config.optimizer, self.trainable_parameters(), config.lr, config.weight_decay, decay_1d=True
        )
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
            **base_metadata(self.name, base, self.config),
            "sparsity": self.rate,
            "shapes": {
                f"{name}.weight": [layer.out_features, layer.in_features]
                for name, layer in self.layers.items()
            },
        }
        return save_delta(job_dir / DELTA_FILE, self.delta_entries(), meta)


class SIFT(SparseIncrement):
    name = "sift"

    def selection_batches(self, config) -> int:
        return 0 if getattr(self, "selected", False) else config.selection_batches

    def select(self, window: list[dict], backward: Callable[[dict], None]) -> str:
        if not window:
            raise ValueError("SIFT selection needs at least one micro-batch")
        passes = 1 if len(window) == 1 else max(1, min(self.config.selection_passes or 1, len(self.layers)))
        names = list(self.layers)
        chosen: dict[str, torch.Tensor] = {}
        for chunk in _balanced_slices(names, [self.layers[n].weight_numel for n in names], passes):
            scores: dict[str, torch.Tensor] = {}
            for i, batch in enumerate(window):
                last = i == len(window) - 1
                for name in chunk:
                    self.layers[name].on_dense_gradient = partial(self._score, name, scores, chosen, last)
                backward(batch)
            for name in chunk:
                self.layers[name].on_dense_gradient = None
        self._fix_entries(chosen)
        score = "|Σg|" if self.config.selection_score == "grad" else "Σg²"
        return (
            f"top {self.rate:.2%} of each weight by {score} over {len(window)} micro-batch"
            + ("es" if len(window) > 1 else "")
            + (f" in {passes} passes" if passes > 1 else "")
        )

    def _score(self, name, scores, chosen, last: bool, dense_grad: torch.Tensor) -> None:
        """Fold one micro-batch's dense gradient into the running score; on the window's last
        micro-batch, keep only the top-k positions and drop the dense score."""
        g = dense_grad.float()  # may be dense_grad itself: the backward discards it afterwards
        if self.config.selection_score == "grad2":
            g = g.square_()
        running = scores.pop(name, None)
        total = g if running is None else running.add_(g)
        if not last:
            scores[name] = total
            return
        score = total.abs_() if self.config.selection_score == "grad" else total
        k = self.k_for(self.layers[name])
        chosen[name] = torch.topk(score.reshape(-1), k, sorted=False).indices


def _balanced_slices(names: list[str], sizes: list[int], parts: int) -> list[list[str]]:
    """Split ``names`` in order into ``parts`` consecutive slices of similar total size."""
    total, slices, current, acc = sum(sizes), [], [], 0
    for name, size in zip(names, sizes, strict=True):
        current.append(name)
        acc += size
        if acc >= total * (len(slices) + 1) / parts and len(slices) < parts - 1:
            slices.append(current)
            current = []
    if current:
        slices.append(current)
    return slices
