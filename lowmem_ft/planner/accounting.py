"""Byte accounting: what each component of a training step costs, from the model's shape alone.

The activation formulas are measured per architecture on fake tensors of the recipe's real
training step (planner/layer_keeps.py: every coefficient exact, layer by layer) and checked against
traces of whole steps (tests/test_planner.py, tests/test_shapes_architectures.py). For Llama-style
blocks (RMSNorm that upcasts to fp32, rotary attention through SDPA, SwiGLU MLP), per decoder layer
and per token, with ``e`` the compute element size (2 for bf16/fp16, 4 for fp32):

    weights in the compute dtype:   2·(4h + e·h) + 6·e·h + 4·e·i + 4·heads + e·s + 8
        (each RMSNorm keeps its fp32 input and its normalised output; q, rotate-half(q), k, v and
         the attention output; gate, SiLU(gate), up and their product; the attention's fp32
         log-sum-exp; a copy of the causal mask row)
    fp32 weights under autocast:   34h + 8·i + 4·heads + 2·s + 8, plus a 16-bit copy of every
        matmul weight, which autocast keeps alive from the forward to the backward
    activation checkpointing:      only the layer input (the residual stream) is kept,
        4h in fp32 or e·h; one layer's full activations are rebuilt at a time in the backward

The other architectures differ where their blocks do: LayerNorm with a mean and inverse deviation
per token (GPT-2, GPT-NeoX, OPT), an MLP of two layers (GELU or ReLU in between), fused q/k/v
projections, Gemma's four norms and Gemma-2's eager attention, which keeps every head's scores.
The textbook GPT formula s·b·h·(34 + 5·a·s/h) assumes materialised attention scores, which only
Gemma-2 (and GPT-2 with attention dropout, on a CPU) has.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lowmem_ft.engine import NF4_BLOCKSIZE
from lowmem_ft.planner.layer_keeps import layer_keeps
from lowmem_ft.planner.shapes import ModelShape

GiB = 1024**3
# Bytes per trainable SIFT entry: fp32 value, int32 index, fp32 Adam m and v, fp32 gradient.
SIFT_BYTES_PER_ENTRY = 4 + 4 + 8 + 4
# Bytes per weight of a bitsandbytes-quantised base (engine/sparse_delta.py): blockwise int8 with an
# fp32 absmax per 256 weights, NF4 with an fp32 absmax per 64. "none" is the compute dtype's size.
QUANT_BYTES = {"int8": 1.0 + 4 / 256, "nf4": 0.5 + 4 / NF4_BLOCKSIZE}


def qlora_nf4_bytes(numel: int) -> int:
    """Bytes of one weight tensor of QLoRA's base (engine/quantised.py: bitsandbytes' Params4bit,
    which quantises its block scales again by default, QLoRA's "double quantisation"): the 4-bit
    codes, one 8-bit absmax per block of 64, an fp32 scale per 256 blocks, and per tensor the fp32
    code tables of both (256 and 16 values) and an offset. 0.516 bytes per weight, where NF4 with
    fp32 block scales (QUANT_BYTES, the sparse methods' base) takes 0.5625."""
    blocks = math.ceil(numel / NF4_BLOCKSIZE)
    return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / 256) + 4 * (256 + 16 + 1)


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
    on_gpu: bool = True  # on a CPU, attention with dropout keeps its scores (layer_keeps.py)

    @property
    def autocast(self) -> bool:
        """fp32 weights computed in 16 bits: autocast makes (and keeps) 16-bit weight copies."""
        return self.weight_bytes == 4 and self.compute_bytes == 2


def layer_activation_bytes(shape: ModelShape, seq_len: int, tokens: int, p: Precision) -> int:
    """Saved activations of one decoder layer for ``tokens`` = micro-batch × seq_len tokens."""
    return layer_keeps(shape, seq_len, p).trained * tokens


def frozen_layer_activation_bytes(shape: ModelShape, seq_len: int, tokens: int, p: Precision) -> int:
    """A layer on the gradient path whose weights are frozen (HiFT, above the active group): it
    keeps only what the gradient of its *input* needs — the norms' inputs, what the attention
    kernel saves, the MLP's activation — not the inputs of its linear layers (LayerKeeps.frozen)."""
    return layer_keeps(shape, seq_len, p).frozen * tokens


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
        outside = hift_outside_layers_bytes(shape, seq_len, tokens, head_trains, p)
        # fp32 weights under autocast (HiFT on several ranks): the 16-bit copy of a weight on the
        # gradient path is kept for the backward, which needs it for its input's gradient: every
        # layer's from the group's lowest up (made again a layer at a time when checkpointed), and
        # the head's while anything below it trains. Traced: without them, sharded HiFT's plan was
        # 17% below its loop (Qwen2.5-1.5B, N = 4, no checkpointing), 0.9% with checkpointing.
        on_path = 0 if checkpointing else layers_in_group + layers_above
        copies = autocast_copy_bytes(shape, p, on_path) if first < n_units - 1 else 0
        per_group.append((stored + outside + copies, rebuilt))
    return per_group


def sift_activation_bytes(
    shape: ModelShape, seq_len: int, micro_batch: int, p: Precision, checkpointing: bool
) -> int:
    """Activations of a sparse-increment run: every weight is frozen, so a layer keeps what its
    input gradient needs (as a frozen HiFT layer) plus the inputs of its linear layers, which the
    sparse weight gradients need — in Llama the attention and MLP inputs and the MLP's inner
    product (LayerKeeps.sparse):

        frozen layer + e·(2h + i)     bytes per token (measured exactly, fp32 and bf16)

    Nothing below the first layer trains, so its input norm keeps nothing (LayerKeeps.first: 4h
    less in Llama), unless the layers are checkpointed and keep only their inputs anyway."""
    tokens = seq_len * micro_batch
    outside = hift_outside_layers_bytes(shape, seq_len, tokens, False, p)
    if checkpointing:
        return (shape.layers + 1) * checkpoint_bytes(shape, tokens, p) + outside  # + the last output
    keeps = layer_keeps(shape, seq_len, p)
    return (shape.layers * keeps.sparse - keeps.first) * tokens + outside


@dataclass(frozen=True)
class LayerTrains:
    """What a structured selection (BitFit, LoRA, SPAFIT) trains in one decoder layer."""

    norm_widths: tuple[int, ...] = ()  # per trained norm weight, the values per token it normalises
    adapter_inputs: tuple[int, ...] = ()  # input width of each LoRA-adapted linear layer
    terms: bool = False  # a norm weight or a bias trains in it


# Bytes per normalised value that a norm keeps for its weight's gradient, by architecture, on top of
# what it keeps frozen: Llama's RMSNorm its normalised input in the compute dtype (e), Gemma's its
# fp32 normalised input (the (1 + weight) scale is applied in fp32), a LayerNorm nothing (its input,
# mean and inverse deviation, which it keeps frozen, give the weight's gradient too). Traced on the
# recipe's loop (4- and 8-layer models of each architecture); tests/test_looptrace.py checks Llama,
# Gemma-2 and GPT-2.
def _norm_keeps(model_type: str, e: int) -> int:
    return {"gemma2": 4, "gemma3_text": 4, "gpt_neox": 0, "opt": 0, "gpt2": 0}.get(model_type, e)


def structured_activation_bytes(
    shape: ModelShape,
    seq_len: int,
    micro_batch: int,
    p: Precision,
    checkpointing: bool,
    trains: dict[int, LayerTrains],
    rank: int,
    final_norm_trains: bool,
) -> int:
    """Activations of a frozen base with a few trained tensors (``trains``: per decoder layer).

    Nothing below the lowest layer that trains is on the gradient path: it keeps nothing, even
    when checkpointed (non-reentrant checkpointing saves nothing for a layer without gradients).
    From there up, a layer keeps what a frozen one does (LayerKeeps.frozen), and, per token,

        + e·width     per trained norm weight (Llama's RMSNorm; Gemma's: 4·width; LayerNorm: 0)
        + e·(in + r)  per LoRA adapter: its own 16-bit copy of its input (peft casts the input to the
                      fp32 adapter's dtype, autocast casts it back, a new tensor per adapter) and
                      the rank-r output of A

    less LayerKeeps.first in the lowest layer (its input needs no gradient; not where a trained
    LayerNorm keeps it anyway). A bias keeps nothing.
    In fp32 (no autocast) the adapters read their linear layer's own input, so this is an upper
    bound there."""
    tokens = seq_len * micro_batch
    lowest = min(trains, default=shape.layers)
    on_path = shape.layers - lowest
    e = p.compute_bytes
    outside = hift_outside_layers_bytes(shape, seq_len, tokens, False, p)
    if final_norm_trains:
        outside += _norm_keeps(shape.model_type, e) * shape.hidden * tokens
    if checkpointing:  # each layer's input from the lowest up, and the last layer's output
        return (on_path + 1) * checkpoint_bytes(shape, tokens, p) * (on_path > 0) + outside
    keeps = layer_keeps(shape, seq_len, p)
    norm_width = sum(sum(t.norm_widths) for t in trains.values())
    adapters = sum(e * (width + rank) for t in trains.values() for width in t.adapter_inputs)
    per_token = on_path * keeps.frozen + _norm_keeps(shape.model_type, e) * norm_width + adapters
    # Gemma's trained norms also keep their fp32 (1 + weight) scale: once, not per token (traced)
    scales = 4 * norm_width if shape.model_type.startswith("gemma") else 0
    # The lowest layer's input needs no gradient (LayerKeeps.first less), but a LayerNorm keeps its
    # input, mean and inverse deviation whenever its weight or bias trains (traced)
    first = (
        keeps.first if on_path and not (_norm_keeps(shape.model_type, e) == 0 and trains[lowest].terms) else 0
    )
    return (per_token - first) * tokens + scales + outside


def hift_outside_layers_bytes(
    shape: ModelShape, seq_len: int, tokens: int, head_trains: bool, p: Precision
) -> int:
    """Final norm (its fp32 input; its output too when it trains), the loss's log-probabilities (and
    soft-capped logits), and what the whole stack shares: the causal mask (one byte per position
    pair) and the rotary cos/sin tables."""
    shifted = tokens * (seq_len - 1) // seq_len
    norm = 8 if head_trains else 4
    micro_batch = tokens // seq_len
    shared = shared_by_the_stack_bytes(shape, seq_len, micro_batch)
    logits = 4 * shape.vocab * shifted + softcapped_logits_bytes(shape, tokens, p)
    return norm * shape.hidden * tokens + logits + (2 * seq_len + 4) * micro_batch + shared


def softcapped_logits_bytes(shape: ModelShape, tokens: int, p: Precision) -> int:
    """Gemma-2 soft-caps its logits (cap · tanh(logits / cap)): the tanh's output, kept for its
    backward, is one more vocabulary-sized tensor per token (traced)."""
    return p.compute_bytes * shape.vocab * tokens if shape.logit_softcapping else 0


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
    ) + softcapped_logits_bytes(shape, tokens, p)


def loss_transient_bytes(shape: ModelShape, tokens: int, p: Precision) -> int:
    """While the loss runs: the logits in the compute dtype and their fp32 copy, beside what is kept."""
    return (p.compute_bytes + 4) * shape.vocab * tokens


def evaluation_bytes(shape: ModelShape, tokens: int) -> int:
    """Evaluation's peak beside what persists between steps: its forward keeps nothing for a backward,
    so the loss's vocabulary-sized tensors are the largest. In 16 bits: the logits, their shifted copy
    (slicing off the last position makes it non-contiguous) and its fp32 copy, 2 + 2 + 4 bytes; then
    that fp32 copy and its log-probabilities, 4 + 4 (fp32 compute: the logits and their copy, then the
    copy and the log-probabilities, 8 too). Traced: Llama-3-8B, HiFT over the layers at 8 GiB, planned
    0.7% below its evaluation without it."""
    return 8 * shape.vocab * tokens


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
