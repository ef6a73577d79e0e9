"""GPU tier: the CUDA paths (pinned buffers, side-stream prefetch and write-back, bf16 weights with
fp32 masters) against the CPU reference. Marked `gpu`; skipped where there is no CUDA device."""

from __future__ import annotations

import copy

import pytest
import torch
from test_hift import batches, config, run_method

from lowmem_ft.engine.state_store import OptimizerStateStore
from lowmem_ft.methods import build_method
from lowmem_ft.methods.optimizers import make_optimizer

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def run_hift(model, cfg, data, device, dtype=torch.float32) -> list[float]:
    _, losses = run_method(model, cfg, data, dtype, device)
    torch.cuda.synchronize()
    return losses


@pytest.mark.parametrize("policy", ["keep", "keep-8bit"])
def test_state_store_round_trip_through_pinned_memory(policy):
    param = torch.nn.Parameter(torch.randn(256, 512, device=CUDA))
    optimizer = make_optimizer("adamw", [param], 1e-3, 0.0)
    param.grad = torch.randn_like(param)
    optimizer.step()
    original = {k: v.clone() for k, v in optimizer.state[param].items()}
    store = OptimizerStateStore(policy, CUDA)
    store.save(0, optimizer, [param])
    assert all(buffer.is_pinned() for buffer in store._flat[0].values())  # registered, exactly sized
    store.prefetch(0)
    store.load(0, optimizer, [param])
    for key, value in original.items():
        restored = optimizer.state[param][key]
        assert restored.is_cuda
        if policy == "keep" or value.numel() < 256:
            assert torch.equal(restored, value), key
        else:
            assert (restored - value).abs().max() <= 0.02 * value.abs().max(), key


@pytest.mark.parametrize("policy", ["keep", "drop"])
def test_hift_on_cuda_matches_the_cpu_run(policy, small_model):
    data = batches(small_model, 8)
    cfg = config(units_per_group=1, state_policy=policy, dtype="fp32")
    on_cpu, on_gpu = small_model, copy.deepcopy(small_model).to(CUDA)
    cpu_losses = run_hift(on_cpu, cfg, data, torch.device("cpu"))
    gpu_losses = run_hift(on_gpu, cfg, data, CUDA)
    assert gpu_losses == pytest.approx(cpu_losses, rel=1e-4)
    for (name, a), b in zip(on_cpu.named_parameters(), on_gpu.parameters(), strict=True):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-4, atol=1e-5, msg=name)


def test_hift_bf16_weights_with_fp32_masters_on_cuda(small_model):
    model = small_model.to(CUDA, torch.bfloat16)
    cfg = config(units_per_group=2, dtype="bf16", device="cuda", lr=1e-3)
    assert build_method(cfg).weight_dtype() == torch.bfloat16
    data = batches(model, 12)
    losses = run_hift(model, cfg, data * 2, CUDA, torch.bfloat16)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-4:]) < sum(losses[:4])  # it learns the repeated batches
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


@pytest.mark.parametrize("method", ["hift", "sift"])
def test_streamed_run_on_cuda_matches_the_resident_one(method, tmp_path, capsys):
    """The CUDA streaming path (pinned host copies, side-stream prefetch, events) against every
    weight resident on the same GPU: the same losses and weights."""
    import json

    from safetensors.torch import load_file
    from test_cli import cli

    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"{i}?", "completion": f" {i}."}) + "\n" for i in range(24))
    )
    extra = ["--units-per-group", "1"] if method == "hift" else ["--sparsity", "0.05", "--lr", "1e-2"]
    args = [
        "--method", method, *extra, "--max-steps", "4", "--batch-size", "4", "--micro-batch-size", "2",
        "--seq-len", "64", "--device", "cuda", "--dtype", "fp32", "--save-dtype", "fp32", "-q",
    ]  # fmt: skip
    jobs = {}
    for name, flag in (("resident", "--gradient-checkpointing"), ("streamed", "--stream")):
        jobs[name] = tmp_path / name
        assert cli(capsys, "run", "tiny", data, "--out", jobs[name], flag, *args)[0] == 0
    losses = {
        name: [json.loads(x).get("loss") for x in (job / "metrics.jsonl").read_text().splitlines()]
        for name, job in jobs.items()
    }
    assert losses["streamed"] == pytest.approx(losses["resident"], rel=1e-5)
    result = "delta.safetensors" if method == "sift" else "model/model.safetensors"
    a, b = (load_file(job / result) for job in jobs.values())
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def llama2_layers(tmp_path_factory):
    """Three decoder layers of Llama-2-7B's shape (4096 wide, 11008 MLP, its 32,000-token vocabulary)
    with random weights and the tiny model's tokenizer: real layer sizes for the race tests."""
    import json
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    from lowmem_ft.models.registry import TINY_DIR, alias_config_path

    shape = json.loads(alias_config_path("llama-2-7b").read_text())
    config = LlamaConfig(**{**shape, "num_hidden_layers": 3, "torch_dtype": "bfloat16"})
    out = tmp_path_factory.mktemp("llama-2-layers")
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_DIR / name, out / name)
    return out


@pytest.mark.parametrize("slow", ["compute", "copies"])
@pytest.mark.parametrize(
    ("model", "method"), [("tiny", "hift"), ("llama-2 layers", "hift"), ("llama-2 layers", "sift")]
)
def test_streaming_stays_exact_when_compute_or_copies_are_slowed(
    slow, model, method, tmp_path, capsys, monkeypatch, request
):
    """Races: with the main stream held back before every layer's compute, or the side stream held
    back before every layer's copy, a streamed run must still equal the resident one (an
    unsynchronised buffer reuse or read would show as different losses): the tiny model in fp32,
    and three layers of Llama-2-7B's size in bf16 with autocast, checkpointing and (SIFT) sparse
    increments. Never run on a GPU yet: bench/gpu_check.py runs it, also under
    TORCH_CUDA_SANITIZER=1."""
    import json

    from test_cli import cli

    from lowmem_ft.engine import streaming

    cycles = 2_000_000  # about 1 ms at GPU clocks: longer than a small layer's compute or copy
    real_load, real_compute = streaming.LayerStreamer._load, streaming.LayerStreamer._compute

    def load_late(self, i, main):
        if self._side is not None:
            with torch.cuda.stream(self._side):
                torch.cuda._sleep(cycles)  # queued before the copy: the copy lands late
        return real_load(self, i, main)

    def compute_late(self, i, args):
        real_compute(self, i, args)
        torch.cuda._sleep(cycles)  # on the main stream, after the wait and before the layer computes

    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"{i}?", "completion": f" {i}."}) + "\n" for i in range(24))
    )
    extra = ["--units-per-group", "1"] if method == "hift" else ["--sparsity", "0.01", "--lr", "1e-3"]
    dtype = "fp32" if model == "tiny" else "bf16"
    args = [
        "--method", method, *extra, "--max-steps", "4", "--batch-size", "4",
        "--micro-batch-size", "2", "--seq-len", "64", "--device", "cuda", "--dtype", dtype, "-q",
    ]  # fmt: skip
    if model != "tiny":
        model = str(request.getfixturevalue("llama2_layers"))
    assert (
        cli(capsys, "run", model, data, "--out", tmp_path / "resident", "--gradient-checkpointing", *args)[0]
        == 0
    )
    if slow == "copies":
        monkeypatch.setattr(streaming.LayerStreamer, "_load", load_late)
    else:
        monkeypatch.setattr(streaming.LayerStreamer, "_compute", compute_late)
    assert cli(capsys, "run", model, data, "--out", tmp_path / "streamed", "--stream", *args)[0] == 0
    losses = {
        name: [
            json.loads(x).get("loss") for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        ]
        for name in ("resident", "streamed")
    }
    # Bit for bit: streaming moves the same weights to the same kernels (gpu_check sets
    # CUBLAS_WORKSPACE_CONFIG); any difference is a race or a nondeterministic kernel, both findings.
    assert losses["streamed"] == losses["resident"]


@pytest.mark.parametrize("policy", ["keep", "keep-8bit"])
def test_state_store_export_right_after_save_waits_for_the_copy(policy):
    """A checkpoint taken right after a group's state was saved reads the host copies: with the side
    stream held back before the copy, export must still give the saved values, not what the pinned
    buffer held before (issue 17, step 3)."""
    param = torch.nn.Parameter(torch.randn(1024, 1024, device=CUDA))
    optimizer = make_optimizer("adamw", [param], 1e-3, 0.0)
    store = OptimizerStateStore(policy, CUDA)
    for visit in range(2):  # the second save writes into the buffer the first one filled
        param.grad = torch.randn_like(param)
        optimizer.step()
        original = {k: v.clone() for k, v in optimizer.state[param].items()}
        with torch.cuda.stream(store._stream):
            torch.cuda._sleep(50_000_000)  # tens of ms: the copy out lands late
        store.save(0, optimizer, [param])
        exported = store.export(0)[0]
        restored = store.group_state(0)[0]
        for key, value in original.items():
            value = value.cpu()
            if isinstance(exported[key], dict):  # 8-bit: codes; compare the dequantised state
                got = restored[key].cpu()
                assert (got - value).abs().max() <= 0.02 * value.abs().max(), (visit, key)
            else:
                assert torch.equal(exported[key].cpu(), value), (visit, key)
        store.prefetch(0)
        store.load(0, optimizer, [param])


@pytest.mark.parametrize("policy", ["keep", "keep-8bit"])
def test_a_group_saved_and_prefetched_in_one_switch_is_exported_and_loaded_whole(policy):
    """One begin_step saves a group and prefetches it back (two groups, or a random order drawing
    the group it left), with the side stream held back: the checkpoint after the step must still
    read the saved values, and the state loaded for the next step must be the saved one (8-bit:
    expanded from codes that have landed, by bitsandbytes on the side stream)."""
    params = [torch.nn.Parameter(torch.randn(1024, 1024, device=CUDA)) for _ in range(3)]
    optimizer = make_optimizer("adamw", params, 1e-3, 0.0)
    for param in params:
        param.grad = torch.randn_like(param)
    optimizer.step()
    original = [{k: v.clone().cpu() for k, v in optimizer.state[p].items()} for p in params]
    store = OptimizerStateStore(policy, CUDA)
    with torch.cuda.stream(store._stream):
        torch.cuda._sleep(50_000_000)  # the copy out lands late
    store.save(0, optimizer, params)
    store.prefetch(0)
    with torch.cuda.stream(store._stream):
        torch.cuda._sleep(50_000_000)  # and so does whatever the side stream does next
    exported = store.export(0)
    store.load(0, optimizer, params)
    for param, saved, kept in zip(params, original, exported, strict=True):
        for key, value in saved.items():
            loaded = optimizer.state[param][key].cpu()
            if isinstance(kept[key], dict):  # 8-bit: within the codes' error
                assert (loaded - value).abs().max() <= 0.02 * value.abs().max(), key
            else:
                assert torch.equal(kept[key].cpu(), value) and torch.equal(loaded, value), key


def test_a_micro_batch_that_does_not_fit_is_retried_smaller_on_a_real_gpu(tmp_path, capsys):
    """Issue 17, step 6: with the device capped (set_per_process_memory_fraction) between what
    micro-batch 2 and micro-batch 16 need, a run asked for 16 meets a real out-of-memory error,
    retries the step with smaller micro-batches, records it, finishes, and gives its memory back."""
    import json

    from test_cli import cli

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"{i} " * 400}) + "\n" for i in range(64)))
    args = [
        "--max-steps", "3", "--batch-size", "16", "--seq-len", "512", "--device", "cuda",
        "--dtype", "fp32", "--eval-fraction", "0", "--no-gradient-checkpointing", "-q",
    ]  # fmt: skip

    def peak(micro_batch: int) -> int:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        out = tmp_path / f"measure-{micro_batch}"
        assert (
            cli(capsys, "run", "tiny", data, "--out", out, "--micro-batch-size", str(micro_batch), *args)[0]
            == 0
        )
        return torch.cuda.max_memory_allocated()

    small, large = peak(2), peak(16)
    assert large > 1.5 * small, (small, large)
    baseline = torch.cuda.memory_allocated()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction((small + (large - small) / 2) / total)
    try:
        job = tmp_path / "capped"
        code, _, err = cli(capsys, "run", "tiny", data, "--out", job, "--micro-batch-size", "16", *args)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert code == 0, err
    record = json.loads((job / "job.json").read_text())
    assert record["status"] == "done" and record["oom_retries"], record
    assert record["micro_batch_size_after_oom"] < 16
    steps = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in steps if "loss" in row] == [1, 2, 3]
    torch.cuda.empty_cache()
    assert torch.cuda.memory_allocated() <= baseline + (1 << 20), "the retry left memory behind"
