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
- two decoder layers gathered at once: the one computing and the next, prefetched;
- in the backward, each layer's gradients in full until they are reduce-scattered to the shards,
  two layers' at once (one reducing while the next is made), and the head's full gradient, which
  waits for the root's reduce-scatter at the end of the backward. Checkpointed, the layer whose
  gradients are being made is the one rebuilt, which frees its activations as it makes them
  (rebuilt_beside_gradients).
"""

from __future__ import annotations

import math

from lowmem_ft.planner.shapes import ModelShape


def shard(numel: int, ranks: int) -> int:
    """A rank's part of ``numel`` elements."""
    return math.ceil(numel / ranks)


def layer_params(shape: ModelShape) -> int:
    return shape.largest_layer_params


def root_params(shape: ModelShape) -> int:
    """The embedding, the final norm and the head: what the root's ``fully_shard`` holds."""
    return shape.params - sum(u.params for u in shape.layer_units)


def root_regather_bytes(shape: ModelShape, tokens: int) -> int:
    """The root's all-gather buffer, alive beside its gathered weights at the start of a forward,
    and the embedding's fp32 output (traced: Qwen2.5-7B HiFT, N = 4 at 24 GiB, was planned 1.9%
    below its loop without them)."""
    return 4 * root_params(shape) + 4 * shape.hidden * tokens


def gathered_bytes(shape: ModelShape) -> int:
    """fp32 weights gathered in full beside the shards: the root's for the whole step, and two
    decoder layers' (computing, prefetched)."""
    return 4 * (root_params(shape) + 2 * layer_params(shape))


def unsharded_gradient_bytes(shape: ModelShape, head_tensors: int = 1, layers: int = 2) -> int:
    """Full fp32 gradients waiting to be reduce-scattered: ``head_tensors`` vocabulary-sized ones
    (the head's, through the backward: it waits for the root's reduce-scatter), and those of up to
    two of ``layers`` trained decoder layers at once."""
    return 4 * head_tensors * shape.vocab * shape.hidden + 4 * min(2, layers) * layer_params(shape)


def rebuilt_beside_gradients(shape: ModelShape, rebuilt: int, tokens: int) -> int:
    """The end of a checkpointed backward, beside two layers' gathered weights and two layers' full
    gradients (sharding.unsharded_gradient_bytes): the layer whose gradients are being made was
    rebuilt, and frees its activations as it makes them, so the larger of the two is alive, not
    both; with the residual stream's fp32 gradient into and out of the layer. Traced (Llama-2-7B's
    width, HiFT over groups of three, N = 4): counting both put the plan 8% above its loop; the
    larger alone, 0.3% below it."""
    return max(0, rebuilt - 4 * layer_params(shape)) + 2 * 4 * shape.hidden * tokens
