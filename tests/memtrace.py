"""Trace the memory of one real training step on fake tensors (no real memory, CPU only).

Builds a slice of a real model (its full width, few layers) under FakeTensorMode, runs the
recipe's own pieces — ``method.setup``, ``loss_sum``, backward, ``optimizer.step`` — under
torch's MemTracker, and reports parameter, gradient, optimizer-state and activation bytes. The
planner's numbers are checked against these.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker


@dataclass
class Trace:
    params: int
    grads: int
    optimizer_states: int
    activations: int  # live after the forward pass and loss, before backward
    peak: int


def _category_bytes(snapshot: dict, name: str) -> int:
    (per_device,) = snapshot.values()
    return sum(v for k, v in per_device.items() if name in str(k))


def _total(snapshot: dict) -> int:
    (per_device,) = snapshot.values()
    return sum(v for k, v in per_device.items() if "TOTAL" not in str(k).upper())


def _fake_model_and_batch(cfg, method, run_config, checkpointing: bool, micro_batch: int, seq_len: int):
    """Inside FakeTensorMode: the model built from ``cfg``, set up by ``method``, and one batch."""
    from transformers import AutoModelForCausalLM

    from lowmem_ft.prepare import enable_checkpointing

    # The dtype must be explicit: from_config would otherwise follow the config's torch_dtype.
    model = AutoModelForCausalLM.from_config(cfg, dtype=method.weight_dtype())
    if checkpointing:
        enable_checkpointing(model)
    model.train()
    method.setup(model)
    ids = torch.randint(0, cfg.vocab_size, (micro_batch, seq_len))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _state_bytes(optimizer) -> int:
    """Bytes of the optimizer's state tensors (not the step counters)."""
    return sum(
        v.numel() * v.element_size()
        for state in optimizer.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor) and v.ndim > 0
    )


def trace_step(
    config: dict,
    method_name: str,
    layers: int = 2,
    seq_len: int = 512,
    micro_batch: int = 1,
    compute_dtype: torch.dtype = torch.bfloat16,
    checkpointing: bool = False,
) -> Trace:
    from transformers import AutoConfig

    from lowmem_ft.config import RunConfig
    from lowmem_ft.methods import build_method
    from lowmem_ft.objective import loss_sum

    cfg = AutoConfig.for_model(**{**config, "num_hidden_layers": layers, "use_cache": False})
    cfg._attn_implementation = "sdpa"
    run_config = RunConfig.create(model="trace", data=Path("trace.jsonl"), method=method_name, lr=1e-5)
    method = build_method(run_config)
    device = torch.device("cpu")
    with FakeTensorMode():
        model, batch = _fake_model_and_batch(cfg, method, run_config, checkpointing, micro_batch, seq_len)
        tracker = MemTracker()
        tracker.track_external(model, method.optimizer)
        with tracker:
            for step in range(2):  # the second step has optimizer state, as every later step does
                method.begin_step(step)
                before_forward = tracker.get_tracker_snapshot("current")
                total = loss_sum(model, batch, device, compute_dtype)
                if step == 1:
                    after_forward = tracker.get_tracker_snapshot("current")
                (total / (seq_len * micro_batch)).backward()
                if step == 1:
                    after_backward = tracker.get_tracker_snapshot("current")
                method.optimizer.step()
                method.optimizer.zero_grad(set_to_none=True)
                method.end_step(step)
                if step == 0:
                    tracker.reset_mod_stats()
            peak = tracker.get_tracker_snapshot("peak")
    return Trace(
        params=_category_bytes(after_forward, "PARAM"),
        grads=_category_bytes(after_backward, "GRAD"),
        optimizer_states=_category_bytes(after_forward, "OPT"),
        # Everything the forward pass (and loss) left alive: saved activations, logits, and under
        # autocast the 16-bit weight copies. Measured as a difference, whatever category it got.
        activations=_total(after_forward) - _total(before_forward),
        peak=_total(peak),
    )


def saved_activation_bytes(model, run_forward) -> int:
    """Bytes autograd saves for the backward while ``run_forward()`` runs: unique storages, not
    parameters. For the full method this agrees with MemTracker's live activation bytes to a few
    KB; unlike MemTracker it works when parameters are frozen (HiFT)."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in params:
            seen.setdefault(storage._cdata, storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run_forward()
    return sum(seen.values())


def trace_hift_step(config: dict, group: int, layers: int = 2, seq_len: int = 512, micro_batch: int = 1,
                    compute_dtype: torch.dtype = torch.float32) -> Trace:  # fmt: skip
    """One HiFT step with ``group`` active (one unit per group), on fake tensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lowmem_ft.config import RunConfig
    from lowmem_ft.methods import build_method
    from lowmem_ft.objective import loss_sum

    cfg = AutoConfig.for_model(**{**config, "num_hidden_layers": layers, "use_cache": False})
    cfg._attn_implementation = "sdpa"
    dtype_name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[compute_dtype]
    run_config = RunConfig.create(model="trace", data=Path("t.jsonl"), method="hift", lr=1e-5,
                           units_per_group=1,
                           state_policy="keep", dtype=dtype_name, device="cpu")  # fmt: skip
    method = build_method(run_config)
    with FakeTensorMode():
        model = AutoModelForCausalLM.from_config(cfg, dtype=method.weight_dtype())
        model.train()
        method.setup(model)
        ids = torch.randint(0, cfg.vocab_size, (micro_batch, seq_len))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        method.begin_step(method.order.index(group))
        losses = []
        activations = saved_activation_bytes(
            model, lambda: losses.append(loss_sum(model, batch, torch.device("cpu"), compute_dtype))
        )
        (losses[0] / (seq_len * micro_batch)).backward()
        method.reduce_gradients()
        grads = sum(p.grad.numel() * p.grad.element_size() for p in method.trainable_parameters())
        method.optimizer.step()
        states = _state_bytes(method.optimizer)
        params = sum(p.numel() * p.element_size() for p in model.parameters())
    return Trace(params=params, grads=grads, optimizer_states=states, activations=activations, peak=0)


def backward_extra_bytes(model, forward) -> int:
    """Peak bytes of the tensors the backward of ``forward()``'s loss creates, while it runs."""
    loss = forward()
    from lowmem_ft.device_books import DeviceBytes, Recording

    tracker = DeviceBytes()
    with Recording(tracker):
        loss.backward()
    return tracker.peak


def trace_sift_step(config: dict, sparsity: float, layers: int = 2, seq_len: int = 512, micro_batch: int = 1,
                    compute_dtype: torch.dtype = torch.float32,
                    checkpointing: bool = False) -> dict[str, int]:  # fmt: skip
    """Selection on one micro-batch, then one SIFT step, on fake tensors: bytes by component."""
    from transformers import AutoConfig

    from lowmem_ft.config import RunConfig
    from lowmem_ft.methods import build_method
    from lowmem_ft.objective import loss_sum

    cfg = AutoConfig.for_model(**{**config, "num_hidden_layers": layers, "use_cache": False})
    cfg._attn_implementation = "sdpa"
    dtype_name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[compute_dtype]
    run_config = RunConfig.create(model="trace", data=Path("t.jsonl"), method="sift", sparsity=sparsity,
                           lr=1e-5,
                           dtype=dtype_name, device="cpu")  # fmt: skip
    method = build_method(run_config)
    cpu = torch.device("cpu")
    with FakeTensorMode():
        model, batch = _fake_model_and_batch(cfg, method, run_config, checkpointing, micro_batch, seq_len)
        method.select([batch], lambda b: loss_sum(model, b, cpu, compute_dtype).backward())
        losses = []
        activations = saved_activation_bytes(
            model, lambda: losses.append(loss_sum(model, batch, cpu, compute_dtype))
        )
        losses[0].backward()
        values = method.trainable_parameters()
        grads = sum(p.grad.numel() * p.grad.element_size() for p in values)
        method.optimizer.step()
        states = _state_bytes(method.optimizer)
        layers_ = method.layers.values()
        increment = grads + states + sum(p.numel() * p.element_size() for p in values)
        increment += sum(layer.indices.numel() * layer.indices.element_size() for layer in layers_)
        base = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    return {
        "base": base,
        "increment": increment,
        "activations": activations,
        "entries": method.trainable_count(),
    }
