"""End-to-end: the CLI as a user runs it, on the embedded tiny model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowmem_ft.cli import main

REPO = Path(__file__).resolve().parents[1]


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def write_records(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture()
def small_data(tmp_path) -> Path:
    records = [
        {"instruction": f"Say the number {i} in words.", "input": "", "output": f"The number is {i}."}
        for i in range(40)
    ]
    return write_records(tmp_path / "numbers.jsonl", records)


FAST = [
    "--max-steps",
    "4",
    "--batch-size",
    "8",
    "--micro-batch-size",
    "4",
    "--seq-len",
    "96",
    "--lr",
    "1e-3",
    "-q",
]


def test_run_writes_a_complete_job_directory(tmp_path, capsys, small_data):
    out = tmp_path / "job"
    code, stdout, err = cli(capsys, "run", "tiny", small_data, "--out", out, "--eval-every", "2", *FAST)
    assert code == 0, err
    assert f"job        {out}" in stdout and "eval loss" in stdout

    job = json.loads((out / "job.json").read_text())
    assert job["status"] == "done" and job["step"] == 4 and job["max_steps"] == 4
    assert job["config"]["model"] == "tiny" and job["config"]["lr"] == 1e-3
    assert job["data"]["format"] == "alpaca" and job["data"]["train_examples"] == 36
    assert set(job["versions"]) >= {"lowmem_ft", "torch", "transformers"}

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_lines = [m for m in lines if "loss" in m]
    assert [m["step"] for m in train_lines] == [1, 2, 3, 4]
    for m in train_lines:
        assert {"loss", "lr", "tokens_per_s", "peak_mem_bytes"} <= set(m)
        assert m["tokens_per_s"] > 0 and m["peak_mem_bytes"] > 0 and m["loss"] > 0
    assert [m["step"] for m in lines if "eval_loss" in m] == [0, 2, 4]

    plan = json.loads((out / "plan.json").read_text())  # the plan the run followed, on the CPU here
    assert plan["fits"] and plan["device"] == "cpu" and plan["settings"]["micro_batch_size"] == 4
    assert "plan       peak" in stdout


def test_run_follows_the_planner_when_the_micro_batch_is_left_open(tmp_path, capsys, small_data):
    out = tmp_path / "job"
    args = ["--max-steps", "1", "--batch-size", "8", "--seq-len", "64", "-q", "--eval-fraction", "0"]
    assert cli(capsys, "run", "tiny", small_data, "--out", out, *args)[0] == 0
    job, plan = (json.loads((out / name).read_text()) for name in ("job.json", "plan.json"))
    assert job["config"]["micro_batch_size"] == plan["settings"]["micro_batch_size"] == 8  # whole batch fits
    assert job["config"]["gradient_checkpointing"] is False


def test_hift_run_follows_the_plan_and_shows_the_active_group(tmp_path, capsys, small_data):
    out = tmp_path / "job"
    args = ["--method", "hift", "--max-steps", "3", "--batch-size", "8", "--seq-len", "64", "--lr", "1e-3"]
    code, stdout, err = cli(capsys, "run", "tiny", small_data, "--out", out, *args)
    assert code == 0, err
    job, plan = (json.loads((out / name).read_text()) for name in ("job.json", "plan.json"))
    assert plan["method"] == "hift" and plan["settings"]["streamed_units"] == 0
    assert job["config"]["units_per_group"] == plan["settings"]["units_per_group"] == 2  # tiny has 8 units
    assert job["config"]["state_policy"] == plan["settings"]["state_policy"] == "keep"
    # The progress bar names the active group (which step's postfix is drawn depends on timing).
    assert re.search(r"group=[1-4]/4 (embed\.\.layer\.0|layer\.1\.\.layer\.2|layer\.3\.\.layer\.4)", err), err
    assert (out / "model" / "model.safetensors").exists()


def test_run_that_cannot_fit_the_memory_budget_is_refused_before_writing(tmp_path, capsys, small_data):
    out = tmp_path / "job"
    args = ["--cpu-mem", "200MiB", "--method", "sift", "--sparsity", "0.01", "--no-gradient-checkpointing"]
    code, _, err = cli(capsys, "run", "tiny", small_data, "--out", out, *args, "--device", "cpu")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "does not fit this machine: needs" in err and "more host RAM" in err
    assert not out.exists()
    # the plan it points to is this run's (it named only the method: a plan that fitted)
    (command,) = re.findall(r"`(lowmem-ft plan [^`]*)` shows the breakdown", err)
    assert command.split()[2:] == [
        "tiny", "--method", "sift", "--cpu-mem", "200MiB", "--no-gradient-checkpointing",
        "--sparsity", "0.01",
    ]  # fmt: skip
    code, out, _ = cli(capsys, *command.split()[1:])
    assert code == 3 and "fits       NO: needs" in out


def test_the_plan_command_of_a_run_on_another_gpu_plans_with_that_gpus_budget():
    """`plan` looks at the first GPU: a run on cuda:1 points to a plan with cuda:1's budget given."""
    import torch

    from lowmem_ft.config import RunConfig
    from lowmem_ft.prepare import _plan_command

    config = RunConfig.create(model="llama-2-7b", data="d.jsonl", method="lora", seq_len=4096)
    said = _plan_command(config, torch.device("cuda", 1), 25_000_000_000)
    assert said == "lowmem-ft plan llama-2-7b --method lora --gpu-mem 25000000000 --seq-len 4096"
    assert "--gpu-mem" not in _plan_command(config, torch.device("cuda", 0), 25_000_000_000)
    given = config.replace(gpu_mem="20GiB")
    assert _plan_command(given, torch.device("cuda", 1), 1).split()[5:7] == ["--gpu-mem", "20GiB"]


def test_exported_model_loads_with_transformers_and_generates(tmp_path, capsys, small_data, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "job"
    code, _, err = cli(capsys, "run", "tiny", small_data, "--out", out, "--save-dtype", "fp32", *FAST)
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    base = AutoModelForCausalLM.from_pretrained(REPO / "lowmem_ft" / "models" / "tiny", dtype=torch.float32)
    # Training changed the weights, and what was saved is what was trained (fp32 export).
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    prompt = tiny_tokenizer("def add(a, b):", return_tensors="pt")
    generated = model.generate(
        **prompt, max_new_tokens=8, do_sample=False, pad_token_id=tiny_tokenizer.pad_token_id
    )
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    assert isinstance(tiny_tokenizer.decode(generated[0]), str)


def test_run_reads_a_directory_of_data_files_and_records_their_hash(tmp_path, capsys, small_data):
    """DATA may be a directory (docs/data.md): it trains as one data set, and the job records the
    hash of its files, so `resume` can tell whether the data changed."""
    from lowmem_ft.data.sources import data_files
    from lowmem_ft.files import sha256_of

    lines = small_data.read_text().splitlines(keepends=True)
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(lines[:20]))
    (folder / "b.jsonl").write_text("".join(lines[20:]))
    (folder / "README.md").write_text("not data")
    out = tmp_path / "job"
    code, _, err = cli(capsys, "run", "tiny", folder, "--out", out, *FAST)
    assert code == 0, err
    job = json.loads((out / "job.json").read_text())
    assert job["status"] == "done"
    assert job["data_sha256"] == sha256_of([folder / "a.jsonl", folder / "b.jsonl"])
    assert data_files(small_data) == [small_data]  # a single file hashes as before: old jobs resume
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = cli(capsys, "run", "tiny", empty, "--out", tmp_path / "job2", "-q")
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(empty) in err, err
    assert not (tmp_path / "job2").exists()


def test_jobs_lists_finished_job_as_done(tmp_path, capsys, small_data, monkeypatch):
    root = tmp_path / "runs"
    assert cli(capsys, "run", "tiny", small_data, "--out", root / "a", *FAST)[0] == 0
    code, stdout, _ = cli(capsys, "jobs", root)
    assert code == 0
    header, row = stdout.splitlines()[:2]
    assert header.split()[:3] == ["JOB", "STATUS", "STEP"]
    assert row.split()[1:3] == ["done", "4/4"]
    code, stdout, _ = cli(capsys, "jobs", root, "--json")
    assert json.loads(stdout)[0]["status"] == "done"
    (root / "b").mkdir()  # a job whose record was damaged is not left out without a word
    (root / "b" / "job.json").write_text("{bad")
    code, stdout, err = cli(capsys, "jobs", root, "--json")
    assert code == 0 and [job["status"] for job in json.loads(stdout)] == ["done"]
    assert f"warning    {root / 'b'} is left out: its job.json cannot be read as a job record" in err
    # A folder this user may not look into (mode 000; root's tests cannot chmod it away): left out
    # with the same warning, not the whole listing lost to a PermissionError.
    (root / "c").mkdir()
    real_exists = Path.exists

    def exists(self, *args, **kwargs):
        if self == root / "c" / "job.json":
            raise PermissionError(13, "Permission denied", str(self))
        return real_exists(self, *args, **kwargs)

    monkeypatch.setattr(Path, "exists", exists)
    code, stdout, err = cli(capsys, "jobs", root)
    assert code == 0 and "done" in stdout and f"warning    {root / 'c'} is left out" in err, err


def test_default_job_directory_is_under_runs(tmp_path, capsys, small_data, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli(capsys, "run", "tiny", small_data, *FAST)[0] == 0
    (job,) = (tmp_path / "runs").iterdir()
    assert job.name.startswith("tiny-full-")


BAD_FILES = {
    "invalid-json": (b'{"text": "ok"}\n{"text": "broken\n', 2),
    "not-an-object": (b'{"text": "ok"}\n["a list"]\n', 2),
    "not-utf8": (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', 2),
    "unknown-fields": (b'{"question": "a", "answer": "b"}\n', 1),
    "number-for-text": (b'{"text": 42}\n', 1),
    "empty-text": (b'{"text": "ok"}\n{"text": "   "}\n', 2),
    "alpaca-no-output": (b'{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n', 2),
    "mixed-formats": (b'{"text": "ok"}\n{"prompt": "a", "completion": "b"}\n', 2),
    "chat-no-assistant": (b'{"messages": [{"role": "user", "content": "hi"}]}\n', 1),
    "chat-bad-role": (b'{"messages": [{"role": "robot", "content": "hi"}]}\n', 1),
    "empty-file": (b"", None),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_data_is_one_line_exit_2_and_no_job_directory(case, tmp_path, capsys, monkeypatch):
    content, line = BAD_FILES[case]
    data = tmp_path / f"{case}.jsonl"
    data.write_bytes(content)
    monkeypatch.chdir(tmp_path)  # so a default runs/ directory would show up here
    code, stdout, err = cli(capsys, "run", "tiny", data, "--out", tmp_path / "job", "-q")
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    location = f"{data}:{line}:" if line else f"{data}:"
    assert err.startswith(f"error: {location}"), err
    assert "Traceback" not in err + stdout
    assert not (tmp_path / "job").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "tiny", "missing.jsonl"], "missing.jsonl: no such file"),
        (["run", "no-such-model", "DATA"], "unknown model 'no-such-model'"),
        (["run", "tiny", "DATA", "--lr", "-1"], "--lr must be positive"),
        (["run", "tiny", "DATA", "--micro-batch-size", "32"], "cannot exceed --batch-size"),
        (["run", "tiny", "DATA", "--method", "magic"], "--method 'magic' is not known"),
        (["run", "tiny", "DATA", "--format", "csv"], "--format 'csv' is not known"),
        (["run", "tiny", "DATA", "--no-such-flag"], "No such option"),
        (
            ["run", "tiny", "DATA", "--max-steps", "many"],
            "--max-steps 'many' is not a whole number; see 'lowmem-ft run",
        ),
        (["run", "tiny", "DATA", "--lr=fast"], "--lr 'fast' is not a number; see 'lowmem-ft run --help'"),
        (
            ["run", "tiny", "DATA", "--lr", "1", "--lr", "x"],
            "--lr 'x' is not a number",
        ),  # the last one counts
        (["run"], "Missing argument 'MODEL'; see 'lowmem-ft run --help'"),
        (
            ["run", "tiny", "DATA", "--gpu-mem"],
            "Option '--gpu-mem' requires an argument; see 'lowmem-ft run --help'",
        ),
        (["run", "tiny", "DATA", "--sparsity", "0.01"], "--sparsity applies to --method sift"),
        (["run", "tiny", "DATA", "--method", "sift", "--targets", "qproj"], "matches no linear layer"),
        (["run", "tiny", "DATA", "--method", "sift", "--targets", "lm_head"], "shares its weight"),
        (["run", "tiny", "DATA", "--method", "sift", "--base-quant", "fp8"], "--base-quant must be one of"),
        (["run", "tiny", "DATA", "--method", "sift", "--sparsity", "0"], "--sparsity is the fraction"),
    ],
)
def test_bad_invocations_are_one_clear_line(args, message, tmp_path, capsys, monkeypatch, small_data):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, *[small_data if a == "DATA" else a for a in args])
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "runs").exists()


def test_a_precision_is_checked_once_with_one_message_on_every_command(tmp_path, capsys, small_data):
    """--dtype (run, plan, generate) and --save-dtype (run, export) had three copies of their check."""
    job = tmp_path / "sift"
    fast = ["--max-steps", "1", "--batch-size", "2", "--seq-len", "64", "-q"]
    assert cli(capsys, "run", "tiny", small_data, "--out", job, "--method", "sift", *fast)[0] == 0
    commands = {
        "--dtype must be auto, fp32, bf16 or fp16, got 'fp8'": [
            ["run", "tiny", small_data, "--dtype", "fp8"],
            ["plan", "tiny", "--dtype", "fp8"],
            ["generate", "tiny", "--prompt", "hi", "--dtype", "fp8"],
        ],
        "--save-dtype must be auto, fp32, bf16 or fp16, got 'fp8'": [
            ["run", "tiny", small_data, "--save-dtype", "fp8"],
            ["export", job, "--merge", "--out", tmp_path / "merged", "--save-dtype", "fp8"],
        ],
    }
    for message, each in commands.items():
        for args in each:
            code, _, err = cli(capsys, *args)
            assert code == 2 and err.strip() == f"error: {message}", (args, err)


def test_out_directory_that_is_not_empty_is_refused(tmp_path, capsys, small_data):
    out = tmp_path / "job"
    out.mkdir()
    (out / "something").write_text("x")
    code, _, err = cli(capsys, "run", "tiny", small_data, "--out", out)
    assert code == 2 and "already exists and is not empty" in err
    assert sorted(p.name for p in out.iterdir()) == ["something"]


def test_version_and_help(capsys):
    import lowmem_ft

    assert cli(capsys, "--version")[:2] == (0, f"lowmem-ft {lowmem_ft.__version__}\n")
    code, stdout, _ = cli(capsys, "run", "--help")
    assert code == 0 and "Examples:" in stdout and "--micro-batch-size" in stdout


@pytest.mark.parametrize("command", ["run", "resume", "plan", "export", "generate", "jobs"])
def test_the_help_examples_are_shown_as_written_on_a_narrow_terminal(command, capsys, monkeypatch):
    """Each example a line of its own, whole, however narrow the terminal: a rewrapped example broke
    mid-option (`--micro-` / `batch-size 2`) and could not be pasted."""
    from lowmem_ft.cli import generate, show, training

    epilog = {
        "run": training.RUN_EPILOG, "resume": training.RESUME_EPILOG, "plan": training.PLAN_EPILOG,
        "export": show.EXPORT_EPILOG, "generate": generate.GENERATE_EPILOG, "jobs": show.JOBS_EPILOG,
    }[command]  # fmt: skip
    monkeypatch.setenv("COLUMNS", "60")
    code, stdout, _ = cli(capsys, command, "--help")
    shown = [line.strip() for line in stdout.splitlines()]
    written = [line.strip() for line in epilog.splitlines() if line.startswith("  ")]  # the commands
    assert code == 0 and written and all(line in shown for line in written), (written, stdout)


def readme_quick_start_args() -> list[str]:
    """The arguments of `lowmem-ft` in the README's first set-up command."""
    for line in (REPO / "README.md").read_text().splitlines():
        if line.startswith("pip install") and "lowmem-ft run" in line:
            return line.split("lowmem-ft ", 1)[1].split()
    raise AssertionError("README.md has no set-up command that runs lowmem-ft")


@pytest.mark.slow
def test_readme_quick_start_as_a_subprocess_learns(tmp_path):
    """The README's first command, as a separate process (no --lr: the default for the method and the
    model's size): it finishes and the eval loss drops by at least 15%."""
    args = readme_quick_start_args()
    assert args[:2] == ["run", "tiny"]
    result = subprocess.run(
        [sys.executable, "-m", "lowmem_ft", *args, "--out", str(tmp_path / "job")],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    job = json.loads((tmp_path / "job" / "job.json").read_text())
    assert job["status"] == "done"
    assert "--lr" not in args
    assert (
        "lr 0.00072 (the default for this method and size)" in result.stdout and job["config"]["lr"] == 7.2e-4
    )
    assert job["eval_loss"] <= 0.85 * job["eval_loss_start"], (job["eval_loss_start"], job["eval_loss"])
    assert "training: 100%" in result.stderr  # the progress bar was shown
    assert "eval loss" in result.stdout and "Writing model shards" not in result.stderr
    assert (tmp_path / "job" / "loss.png").stat().st_size > 10_000  # the picture README shows


def test_an_option_of_the_job_given_to_resume_says_that_resume_keeps_it(tmp_path, capsys):
    code, out, err = cli(capsys, "resume", tmp_path, "--lr", "1e-4")
    assert code == 2 and out == ""
    assert err.startswith(  # (then "see 'lowmem-ft resume --help'", the program's name as it was run)
        "error: --lr is a setting of the job, which resume keeps as it was; to train with another, start a "
        "new job with `lowmem-ft run`; see '"
    ) and err.strip().endswith(" resume --help'")
    code, _, err = cli(capsys, "resume", tmp_path, "--no-such-option")  # not a run option either
    assert code == 2 and err.startswith("error: No such option: --no-such-option")


def test_a_run_says_in_warnings_what_is_likely_a_mistake(tmp_path, capsys):
    """--seq-len 64 on the example data: most prompts fill it, so their responses are cut away and
    the examples dropped, the held-out ones all; the five left are fewer than a step's 16; --gpu-mem
    on a run that trains on the CPU. The run goes on, and says each in a warning."""
    data = REPO / "examples" / "python-qa.jsonl"
    args = ["--seq-len", "64", "--max-steps", "1", "--device", "cpu", "--gpu-mem", "8GiB"]
    code, out, err = cli(capsys, "run", "tiny", data, "--out", tmp_path / "job", *args)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[2].startswith(f"data       {data} (alpaca): 5 train / 0 eval examples, ") and (
        "433 dropped (no response left)" in lines[2]
    )
    assert lines[3:7] == [
        "warning    433 of 438 examples dropped: nothing to learn from is left within their first 64 tokens; "
        "a larger --seq-len than 64 keeps them",
        "warning    each step's 16 examples repeat the 5 training examples (3.2 times each on average); "
        "--batch-size 5 takes each once a step",
        "warning    no evaluation: none of the 44 evaluation examples has anything to learn from within its "
        "first 64 tokens; a larger --seq-len than 64 keeps them",
        "warning    --gpu-mem 8GiB is a GPU's budget, and this run trains on the CPU: it plans for host "
        "memory (--cpu-mem sets that budget)",
    ]
    assert lines[7].startswith("training   1 step of 16 examples")


def test_a_seq_len_beyond_the_models_context_is_warned_about(tmp_path, capsys, small_data):
    args = ["--seq-len", "2048", "--max-steps", "1", "--batch-size", "2", "-q"]
    code, out, err = cli(capsys, "run", "tiny", small_data, "--out", tmp_path / "job", *args)
    assert code == 0, err
    assert (
        "warning    --seq-len 2048 is longer than tiny's context (1024 positions, max_position_embeddings): "
        "it never saw positions beyond it; --seq-len 1024 stays within it"
    ) in out.splitlines()


def test_packed_rows_fewer_than_a_step_are_said_as_rows(tmp_path, capsys):
    """With --pack a step draws packed rows, not examples: 13 examples packed into 3 rows of 512
    tokens are repeated about 5 times a step, which --batch-size 13 would not cure."""
    data = tmp_path / "few.jsonl"
    data.write_text(
        "".join((REPO / "examples" / "python-qa.jsonl").read_text().splitlines(keepends=True)[:14])
    )
    args = ["--pack", "--seq-len", "512", "--eval-fraction", "0.1", "--max-steps", "1", "-q"]
    code, out, err = cli(capsys, "run", "tiny", data, "--out", tmp_path / "job", *args)
    assert code == 0, err
    (warning,) = [line for line in out.splitlines() if "repeat" in line]
    rows = int(warning.split("repeat the ")[1].split()[0])
    said = f"each step's 16 examples repeat the {rows} packed rows ({16 / rows:.1f} times each on average)"
    assert warning == f"warning    {said}; --batch-size {rows} takes each once a step" and rows < 13


@pytest.mark.slow
def test_sigterm_marks_the_job_interrupted_and_exits_130(tmp_path, small_data):
    """SIGTERM (a scheduler, `kill`) during training: the job says 'interrupted', exit code 130."""
    import signal
    import time

    out = tmp_path / "job"
    args = ["run", "tiny", str(small_data), "--out", str(out), "--max-steps", "2000", "--seq-len", "64", "-q"]
    process = subprocess.Popen([sys.executable, "-m", "lowmem_ft", *args], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until training has taken a step
        try:
            if json.loads((out / "job.json").read_text()).get("step", 0) >= 1:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    job = json.loads((out / "job.json").read_text())
    assert job["status"] == "interrupted" and job["step"] >= 1
    assert job["last_checkpoint"]["step"] == job["step"]  # the step it was in, finished and saved
    assert f"continue with `lowmem-ft resume {out}`" in err and "Traceback" not in err


def test_methods_lists_every_method_with_its_options(capsys):
    from lowmem_ft.registry import METHOD_SPECS

    code, out, _ = cli(capsys, "methods")
    assert code == 0
    lines = out.splitlines()
    for name, spec in METHOD_SPECS.items():
        row = next(i for i, line in enumerate(lines) if line.startswith(f"{name} "))
        assert spec.summary in lines[row] and lines[row + 1].strip().startswith("options: ")
        assert all(f"--{o.replace('_', '-')}" in lines[row + 1] for o in spec.option_names())


def test_every_option_is_declared_once_and_plan_takes_what_the_planner_reads():
    """`run`'s and `plan`'s parameters are made from one table (cli/options.py) with RunConfig's
    types and defaults: a new RunConfig field without a flag, or a planner input `plan` does not
    take, fails here."""
    import dataclasses
    import inspect

    from lowmem_ft.cli.options import PLAN_OPTIONS, RUN_OPTIONS
    from lowmem_ft.cli.training import plan, run
    from lowmem_ft.config import RunConfig
    from lowmem_ft.planner import PLANNED_AS_GIVEN
    from lowmem_ft.registry import METHOD_SPECS, option_fields

    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    # arguments, what the plan decides, and the method's options (declared by each method)
    internal = {"model", "data", "streamed_layers", "method_options", "chat_date"}
    assert set(RUN_OPTIONS) == set(fields) - internal
    method_options = option_fields()
    assert not set(method_options) & set(fields), "a method option shadows a common one"
    run_parameters = inspect.signature(run).parameters
    for name in RUN_OPTIONS:
        assert run_parameters[name].default.default == fields[name].default, name
    for name, field in method_options.items():
        assert run_parameters[name].default.default == field.default, name
    # An option several methods take is one flag: each declares it alike (default, help, flags).
    for spec in METHOD_SPECS.values():
        for field in dataclasses.fields(spec.options_class()):
            first = method_options[field.name]
            assert field.default == first.default, (spec.name, field.name)
            assert field.metadata["help"] == first.metadata["help"], (spec.name, field.name)
            assert field.metadata["flags"] == first.metadata["flags"], (spec.name, field.name)
    assert {*PLANNED_AS_GIVEN, "gpu_mem", "dtype", *method_options} == set(PLAN_OPTIONS)
    assert set(PLAN_OPTIONS) <= set(inspect.signature(plan).parameters)


def test_the_command_line_starts_without_torch():
    """`lowmem-ft --help`, `plan` and `jobs` answer at once: torch is imported only by what trains."""
    import subprocess
    import sys

    code = "import sys, lowmem_ft.cli, lowmem_ft.cli.training; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_bitsandbytes_advice_to_trust_remote_kernels_is_not_shown(caplog):
    """bitsandbytes' warning that it could not fetch a kernel from the hub ("set trust_remote_code=
    True") reads as advice about lowmem-ft's own flag: it is dropped; its other warnings are not."""
    import logging

    import lowmem_ft  # noqa: F401  (the filter is installed with the package)

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure ...",
            "Set trust_remote_code=True",
        )
        logger.warning("another warning")
    assert [r.getMessage() for r in caplog.records] == ["another warning"]


def test_a_ctrl_c_while_the_command_line_imports_is_one_line(tmp_path):
    """Ctrl-C while `lowmem-ft` is still importing (torch, Typer: a second or two) ends it with one
    line and exit code 130, not a traceback of the import it interrupted. Here it comes as Typer is
    imported."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os, signal, sys\n"
        "class Trip:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'typer':\n"
        "            sys.meta_path.remove(self)\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "sys.meta_path.insert(0, Trip())\n"
    )
    path = os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    done = subprocess.run(
        [sys.executable, "-m", "lowmem_ft", "plan", "tiny"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 130 and done.stderr == "interrupted while starting; nothing was done\n"


def test_a_ctrl_c_that_no_command_takes_in_is_said(capsys, monkeypatch):
    """Typer ends a command that a Ctrl-C interrupts with exit code 130 and not a word; lowmem-ft
    says it was interrupted (a run says more: where its job stands)."""
    import lowmem_ft.planner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lowmem_ft.planner, "build_plan", interrupted)
    code, out, err = cli(capsys, "plan", "tiny")
    assert code == 130 and err == "interrupted\n" and out == ""


@pytest.mark.parametrize(
    "args, said",
    [
        (["run", "tiny", ""], 'an argument is empty ("")'),
        (["run", "tiny", "DATA", "--eval-data", ""], "--eval-data was given an empty value"),
        (["run", "tiny", "DATA", "--out="], "--out was given an empty value"),
        (["plan", "tiny", "--freeze-layers", ""], "--freeze-layers was given an empty value"),
    ],
)
def test_an_empty_argument_is_refused_not_read_as_the_current_folder(
    args, said, tmp_path, capsys, small_data
):
    """pathlib reads "" as ".": `run tiny ""` trained on every file of the current folder, and
    `--eval-data ""` evaluated on a set that held the training file itself."""
    args = [str(small_data) if a == "DATA" else a for a in args]
    code, out, err = cli(capsys, *args)
    assert code == 2 and out == ""
    (line,) = err.strip().splitlines()
    assert line.startswith(f"error: {said}"), line
    assert list(tmp_path.iterdir()) == [small_data]


def test_a_path_the_user_can_mend_is_one_line(tmp_path, capsys, small_data, monkeypatch):
    """Permissions, a file where a folder should be, a read-only file system: one line naming the
    path, exit code 2 (not a traceback). Any other OSError is still reported as a fault."""
    import errno as errno_module

    from lowmem_ft import start

    def denied(config, show_progress):
        raise PermissionError(errno_module.EACCES, "Permission denied", str(tmp_path / "nox" / "job.json"))

    monkeypatch.setattr(start, "run", denied)
    code, _, err = cli(capsys, "run", "tiny", small_data, "--out", tmp_path / "nox" / "job")
    (line,) = err.strip().splitlines()
    path = tmp_path / "nox" / "job.json"
    assert (
        code == 2 and line == f"error: {path}: permission denied; check the path and its folders' permissions"
    )

    def full(config, show_progress):  # a write the tool does not wrap itself (resume's plan.json was one)
        raise OSError(errno_module.ENOSPC, "No space left on device", "job/plan.json")

    monkeypatch.setattr(start, "run", full)
    code, _, err = cli(capsys, "run", "tiny", small_data, "--out", tmp_path / "job")
    assert (
        code == 4 and err == "error: job/plan.json: the disk is full; free space and run the command again\n"
    )

    def broken(config, show_progress):
        raise OSError(errno_module.EIO, "Input/output error", "x")

    monkeypatch.setattr(start, "run", broken)
    code, _, err = cli(capsys, "run", "tiny", small_data, "--out", tmp_path / "job")
    assert code == 1 and "the traceback is in" in err


@pytest.mark.parametrize("command", ["run", "generate"])
@pytest.mark.parametrize("seed", [str(2**63), str(-(2**63) - 1), "99999999999999999999"])
def test_a_seed_beyond_64_bits_is_one_line(command, seed, capsys, small_data):
    """It reached torch.manual_seed, whose overflow was a traceback."""
    args = (
        ["run", "tiny", small_data, "--max-steps", "1"]
        if command == "run"
        else ["generate", "tiny", "-p", "x"]
    )
    code, _, err = cli(
        capsys, *args, *(["--temperature", "0.5"] if command == "generate" else []), "--seed", seed
    )
    assert (
        code == 2
        and err.strip() == f"error: --seed must be a 64-bit integer, from -2**63 to 2**63 - 1, got {seed}"
    )


def test_a_name_that_is_not_utf8_is_refused_before_anything_is_done(tmp_path, capsys, small_data):
    """A non-UTF-8 --out (bytes 0xff arrive as a lone surrogate) trained to the end and then failed
    writing the result's records, leaving a half-written model."""
    out = str(tmp_path) + "/o_\udcff"
    code, _, err = cli(capsys, "run", "tiny", small_data, "--out", out, *FAST)
    assert code == 2 and "is not a UTF-8 name" in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == [small_data]


def test_resume_of_a_file_says_what_to_give(tmp_path, capsys):
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "job.json").write_text("{}")
    code, _, err = cli(capsys, "resume", tmp_path / "job" / "job.json")
    assert (
        code == 2
        and err.strip()
        == f"error: {tmp_path / 'job' / 'job.json'}: give the job's directory, {tmp_path / 'job'}"
    )
    (tmp_path / "afile").write_text("x")
    code, _, err = cli(capsys, "resume", tmp_path / "afile")
    assert code == 2 and f"{tmp_path / 'afile'}: a file, not a job directory" in err


def test_eval_data_that_is_the_training_data_is_warned_about(tmp_path, capsys, small_data):
    code, out, err = cli(
        capsys, "run", "tiny", small_data, "--eval-data", small_data, "--out", tmp_path / "j", *FAST
    )
    assert code == 0, err
    assert f"warning    --eval-data shares 1 file(s) with the training data ({small_data})" in out + err


def test_epochs_are_not_read_when_max_steps_is_given(tmp_path, capsys, small_data):
    """`--epochs` is ignored when `--max-steps` is given, as its help says: 0 was refused."""
    code, _, err = cli(capsys, "run", "tiny", small_data, "--out", tmp_path / "j", *FAST, "--epochs", "0")
    assert code == 0, err
    code, _, err = cli(capsys, "run", "tiny", small_data, "--out", tmp_path / "k", "--epochs", "0", "-q")
    assert code == 2 and "--epochs must be positive, got 0" in err


def test_a_backwards_layer_range_says_so(capsys, small_data):
    code, _, err = cli(capsys, "plan", "tiny", "--method", "lora", "--freeze-layers", "3-1")
    assert code == 2 and "3-1 runs backwards; write the lower layer first (1-3)" in err, err


def test_a_symlink_loop_is_one_line(tmp_path, capsys, small_data):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for args in (
        ["run", "tiny", tmp_path / "loop"],
        ["run", "tiny", small_data, "--out", tmp_path / "loop" / "j"],
    ):
        code, _, err = cli(capsys, *args, *FAST)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


@pytest.mark.parametrize(
    "options, said",
    [
        (
            ["--eval-data", "DATA", "--eval-fraction", "0.3"],
            "--eval-fraction 0.3 is not used: --eval-data is",
        ),
        (
            ["--schedule", "constant", "--min-lr-ratio", "0.5"],
            "--min-lr-ratio 0.5 is not used: --schedule constant",
        ),
        (
            ["--eval-fraction", "0", "--eval-every", "2"],
            "--eval-every 2 is not used: there is no evaluation set",
        ),
    ],
)
def test_an_option_the_run_does_not_read_is_warned_about(options, said, tmp_path, capsys, small_data):
    options = [str(small_data) if o == "DATA" else o for o in options]
    code, out, err = cli(capsys, "run", "tiny", small_data, "--out", tmp_path / "j", *FAST, *options)
    assert code == 0, err
    assert f"warning    {said}" in out + err
