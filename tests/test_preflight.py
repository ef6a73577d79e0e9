"""The pre-flight check before step 1: the plan against what the device really has (faked here)."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch

from lowmem_ft.errors import UserError
from lowmem_ft.planner import build_plan
from lowmem_ft.preflight import DeviceMemory, check_plan_fits_device
from lowmem_ft.sizes import parse_size

GiB = 1024**3
CUDA = torch.device("cuda")


def plan_for(gpu_mem: str):
    return build_plan("llama-2-7b", method="hift", gpu_mem=gpu_mem, cpu_mem="256GiB").plan


def test_a_plan_that_fits_the_device_passes():
    plan = plan_for("24GiB")
    assert plan.fits
    # A 24 GiB card with only its 0.6 GiB context and the weights setup has placed.
    memory = DeviceMemory(
        free=int(23.4 * GiB) - 13 * GiB, total=24 * GiB, allocated=13 * GiB, reserved=13 * GiB
    )
    check_plan_fits_device(plan, CUDA, memory)


def test_another_process_on_the_card_is_refused_in_one_line_with_a_budget_that_fits():
    plan = plan_for("24GiB")
    # Another process took 3 GiB after the plan was made from NVML's free memory.
    memory = DeviceMemory(
        free=int(20.4 * GiB) - 13 * GiB, total=24 * GiB, allocated=13 * GiB, reserved=13 * GiB
    )
    with pytest.raises(UserError) as caught:
        check_plan_fits_device(plan, CUDA, memory)
    message = str(caught.value)
    assert "\n" not in message and "short" in message and "held outside this run's tensors" in message
    suggested = re.search(r"--gpu-mem (\S+) to plan", message).group(1)
    # The suggested budget gives a plan whose tensors fit in what is free.
    replanned = plan_for(suggested)
    assert replanned.fits and parse_size(suggested, "--gpu-mem") < 24 * GiB
    check_plan_fits_device(replanned, CUDA, memory)


def test_a_run_refused_before_step_1_writes_nothing(tmp_path, capsys, monkeypatch):
    """`lowmem-ft run` on a device with less free than its plan: one line, exit code 2, and no job
    directory (the check runs after the model is placed and before the job is written)."""
    from test_cli import cli

    from lowmem_ft import preflight, prepare

    data = tmp_path / "data.jsonl"
    data.write_text("".join(f'{{"prompt": "Count to {i}.", "completion": " {i}."}}\n' for i in range(16)))
    # A CPU run has a CPU plan: checked as the plan of 8 GiB of tensors that a GPU with 1 GiB free refuses.
    monkeypatch.setattr(prepare, "measures_free_memory", lambda device: True)
    monkeypatch.setattr(preflight, "device_memory", lambda device: DeviceMemory(GiB, 24 * GiB, 0, 0))
    real_check = prepare.check_plan_fits_device
    monkeypatch.setattr(
        prepare,
        "check_plan_fits_device",
        lambda plan, device: real_check(replace(plan, gpu_peak_bytes=9 * GiB), device),
    )
    out = tmp_path / "job"
    code, _, err = cli(capsys, "run", "tiny", data, "--out", out, "--max-steps", "2", "-q")
    assert code == 2
    (line,) = err.strip().splitlines()
    assert line.startswith("error: the plan needs ") and "--gpu-mem " in line, line
    assert not out.exists() and list(tmp_path.iterdir()) == [data]
