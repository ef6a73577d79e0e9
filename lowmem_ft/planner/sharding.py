"""What one rank holds when FSDP2 shards the model over N ranks (--nproc; distributed/fsdp.py).

The model is sharded as `full` and `hift` run it: one ``fully_shard`` per decoder layer, then the
root (the embedding, the final norm and the head), fp32 weights computed under autocast. A rank
keeps 1/N of every weight, gradient and optimizer state for the whole run. Beside its shards,
measured on torch's fake process group through the recipe's own loop (looptrace.py):

- the root's weights, gathered in full at the first forward and kept until its backward ends
  (FSDP2 does not free the root after the forward, its backward would gather it again at once);
  at the start of each forward (the next micro-batch's too: the backward freed them) they are
  gathered again, and FSDP2 keeps the all-gather's output buffer beside the weights copied out of
  it until the first layer's gather is done: the root twice, for a moment (root_regather_bytes);
- two decoder layers gathered at once: the one computing and the next, prefetched; in the forward,
  for a moment, three: FSDP2 keeps the layer below's all-gather buffer until the next layer's
  weights are copied out (layers_forward_bytes); and fewer at some moments (GATHERED_BY_MOMENT);
- in the backward, each layer's gradients in full until they are reduce-scattered to the shards,
  two layers' at once (one reducing while the next is made), and the head's full gradient, which
  waits for the root's reduce-scatter at the end of the backward; a layer frees its activations as
  it makes its gradients (layers_backward_bytes). Checkpointed, the layer whose gradients are being
  made is the one rebuilt (rebuilt_beside_gradients).

The estimators (methods/full/plan.py, methods/hift/plan.py) count these at the moments of
types.Estimate, two of which exist only here: the forward and the backward through the decoder
layers.
"""

from __future__ import annotations

import math

from lowmem_ft.planner.accounting import (
    Precision,
    autocast_copy_bytes,
    checkpoint_bytes,
    frozen_layer_activation_bytes,
    layer_activation_bytes,
    shared_by_the_stack_bytes,
    softcapped_logits_bytes,
)
from lowmem_ft.planner.shapes import ModelShape

# What of the root (first) and of the two decoder layers (second) the loop holds gathered, by moment,
# where that is not all of them (traced, per storage: Llama-2-7B's and Llama-3-8B's width through four
# layers, N = 8). Every layer is freed after its forward, and the root keeps its weights from the
# forward into the backward; the root's pre-backward gathers the top layer (the head's gradient is
# made beside it), and the root is freed at the end of the backward, before the optimizer step.
GATHERED_BY_MOMENT = {
    "end of forward": (1, 0),
    "start of backward": (1, 0),
    "head's gradient": (1, 1),
    "optimizer step": (0, 0),
    "end of step": (0, 0),
}


def shard(numel: int, ranks: int) -> int:
    """A rank's part of ``numel`` elements."""
    return math.ceil(numel / ranks)


def layer_params(shape: ModelShape) -> int:
    return shape.largest_layer_params


def root_params(shape: ModelShape) -> int:
    """The embedding, the final norm and the head: what the root's ``fully_shard`` holds."""
    return shape.params - sum(u.params for u in shape.layer_units)


def root_regather_bytes(shape: ModelShape, seq_len: int, micro_batch: int) -> int:
    """The root's all-gather buffer, alive beside its gathered weights at the start of a forward,
    the embedding's fp32 output, and the causal mask and rotary tables the layers share (traced:
    Qwen2.5-7B HiFT, N = 4 at 24 GiB, was planned 1.9% below its loop without the first two; its
    and Llama-3-8B's 48 GiB plans 0.002% below without the third)."""
    tokens = seq_len * micro_batch
    shared = shared_by_the_stack_bytes(shape, seq_len, micro_batch)
    return 4 * root_params(shape) + 4 * shape.hidden * tokens + shared


def gathered_bytes(shape: ModelShape) -> int:
    """fp32 weights gathered in full beside the shards: the root's for the whole step, and two
    decoder layers' (computing, prefetched)."""
    return 4 * (root_params(shape) + 2 * layer_params(shape))


def unsharded_gradient_bytes(shape: ModelShape, head_tensors: int = 1, layers: int = 2) -> int:
    """Full fp32 gradients waiting to be reduce-scattered: ``head_tensors`` vocabulary-sized ones
    (the head's, through the backward: it waits for the root's reduce-scatter), and those of up to
    two of ``layers`` trained decoder layers at once."""
    return 4 * head_tensors * shape.vocab * shape.hidden + 4 * min(2, layers) * layer_params(shape)


def rebuilt_beside_gradients(shape: ModelShape, rebuilt: int, tokens: int, p: Precision) -> int:
    """The end of a checkpointed backward, beside two layers' gathered weights and two layers' full
    gradients (sharding.unsharded_gradient_bytes): the layer whose gradients are being made was
    rebuilt, and frees its activations as it makes them, so the larger of the two is alive, not
    both; with the residual stream's fp32 gradient into and out of the layer, and under autocast one
    weight's 16-bit gradient before its cast to fp32. Traced (Llama-2-7B's width, HiFT over groups of
    three, N = 4): counting both put the plan 8% above its loop; the larger alone, 0.3% below it
    (Mistral-7B's 16 and 24 GiB plans, 0.004% below, without the 16-bit gradient)."""
    cast = p.compute_bytes * shape.largest_layer_linear if p.autocast else 0
    return max(0, rebuilt - 4 * layer_params(shape)) + 2 * 4 * shape.hidden * tokens + cast


def freed_before_the_layers_bytes(
    shape: ModelShape, seq_len: int, tokens: int, p: Precision, copy_kept: bool = True
) -> int:
    """Activations the backward has freed by the time it reaches the decoder layers, and the forward
    has not made yet when it runs through them: the loss's fp32 log-probabilities (and soft-capped
    logits) and the head's 16-bit autocast copy (kept where something below the head trains)."""
    shifted = tokens * (seq_len - 1) // seq_len
    copy = 2 * shape.vocab * shape.hidden if p.autocast and copy_kept else 0
    return 4 * shape.vocab * shifted + softcapped_logits_bytes(shape, tokens, p) + copy


def head_gradient_bytes(
    shape: ModelShape, seq_len: int, tokens: int, p: Precision, copy_kept: bool = True
) -> int:
    """The head's weight gradient, the first the backward makes, beside the activations (one decoder
    layer gathered, GATHERED_BY_MOMENT): the loss's log-probabilities are freed by then. Under
    autocast its matmul makes a 16-bit gradient beside the logits' 16-bit gradient and the head's
    16-bit copy (among the activations where ``copy_kept``: something below the head trains); both
    are gone when it is cast to the fp32 gradient. Traced (Llama-2-7B's width through four layers,
    full, N = 8); counting them all, Qwen2.5-7B's and Llama-3-8B's plans were 5-6% above their loops."""
    shifted = tokens * (seq_len - 1) // seq_len
    logits = 4 * shape.vocab * shifted + softcapped_logits_bytes(shape, tokens, p)
    head, e = shape.vocab * shape.hidden, p.compute_bytes
    if not p.autocast:
        return e * (shape.vocab * tokens + head) - logits
    copy = e * head if copy_kept else 0
    hidden_gradient = 2 * 4 * shape.hidden * tokens  # what the head's backward passes down, and its cast
    return e * head + max(e * shape.vocab * tokens, 4 * head - copy) - logits + hidden_gradient


def layer_kept_bytes(
    shape: ModelShape, seq_len: int, tokens: int, p: Precision, checkpointing: bool, trained: bool = True
) -> int:
    """What one decoder layer on the gradient path keeps from its forward for its backward: its
    activations (a frozen layer's fewer) and 16-bit weight copies, or only its input when checkpointed."""
    if checkpointing:
        return checkpoint_bytes(shape, tokens, p)
    copies = autocast_copy_bytes(shape, p, layers=1) - (2 * shape.vocab * shape.hidden if p.autocast else 0)
    keeps = layer_activation_bytes if trained else frozen_layer_activation_bytes
    return keeps(shape, seq_len, tokens, p) + copies


def layers_forward_bytes(shape: ModelShape, alive: int, kept: int, residual: int) -> int:
    """The forward through the decoder layers, beside what persists (two layers gathered): FSDP2 keeps
    the layer below's all-gather buffer until the next layer's weights are copied out of their own,
    so at the top layer three layers' weights are gathered, beside every activation below it and the
    top layer's input (``residual``: the residual stream). ``alive``: the activations of the step
    less the loss's; ``kept``: the top layer's, its input among them, which it makes once the buffer
    below is freed. Traced per storage (Llama-2-7B's width through 12 layers, HiFT over the
    embedding and the three layers above it, N = 4): this moment is the loop's peak there."""
    layer = 4 * layer_params(shape)
    return alive - kept + max(residual + layer, kept)


def layers_backward_bytes(
    shape: ModelShape,
    alive: int,
    kept: int,
    rebuilt: int,
    tokens: int,
    trained_layers: int,
    ranks: int,
    p: Precision,
) -> int:
    """The backward through the trained decoder layers, from the highest, beside what persists (two
    layers gathered: the one computing, the next prefetched) and the summed gradients. ``alive``: the
    activations when it reaches the highest trained layer; ``kept``: what a layer keeps of them (its
    input alone when checkpointed); ``rebuilt``: the layer a checkpointed backward rebuilds (0: none).

    A layer frees what it kept as it makes its full fp32 gradients, the MLP's first: at most its
    whole gradients, or the MLP's beside all it kept but the MLP's 16-bit weight copies; with one
    weight's 16-bit gradient before its cast and the residual stream's fp32 gradient into and out of
    the layer (rebuilt: rebuilt_beside_gradients). The next layer down does the same while the
    highest's gradients wait for their reduce-scatter and its shard of them is made. Traced per
    storage (Llama-2-7B's and Qwen2.5-7B's width through four layers, full, N = 8): the loop's peak
    is the second layer's backward, a moment the plan did not have."""
    layer = 4 * layer_params(shape)
    if rebuilt:
        making = rebuilt_beside_gradients(shape, rebuilt, tokens, p) + layer
    else:
        mlp = sum(i * o for _, i, o in shape.layer_units[0].linears if shape.intermediate in (i, o))
        mlp_copies = p.compute_bytes * mlp if p.autocast else 0
        cast = p.compute_bytes * shape.largest_layer_linear  # a weight's 16-bit gradient, before its cast
        making = max(layer, 4 * mlp + kept - mlp_copies) - kept + cast + 2 * 4 * shape.hidden * tokens
    highest = alive + making
    if trained_layers < 2:
        return highest
    return max(highest, alive - kept + layer + 4 * shard(layer_params(shape), ranks) + making)
