"""HiFT against references: plain AdamW per group, a full backward, exact state round trips."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from test_train import make_examples

from lowmem_ft.config import RunConfig
from lowmem_ft.data import collate
from lowmem_ft.engine.master_weights import round_to_bf16_stochastically_
from lowmem_ft.engine.state_store import OptimizerStateStore
from lowmem_ft.methods import build_method
from lowmem_ft.methods.hift.method import visit_order
from lowmem_ft.methods.optimizers import make_optimizer
from lowmem_ft.models.units import model_units
from lowmem_ft.objective import loss_sum, target_count
from lowmem_ft.prepare import enable_checkpointing

CPU = torch.device("cpu")


def config(**overrides) -> RunConfig:
    return RunConfig.create(
        **{
            "model": "t",
            "data": Path("x.jsonl"),
            "method": "hift",
            "lr": 1e-2,
            "weight_decay": 0.1,
            **overrides,
        }
    )


def batches(model, n: int) -> list[dict]:
    vocab = model.config.vocab_size
    return [collate(make_examples(2, vocab, seed=i), pad_id=0) for i in range(n)]


def loss_of(model, batch, dtype=torch.float32, device=CPU) -> torch.Tensor:
    return loss_sum(model, batch, device, dtype) / target_count(batch)


def run_method(model, cfg, data: list[dict], dtype=torch.float32, device=CPU):
    """The recipe's step, as train.py runs it, for each batch; returns the method and the losses."""
    method = build_method(cfg)
    method.setup(model)
    losses = []
    for step, batch in enumerate(data):
        method.begin_step(step)
        loss = loss_of(model, batch, dtype, device)
        loss.backward()
        method.reduce_gradients()
        method.optimizer.step()
        method.optimizer.zero_grad(set_to_none=True)
        method.end_step(step)
        losses.append(loss.item())
    return method, losses


def test_one_group_of_all_units_is_full_fine_tuning(small_model):
    data = batches(small_model, 4)
    full_model, hift_model = small_model, copy.deepcopy(small_model)
    n_units = len(model_units(hift_model))
    _, full_losses = run_method(full_model, config(method="full"), data)
    _, hift_losses = run_method(hift_model, config(units_per_group=n_units), data)
    assert hift_losses == pytest.approx(full_losses, rel=1e-6)
    for (name, a), (_, b) in zip(full_model.named_parameters(), hift_model.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("policy", ["keep", "drop", "keep-8bit"])
def test_each_group_steps_like_its_own_adamw(policy, small_model):
    """k groups: a group's update is AdamW on that group alone, with a step counter that advances
    only on its visits (keep), fresh state on every visit (drop), or keep within 8-bit error."""
    data = batches(small_model, 8)  # two cycles over 4 groups
    reference, start = copy.deepcopy(small_model), copy.deepcopy(small_model)
    method, _ = run_method(small_model, config(units_per_group=1, state_policy=policy), data)

    groups = [unit.params for unit in model_units(reference)]
    optimizers = [make_optimizer("adamw", g, 1e-2, 0.1) for g in groups]
    for step, batch in enumerate(data):
        g = method.group_at(step)
        if policy == "drop":  # BAdam: every visit starts from zero moments
            optimizers[g] = make_optimizer("adamw", groups[g], 1e-2, 0.1)
        loss_of(reference, batch).backward()  # a full backward; only group g is stepped
        optimizers[g].step()
        reference.zero_grad(set_to_none=True)

    params = zip(small_model.named_parameters(), reference.parameters(), start.parameters(), strict=True)
    for (name, a), b, a0 in params:
        if policy == "keep-8bit":  # the change each parameter made, within 5% of the exact change
            assert (a - b).norm() <= 0.05 * (b - a0).norm(), name
        else:
            torch.testing.assert_close(a, b, msg=name)
    if policy == "keep":  # the step counter of each group counts its own visits only
        assert float(method.store.group_state(0)[0]["step"]) == 2.0


def test_truncated_backward_gives_the_full_backward_gradients(small_model):
    batch = batches(small_model, 1)[0]
    reference = copy.deepcopy(small_model)
    method = build_method(config(units_per_group=1))
    method.setup(small_model)
    middle = 2  # layer.1 of embed, layer.0, layer.1, head
    while method.active != middle:
        method.begin_step(method.order.index(middle))
    loss_of(small_model, batch).backward()
    loss_of(reference, batch).backward()
    ref = dict(reference.named_parameters())
    for name, p in small_model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref[name].grad, msg=name)
        else:
            assert p.grad is None, f"{name} is frozen this step but got a gradient"


def saved_bytes(model, batch) -> int:
    """Bytes autograd saves for the backward during one forward pass."""
    total = 0

    def pack(t):
        nonlocal total
        if not isinstance(t, torch.nn.Parameter):
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_of(model, batch)
    return total


def test_units_below_the_active_group_store_no_activations(small_model):
    batch = batches(small_model, 1)[0]
    method = build_method(config(units_per_group=1))
    method.setup(small_model)
    by_group = {}
    for step in range(len(method.groups)):
        method.begin_step(step)
        by_group[method.active] = saved_bytes(small_model, batch)
    embed, layer0, layer1, head = (by_group[g] for g in range(4))
    assert layer0 > layer1 > head  # the higher the active group, the less is kept
    small_model.requires_grad_(True)
    everything = saved_bytes(small_model, batch)
    assert max(by_group.values()) < everything  # frozen layers on the path keep less than trained ones


def test_visit_orders_and_switching():
    assert visit_order(4, "bottom-up", 0) == [0, 1, 2, 3]
    assert visit_order(4, "top-down", 0) == [3, 2, 1, 0]
    random_order = visit_order(6, "random", seed=7)
    assert sorted(random_order) == list(range(6)) and random_order == visit_order(6, "random", seed=7)
    assert random_order != visit_order(6, "random", seed=8) or random_order != list(range(6))


def test_random_cycle_order_is_redrawn_every_cycle(small_model):
    """BAdam's order: every group once per cycle, a new seeded permutation each cycle (the group
    after a switch is the one whose state was prefetched)."""
    method = build_method(config(units_per_group=1, order="random-cycle", switch_every=2, seed=3))
    method.setup(small_model)
    n = len(method.groups)
    steps = [method.group_at(s) for s in range(2 * n * 4)]
    assert steps[::2] == steps[1::2]  # each group for switch_every steps
    cycles = [steps[::2][c * n : (c + 1) * n] for c in range(4)]
    assert all(sorted(cycle) == list(range(n)) for cycle in cycles)
    assert len({tuple(cycle) for cycle in cycles}) > 1, "the order is drawn again each cycle"
    assert cycles[0] == visit_order(n, "random", seed=3)  # the first cycle is --order random's
    fixed = build_method(config(units_per_group=1, order="random", switch_every=2, seed=3))
    fixed.setup(copy.deepcopy(small_model))
    assert [fixed.group_at(s) for s in range(2 * n * 4)] != steps  # --order random keeps its order


def test_trained_units_layers_trains_the_decoder_layers_and_freezes_embedding_and_head(small_model):
    """BAdam's setting (--trained-units layers): over a whole cycle every decoder layer changes, the
    embedding and the head do not, and the run's header says so."""
    before = copy.deepcopy(small_model)
    units = model_units(small_model)
    method = build_method(config(units_per_group=2, trained_units="layers"))
    method.setup(small_model)
    n_layers = len(units) - 2
    assert len(method.groups) == -(-n_layers // 2) and method.trainable_count() == sum(
        p.numel() for unit in units[1:-1] for p in unit.params
    )
    assert method.summary.startswith("the decoder layers (embedding and head frozen, as BAdam)")
    run_method(small_model, config(units_per_group=2, trained_units="layers"), batches(small_model, 4))
    trained = dict(small_model.named_parameters())
    for name, weight in before.named_parameters():
        frozen = "embed" in name or "lm_head" in name or name == "model.norm.weight"
        assert torch.equal(weight, trained[name]) == frozen, name
    assert build_method(config()).summary.startswith("all parameters")


def test_switch_every_keeps_a_group_for_k_steps(small_model):
    method = build_method(config(units_per_group=1, switch_every=3))
    method.setup(small_model)
    assert [method.group_at(s) for s in range(13)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 0]


@pytest.mark.parametrize("policy", ["keep", "keep-8bit", "drop"])
def test_state_store_round_trip(policy):
    param = torch.nn.Parameter(torch.randn(64, 128))
    optimizer = make_optimizer("adamw", [param], 1e-3, 0.0)
    param.grad = torch.randn_like(param)
    optimizer.step()
    original = {k: v.clone() for k, v in optimizer.state[param].items()}
    store = OptimizerStateStore(policy, CPU)
    store.save(0, optimizer, [param])
    assert not optimizer.state  # nothing of the group is left with the optimizer
    store.load(0, optimizer, [param])
    if policy == "drop":
        assert not optimizer.state
        return
    restored = optimizer.state[param]
    for key, value in original.items():
        if policy == "keep" or value.numel() < 4096:
            assert torch.equal(restored[key], value), key
        else:  # blockwise 8-bit: error within a small fraction of the largest value
            assert (restored[key] - value).abs().max() <= 0.02 * value.abs().max(), key
            assert (restored[key] >= 0).all() or key != "exp_avg_sq"  # the second moment stays >= 0
    if policy == "keep":
        assert store.host_bytes() == sum(v.numel() * v.element_size() for v in original.values())
        first = store._host[0][0]["exp_avg"].data.data_ptr()
        store.save(0, optimizer, [param])  # the host buffer of a group is allocated once
        assert store._host[0][0]["exp_avg"].data.data_ptr() == first


def test_hift_with_activation_checkpointing(small_model):
    enable_checkpointing(small_model)
    small_model.train()
    before = copy.deepcopy(small_model)
    method, losses = run_method(small_model, config(units_per_group=1), batches(small_model, 3))
    assert all(torch.isfinite(torch.tensor(losses)))
    moved = {
        n for n, p in small_model.named_parameters() if not torch.equal(p, dict(before.named_parameters())[n])
    }
    expected = {
        n
        for n, p in small_model.named_parameters()
        if any(p is q for g in (0, 1, 2) for q in method.groups[g])
    }
    assert moved == expected  # the three visited groups moved; the head did not


def test_stochastic_rounding_to_bf16_is_unbiased():
    lower = torch.tensor(1.0, dtype=torch.bfloat16).float()
    spacing = 2.0**-7  # bf16 spacing between 1 and 2
    x = torch.full((200_000,), float(lower) + 0.3 * spacing)
    out = torch.empty_like(x, dtype=torch.bfloat16)
    round_to_bf16_stochastically_(out, x, torch.Generator().manual_seed(0))
    values = set(out.float().unique().tolist())
    assert values == {float(lower), float(lower) + spacing}  # only the two neighbours
    assert out.float().mean().item() == pytest.approx(float(x[0]), abs=0.01 * spacing)
    assert x.to(torch.bfloat16).float().mean().item() == float(lower)  # nearest rounding loses it all


def test_bf16_weights_train_through_fp32_masters(small_model):
    model = small_model.to(torch.bfloat16)
    cfg = config(units_per_group=2, dtype="bf16")
    assert build_method(cfg).weight_dtype() == torch.bfloat16
    before = copy.deepcopy(model)
    method, losses = run_method(model, cfg, batches(model, 2), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(m.dtype == torch.float32 for m in method.trainable_parameters())
    first_group = {id(p) for p in method.groups[method.order[0]]}
    changed = [not torch.equal(p, q) for p, q in zip(model.parameters(), before.parameters(), strict=True)]
    assert any(c for c, p in zip(changed, model.parameters(), strict=True) if id(p) in first_group)


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "adamw8bit"])
def test_other_optimizers_train_a_group(optimizer, small_model):
    before = copy.deepcopy(small_model)
    method, losses = run_method(
        small_model, config(units_per_group=2, optimizer=optimizer), batches(small_model, 2)
    )
    assert all(torch.isfinite(torch.tensor(losses)))
    group = {id(p) for p in method.groups[0]}
    for p, q in zip(small_model.parameters(), before.parameters(), strict=True):
        if id(p) in group and p.ndim >= 2:
            assert not torch.equal(p, q)


@pytest.mark.parametrize(
    ("policy", "switch_every", "dtype"),
    [
        ("keep", 1, "fp32"),
        ("keep-8bit", 1, "fp32"),
        ("drop", 2, "fp32"),
        ("keep", 3, "fp32"),
        ("keep", 3, "bf16"),
    ],
)
def test_resumed_run_equals_the_uninterrupted_one(policy, switch_every, dtype, small_model):
    """state_dict after step k, into a fresh method on a copy of the model: steps k.. match exactly
    (bf16: the active group's fp32 masters and the stochastic-rounding generator are restored too)."""
    compute = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    small_model.to(compute)
    data = batches(small_model, 7)
    cfg = config(units_per_group=1, state_policy=policy, switch_every=switch_every, dtype=dtype)
    uninterrupted = copy.deepcopy(small_model)
    run_method(uninterrupted, cfg, data, compute)

    first, _ = run_method(small_model, cfg, data[:4], compute)
    saved = first.state_dict()
    resumed_model = copy.deepcopy(small_model)
    method = build_method(cfg)
    method.setup(resumed_model)
    method.load_state_dict(saved)
    for step in range(4, 7):
        method.begin_step(step)
        loss_of(resumed_model, data[step], compute).backward()
        method.reduce_gradients()
        method.optimizer.step()
        method.optimizer.zero_grad(set_to_none=True)
        method.end_step(step)
    for (name, a), b in zip(resumed_model.named_parameters(), uninterrupted.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_bf16_micro_batch_gradients_accumulate_in_fp32(small_model):
    """With bf16 weights, the active group's gradient over 8 micro-batches is the fp32 sum of the
    micro-batches' bf16 gradients (an fp32 reference), not a sum rounded to bf16 at every step."""
    model = small_model.to(torch.bfloat16)
    data = batches(model, 8)
    n_targets = sum(target_count(b) for b in data)
    method = build_method(config(units_per_group=2, dtype="bf16"))
    method.setup(model)
    method.begin_step(0)
    group = method.groups[method.active]
    # Reference: each micro-batch's bf16 gradient on its own, summed in fp32.
    reference = [torch.zeros(p.shape, dtype=torch.float32) for p in group]
    for batch in data:
        grads = torch.autograd.grad(loss_sum(model, batch, CPU, torch.bfloat16) / n_targets, group)
        for total, g in zip(reference, grads, strict=True):
            total += g.float()
    for batch in data:  # the recipe's accumulation
        (loss_sum(model, batch, CPU, torch.bfloat16) / n_targets).backward()
    method.reduce_gradients()
    assert all(p.grad is None for p in group)  # no 16-bit gradient is left over
    for master, expected in zip(method.trainable_parameters(), reference, strict=True):
        assert master.grad.dtype == torch.float32
        torch.testing.assert_close(master.grad, expected, rtol=1e-6, atol=1e-9)


def test_stochastic_rounding_in_chunks_is_exact_and_unbiased():
    """Rounded through chunks of 1000 elements: every value lands on one of its two bf16 neighbours
    (values that bf16 holds exactly stay as they are), and the mean is kept."""
    spacing = 2.0**-7
    x = torch.cat([torch.full((50_001,), 1.0 + 0.3 * spacing), torch.tensor([1.5, -2.0, 0.0])])
    out = torch.empty_like(x, dtype=torch.bfloat16)
    round_to_bf16_stochastically_(out, x, torch.Generator().manual_seed(0), chunk=1000)
    assert set(out[:-3].float().unique().tolist()) == {1.0, 1.0 + spacing}
    assert out[-3:].float().tolist() == [1.5, -2.0, 0.0]
    assert out[:-3].float().mean().item() == pytest.approx(1.0 + 0.3 * spacing, abs=0.02 * spacing)


def test_stochastic_rounding_of_the_largest_tensor_holds_one_chunk_of_temporaries():
    """Issue 14's second finding: rounding Llama-3-8B's embedding (525M values) back to bf16 at the
    end of a step held the random integers, the sum and the masked result of the whole tensor at
    once (about 12 bytes a value: 5.9 GiB). Traced on fake tensors at that size, the rounding adds
    one chunk's random integers (4 bytes a value of the chunk) to what the master and the weight hold."""
    from lowmem_ft.device_books import DeviceBytes, FakeDevice
    from lowmem_ft.engine import ROUNDING_CHUNK

    fake, books = FakeDevice(), DeviceBytes()
    with fake:
        master = torch.empty(128_256 * 4096, dtype=torch.float32)
        weight = torch.empty(128_256 * 4096, dtype=torch.bfloat16)
        with fake.recording(books):  # (counts what is allocated from here on: the temporaries)
            round_to_bf16_stochastically_(weight, master, None)
    assert books.peak == 4 * ROUNDING_CHUNK  # one chunk of int32 noise; nothing the size of the tensor


def test_state_store_keeps_a_group_in_one_exactly_sized_host_buffer():
    """One flat host buffer per group and dtype, of exactly the bytes of its state (pinned on a
    GPU through engine/host_memory.py, which rounds nothing up); a save reuses it."""
    from lowmem_ft.engine import host_memory

    params = [torch.nn.Parameter(torch.randn(300, 7)), torch.nn.Parameter(torch.randn(13))]
    optimizer = make_optimizer("adamw", params, 1e-3, 0.0)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    allocated = []
    store = OptimizerStateStore("keep", CPU)
    with host_memory.observe(allocated.append):
        store.save(0, optimizer, params)
    assert [(b.dtype, b.numel()) for b in allocated] == [(torch.float32, 2 * (300 * 7 + 13))]
    assert store.host_bytes() == 4 * 2 * (300 * 7 + 13) + 2 * 4  # + the two step counts
    store.load(0, optimizer, params)
    with host_memory.observe(allocated.append):
        store.save(0, optimizer, params)
    assert len(allocated) == 1  # the group's buffer was reused


def test_8_bit_state_and_its_block_scales_wait_in_the_group_s_flat_buffers_and_nothing_else():
    """keep-8bit: the codes (1 byte a value) and the block scales (4 bytes per 256 values) of a group
    are laid out in its flat buffers, which are pinned on a GPU; the scales had host tensors of
    their own, pageable, whose copy to the device held the CPU until the side stream got to it, and
    the save's copy back (from the device) waited for the step. Nothing else is allocated on the
    host, a save reuses the buffers, and a load gives the same state as before (the codes' own
    error only)."""
    from lowmem_ft.engine import host_memory

    params = [torch.nn.Parameter(torch.randn(300, 7)), torch.nn.Parameter(torch.randn(13))]
    optimizer = make_optimizer("adamw", params, 1e-3, 0.0)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    exact = [{k: v.clone() for k, v in optimizer.state[p].items()} for p in params]
    allocated = []
    store = OptimizerStateStore("keep-8bit", CPU)
    with host_memory.observe(allocated.append):
        store.save(0, optimizer, params)
    blocks = -(-300 * 7 // 256)  # 9 scales per moment of the large tensor; the small one is exact
    assert sorted((str(b.dtype), b.numel()) for b in allocated) == [
        ("torch.float32", 2 * blocks + 2 * 13),
        ("torch.uint8", 2 * 300 * 7),
    ]
    flat = store._flat[0][torch.float32].untyped_storage().data_ptr()
    for key in ("exp_avg", "exp_avg_sq"):
        stored = store._host[0][0][key]
        assert stored.quantised and stored.absmax.untyped_storage().data_ptr() == flat, key
    store.load(0, optimizer, params)
    for p, before in zip(params, exact, strict=True):
        for key, value in before.items():
            assert (optimizer.state[p][key] - value).abs().max() <= 0.02 * value.abs().max(), key
    with host_memory.observe(allocated.append):
        store.save(0, optimizer, params)
    assert len(allocated) == 2  # the group's buffers were reused


def test_the_host_copy_of_a_saved_group_is_complete_before_anyone_reads_it():
    """On a GPU, `save` copies a group's state to pinned host memory on a side stream; a checkpoint
    taken right after (`export`, `group_state`) must wait for that copy, or it writes whatever the
    buffer held before. The wait is on the event `save` records: checked here with a stand-in
    event (tests/test_gpu.py holds the side stream back on a real GPU)."""
    from lowmem_ft.engine.state_store import OptimizerStateStore
    from lowmem_ft.methods.optimizers import make_optimizer

    class Event:
        waited = 0

        def synchronize(self):
            Event.waited += 1

    param = torch.nn.Parameter(torch.randn(64, 64))
    optimizer = make_optimizer("adamw", [param], 1e-3, 0.0)
    param.grad = torch.randn_like(param)
    optimizer.step()
    store = OptimizerStateStore("keep", torch.device("cpu"))
    store.save(0, optimizer, [param])
    store._saved_events[0] = Event()  # what save records on CUDA
    store.export(0)
    assert Event.waited == 1
    store.group_state(0)
    assert Event.waited == 2
    assert 0 in store._saved_events, "prefetch still orders its copy after the write-back"


def test_a_checkpoint_after_a_switch_that_prefetches_the_saved_group_still_waits_for_its_copy(monkeypatch):
    """Two groups (or a random order that draws the group it just left): one begin_step saves group
    0's state (copied out on the side stream) and prefetches it back for the next step; the
    checkpoint after the step reads group 0's host copy. Prefetch took the write-back's event away,
    so the checkpoint read the pinned buffer while the copy could still be going on. And a restore
    replaces a group's host buffers only once no copy reads or writes them. The CUDA branches are
    taken here with stand-ins for the stream, its events and record_stream."""
    import contextlib

    from lowmem_ft.engine.state_store import OptimizerStateStore
    from lowmem_ft.methods.optimizers import make_optimizer

    said = []

    class Event:
        def record(self, stream):
            said.append("event recorded")

        def synchronize(self):
            said.append("host waits for the event")

    class Stream:
        def wait_stream(self, other):
            pass

        def wait_event(self, event):
            said.append("stream waits for the event")

        def synchronize(self):
            said.append("host waits for the stream")

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda tensor, stream: None)
    param = torch.nn.Parameter(torch.randn(64, 64))
    optimizer = make_optimizer("adamw", [param], 1e-3, 0.0)
    param.grad = torch.randn_like(param)
    optimizer.step()
    store = OptimizerStateStore("keep", torch.device("cpu"))
    store._stream = Stream()  # as on a GPU
    store.save(0, optimizer, [param])
    store.prefetch(0)
    assert said == ["event recorded", "stream waits for the event", "event recorded"]
    exported = store.export(0)
    assert said[-1] == "host waits for the event"
    said.clear()
    store.put(0, exported)  # a restore: the old buffers go only after the stream is done with them
    assert said == ["host waits for the stream"] and 0 not in store._prefetched
