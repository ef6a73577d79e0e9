"""`lowmem-ft generate`: a job's result, put together in memory, generates what transformers
generates from the same result exported and loaded on its own; chat keeps its history; bad input
is one line and exit code 2. One set of jobs of the embedded model is shared by the module."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_cli import cli, write_records

from lowmem_ft.cli import main
from lowmem_ft.data.formats import ALPACA_PROMPT_NO_INPUT, render
from lowmem_ft.errors import UserError
from lowmem_ft.generate import (
    GenerateOptions,
    Generator,
    generation_memory,
    layers_to_stream,
    load_generator,
    render_chat,
)

TINY_DIR = Path(__file__).resolve().parents[1] / "lowmem_ft" / "models" / "tiny"
PROMPT = "Say the number 7 in words."
NEW = ["--max-new-tokens", "8"]
JOB_ARGS = ["--max-steps", "2", "--batch-size", "8", "--micro-batch-size", "4", "--seq-len", "64"]
JOB_ARGS += ["--lr", "1e-2", "--eval-fraction", "0", "-q"]
METHODS = ("full", "hift", "sift", "lora")


def _main(*args) -> None:
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        assert exc.code in (0, None), f"lowmem-ft {' '.join(map(str, args))} exited with {exc.code}"


@pytest.fixture(scope="module")
def jobs(tmp_path_factory) -> dict[str, Path]:
    """A finished job per method (a few steps of the tiny model on Alpaca records), and for each a
    Hugging Face directory to compare with: the job's model, or its result merged by `export` in
    fp32 (what generate computes in memory on a CPU)."""
    root = tmp_path_factory.mktemp("generate")
    records = [
        {"instruction": f"Say the number {i} in words.", "input": "", "output": f"The number is {i}."}
        for i in range(40)
    ]
    data = write_records(root / "numbers.jsonl", records)
    made = {}
    for method in METHODS:
        out = root / method
        _main("run", "tiny", data, "--method", method, "--out", out, *JOB_ARGS)
        made[method] = out
        if method in ("sift", "lora"):
            _main("export", out, "--merge", "--out", root / f"{method}-merged", "--save-dtype", "fp32")
    return made


def _reference_dir(job: Path) -> Path:
    return job / "model" if (job / "model").is_dir() else job.with_name(f"{job.name}-merged")


def _greedy(model_dir: Path, ids: list[int], max_new_tokens: int = 8, **sampling) -> str:
    """What transformers generates after ``ids`` from the model in ``model_dir``, loaded in fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    input_ids = torch.tensor([ids])
    sampling = sampling or {"do_sample": False}
    out = model.generate(
        input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens, **sampling
    )
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)


def _ids(tokenizer, text: str) -> list[int]:
    """As training tokenizes an example: BOS, then the text without special tokens."""
    return [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]


@pytest.mark.parametrize("method", METHODS)
def test_generate_equals_transformers_on_the_exported_result(method, jobs, capsys, tiny_tokenizer):
    job = jobs[method]
    code, out, err = cli(capsys, "generate", job, "--prompt", PROMPT, *NEW)
    assert code == 0, err
    # The job trained on Alpaca records, so the prompt is written as its instructions were.
    ids = _ids(tiny_tokenizer, ALPACA_PROMPT_NO_INPUT.format(instruction=PROMPT))
    expected = _greedy(_reference_dir(job), ids)
    assert expected.strip() and out == expected + "\n"
    assert "alpaca" in err and "greedy" in err
    if method in ("sift", "lora"):
        # The delta or adapter was applied: the base alone says something else.
        assert _greedy(TINY_DIR, ids) != expected
        assert "sha256 checked" in err if method == "sift" else "merged" in err


def test_raw_sends_the_prompt_as_it_is(jobs, capsys, tiny_tokenizer):
    code, out, err = cli(capsys, "generate", jobs["full"], "--prompt", PROMPT, "--raw", *NEW)
    assert code == 0, err
    assert out == _greedy(jobs["full"] / "model", _ids(tiny_tokenizer, PROMPT)) + "\n"


def test_a_jobs_delta_file_or_adapter_can_be_given_directly(jobs, capsys):
    for path in (jobs["sift"] / "delta.safetensors", jobs["lora"] / "adapter"):
        code, out, err = cli(capsys, "generate", path, "--prompt", PROMPT, *NEW)
        assert code == 0, err
        assert out == cli(capsys, "generate", path.parent, "--prompt", PROMPT, *NEW)[1]


def test_a_model_alias_generates_from_the_raw_prompt(capsys, tiny_tokenizer):
    code, out, err = cli(capsys, "generate", "tiny", "--prompt", "def add(a, b):", *NEW)
    assert code == 0, err
    assert out == _greedy(TINY_DIR, _ids(tiny_tokenizer, "def add(a, b):")) + "\n"
    assert "--prompt as it is" in err


def test_sampling_is_transformers_sampling_with_the_same_seed(capsys, tiny_tokenizer):
    args = ["generate", "tiny", "--prompt", "import", "--temperature", "0.9", "--top-p", "0.95"]
    code, out, err = cli(capsys, *args, "--seed", "3", *NEW)
    assert code == 0, err
    torch.manual_seed(3)
    sampled = _greedy(
        TINY_DIR, _ids(tiny_tokenizer, "import"), do_sample=True, temperature=0.9, top_p=0.95, top_k=0
    )
    assert out == sampled + "\n"
    assert cli(capsys, *args, "--seed", "3", *NEW)[1] == out
    assert "sampled, temperature 0.9, top-p 0.95, seed 3" in err


def test_a_models_own_sampling_settings_change_nothing_the_options_decide(tmp_path, capsys, tiny_tokenizer):
    """Instruct models ship sampling settings in generation_config.json, and transformers fills every
    setting left unset from them, then from its own defaults (top-k 50). Greedy stays plain greedy
    (no repetition penalty, no n-gram ban), and sampled with --top-k 0 draws from every token."""
    shipped = tmp_path / "instruct"
    shutil.copytree(TINY_DIR, shipped)
    config_file = shipped / "generation_config.json"
    config = json.loads(config_file.read_text())
    config.update(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, min_p=0.1, repetition_penalty=1.5)
    config_file.write_text(json.dumps({**config, "no_repeat_ngram_size": 3}))
    ids = _ids(tiny_tokenizer, "def f(x):")

    code, out, err = cli(capsys, "generate", shipped, "--prompt", "def f(x):", "--max-new-tokens", "24")
    assert code == 0, err
    assert out == _greedy(TINY_DIR, ids, max_new_tokens=24) + "\n"

    args = ["--prompt", "def f(x):", "--temperature", "2", "--seed", "7", *NEW]
    code, out, err = cli(capsys, "generate", shipped, *args)
    assert code == 0, err
    torch.manual_seed(7)
    whole = _greedy(TINY_DIR, ids, do_sample=True, temperature=2.0, top_k=0, top_p=1.0)
    torch.manual_seed(7)
    top_50 = _greedy(TINY_DIR, ids, do_sample=True, temperature=2.0, top_k=50, top_p=1.0)
    assert out == whole + "\n" and whole != top_50


def test_tokens_stream_as_they_are_generated():
    generator = load_generator("tiny", GenerateOptions(max_new_tokens=24))
    pieces: list[str] = []
    text = generator.complete("def add(a, b):", pieces.append)
    assert len(pieces) > 3 and "".join(pieces) == text


@pytest.fixture()
def chat_model(tmp_path) -> Path:
    """The tiny model with a chat template in its tokenizer config."""
    model = tmp_path / "tiny-chat"
    shutil.copytree(TINY_DIR, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    return model


def test_chat_keeps_the_conversation_and_uses_the_chat_template(chat_model, capsys, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\nwhat is a list?\n\nnot read\n"))
    code, out, err = cli(capsys, "generate", chat_model, "--chat", *NEW)
    assert code == 0, err
    tokenizer = AutoTokenizer.from_pretrained(chat_model)

    def turn(messages: list[dict]) -> str:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return _greedy(chat_model, _ids(tokenizer, text))

    history = [{"role": "user", "content": "hello there"}]
    first = turn(history)
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "what is a list?"}]
    second = turn(history)  # the second answer follows the first exchange: the history is kept
    assert out == f"{first}\n{second}\n"


def test_chat_ends_at_exit_or_at_the_end_of_input(chat_model, capsys, monkeypatch):
    replies = []
    for given in ("hi\nexit\nnot read\n", "hi\n", "hi"):
        monkeypatch.setattr("sys.stdin", io.StringIO(given))
        code, out, err = cli(capsys, "generate", chat_model, "--chat", *NEW)
        assert code == 0, err
        replies.append(out)
    assert replies[0].strip() and replies[0] == replies[1] == replies[2]


def test_chat_in_the_default_headers_continues_what_training_rendered(tiny_tokenizer):
    """A job trained on chat data with a tokenizer without a template learned lowmem-ft's default
    headers; --chat writes the conversation the same way, up to the assistant's header."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    messages += [{"role": "user", "content": "and?"}]
    trained = render(
        {"messages": [*messages, {"role": "assistant", "content": "ok"}]}, "chat", tiny_tokenizer
    )
    prompt = render_chat(messages, tiny_tokenizer, chat_template=False)
    assert trained.text == prompt + "ok"


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["tiny", "--chat"], "has none (nor was the job trained on chat data); use --prompt TEXT"),
        (["tiny"], "give --prompt TEXT, or --chat"),
        (["tiny", "--prompt", "x", "--chat"], "--prompt and --chat exclude each other"),
        (["tiny", "--chat", "--raw"], "--raw only applies to --prompt; --chat writes each message"),
        (["tiny", "--prompt", "x", "--base", "tiny"], "--base only applies to a sparse delta or a LoRA"),
        (["tiny", "--prompt", "x", "--temperature", "-1"], "--temperature must be 0 (greedy) or a finite"),
        (["tiny", "--prompt", "x", "--temperature", "inf"], "--temperature must be 0 (greedy) or a finite"),
        (["tiny", "--prompt", "x", "--temperature", "nan"], "--temperature must be 0 (greedy) or a finite"),
        (["tiny", "--prompt", "x", "--temperature", "1e-38"], "value from 0.001 (e.g. 0.7 to sample)"),
        (["tiny", "--prompt", "x", "--temperature", "1", "--top-p", "0"], "--top-p must be in (0, 1]"),
        (["tiny", "--prompt", "x", "--temperature", "1", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (["tiny", "--prompt", "x", "--top-p", "0.9"], "--top-p only applies to sampling; add --temperature"),
        (["tiny", "--prompt", "x", "--seed", "3"], "--seed only applies to sampling; add --temperature"),
        (["tiny", "--prompt", "x", "--top-k", "3", "--top-p", "0.5"], "--top-p and --top-k only apply to"),
        (["tiny", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
        (["tiny", "--prompt", "x", "--max-new-tokens", "2000"], "would pass the 1,024 positions"),
        (["tiny", "--prompt", "x", "--device", "gpu"], "--device must be auto, cpu, cuda or cuda:N"),
        (["no-such-model", "--prompt", "x"], "unknown model 'no-such-model'"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args, says, capsys):
    code, out, err = cli(capsys, "generate", *args)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and says in err
    assert out == ""


def test_a_failure_outside_a_job_keeps_its_traceback_and_names_it(capsys, monkeypatch, tmp_path):
    """A bug met outside a job (here in generate) is one line, and the traceback is kept in a file
    that line names: there is no job directory, with its error.log, to keep it in."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # (read again from TMPDIR)

    def broken(*args, **kwargs):
        raise RuntimeError("probability tensor contains either inf, nan or element < 0")

    monkeypatch.setattr(Generator, "generate_ids", broken)
    code, out, err = cli(capsys, "generate", "tiny", "--prompt", "x", *NEW)
    assert code == 1, err
    said, named = err.strip().splitlines()[-2:]  # (after the lines saying what was loaded)
    assert said == "error: RuntimeError: probability tensor contains either inf, nan or element < 0"
    kept = Path(named.split("the traceback is in ")[1].split(" (")[0])
    assert kept.parent == tmp_path and "Traceback" in kept.read_text() and "in broken" in kept.read_text()


def test_paths_that_are_no_job_and_no_model_are_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = cli(capsys, "generate", tmp_path / "empty", "--prompt", "x")
    assert code == 2 and "neither a lowmem-ft job (no job.json) nor a Hugging Face model" in err
    code, _, err = cli(capsys, "generate", tmp_path / "missing", "--prompt", "x")
    assert code == 2 and "no such job or model directory" in err and len(err.strip().splitlines()) == 1
    # a mistyped relative path looks like a hub id ("org/name"): neither is there
    code, _, err = cli(capsys, "generate", "runz/job-1", "--prompt", "x")
    assert code == 2 and err.startswith(
        "error: no directory runz/job-1 here, and weights for runz/job-1 are not"
    )
    # a file that is not a delta: not read as one
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "a"}\n')
    code, _, err = cli(capsys, "generate", data, "--prompt", "x")
    assert code == 2 and err.strip() == (
        f"error: {data}: a file that is not a sparse delta (.safetensors); give a job directory, its "
        "delta.safetensors or its adapter directory"
    )


def test_an_unfinished_job_is_refused_in_one_line(tmp_path, capsys):
    job = tmp_path / "job"
    job.mkdir()
    record = {"status": "interrupted", "step": 1, "max_steps": 4, "config": {"method": "full"}}
    (job / "job.json").write_text(json.dumps(record))
    code, _, err = cli(capsys, "generate", job, "--prompt", "x")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "has no result yet (status interrupted, step 1 of 4)" in err and f"lowmem-ft resume {job}" in err
    from lowmem_ft.job_lock import JobLock

    holder = JobLock(job)  # running: said as resume says it, not "resume finishes it" (it would be refused)
    holder.acquire()
    code, _, err = cli(capsys, "generate", job, "--prompt", "x")
    holder.release()
    assert code == 2 and f"when the job finishes: {job} is being run by process {os.getpid()}; wait" in err


@pytest.mark.parametrize("method", ["full", "sift"])
def test_a_done_jobs_result_that_is_gone_is_written_again_by_resume(method, jobs, tmp_path, capsys):
    """A finished job whose result was deleted since: generate says resume writes it again, not that
    the job is unfinished; resume writes it from the last step's checkpoint, the same bytes; with no
    checkpoint left, resume says so in one line, not "there is nothing to resume"."""
    from lowmem_ft.delta import DELTA_FILE

    job = tmp_path / method
    shutil.copytree(jobs[method], job)
    result = job / ("model" if method == "full" else DELTA_FILE)
    written = (result / "model.safetensors" if method == "full" else result).read_bytes()
    shutil.rmtree(result) if result.is_dir() else result.unlink()

    code, _, err = cli(capsys, "generate", job, "--prompt", "x")
    assert code == 2 and err.strip() == (
        f"error: {job} is done, but its result ({result.name}) is not there; `lowmem-ft resume {job}` "
        "writes it again from the job's last checkpoint"
    )
    code, _, err = cli(capsys, "resume", job)
    assert code == 0, err  # (the job is quiet: -q)
    assert (result / "model.safetensors" if method == "full" else result).read_bytes() == written

    shutil.rmtree(result) if result.is_dir() else result.unlink()
    shutil.rmtree(job / "checkpoints")
    code, _, err = cli(capsys, "resume", job)
    assert code == 2 and err.strip() == (
        f"error: {job} is done, but its result {result} is gone and no checkpoint is left to write it "
        "from; start the job again with `lowmem-ft run`"
    )


def test_a_delta_is_refused_on_another_base(jobs, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(TINY_DIR, other)
    model = other / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-2] + b"  ")  # same tensors' layout, different bytes
    code, _, err = cli(capsys, "generate", jobs["sift"], "--base", other, "--prompt", "x")
    assert code == 2 and "is not the base this delta was trained from" in err


# -- memory on a GPU, with a faked budget (no GPU here) -------------------------------------------
def test_generation_memory_counts_the_weights_and_the_kv_cache():
    from transformers import AutoConfig

    from lowmem_ft.planner.plan import CUDA_CONTEXT_BYTES

    config = AutoConfig.from_pretrained(TINY_DIR)  # 6 layers, 2 KV heads of 64
    memory = generation_memory(config, params=1000, dtype=torch.bfloat16, tokens=100)
    assert memory.weights == 2000
    assert memory.kv_cache == 2 * 6 * 2 * 64 * 100 * 2
    assert memory.total == memory.weights + memory.kv_cache + CUDA_CONTEXT_BYTES


def test_layers_to_stream_is_the_fewest_that_make_the_rest_fit():
    """Streaming n layers frees their weights and costs a ring of two of the largest of them."""
    memory = generation_memory(SimpleNamespace(num_attention_heads=1, hidden_size=1), 600, torch.float32, 0)
    layers = [100, 100, 100, 100, 100]  # 500 of the 2,400 bytes of weights
    total = memory.total
    assert layers_to_stream(memory, layers, total) == 0  # exactly enough: nothing streamed
    # 1 and 2 layers streamed save nothing (a ring of 200 bytes for 100 or 200); 3 save 100 bytes
    assert layers_to_stream(memory, layers, total - 1) == 3
    assert layers_to_stream(memory, layers, total - 100) == 3
    assert layers_to_stream(memory, layers, total - 101) == 4
    assert layers_to_stream(memory, layers, total - 300) == 5
    assert layers_to_stream(memory, layers, total - 301) is None


def placed_on_a_fake_gpu(monkeypatch, free_bytes: int, **options) -> Generator:
    """A generator of the embedded model on the CPU, placed as on a GPU with ``free_bytes`` free:
    the streaming engine runs its CPU path (host-to-host copies), so what the layers compute is
    what a GPU run's would be."""
    from lowmem_ft.generate import generator as generator_module

    monkeypatch.setattr(generator_module, "measures_free_memory", lambda device: True)
    monkeypatch.setattr(generator_module, "free_gpu_bytes", lambda device: free_bytes)
    return load_generator("tiny", GenerateOptions(device="cpu", **options))


def test_a_model_whose_weights_do_not_fit_streams_layers_and_answers_the_same(monkeypatch):
    from lowmem_ft.planner.plan import CUDA_CONTEXT_BYTES

    options = {"max_new_tokens": 12}
    expected = load_generator("tiny", GenerateOptions(device="cpu", **options)).complete(PROMPT)
    reference = load_generator("tiny", GenerateOptions(device="cpu", **options))
    tokens = len(reference.prompt_ids(PROMPT)) + 12
    weights = sum(p.numel() * p.element_size() for p in reference.model.parameters())
    memory = generation_memory(reference.model.config, weights // 4, torch.float32, tokens)
    assert memory.weights == weights
    free = CUDA_CONTEXT_BYTES + memory.kv_cache + int(0.8 * weights)  # a fifth of the weights too many

    generator = placed_on_a_fake_gpu(monkeypatch, free, **options)
    assert generator.complete(PROMPT) == expected
    streamer = generator.streamer
    layer_bytes = [sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in streamer.layers]
    n = len(streamer.streamed)
    # The fewest layers that fit: what is left on the device and the ring fit, with one layer fewer not.
    held = lambda k: memory.total - sum(layer_bytes[:k]) + 2 * max(layer_bytes[:k], default=0)  # noqa: E731
    assert streamer.streamed == list(range(n)) and held(n) <= free < held(n - 1)
    assert streamer.copies >= n * 12  # each layer crossed at every token's forward
    note = dict(generator.describe())["memory"]
    assert (
        note.startswith(f"{n} of {len(layer_bytes)} decoder layers stay in host memory") and "slower" in note
    )
    assert generator.complete(PROMPT) == expected  # and again, the layers still streamed


def test_a_generation_that_does_not_fit_even_streamed_is_refused_in_one_line(monkeypatch, capsys):
    from lowmem_ft.generate import generator as generator_module

    monkeypatch.setattr(generator_module, "measures_free_memory", lambda device: True)
    monkeypatch.setattr(generator_module, "free_gpu_bytes", lambda device: 2**20)
    code, out, err = cli(capsys, "generate", "tiny", "--prompt", PROMPT, "--device", "cpu", *NEW)
    assert code == 2 and out == ""
    (line,) = err.strip().splitlines()
    assert "even with every decoder layer left in host memory" in line and "1.0 MiB is free" in line, line


def test_generate_says_when_layers_stream(monkeypatch, capsys):
    from lowmem_ft.generate import generator as generator_module
    from lowmem_ft.planner.plan import CUDA_CONTEXT_BYTES

    monkeypatch.setattr(generator_module, "measures_free_memory", lambda device: True)
    monkeypatch.setattr(generator_module, "free_gpu_bytes", lambda device: CUDA_CONTEXT_BYTES + 16 * 2**20)
    code, out, err = cli(capsys, "generate", "tiny", "--prompt", PROMPT, "--device", "cpu", *NEW)
    assert code == 0 and out.strip(), err
    header = err.splitlines()
    assert header[-1].startswith("memory     ") and "decoder layers stay in host memory" in header[-1], err


def test_on_a_gpu_the_model_is_refused_before_it_moves_when_it_cannot_fit(monkeypatch):
    from types import SimpleNamespace

    loaded = load_generator("tiny", GenerateOptions(max_new_tokens=8))
    generator = Generator(**{**vars(loaded), "device": torch.device("cuda:0"), "dtype": torch.bfloat16})
    seen = {}

    def budget(cuda_index=0, **_):
        seen["index"] = cuda_index
        return SimpleNamespace(gpu=object(), gpu_bytes=64 * 2**20)  # a GPU with 64 MiB free

    monkeypatch.setattr("lowmem_ft.generate.generator.detect_budget", budget)
    with pytest.raises(UserError, match="generating needs about .* on cuda:0 .* 64.0 MiB is free"):
        generator.complete("hi")
    assert seen == {"index": 0}
    assert next(generator.model.parameters()).device.type == "cpu"


def test_the_readme_generate_command_runs(jobs, capsys):
    """README's "Try the result" command, on a job of this module in place of the README's."""
    import shlex

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    line = next(line for line in readme.splitlines() if line.startswith("$ lowmem-ft generate runs/"))
    _, program, command, _job, *options = shlex.split(line)
    assert (program, command) == ("lowmem-ft", "generate") and options[0] == "--prompt"
    code, out, err = cli(capsys, command, jobs["full"], *options, *NEW)
    assert code == 0 and out.strip(), err


def test_every_file_a_job_writes_is_as_readable_as_its_umask_allows(jobs):
    """safetensors 0.8 creates its files 0600 (its issue #782): a model, delta or adapter saved for a
    server that runs as another user would be unreadable there. Every file of these jobs (results,
    merged exports, checkpoints, kept data) has the mode ``open()`` gives a new file here."""
    from lowmem_ft.files import _umask

    expected = 0o666 & ~_umask()
    files = [f for job in jobs.values() for f in job.parent.rglob("*") if f.is_file()]
    assert {f.suffix for f in files} >= {".safetensors", ".json"}
    wrong = {str(f.relative_to(f.parents[1])): oct(f.stat().st_mode & 0o777) for f in files}
    assert {f: mode for f, mode in wrong.items() if mode != oct(expected)} == {}


@pytest.mark.parametrize("damage", ["adapter config", "adapter weights", "model weights"])
def test_a_damaged_result_is_one_line_in_generate_and_export(jobs, tmp_path, capsys, damage):
    """A result's files cut short or broken (a copy interrupted, a disk fault): one line naming what
    cannot be read, exit code 2, for `generate` and `export --merge` alike."""
    job = tmp_path / "job"
    shutil.copytree(jobs["full" if damage == "model weights" else "lora"], job)
    file = {
        "adapter config": job / "adapter" / "adapter_config.json",
        "adapter weights": job / "adapter" / "adapter_model.safetensors",
        "model weights": job / "model" / "model.safetensors",
    }[damage]
    file.write_bytes(file.read_bytes()[: len(file.read_bytes()) // 2])
    commands = [["generate", job, "--prompt", PROMPT, *NEW]]
    if damage != "model weights":
        commands.append(["export", job, "--merge", "--out", tmp_path / "merged"])
    for command in commands:
        code, out, err = cli(capsys, *command)
        assert code == 2 and out == "", err
        (line,) = err.strip().splitlines()
        assert "look damaged" in line and ("LoRA adapter" in line or "cannot load the weights" in line), line
    assert not (tmp_path / "merged").exists()


def test_a_delta_whose_base_was_moved_says_so_and_takes_it_with_base(tmp_path, capsys, monkeypatch):
    """The base a SIFT job recorded (a local directory) was moved: generate and export name it and
    the way out (--base), rather than "unknown model"; given with --base, it is used."""
    base = tmp_path / "mbase"
    shutil.copytree(TINY_DIR, base)
    data = write_records(
        tmp_path / "d.jsonl", [{"prompt": f"Q{i}", "completion": f" A{i}."} for i in range(8)]
    )
    monkeypatch.chdir(tmp_path)  # the base named as the user would: a relative path
    job = tmp_path / "job"
    _main("run", "mbase", data, "--method", "sift", "--out", job, *JOB_ARGS)
    base.rename(tmp_path / "moved")
    for command in (["generate", job, "--prompt", "Q1", *NEW], ["export", job, "--merge", "--out", "m"]):
        code, _, err = cli(capsys, *command)
        (line,) = err.strip().splitlines()
        assert code == 2 and "the delta's base model mbase" in line and "give it with --base" in line, line
    code, out, err = cli(capsys, "generate", job, "--prompt", "Q1", "--base", tmp_path / "moved", *NEW)
    assert code == 0 and out.strip(), err
