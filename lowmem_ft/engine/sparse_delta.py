"""Linear layers with a frozen base weight and a trainable sparse increment: y = x·(W + Δ)ᵀ.

Δ has non-zero entries only at fixed flat positions ``indices`` (int32, on the compute device);
their ``values`` are an fp32 parameter of k entries, and the optimizer sees nothing else. That is
the whole memory saving of sparse fine-tuning, and it holds only if the dense weight gradient is
never kept. A custom autograd function makes sure of it:

- forward: builds W + Δ in the compute dtype (one transient dense tensor, freed after the matmul)
  and saves only the layer input, as a plain linear layer does; nothing dense is saved.
- backward: rebuilds W + Δ for the input gradient and frees it, then forms the dense weight
  gradient gᵀx, gathers it at ``indices`` into an fp32 gradient for ``values`` and frees it. At
  any moment at most one dense weight-sized tensor exists, whatever the number of layers.
  Gradient accumulation then happens in the k-entry ``values.grad``, not in dense buffers.

Because W + Δ is formed in every forward, the increment of step t is in effect in the forward of
step t+1 (the reference SIFT code merged it one backward late, and never merged the last one).
W + Δ is rounded once: the base entries at the indices are added to Δ in fp32, then cast.

The base may be quantised by bitsandbytes (``quant="int8"``: blockwise 8-bit, ``"nf4"``: 4-bit
NormalFloat); the forward then uses dequantise(W) + Δ. During selection (SIFT) the dense gradient
goes to a callback instead, which scores entries; no values exist yet.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from lowmem_ft.choices import BASE_QUANTS as QUANTS
from lowmem_ft.engine import NF4_BLOCKSIZE

INT8_BLOCKSIZE = 256  # absmax in fp32 per 256 weights: 1.016 bytes per weight


class FrozenWeight(torch.nn.Module):
    """The base weight of a layer, stored as given or quantised by bitsandbytes."""

    def __init__(self, weight: torch.Tensor, quant: str = "none"):
        super().__init__()
        if quant not in QUANTS:
            raise ValueError(f"unknown base quantisation {quant!r}")
        self.quant, self.shape, self.dtype = quant, weight.shape, weight.dtype
        if quant == "none":
            self.weight = torch.nn.Parameter(weight.detach(), requires_grad=False)
            return
        import bitsandbytes.functional as bnbf  # optional and heavy: only for a quantised base

        if quant == "int8":
            codes, self.quant_state = bnbf.quantize_blockwise(weight.detach(), blocksize=INT8_BLOCKSIZE)
        else:
            # Quantised flat (the same codes and block scales as the 2-D weight): bitsandbytes'
            # native CPU NF4 dequantiser (0.49+) assumes rows are whole blocks, and gets any weight
            # whose in_features is not a multiple of the block size wrong; one row always is.
            codes, self.quant_state = bnbf.quantize_4bit(
                weight.detach().reshape(-1), blocksize=NF4_BLOCKSIZE, quant_type="nf4"
            )
        # The quantisation state (absmax per block, code table) lives beside the codes on their
        # device; the layer is quantised where it computes and is not moved afterwards.
        self.register_buffer("codes", codes, persistent=False)

    def dense(self, dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
        """The base weight in ``dtype`` and whether it is a fresh tensor (free to modify in place)."""
        if self.quant == "none":
            weight = self.weight.to(dtype)
            return weight, weight is not self.weight
        import bitsandbytes.functional as bnbf

        if self.quant == "int8":
            weight = bnbf.dequantize_blockwise(self.codes, self.quant_state)
        else:
            weight = bnbf.dequantize_4bit(self.codes, self.quant_state)
        return weight.to(dtype).view(self.shape), True

    def nbytes(self) -> int:
        if self.quant == "none":
            return self.weight.numel() * self.weight.element_size()
        absmax = self.quant_state.absmax
        return self.codes.numel() * self.codes.element_size() + absmax.numel() * absmax.element_size()


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class _SparseDeltaLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, bias, layer):
        dtype = _compute_dtype(x)
        ctx.input_dtype, ctx.dtype, ctx.layer = x.dtype, dtype, layer
        x = x.to(dtype)
        weight = layer.effective_weight(dtype, values)
        with torch.autocast(x.device.type, enabled=False):
            out = F.linear(x, weight, None if bias is None else bias.to(dtype))
        ctx.save_for_backward(x, values)  # the input only, as nn.Linear saves: no dense weight
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, values = ctx.saved_tensors
        layer: SparseDeltaLinear = ctx.layer
        grad_out = grad_out.to(ctx.dtype)
        grad_x = grad_values = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = layer.effective_weight(ctx.dtype, values)
            grad_x = (grad_out @ weight).to(ctx.input_dtype)
            del weight  # freed before the dense weight gradient exists: one dense tensor at a time
        if ctx.needs_input_grad[1] and layer.wants_weight_gradient:
            g, inputs = grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1])
            # in the layout the weight is stored in, where the indices point
            dense_grad = inputs.T @ g if layer.transposed else g.T @ inputs
            grad_values = layer.take_weight_gradient(dense_grad)
            del dense_grad
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(layer.bias.dtype)
        return grad_x, grad_values, grad_bias, None


class SparseDeltaLinear(torch.nn.Module):
    """A frozen linear layer plus a sparse fp32 increment at fixed flat indices.

    The layer is an ``nn.Linear`` (weight (out, in)) or GPT-2's ``Conv1D`` (weight (in, out),
    ``transposed``); the base keeps the weight as stored, so the indices, the delta and a merge all
    point into the checkpoint's own layout."""

    def __init__(self, linear: torch.nn.Module, quant: str = "none"):
        super().__init__()
        self.transposed = type(linear).__name__ == "Conv1D"
        rows, cols = linear.weight.shape
        self.out_features, self.in_features = (cols, rows) if self.transposed else (rows, cols)
        device = linear.weight.device
        self.base = FrozenWeight(linear.weight, quant)
        self.bias = linear.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        # Empty until entries are chosen; requires grad so that the backward reaches this layer
        # during selection even where nothing below it trains.
        self.values = torch.nn.Parameter(torch.zeros(0, device=device))
        self.register_buffer("indices", torch.zeros(0, dtype=torch.int32, device=device))
        # Selection: a callback that receives each dense weight gradient (None: not scoring).
        self.on_dense_gradient: Callable[[torch.Tensor], None] | None = None

    @property
    def weight_numel(self) -> int:
        return self.in_features * self.out_features

    def set_entries(self, indices: torch.Tensor, values: torch.Tensor | None = None) -> None:
        """Fix the trainable entries (flat positions into the weight); values start at zero."""
        device = self.indices.device
        self.indices = indices.to(device, torch.int32)
        data = (
            torch.zeros(len(indices), device=device) if values is None else values.to(device, torch.float32)
        )
        self.values = torch.nn.Parameter(data)

    @property
    def wants_weight_gradient(self) -> bool:
        return self.on_dense_gradient is not None or self.values.numel() > 0

    def take_weight_gradient(self, dense_grad: torch.Tensor) -> torch.Tensor | None:
        if self.on_dense_gradient is not None:
            self.on_dense_gradient(dense_grad)
            return None
        return dense_grad.reshape(-1)[self.indices].float()

    def effective_weight(self, dtype: torch.dtype, values: torch.Tensor | None = None) -> torch.Tensor:
        """W + Δ in ``dtype``: the base's entries at the indices plus Δ in fp32, rounded once."""
        values = self.values if values is None else values
        weight, fresh = self.base.dense(dtype)
        if values.numel() == 0:
            return weight.T if self.transposed else weight
        flat = weight.reshape(-1) if fresh else weight.reshape(-1).clone()
        flat[self.indices] = (flat[self.indices].float() + values.detach()).to(dtype)
        return flat.view(self.base.shape).T if self.transposed else flat.view(self.base.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SparseDeltaLinearFunction.apply(x, self.values, self.bias, self)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"base={self.base.quant}, entries={self.values.numel()}"
        )


def wrap_linears(
    model: torch.nn.Module, names: list[str], quant: str = "none", device: torch.device | None = None
) -> dict[str, SparseDeltaLinear]:
    """Replace the named linear modules (``nn.Linear``, ``Conv1D``) with ``SparseDeltaLinear``, one at a time.

    With ``device``, each weight is moved there and quantised there before the next one is
    touched, so the full-precision model never has to fit on the device.
    """
    wrapped = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        if device is not None:
            linear.to(device)
        layer = SparseDeltaLinear(linear, quant)
        setattr(parent, child, layer)
        del linear  # the unquantised weight is freed here, before the next layer is quantised
        wrapped[name] = layer
    return wrapped
