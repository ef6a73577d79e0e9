"""What a hostile user, a full disk and a race between two runs must not be able to do: lose data,
leave something that blocks the next `run` or `resume`, or end in a traceback. Each test here failed
before its fix (issue 15); docs/resume.md lists the faults and what the user sees."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from test_cli import cli  # the CLI in-process: (exit code, stdout, stderr)

from lowmem_ft.errors import UserError
from lowmem_ft.job_lock import abandon_new_job, claim_new_job
from lowmem_ft.jobs import Job

FAST = ["--max-steps", "3", "--batch-size", "4", "--micro-batch-size", "2", "--seq-len", "64", "-q"]
FULL = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture()
def data(tmp_path) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text(
        "".join(
            json.dumps({"prompt": f"Count to {i}.", "completion": f" {i} done."}) + "\n" for i in range(24)
        )
    )
    return path


# -- 1. two runs, one --out ------------------------------------------------------------------------
def test_a_run_whose_out_another_run_has_claimed_is_refused_and_names_that_process(tmp_path, capsys, data):
    """The claim is taken before setup (minutes of loading and tokenising): a second run given the
    same --out in that time is refused; before, both could finish and share one job directory."""
    out = tmp_path / "job"
    other = claim_new_job(out)  # another run, still in its setup
    code, _, err = cli(capsys, "run", "tiny", data, "--out", out, *FAST)
    assert code == 2
    assert f"--out {out} is taken by another run (process {os.getpid()})" in one_line(err)
    assert sorted(p.name for p in out.iterdir()) == ["lock"]  # nothing of the refused run
    abandon_new_job(other)
    assert not out.exists()  # the claim made the directory, and takes it away unused
    deep = tmp_path / "a" / "b" / "job"
    abandon_new_job(claim_new_job(deep))
    assert not (tmp_path / "a").exists()  # and the parents it made for it


def test_a_run_that_finds_the_out_made_a_job_while_it_waited_for_the_lock_is_refused(tmp_path, monkeypatch):
    """The race itself: the directory is free when looked at, another run makes it a job before
    this one has the lock; the check under the lock refuses, and the other job is left whole."""
    import lowmem_ft.job_lock as job_lock

    out, real_check = tmp_path / "job", job_lock.check_new_job_directory

    def other_run_finishes_meanwhile(directory):
        real_check(directory)
        if not (directory / "job.json").exists():
            directory.mkdir(exist_ok=True)
            (directory / "job.json").write_text('{"config": {}}')

    monkeypatch.setattr(job_lock, "check_new_job_directory", other_run_finishes_meanwhile)
    with pytest.raises(UserError, match="holds a job; continue it with `lowmem-ft resume"):
        claim_new_job(out)
    assert (out / "job.json").read_text() == '{"config": {}}'


def test_an_out_left_holding_only_a_lock_by_a_killed_run_is_free_again(tmp_path, capsys, data):
    out = tmp_path / "job"
    out.mkdir()
    (out / "lock").write_text(json.dumps({"pid": 999999999, "started": 0}))
    code, _, err = cli(capsys, "run", "tiny", data, "--out", out, *FAST)
    assert code == 0, err
    assert Job.open(out).record["status"] == "done"


def test_an_out_or_a_job_on_a_read_only_file_system_is_one_line_exit_2(tmp_path, capsys, data, monkeypatch):
    """A read-only mount (a dataset volume, a container's image) is a place the user chose, not a
    disk that filled up: exit 2, saying what would work. Before, an --out that existed there was
    "OSError: [Errno 30]" with exit 1, one that did not was exit 4, a full disk's code."""
    read_only = tmp_path / "mounted"
    (read_only / "job").mkdir(parents=True)
    (read_only / "empty").mkdir()
    (read_only / "job" / "job.json").write_text(json.dumps({"status": "interrupted", "config": {}}))
    real_open, real_mkdir = os.open, Path.mkdir

    def refused(path):
        if read_only in Path(path).parents:
            raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(
        os, "open", lambda path, *args, **kwargs: refused(path) or real_open(path, *args, **kwargs)
    )
    monkeypatch.setattr(
        Path, "mkdir", lambda path, *a, **k: (path.exists() or refused(path)) or real_mkdir(path, *a, **k)
    )
    new_job, write = "give a path you can write to", "copy it somewhere writable"
    cases = [
        (
            ["run", "tiny", data, "--out", read_only / "new", *FAST],
            f"cannot create --out {read_only / 'new'}",
            new_job,
        ),
        (
            ["run", "tiny", data, "--out", read_only / "empty", *FAST],
            f"cannot write in --out {read_only / 'empty'}",
            new_job,
        ),
        (["resume", read_only / "job"], f"cannot write in the job {read_only / 'job'}", write),
    ]
    for args, said, instead in cases:
        code, _, err = cli(capsys, *args)
        assert code == 2 and one_line(err) == f"error: {said} (the file system is read-only); {instead}", err
    assert sorted(p.name for p in read_only.rglob("*")) == ["empty", "job", "job.json"]


def test_a_run_whose_output_is_no_longer_read_goes_on_to_the_end(tmp_path, data, monkeypatch):
    """`lowmem-ft run ... 2>&1 | head`: once head has its lines, every write to the pipe fails. Each
    of the run's lines printed a logging traceback, and the progress bar's next refresh, or the next
    evaluation's line, failed the job with BrokenPipeError. Now the run is unread and finishes."""
    import io

    from lowmem_ft.cli import _command

    class Unwritable(io.StringIO):
        def __init__(self, code):
            super().__init__()
            self.code = code

        def write(self, text):
            raise OSError(self.code, os.strerror(self.code))

        def flush(self):
            raise OSError(self.code, os.strerror(self.code))

    # the bar drawn, and an evaluation's line written under it after step 1 of 2
    args = [
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--micro-batch-size",
        "2",
        "--seq-len",
        "64",
        "--eval-every",
        "1",
    ]
    # None: no output at all (`>&- 2>&-`, as Python sets it); EPIPE: the pipe's reader has gone;
    # EBADF: standard error closed alone (`2>&-`), which failed the run with "Bad file descriptor"
    for name, stream in (
        ("none", None),
        ("pipe", Unwritable(errno.EPIPE)),
        ("closed", Unwritable(errno.EBADF)),
    ):
        monkeypatch.setattr(sys, "stdout", stream)
        monkeypatch.setattr(sys, "stderr", stream)
        code = _command(["run", "tiny", str(data), "--out", str(tmp_path / name), *args])
        monkeypatch.undo()
        assert code == 0 and Job.open(tmp_path / name).record["status"] == "done", (
            name,
            Job.open(tmp_path / name).record.get("error"),
        )


def test_a_full_disk_when_the_job_is_created_leaves_nothing_behind(tmp_path, capsys, data, monkeypatch):
    import lowmem_ft.jobs as jobs

    def full(path, record):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(jobs, "write_json_atomic", full)
    out = tmp_path / "job"
    code, _, err = cli(capsys, "run", "tiny", data, "--out", out, *FAST)
    assert code == 4
    assert f"could not create the job in {out}: the disk is full; nothing was left behind" in one_line(err)
    assert not out.exists()


# -- 2. a merge never deletes what it did not make ---------------------------------------------------
@pytest.fixture()
def sparse_job(tmp_path, capsys, data) -> Path:
    job = tmp_path / "sparse"
    code, _, err = cli(
        capsys, "run", "tiny", data, "--out", job, "--method", "sift", "--sparsity", "0.05", *FAST
    )
    assert code == 0, err
    return job


@pytest.mark.parametrize("method", ["sift", "lora"])
def test_a_result_of_a_base_named_by_a_relative_path_merges_and_generates_from_anywhere(
    method, tmp_path, capsys, data, monkeypatch
):
    """`run my-model ...` names the base as typed; `export --merge` and `generate` run from another
    directory found no `my-model` there and said "unknown model": they find it where the run did
    (its weights still hash the same)."""
    import shutil

    from conftest import TINY_DIR

    shutil.copytree(TINY_DIR, tmp_path / "my-model")
    monkeypatch.chdir(tmp_path)
    args = ["--method", method, *([] if method == "lora" else ["--sparsity", "0.05"]), *FAST]
    code, _, err = cli(capsys, "run", "my-model", data, "--out", tmp_path / "job", *args)
    assert code == 0, err
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    if method == "lora":  # and where `my-model` is another model: its hash tells them apart
        from safetensors.torch import load_file, save_file

        shutil.copytree(TINY_DIR, elsewhere / "my-model")
        weights = load_file(elsewhere / "my-model" / "model.safetensors")
        save_file(
            {name: tensor + 1 for name, tensor in weights.items()},
            elsewhere / "my-model" / "model.safetensors",
        )
    code, _, err = cli(capsys, "export", tmp_path / "job", "--merge", "--out", tmp_path / "merged")
    assert code == 0 and (tmp_path / "merged" / "config.json").is_file(), err
    code, out, err = cli(capsys, "generate", tmp_path / "job", "--prompt", "x", "--max-new-tokens", "2")
    assert code == 0, err


def test_a_model_saved_in_bf16_says_bf16_in_its_config(tmp_path, capsys, data):
    """A bf16 base's fine-tuned model is written in bf16 (--save-dtype auto), and its config says so:
    save_pretrained wrote the training parameters' float32, so transformers loaded it in fp32."""
    import shutil

    import torch
    from conftest import TINY_DIR
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    base = tmp_path / "bf16-base"
    AutoModelForCausalLM.from_pretrained(TINY_DIR, dtype=torch.bfloat16).save_pretrained(base)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_DIR / name, base / name)
    code, _, err = cli(capsys, "run", base, data, "--out", tmp_path / "job", *FAST)
    assert code == 0, err
    model = tmp_path / "job" / "model"
    assert json.loads((model / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(model / "model.safetensors", "pt") as weights:
        assert {weights.get_slice(name).get_dtype() for name in weights.keys()}  # noqa: SIM118 == {"BF16"}
    assert AutoModelForCausalLM.from_pretrained(model, dtype="auto").dtype == torch.bfloat16


def test_a_tokenizer_larger_than_the_models_embedding_is_refused_before_a_job_exists(tmp_path, capsys, data):
    """Its ids beyond the embedding's rows index nothing: the run made the job, then failed at its
    first step with "IndexError: index out of range in self", and `jobs` advised a resume."""
    import shutil

    from conftest import TINY_DIR
    from transformers import AutoConfig, AutoModelForCausalLM

    model = tmp_path / "small-vocab"
    config = AutoConfig.from_pretrained(TINY_DIR)
    config.vocab_size, config.num_hidden_layers = 1000, 1
    AutoModelForCausalLM.from_config(config).save_pretrained(model)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_DIR / name, model / name)
    capsys.readouterr()  # (save_pretrained's progress bar)
    code, _, err = cli(capsys, "run", model, data, "--out", tmp_path / "job", *FAST)
    assert code == 2 and one_line(err) == (
        "error: small-vocab: its tokenizer makes ids up to 4,095 and the model's embedding has 1,000 rows, "
        "so ids from 1,000 on have none; give the tokenizer this model was trained with (or resize the "
        "model's embeddings to the tokenizer first)"
    )
    assert not (tmp_path / "job").exists()


def test_a_model_built_by_transformers_class_is_written_without_the_code_map_it_did_not_use(
    tmp_path, capsys, data
):
    """A Llama whose config.json names code of its own (`auto_map`), trained without
    --trust-remote-code, is built by transformers' Llama class; its result kept the `auto_map` but
    not the code, so `from_pretrained(..., trust_remote_code=True)` failed on a missing file."""
    import shutil

    from conftest import TINY_DIR
    from transformers import AutoModelForCausalLM

    base = tmp_path / "mapped"
    shutil.copytree(TINY_DIR, base)
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_mine.MineForCausalLM"}
    (base / "config.json").write_text(json.dumps(config))
    code, _, err = cli(capsys, "run", base, data, "--out", tmp_path / "job", *FAST)
    assert code == 0, err
    model = tmp_path / "job" / "model"
    assert "auto_map" not in json.loads((model / "config.json").read_text())
    AutoModelForCausalLM.from_pretrained(model, trust_remote_code=True)


def test_a_model_directory_without_a_tokenizer_is_one_line(tmp_path, capsys, data):
    """transformers guessed on and ended on five lines about sentencepiece or tiktoken."""
    import shutil

    from conftest import TINY_DIR

    model = tmp_path / "no-tokenizer"
    shutil.copytree(TINY_DIR, model, ignore=shutil.ignore_patterns("tokenizer*"))
    code, _, err = cli(capsys, "run", model, data, "--out", tmp_path / "job", *FAST)
    assert code == 2 and one_line(err).startswith(f"error: {model}: no tokenizer in {model} (tokenizer.json")
    assert not (tmp_path / "job").exists()


def test_a_model_whose_end_of_sequence_differs_from_its_tokenizers_is_warned_about(tmp_path, capsys, data):
    """Training ends each example with the tokenizer's eos; generation stops at the generation
    config's: where they differ, the result runs on past where it learned to stop."""
    import shutil

    from conftest import TINY_DIR

    model = tmp_path / "other-eos"
    shutil.copytree(TINY_DIR, model)
    generation = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": 3}))
    code, out, err = cli(capsys, "run", model, data, "--out", tmp_path / "job", *FAST)
    assert code == 0, err
    assert out.splitlines()[1] == (
        "warning    examples end with the tokenizer's end-of-sequence token 1, and the model's generation "
        "config stops at 3: generation will not stop where training taught; make eos_token_id agree "
        "(config.json, generation_config.json)"
    )
    code, out, _ = cli(capsys, "run", TINY_DIR, data, "--out", tmp_path / "job2", *FAST)
    assert code == 0 and "end-of-sequence" not in out


def test_export_merge_leaves_a_users_directory_named_like_its_temporary_one_alone(
    tmp_path, capsys, sparse_job
):
    mine = tmp_path / "merged.partial"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's")
    code, out, err = cli(capsys, "export", sparse_job)  # what the delta is, first
    assert code == 0 and out.splitlines()[2].startswith(
        "base       tiny (not quantised in training), weights sha256 "
    )
    code, _, err = cli(capsys, "export", sparse_job, "--merge", "--out", tmp_path / "merged")
    assert code == 0, err
    assert (mine / "notes.txt").read_text() == "the user's"
    assert (tmp_path / "merged" / "config.json").is_file()
    assert not (tmp_path / "merged" / ".lowmem-ft-partial").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if "merged" in p.name) == ["merged", "merged.partial"]


def test_export_merge_to_an_out_it_cannot_write_is_one_line_exit_2_before_the_merge(
    tmp_path, capsys, sparse_job, monkeypatch
):
    """Before, an --out under a file was a raw "[Errno 17] File exists" with a full disk's exit code,
    an existing file was "not empty", and a directory the user cannot write to was found only once
    the merge was done (minutes at 7B): now one line, exit 2, before the base is even hashed."""
    import lowmem_ft.export as export

    def merge_started(*args, **kwargs):
        raise AssertionError("the merge started before --out was checked")

    monkeypatch.setattr(export, "check_base", merge_started)
    real_touch = Path.touch

    def touch(path, *args, **kwargs):  # root writes anywhere: refused as a user without the right is
        if path.parent.name == "read-only":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        if path.parent.name == "read-only-mount":
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_touch(path, *args, **kwargs)

    monkeypatch.setattr(Path, "touch", touch)
    (tmp_path / "a-file").write_text("the user's")
    (tmp_path / "read-only").mkdir()
    (tmp_path / "read-only-mount").mkdir()
    cases = [
        (tmp_path / "a-file" / "merged", f"{tmp_path / 'a-file'} is a file, not a directory"),
        (tmp_path / "a-file", "already exists and is a file; choose a new directory"),
        (
            tmp_path / "read-only" / "new" / "merged",
            f"cannot write under {tmp_path / 'read-only'} (Permission",
        ),
        (  # a read-only mount is a place the user chose, not a disk that filled up: exit 2, not 4
            tmp_path / "read-only-mount" / "merged",
            f"cannot write under {tmp_path / 'read-only-mount'} (the file system is read-only)",
        ),
    ]
    if os.geteuid() != 0:  # a real permission, where the tests do not run as root
        (tmp_path / "locked").mkdir(mode=0o555)
        cases.append(
            (tmp_path / "locked" / "merged", f"cannot write under {tmp_path / 'locked'} (Permission")
        )
    for out, message in cases:
        code, stdout, err = cli(capsys, "export", sparse_job, "--merge", "--out", out)
        assert code == 2 and stdout == "", err
        assert one_line(err).startswith(f"error: --out {out}") and message in err, err
    assert (tmp_path / "a-file").read_text() == "the user's"
    assert not list((tmp_path / "read-only").iterdir()) and not list(tmp_path.glob(".*"))


def test_export_merge_onto_a_full_disk_is_one_line_exit_4_and_leaves_nothing(
    tmp_path, capsys, sparse_job, monkeypatch
):
    import lowmem_ft.delta as delta

    def full(*args, **kwargs):
        raise FULL

    monkeypatch.setattr(delta, "save_file", full)
    code, _, err = cli(capsys, "export", sparse_job, "--merge", "--out", tmp_path / "merged")
    assert code == 4
    assert "could not write the merged model to" in one_line(err) and "the disk is full" in err
    assert not [p for p in tmp_path.iterdir() if "merged" in p.name]


def test_export_merge_refuses_early_when_the_disk_clearly_cannot_hold_the_model(
    tmp_path, capsys, sparse_job, monkeypatch
):
    import lowmem_ft.export as export

    monkeypatch.setattr(export, "free_bytes", lambda path: 1000)
    code, _, err = cli(capsys, "export", sparse_job, "--merge", "--out", tmp_path / "merged")
    assert code == 4 and "and 1000 B is free; nothing was written" in one_line(err)
    assert not [p for p in tmp_path.iterdir() if "merged" in p.name]


# -- 3 and 8. values ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lr", "inf"], "--lr must be a finite number, got inf"),
        (["--lr", "nan"], "--lr must be a finite number, got nan"),
        (["--weight-decay", "inf"], "--weight-decay must be a finite number"),
        (["--method", "lora", "--lora-alpha", "inf"], "--lora-alpha must be a finite number"),
        (["--epochs", "inf"], "--epochs must be a finite number"),
        (["--warmup-ratio", "nan"], "--warmup-ratio must be a finite number"),
        (["--gpu-mem", "-1GiB"], "--gpu-mem '-1GiB' is negative"),
        (["--gpu-mem", "abc"], "--gpu-mem 'abc' is not a memory size"),
        (["--gpu-mem", "0"], "--gpu-mem '0' is less than a byte"),
        (["--gpu-mem", "24"], "--gpu-mem '24' has no unit, so it means 24 bytes; write it like 24GiB"),
        (["--cpu-mem", "48.5"], "--cpu-mem '48.5' has no unit, so it means 48 bytes; write it like 48.5GiB"),
        (["--gpu-mem", "nanGiB"], "--gpu-mem 'nanGiB' is not a memory size"),
        (["--cpu-mem", "infGiB"], "--cpu-mem 'infGiB' is not a memory size"),
    ],
)
def test_values_that_are_not_finite_or_not_sizes_are_refused_on_any_machine(
    args, message, tmp_path, capsys, data, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, "run", "tiny", data, *args, *FAST)
    assert code == 2 and message in one_line(err)
    assert not (tmp_path / "runs").exists()


def test_a_ctrl_c_as_the_new_job_is_being_made_leaves_nothing_behind(tmp_path, capsys, data, monkeypatch):
    """Ctrl-C after the job's record, plan and kept data are written but before its first step
    (here: as its header prints): "nothing was lost" holds, and nothing is left behind to block the
    same command (it left a job 'running' at step 0 and its kept data)."""
    import lowmem_ft.start as start

    out = tmp_path / "job"

    def interrupted_header(s, job):
        assert (out / "job.json").is_file() and (out / "tokenized").is_dir()  # (made, then Ctrl-C)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(start, "print_header", interrupted_header)
        code, _, err = cli(capsys, "run", "tiny", data, "--out", out, *FAST)
    assert code == 130 and "interrupted before training started; nothing was lost" in err
    assert not out.exists()
    code, _, err = cli(capsys, "run", "tiny", data, "--out", out, *FAST)
    assert code == 0, err


def test_a_ctrl_c_in_the_last_step_stops_there_and_resume_finishes_alike(tmp_path, capsys, data, monkeypatch):
    """Ctrl-C during the last step was announced ("finishing this step and saving a checkpoint"), then
    the final evaluation and export ran anyway (minutes for a 7B model) and the job ended done. It
    stops after the step's checkpoint, interrupted; resume then writes the same result."""
    from test_resume import signal_at_step

    out, reference = tmp_path / "job", tmp_path / "reference"
    with monkeypatch.context() as patch:
        signal_at_step(patch, 3)  # FAST's last step
        code, _, err = cli(capsys, "run", "tiny", data, "--out", out, *FAST)
    assert code == 130, err
    record = Job.open(out).record
    assert record["status"] == "interrupted" and record["last_checkpoint"]["step"] == 3
    assert not (out / "model").exists()
    code, _, err = cli(capsys, "resume", out)
    assert code == 0 and Job.open(out).record["status"] == "done", err
    assert cli(capsys, "run", "tiny", data, "--out", reference, *FAST)[0] == 0
    written = (out / "model" / "model.safetensors").read_bytes()
    assert written == (reference / "model" / "model.safetensors").read_bytes()


def test_run_refuses_a_host_budget_larger_than_the_machine(tmp_path, capsys, data, monkeypatch):
    """--cpu-mem is this machine's memory for `run`: more than it has would let the plan keep in host
    memory what does not fit there, and the system kill the run hours in. (`plan` takes any size.)"""
    import collections

    import psutil

    memory = collections.namedtuple("memory", "total available")(int(7.96 * 2**30), 6 * 2**30)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory)
    out = tmp_path / "job"
    code, _, err = cli(capsys, "run", "tiny", data, "--out", out, "--cpu-mem", "16GiB", *FAST)
    assert code == 2 and not out.exists()
    assert err.strip() == (
        "error: --cpu-mem 16GiB is more than this machine's 8.0 GiB of memory; give at most 7.9GiB, or "
        "leave --cpu-mem out to plan with what is free (`lowmem-ft plan` plans for another machine)"
    )
    assert cli(capsys, "plan", "tiny", "--cpu-mem", "16GiB")[0] == 0


def test_a_job_whose_data_file_is_gone_resumes_on_the_examples_it_kept(tmp_path, capsys, data, monkeypatch):
    """The data file moved or deleted after the job started (or the job resumed on another machine):
    the job kept its tokenised examples, so it resumes on them, to the result an uninterrupted run
    writes. Without them, one line says to put the file back."""
    import shutil

    from test_resume import signal_at_step

    out, reference = tmp_path / "job", tmp_path / "reference"
    assert cli(capsys, "run", "tiny", data, "--out", reference, *FAST)[0] == 0
    with monkeypatch.context() as patch:
        signal_at_step(patch, 2)
        assert cli(capsys, "run", "tiny", data, "--out", out, *FAST)[0] == 130
    kept = tmp_path / "kept"
    shutil.copytree(out, kept)
    data.rename(tmp_path / "moved.jsonl")
    code, _, err = cli(capsys, "resume", out)
    assert code == 0, err
    written = (out / "model" / "model.safetensors").read_bytes()
    assert written == (reference / "model" / "model.safetensors").read_bytes()

    shutil.rmtree(kept / "tokenized")
    code, _, err = cli(capsys, "resume", kept)
    assert code == 2 and err.strip() == (
        f"error: {data} (data) is gone, and {kept} kept no tokenised examples to resume on; put the "
        f"file back at {data}"
    )


# -- 4. a checkpoint is good only if it is finite ----------------------------------------------------
def test_weights_gone_non_finite_are_never_checkpointed_and_the_stop_names_the_last_good_one(
    tmp_path, capsys, data, monkeypatch
):
    import lowmem_ft.train as train

    real_step = train.train_step

    def step_then_poison(s, job, step, scaler, bar):
        result = real_step(s, job, step, scaler, bar)
        if step == 1:  # after the 2nd update, a finite loss but weights that hold Inf
            with torch.no_grad():
                next(s.model.parameters()).view(-1)[0] = float("inf")
        return result

    monkeypatch.setattr(train, "train_step", step_then_poison)
    out = tmp_path / "job"
    code, _, err = cli(capsys, "run", "tiny", data, "--out", out, "--save-every", "1", *FAST)
    assert code == 2
    line = one_line(err)
    assert "after step 2" in line and "holds NaN/Inf values, so no checkpoint was written" in line
    assert "The last good checkpoint is checkpoints/step-000001" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001"]
    assert Job.open(out).record["status"] == "failed"


def test_a_bug_during_training_fails_the_job_and_names_its_error_log(tmp_path, capsys, data, monkeypatch):
    """Something that is not the user's input (a bug) fails the job: one line, then where the
    traceback is, the job's error.log."""
    import lowmem_ft.train as train

    def broken_step(*args, **kwargs):
        raise RuntimeError("an engine bug")

    monkeypatch.setattr(train, "train_step", broken_step)
    out = tmp_path / "job"
    code, _, err = cli(capsys, "run", "tiny", data, "--out", out, *FAST)
    assert code == 1
    assert err.strip().splitlines()[-2:] == [
        "error: RuntimeError: an engine bug",
        f"the traceback is in {out / 'error.log'} (please include it if you report this)",
    ]
    assert "in broken_step" in (out / "error.log").read_text()
    assert Job.open(out).record["status"] == "failed"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_the_checkpoint_check_names_the_first_tensor_with_a_value_that_is_not_finite(dtype, bad):
    """Wherever the value stands (the first entry, the last, alone among the largest finite values
    of the dtype), the check finds it and names its tensor; finite state, and integer tensors
    (step counters, 8-bit state), pass."""
    from lowmem_ft.train_state import first_non_finite

    largest = torch.finfo(dtype).max
    for position in (0, -1, 7):
        poisoned = torch.full((3, 5), largest, dtype=dtype)
        poisoned.view(-1)[position] = bad
        state = {
            "weights": {"a": torch.zeros(4, dtype=dtype), "b": poisoned},
            "method": {"state": [{"step": torch.tensor(3), "exp_avg": torch.ones(2, dtype=dtype)}]},
        }
        assert first_non_finite(state) == "weights.b", position
        state["weights"]["b"] = poisoned.nan_to_num(0.0)
        state["method"]["state"][0]["exp_avg_sq"] = torch.tensor([1.0, bad], dtype=dtype)
        assert first_non_finite(state) == "method.state.0.exp_avg_sq"
        del state["method"]["state"][0]["exp_avg_sq"]
        state["method"]["quantised"] = torch.full((4,), 255, dtype=torch.uint8)
        assert first_non_finite(state) is None


# -- 5. metrics.jsonl is cut back, never padded --------------------------------------------------------
def test_a_resume_cuts_metrics_back_but_never_pads_a_shorter_file(tmp_path):
    job = Job(tmp_path, {})
    lines = [json.dumps({"step": i, "loss": 1.0}) + "\n" for i in range(1, 5)]
    job.metrics_path.write_text("".join(lines))
    size = job.metrics_bytes()

    assert job.truncate_metrics(len("".join(lines[:2]))) is None  # longer: cut to the checkpoint's size
    assert job.metrics_path.read_text() == "".join(lines[:2])

    job.metrics_path.write_text("".join(lines[:3])[:-7])  # shorter, and torn mid-line
    warning = job.truncate_metrics(size)
    assert "fewer than the" in warning and "missing" in warning
    content = job.metrics_path.read_bytes()
    assert b"\0" not in content and content == "".join(lines[:2]).encode()


def test_a_full_disk_while_logging_leaves_no_torn_line_and_is_one_line_exit_4(
    tmp_path, capsys, data, monkeypatch
):
    import lowmem_ft.jobs as jobs

    real_open, calls = open, {"n": 0}

    class FullFile:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def write(self, text):
            self.f.write(text[: len(text) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if str(path).endswith("metrics.jsonl") and mode == "a":
            calls["n"] += 1
            if calls["n"] == 3:
                return FullFile(f)
        return f

    monkeypatch.setattr(jobs, "open", fake_open, raising=False)
    out = tmp_path / "job"
    code, _, err = cli(capsys, "run", "tiny", data, "--out", out, *FAST)
    assert code == 4
    line = one_line(err)
    assert f"could not write to {out}: the disk is full" in line
    # (no checkpoint before the third line of metrics: it said "its last checkpoint is intact")
    assert "no checkpoint was saved yet (resume starts from the beginning)" in line, line
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line)


def test_a_full_disk_when_job_json_is_rewritten_mid_run_is_one_line_exit_4(
    tmp_path, capsys, data, monkeypatch
):
    import lowmem_ft.jobs as jobs

    real, calls = jobs.write_json_atomic, {"n": 0}

    def full_after_a_while(path, record):
        calls["n"] += 1
        if calls["n"] == 4:  # after the job exists, during the steps
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, record)

    monkeypatch.setattr(jobs, "write_json_atomic", full_after_a_while)
    out = tmp_path / "job"
    code, _, err = cli(capsys, "run", "tiny", data, "--out", out, *FAST)
    assert code == 4 and f"could not write to {out}: the disk is full" in one_line(err)
    assert json.loads((out / "job.json").read_text())["config"]  # the last whole job.json is there
    assert not list(out.glob("*.tmp"))


# -- 6. the final export on a full disk --------------------------------------------------------------
def test_a_full_disk_during_the_final_export_keeps_the_checkpoint_and_resume_writes_it(
    tmp_path, capsys, data, monkeypatch
):
    import lowmem_ft.models.saving as saving

    real = saving.save_hf_model

    def full(model, tokenizer, out_dir, *args):
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "model-00001.safetensors").write_bytes(b"half")
        raise FULL

    monkeypatch.setattr(saving, "save_hf_model", full)
    out = tmp_path / "job"
    code, _, err = cli(capsys, "run", "tiny", data, "--out", out, *FAST)
    assert code == 4
    line = one_line(err)
    assert "could not write the result to" in line and "the disk is full" in line
    assert "checkpoint step-000003 is intact" in line and f"lowmem-ft resume {out}" in line
    assert not (out / "model").exists()  # the half-written result is gone
    monkeypatch.setattr(saving, "save_hf_model", real)
    code, _, err = cli(capsys, "resume", str(out), "-q")
    assert code == 0, err
    assert (out / "model" / "config.json").is_file() and Job.open(out).record["status"] == "done"


# -- 7. data ---------------------------------------------------------------------------------------------
HOSTILE_LINES = {
    "deep nesting": ('{"text": ' + "[" * 5000 + "]" * 5000 + "}", "nested too deeply"),
    "a 5000-digit number": ('{"text": "a", "n": ' + "9" * 5000 + "}", "more than 4,300 digits"),
    "a lone surrogate": ('{"text": "ab\\ud800cd"}', "lone UTF-16 surrogate"),
    "a duplicate key": ('{"text": "a", "text": "b"}', "key 'text' appears twice"),
    "a 5 MiB line": (json.dumps({"text": "word " * (1 << 20)}), "more than the 4 MiB a record may be"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_LINES))
def test_hostile_lines_are_refused_at_their_file_and_line(case, tmp_path, capsys):
    line, message = HOSTILE_LINES[case]
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    code, _, err = cli(capsys, "run", "tiny", path, "--out", tmp_path / "job", *FAST)
    assert code == 2
    assert one_line(err).startswith(f"error: {path}:2: ") and message in err
    assert not (tmp_path / "job").exists()


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_pipe_or_device_given_as_data_is_named_as_such(kind, tmp_path, capsys):
    path = Path("/dev/null") if kind == "device" else tmp_path / "pipe"
    if kind == "fifo":
        os.mkfifo(path)
    code, _, err = cli(capsys, "run", "tiny", path, "--out", tmp_path / "job", *FAST)
    assert code == 2 and "is not a regular file (a pipe or a device)" in one_line(err)


# -- 9. model and job files that are not what they claim ----------------------------------------------
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"[1, 2]", "holds a JSON list, not the JSON object a model config is"),
        (b'\xff\xfe{"model_type": "llama"}', "not UTF-8 text"),
        (b'{"hidden_size": 64}', "no model_type, so not a Hugging Face model config"),
    ],
)
@pytest.mark.parametrize("command", ["run", "plan"])
def test_a_model_config_that_is_not_one_is_one_line_naming_it(
    command, content, message, tmp_path, capsys, data
):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_bytes(content)
    args = [command, model] + ([data, "--out", tmp_path / "job", *FAST] if command == "run" else [])
    code, _, err = cli(capsys, *args)
    assert code == 2 and "config.json: " in one_line(err) and message in err
    assert not (tmp_path / "job").exists()


@pytest.mark.parametrize(
    ("content", "message"), [("[1]", "holds a JSON list"), ("{}", "has no job configuration")]
)
def test_a_job_record_that_is_not_one_is_one_line_naming_it(content, message, tmp_path, capsys):
    job = tmp_path / "job"
    job.mkdir()
    (job / "job.json").write_text(content)
    code, _, err = cli(capsys, "resume", job)
    assert code == 2 and f"{job / 'job.json'}: " in one_line(err) and message in err
    code, out, err = cli(capsys, "jobs", tmp_path)
    assert code == 0 and "Traceback" not in out + err


def test_a_job_record_edited_to_a_wrong_type_is_one_line_naming_the_value(tmp_path, capsys, data):
    job = tmp_path / "job"
    assert cli(capsys, "run", "tiny", data, "--out", job, "--method", "hift", *FAST)[0] == 0
    original = json.loads((job / "job.json").read_text())
    edits = [
        ("batch_size", "two", '"batch_size" is "two", where a whole number belongs'),
        ("lr", "fast", '"lr" is "fast", where a number or null belongs'),
        ("seq_len", None, '"seq_len" is null, where a whole number belongs'),
        ("units_per_group", 1.5, '"units_per_group" is 1.5, where a whole number or null belongs'),
        ("pack", "yes", '"pack" is "yes", where true or false belongs'),
    ]
    for section in ("requested", "config"):  # (the options asked for; those the run resolved)
        for key, value, message in edits:  # (a traceback in resume before)
            edited = {**original[section], key: value}
            (job / "job.json").write_text(json.dumps({**original, "status": "failed", section: edited}))
            code, _, err = cli(capsys, "resume", job)
            assert code == 2 and f"{job / 'job.json'}: {message}" in one_line(err), (section, key, err)


def test_kept_data_that_a_file_stands_in_place_of_costs_only_the_kept_data(tmp_path, capsys, data):
    """A file where the job keeps its tokenised data (JOB/tokenized): resume tokenises again and says
    why it cannot keep it; it ended in "examples.safetensors.tmp: not a directory" (exit 2)."""
    job = tmp_path / "job"
    assert cli(capsys, "run", "tiny", data, "--out", job, *FAST)[0] == 0
    (job / "job.json").write_text(
        json.dumps({**json.loads((job / "job.json").read_text()), "status": "failed"})
    )
    shutil.rmtree(job / "tokenized")
    (job / "tokenized").write_text("not the kept data")
    code, out, err = cli(capsys, "resume", job)
    assert code == 0, err
    said = f"could not keep the tokenised data in {job / 'tokenized'}: a file of that name is in the way"
    assert said in out + err and json.loads((job / "job.json").read_text())["status"] == "done"


# -- 10. exported files do not depend on the process ----------------------------------------------------
def test_a_lora_adapter_config_lists_its_modules_in_a_fixed_order(tmp_path, capsys, data):
    job = tmp_path / "lora"
    code, _, err = cli(capsys, "run", "tiny", data, "--out", job, "--method", "lora", *FAST)
    assert code == 0, err
    config_text = (job / "adapter" / "adapter_config.json").read_text()
    config = json.loads(config_text)
    assert len(config["target_modules"]) > 1
    assert config["target_modules"] == sorted(config["target_modules"])
    assert list(config) == sorted(config)


# -- one check per option, whichever command it is given to (issue 16) ----------------------------------
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpu-mem", "banana"], "--gpu-mem 'banana' is not a memory size"),
        (["--lr", "inf"], "--lr must be a finite number, got inf"),
        (
            ["--method", "full", "--units-per-group", "3"],
            "--units-per-group applies to --method hift, not full",
        ),
        (["--method", "full", "--order", "top-down"], "--order applies to --method hift, not full"),
        # refused at the value the method that takes it defaults to, too (this passed before)
        (["--method", "full", "--order", "bottom-up"], "--order applies to --method hift, not full"),
        (
            ["--method", "bitfit", "--lora-rank", "8"],
            "--lora-rank applies to --method lora / spafit, not bitfit",
        ),
        (["--method", "full", "--state-policy", "drop"], "--state-policy applies to --method hift, not full"),
        (
            ["--method", "full", "--sparsity", "0.1"],
            "--sparsity applies to --method sift / random / magnitude",
        ),
        (
            ["--method", "sift", "--base-quant", "nf4", "--stream"],
            "--stream streams a 16-bit base from host memory, and a nf4 base stays on the GPU",
        ),
        (
            ["--method", "sift", "--selection-passes", "2"],
            "--selection-passes 2 slices the running scores of several selection micro-batches, and "
            "--selection-batches is 1",
        ),
    ],
)
def test_a_bad_option_fails_the_same_way_on_run_plan_and_resume(args, message, tmp_path, capsys, data):
    job = tmp_path / "job"
    if args[0] == "--gpu-mem":  # resume takes only options that keep the result
        assert cli(capsys, "run", "tiny", data, "--out", job, *FAST)[0] == 0
        (job / "job.json").write_text(
            json.dumps({**json.loads((job / "job.json").read_text()), "status": "failed"})
        )
    commands = {
        "run": ["run", "tiny", data, "--out", tmp_path / "other", *args, *FAST],
        "plan": None if "--lr" in args else ["plan", "tiny", *args],
        "resume": ["resume", job, *args] if args[0] == "--gpu-mem" else None,
    }
    for name, command in commands.items():
        if command is None:  # plan has no --lr; resume takes only options that keep the result
            continue
        code, _, err = cli(capsys, *command)
        assert code == 2 and message in one_line(err), (name, err)
    assert not (tmp_path / "other").exists()


# -- a damaged model directory ---------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["weights cut short", "a size that is text", "weights of other shapes"])
def test_a_damaged_model_directory_is_one_line_and_no_job(damage, tmp_path, capsys, data):
    """`plan` reads only config.json; `run` also loads the weights: a file cut short, a config.json
    value the model class cannot take, or weights that do not fit the config are one line naming
    the directory, exit code 2, and no job left behind."""
    import shutil

    from conftest import TINY_DIR

    model = tmp_path / "model"
    shutil.copytree(TINY_DIR, model)
    weights, config_file = model / "model.safetensors", model / "config.json"
    config = json.loads(config_file.read_text())
    if damage == "weights cut short":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "a size that is text":
        config_file.write_text(json.dumps({**config, "rms_norm_eps": "small"}))
    else:
        config_file.write_text(json.dumps({**config, "intermediate_size": config["intermediate_size"] * 2}))
    out = tmp_path / "job"
    code, _, err = cli(capsys, "run", model, data, "--out", out, *FAST)
    assert code == 2, err
    line = one_line(err)
    assert str(model) in line, line
    assert not out.exists()


def test_a_disk_that_cannot_hold_a_checkpoint_is_refused_before_step_1(tmp_path, capsys, data, monkeypatch):
    """A new user's tour, 20-128 KiB free: every step was trained, then the 62 MiB checkpoint refused
    (and resume trained them again). The weights a checkpoint keeps are known before step 1."""
    from lowmem_ft import start

    monkeypatch.setattr(start, "free_bytes", lambda path: 4 * 2**20)
    out = tmp_path / "job"
    code, _, err = cli(capsys, "run", "tiny", data, "--out", out, *FAST)
    assert code == 4, err
    line = one_line(err)
    assert f"{out}: its disk has 4.0 MiB free and a checkpoint of this run holds at least " in line, line
    assert not out.exists()
    code, _, err = cli(capsys, "run", "tiny", data, "--out", out, "--method", "lora", *FAST)
    assert code == 0, err  # a LoRA checkpoint keeps its adapters: they fit


@pytest.mark.parametrize(
    "method",
    [
        ["--method", "full"],
        ["--method", "full", "--optimizer", "sgd"],
        ["--method", "hift", "--units-per-group", "8", "--state-policy", "keep"],  # one group: all have state
        # three groups of two layers, all visited in the 3 steps; the checkpoint's active group is fp32
        [
            "--method",
            "hift",
            "--trained-units",
            "layers",
            "--units-per-group",
            "2",
            "--state-policy",
            "keep-8bit",
        ],
        ["--method", "hift", "--trained-units", "layers", "--units-per-group", "2", "--state-policy", "drop"],
        ["--method", "sift", "--sparsity", "0.05"],
        ["--method", "lora"],
        ["--method", "bitfit"],
    ],
    ids=lambda args: "-".join(args[1::2]),
)
def test_the_size_a_checkpoint_is_refused_on_is_what_it_holds_less_its_small_parts(
    method, tmp_path, capsys, data, monkeypatch
):
    """The free-space check before step 1 counts the optimizer state too (it counted only the
    weights, so a disk between the two filled up at the first checkpoint, after every step before
    it): its figure is at most the checkpoint's size on disk, and short of it only by what is small."""
    from lowmem_ft import start

    estimated, check = [], start._check_disk_holds_a_checkpoint
    monkeypatch.setattr(
        start,
        "_check_disk_holds_a_checkpoint",
        lambda s, out: (estimated.append(s.method.checkpoint_bytes(s.model)), check(s, out)),
    )
    out = tmp_path / "job"
    code, _, err = cli(capsys, "run", "tiny", data, "--out", out, *method, *FAST)
    assert code == 0, err
    (checkpoint,) = sorted((out / "checkpoints").iterdir())[-1:]
    on_disk = sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file())
    assert 0.97 * on_disk - 64 * 2**10 <= estimated[0] <= on_disk, (estimated, on_disk)


def test_weights_that_may_not_be_read_are_a_permission_problem_not_damage(
    tmp_path, capsys, data, monkeypatch
):
    import transformers

    weights = tmp_path / "model" / "model.safetensors"

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(weights))

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", denied)
    code, _, err = cli(capsys, "run", "tiny", data, "--out", tmp_path / "job", *FAST)
    line = one_line(err)
    assert code == 2 and f"{weights}: permission denied" in line and "damaged" not in line, line
    assert not (tmp_path / "job").exists()
