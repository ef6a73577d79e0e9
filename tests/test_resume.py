"""Resumable jobs: a job killed at any moment and resumed ends exactly where an uninterrupted one does.

The kill tests run the CLI in separate processes (tests/fault_runner.py, in processes forked as
tests/processes.py makes them) and SIGKILL them, at random moments and in the middle of checkpoint
writes; the others run in-process with the fault injected through monkeypatch (SIGINT sent to
ourselves, a full disk, NaN losses, out-of-memory errors).
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import fault_runner
import processes
import pytest
import torch
from safetensors.torch import load_file
from test_cli import cli  # the CLI in-process: (exit code, stdout, stderr)

from lowmem_ft import checkpoint as ckpt
from lowmem_ft import train
from lowmem_ft.config import RunConfig
from lowmem_ft.errors import UserError
from lowmem_ft.job_lock import JobLock
from lowmem_ft.jobs import Job, read_job
from lowmem_ft.resume import checkpointing_on_resume, micro_batch_on_resume

REPO = Path(__file__).resolve().parents[1]

COMMON = [
    "--max-steps", "10", "--batch-size", "4", "--micro-batch-size", "2", "--seq-len", "64",
    "--eval-every", "5", "--save-every", "2", "--keep-checkpoints", "2", "--save-dtype", "fp32",
    "--eval-fraction", "0.1", "-q",
]  # fmt: skip
METHODS = {
    "full": ["--method", "full", "--lr", "1e-3", "--weight-decay", "0.01"],
    # offloaded optimizer states: every group but the active one waits in the host store
    # with checkpointing, as a 7B run's plan has it (the micro-batch fixed at 2 fits without)
    "hift": ["--method", "hift", "--units-per-group", "1", "--state-policy", "keep", "--order", "random"]
    + ["--gradient-checkpointing"],
    "sift": ["--method", "sift", "--sparsity", "0.05", "--lr", "1e-2", "--selection-batches", "2"],
}


def run_args(method: str, data: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "tiny", str(data), "--out", str(out), *METHODS[method], *COMMON, *extra]


def trajectory(job: Path) -> list[tuple]:
    """Every logged step and evaluation, without the timings."""
    rows = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
    return [
        (r["step"], r.get("loss"), r.get("lr"), r.get("grad_norm"), r.get("skipped"), r.get("eval_loss"))
        for r in rows
    ]


def result_tensors(job: Path) -> dict[str, torch.Tensor]:
    path = job / "delta.safetensors"
    if not path.exists():
        path = job / "adapter" / "adapter_model.safetensors"
    if not path.exists():
        path = job / "model" / "model.safetensors"
    return load_file(path)


def assert_same_result(job: Path, reference: Path, evaluations: bool = True) -> None:
    mine, theirs = trajectory(job), trajectory(reference)
    if not evaluations:
        mine, theirs = ([row for row in rows if row[1] is not None] for rows in (mine, theirs))
    assert mine == theirs
    mine, theirs = result_tensors(job), result_tensors(reference)
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """``reference(capsys, method, data, *extra)``: the uninterrupted run of ``run_args(method,
    data, ..., *extra)``, made once for the module (several tests compare with the same one)."""
    made: dict[tuple, Path] = {}

    def uninterrupted(capsys, method: str, data: Path, *extra: str) -> Path:
        key = (method, *extra)
        if key not in made:
            job = tmp_path_factory.mktemp("reference") / "job"
            assert cli(capsys, *run_args(method, data, job, *extra))[0] == 0
            made[key] = job
        return made[key]

    return uninterrupted


def record(job: Path) -> dict:
    return json.loads((job / "job.json").read_text())


def steps_logged(job: Path) -> int:
    try:
        lines = (job / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return sum(1 for line in lines if line.endswith("}") and '"loss"' in line)


# -- kill at any moment ------------------------------------------------------------------------------
KILLS = {
    # (what, detail): "kill" = SIGKILL from outside after `detail` more steps and a random delay;
    # "in-write"/"after-write" = the process kills itself at its detail-th checkpoint file write;
    # "term" = SIGTERM, which must checkpoint the current step and exit 130.
    "full": [("in-write", 1), ("kill", 1), ("after-write", 4)],
    "hift": [("kill", 3), ("term", 1)],
    "sift": [("in-write", 2), ("kill", 2)],
}


@pytest.mark.parametrize("method", list(METHODS))
def test_killed_and_resumed_job_equals_an_uninterrupted_one(method, tmp_path, capsys, data, reference):
    reference = reference(capsys, method, data)

    job, rng, kills = tmp_path / "job", random.Random(method), 0
    command, stderr = run_args(method, data, job), tmp_path / "stderr"
    for what, detail in KILLS[method]:
        fault = f"kill-{what}:{detail}" if what.endswith("write") else "none"
        # the CLI in a process of its own, with the fault installed (tests/fault_runner.py)
        proc = processes.forked().Process(target=fault_runner.run, args=(fault, command, str(stderr)))
        proc.start()
        if what in ("kill", "term"):
            start = steps_logged(job)
            while proc.is_alive() and steps_logged(job) < start + detail:
                time.sleep(0.02)
            time.sleep(rng.uniform(0, 0.15))
            # (kill/terminate send nothing to a process that has already ended)
            (proc.kill if what == "kill" else proc.terminate)()
        proc.join(timeout=300)
        err = stderr.read_text()
        if proc.exitcode == 0:
            break  # it finished before the fault; the rest of the test still holds
        kills += 1
        if what == "term":
            assert proc.exitcode == 130, err
            rec = record(job)
            assert rec["status"] == "interrupted" and rec["last_checkpoint"]["step"] == rec["step"], err
        else:
            assert proc.exitcode == -signal.SIGKILL, err
            assert read_job(job).status == "interrupted"  # "running", but no live process holds it
        if what.endswith("write"):  # killed inside a checkpoint write: its directory is unfinished
            assert list((job / "checkpoints").glob(".partial-step-*")), "the kill missed the write"
        command = ["resume", str(job), "-q"]
    assert kills >= 2, f"the job finished before it could be killed ({kills} kills)"

    code, out, err = cli(capsys, *command)
    assert code == 0, err
    assert record(job)["status"] == "done"
    assert not list((job / "checkpoints").glob(".partial-*"))
    assert_same_result(job, reference)


# -- in-process faults ------------------------------------------------------------------------------
def signal_at_step(monkeypatch, step: int, count: int = 1, sig=signal.SIGINT) -> None:
    """Send ``sig`` to this process ``count`` times while step ``step`` is being logged."""
    original = train.Job.log

    def log(self, **metrics):
        original(self, **metrics)
        if metrics.get("step") == step and "loss" in metrics:
            for _ in range(count):
                os.kill(os.getpid(), sig)

    monkeypatch.setattr(train.Job, "log", log)


VARIANTS = {
    "hift-bf16-keep-8bit": [
        "--method", "hift", "--units-per-group", "2", "--state-policy", "keep-8bit", "--dtype", "bf16",
    ],
    "hift-drop-switch-every-2": [
        "--method", "hift", "--state-policy", "drop", "--switch-every", "2", "--order", "top-down",
    ],
    "sift-int8-grad2": [
        "--method", "sift", "--sparsity", "0.02", "--base-quant", "int8", "--selection-score", "grad2",
        "--lr", "1e-2",
    ],
    "full-adamw8bit": ["--method", "full", "--optimizer", "adamw8bit", "--lr", "1e-3"],
    # streamed layers: the active group's host copies are written back before they are saved; BAdam's
    # order, drawn again for the second cycle (step 4 on), after the resume
    "hift-stream": ["--method", "hift", "--units-per-group", "2", "--stream", "--order", "random-cycle"],
}  # fmt: skip


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sigint_checkpoints_the_current_step_and_resume_continues_exactly(
    variant, tmp_path, capsys, monkeypatch, data
):
    args = [*VARIANTS[variant], *COMMON, "--max-steps", "7"]
    reference, job = tmp_path / "reference", tmp_path / "job"
    assert cli(capsys, "run", "tiny", data, "--out", reference, *args)[0] == 0

    with monkeypatch.context() as patch:
        signal_at_step(patch, 3)
        code, _, err = cli(capsys, "run", "tiny", data, "--out", job, *args)
    assert code == 130 and f"lowmem-ft resume {job}" in err
    rec = record(job)
    assert rec["status"] == "interrupted" and rec["step"] == 3 and rec["stopped_by"] == "SIGINT"
    assert (
        rec["last_checkpoint"]["step"] == 3
        and ckpt.verify_checkpoint(job / "checkpoints/step-000003") is None
    )

    code, out, err = cli(capsys, "resume", job, "-q")
    assert code == 0, err
    assert "resume     from step-000003 (step 3/7)" in out
    assert_same_result(job, reference)


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch, data):
    job = tmp_path / "job"
    signal_at_step(monkeypatch, 3, count=2)
    code, _, err = cli(capsys, *run_args("full", data, job))
    assert code == 130
    rec = record(job)
    assert rec["status"] == "interrupted" and rec["last_checkpoint"]["step"] == 2
    assert [p.name for p in ckpt.list_checkpoints(job)] == ["step-000002"]
    assert "the last checkpoint is checkpoints/step-000002" in err


def test_sigterm_is_handled_like_ctrl_c(tmp_path, capsys, monkeypatch, data):
    job = tmp_path / "job"
    signal_at_step(monkeypatch, 5, sig=signal.SIGTERM)
    assert cli(capsys, *run_args("sift", data, job))[0] == 130
    rec = record(job)
    assert rec["stopped_by"] == "SIGTERM" and rec["last_checkpoint"]["step"] == 5


@pytest.mark.parametrize("damage", ["truncate", "flip", "no-manifest"])
def test_a_damaged_newest_checkpoint_is_skipped_for_the_one_before(
    damage, tmp_path, capsys, monkeypatch, data, reference
):
    reference, job = reference(capsys, "hift", data), tmp_path / "job"
    with monkeypatch.context() as patch:
        signal_at_step(patch, 6)
        assert cli(capsys, *run_args("hift", data, job))[0] == 130
    newest = job / "checkpoints" / "step-000006"
    tensors = newest / "tensors-00000.safetensors"
    if damage == "truncate":
        tensors.write_bytes(tensors.read_bytes()[:-100])
    elif damage == "flip":
        raw = bytearray(tensors.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        tensors.write_bytes(bytes(raw))
    else:
        (newest / "manifest.json").unlink()
    assert ckpt.verify_checkpoint(newest) is not None

    code, out, err = cli(capsys, "resume", job, "-q")
    assert code == 0, err
    assert "checkpoint step-000006 is damaged" in out and "resume     from step-000004" in out
    assert_same_result(job, reference)


def test_disk_full_while_saving_fails_clearly_and_keeps_the_previous_checkpoint(
    tmp_path, capsys, monkeypatch, data
):
    job = tmp_path / "job"
    original, calls = ckpt._write_file, []

    def write(path, data_bytes):
        calls.append(path)
        if "step-000004" in str(path):  # the second checkpoint
            raise OSError(errno.ENOSPC, "No space left on device")
        original(path, data_bytes)

    monkeypatch.setattr(ckpt, "_write_file", write)
    code, _, err = cli(capsys, *run_args("full", data, job))
    assert code == 4  # a write the disk refused (docs/resume.md)
    assert len(err.strip().splitlines()) == 1, err
    assert "the disk is full (the checkpoint needs about" in err
    assert "; the previous checkpoint step-000002 is intact" in err
    rec = record(job)
    assert rec["status"] == "failed" and "disk is full" in rec["error"]
    assert [p.name for p in ckpt.list_checkpoints(job)] == ["step-000002"]
    assert ckpt.verify_checkpoint(job / "checkpoints" / "step-000002") is None
    assert not list((job / "checkpoints").glob(".partial-*"))

    monkeypatch.setattr(ckpt, "_write_file", original)  # space freed: the job can go on
    code, out, _ = cli(capsys, "resume", job, "-q")
    assert code == 0 and "from step-000002" in out and record(job)["status"] == "done"


def test_a_live_job_refuses_a_second_process_and_a_stale_lock_is_taken_over(
    tmp_path, capsys, monkeypatch, data
):
    job = tmp_path / "job"
    signal_at_step(monkeypatch, 2)
    assert cli(capsys, *run_args("full", data, job))[0] == 130

    holder = JobLock(job)
    holder.acquire()  # as a live process running the job would
    code, _, err = cli(capsys, "resume", job)
    assert code == 2 and f"is being run by process {os.getpid()}" in err
    # `run --out` on it names the process too (not "continue it with resume", which would be refused)
    code, _, err = cli(capsys, *run_args("full", data, job))
    assert code == 2 and f"--out {job} is being run by process {os.getpid()}; wait for it" in err, err
    holder.release()

    # A process that held the lock and died: its pid is in the file, but no one holds the flock.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (job / "lock").write_text(json.dumps({"pid": dead.pid, "started": 1.0}))
    rec = record(job)
    rec["status"] = "running"  # killed without a chance to say so
    (job / "job.json").write_text(json.dumps(rec))
    assert read_job(job).status == "interrupted"
    code, out, err = cli(capsys, "resume", job, "-q")
    assert code == 0, err
    assert f"taken over from process {dead.pid}" in out


def inject_bad_losses(monkeypatch, micro_batches: set[int], value: float) -> None:
    """Multiply the loss of the given training micro-batches (counted from 1) by ``value``."""
    real_loss_sum, calls = train.loss_sum, {"n": 0}

    def loss_sum(model, batch, device, dtype):
        total = real_loss_sum(model, batch, device, dtype)
        if not model.training:  # evaluation
            return total
        calls["n"] += 1
        return total * value if calls["n"] in micro_batches else total

    monkeypatch.setattr(train, "loss_sum", loss_sum)


def test_nan_losses_are_skipped_and_too_many_in_a_row_stop_the_job(tmp_path, capsys, monkeypatch, data):
    # two micro-batches per step: steps 3 and 6, 7, 8 get a NaN loss
    inject_bad_losses(monkeypatch, {5, 11, 13, 15}, float("nan"))
    job = tmp_path / "job"
    code, _, err = cli(capsys, *run_args("full", data, job, "--max-bad-steps", "3"))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "NaN/Inf for 3 steps in a row (steps 6-8)" in err and "checkpoints/step-000006" in err
    rec = record(job)
    assert rec["status"] == "failed" and "NaN/Inf" in rec["error"] and rec["step"] == 8
    rows = [json.loads(x) for x in (job / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("skipped")] == [3, 6, 7, 8]


@pytest.mark.parametrize(
    "method",
    [["--method", "full"], ["--method", "hift", "--groups", "1", "--dtype", "bf16"]],
    ids=["full", "hift-bf16"],
)
def test_a_skipped_step_changes_nothing_and_the_run_goes_on(method, tmp_path, capsys, monkeypatch, data):
    inject_bad_losses(monkeypatch, {6}, float("inf"))  # the second micro-batch of step 3
    job = tmp_path / "job"
    args = [
        "run", "tiny", data, "--out", job, *method, *COMMON, "--max-steps", "4", "--save-every", "1",
        "--keep-checkpoints", "9",
    ]  # fmt: skip
    code, out, _ = cli(capsys, *args)
    assert code == 0 and "skipped    1 step with a NaN/Inf loss: [3]" in out
    assert record(job)["skipped_steps"] == [3]
    before, after = (ckpt.load_checkpoint(job / "checkpoints" / f"step-00000{i}") for i in (2, 3))
    for name, weight in before["weights"].items():
        assert torch.equal(weight, after["weights"][name]), name
    if "optimizer" in before["method"]:
        optimizer_before, optimizer_after = before["method"]["optimizer"], after["method"]["optimizer"]
        for i, state in optimizer_before["state"].items():
            for key, value in state.items():
                assert torch.equal(value, optimizer_after["state"][i][key]), (i, key)
    else:  # hift: the active group's optimizer state and fp32 masters
        assert before["method"]["active"] == after["method"]["active"] == 0
        for a, b in zip(before["method"]["masters"], after["method"]["masters"], strict=True):
            assert torch.equal(a, b)
        for a, b in zip(*(m["method"]["group_states"][0] for m in (before, after)), strict=True):
            assert all(torch.equal(a[k], b[k]) for k in a)
        assert before["method"]["rounding_rng"].equal(after["method"]["rounding_rng"])  # no re-rounding
    assert after["data"] != before["data"]  # the bad batch is not retried: its data was consumed


def test_out_of_memory_retries_the_step_with_a_smaller_micro_batch(tmp_path, capsys, monkeypatch, data):
    reference, job = tmp_path / "reference", tmp_path / "job"
    assert cli(capsys, *run_args("full", data, reference, "--micro-batch-size", "1"))[0] == 0
    real_loss_sum = train.loss_sum

    def loss_sum(model, batch, device, dtype):
        if model.training and batch["input_ids"].shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_loss_sum(model, batch, device, dtype)

    monkeypatch.setattr(train, "loss_sum", loss_sum)
    code, out, err = cli(capsys, *run_args("full", data, job, "-q"))
    assert code == 0, err
    rec = record(job)
    assert rec["micro_batch_size_after_oom"] == 1 and rec["oom_retries"] == [
        {"step": 1, "micro_batch_size": [2, 1]}
    ]
    plan = json.loads((job / "plan.json").read_text())
    for view in ("settings", "execution"):
        assert plan[view]["micro_batch_size"] == 1 and plan[view]["gradient_accumulation"] == 4, view
    # The same examples per step, cut smaller: the same training as a run planned with micro-batch 1.
    # (The first evaluation ran before the retry, with micro-batches of 2: other padding, other bits.)
    assert_same_result(job, reference, evaluations=False)


def test_out_of_memory_at_micro_batch_1_names_the_phase_and_the_job_resumes_exactly(
    tmp_path, capsys, monkeypatch, data, reference
):
    """Past the retry (micro-batch 1 already), the forward/backward's out-of-memory error is said as
    every phase's is: one line with the phase, where the job can continue from and a command
    `resume` takes; the job resumes to the uninterrupted run's result."""
    reference = reference(capsys, "full", data, "--micro-batch-size", "1")
    job, real_loss_sum, calls = tmp_path / "job", train.loss_sum, [0]

    def loss_sum(model, batch, device, dtype):
        calls[0] += model.training
        if model.training and calls[0] == 4 * 4 + 2:  # step 5's second micro-batch (4 a step)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real_loss_sum(model, batch, device, dtype)

    with monkeypatch.context() as patch:
        patch.setattr(train, "loss_sum", loss_sum)
        code, out, err = cli(capsys, *run_args("full", data, job, "--micro-batch-size", "1"))
    assert code == 2
    (line,) = err.strip().splitlines()
    assert line.startswith(
        "error: out of GPU memory in forward/backward at step 5; the job can continue from "
    )
    assert "even micro-batch 1 does not fit" in line and f"`lowmem-ft resume {job} --gpu-mem " in line, line
    assert record(job)["status"] == "failed" and record(job)["out_of_memory_in"] == "forward/backward"
    code, out, err = cli(capsys, "resume", str(job), "-q")
    assert code == 0, err
    assert_same_result(job, reference)


def test_a_stop_during_the_selection_window_stops_it_and_the_job_resumes_exactly(
    tmp_path, capsys, monkeypatch, data, reference
):
    """SIGTERM in SIFT's selection window stops it at the next micro-batch (it ran on to the
    window's end, minutes at 7B); resume selects again and ends as the uninterrupted run."""
    from lowmem_ft import selection_window
    from lowmem_ft.phases import current_phase

    window = ["--selection-batches", "6"]
    reference = reference(capsys, "sift", data, *window)
    job, real_loss_sum, selected = tmp_path / "job", selection_window.loss_sum, []

    def loss_sum(model, batch, device, dtype):
        if current_phase() == "selection":
            selected.append(1)
            if len(selected) == 2:
                os.kill(os.getpid(), signal.SIGTERM)
        return real_loss_sum(model, batch, device, dtype)

    with monkeypatch.context() as patch:
        patch.setattr(selection_window, "loss_sum", loss_sum)
        code, out, err = cli(capsys, *run_args("sift", data, job, *window))
    assert code == 130, err
    assert len(selected) == 2  # the third micro-batch of the window was not run
    assert record(job)["status"] == "interrupted"
    code, out, err = cli(capsys, "resume", str(job), "-q")
    assert code == 0, err
    assert_same_result(job, reference)


def test_the_micro_batch_a_job_learned_from_running_out_is_bounded_by_each_ranks_share_on_resume():
    """After an out-of-memory retry the job resumes with at most the micro-batch that fitted; resumed
    on more ranks, at most each rank's share of the batch (a larger one would be refused as given)."""
    requested = RunConfig.create(model="tiny", data="d.jsonl", method="full", batch_size=8)
    learned = {"micro_batch_size_after_oom": 4}
    assert micro_batch_on_resume(requested, {}, nproc=4) is None  # the planner chooses
    assert micro_batch_on_resume(requested, learned, nproc=1) == 4
    assert micro_batch_on_resume(requested, learned, nproc=4) == 2
    assert micro_batch_on_resume(requested.replace(micro_batch_size=1), learned, nproc=1) == 1


def test_a_job_that_ran_out_of_memory_with_checkpointing_keeps_it_on_resume():
    """The micro-batch a job learned fitted with the checkpointing it ran with; resumed, that
    micro-batch is fixed, and the planner would run a fixed micro-batch without checkpointing
    wherever its estimate (the one that ran out) says it fits."""
    requested = RunConfig.create(model="tiny", data="d.jsonl", method="full", batch_size=8)
    ran_with = {"micro_batch_size_after_oom": 1, "config": {"gradient_checkpointing": True}}
    assert checkpointing_on_resume(requested, ran_with) is True
    assert checkpointing_on_resume(requested, {"config": {"gradient_checkpointing": True}}) is None
    ran_without = {"micro_batch_size_after_oom": 1, "config": {"gradient_checkpointing": False}}
    assert checkpointing_on_resume(requested, ran_without) is None  # the planner may add it
    given = requested.replace(gradient_checkpointing=False)
    assert checkpointing_on_resume(given, ran_with) is False  # the user's word wins


# -- the commands around a job ----------------------------------------------------------------------
def interrupted_job(tmp_path, capsys, monkeypatch, data, step: int = 2) -> Path:
    job = tmp_path / "job"
    with monkeypatch.context() as patch:
        signal_at_step(patch, step)
        assert cli(capsys, *run_args("full", data, job))[0] == 130
    return job


def test_run_on_an_unfinished_job_offers_to_resume_it(tmp_path, capsys, monkeypatch, data):
    job = interrupted_job(tmp_path, capsys, monkeypatch, data)
    before = (job / "job.json").read_text()

    # not interactive (a script, CI): one line saying how to continue; nothing changes
    code, _, err = cli(capsys, *run_args("full", data, job))
    assert (
        code == 2
        and f"holds an unfinished job (interrupted at step 2/10); continue it with `lowmem-ft resume {job}`"
        in err
    )
    assert (job / "job.json").read_text() == before

    # interactive: asked, and a yes resumes with the job's own settings
    import lowmem_ft.cli.training as cli_module

    monkeypatch.setattr(cli_module, "_interactive", lambda: True)
    said_before_asking = []
    monkeypatch.setattr(
        cli_module.typer,
        "confirm",
        lambda *a, **k: said_before_asking.append(capsys.readouterr().out) or True,
    )
    code, out, err = cli(capsys, *run_args("full", data, job, "--lr", "5e-3"))
    assert code == 0, err
    assert "this command's differ in --lr" in said_before_asking[0]  # (it came after the answer)
    assert "resume     from step-000002" in out
    assert record(job)["status"] == "done" and record(job)["config"]["lr"] == 1e-3


def test_resume_on_ranks_that_shard_refuses_one_process_checkpoint_before_taking_the_job(
    tmp_path, capsys, monkeypatch, data
):
    """`full` checkpointed by one process holds whole weights, which sharded ranks cannot read: a
    resume with --nproc 2 is refused in one line before any rank starts, and the job stays as it
    was (it was taken, marked failed and recorded with --nproc 2, so that even the resume the line
    advised failed the same way)."""
    job = interrupted_job(tmp_path, capsys, monkeypatch, data)
    before = (job / "job.json").read_text()
    code, _, err = cli(capsys, "resume", job, "--nproc", "2")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "was written by one process, and only one can resume from it; resume with --nproc 1" in err
    assert (job / "job.json").read_text() == before


def test_the_sharded_ranks_look_at_the_newest_checkpoint_before_they_start(tmp_path):
    """A job of two ranks, resumed on one, then interrupted, holds a sharded checkpoint and a newer
    one-process one (--keep-checkpoints 2): resume continues from the newer, which ranks that shard
    cannot read; the other way round they can."""
    from lowmem_ft.checkpoint import SHARDS
    from lowmem_ft.resume import _refuse_one_process_checkpoint

    (tmp_path / "checkpoints" / "step-000002" / SHARDS).mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-000004").mkdir()
    with pytest.raises(UserError, match="step-000004 was written by one process"):
        _refuse_one_process_checkpoint(tmp_path, "full")
    _refuse_one_process_checkpoint(tmp_path, "lora")  # (data-parallel ranks read whole weights)
    (tmp_path / "checkpoints" / "step-000006" / SHARDS).mkdir(parents=True)
    _refuse_one_process_checkpoint(tmp_path, "full")


def test_a_failure_of_ranks_is_recorded_only_in_a_job_they_took(tmp_path):
    """The launcher records the failed rank's line in job.json only where its ranks took the job:
    not in a job another live process runs, nor in one the ranks refused before taking it (its own
    status and error stay)."""
    import time

    from lowmem_ft.jobs import record_failure

    job = Job.create(tmp_path / "job", {}, status="failed", error="the first failure")
    job.lock.release()
    before = time.time() + 1  # ranks that started after job.json was last written: they did not take it
    record_failure(job.dir, "refused: the data changed", since=before)
    assert record(job.dir)["error"] == "the first failure"
    since = time.time() - 1
    holder = JobLock(job.dir)
    holder.acquire()  # a live process runs it
    record_failure(job.dir, "refused: it is being run", since=since)
    assert record(job.dir)["error"] == "the first failure"
    holder.release()
    Job.open(job.dir).update(status="running")  # taken by the ranks, one of which was then killed
    record_failure(job.dir, "rank 1 was killed (SIGKILL)", since=since)
    assert record(job.dir)["status"] == "failed" and record(job.dir)["error"] == "rank 1 was killed (SIGKILL)"


def test_resume_refuses_what_it_cannot_resume(tmp_path, capsys, monkeypatch, data):
    code, _, err = cli(capsys, "resume", tmp_path / "nothing")
    assert code == 2 and "no such directory" in err
    (tmp_path / "empty").mkdir()
    code, _, err = cli(capsys, "resume", tmp_path / "empty")
    assert code == 2 and "not a job directory" in err

    job = interrupted_job(tmp_path, capsys, monkeypatch, data)
    # a job an earlier lowmem-ft started with settings this one refuses (as --stream with an NF4
    # base now is): its advice would name options resume does not take
    old = tmp_path / "old-settings"
    shutil.copytree(job, old)
    (old / "job.json").write_text(
        json.dumps({**record(job), "requested": {**record(job)["requested"], "seq_len": 0}})
    )
    code, _, err = cli(capsys, "resume", old)
    assert code == 2 and err.startswith(
        "error: this job was started with settings this lowmem-ft refuses: --seq-len"
    )
    assert err.rstrip().endswith(
        "; resume keeps a job's settings, so start a new job with `lowmem-ft run`"
    ), err
    # a device this machine does not have: its usual advice ("use --device cpu") is not for resume
    on_a_gpu = {**record(job)["requested"], "device": "cuda"}
    (old / "job.json").write_text(json.dumps({**record(job), "requested": on_a_gpu}))
    if not torch.cuda.is_available():
        code, _, err = cli(capsys, "resume", old)
        assert code == 2 and err.strip() == (
            "error: --device cuda was asked for but no CUDA device is visible (this job was started with it, "
            "and resume keeps a job's device); resume it on a machine that has it"
        )
    # what is not a setting (the data file moved away, this machine's GPUs) is said as it was; a job
    # that kept its tokenised examples resumes on them (tests/test_faults.py), this one kept none
    gone = {**record(job)["requested"], "data": str(tmp_path / "gone.jsonl")}
    (old / "job.json").write_text(json.dumps({**record(job), "requested": gone}))
    shutil.rmtree(old / "tokenized")
    code, _, err = cli(capsys, "resume", old)
    assert code == 2 and err.strip() == (
        f"error: {tmp_path / 'gone.jsonl'} (data) is gone, and {old} kept no tokenised examples to resume "
        f"on; put the file back at {tmp_path / 'gone.jsonl'}"
    ), err

    # the same data made into other rows than the job drew from (--pack's, cut from examples cut to
    # --seq-len first, where the job kept no tokenised data): not the same batches
    rows = tmp_path / "other-rows"
    shutil.copytree(job, rows)
    then = record(job)["data"]
    (rows / "job.json").write_text(json.dumps({**record(job), "data": {**then, "train_records": 99}}))
    code, _, err = cli(capsys, "resume", rows)
    made = then["train_records"]
    assert (
        code == 2
        and (
            f"this job drew its batches from 99 training rows, and this lowmem-ft makes {made} of the same "
            "data, so it cannot continue on the same batches: start the job again"
        )
        in err
    )

    data.write_text(data.read_text() + json.dumps({"prompt": "new", "completion": " row"}) + "\n")
    code, _, err = cli(capsys, "resume", job)
    assert code == 2 and f"{data} changed since the job started; resuming needs the same data" in err
    assert record(job)["status"] == "interrupted"

    held_out = tmp_path / "eval.jsonl"  # the evaluation file too: the eval losses must stay comparable
    held_out.write_text(data.read_text())
    with_eval = tmp_path / "with-eval"
    with monkeypatch.context() as patch:
        signal_at_step(patch, 1)
        assert cli(capsys, *run_args("full", data, with_eval, "--eval-data", str(held_out)))[0] == 130
    held_out.write_text(held_out.read_text() + json.dumps({"prompt": "new", "completion": " row"}) + "\n")
    code, _, err = cli(capsys, "resume", with_eval)
    assert code == 2 and f"{held_out} changed since the job started; resuming needs the same --eval-data" in (
        err
    )

    done = tmp_path / "done"
    assert cli(capsys, *run_args("full", data, done, "--max-steps", "1"))[0] == 0
    code, _, err = cli(capsys, "resume", done)
    assert code == 2 and f"is done (step 1/1); its result is {done / 'model'}; there is nothing" in err
    shutil.copytree(done, tmp_path / "copied")  # named where it is now, not where it was written
    code, _, err = cli(capsys, "resume", tmp_path / "copied")
    assert code == 2 and f"its result is {tmp_path / 'copied' / 'model'}; there is nothing" in err
    code, _, err = cli(capsys, *run_args("full", data, done))
    assert code == 2 and "holds a finished job" in err


def test_jobs_lists_status_and_last_checkpoint(tmp_path, capsys, monkeypatch, data):
    job = interrupted_job(tmp_path, capsys, monkeypatch, data, step=3)
    code, out, _ = cli(capsys, "jobs", tmp_path)
    header, row = out.splitlines()[:2]
    assert "CHECKPOINT" in header
    assert row.split()[:4] == [str(job), "interrupted", "3/10", "step"] and row.split()[4] == "3"
    assert f"continue with `lowmem-ft resume {job}`" in out
    listed = json.loads(cli(capsys, "jobs", tmp_path, "--json")[1])
    assert listed[0]["checkpoint_step"] == 3 and listed[0]["status"] == "interrupted"
    # a failed job is resumed as an interrupted one is: said where its error does not say it
    (job / "job.json").write_text(json.dumps({**record(job), "status": "failed", "error": "RuntimeError: x"}))
    out = cli(capsys, "jobs", tmp_path)[1]
    assert f"{job}: failed: RuntimeError: x; `lowmem-ft resume {job}` continues it" in out


def test_a_resume_that_is_interrupted_again_and_resumed_again_still_matches(
    tmp_path, capsys, monkeypatch, data, reference
):
    reference = reference(capsys, "sift", data)
    job = tmp_path / "job"
    for step, command in ((3, run_args("sift", data, job)), (9, ["resume", job, "-q"])):
        with monkeypatch.context() as patch:
            signal_at_step(patch, step)
            assert cli(capsys, *command)[0] == 130
    assert record(job)["resumes"] == 1
    code, out, _ = cli(capsys, "resume", job, "-q")
    assert code == 0 and "\nselection  " not in out  # the entries chosen before the first stop are kept
    assert_same_result(job, reference)


def test_resume_replans_and_says_what_changed(tmp_path, capsys, monkeypatch, data, reference):
    reference = reference(capsys, "full", data)
    job = interrupted_job(tmp_path, capsys, monkeypatch, data, step=4)
    import lowmem_ft.run_data as run_data

    hashed, sha256_of = [], run_data.sha256_of
    monkeypatch.setattr(run_data, "sha256_of", lambda files: hashed.append(list(files)) or sha256_of(files))
    code, out, err = cli(capsys, "resume", job, "--micro-batch-size", "1", "-q")
    assert code == 0, err
    assert hashed == [[data]]  # read once for its digest (it read the data twice: seconds for a large file)
    assert "plan       changed for this machine: micro_batch_size 2 → 1" in out
    assert json.loads((job / "plan.json").read_text())["settings"]["micro_batch_size"] == 1
    # The same examples per step in smaller pieces: equal up to the order of summation.
    mine, theirs = trajectory(job), trajectory(reference)
    assert mine[:5] == theirs[:5]  # evaluation at 0 and steps 1-4, from before the stop
    for a, b in zip(mine, theirs, strict=True):
        assert a[0] == b[0] and (a[1] is None) == (b[1] is None)
        assert (a[1] or a[5]) == pytest.approx(b[1] or b[5], rel=1e-4)


def test_resume_keeps_the_method_settings_the_planner_chose_for_the_first_machine(
    tmp_path, capsys, monkeypatch, data
):
    """HiFT's group size (and a sparse method's sparsity) are part of the result: a machine on which
    the planner would choose differently must not change them in the middle of a job."""
    reference, job = tmp_path / "reference", tmp_path / "job"
    args = ["--method", "hift", *COMMON]  # --units-per-group left to the planner
    assert cli(capsys, "run", "tiny", data, "--out", reference, *args)[0] == 0
    with monkeypatch.context() as patch:
        signal_at_step(patch, 3)
        assert cli(capsys, "run", "tiny", data, "--out", job, *args)[0] == 130
    chosen = record(job)["config"]["units_per_group"]
    assert chosen is not None and record(job)["requested"]["units_per_group"] is None

    from lowmem_ft import prepare

    real_build_plan = prepare.build_plan

    def other_machine(*a, **k):  # a planner that, unasked, would pick another group size here
        result = real_build_plan(*a, **k)
        if k.get("units_per_group") is None:
            result.plan.settings["units_per_group"] = chosen + 1
        return result

    monkeypatch.setattr(prepare, "build_plan", other_machine)
    code, _, err = cli(capsys, "resume", job, "-q")
    assert code == 0, err
    assert record(job)["config"]["units_per_group"] == chosen
    assert_same_result(job, reference)


# -- out of memory in every phase of the loop ---------------------------------------------------------
def raise_oom_once(monkeypatch, owner, name: str, on_call: int) -> None:
    """``owner.name`` raises a CUDA out-of-memory error the ``on_call``-th time it is called."""
    real, calls = getattr(owner, name), [0]

    def patched(*args, **kwargs):
        calls[0] += 1
        if calls[0] == on_call:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, patched)


OOM_PHASES = {
    # phase: (method, where the error is raised, on which call)
    "begin step": ("hift", "lowmem_ft.methods.hift.method.HiFT.begin_step", 5),
    "gradients": ("hift", "lowmem_ft.methods.base.Method.reduce_gradients", 5),
    "optimizer step": ("hift", "torch.amp.GradScaler.step", 5),
    "end step": ("hift", "lowmem_ft.methods.hift.method.HiFT.end_step", 5),
    "evaluation": ("hift", "lowmem_ft.train.eval_batches", 2),  # the evaluation after step 5
    "checkpoint": ("hift", "lowmem_ft.train_state.save_checkpoint", 2),
    "selection": ("sift", "lowmem_ft.methods.sift.method.GradientEntries.choose", 1),
}


@pytest.mark.parametrize("phase", list(OOM_PHASES))
def test_out_of_memory_in_any_phase_names_it_and_the_job_resumes_exactly(
    phase, tmp_path, capsys, monkeypatch, data, reference
):
    import importlib

    method, target, on_call = OOM_PHASES[phase]
    args = ["--max-steps", "8"]
    reference, job = reference(capsys, method, data, *args), tmp_path / "job"
    module_name, owner_name, name = target.rsplit(".", 2)
    try:
        owner = getattr(importlib.import_module(module_name), owner_name)
    except (ImportError, AttributeError):  # a module-level function: module.function
        module_name, name = target.rsplit(".", 1)
        owner = importlib.import_module(module_name)
    with monkeypatch.context() as patch:
        raise_oom_once(patch, owner, name, on_call)
        code, out, err = cli(capsys, *run_args(method, data, job, *args))
    assert code == 2
    (line,) = err.strip().splitlines()  # one line, no traceback
    assert f"out of GPU memory in {phase}" in line and "lowmem-ft resume" in line, line
    assert record(job)["status"] == "failed" and record(job)["out_of_memory_in"] == phase
    code, out, err = cli(capsys, "resume", str(job), "-q")
    assert code == 0, err
    assert_same_result(job, reference)
