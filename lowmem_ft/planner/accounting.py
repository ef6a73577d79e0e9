"""Byte accounting: what each component of a training step costs, from the model's shape alone.

The activation formulas are derived for Hugging Face Llama-style blocks (RMSNorm that upcasts to
fp32, rotary attention through SDPA, SwiGLU MLP) and checked against traces of the recipe's real
training step on fake tensors (tests/test_planner.py). Per decoder layer and per token, with
``e`` the compute element size (2 for bf16/fp16, 4 for fp32):

    weights in the compute dtype:   2·(4h + e·h) + 6·e·h + 4·e·i + 4·heads + e·s + 8
        (each RMSNorm keeps its fp32 input and its normalised output; q, rotate-half(q), k, v and
         the attention output; gate, SiLU(gate), up and their product; the attention's fp32
         log-sum-exp; a copy of the causal mask row)
    fp32 weights under autocast:   34h + 8·i + 4·heads + 2·s + 8, plus a 16-bit copy of every
        matmul weight, which autocast keeps alive from the forward to the backward
    activation checkpointing:      only the layer input (the residual stream) is kept,
        4h in fp32 or e·h; one layer's full activations are rebuilt at a time in the backward

The GPT formula s·b·h·(34 + 5·a·s/h) assumes a 4h GELU MLP, LayerNorm and materialised attention
scores; it does not describe these models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lowmem_ft.engine import NF4_BLOCKSIZE
from lowmem_ft.planner.shapes import ModelShape

GiB = 1024**3
# Bytes per trainable SIFT entry: fp32 value, int32 index, fp32 Adam m and v, fp32 gradient.
SIFT_BYTES_PER_ENTRY = 4 + 4 + 8 + 4
# Bytes per weight of a bitsandbytes-quantised base (engine/sparse_delta.py): blockwise int8 with an
# fp32 absmax per 256 weights, NF4 with an fp32 absmax per 64. "none" is the compute dtype's size.
QUANT_BYTES = {"int8": 1.0 + 4 / 256, "nf4": 0.5 + 4 / NF4_BLOCKSIZE}
# Optimizer-state bytes per parameter on the device: AdamW's fp32 m and v, whatever the policy (the
# optimizer runs in fp32; a group stored in 8 bits is expanded to fp32 on arrival).
DEVICE_STATE_BYTES = 8
# ... and waiting in host memory, by state policy: fp32 m and v, or bitsandbytes 8-bit m and v (one
# byte per value plus an fp32 scale per block of 256, engine/state_store.py); nothing for drop.
HOST_STATE_BYTES = {"keep": 8, "drop": 0, "keep-8bit": 2 * (1 + 4 / 256)}


def sparse_entries(numel: int, rate: float) -> int:
    """Trainable entries of one weight tensor at ``rate`` (the planner and the sparse methods agree)."""
    return min(numel, max(1, math.ceil(rate * numel)))


@dataclass(frozen=True)
class Precision:
    """How a method holds weights and computes."""

    weight_bytes: int  # bytes per weight element as stored for training
    compute_bytes: int  # e: element size of activations (2 for bf16/fp16, 4 for fp32)

    @property
    def autocast(self) -> bool:
        """fp32 weights computed in 16 bits: autocast makes (and keeps) 16-bit weight copies."""
        return self.weight_bytes == 4 and self.compute_bytes == 2


def layer_activation_bytes(shape: ModelShape, seq_len: int, tokens: int, p: Precision) -> int:
    """Saved activations of one decoder layer for ``tokens`` = micro-batch × seq_len tokens."""
    h, i, a, e = shape.hidden, shape.intermediate, shape.heads, p.compute_bytes
    if p.autocast:
        per_token = 34 * h + 8 * i + 4 * a + 2 * seq_len + 8
    else:
        per_token = 2 * (4 * h + e * h) + 6 * e * h + 4 * e * i + 4 * a + e * seq_len + 8
    return per_token * tokens


def frozen_layer_activation_bytes(shape: ModelShape, seq_len: int, tokens: int, p: Precision) -> int:
    """A layer on the gradient path whose weights are frozen (HiFT, above the active group): it
    keeps only what the gradient of its *input* needs — the norms' fp32 inputs, what the attention
    kernel saves, the MLP's gate/SiLU/up — not the inputs of its linear layers:

        8h + 4·e·h + 3·e·i + 4·heads + e·s + 8     bytes per token (measured exactly, fp32 and bf16)
    """
    h, i, a, e = shape.hidden, shape.intermediate, shape.heads, p.compute_bytes
    return (8 * h + 4 * e * h + 3 * e * i + 4 * a + e * seq_len + 8) * tokens


def hift_group_activation_bytes(
    shape: ModelShape, seq_len: int, micro_batch: int, p: Precision, checkpointing: bool, groups: list[range]
) -> list[tuple[int, int]]:
    """Activations of each HiFT group when it trains: nothing below the active group is kept, its
    own layers keep everything, the frozen layers above keep what their input gradient needs.
    Per group: (bytes kept from the forward into the backward, bytes of the one layer rebuilt at a
    time in the backward with checkpointing). The rebuilt layer comes after the loss's backward has
    freed its vocab-sized tensors, so the two never meet (traced)."""
    tokens = seq_len * micro_batch
    trained = layer_activation_bytes(shape, seq_len, tokens, p)
    frozen = frozen_layer_activation_bytes(shape, seq_len, tokens, p)
    kept = checkpoint_bytes(shape, tokens, p)
    n_units = shape.layers + 2  # embedding, layers, head
    per_group = []
    for units in groups:  # each group's units, in order (methods/hift/plan.py: hift_groups)
        first = units[0]
        layers_in_group = sum(1 for u in units if 1 <= u <= shape.layers)
        lowest_layer = max(first - 1, 0)  # unit u >= 1 is layer u-1
        layers_above = shape.layers - lowest_layer - layers_in_group
        rebuilt = 0
        if checkpointing:
            # each layer's input, and the last layer's output, which the final norm keeps (traced);
            # one layer rebuilt in the backward: trained, or frozen on the path; none for the head
            rebuilt = trained if layers_in_group else frozen if layers_above else 0
            stored = (layers_in_group + layers_above + 1) * kept
        else:
            stored = layers_in_group * trained + layers_above * frozen
        head_trains = n_units - 1 in units
        per_group.append((stored + hift_outside_layers_bytes(shape, seq_len, tokens, head_trains), rebuilt))
    return per_group


def sift_activation_bytes(
    shape: ModelShape, seq_len: int, micro_batch: int, p: Precision, checkpointing: bool
) -> int:
    """Activations of a sparse-increment run: every weight is frozen, so a layer keeps what its
    input gradient needs (as a frozen HiFT layer) plus the inputs of its linear layers, which the
    sparse weight gradients need — the attention and MLP inputs and the MLP's inner product:

        frozen layer + e·(2h + i)     bytes per token (measured exactly, fp32 and bf16)

    Nothing below the first layer trains, so its input norm keeps nothing (4h less), unless the
    layers are checkpointed and keep only their inputs anyway."""
    tokens = seq_len * micro_batch
    outside = hift_outside_layers_bytes(shape, seq_len, tokens, head_trains=False)
    if checkpointing:
        return (shape.layers + 1) * checkpoint_bytes(shape, tokens, p) + outside  # + the last output
    extra_inputs = p.compute_bytes * (2 * shape.hidden + shape.intermediate) * tokens
    layer = frozen_layer_activation_bytes(shape, seq_len, tokens, p) + extra_inputs
    return shape.layers * layer + outside - 4 * shape.hidden * tokens


def hift_outside_layers_bytes(shape: ModelShape, seq_len: int, tokens: int, head_trains: bool) -> int:
    """Final norm (its fp32 input; its output too when it trains), the loss's log-probabilities, and
    what the whole stack shares: the causal mask (one byte per position pair) and the rotary
    cos/sin tables."""
    shifted = tokens * (seq_len - 1) // seq_len
    norm = 8 if head_trains else 4
    micro_batch = tokens // seq_len
    shared = shared_by_the_stack_bytes(shape, seq_len, micro_batch)
    return norm * shape.hidden * tokens + 4 * shape.vocab * shifted + (2 * seq_len + 4) * micro_batch + shared


def shared_by_the_stack_bytes(shape: ModelShape, seq_len: int, micro_batch: int) -> int:
    """Alive for the whole forward and backward, though no single layer's saved tensors hold them
    (traced on the whole loop): the causal mask, a byte per position pair, and the rotary cos/sin."""
    return micro_batch * seq_len * seq_len + 2 * 4 * seq_len * (shape.hidden // shape.heads)


def checkpoint_bytes(shape: ModelShape, tokens: int, p: Precision) -> int:
    """What a checkpointed layer keeps: its input, the residual stream (fp32 when weights are)."""
    return (4 if p.weight_bytes == 4 else p.compute_bytes) * shape.hidden * tokens


def outside_layers_activation_bytes(shape: ModelShape, seq_len: int, tokens: int, p: Precision) -> int:
    """Embedding output, final norm, and the fp32 log-probabilities the loss keeps for backward."""
    residual = 10 if p.autocast else 12
    shifted = tokens * (seq_len - 1) // seq_len  # the last position predicts nothing
    return (
        residual * shape.hidden * tokens + 4 * shape.vocab * shifted + (2 * seq_len + 4) * (tokens // seq_len)
    )


def loss_transient_bytes(shape: ModelShape, tokens: int, p: Precision) -> int:
    """While the loss runs: the logits in the compute dtype and their fp32 copy, beside what is kept."""
    return (p.compute_bytes + 4) * shape.vocab * tokens


def autocast_copy_bytes(shape: ModelShape, p: Precision, layers: int | None = None) -> int:
    """16-bit copies of matmul weights made by autocast and kept until the backward has used them."""
    if not p.autocast:
        return 0
    n_layers = shape.layers if layers is None else layers
    per_layer = shape.layer_units[0].linear_params if shape.layer_units else 0
    return 2 * (per_layer * n_layers + shape.vocab * shape.hidden)


def activation_bytes(
    shape: ModelShape, seq_len: int, micro_batch: int, p: Precision, checkpointing: bool
) -> int:
    """All activations alive at the end of the forward pass (incl. autocast copies), whole model."""
    tokens = seq_len * micro_batch
    per_layer = (
        checkpoint_bytes(shape, tokens, p)
        if checkpointing
        else layer_activation_bytes(shape, seq_len, tokens, p)
    )
    copies = autocast_copy_bytes(shape, p, layers=0 if checkpointing else None)
    return shape.layers * per_layer + outside_layers_activation_bytes(shape, seq_len, tokens, p) + copies


def recompute_bytes(shape: ModelShape, seq_len: int, micro_batch: int, p: Precision) -> int:
    """With checkpointing, the backward rebuilds one layer at a time: its activations and copies."""
    tokens = seq_len * micro_batch
    return (
        layer_activation_bytes(shape, seq_len, tokens, p)
        + autocast_copy_bytes(shape, p, layers=1)
        - (2 * shape.vocab * shape.hidden if p.autocast else 0)
    )
