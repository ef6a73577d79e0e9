"""HiFT's planner: the group size, the state policy and what is streamed, for the worst group's step."""

from __future__ import annotations

import math
from functools import partial

from lowmem_ft.choices import STATE_POLICIES
from lowmem_ft.engine import ROUNDING_CHUNK
from lowmem_ft.errors import UserError
from lowmem_ft.methods.hift.options import HiFTOptions
from lowmem_ft.planner.accounting import (
    DEVICE_STATE_BYTES,
    HOST_STATE_BYTES,
    Precision,
    checkpoint_bytes,
    evaluation_bytes,
    hift_group_activation_bytes,
)
from lowmem_ft.planner.fit import (
    STREAMING_NOTE,
    accumulates,
    activation_parts,
    can_stream,
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
from lowmem_ft.planner.types import (
    STREAM_BUFFERS,
    WIDTH_NAMES,
    Component,
    Estimate,
    MethodPlan,
    PlanRequest,
)


def hift_groups(n_units: int, units_per_group: int, trained_units: str = "all") -> list[range]:
    """The units of each group, bottom to top: consecutive units, ``units_per_group`` at a time (the
    last group takes what is left), over every unit (HiFT) or over the decoder layers only, the
    embedding (unit 0) and the head (the last) staying frozen (``layers``: BAdam). The run
    (method.py) groups the model's units with this, the planner the shape's."""
    first, end = (1, n_units - 1) if trained_units == "layers" else (0, n_units)
    return [range(k, min(k + units_per_group, end)) for k in range(first, end, units_per_group)]


def estimate_hift(
    shape: ModelShape,
    request: PlanRequest,
    micro_batch: int,
    checkpointing: bool,
    units_per_group: int,
    state_policy: str,
    streamed_units: int,
) -> Estimate:
    """Every group's step, evaluated on its own (its size, its streamed layers, its activations, the
    state of the group that comes next), and the worst of them: the largest group is not the one
    with the most activations (the embedding's keeps the whole stack above it)."""
    # 16-bit weights with fp32 masters for the active group, or fp32 weights when computing in fp32.
    # Several ranks: fp32 weights sharded by FSDP2, computed under autocast (planner/sharding.py).
    ranks = request.ranks
    w = 4 if ranks > 1 else request.compute_bytes
    p = Precision(weight_bytes=w, compute_bytes=request.compute_bytes, on_gpu=request.on_gpu)
    unit_bytes = [w * u.params for u in shape.units]
    # The engine streams decoder layers (the first ``streamed_units`` of them), never the embedding
    # or the head: they run once per pass, outside the layers' ring.
    layer_bytes = [w * u.params for u in shape.layer_units]
    streamed = layer_bytes[:streamed_units]
    resident = sum(unit_bytes) - sum(streamed)
    if ranks > 1:  # a rank's shards, and what is gathered beside them (never streamed)
        resident = 4 * shard(shape.params, ranks) + gathered_bytes(shape)
    buffers = STREAM_BUFFERS * max(layer_bytes) if streamed_units else 0
    groups = hift_groups(len(shape.units), units_per_group, request.options.trained_units)
    sizes = [sum(shape.units[u].params for u in group) for group in groups]
    # A streamed layer whose group trains gets device memory of its own while it does (its ring
    # slot stays allocated).
    own = [sum(layer_bytes[u - 1] for u in group if 1 <= u <= streamed_units) for group in groups]
    names = [
        shape.units[group[0]].name + (f"..{shape.units[group[-1]].name}" if len(group) > 1 else "")
        for group in groups
    ]
    group_acts = hift_group_activation_bytes(shape, request.seq_len, micro_batch, p, checkpointing, groups)
    parts, _, loss, logits_grad, extra = activation_parts(shape, request, p, micro_batch, checkpointing)
    masters = 4 if w == 2 else 0  # fp32 masters of a 16-bit group
    # Stochastic rounding at the end of the step works through a chunk of the largest tensor at a time.
    rounding = 4 * min(ROUNDING_CHUNK, shape.vocab * shape.hidden) if w == 2 else 0

    # A 16-bit gradient lives until the post-accumulate hook has added it to its fp32 master's
    # gradient: the group's largest tensor once, beside the fp32 gradients (engine/master_weights.py).
    layer_tensor = shape.largest_layer_linear

    def units_of(g: int) -> set[int]:
        return set(groups[g])

    def largest_tensor(g: int) -> int:
        """The largest weight whose gradient is made late in backward (the head's comes first)."""
        units = units_of(g)
        if 0 in units:
            return shape.vocab * shape.hidden
        return layer_tensor if units - {len(shape.units) - 1} else 0

    def late_gradients(g: int) -> int:
        """Bytes made at the end of backward beside the group's gradients: the largest weight's
        gradient in 16 bits, before its hook adds it into the fp32 master gradient. A tied
        embedding's comes in three parts: the head's (made at the start of backward and kept), the
        embedding's, and their sum (traced: Qwen2.5-1.5B's plan was 2.7% below its loop without)."""
        tied = shape.tied_embeddings and 0 in units_of(g)
        if w == 2:
            return 2 * largest_tensor(g) * (3 if tied else 1)
        if tied and ranks == 1:  # fp32 weights: as full fine-tuning's (methods/full/plan.py)
            return 4 * largest_tensor(g) * (3 if accumulates(request, micro_batch) else 2)
        return 0  # (several ranks: unsharded() below)

    tokens = request.seq_len * micro_batch
    head_unit = 0 if shape.tied_embeddings else len(shape.units) - 1

    def trains_below_head(g: int) -> bool:
        """Whether the group's backward goes below the head (its 16-bit copy is then kept for it)."""
        return min(units_of(g)) < len(shape.units) - 1

    def head_gradient(g: int) -> int:
        """The head's weight gradient is made first in backward, while every activation is alive: the
        logits' 16-bit gradient, the head's 16-bit gradient and, on the first micro-batch, the fp32
        master gradient the hook adds it into (on later ones it is among the summed gradients)."""
        if head_unit not in units_of(g):
            return 0
        head = shape.vocab * shape.hidden
        if ranks > 1:  # in full, under autocast (sharding.head_gradient_bytes)
            return head_gradient_bytes(shape, request.seq_len, tokens, p, copy_kept=trains_below_head(g))
        if w != 2:
            return 0
        first_micro_batch = 0 if accumulates(request, micro_batch) else 4 * head
        return p.compute_bytes * shape.vocab * tokens + 2 * head + first_micro_batch

    def trained_layers(g: int) -> int:
        return sum(1 for u in groups[g] if 0 < u < len(shape.units) - 1)

    def unsharded(g: int) -> int:
        """Several ranks: the group's gradients made in full before FSDP reduce-scatters them."""
        if ranks == 1:
            return 0
        layers = trained_layers(g)
        # The head's (an untied embedding's comes when the layers' are gone: traced), a tied one's
        # parts and their sum (as full fine-tuning's, methods/full/plan.py), and two layers' at once
        outer = 0 if head_unit not in units_of(g) else 3 if shape.tied_embeddings else 1
        return unsharded_gradient_bytes(shape, outer, layers)

    def kept_activations(g: int) -> tuple[int, int, int]:
        """Several ranks: the group's activations less the loss's (sharding.freed_before_the_layers_bytes),
        and what one frozen layer on the gradient path and one trained layer keep of them."""
        alive = group_acts[g][0] - freed_before_the_layers_bytes(
            shape, request.seq_len, tokens, p, copy_kept=trains_below_head(g)
        )
        frozen = layer_kept_bytes(shape, request.seq_len, tokens, p, checkpointing, trained=False)
        return max(0, alive), frozen, layer_kept_bytes(shape, request.seq_len, tokens, p, checkpointing)

    def highest_trained_layer(g: int) -> int:
        """The group's highest decoder layer counted from 1 (unit u is layer u - 1), 0 if it has none."""
        return max((u for u in units_of(g) if 0 < u < len(shape.units) - 1), default=0)

    def layers_forward(g: int) -> int:
        """Several ranks: the forward through the decoder layers (sharding.layers_forward_bytes)."""
        if ranks == 1:
            return 0
        alive, frozen, trained = kept_activations(g)
        top = trained if highest_trained_layer(g) == shape.layers else frozen
        return layers_forward_bytes(
            shape, alive, top if trains_below_head(g) else 0, checkpoint_bytes(shape, tokens, p)
        )

    def layers_backward(g: int) -> int:
        """Several ranks: the backward through the decoder layers, where the group has any below the
        head. First the frozen layers above the group, with every activation the step keeps but the
        loss's; then the group's own, with theirs alone (sharding.layers_backward_bytes). The head's
        full gradient waits for the root's reduce-scatter through both."""
        if ranks == 1 or not trains_below_head(g):
            return 0
        alive, frozen, trained = kept_activations(g)
        above = shape.layers - highest_trained_layer(g)  # frozen layers above the group
        rebuilt = group_acts[g][1] if checkpointing else 0
        # a frozen layer's backward: its input's gradient and the one it passes down (fp32)
        moment = alive + rebuilt + 2 * 4 * shape.hidden * tokens if above else 0
        if layers := trained_layers(g):
            moment = max(
                moment,
                layers_backward_bytes(
                    shape, alive - above * frozen, trained, rebuilt, tokens, layers, ranks, p
                ),
            )
        return moment + (4 * shape.vocab * shape.hidden if head_unit in units_of(g) else 0)

    # The largest group, and the largest but that one: the largest other than any group g.
    by_size = sorted(range(len(sizes)), key=sizes.__getitem__, reverse=True)

    def prefetch_of(g: int) -> int:
        # The next group's state arrives during this step: the one above in a bottom-up order (the
        # embedding's after the head's: the cycle wraps), below in a top-down one, any in a random
        # one. fp32 on the device whatever the policy.
        n = len(sizes)
        if state_policy == "drop" or n == 1:
            return 0
        following = {"bottom-up": (g + 1) % n, "top-down": (g - 1) % n}.get(
            request.options.order, by_size[0] if by_size[0] != g else by_size[1]
        )
        return DEVICE_STATE_BYTES * shard(sizes[following], ranks)

    def step_of(g: int) -> Estimate:
        prefetch = prefetch_of(g)
        size = sizes[g]
        # Kept state arrives before the step. Dropped state is made by the group's update and freed
        # when the group hands over: it is alive through forward and backward only when the group
        # trains for several steps in a row.
        state = DEVICE_STATE_BYTES * shard(size, ranks)
        made_by_update = state if state_policy == "drop" and request.options.switch_every == 1 else 0
        persistent = resident + buffers + own[g] + masters * size + state - made_by_update + prefetch
        kept, rebuilt = group_acts[g]
        backward_extra = extra + late_gradients(g)
        if ranks > 1 and checkpointing and trained_layers(g) >= 2:  # two layers' full gradients
            backward_extra = rebuilt_beside_gradients(shape, extra, tokens, p)
        return Estimate(
            [], persistent, kept, loss, max(logits_grad, rebuilt), 4 * shard(size, ranks) + unsharded(g),
            backward_extra, end_step_extra=rounding,
            trainable=sum(sizes), label=f"HiFT group {names[g]}",
            accumulating=accumulates(request, micro_batch), head_gradient=head_gradient(g),
            made_by_update=made_by_update, summed_grads=4 * shard(size, ranks) if ranks > 1 else None,
            evaluation=evaluation_bytes(shape, tokens),
            root_regather=root_regather_bytes(shape, request.seq_len, micro_batch) if ranks > 1 else 0,
            gathered_root=4 * root_params(shape) if ranks > 1 else 0,
            gathered_layer=4 * layer_params(shape) if ranks > 1 else 0,
            layers_backward=layers_backward(g),
            layers_forward=layers_forward(g),
        )  # fmt: skip

    worst_group = max(range(len(sizes)), key=lambda g: step_of(g).device_peak())
    worst = step_of(worst_group)
    size = sizes[worst_group]
    prefetch = prefetch_of(worst_group)
    parts[0] = Component(
        parts[0].name, worst.activations, note=f"{parts[0].note}; group {names[worst_group]}"
    )
    host_states = int(HOST_STATE_BYTES[state_policy] * shard(sum(sizes), ranks))  # this rank's shards
    of_rank = f", 1/{ranks} shard" if ranks > 1 else ""
    weights = [Component(f"weights ({WIDTH_NAMES[w]}, resident)", resident)]
    if ranks > 1:
        weights = [
            Component(f"weights (fp32{of_rank})", 4 * shard(shape.params, ranks)),
            Component(
                "gathered weights (root and two layers)", gathered_bytes(shape), note="FSDP2 all-gathers"
            ),
        ]
    worst.components = [
        *weights,
        Component(
            f"weights ({WIDTH_NAMES[w]}, streamed)",
            0,
            sum(streamed),
            note=f"{streamed_units} layers in pinned host memory",
        ),  # fmt: skip
        Component("stream buffers", buffers),
        Component("active group: its streamed layers' own device copy", own[worst_group]),
        Component("active group: fp32 master copy", masters * size),
        # fp32 either way: each micro-batch's 16-bit gradient is added to the fp32 master's at once.
        Component(f"active group: gradients (fp32{of_rank})", 4 * shard(size, ranks)),
        Component("active group: gradients before reduce-scatter", unsharded(worst_group), note="transient"),
        Component(
            f"active group: optimizer states (AdamW fp32 m, v{of_rank})",
            DEVICE_STATE_BYTES * shard(size, ranks),
        ),
        Component("next group: optimizer states (prefetch)", prefetch),
        Component(
            f"optimizer states of all groups ({state_policy}{of_rank})",
            0,
            host_states,
            note="pinned host memory",
        ),
        *parts,
        Component(
            "one layer rebuilt in the backward (transient)",
            group_acts[worst_group][1],
            note="checkpointing; after the loss's backward",
        ),
        Component("end of step: stochastic rounding (transient)", rounding, note="one chunk at a time"),
    ]
    state_traffic = 2 * int(HOST_STATE_BYTES[state_policy] * max(sizes))  # in and out, as stored
    passes = 2 if checkpointing else 1  # a streamed unit crosses for the forward and for the recompute
    n_micro = math.ceil(request.rank_batch_size / micro_batch)
    worst.traffic = state_traffic + n_micro * passes * sum(streamed)
    worst.streamed_per_micro_batch = passes * sum(streamed)
    return worst


def units_per_group(options: HiFTOptions, n_units: int) -> int | None:
    """--units-per-group, or --groups as k groups of about equal size (None: the planner chooses),
    checked against this model's units."""
    if options.units_per_group is not None and options.units_per_group > n_units:
        raise UserError(
            f"--units-per-group {options.units_per_group} is more than the model's {n_units} units"
        )
    if options.groups is None:
        return options.units_per_group
    if not 1 <= options.groups <= n_units:
        raise UserError(f"--groups must be between 1 and {n_units}, got {options.groups}")
    return -(-n_units // options.groups)


def plan_hift(shape: ModelShape, request: PlanRequest, fitter) -> MethodPlan:
    n_units = len(shape.units)
    trained = len(hift_groups(n_units, 1, request.options.trained_units))  # units that train
    several = request.ranks > 1  # sharded fp32 weights, never streamed, no 8-bit state (method.py)
    load = (4 if several else request.compute_bytes) * shape.params
    policies = [request.options.state_policy] if request.options.state_policy else list(STATE_POLICIES)
    if several:  # (a request for keep-8bit comes from the advice's trials: keep is what would run)
        policies = [policy for policy in policies if policy != "keep-8bit"] or ["keep"]
    max_m = max(1, trained // 4)  # at least 4 groups: each step still trains a real slice of the model
    given = units_per_group(request.options, trained)
    group_sizes = [given] if given else list(range(max_m, 0, -1))

    def chosen(est, m, policy, streamed, mb, ckpt, notes=()) -> MethodPlan:
        """HiFT's choices, how a step is cut and run, and what the choices come to."""
        return MethodPlan(
            est, {"units_per_group": m, "state_policy": policy}, execution(request, mb, ckpt, streamed), load,
            list(notes), derived={"groups": math.ceil(trained / m), "resident_units": n_units - streamed},
        )  # fmt: skip

    if request.options.stream and not several:  # every decoder layer streamed, as asked
        n_layers = len(shape.layer_units)
        for policy in policies:
            for m in group_sizes:
                build = partial(
                    estimate_hift, shape, request, units_per_group=m, state_policy=policy,
                    streamed_units=n_layers,
                )  # fmt: skip
                found = first_fit(fitter, request, build, load, forced_checkpointing=True)
                if found:
                    est, mb, _ = found
                    return chosen(est, m, policy, n_layers, mb, True, [STREAMING_NOTE])
    # Prefer, in order: nothing streamed, then the richest state policy the host can hold, then
    # bigger groups. Streaming needs checkpointing (a streamed unit is rebuilt in the backward).
    for policy in policies:
        for m in group_sizes:
            build = partial(
                estimate_hift, shape, request, units_per_group=m, state_policy=policy, streamed_units=0
            )
            found = first_fit(fitter, request, build, load)
            if found:
                est, mb, ckpt = found
                return chosen(est, m, policy, 0, mb, ckpt)
    m = given or 1
    if not can_stream(request):  # the cheapest unstreamed plan, to say what is short
        build = partial(
            estimate_hift, shape, request, units_per_group=m, state_policy=policies[-1], streamed_units=0
        )
        est, mb, ckpt = smallest(request, build)
        return chosen(est, m, policies[-1], 0, mb, ckpt)
    # Streaming: every micro-batch moves each streamed unit in twice, so a bigger micro-batch can be
    # worth more streamed units. Among the plans that fit, take the least host<->GPU traffic per step.
    n_layers = len(shape.layer_units)
    for policy in policies:
        candidates = []
        for streamed in range(1, n_layers + 1):
            build = partial(
                estimate_hift, shape, request, units_per_group=m, state_policy=policy, streamed_units=streamed
            )
            found = first_fit(fitter, request, build, load, forced_checkpointing=True)
            if found:
                candidates.append((found[0].traffic, streamed, found))
        if candidates:
            _, streamed, (est, mb, _) = min(candidates, key=lambda c: (c[0], c[1]))
            return chosen(est, m, policy, streamed, mb, True, [STREAMING_NOTE])
    policy = policies[-1]
    build = partial(
        estimate_hift, shape, request, units_per_group=m, state_policy=policy, streamed_units=n_layers
    )
    est, mb, _ = smallest(request, build)
    return chosen(est, m, policy, n_layers, mb, True)
