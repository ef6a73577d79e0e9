"""Streaming decoder layers from host memory: the same training as with every weight resident."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli import cli

from lowmem_ft.engine.streaming import N_BUFFERS, place_model
from lowmem_ft.planner import build_plan

RUN = ["--max-steps", "5", "--batch-size", "4", "--micro-batch-size", "2", "--seq-len", "64", "-q",
       "--eval-every", "3", "--save-dtype", "fp32"]  # fmt: skip
METHODS = {
    "hift": ["--method", "hift", "--units-per-group", "1", "--lr", "1e-3"],
    "hift-bf16-groups-of-3": [
        "--method",
        "hift",
        "--units-per-group",
        "3",
        "--dtype",
        "bf16",
        "--lr",
        "1e-3",
    ],
    "sift": ["--method", "sift", "--sparsity", "0.05", "--lr", "1e-2", "--selection-batches", "2"],
}


@pytest.fixture()
def data(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"prompt": f"Spell {i}.", "completion": f" {i} is spelled {i}."} for i in range(24)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def outcome(job):
    rows = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
    result = job / "delta.safetensors"
    tensors = load_file(result if result.exists() else job / "model" / "model.safetensors")
    return [(r["step"], r.get("loss"), r.get("eval_loss")) for r in rows], tensors


@pytest.mark.parametrize("method", list(METHODS))
def test_a_streamed_run_equals_a_resident_one(method, tmp_path, capsys, data):
    """Bit for bit on a CPU: the same weights reach the same matmuls, only through other buffers.
    (The resident run checkpoints activations too: streaming needs it, and it changes no value.)"""
    resident, streamed = tmp_path / "resident", tmp_path / "streamed"
    args = [*METHODS[method], *RUN]
    assert cli(capsys, "run", "tiny", data, "--out", resident, "--gradient-checkpointing", *args)[0] == 0
    code, out, err = cli(capsys, "run", "tiny", data, "--out", streamed, "--stream", *args)
    assert code == 0, err
    assert "streaming  6 of 6 decoder layers from host memory" in out
    (steps_r, tensors_r), (steps_s, tensors_s) = outcome(resident), outcome(streamed)
    assert steps_s == steps_r
    assert tensors_s.keys() == tensors_r.keys()
    for key in tensors_r:
        assert torch.equal(tensors_s[key], tensors_r[key]), key


def streamed_model(model, n: int):
    from lowmem_ft.prepare import enable_checkpointing

    model.requires_grad_(False)
    model.config.use_cache = False
    streamer = place_model(model, torch.device("cpu"), n)
    enable_checkpointing(model)
    model.train()
    return streamer


@pytest.fixture()
def four_layers():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def passes(model, streamer, n: int = 3) -> list[int]:
    """Layer copies into the ring per forward/backward pass."""
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    copies = []
    for _ in range(n):
        before = streamer.copies
        model(input_ids=ids).logits.sum().backward()
        copies.append(streamer.copies - before)
    return copies


def test_buffers_are_allocated_once_and_reused(four_layers):
    """Every layer streamed, the embedding trained (so every layer is rebuilt in the backward):
    streamed weights are only ever read from the two ring buffers, which are never reallocated,
    and the layers at the turns stay put: 4 copies per pass for 8 uses (6 in the first pass)."""
    streamer = streamed_model(four_layers, 4)
    four_layers.model.embed_tokens.weight.requires_grad_(True)
    buffers = [id(t) for b in streamer.buffers for t in b.values()]
    ranges = [
        (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
        for b in streamer.buffers
        for t in b.values()
    ]
    seen = []

    def record(module, args):  # runs after the streamer's own hook has fetched the layer
        seen.extend(p.data_ptr() for p in module.parameters(recurse=False))

    for layer in four_layers.model.layers:
        for module in layer.modules():
            module.register_forward_pre_hook(record)
    assert passes(four_layers, streamer) == [6, 4, 4]
    assert [id(t) for b in streamer.buffers for t in b.values()] == buffers and len(
        streamer.buffers
    ) == N_BUFFERS
    assert seen and all(any(lo <= ptr < hi for lo, hi in ranges) for ptr in seen), "read outside the ring"


def test_frozen_layers_below_the_trained_one_are_streamed_once_per_pass(four_layers):
    """HiFT training layer 2: layers 0 and 1 only run forward (no recompute, no second copy), layer
    3 is rebuilt in the backward from the buffer it is still in."""
    streamer = streamed_model(four_layers, 4)
    streamer.pin(2)
    four_layers.model.layers[2].mlp.up_proj.weight.requires_grad_(True)
    assert passes(four_layers, streamer) == [3, 2, 2]


def test_a_pinned_layer_writes_its_updates_back_to_its_host_copy(small_model):
    streamer = streamed_model(small_model, 2)
    weight = small_model.model.layers[0].mlp.up_proj.weight
    host = dict(streamer.host[0])[weight]
    streamer.pin(0)
    assert weight.data_ptr() != host.data_ptr()  # its own memory while it trains
    with torch.no_grad():
        weight.add_(1.0)
    assert not torch.equal(weight, host)
    streamer.unpin(0)
    assert weight.data_ptr() == host.data_ptr() and torch.equal(weight, host)
    ids = torch.randint(0, 128, (1, 8))
    small_model(input_ids=ids)  # streamed again, from the updated host copy into a ring buffer
    assert weight.data_ptr() != host.data_ptr() and torch.equal(weight, host)


def test_stream_refused_where_it_cannot_work(tmp_path, capsys, data):
    code, _, err = cli(capsys, "run", "tiny", data, "--stream")
    assert code == 2 and "--stream applies to --method hift" in err
    code, _, err = cli(
        capsys, "run", "tiny", data, "--method", "hift", "--stream", "--no-gradient-checkpointing"
    )
    assert code == 2 and "--stream needs activation checkpointing" in err


def test_the_planner_streams_decoder_layers_only_and_compares_copying_with_compute():
    plan = build_plan("llama-2-7b", method="hift", gpu_mem="8GiB", cpu_mem="100GiB").plan
    streamed = plan.settings["streamed_units"]
    assert 0 < streamed <= 32 and plan.settings["gradient_checkpointing"]
    rows = {c.name: c for c in plan.components}
    layer_bytes = 2 * 202_383_360  # one llama-2-7b decoder layer in bf16
    assert rows["weights (bf16, streamed)"].host_bytes == streamed * layer_bytes
    assert rows["stream buffers"].gpu_bytes == 2 * layer_bytes
    # per micro-batch: every streamed layer in for the forward and again for the recompute
    link = plan.link_bytes_per_s
    assert plan.stream_seconds_per_micro_batch == pytest.approx(2 * streamed * layer_bytes / link)
    assert any("streaming bounds throughput" in n or "hides behind" in n for n in plan.notes)

    # A tied model with a large embedding: still only layers are streamed, the embedding stays.
    small = build_plan("qwen2.5-0.5b", method="hift", gpu_mem="1GiB", cpu_mem="64GiB").plan
    assert small.settings["streamed_units"] <= 24


def test_sift_plans_streaming_when_asked_or_when_nothing_else_fits():
    asked = build_plan("llama-2-7b", method="sift", gpu_mem="10GiB", cpu_mem="64GiB", stream=True).plan
    assert asked.settings["streamed_units"] == 32 and asked.settings["base_quant"] == "none"
    rows = {c.name: c for c in asked.components}
    assert rows["base weights (bf16, streamed)"].host_bytes == 32 * 2 * 202_383_360
    resident = build_plan("llama-2-7b", method="sift", gpu_mem="24GiB", cpu_mem="64GiB").plan
    assert not resident.settings.get("streamed_units")


@pytest.mark.parametrize("method, extra", [("hift", {}), ("sift", {"micro_batch_size": 1})])
def test_the_planner_does_not_stream_without_checkpointing_or_a_gpu(method, extra):
    """A streamed layer is rebuilt in the backward, so streaming needs activation checkpointing: with
    --no-gradient-checkpointing the plan once streamed anyway, said checkpointing was off and counted
    un-checkpointed activations and one crossing a layer (a run then switched it on). Now it streams
    nothing and says what would fit. On the CPU there is no GPU to stream to."""
    budget = dict(gpu_mem="12GiB" if method == "hift" else "8GiB", cpu_mem="64GiB", **extra)
    refused = build_plan("llama-2-7b", method=method, gradient_checkpointing=False, **budget).plan
    assert not refused.fits and not refused.settings.get("streamed_units")
    assert refused.settings["gradient_checkpointing"] is False
    assert "leaving --gradient-checkpointing to the planner would fit" in refused.shortfall
    left = build_plan("llama-2-7b", method=method, **budget).plan  # (hift streams; sift quantises)
    assert left.fits and left.settings["gradient_checkpointing"]
    on_cpu = build_plan("llama-2-7b", method=method, gpu="none", cpu_mem="28GiB", **extra).plan
    assert not on_cpu.settings.get("streamed_units")


def test_stream_keeps_the_plan_s_other_choices(tmp_path, capsys, data):
    """`--stream` changes where weights live, not what trains: with everything left to the planner,
    HiFT gets the same groups and state policy, and the same losses, as without it."""
    runs = {}
    for name, extra in (("resident", []), ("streamed", ["--stream"])):
        job = tmp_path / name
        assert cli(capsys, "run", "tiny", data, "--out", job, "--method", "hift", *RUN, *extra)[0] == 0
        runs[name] = (json.loads((job / "plan.json").read_text())["settings"], outcome(job)[0])
    (settings_r, steps_r), (settings_s, steps_s) = runs["resident"], runs["streamed"]
    for key in ("units_per_group", "state_policy"):
        assert settings_s[key] == settings_r[key]
    assert settings_s["streamed_units"] == 6 and steps_s == steps_r


def test_the_plan_counts_the_buffers_and_host_copies_the_engine_allocates(tmp_path, data):
    """The planner's `stream buffers` and streamed host bytes are what the engine allocates."""
    from lowmem_ft.config import RunConfig
    from lowmem_ft.prepare import setup

    config = RunConfig.create(model="tiny", data=data, method="hift", stream=True, max_steps=1, seq_len=64)
    s = setup(config)
    rows = {c.name: c for c in s.plan.components}  # on a CPU every component is in host memory
    streamer = s.method.streamer
    assert rows["stream buffers"].host_bytes == streamer.device_bytes()
    assert rows["weights (fp32, streamed)"].host_bytes == streamer.host_bytes()


def test_each_streamed_layer_lives_in_one_exactly_sized_host_buffer(small_model):
    """One flat host buffer per layer (pinned on a GPU without the allocator's power-of-two
    rounding), its parameters views into it, and one copy per layer into the ring."""
    from lowmem_ft.engine import host_memory

    allocated = []
    with host_memory.observe(allocated.append):
        streamer = streamed_model(small_model, 2)
    layers = small_model.model.layers
    assert [b.numel() for b in allocated] == [sum(p.numel() for p in layer.parameters()) for layer in layers]
    assert streamer.host_bytes() == sum(b.numel() * b.element_size() for b in allocated)
    for layer, buffer in zip(layers, allocated, strict=True):
        lo, hi = buffer.data_ptr(), buffer.data_ptr() + buffer.numel() * buffer.element_size()
        assert all(lo <= p.data_ptr() < hi for p in layer.parameters())
    small_model(input_ids=torch.randint(0, 128, (1, 8)))
    assert streamer.copies == 2  # one per layer, not one per parameter


@pytest.mark.parametrize("stream", [False, True])
def test_a_model_the_planner_does_not_know_still_resolves_its_run(stream, monkeypatch):
    """Without a plan (an architecture the planner has no shapes for), the run takes the defaults
    and, with --stream, streams every layer with checkpointing on; both choices set the same
    option, and the resolved run must come out with one value for it."""
    from lowmem_ft import prepare
    from lowmem_ft.config import RunConfig
    from lowmem_ft.models import resolve_model
    from lowmem_ft.planner.shapes import UnsupportedModel

    def no_shapes(*args, **kwargs):
        raise UnsupportedModel("no shapes for this architecture")

    monkeypatch.setattr(prepare, "build_plan", no_shapes)
    resolved = resolve_model("tiny")
    request = RunConfig.create(model="tiny", data=Path("x.jsonl"), method="hift", stream=stream, device="cpu")
    config, plan = prepare.plan_run(request, resolved)
    assert plan is None and config.micro_batch_size == 4
    assert config.streamed_layers == (resolved.config.num_hidden_layers if stream else 0)
    assert config.gradient_checkpointing is stream
    assert request.streamed_layers is None, "the request is not changed"
