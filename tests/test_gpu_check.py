"""bench/gpu_check.py, rehearsed without a GPU: the plumbing a lent GPU's few minutes depend on.

A GPU comes by chance and for minutes, so the script must not lose what it measured when it is cut
off, and each plan case runs in a process of its own. Here: the case child prints its row (the
recipe's loop traced on fake tensors, the tiny model), and a run killed half-way leaves a valid
JSON holding every step it finished."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from test_hardware import use_nvml  # noqa: F401 (a fixture)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.py"


def test_a_plan_case_runs_in_its_own_process_and_prints_its_row():
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--case", "tiny", "hift keep", "2", "--rehearse"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert row["status"] == "PASS" and row["model"] == "tiny" and row["budget_gib"] == 2
    assert 0 < row["traced"] <= row["planned_peak"] <= 2 * 2**30
    assert "units_per_group" in row["plan"] and row["traced_phase"]


def test_a_run_killed_half_way_leaves_valid_json_with_the_steps_it_finished(tmp_path):
    report, docs = tmp_path / "gpu_check.json", tmp_path / "benchmarks.md"
    child = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--rehearse", "--json", str(report), "--write", str(docs)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            steps = json.loads(report.read_text())["steps"] if report.exists() else {}
            if "gpu tests" in steps:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the gpu tests step never finished")
        os.killpg(child.pid, signal.SIGKILL)  # cut off, as a lent machine's time limit would
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    data = json.loads(report.read_text())  # whole: written beside and renamed
    assert list(data["steps"])[:2] == ["environment", "gpu tests"]
    assert data["steps"]["environment"]["figures"]["torch"]
    assert data["steps"]["gpu tests"]["status"] in ("SKIP", "PASS")
    text = docs.read_text()
    assert "<!-- gpu-check:start -->" in text and "| gpu tests |" in text
    assert not list(tmp_path.glob("*.tmp"))


def test_the_environment_step_checks_the_card_named_by_its_uuid(use_nvml, monkeypatch):  # noqa: F811
    """Step 1 asks which card the planner picks when CUDA_VISIBLE_DEVICES names torch's card by
    its UUID (full, and a prefix as schedulers write it), and leaves the variable as it was."""
    from test_hardware import two_cards, uuid_of

    sys.path.insert(0, str(REPO / "bench"))
    import gpu_check

    use_nvml(gpus=two_cards())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert gpu_check._card_named_by_uuid("GPU-" + uuid_of(2)) == {"full": True, "prefix": True}
    assert gpu_check._card_named_by_uuid("GPU-" + uuid_of(9)) == {"full": False, "prefix": False}
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"


def test_copy_overlap_counts_only_copy_time_spent_under_compute():
    """The overlap figure of bench/streaming.py (step 4), from kernel intervals: copies that
    overlap each other count once, memsets are not compute, and a copy half under a kernel is half
    hidden."""
    sys.path.insert(0, str(REPO / "bench"))
    from streaming import copy_overlap

    kernels = [
        ("Memcpy HtoD (Pinned -> Device)", 0, 10),
        ("Memcpy HtoD (Pinned -> Device)", 5, 20),  # overlaps the first copy: 0-20 is 20 units
        ("Memset (Device)", 0, 30),  # not compute
        ("ampere_bf16_gemm", 15, 25),  # hides 15-20
        ("flash_fwd_kernel", 30, 40),
        ("Memcpy HtoD (Pinned -> Device)", 32, 36),  # fully hidden
        ("Memcpy DtoH (Device -> Pinned)", 0, 100),  # not a host-to-device copy
    ]
    figures = copy_overlap(kernels)
    assert figures["copy"] == 24 and figures["overlapped"] == 9
    assert figures["fraction"] == 9 / 24
    assert copy_overlap([])["fraction"] == 0.0
