"""Full fine-tuning's planner: every parameter with fp32 weights, gradients and AdamW state."""

from __future__ import annotations

from functools import partial

from lowmem_ft.planner.accounting import Precision, autocast_copy_bytes, checkpoint_bytes, evaluation_bytes
from lowmem_ft.planner.fit import (
    accumulates,
    activation_parts,
    execution,
    first_fit,
    smallest,
)
from lowmem_ft.planner.shapes import ModelShape
from lowmem_ft.planner.sharding import (
    freed_before_the_layers_bytes,
    gathered_bytes,
    head_gradient_bytes,
    layer_kept_bytes,
    layer_params,
    layers_backward_bytes,
    layers_forward_bytes,
    rebuilt_beside_gradients,
    root_params,
    root_regather_bytes,
    shard,
    unsharded_gradient_bytes,
)
from lowmem_ft.planner.types import Component, Estimate, MethodPlan, PlanRequest


def estimate_full(shape: ModelShape, request: PlanRequest, micro_batch: int, checkpointing: bool) -> Estimate:
    p = Precision(weight_bytes=4, compute_bytes=request.compute_bytes, on_gpu=request.on_gpu)
    n = shape.params
    parts, acts, loss, logits_grad, extra = activation_parts(shape, request, p, micro_batch, checkpointing)
    accumulating = accumulates(request, micro_batch)
    tokens = request.seq_len * micro_batch
    head = shape.vocab * shape.hidden
    # The head's weight gradient is made first in backward, while every activation is alive: the
    # logits' 16-bit gradient, the head's gradient in the compute dtype and the fp32 gradient it is
    # cast to. From the second micro-batch on that fp32 gradient is a temporary beside the summed
    # gradients, until it is added into them.
    head_gradient = p.compute_bytes * (shape.vocab * tokens + head) + 4 * head if p.autocast else 4 * head
    # The embedding's gradient is made last. A tied embedding's weight then gets the head's part
    # (kept since the start of backward), the embedding's part and their sum; with accumulation all
    # three are temporaries beside the summed gradients, else the sum becomes the gradient.
    parts_alive = (3 if accumulating else 2) if shape.tied_embeddings else int(accumulating)
    embedding_gradient = 4 * head * parts_alive
    if request.ranks > 1:  # FSDP2: a rank's shards, and what is gathered beside them (sharding.py)
        return _sharded(shape, request, micro_batch, checkpointing, p, parts, acts, loss, logits_grad, extra)
    components = [
        Component("weights (fp32 master)", 4 * n),
        Component("gradients (fp32)", 4 * n),
        Component("optimizer states (AdamW fp32 m, v)", 8 * n),
        *parts,
        # (shown, as the peak counts them: the rows then account for a peak "at head's gradient")
        Component(
            "head's gradient as the backward makes it (transient)",
            head_gradient,
            note="beside the activations",
        ),
    ]
    if embedding_gradient > extra:
        components.append(Component("embedding's gradient as it is summed (transient)", embedding_gradient))
    return Estimate(
        components, 12 * n, acts, loss, logits_grad, 4 * n, max(extra, embedding_gradient), trainable=n,
        accumulating=accumulating, head_gradient=head_gradient,
        evaluation=evaluation_bytes(shape, request.seq_len * micro_batch),
    )  # fmt: skip


def _sharded(
    shape: ModelShape,
    request: PlanRequest,
    micro_batch: int,
    checkpointing: bool,
    p: Precision,
    parts: list[Component],
    acts: int,
    loss: int,
    logits_grad: int,
    extra: int,
) -> Estimate:
    n, ranks, tokens = shape.params, request.ranks, request.seq_len * micro_batch
    head = shape.vocab * shape.hidden
    rebuilt = extra if checkpointing else 0
    if checkpointing and shape.layers >= 2:  # two layers' full gradients beside the rebuilt one
        extra = rebuilt_beside_gradients(shape, extra, tokens, p)
    elif not checkpointing:  # the autocast copies are freed layer by layer, as the backward uses them
        extra = autocast_copy_bytes(shape, p, layers=1)
    # The end of the backward is the lowest layers' (two gathered, two layers' full gradients), then
    # the embedding's: its gradient in full before the root's reduce-scatter (a tied one's part and
    # its sum with the head's, counted among the gradients) beside the lowest layer's reduce-scatter
    # input alone. Traced: Qwen2.5-1.5B, tied, was 1.8% above its plan without the embedding's
    # gradient, and 5.6% above it with the layers counted beside it (N = 4, checkpointed).
    embedding = (8 if shape.tied_embeddings else 4) * head - 3 * 4 * layer_params(shape)
    kept = layer_kept_bytes(shape, request.seq_len, tokens, p, checkpointing)
    alive = acts - freed_before_the_layers_bytes(shape, request.seq_len, tokens, p)
    # the decoder layers' backward, the head's full gradient waiting for the root's reduce-scatter
    layers_backward = 4 * head + layers_backward_bytes(
        shape, alive, kept, rebuilt, tokens, shape.layers, ranks, p
    )
    gathered, unsharded = gathered_bytes(shape), unsharded_gradient_bytes(shape)
    components = [
        Component(f"weights (fp32, 1/{ranks} shard)", 4 * shard(n, ranks)),
        Component(f"gradients (fp32, 1/{ranks} shard)", 4 * shard(n, ranks)),
        Component(f"optimizer states (AdamW fp32 m, v, 1/{ranks} shard)", 8 * shard(n, ranks)),
        Component("gathered weights (root and two layers)", gathered, note="FSDP2 all-gathers"),
        Component("gradients before reduce-scatter (head, two layers)", unsharded, note="transient"),
        *parts,
    ]
    return Estimate(
        components, 12 * shard(n, ranks) + gathered, acts, loss, logits_grad, 4 * shard(n, ranks) + unsharded,
        max(extra, embedding), trainable=n, accumulating=accumulates(request, micro_batch),
        head_gradient=head_gradient_bytes(shape, request.seq_len, tokens, p),
        summed_grads=4 * shard(n, ranks), evaluation=evaluation_bytes(shape, tokens),
        root_regather=root_regather_bytes(shape, request.seq_len, micro_batch),
        gathered_root=4 * root_params(shape), gathered_layer=4 * layer_params(shape),
        layers_backward=layers_backward,
        layers_forward=layers_forward_bytes(shape, alive, kept, checkpoint_bytes(shape, tokens, p)),
    )  # fmt: skip


def plan_full(shape: ModelShape, request: PlanRequest, fitter) -> MethodPlan:
    build = partial(estimate_full, shape, request)
    load = 4 * shape.params
    found = first_fit(fitter, request, build, load) or smallest(request, build)
    est, mb, ckpt = found
    return MethodPlan(est, {}, execution(request, mb, ckpt), load)
