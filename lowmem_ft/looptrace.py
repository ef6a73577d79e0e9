"""The device memory of the real training loop at full 7B/8B size, traced without a GPU.

`lowmem-ft run` promises that a plan which says "fits" fits for the whole loop. This module checks
the promise on a CPU: it runs **the recipe's own code** — ``plan_run``, ``prepare_model``,
``select_entries`` (SIFT's selection window), ``train_step`` (begin step, micro-batches with
gradient accumulation, gradient reduction and clipping, the optimizer step, end of step),
``evaluate`` and ``capture`` — on a model
built from the alias's shipped config at its full depth and width, under ``FakeTensorMode``: every
tensor has a shape, a dtype and a storage size, but no memory. A dispatch mode records the live
bytes of every storage at every allocation, the peak, and the phase of the loop it happened in
(lowmem_ft/phases.py), with HiFT's active group.

What stands in for the GPU:
- the tensors are fake *CPU* tensors: the CPU-only torch cannot index fake CUDA tensors (its
  Python indexing needs a CUDA device guard, which a CPU build does not have). Everything the run
  allocates counts as device memory, except the host buffers the engine allocates through
  engine/host_memory.py (streamed layers, stored optimizer state), which the trace watches and
  reports as pinned host bytes;
- streams and events are the engine's CPU path (none): copies are immediate, so memory that a GPU
  frees only once a side-stream copy has finished is freed at once here (the planner counts a
  prefetched group's state for the whole step anyway);
- ``.item()`` and friends return 1: values are not known, and no memory depends on them.

HiFT visits, in the order a run takes them, the embedding, layers 0 and 1, the last layer and the
head, then each of those again with state of its own and the next group's prefetched, as in every
cycle after the first; other methods run two steps (the second has the state the first made).
Each traced step has two micro-batches where the plan accumulates (the second is where gradients
are summed; more repeat it), else one; a step that is there only to make the optimizer state a
later step holds (HiFT's first cycle, the other methods' first step) has one: it holds less, at
every moment, than the later step that visits its group again with that state (its second
micro-batch cost trace time; every case of tests/test_looptrace.py traces the same peak, to the
byte, without it). Evaluation runs one micro-batch of the planned size, the selection window what
the plan says. The books that count the bytes are lowmem_ft/device_books.py.

On a real GPU (``trace_run(config, on_gpu=True)``, bench/gpu_check.py) the same loop runs on real
tensors with random weights: the trace then counts CUDA storages only, and the caller reads CUDA's
own counters beside it.
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass, field
from unittest import mock

import torch

from lowmem_ft.config import RunConfig
from lowmem_ft.data.bulk import cycle_collector_paused
from lowmem_ft.device_books import DeviceBytes, FakeDevice, Recording
from lowmem_ft.distributed.ranks import SHARDED_METHODS
from lowmem_ft.engine import host_memory
from lowmem_ft.phases import phase
from lowmem_ft.planner import Plan

CUDA = torch.device("cuda")


@dataclass
class LoopTrace:
    peak: int  # device bytes of live tensors at the peak
    peak_phase: str  # e.g. "forward/backward, group 34/34 norm..head"
    # the largest live bytes seen per phase (and HiFT group)
    phase_peaks: dict[str, int] = field(default_factory=dict)
    host_buffer_bytes: int = 0  # host buffers of the engine (pinned on a GPU)
    # the engine's host bytes by owner: "streamed layers", and "state of group G" for HiFT
    host_detail: dict[str, int] = field(default_factory=dict)
    steps: list[int] = field(default_factory=list)  # the optimizer steps run, state-making first


class _NoJob:
    """The job the loop logs to: the trace writes nothing."""

    record: dict = {}

    def metrics_bytes(self) -> int:
        return 0


def trace_run(config: RunConfig, on_gpu: bool = False) -> tuple[Plan, LoopTrace]:
    """Plan ``config`` for a GPU of ``config.gpu_mem`` (raises UserError if it does not fit), then
    trace the recipe's loop for that plan; returns both. ``on_gpu``: on the real CUDA device, with
    random weights, instead of fake tensors. With ``config.nproc`` N > 1 (fake tensors only) the
    loop is rank 0's of N, its collectives on torch's fake process group (they return at once):
    FSDP2 shards, gathers and frees as it would on N GPUs."""
    from transformers import AutoModelForCausalLM

    from lowmem_ft import prepare, selection_window, train, train_state
    from lowmem_ft.data import TokenStats
    from lowmem_ft.data.batching import Batcher
    from lowmem_ft.data.tokenize import Example
    from lowmem_ft.methods import build_method
    from lowmem_ft.models import resolve_model

    resolved = resolve_model(config.model, require_weights=False)
    config, plan = prepare.plan_run(config, resolved, CUDA)
    # Two micro-batches a step where the plan has several (memory does not depend on how many more
    # there are), else one: the sum of the gradients is alive only while accumulating.
    ranks = config.nproc
    several = config.batch_size // ranks > config.micro_batch_size
    config = config.replace(batch_size=(2 if several else 1) * config.micro_batch_size * ranks)
    one_micro_batch = config.micro_batch_size * ranks  # the batch of a step that only makes state
    if ranks > 1 and on_gpu:
        raise ValueError("a trace of several ranks runs on fake tensors only (on_gpu=False)")
    method = build_method(config)
    method.group = _fake_group(ranks) if ranks > 1 else method.group
    example = Example(list(range(config.seq_len)), list(range(config.seq_len)))
    # Evaluation runs whole micro-batches of the planned size (fewer examples would trace a smaller one).
    train_examples, eval_examples = [example] * 2, [example] * config.micro_batch_size
    tokenizer = type("Tokenizer", (), {"pad_token_id": 0})()
    trace = DeviceBytes(device_type="cuda" if on_gpu else None)
    device = CUDA if on_gpu else torch.device("cpu")  # fake tensors stand on the CPU (module doc)

    def where() -> str:
        group = method.progress().get("group") if hasattr(method, "active") else None
        return f"{trace.phase_name()}, group {group}" if group else trace.phase_name()

    trace.where = where
    resolved.config.use_cache = False
    fake = contextlib.nullcontext() if on_gpu else FakeDevice()
    swap = (
        contextlib.nullcontext() if on_gpu else mock.patch("torch.utils.swap_tensors", _swap_fake_parameters)
    )
    # FSDP frees and regathers weights by resizing their storages, which no operator reports
    resizes = _fsdp_resizes(trace) if ranks > 1 else contextlib.nullcontext()
    with fake, swap, resizes:
        # Built on the host, as load_model does, and not counted: the run never holds the whole
        # model on the device; placing it there (all of it, or all but the streamed layers) is.
        model = _host_model(AutoModelForCausalLM, resolved.config, method.weight_dtype(), on_gpu)
        model.train()
        recording = Recording(trace) if on_gpu else fake.recording(trace)
        with recording, host_memory.observe(trace.host_buffer):
            with phase("setup"):
                if ranks > 1 and method.name in SHARDED_METHODS:  # as load_sharded does, from the host model
                    from lowmem_ft.distributed.fsdp import shard_model

                    shard_model(model, method.group)
                prepare.prepare_model(config, method, model, device)
            if not on_gpu:  # on the fake CPU, resident weights did not move: count what is there now
                trace.adopt([*model.parameters(), *model.buffers()])
            else:
                torch.cuda.reset_peak_memory_stats()
            trace.restart_peak()
            data = prepare.Data(train_examples, eval_examples, "text", TokenStats(), 0)
            batcher = Batcher(
                data.train, config.batch_size, config.micro_batch_size, 0, config.seed, 0, ranks
            )
            s = prepare.Setup(
                config, plan, resolved, tokenizer, data, model, 0, method, device,
                config.compute_dtype(), batcher, max_steps=10**6, group=method.group,
            )  # fmt: skip
            # Garbage in reference cycles is freed only when Python's collector happens to run, at a
            # moment that varies from run to run: it once moved a traced peak by 1.3 GiB. Collected
            # between steps and never within one, the trace sees the worst case every time.
            with cycle_collector_paused():  # gc.collect() below, between steps
                gc.collect()
                selection_window.select_entries(s)
                scaler = torch.amp.GradScaler(device.type, enabled=False)
                making_state, steps = _steps_to_trace(method)
                for step in making_state + steps:
                    gc.collect()
                    batcher.batch_size = one_micro_batch if step in making_state else config.batch_size
                    train.train_step(s, _NoJob(), step, scaler, bar=None)
                gc.collect()
                train.evaluate(s)
                with phase("checkpoint"):
                    train_state.capture(s, train_state.Progress(step=steps[-1] + 1), scaler, _NoJob())
    if ranks > 1:  # the fake group goes with the trace (a later real one must not find it)
        import torch.distributed as dist

        dist.destroy_process_group()
    detail = {"streamed layers": method.streamer.host_bytes()} if method.streamer is not None else {}
    for group, buffers in getattr(getattr(method, "store", None), "_flat", {}).items():
        detail[f"state of group {group}"] = sum(b.numel() * b.element_size() for b in buffers.values())
    traced = LoopTrace(
        trace.peak, trace.peak_phase, dict(trace.phase_peaks), host_buffer_bytes=trace.host_bytes,
        host_detail=detail, steps=making_state + steps,
    )  # fmt: skip
    return plan, traced


def _fake_group(ranks: int):
    """Rank 0 of ``ranks``, on torch's fake process group: collectives return at once."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from lowmem_ft.distributed.group import Group
    from lowmem_ft.distributed.ranks import Ranks

    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=ranks)
    group = Group(Ranks(0, ranks, 0, ranks))
    group.device_mesh()  # made now, of real tensors: under fake tensors a mesh cannot be made
    return group


@contextlib.contextmanager
def _fsdp_resizes(trace: DeviceBytes):
    from torch.distributed.fsdp._fully_shard import _fsdp_param, _fsdp_param_group

    alloc, free = _fsdp_param.alloc_storage, _fsdp_param.free_storage

    def traced_alloc(tensor: torch.Tensor) -> None:
        alloc(tensor)
        trace.resized(tensor.untyped_storage(), tensor.untyped_storage().nbytes())

    def traced_free(tensor: torch.Tensor) -> None:
        free(tensor)
        trace.resized(tensor.untyped_storage(), 0)

    with (
        mock.patch.object(_fsdp_param, "alloc_storage", traced_alloc),
        mock.patch.object(_fsdp_param, "free_storage", traced_free),
        mock.patch.object(_fsdp_param_group, "alloc_storage", traced_alloc),
    ):
        yield


def _host_model(auto_class, model_config, dtype: torch.dtype, real: bool) -> torch.nn.Module:
    """The model on the host. Fake: allocations only. Real: random weights drawn cheaply (memory
    does not depend on the values, but a NaN loss would skip the update whose memory is measured)."""
    if not real:
        return auto_class.from_config(model_config, dtype=dtype)
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():  # no per-module initialisation of 7B parameters on the CPU
        model = auto_class.from_config(model_config, dtype=dtype)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.uniform_(-0.02, 0.02, generator=generator)
    return model


def _swap_fake_parameters(t1: torch.Tensor, t2: torch.Tensor) -> None:
    """``Module.to`` swaps fake parameters (torch.utils.swap_tensors), which refuses tensors that
    FakeTensorMode's own memo holds weakly; a real run's ``.to`` sets ``.data``, as this does."""
    try:
        _real_swap(t1, t2)
    except RuntimeError:
        t1.data = t2.detach()


_real_swap = torch.utils.swap_tensors


def _steps_to_trace(method) -> tuple[list[int], list[int]]:
    """The steps that only make the optimizer state that the traced steps start with (one
    micro-batch each, module doc), and the traced steps, each in the order a run takes them."""
    groups = len(getattr(method, "groups", []))
    if not groups:
        # The first step creates the optimizer state, the second runs with it: every later step
        # repeats the second (a third step traced the same peak in every case of tests/test_looptrace.py).
        return [0], [1]
    every = method.switch_every
    # By group, not by position (a random order puts them anywhere), in the order a real run takes
    # them. First cycle (no state yet): the lowest three groups (the embedding's keeps the whole
    # stack's activations), the last layer and the head. Second cycle, each with state of its own:
    # the lowest two, the last layer's and the head's, each with the state of the group after it
    # prefetched, so the first cycle also visits those (in bottom-up order they are among the
    # first five). Four groups or fewer: a whole cycle makes the state, the next one is traced (a
    # third cycle, traced before, repeats the second: the same peak to the byte in every such case
    # of tests/test_looptrace.py and bench/gpu_check.py's rehearsal).
    if groups <= 4:
        return [v * every for v in range(groups)], [v * every for v in range(groups, 2 * groups)]
    group_at = lambda visit: method.group_at(visit * every)  # noqa: E731
    second = [v for v in range(groups, 2 * groups) if group_at(v) in {0, 1, groups - 2, groups - 1}]
    first_wanted = {0, 1, 2, groups - 2, groups - 1} | {group_at(v + 1) for v in second}
    first = [v for v in range(groups) if group_at(v) in first_wanted]
    return [v * every for v in first], [v * every for v in second]
