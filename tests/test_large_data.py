"""Large data: tokenising in chunks on whole arrays gives exactly the ids and labels the per-record code
gave, the tokenised data is cached in the job for `resume`, and evaluation stays cheap (a capped,
seeded subset, micro-batch by micro-batch, no gradients)."""

from __future__ import annotations

import copy
import json
import logging
import random
import shutil
from pathlib import Path

import pytest
import torch
from test_cli import cli  # the CLI in-process: (exit code, stdout, stderr)
from test_data import (
    CHAT_TEMPLATE,
    CONVERSATION,
    SHAREGPT,
    TOOL_CONVERSATION,
    TOOL_TEMPLATE,
    TOOLS,
)
from test_resume import (
    assert_same_result,
    signal_at_step,
)

from lowmem_ft.data import (
    Example,
    ExampleTable,
    Record,
    choose_eval_examples,
    read_jsonl,
    render,
    tokenize_records,
)
from lowmem_ft.data import tokenize as tokenize_module
from lowmem_ft.data.cache import read_cache, write_cache
from lowmem_ft.data.formats import detect_format
from lowmem_ft.errors import DataError

# -- the per-record tokenisation this replaced, kept as the reference -------------------------------------


def reference_tokenize(records: list[Record], fmt: str, tokenizer, seq_len: int) -> list[Example]:
    """lowmem-ft 0.x's tokenize_records (a Python step per record and per token), verbatim but for
    the statistics."""
    rendered = [render(record.data, fmt, tokenizer) for record in records]
    encodings = tokenizer([r.text for r in rendered], add_special_tokens=False, return_offsets_mapping=True)
    examples = []
    for i, item in enumerate(rendered):
        input_ids = list(encodings["input_ids"][i])
        labels = [
            token
            if any(s < span_end and e > span_start for span_start, span_end in item.train_spans)
            else -100
            for token, (s, e) in zip(input_ids, encodings["offset_mapping"][i], strict=True)
        ]
        if tokenizer.bos_token_id is not None and not item.text.startswith(tokenizer.bos_token):
            input_ids.insert(0, tokenizer.bos_token_id)
            labels.insert(0, -100)
        if tokenizer.eos_token_id is not None and not item.text.endswith(tokenizer.eos_token):
            last_trained = bool(labels) and labels[-1] != -100
            input_ids.append(tokenizer.eos_token_id)
            labels.append(tokenizer.eos_token_id if last_trained else -100)
        input_ids, labels = input_ids[:seq_len], labels[:seq_len]
        if any(label != -100 for label in labels):
            examples.append(Example(input_ids, labels))
    return examples


def with_template(tokenizer, template):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = template
    return tokenizer


UNICODE = "Grüße, 東京 🙂 — naïve café"
ALPHABET = ["a", "b", " ", "xy", "\n", "\t", ".", ",", "!?", "é", "東", "🙂", "<s>", "</s>", "  "]
# (records of one format, the chat template or None): every format, tool use, texts that already
# start with BOS or end with EOS, non-ASCII text (offsets count characters, not bytes), empty replies
RECORD_SETS = {
    "text": ([{"text": "The cat sat."}, {"text": "<s>Starts with BOS"}, {"text": "ends with EOS</s>"}], None),
    "prompt-completion": (
        [{"prompt": f"Q{i}: {UNICODE}?", "completion": f" A{i} " * i} for i in range(1, 6)],
        None,
    ),
    "alpaca": (
        [
            {"instruction": "Name the capital.", "input": "France", "output": "Paris."},
            {"instruction": UNICODE, "output": "Ja. " * 30},
            {"instruction": "x", "input": "", "output": "y"},
        ],
        None,
    ),
    "chat, default template": (
        [{"messages": CONVERSATION}, {"messages": CONVERSATION[:4]}, {"messages": CONVERSATION[1:3]}],
        None,
    ),
    "chat, model template": (
        [
            {"messages": CONVERSATION},
            {"messages": [*CONVERSATION[:2], {"role": "assistant", "content": ""}, *CONVERSATION[3:]]},
        ],
        CHAT_TEMPLATE,
    ),
    "sharegpt": ([{"conversations": SHAREGPT}, {"conversations": SHAREGPT[1:3]}], CHAT_TEMPLATE),
    # spaces and newlines at the seams, where the tokenizer trims its offsets; special tokens inside
    "whitespace": (
        [
            {"prompt": "Q:\n\n  ", "completion": "   \n  answer  \n"},
            {"prompt": "a</s>b<s>", "completion": "<s> c </s> d"},
            {"prompt": "  ", "completion": " \t"},
        ],
        None,
    ),
    "random": (
        [
            {
                "prompt": "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 40))),
                "completion": "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 40))) + ".",
            }
            for rng in [random.Random(0)]
            for _ in range(40)
        ],
        None,
    ),  # fmt: skip
    "tool calls": (
        [{"messages": TOOL_CONVERSATION, "tools": TOOLS}, {"messages": TOOL_CONVERSATION}],
        TOOL_TEMPLATE,
    ),
}


def sentencepiece_style_tokenizer():
    """A tokenizer made the way Llama-2's and Mistral's are (spaces as "▁", a "▁" in front, bytes for
    what the vocabulary lacks), trained here on the record sets' own text: its offsets are not the
    byte-level ones of the embedded model's."""
    from tokenizers import Tokenizer, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", *bytes_])
    # (json.dumps writes "東" as "\\u6771": the vocabulary lacks it, and its bytes stand in for it)
    backend.train_from_iterator([json.dumps(rows) for rows, _ in RECORD_SETS.values()], trainer)
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special)


def truncating_tokenizer(tiny_tokenizer):
    """The embedded tokenizer with truncation and padding switched on in its Rust tokenizer (a
    tokenizer.json can ship them so); the Python wrapper switches them off for each call."""
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.backend_tokenizer.enable_truncation(max_length=5)
    tokenizer.backend_tokenizer.enable_padding(length=600)
    return tokenizer


TOKENIZERS = {
    "byte-level": lambda tiny: tiny,
    "sentencepiece-style": lambda tiny: sentencepiece_style_tokenizer(),
    "truncating": truncating_tokenizer,
}


@pytest.mark.parametrize("chunk", [2, 8192])  # several chunks, and one
@pytest.mark.parametrize("seq_len", [512, 24, 9])  # nothing cut; cut; most responses cut away
@pytest.mark.parametrize("name", list(RECORD_SETS))
@pytest.mark.parametrize("kind", list(TOKENIZERS))
def test_tokenising_gives_the_ids_and_labels_the_per_record_code_gave(
    kind, name, seq_len, chunk, tiny_tokenizer, monkeypatch
):
    rows, template = RECORD_SETS[name]
    tokenizer = TOKENIZERS[kind](tiny_tokenizer)
    tokenizer = with_template(tokenizer, template) if template else tokenizer
    records = [Record(i + 1, row, "data.jsonl") for i, row in enumerate(rows * 3)]
    fmt = detect_format(rows[0])
    monkeypatch.setattr(tokenize_module, "CHUNK", chunk)
    table, stats = tokenize_records(records, fmt, tokenizer, seq_len)
    expected = reference_tokenize(records, fmt, tokenizer, seq_len)  # (after: it resets the Rust tokenizer)
    assert isinstance(table, ExampleTable)
    assert list(table) == expected
    assert stats.examples == len(expected) and stats.dropped_no_target == len(records) - len(expected)
    assert stats.tokens == sum(len(e.input_ids) for e in expected)
    assert stats.target_tokens == sum(label != -100 for e in expected for label in e.labels)


def test_example_table_round_trips_and_selects():
    examples = [Example([5, 6, 7], [-100, 6, 7]), Example([8], [8]), Example([9, 10], [-100, -100])]
    table = ExampleTable.from_examples(examples)
    assert list(table) == examples and len(table) == 3
    assert table[-1] == examples[-1] and table[1:] == examples[1:]
    assert list(table.select([2, 0])) == [examples[2], examples[0]]
    with pytest.raises(ValueError, match="its token's id or -100"):
        ExampleTable.from_examples([Example([5], [6])])
    with pytest.raises(IndexError):
        table[3]


# -- the tokenised data kept in the job ------------------------------------------------------------------

KEY = {"data_sha256": "abc", "seq_len": 64, "pack": False}


def kept_tables() -> dict[str, ExampleTable]:
    train = ExampleTable.from_examples([Example([1, 5, 6], [-100, 5, 6]), Example([1, 7], [-100, 7])])
    return {"train": train, "eval": ExampleTable.from_examples([Example([1, 9], [-100, 9])])}


def test_the_tokenizer_digest_changes_with_any_special_token(tiny_tokenizer):
    """The kept data's key: a chat template is rendered with the tokenizer's special tokens (bos,
    eos, unk, pad), so a tokenizer that names another one makes other examples, and its digest
    differs, even where the vocabulary is the same (an existing token named as the pad)."""
    from lowmem_ft.data.cache import tokenizer_sha256

    digest = tokenizer_sha256(tiny_tokenizer)
    assert tokenizer_sha256(copy.deepcopy(tiny_tokenizer)) == digest
    for name in ("pad_token", "unk_token"):
        other = copy.deepcopy(tiny_tokenizer)
        setattr(other, name, "</s>")
        assert tokenizer_sha256(other) != digest, name
    other = copy.deepcopy(tiny_tokenizer)
    other.add_special_tokens(
        {"additional_special_tokens": ["</s>"]}
    )  # an extra one, already in the vocabulary
    assert tokenizer_sha256(other) != digest


def test_kept_data_reads_back_only_for_its_key(tmp_path, caplog):
    write_cache(tmp_path, KEY, kept_tables(), {"format": "text"})
    tables, summary = read_cache(tmp_path, KEY)
    assert summary == {"format": "text"}
    assert {name: list(t) for name, t in tables.items()} == {n: list(t) for n, t in kept_tables().items()}
    with caplog.at_level(logging.INFO):
        assert read_cache(tmp_path, {**KEY, "seq_len": 128, "pack": True}) is None
    assert "was made with another seq_len, pack; tokenising again" in caplog.text
    assert read_cache(tmp_path / "other", KEY) is None  # none kept: no word about it
    index = tmp_path / "tokenized/examples.json"  # kept by a version whose layout was another
    index.write_text(json.dumps({**json.loads(index.read_text()), "version": 1}))
    with caplog.at_level(logging.INFO):
        assert read_cache(tmp_path, KEY) is None
    assert "is of another layout; tokenising again" in caplog.text


@pytest.mark.parametrize("damage", ["truncate", "flip", "no-arrays", "bad-index"])
def test_damaged_kept_data_is_ignored_with_a_line(damage, tmp_path, caplog):
    write_cache(tmp_path, KEY, kept_tables(), {})
    arrays, index = tmp_path / "tokenized/examples.safetensors", tmp_path / "tokenized/examples.json"
    raw = bytearray(arrays.read_bytes())
    if damage == "truncate":
        arrays.write_bytes(raw[:-5])
    elif damage == "flip":
        raw[-3] ^= 0xFF  # in the last array's bytes: it still loads, and fails its sha256
        arrays.write_bytes(raw)
    elif damage == "no-arrays":
        arrays.unlink()
    else:
        index.write_text("{not json")
    with caplog.at_level(logging.INFO):
        assert read_cache(tmp_path, KEY) is None
    assert "cannot be used (" in caplog.text and "tokenising again" in caplog.text


def test_a_full_disk_costs_only_the_kept_data(tmp_path, caplog, monkeypatch):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("safetensors.numpy.save_file", full)
    with caplog.at_level(logging.INFO):
        write_cache(tmp_path, KEY, kept_tables(), {})
    assert "could not keep the tokenised data" in caplog.text and "the disk is full" in caplog.text
    assert list((tmp_path / "tokenized").iterdir()) == []


def test_a_stop_while_the_kept_data_is_written_leaves_no_temporary_file(tmp_path, monkeypatch):
    def stopped(arrays, path):
        Path(path).write_bytes(b"x" * 1000)  # half of it written
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.numpy.save_file", stopped)
    with pytest.raises(KeyboardInterrupt):
        write_cache(tmp_path, KEY, kept_tables(), {})
    assert list((tmp_path / "tokenized").iterdir()) == []


# -- a run: progress bars, the evaluation cap, resume ----------------------------------------------------


RUN = [
    "--max-steps", "7", "--batch-size", "4", "--micro-batch-size", "2", "--seq-len", "64",
    "--eval-every", "5", "--save-every", "2", "--save-dtype", "fp32", "--eval-fraction", "0.25",
    "--max-eval-examples", "5", "--lr", "1e-3",
]  # fmt: skip


def test_the_header_says_how_many_held_out_examples_are_evaluated(data, tmp_path, capsys):
    code, out, err = cli(
        capsys, "run", "tiny", data, "--out", tmp_path / "job", *RUN, "--max-steps", "1", "-q"
    )
    assert code == 0, err
    assert "36 train / eval 5 of 12 held-out examples (chosen by --seed)" in out
    summary = json.loads((tmp_path / "job/job.json").read_text())["data"]
    assert (summary["eval_examples"], summary["eval_examples_available"]) == (5, 12)
    code, out, err = cli(capsys, "run", "tiny", data, "--out", tmp_path / "all", *RUN, "--max-steps", "1",
                         "--max-eval-examples", "0", "-q")  # fmt: skip
    assert code == 0, err
    assert "36 train / 12 eval examples" in out


def test_the_evaluation_subset_is_seeded_and_ordered():
    examples = ExampleTable.from_examples([Example([i], [i]) for i in range(50)])
    chosen = [e.input_ids[0] for e in choose_eval_examples(examples, 10, seed=3)]
    assert len(chosen) == 10 and chosen == sorted(chosen)
    assert [e.input_ids[0] for e in choose_eval_examples(examples, 10, seed=3)] == chosen
    assert [e.input_ids[0] for e in choose_eval_examples(examples, 10, seed=4)] != chosen
    assert choose_eval_examples(examples, 0, seed=3) is examples  # 0: all of them
    assert choose_eval_examples(examples, 50, seed=3) is examples


class Bars:
    """Stands in for tqdm.tqdm: records each bar's description and whether it was shown."""

    made: list[tuple[str, bool]] = []

    def __init__(self, *args, desc="", disable=False, **kwargs):
        Bars.made.append((desc, not disable))

    def __getattr__(self, name):  # update, set_postfix, write, close
        return lambda *args, **kwargs: None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


@pytest.mark.parametrize("quiet", [False, True])
def test_reading_tokenising_and_evaluation_show_progress_unless_quiet(
    quiet, data, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr("tqdm.tqdm", Bars)
    monkeypatch.setattr(Bars, "made", [])
    shown = {}
    with monkeypatch.context() as patch:  # the training bar, as train.py imported it
        patch.setattr("lowmem_ft.train.tqdm", Bars)
        code, _, err = cli(capsys, "run", "tiny", data, "--out", tmp_path / "job", *RUN, "--max-steps", "1",
                           *(["-q"] if quiet else []))  # fmt: skip
    assert code == 0, err
    for desc, on in Bars.made:
        shown.setdefault(desc, set()).add(on)
    assert {"reading", "tokenising", "evaluation", "training"} <= set(shown)
    assert all(on == {not quiet} for on in shown.values()), shown


@pytest.mark.parametrize("columns", [0, 100])
def test_bars_are_drawn_on_a_terminal_that_says_it_has_no_size(columns):
    """A pseudo-terminal never given a size (`docker exec -t`, some CI runners) says 0 columns and 0
    rows, and tqdm then draws nothing at all; the tool's bars draw 80 columns there."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    code = (
        "from tqdm import tqdm\nfrom lowmem_ft.data.bulk import bar_size\n"
        "for _ in tqdm(range(3), desc='training', **bar_size()): pass\n"
    )
    master, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24 if columns else 0, columns, 0, 0))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=terminal, stderr=terminal, stdin=terminal)
    os.close(terminal)
    drawn = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # (the child has gone: the terminal's other end is closed)
            break
        if not chunk:
            break
        drawn += chunk
    os.close(master)
    assert child.wait() == 0
    last = drawn.decode().replace("\r\n", "\r").split("\r")[-2]  # the bar as it was left
    assert last.startswith("training: 100%") and "3/3" in last, drawn
    assert len(last) == (80 if columns == 0 else min(len(last), columns)), last


def test_evaluation_runs_micro_batch_by_micro_batch_without_gradients(data, tmp_path, capsys, monkeypatch):
    from lowmem_ft import train

    seen = []
    real = train.loss_sum

    def loss_sum(model, batch, device, dtype):
        if not model.training:  # an evaluation
            seen.append((batch["input_ids"].shape[0], torch.is_grad_enabled()))
        return real(model, batch, device, dtype)

    monkeypatch.setattr(train, "loss_sum", loss_sum)
    args = [*RUN, "--max-eval-examples", "0", "--max-steps", "1", "--micro-batch-size", "3", "-q"]
    assert cli(capsys, "run", "tiny", data, "--out", tmp_path / "job", *args)[0] == 0
    assert len(seen) == 2 * 4  # at step 0 and at the end: 12 examples in micro-batches of 3
    assert all(size <= 3 and not grad for size, grad in seen), seen


@pytest.mark.parametrize("kept", [True, False])
def test_resume_reads_the_kept_data_and_evaluates_on_the_same_examples(
    kept, data, tmp_path, capsys, monkeypatch
):
    reference, job = tmp_path / "reference", tmp_path / "job"
    assert cli(capsys, "run", "tiny", data, "--out", reference, *RUN, "-q")[0] == 0
    with monkeypatch.context() as patch:
        signal_at_step(patch, 3)
        assert cli(capsys, "run", "tiny", data, "--out", job, *RUN, "-q")[0] == 130
    assert (job / "tokenized/examples.json").is_file()
    with monkeypatch.context() as patch:
        if kept:  # the data files are not read again
            patch.setattr("lowmem_ft.run_data.read_records", lambda *a, **k: pytest.fail("read again"))
        else:  # a job from before the cache: tokenised again, and kept this time
            shutil.rmtree(job / "tokenized")
        code, out, err = cli(capsys, "resume", job, "-q")
    assert code == 0, err
    assert ("tokenised data read from" in out) == kept
    assert "eval 5 of 12 held-out examples" in out
    assert (job / "tokenized/examples.json").is_file()
    assert_same_result(job, reference)  # the evaluations at step 5 and the end included


def test_a_job_from_before_the_cap_is_resumed_evaluating_all_it_held_out(data, tmp_path, capsys, monkeypatch):
    job = tmp_path / "job"
    with monkeypatch.context() as patch:
        signal_at_step(patch, 3)
        assert cli(capsys, "run", "tiny", data, "--out", job, *RUN, "-q")[0] == 130
    record = json.loads((job / "job.json").read_text())
    for config in (record["requested"], record["config"]):
        del config["max_eval_examples"]
    (job / "job.json").write_text(json.dumps(record))
    code, out, err = cli(capsys, "resume", job, "-q")
    assert code == 0, err
    assert "36 train / 12 eval examples" in out


@pytest.mark.parametrize("escape", ["\\ud800", "\\uDFFF", "\\uDbFf"])
def test_a_lone_surrogate_is_found_however_its_escape_is_written(escape, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "東京 ' + escape + '"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r":2: 'text' holds a lone UTF-16 surrogate"):
        read_jsonl(path)
    path.write_text('{"text": "東京 \\ud83d\\ude42"}\n', encoding="utf-8")  # a pair is a character: 🙂
    assert read_jsonl(path)[0][0].data["text"] == "東京 🙂"


# -- a large data set: encoded while the run trains (data/lazy.py) -----------------------------------------


def rendered_records(tiny_tokenizer, n: int = 23):
    """Prompt-completion records, some with a response cut away by seq-len 12 (nothing left to learn)."""
    from lowmem_ft.data.tokenize import render_records

    records = [
        Record(line=i + 1, data={"prompt": "word " * (i % 4) * 5, "completion": f" answer {i}."}, path="d")
        for i in range(n)
    ]
    return render_records(records, "prompt-completion", tiny_tokenizer)


@pytest.mark.parametrize("in_background", [False, True])
def test_lazy_examples_are_the_records_examples_however_they_are_encoded(
    in_background, tiny_tokenizer, monkeypatch
):
    from lowmem_ft.data import lazy
    from lowmem_ft.data.tokenize import encode_chunk, encode_rendered

    rendered = rendered_records(tiny_tokenizer)
    whole, stats = encode_rendered(rendered, tiny_tokenizer, 12)
    assert 0 < stats.dropped_no_target < len(rendered)  # the data has both kinds
    stats_ = tokenize_module.TokenStats()
    one_by_one = [encode_chunk([r], tiny_tokenizer, 12, stats_, keep_dropped=True)[0] for r in rendered]
    monkeypatch.setattr(lazy, "CHUNK", 4)
    examples = lazy.LazyExamples(rendered, tiny_tokenizer, 12)
    if in_background:
        examples.start()
    # asked for out of order, as a shuffled epoch asks: each record's own example, empty if dropped
    for i in [17, 3, 22, 0, 9, 17, 4, 21, 1, 2, 5, 6, 7, 8, 10, 11, 12, 13, 14, 15, 16, 18, 19, 20]:
        assert examples[i] == one_by_one[i], i
    examples.encode_all()
    examples.close()
    assert examples.done and examples.stats == stats and stats.examples == len(whole)
    table = examples.table()
    assert len(table) == len(rendered)
    assert [e for e in table if e.input_ids] == list(whole)
    # from then on the examples are that one table: the chunks are not kept beside it (a million
    # records' tokens twice), and each record is still its own example
    assert examples._chunks == [table] and examples.table() is table
    assert [examples[i] for i in range(len(rendered))] == one_by_one


def test_a_data_set_that_seq_len_empties_is_refused_after_a_call_a_chunk(tiny_tokenizer, monkeypatch):
    """Every response cut away: the check that some record has something to learn encodes whole
    chunks (one tokenizer call each), not a record at a time; a chunk it encoded is not encoded
    again by the thread, and a record that has something makes it stop there."""
    from lowmem_ft.data import lazy
    from lowmem_ft.data.tokenize import encode_rendered

    empty = [r for r in rendered_records(tiny_tokenizer) if not encode_rendered([r], tiny_tokenizer, 12)[0]]
    rendered = (empty * 9)[:9]  # nothing to learn in any of them
    calls = []
    real = lazy.encode_chunk
    monkeypatch.setattr(
        lazy, "encode_chunk", lambda chunk, *a, **k: calls.append(len(chunk)) or real(chunk, *a, **k)
    )
    monkeypatch.setattr(lazy, "CHUNK", 4)
    assert not lazy.LazyExamples(rendered, tiny_tokenizer, 12).any_example()
    assert calls == [4] * (len(rendered) // 4) + [len(rendered) % 4] * (len(rendered) % 4 > 0)

    calls.clear()
    examples = lazy.LazyExamples(rendered[:8] + rendered_records(tiny_tokenizer)[:8], tiny_tokenizer, 12)
    assert examples.any_example() and calls == [4, 4, 4]  # stopped at the first chunk with one
    examples.start()
    examples.close()
    assert examples.done and calls == [4, 4, 4, 4]  # the thread encoded the fourth only


def test_the_background_encoding_stops_when_set_up_fails_after_the_data_and_says_its_own_failure(
    data, tiny_tokenizer, monkeypatch
):
    from lowmem_ft import prepare, run_data
    from lowmem_ft.config import RunConfig
    from lowmem_ft.data import lazy

    monkeypatch.setattr(run_data, "ENCODE_FIRST", 0)
    monkeypatch.setattr(lazy, "CHUNK", 2)
    started = []
    real_start = lazy.LazyExamples.start
    monkeypatch.setattr(lazy.LazyExamples, "start", lambda self: started.append(self) or real_start(self))

    def no_model(*args, **kwargs):
        raise RuntimeError("the model could not be loaded")

    monkeypatch.setattr(prepare, "load_placed_model", no_model)
    with pytest.raises(RuntimeError, match="the model could not be loaded"):
        prepare.setup(RunConfig.create(model="tiny", data=data, seq_len=64))
    (examples,) = started
    assert examples._stop.is_set() and not examples._thread.is_alive()

    # a failure in the thread, even one that is no Exception (a tokenizer's panic), is said as an error
    examples = lazy.LazyExamples(rendered_records(tiny_tokenizer), tiny_tokenizer, 12)
    examples._failed = BaseException("panicked")
    with pytest.raises(RuntimeError, match="encoding the training records failed: BaseException"):
        assert examples.done


def test_the_batcher_steps_over_empty_examples_in_its_seeded_order():
    from lowmem_ft.data import Batcher

    examples = [Example([i + 1], [i + 1]) if i % 3 else Example([], []) for i in range(10)]
    batcher = Batcher(examples, batch_size=4, micro_batch_size=2, pad_id=0, seed=5)
    # the reference: every epoch's permutation of the records, the empty ones left out, cut in fours
    order = [
        i
        for epoch in range(4)
        for i in torch.randperm(10, generator=torch.Generator().manual_seed(5 + epoch)).tolist()
        if i % 3
    ]
    for step in range(6):
        rows = torch.cat([mb["input_ids"] for mb in batcher.next_step()]).flatten().tolist()
        assert rows == [i + 1 for i in order[4 * step : 4 * step + 4]]
    with pytest.raises(ValueError, match="not empty"):
        Batcher([Example([], [])] * 3, 2, 2, 0, 0).next_step()


def test_a_large_data_set_trains_as_if_encoded_first_and_is_kept_once_encoded(
    data, tmp_path, capsys, monkeypatch
):
    # Records whose response --seq-len 64 cuts away: dropped either way, and not at the same
    # positions in the records as in the examples.
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    for i in (3, 20, 31):
        rows.insert(i, {"prompt": "a b c d " * 40, "completion": " cut away."})
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    reference, job = tmp_path / "reference", tmp_path / "job"
    code, out, err = cli(capsys, "run", "tiny", data, "--out", reference, *RUN, "-q")
    assert code == 0, err
    assert "dropped (no response left)" in out and "encoded as the run trains" not in out
    header = next(line for line in out.splitlines() if line.startswith("data  ")).split("): ", 1)[1]
    monkeypatch.setattr("lowmem_ft.run_data.ENCODE_FIRST", 0)  # every data set is a large one,
    monkeypatch.setattr("lowmem_ft.data.lazy.CHUNK", 4)  # of several chunks
    with monkeypatch.context() as patch:
        signal_at_step(patch, 3)
        code, out, err = cli(capsys, "run", "tiny", data, "--out", job, *RUN, "-q")
    assert code == 130, err
    assert "38 train records (encoded as the run trains) / eval 5 of 13 held-out examples" in out
    # said as the header of the run that encoded them first says it (and a resume's, read from the job)
    assert f"every training record encoded: {header}\n" in out and "3 dropped (no response left)" in header
    assert header.startswith("35 train / eval 5 of 13 held-out examples (chosen by --seed), ")
    summary = json.loads((job / "job.json").read_text())["data"]
    assert summary == json.loads((reference / "job.json").read_text())["data"]
    assert (job / "tokenized/examples.json").is_file()  # kept once encoded
    shutil.rmtree(job / "tokenized")  # stopped before they were: encoded again, while it trains
    # A job an earlier version started drew its batches over the 35 examples: not continued on others.
    record = json.loads((job / "job.json").read_text())
    earlier = {**record, "data": {k: v for k, v in record["data"].items() if k != "train_records"}}
    (job / "job.json").write_text(json.dumps(earlier))
    code, _, err = cli(capsys, "resume", job, "-q")
    assert code != 0 and "drew its batches over the 35 examples left of its 38 training records" in err
    (job / "job.json").write_text(json.dumps(record))
    code, out, err = cli(capsys, "resume", job, "-q")
    assert code == 0, err
    assert "encoded as the run trains" in out
    assert_same_result(job, reference)


# A template that writes the day, as Llama-3's ("Today Date: 05 Dec 2026"), from transformers' clock
DATED = (
    '{{ "Today: " + strftime_now("%d %b %Y") + "\\n" }}'
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
)


def test_a_chat_template_writes_the_jobs_first_day_and_resume_renders_the_same(
    tiny_tokenizer, tmp_path, capsys, monkeypatch
):
    """The day a template writes is part of the text trained on: a job renders its records with its
    first day (recorded by `run` in job.json), and a resume on another day, which renders them again
    (a stop before the kept data was written, here: none kept), renders the same text."""
    import datetime

    from lowmem_ft import run_data
    from lowmem_ft.data.tokenize import render_records

    tokenizer = with_template(tiny_tokenizer, DATED)
    records = [Record(line=1, data={"messages": CONVERSATION[:3]}, path="d")]
    text = lambda day: render_records(records, "chat", tokenizer, day=day)[0].text  # noqa: E731
    assert text(datetime.date(2024, 7, 26)).startswith("Today: 26 Jul 2024\n")
    assert text(None).startswith(f"Today: {datetime.date.today():%d %b %Y}\n")  # (the template's own)

    from conftest import TINY_DIR

    model = tmp_path / "tiny-dated"
    shutil.copytree(TINY_DIR, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": DATED}))
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": CONVERSATION}) + "\n" for _ in range(12)))
    rendered_on = []
    real = run_data.render_records
    rendered = lambda *a, **k: rendered_on.append(a[-1]) or real(*a, **k)  # noqa: E731
    monkeypatch.setattr(run_data, "render_records", rendered)
    monkeypatch.setattr(run_data, "write_cache", lambda *args: None)  # nothing kept: resume renders again
    job, args = tmp_path / "job", ["--max-steps", "2", "--seq-len", "64", "-q", "--eval-fraction", "0"]
    with monkeypatch.context() as patch:
        signal_at_step(patch, 1)
        code, _, err = cli(capsys, "run", model, data, "--out", job, *args)
    assert code == 130, err
    first_day = json.loads((job / "job.json").read_text())["requested"]["chat_date"]
    assert first_day == datetime.date.today().isoformat() and rendered_on == [datetime.date.today()]
    record = json.loads((job / "job.json").read_text())
    record["requested"]["chat_date"] = record["config"]["chat_date"] = "2024-07-26"  # "started then"
    (job / "job.json").write_text(json.dumps(record))
    code, _, err = cli(capsys, "resume", job, "-q")
    assert code == 0, err
    assert rendered_on[1:] == [datetime.date(2024, 7, 26)]


def test_a_chat_date_that_is_not_a_date_is_one_line(data):
    from lowmem_ft.config import RunConfig
    from lowmem_ft.errors import UserError

    RunConfig.create(model="tiny", data=data, chat_date="2026-12-05").validate()
    with pytest.raises(UserError, match="job.json: chat_date 'tomorrow' is not a date"):
        RunConfig.create(model="tiny", data=data, chat_date="tomorrow").validate()
