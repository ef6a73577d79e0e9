"""The planner: its byte counts against traces of the real training step, and its decisions."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from memtrace import trace_hift_step, trace_sift_step, trace_step
from test_cli import cli
from test_models import PUBLISHED_PARAMS

from lowmem_ft.errors import UserError
from lowmem_ft.methods.full.plan import estimate_full
from lowmem_ft.methods.hift.plan import estimate_hift
from lowmem_ft.methods.sparse.plan import estimate_sparse
from lowmem_ft.models.registry import ALIASES
from lowmem_ft.planner import PlanRequest, build_plan, make_plan, read_config, shape_from_config
from lowmem_ft.planner.accounting import Precision, checkpoint_bytes, shared_by_the_stack_bytes
from lowmem_ft.sizes import format_bytes_up

GiB = 1024**3


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_shape_from_config_counts_every_parameter(alias):
    shape = shape_from_config(read_config(alias)[0])
    expected = (
        PUBLISHED_PARAMS.get(alias)
        or json.loads((Path(__file__).parents[1] / "lowmem_ft/models/tiny/PROVENANCE.json").read_text())[
            "parameters"
        ]
    )
    assert shape.params == expected
    assert len(shape.units) == shape.layers + 2  # embedding, each decoder layer, final norm (+ head)


TRACE_CASES = [
    # (alias, compute dtype, checkpointing, seq_len, micro-batch)
    ("llama-2-7b", torch.float32, False, 512, 1),
    ("llama-2-7b", torch.bfloat16, False, 512, 1),
    ("llama-2-7b", torch.bfloat16, True, 1024, 2),
    ("llama-3-8b", torch.bfloat16, False, 256, 2),  # grouped KV heads, 128k vocabulary
    ("qwen2.5-0.5b", torch.float32, True, 512, 2),  # q/k/v biases, tied embedding
]


@pytest.mark.parametrize(("alias", "dtype", "checkpointing", "seq_len", "micro_batch"), TRACE_CASES)
def test_full_method_bytes_match_a_traced_step_within_5_percent(
    alias, dtype, checkpointing, seq_len, micro_batch
):
    """A 2-layer slice at the model's full width, traced on fake tensors through the recipe's own
    step, against the planner's parameter, gradient, optimizer-state and activation bytes."""
    config = {**read_config(alias)[0], "num_hidden_layers": 2}
    trace = trace_step(config, "full", 2, seq_len, micro_batch, dtype, checkpointing)
    request = PlanRequest(method="full", seq_len=seq_len, compute_bytes=2 if dtype == torch.bfloat16 else 4)
    est = estimate_full(shape_from_config(config), request, micro_batch, checkpointing)
    planned = {c.name: c.gpu_bytes for c in est.components}
    assert planned["weights (fp32 master)"] == pytest.approx(trace.params, rel=0.05)
    assert planned["gradients (fp32)"] == pytest.approx(trace.grads, rel=0.05)
    assert planned["optimizer states (AdamW fp32 m, v)"] == pytest.approx(trace.optimizer_states, rel=0.05)
    assert est.activations == pytest.approx(trace.activations, rel=0.05)


HIFT_TRACE_CASES = [
    ("llama-2-7b", torch.float32, 512),
    ("llama-2-7b", torch.bfloat16, 512),
    ("qwen2.5-0.5b", torch.bfloat16, 1024),  # tied embedding: the head unit is only the final norm
]


@pytest.mark.parametrize(("alias", "dtype", "seq_len"), HIFT_TRACE_CASES)
def test_hift_bytes_match_traced_steps_within_5_percent(alias, dtype, seq_len):
    """Every group of a 2-layer slice traced through HiFT's real step; the planner's weights,
    active-group gradients and optimizer state, and worst-group activations against the traces."""
    config = {**read_config(alias)[0], "num_hidden_layers": 2}
    shape = shape_from_config(config)
    traces = [trace_hift_step(config, group, 2, seq_len, 1, dtype) for group in range(len(shape.units))]
    request = PlanRequest(method="hift", seq_len=seq_len, compute_bytes=2 if dtype == torch.bfloat16 else 4)
    est = estimate_hift(shape, request, 1, False, units_per_group=1, state_policy="keep", streamed_units=0)
    planned = {c.name.split(" (")[0]: c.gpu_bytes for c in est.components if "streamed" not in c.name}
    largest = max(range(len(shape.units)), key=lambda g: shape.units[g].params)
    assert planned["weights"] == pytest.approx(traces[0].params, rel=0.05)
    assert planned["active group: gradients"] == pytest.approx(traces[largest].grads, rel=0.05)
    assert planned["active group: optimizer states"] == pytest.approx(
        traces[largest].optimizer_states, rel=0.05
    )
    assert planned["activations"] == pytest.approx(max(t.activations for t in traces), rel=0.05)


def plan(method: str, gpu_gib: float, host_gib: float = 64, model: str = "llama-2-7b", **options):
    shape = shape_from_config(read_config(model)[0])
    request = PlanRequest.create(method, **options)
    return make_plan(shape, request, int(gpu_gib * GiB), int(host_gib * GiB), None)


def test_full_7b_does_not_fit_24gib_and_says_by_how_much_and_what_would():
    result = plan("full", 24)
    assert not result.fits
    assert result.gpu_peak_bytes > 100 * GiB  # 16 bytes per parameter before any activation
    assert "more GPU memory" in result.shortfall and "--method hift would fit" in result.shortfall


@pytest.mark.parametrize("gpu_gib", [24, 16, 12, 8])
def test_hift_7b_fits_24_16_12_and_8_gib_streaming_when_needed(gpu_gib):
    result = plan("hift", gpu_gib)
    assert result.fits and result.gpu_peak_bytes <= gpu_gib * GiB and result.host_peak_bytes <= 64 * GiB
    streamed = result.settings["streamed_units"]
    # 13.5 GB of bf16 weights plus one layer's fp32 master, gradients and two Adam states (≈ 4.8 GB)
    # do not fit 16 GiB: from there down, units are streamed.
    assert (streamed > 0) == (gpu_gib <= 16)
    if streamed:
        assert result.settings["gradient_checkpointing"] is True
        assert result.traffic_bytes_per_step > 0


def test_hift_state_policy_follows_host_ram():
    assert plan("hift", 24, host_gib=128).settings["state_policy"] == "keep"  # 54 GB of fp32 states
    assert plan("hift", 24, host_gib=32).settings["state_policy"] == "keep-8bit"  # 13.5 GB
    assert plan("hift", 24, host_gib=12).settings["state_policy"] == "drop"


def test_sift_sparsity_rises_with_the_budget():
    rates = [plan("sift", gib).settings["sparsity"] for gib in (6, 8, 12, 16, 24, 48)]
    assert all(plan("sift", gib).fits for gib in (6, 8, 12, 16, 24, 48))
    assert rates == sorted(rates) and rates[0] < rates[-1]
    assert plan("sift", 80).settings == plan("sift", 80).settings  # deterministic
    assert plan("sift", 80).settings["base_quant"] == "none"


def test_sift_selection_window_is_scored_in_passes_that_fit():
    """Running scores are fp32 and dense: one micro-batch needs none, a window of several is scored
    a slice of the weights at a time, in more passes the smaller the budget."""
    assert plan("sift", 12).settings["selection_passes"] == 1
    passes = [plan("sift", gib, selection_batches=4).settings["selection_passes"] for gib in (8, 12, 24)]
    assert passes == sorted(passes, reverse=True) and passes[0] > passes[-1] >= 1
    assert any("passes over them" in note for note in plan("sift", 8, selection_batches=4).notes)
    # the user's --selection-passes is the plan's (the run uses it), and fewer than fit is said
    needed = plan("sift", 24, selection_batches=4).settings["selection_passes"]
    assert needed > 1
    fewer = plan("sift", 24, selection_batches=4, selection_passes=needed - 1)
    assert fewer.settings["selection_passes"] == needed - 1
    assert any(
        note.startswith(f"--selection-passes {needed - 1}: the selection scores need {needed}")
        for note in fewer.notes
    )
    assert (
        plan("sift", 24, selection_batches=4, selection_passes=needed + 2).settings["selection_passes"]
        == needed + 2
    )


def test_sift_targets_change_what_is_counted():
    everything, attention = (
        plan("sift", 48, sparsity=0.01),
        plan("sift", 48, sparsity=0.01, targets="attention"),
    )
    per_layer_attention = 4 * 4096 * 4096
    assert attention.trainable_params == 32 * math.ceil(0.01 * 4096 * 4096) * 4
    assert (
        everything.trainable_params > attention.trainable_params * (6.5e9 / (32 * per_layer_attention)) * 0.9
    )
    with pytest.raises(UserError, match="matches no linear layer"):
        plan("sift", 48, targets="qproj")


def test_a_fixed_micro_batch_that_fits_without_checkpointing_runs_without_it():
    """Checkpointing buys a larger micro-batch; with the micro-batch fixed it would buy nothing and
    cost a second forward. Where only checkpointing makes the fixed micro-batch fit, it is used."""
    fixed = plan("full", 0, host_gib=200, model="qwen2.5-0.5b", micro_batch_size=2)
    assert fixed.settings["micro_batch_size"] == 2 and fixed.settings["gradient_checkpointing"] is False
    left_open = plan("full", 0, host_gib=200, model="qwen2.5-0.5b")
    assert left_open.settings["micro_batch_size"] >= 4
    assert left_open.settings["gradient_checkpointing"] is False
    tight = plan("sift", 16, micro_batch_size=4, seq_len=4096)
    assert tight.fits and tight.settings["gradient_checkpointing"] is True
    assert not plan("sift", 16, micro_batch_size=4, seq_len=4096, gradient_checkpointing=False).fits


def test_a_planner_may_choose_only_its_methods_planned_options(monkeypatch):
    """What a method's planner chose reaches the run by option name: a name that is not one of the
    method's planned options would be dropped without a word, so it is an error."""
    from dataclasses import replace

    from lowmem_ft.registry import MethodSpec

    planner = MethodSpec.planner

    def choosing_the_order_too(spec):
        def planned(*args):
            chosen = planner(spec)(*args)
            return replace(chosen, chosen={**chosen.chosen, "order": "top-down"})

        return planned

    with monkeypatch.context() as patch:
        patch.setattr(MethodSpec, "planner", choosing_the_order_too)
        with pytest.raises(ValueError, match=r"hift's planner chose \['order'\]"):
            plan("hift", 24)
    chosen = plan("hift", 24)
    assert chosen.method_options.units_per_group == chosen.settings["units_per_group"]
    assert chosen.method_options.state_policy == chosen.settings["state_policy"]
    given = plan("hift", 24, units_per_group=2, state_policy="drop")
    assert (given.method_options.units_per_group, given.method_options.state_policy) == (2, "drop")


def test_explicit_options_win_and_the_plan_says_whether_they_fit():
    forced = plan(
        "full", 0, host_gib=200, model="qwen2.5-0.5b", micro_batch_size=16, gradient_checkpointing=False
    )
    assert forced.settings["micro_batch_size"] == 16 and forced.settings["gradient_checkpointing"] is False
    too_big = plan("sift", 16, micro_batch_size=16, gradient_checkpointing=False, seq_len=4096)
    assert not too_big.fits
    assert (
        "leaving --micro-batch-size and --gradient-checkpointing to the planner would fit"
        in too_big.shortfall
    )
    one_pinned = plan("sift", 16, micro_batch_size=16, seq_len=4096)
    assert "leaving --micro-batch-size to the planner would fit" in one_pinned.shortfall


@pytest.mark.parametrize(
    "method, options, flag",
    [
        ("hift", {"units_per_group": 8}, "--units-per-group"),
        ("sift", {"sparsity": 0.2}, "--sparsity"),
        ("lora", {"base_quant": "none"}, "--base-quant"),
    ],
)
def test_a_pinned_method_option_the_planner_would_choose_is_named_when_its_choice_fits(method, options, flag):
    """The advice frees what the user pinned of the method's own options, not only the step's; a fix
    on this GPU is said instead of a count of GPUs."""
    pinned = plan(method, 8, **options)
    assert not pinned.fits and plan(method, 8).fits
    assert pinned.shortfall.endswith(f"; leaving {flag} to the planner would fit"), pinned.shortfall


def test_cpu_plan_puts_everything_in_host_memory():
    result = plan("full", 0, host_gib=16, model="tiny")
    assert result.device == "cpu" and result.fits
    assert all(c.gpu_bytes == 0 for c in result.components)
    assert result.host_peak_bytes > 16 * 5_401_856  # weights + grads + AdamW in fp32 at least


def test_plan_cli_table_and_exit_codes(capsys):
    code, out, _ = cli(
        capsys, "plan", "llama-2-7b", "--method", "full", "--gpu-mem", "24GiB", "--cpu-mem", "64GiB"
    )
    assert code == 3 and "fits       NO: needs" in out and "weights (fp32 master)" in out
    code, out, _ = cli(
        capsys, "plan", "llama-2-7b", "--method", "hift", "--gpu-mem", "8GiB", "--cpu-mem", "64GiB"
    )
    assert code == 0 and "fits       yes" in out and "streamed_units=" in out and "traffic" in out


def test_plan_cli_json_has_the_documented_fields(capsys):
    args = ["plan", "llama-2-7b", "--method", "sift", "--gpu-mem", "16GiB", "--cpu-mem", "64GiB", "--json"]
    code, out, _ = cli(capsys, *args)
    data = json.loads(out)
    assert code == 0 and data["fits"] is True and data["method"] == "sift"
    assert 0.001 <= data["settings"]["sparsity"] <= 0.1
    assert data["gpu"]["budget_bytes"] == 16 * GiB and 0 < data["gpu"]["peak_bytes"] <= 16 * GiB
    assert data["host"]["budget_bytes"] == 64 * GiB and data["host"]["peak_bytes"] > 0
    assert {"name", "gpu_bytes", "host_bytes"} <= set(data["components"][0])
    assert sum(c["gpu_bytes"] for c in data["components"]) >= data["gpu"]["peak_bytes"] * 0.5


def test_spafit_default_cutoffs_scale_the_papers_to_the_depth_as_documented():
    from lowmem_ft.methods.spafit.plan import spafit_cutoffs

    # docs/methods.md: 4 and 9 of 24 layers, rounded half to even
    assert [spafit_cutoffs(None, n) for n in (24, 32, 28, 6)] == [(4, 9), (5, 12), (5, 10), (1, 2)]
    assert spafit_cutoffs("0,3", 6) == (0, 3)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "dora"], "--method 'dora' is not known"),
        (["--method", "lora", "--base-quant", "int8"], "--base-quant for --method lora is none or nf4"),
        (["--method", "spafit", "--cutoffs", "9,3"], "--cutoffs '9,3': expected N1,N2"),
        (["--method", "sift", "--sparsity", "5"], "--sparsity is the fraction of each weight that trains"),
        (["--method", "hift", "--state-policy", "sometimes"], "--state-policy must be one of"),
        (["--state-policy", "drop"], "--state-policy applies to --method hift, not full"),
        (["--gpu-mem", "lots"], "--gpu-mem 'lots' is not a memory size"),
        (["--method", "hift", "--units-per-group", "99"], "more than the model's 34 units"),
    ],
)
def test_plan_cli_bad_options_are_one_line(args, message, capsys):
    code, _, err = cli(capsys, "plan", "llama-2-7b", *args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_plan_says_how_many_gpus_full_fine_tuning_needs_and_plans_one_rank_of_them(capsys):
    """--nproc N plans one rank of N (FSDP2's shards, what is gathered beside them, its slice of
    the batch) and host memory for the node; a plan short of GPU memory says how many GPUs of this
    size would hold the model, and that many do."""
    args = ["plan", "llama-2-7b", "--method", "full", "--gpu-mem", "24GiB", "--cpu-mem", "256GiB"]
    code, out, _ = cli(capsys, *args)
    assert code == 3 and "8 such GPUs would fit (--nproc 8; docs/distributed.md)" in out, out
    assert cli(capsys, *args, "--nproc", "4")[0] == 3  # the smallest power of two that fits
    code, out, _ = cli(capsys, *args, "--nproc", "8", "--json")
    data = json.loads(out)
    assert code == 0 and data["ranks"] == 8 and data["settings"]["ranks"] == 8
    n = 6_738_415_616
    rows = {c["name"]: c for c in data["components"]}
    assert rows["weights (fp32, 1/8 shard)"]["gpu_bytes"] == 4 * n // 8
    assert rows["optimizer states (AdamW fp32 m, v, 1/8 shard)"]["gpu_bytes"] == 8 * n // 8
    # each rank a process of its own; rank 0 alone loads the whole model on the host, and sends it
    loading = rows["model loading (by rank 0, sent to the others a tensor at a time)"]["host_bytes"]
    runtime = rows["Python, torch, CUDA libraries"]["host_bytes"]
    assert loading == 4 * n and data["host"]["peak_bytes"] == 8 * runtime + loading
    # data-parallel ranks each load the model they hold whole (a bf16 host copy each), as many at
    # once as host memory holds beside the 8 processes; the others wait their turn
    lora = build_plan("llama-2-7b", method="lora", gpu_mem="24GiB", cpu_mem="256GiB", nproc=8).plan
    assert lora.loads_at_once == 8 and lora.host_peak_bytes == 8 * runtime + 8 * 2 * n
    lora = build_plan("llama-2-7b", method="lora", gpu_mem="24GiB", cpu_mem="64GiB", nproc=8).plan
    assert lora.fits and lora.loads_at_once == (64 * 2**30 - 8 * runtime) // (2 * n) == 3
    assert lora.host_peak_bytes == 8 * runtime + 3 * 2 * n
    assert "the 8 ranks load the model 3 at a time" in " ".join(lora.notes)
    # the rank's slice of the global batch of 16: 2 sequences
    assert data["settings"]["micro_batch_size"] * data["settings"]["gradient_accumulation"] == 2
    code, out, _ = cli(capsys, *args, "--nproc", "8")
    said = "ranks      8 (--nproc): GPU memory per rank; host rows per rank (a model loaded once, once), "
    assert said + "the host peak and budget the node's, its 8 ranks together" in out
    # a node's host memory for that many ranks: each rank's runtime, and the model loaded once; the
    # advice says how much more host memory they need, as `--nproc 8` on this machine then says
    short = ["plan", "llama-2-7b", "--method", "full", "--gpu-mem", "24GiB", "--cpu-mem", "32GiB"]
    code, out, _ = cli(capsys, *short)
    need, more = format_bytes_up(8 * runtime + 4 * n), format_bytes_up(8 * runtime + 4 * n - 32 * GiB)
    advice = f"8 such GPUs would hold its GPU memory (--nproc 8; docs/distributed.md), with {need}"
    assert code == 3 and f"{advice} of host RAM for their ranks, {more} more than this machine's" in out, out
    code, out, _ = cli(capsys, *short, "--nproc", "8")
    assert code == 3 and out.strip().endswith(f"fits       NO: needs {more} more host RAM"), out
    # more GPUs than one machine has (--nproc starts its ranks on this one) are not advised
    code, out, _ = cli(
        capsys, "plan", "llama-2-70b", "--method", "full", "--gpu-mem", "80GiB", "--cpu-mem", "300GiB"
    )
    assert code == 3 and "such GPUs" not in out, out


@pytest.mark.parametrize("method", ["bitfit", "spafit"])
def test_a_method_that_keeps_the_whole_base_says_which_method_would_fit(method):
    """BitFit and SPAFIT train little but hold the 16-bit base on the GPU: at 6 GiB a 7B model does
    not fit with them, and the advice names the methods that quantise or stream the base."""
    result = plan(method, 6)
    assert not result.fits and result.shortfall.endswith("; --method lora would fit; --method sift would fit")
    assert plan("lora", 6).fits and plan("sift", 6).fits  # (what the advice says, checked)


def test_the_advice_of_a_plan_that_does_not_fit_is_made_once(monkeypatch):
    """The plans the advice tries (other methods, more GPUs) need only whether they fit: advice of
    their own, and of their trials in turn, made `plan llama-2-70b --gpu-mem 24GiB` take a minute."""
    import lowmem_ft.planner.plan as planner

    calls = []
    advise = planner.shortfall
    monkeypatch.setattr(planner, "shortfall", lambda *args: calls.append(1) or advise(*args))
    plan = build_plan("llama-2-7b", method="full", gpu_mem="24GiB", cpu_mem="256GiB").plan
    assert "--method hift would fit" in plan.shortfall and "8 such GPUs would fit" in plan.shortfall
    assert len(calls) == 1


def test_hift_on_several_ranks_plans_sharded_state_and_never_8_bit(capsys):
    one = build_plan("llama-2-7b", method="hift", gpu_mem="16GiB", cpu_mem="40GiB").plan
    assert one.settings["state_policy"] == "keep-8bit"  # one process: the host holds only 8-bit state
    four = build_plan("llama-2-7b", method="hift", gpu_mem="16GiB", cpu_mem="400GiB", nproc=4).plan
    assert four.fits and four.settings["state_policy"] == "keep" and four.settings["streamed_units"] == 0
    states = next(c for c in four.components if c.name.startswith("optimizer states of all groups"))
    assert states.host_bytes == 8 * 6_738_415_616 // 4  # this rank's shard of every group's state
    code, _, err = cli(capsys, "plan", "llama-2-7b", "--method", "hift", "--nproc", "4", "--state-policy",
                       "keep-8bit")  # fmt: skip
    assert code == 2 and "cannot keep HiFT's waiting state in 8 bits" in err


def test_a_plan_on_the_cpu_speaks_of_no_gpu_link_and_no_pinning(capsys):
    """On the CPU nothing crosses a host<->GPU link and nothing is pinned (pinning is for copies to a
    GPU): the plan says neither, where HiFT's plan on a GPU says both."""
    code, out, err = cli(capsys, "plan", "tiny", "--method", "hift")  # (no GPU here: planned for the CPU)
    assert code == 0 and "on cpu" in out, err
    assert "traffic" not in out and "pinned" not in out
    code, out, err = cli(capsys, "plan", "tiny", "--method", "hift", "--gpu-mem", "8GiB")
    assert code == 0 and "on cuda" in out, err
    assert "host<->GPU per optimizer step" in out and "pinned host memory" in out


@pytest.mark.parametrize(
    "model, method, gpu_mem",
    [("llama-2-7b", "bitfit", "12GiB"), ("llama-2-7b", "full", "24GiB"), ("llama-2-13b", "lora", "8GiB"),
     ("qwen2.5-7b", "bitfit", "16GiB"), ("llama-3-8b", "lora", "4GiB")],
)  # fmt: skip
def test_a_budget_raised_by_the_shortfall_said_fits(model, method, gpu_mem):
    """ "needs X more GPU memory" is rounded up: the budget raised by X, as written, fits (rounded to
    the nearest, 2.52 GiB was said 2.5 and the raised budget was still short)."""
    import re

    from lowmem_ft.sizes import parse_size

    plan = build_plan(model, method=method, gpu_mem=gpu_mem, cpu_mem="256GiB").plan
    assert not plan.fits
    more = re.search(r"needs ([\d.]+ [KMGT]iB) more GPU memory", plan.shortfall).group(1)
    raised = parse_size(gpu_mem, "--gpu-mem") + parse_size(more.replace(" ", ""), "--gpu-mem")
    assert build_plan(model, method=method, gpu_mem=str(raised), cpu_mem="256GiB").plan.fits


def test_a_size_rounded_up_is_never_below_it():
    from lowmem_ft.sizes import format_bytes_up, parse_size

    for n in (1, 1023, 1024, 1025, 2_705_000_000, 2**30 - 1, 25 * 2**20 + 1, 1023.96 * 2**20):
        shown = format_bytes_up(n)
        assert parse_size(shown.replace(" ", ""), "--gpu-mem", least=1) >= n, (n, shown)
    assert format_bytes_up(2.52 * 2**30) == "2.6 GiB" and format_bytes_up(2.5 * 2**30) == "2.5 GiB"
    from lowmem_ft.sizes import format_bytes_down

    assert format_bytes_down(2.58 * 2**30) == "2.5 GiB" and format_bytes_down(1023.99 * 2**20) == "1023.9 MiB"


@pytest.mark.parametrize(
    "change, said",
    [({"num_hidden_layers": None}, "num_hidden_layers is missing"),
     ({"hidden_size": "4096"}, "hidden_size is '4096'"),
     ({"num_attention_heads": None}, "num_attention_heads is None"),
     ({"hidden_size": -4096}, "hidden_size is -4096")],
)  # fmt: skip
def test_a_damaged_model_config_is_one_line_naming_the_size(change, said, tmp_path, capsys):
    """A config.json with a size missing, written as text, null or negative: one line naming it (it
    was a KeyError, or a plan of negative gigabytes that fitted)."""
    configs = Path(__file__).resolve().parents[1] / "lowmem_ft" / "models" / "configs"
    config = json.loads((configs / "llama-2-7b.json").read_text())
    config.update({key: value for key, value in change.items() if value is not None or "missing" not in said})
    for key in [key for key, value in change.items() if value is None and "missing" in said]:
        del config[key]
    (tmp_path / "config.json").write_text(json.dumps(config))
    code, out, err = cli(capsys, "plan", tmp_path, "--method", "hift", "--gpu-mem", "24GiB")
    assert (
        code == 2
        and out == ""
        and err.strip()
        == (
            f"error: the model's config.json: {said}; it must be a positive whole number (is the file "
            "damaged? transformers' AutoConfig.from_pretrained reads what it should hold)"
        )
    )


@pytest.mark.parametrize("model", ["llama-2-7b", "llama-3-8b", "qwen2.5-7b", "qwen2.5-1.5b"])
def test_a_plans_gpu_peak_is_accounted_for_by_its_rows(model):
    """The peak is the largest moment, never more than every row together: a peak above the sum of
    the rows (full fine-tuning's head gradient, once) could not be read from the table."""
    from lowmem_ft.registry import METHOD_SPECS

    for method in METHOD_SPECS:
        plan = build_plan(model, method=method, gpu_mem="48GiB", cpu_mem="256GiB").plan
        assert plan.gpu_peak_bytes <= sum(c.gpu_bytes for c in plan.components), (model, method)


def test_plan_needs_no_weights():
    with pytest.raises(UserError, match="unknown model"):
        build_plan("no-such-model")
    result = build_plan("llama-2-70b", method="hift", gpu_mem="24GiB", cpu_mem="256GiB")
    assert result.shape.params == 68_976_648_192 and result.plan.fits


SIFT_TRACE_CASES = [
    ("llama-2-7b", torch.float32, 512, 0.01, False),
    ("llama-2-7b", torch.bfloat16, 512, 0.05, False),
    ("llama-2-7b", torch.bfloat16, 1024, 0.01, True),
    ("qwen2.5-0.5b", torch.bfloat16, 1024, 0.01, False),  # q/k/v biases, tied embedding
]


@pytest.mark.parametrize(("alias", "dtype", "seq_len", "sparsity", "checkpointing"), SIFT_TRACE_CASES)
def test_sift_bytes_match_a_traced_step_within_5_percent(alias, dtype, seq_len, sparsity, checkpointing):
    """Selection and one step of SIFT on a 2-layer slice at full width: the planner's frozen base,
    increment (values, indices, gradients, AdamW state) and activations against the trace."""
    config = {**read_config(alias)[0], "num_hidden_layers": 2}
    trace = trace_sift_step(config, sparsity, 2, seq_len, 1, dtype, checkpointing)
    request = PlanRequest(method="sift", seq_len=seq_len, compute_bytes=2 if dtype == torch.bfloat16 else 4)
    shape = shape_from_config(config)
    est = estimate_sparse(shape, request, 1, checkpointing, sparsity=sparsity, base_quant="none")
    planned = {c.name.split(" (")[0].split(":")[0]: c.gpu_bytes for c in est.components}
    assert est.trainable == trace["entries"]
    assert planned["base weights"] == pytest.approx(trace["base"], rel=0.05)
    assert planned["sparse increment"] == pytest.approx(trace["increment"], rel=0.05)
    # What autograd saves; the planner also counts what the whole-loop trace (test_looptrace.py)
    # finds alive beside it: the mask and rotary tables, and with checkpointing the last output.
    beside = shared_by_the_stack_bytes(shape, seq_len, 1)
    if checkpointing:
        beside += checkpoint_bytes(shape, seq_len, Precision(request.compute_bytes, request.compute_bytes))
    assert est.activations - beside == pytest.approx(trace["activations"], rel=0.05)


# -- QLoRA: what the loop trace cannot run (bitsandbytes' Params4bit cannot wrap a fake tensor) -----
@pytest.mark.parametrize("shape", [(688, 256), (77, 100), (4096, 1024)])
def test_qlora_base_bytes_are_what_bitsandbytes_stores(shape):
    """Each quantised weight of QLoRA's base is counted as the bytes bitsandbytes really keeps for
    it: the packed codes and every tensor of its quantisation state (double-quantised block scales)."""
    from lowmem_ft.engine.quantised import quantise_linears_4bit
    from lowmem_ft.planner.accounting import QUANT_BYTES, qlora_nf4_bytes

    rows, cols = shape
    model = torch.nn.Sequential(torch.nn.Linear(cols, rows, bias=False)).to(torch.bfloat16)
    quantise_linears_4bit(model, ("0",), torch.device("cpu"), torch.bfloat16)
    weight = model[0].weight

    def state_bytes(state) -> int:
        tensors = [getattr(state, name, None) for name in ("absmax", "code", "offset")]
        nested = state_bytes(state.state2) if getattr(state, "nested", False) else 0
        return sum(t.untyped_storage().nbytes() for t in tensors if isinstance(t, torch.Tensor)) + nested

    stored = weight.untyped_storage().nbytes() + state_bytes(weight.quant_state)
    assert stored == qlora_nf4_bytes(rows * cols)
    if rows * cols >= 2**20:  # beyond the per-tensor code tables: less than NF4 with fp32 block scales
        assert stored < 0.93 * QUANT_BYTES["nf4"] * rows * cols


def test_a_qlora_layer_keeps_for_the_backward_what_a_lora_layer_keeps():
    """The traced LoRA plans carry over to QLoRA: on the same model (bf16 under autocast, as a run
    computes), the 4-bit base layers save no tensor for the backward that the 16-bit ones do not,
    so QLoRA's activations are LoRA's; only the base's bytes differ (counted above)."""
    import types

    from transformers import LlamaConfig, LlamaForCausalLM

    from lowmem_ft.engine.quantised import quantise_linears_4bit
    from lowmem_ft.methods.structured.method import add_lora, model_linears
    from lowmem_ft.objective import autocast
    from lowmem_ft.selections import Selection

    config = LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    tokens = torch.randint(0, 512, (2, 64))

    def saved_for_backward(quantised: bool) -> list[tuple]:
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        targets = tuple(model_linears(model))
        if quantised:
            quantise_linears_4bit(model, targets, torch.device("cpu"), torch.bfloat16)
        model.requires_grad_(False)
        add_lora(
            model,
            Selection((), (), targets, ""),
            types.SimpleNamespace(lora_rank=8, lora_alpha=None, lora_dropout=0.0),
        )
        params = {p.untyped_storage()._cdata for p in model.parameters()}
        saved: dict[int, tuple] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.untyped_storage()._cdata not in params:
                saved.setdefault(t.untyped_storage()._cdata, (t.untyped_storage().nbytes(), t.dtype))
            return t

        with (
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
            autocast(torch.device("cpu"), torch.bfloat16),
        ):
            logits = model(input_ids=tokens).logits
        # bitsandbytes' autograd function may also keep tensors on its context, out of the hooks'
        # sight (older versions kept the input there): they must be its weights, nothing else
        nodes, seen, kept_on_context = [logits.grad_fn], set(), []
        while nodes:
            node = nodes.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            if "MatMul4Bit" in type(node).__name__:
                kept_on_context.append([t for t in getattr(node, "tensors", ()) if t is not None])
            nodes.extend(next_node for next_node, _ in node.next_functions)
        assert bool(kept_on_context) == quantised  # (none where a layer's input needs no gradient)
        for tensors in kept_on_context:
            assert all(t.untyped_storage()._cdata in params for t in tensors), [t.shape for t in tensors]
        return sorted(saved.values(), key=str)

    lora = saved_for_backward(quantised=False)
    assert lora and saved_for_backward(quantised=True) == lora


def test_lora_dropout_is_planned_as_the_mask_a_gpus_fused_dropout_keeps():
    """With --lora-dropout each adapter's dropout keeps a mask of its input for the backward: one
    byte per value on a GPU (torch's fused dropout; its meta kernel says which dtype). The loop
    trace cannot show it: on a CPU torch's dropout keeps an fp32 mask instead."""
    mask = torch.native_dropout(torch.empty(2, device="meta"), 0.1, True)[1]
    kept = {}
    for dropout in (0.0, 0.1):
        planned = plan(
            "lora",
            80,
            micro_batch_size=2,
            gradient_checkpointing=False,
            base_quant="none",
            lora_dropout=dropout,
        )
        kept[dropout] = next(c.gpu_bytes for c in planned.components if c.name.startswith("activations"))
    shape = shape_from_config(read_config("llama-2-7b")[0])
    inputs = sum(cols for _, cols in shape.decoder_linears().values())  # all-linear: every adapter's input
    assert kept[0.1] - kept[0.0] == 2 * 512 * inputs * mask.element_size()


def test_the_plan_vs_trace_table_never_shows_a_plan_below_its_trace_as_1_000():
    """bench/plan_vs_trace.py rounds ratios to three decimals; a plan 0.004% below its trace (as
    Mistral-7B's sharded HiFT plans at 16 and 24 GiB were) must not read as one that holds."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from plan_vs_trace import ratio_text

    assert ratio_text(0.99996) == "0.9999" and ratio_text(0.9995) == "0.9995"
    assert ratio_text(1.00004) == "1.000" and ratio_text(1.0623) == "1.062" and ratio_text(0.9876) == "0.988"


def test_8_bit_kept_state_changes_only_host_bytes():
    """Issue 14's first finding: the GPU holds kept state as fp32 whatever the host keeps (the
    active group's AdamW moments, and the next group's, dequantised on arrival). With the same
    choices, `keep` and `keep-8bit` plan the same GPU bytes, row by row; only the host row differs:
    a byte per value and a 4-byte scale per 256 (bitsandbytes' blockwise 8-bit), against 4 bytes."""
    from lowmem_ft.planner import build_plan

    def plan_of(policy):
        return build_plan(
            "llama-3-8b", method="hift", state_policy=policy, units_per_group=2, micro_batch_size=1,
            gpu_mem="24GiB", cpu_mem="256GiB",
        ).plan  # fmt: skip

    keep, eight_bit = plan_of("keep"), plan_of("keep-8bit")
    # (the rows come in the same order; the state row's name says its policy)
    assert [c.gpu_bytes for c in keep.components] == [c.gpu_bytes for c in eight_bit.components]
    assert keep.gpu_peak_bytes == eight_bit.gpu_peak_bytes
    rows = {c.name: c for c in eight_bit.components}
    master = rows["active group: fp32 master copy"].gpu_bytes  # 4 bytes a value of the largest group
    assert rows["active group: optimizer states (AdamW fp32 m, v)"].gpu_bytes == 2 * master
    assert rows["next group: optimizer states (prefetch)"].gpu_bytes > 1.99 * master  # fp32, not 8-bit
    kept = [
        next(c.host_bytes for c in plan.components if c.name.startswith("optimizer states of all"))
        for plan in (keep, eight_bit)
    ]
    values = kept[0] / 8  # fp32 m and v: 8 bytes a value
    assert kept[1] == pytest.approx(2 * values * (1 + 4 / 256), rel=1e-3)


def test_a_plan_with_under_half_a_gib_to_spare_says_it_is_a_bet():
    """Issue 14's fifth finding: the CUDA context and the allocator's fragmentation are constants
    not measured on this GPU, so a plan that leaves less than THIN_SPARE_BYTES says so."""
    from dataclasses import replace

    from lowmem_ft.planner import build_plan
    from lowmem_ft.planner.plan import THIN_SPARE_BYTES
    from lowmem_ft.planner.report import render_plan

    plan = build_plan("llama-2-7b", method="hift", gpu_mem="24GiB", cpu_mem="256GiB").plan
    assert plan.fits and THIN_SPARE_BYTES == 2**29
    for spare, said in ((THIN_SPARE_BYTES - 1, True), (THIN_SPARE_BYTES, False)):
        shown = render_plan(replace(plan, gpu_peak_bytes=plan.gpu_budget_bytes - spare), "llama-2-7b", "")
        assert ("a bet on the CUDA context and the allocator's fragmentation" in shown) == said, spare


L7, L8 = ["llama-2-7b", "--cpu-mem", "64GiB"], ["llama-3-8b", "--cpu-mem", "64GiB"]


@pytest.mark.parametrize(
    ("args", "advice", "followed"),
    [
        # HiFT: one process streams layers, ranks do not: 12 GiB holds one rank, not two
        (
            [*L7, "--method", "hift", "--gpu-mem", "12GiB", "--cpu-mem", "128GiB", "--nproc", "2"],
            "--nproc 1 would fit (one process may stream layers or keep 8-bit state; ranks do neither)",
            [*L7, "--method", "hift", "--gpu-mem", "12GiB", "--cpu-mem", "128GiB"],
        ),
        # the embedding and head are the bulk of HiFT's largest groups
        (
            [*L8, "--method", "hift", "--gpu-mem", "12GiB"],
            "--trained-units layers would fit (the embedding and head stay as they are)",
            [*L8, "--method", "hift", "--gpu-mem", "12GiB", "--trained-units", "layers"],
        ),
        # activations of a long sequence
        (
            [*L8, "--method", "lora", "--gpu-mem", "12GiB", "--seq-len", "4096"],
            "--seq-len 2048 would fit",
            [*L8, "--method", "lora", "--gpu-mem", "12GiB", "--seq-len", "2048"],
        ),
        # another method, with the step's options given, and without this method's own
        (
            [*L8, "--method", "hift", "--gpu-mem", "12GiB", "--groups", "4"],
            "--method lora would fit (without --groups)",
            [*L8, "--method", "lora", "--gpu-mem", "12GiB"],
        ),
        (
            [
                *L7,
                "--method",
                "bitfit",
                "--gpu-mem",
                "12GiB",
                "--seq-len",
                "4096",
                "--no-gradient-checkpointing",
            ],
            "--method sift would fit, leaving --gradient-checkpointing to the planner",
            [*L7, "--method", "sift", "--gpu-mem", "12GiB", "--seq-len", "4096"],
        ),
        # more GPUs, each rank's share of the batch at least the micro-batch given
        (
            [*L7, "--method", "full", "--gpu-mem", "24GiB", "--cpu-mem", "256GiB", "--micro-batch-size", "4"],
            "8 such GPUs would fit (--nproc 8 and --batch-size 32; docs/distributed.md)",
            [*L7, "--method", "full", "--gpu-mem", "24GiB", "--cpu-mem", "256GiB", "--micro-batch-size", "4"]
            + ["--nproc", "8", "--batch-size", "32"],
        ),
    ],
)
def test_advice_names_what_else_about_the_run_would_fit_and_it_does(args, advice, followed, capsys):
    """A new user's tour, and a review: these plans were advised 4, 32 or no more GPUs, or nothing,
    where a change to the run itself fits the GPU they have; another method's advice dropped the
    options given (refused or not fitting when followed); more GPUs with a micro-batch given were
    refused. Each advice is followed here, literally (a repeated option: the last one counts)."""
    code, out, _ = cli(capsys, "plan", *args)
    assert code == 3 and advice in out.strip().splitlines()[-1], out
    code, out, err = cli(capsys, "plan", *followed)
    assert code == 0, (followed, out, err)


def test_a_plan_notes_a_seq_len_beyond_the_model_s_context_and_a_thin_spare_in_its_json_too(capsys):
    code, out, _ = cli(capsys, "plan", *L7, "--method", "lora", "--gpu-mem", "48GiB", "--seq-len", "8192")
    context = "--seq-len 8192 is longer than llama-2-7b's context (4096 positions, max_position_embeddings)"
    assert code == 0 and f"note       {context}" in out, out
    code, out, _ = cli(capsys, "plan", *L7, "--method", "sift", "--gpu-mem", "8GiB", "--json")
    data = json.loads(out)
    spare = data["gpu"]["budget_bytes"] - data["gpu"]["peak_bytes"]
    thin = [note for note in data["notes"] if note.startswith("under 512 MiB to spare on the GPU: a bet")]
    assert code == 0 and spare < 2**29 and len(thin) == 1, (spare, data["notes"])


def test_a_hub_id_not_in_the_cache_is_planned_from_its_config_alone(tmp_path, capsys, monkeypatch):
    """`plan` reads only config.json: its advice for an uncached hub id was to download the weights."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = cli(capsys, "plan", "someone/not-cached-7b")
    assert code == 2 and "planning needs only that file: hf download someone/not-cached-7b config.json" in err
    assert "safetensors" not in err
