"""The pre-flight check before step 1: the plan against what the device really has (faked here)."""

from __future__ import annotations

import re

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
