"""Tests for lowmem_ft.data.sources: the containers data may come in (a .json list, Parquet, a directory,
a saved Hugging Face dataset) and the path checks made before a run starts."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_DIR

from lowmem_ft.data import data_files, data_path_problem, read_jsonl, read_records
from lowmem_ft.errors import DataError

TEXT = [{"text": "one"}, {"text": "two"}]
NEEDS_DATASETS = 'needs the datasets library: pip install "lowmem-ft[datasets]"'


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_json(path: Path, rows, indent: int | None = 2) -> Path:
    path.write_text(json.dumps(rows, indent=indent), encoding="utf-8")
    return path


def error_of(path, **options) -> str:
    with pytest.raises(DataError) as excinfo:
        read_records(path, **options)
    message = str(excinfo.value)
    assert "\n" not in message  # one line: what is wrong; what would work
    assert "; " in message or NEEDS_DATASETS in message
    assert excinfo.value.exit_code == 2
    return message


# --- single files ------------------------------------------------------------------------------------------


def test_jsonl_reads_as_read_jsonl_does(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", TEXT)
    assert read_records(path) == read_jsonl(path)


def test_json_list_of_records(tmp_path):
    path = write_json(tmp_path / "data.json", [{"prompt": "a", "completion": "b"}] * 3)
    records, fmt, skipped = read_records(path)
    assert (fmt, skipped) == ("prompt-completion", 0)
    assert [r.location for r in records] == [f"{path}: record {n}" for n in (1, 2, 3)]


def test_json_list_errors_name_the_record_and_can_be_skipped(tmp_path):
    rows = [{"text": "a"}, {"text": 5}, "text", {"prompt": "p", "completion": "c"}, {"text": "b"}]
    path = write_json(tmp_path / "data.json", rows)
    assert error_of(path).startswith(f'{path}: record 2: "text" is a number; it must be a string')
    records, fmt, skipped = read_records(path, skip_bad_lines=True)
    assert (fmt, skipped, [r.line for r in records]) == ("text", 3, [1, 5])
    # The format mismatch is told in records, not lines.
    path = write_json(tmp_path / "mixed.json", [rows[0], rows[3]])
    assert "record is prompt-completion format but the file is text (detected from record 1)" in error_of(
        path
    )


def test_json_list_duplicate_key_is_one_bad_record(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[{"text": "a", "text": "b"}, {"text": "c"}]')
    assert error_of(path) == (f"{path}: record 1: key 'text' appears twice in one object; keep one of them")
    assert [r.data for r in read_records(path, skip_bad_lines=True)[0]] == [{"text": "c"}]


def test_json_record_size_is_limited_as_a_jsonl_line_is(tmp_path, monkeypatch):
    monkeypatch.setattr("lowmem_ft.data.records.MAX_RECORD_BYTES", 2**20)
    path = write_json(tmp_path / "data.json", [{"text": "a"}, {"text": "x" * (2**20 + 10)}])
    assert "record 2: the record holds 1.0 M characters of text, more than the 1 M a record may" in error_of(
        path
    )


def test_json_file_holding_jsonl_is_read_as_jsonl(tmp_path):
    # Dataset.to_json writes JSON Lines under a .json name.
    path = write_jsonl(tmp_path / "data.json", TEXT)
    records, fmt, _ = read_records(path)
    assert fmt == "text" and [r.location for r in records] == [f"{path}:1", f"{path}:2"]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (
            b'[\n  {"text": "a"},\n  {"text": "b"}\n  {"text": "c"}\n]',
            ":4: invalid JSON (Expecting ',' delimiter",
        ),
        (b"[]", ": the list of records is empty"),
        (
            b'{\n  "version": 1,\n  "data": [{"text": "a"}]\n}',
            ": holds one JSON object (keys: version, data)",
        ),
        (b'[{"text": "caf\xe9"}]', ": not valid UTF-8 (byte 15)"),
        (b"[" * 5000 + b"]" * 5000, ": JSON nested too deeply"),
        (
            b'[{"text": "a", "n": ' + b"9" * 5000 + b"}]",
            ": a number has more than 4,300 digits; write it as a string",
        ),
    ],
    ids=["invalid json", "empty list", "one object", "not utf-8", "too deep", "huge number"],
)
def test_json_file_problems_stop_the_run_even_when_skipping(tmp_path, content, reason):
    path = tmp_path / "data.json"
    path.write_bytes(content)
    assert error_of(path, skip_bad_lines=True).startswith(f"{path}{reason}")


def test_unknown_format_name(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", TEXT)
    assert error_of(path, fmt="csv").startswith(f"{path}: unknown format 'csv'; use one of auto, text")


# --- directories -------------------------------------------------------------------------------------------


def test_directory_files_are_read_in_name_order(tmp_path, caplog):
    write_jsonl(tmp_path / "b.jsonl", [{"text": "b1"}, {"text": "b2"}])
    write_json(tmp_path / "a.json", [{"text": "a1"}])
    write_jsonl(tmp_path / "c.jsonl", [{"text": "c1"}])
    (tmp_path / "README.md").write_text("# my data")
    (tmp_path / ".hidden.jsonl").write_text("not read")
    (tmp_path / "old").mkdir()
    with caplog.at_level(logging.INFO, logger="lowmem_ft"):
        assert data_path_problem(tmp_path) is None and data_files(tmp_path)  # (checked, hashed: not said)
        records, fmt, skipped = read_records(tmp_path)
    assert [r.data["text"] for r in records] == ["a1", "b1", "b2", "c1"]
    assert caplog.text.count("leaving out") == 1  # said once, as the data is read
    assert records[1].location == f"{tmp_path / 'b.jsonl'}:1"
    assert records[0].location == f"{tmp_path / 'a.json'}: record 1"
    assert "reading 3 data files, leaving out README.md, old" in caplog.text
    assert data_files(tmp_path) == [tmp_path / name for name in ("a.json", "b.jsonl", "c.jsonl")]


def test_directory_errors_name_the_file_and_line(tmp_path):
    write_jsonl(tmp_path / "1.jsonl", TEXT)
    (tmp_path / "2.jsonl").write_text('{"text": "a"}\n{"text": \n')
    assert error_of(tmp_path).startswith(f"{tmp_path / '2.jsonl'}:2: invalid JSON")
    records, _, skipped = read_records(tmp_path, skip_bad_lines=True)
    assert (len(records), skipped) == (3, 1)


def test_one_format_across_the_files_of_a_directory(tmp_path):
    write_jsonl(tmp_path / "1.jsonl", TEXT)
    write_jsonl(tmp_path / "2.jsonl", [{"prompt": "p", "completion": "c"}])
    assert error_of(tmp_path) == (
        f"{tmp_path / '2.jsonl'}:1: line is prompt-completion format but the data is text (detected from "
        f"{tmp_path / '1.jsonl'}:1); use one format in all the files"
    )
    assert "--format text was given" in error_of(tmp_path, fmt="text")


def test_directory_with_no_valid_record(tmp_path):
    (tmp_path / "1.jsonl").write_text("[1]\n")
    write_json(tmp_path / "2.json", [3])
    assert error_of(tmp_path, skip_bad_lines=True) == (
        f"{tmp_path}: no valid records (2 bad records skipped); "
        "run without --skip-bad-lines to see what is wrong with the first one"
    )


def test_a_directory_of_jsonl_needs_no_datasets_library(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises, find_spec says absent
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    write_jsonl(tmp_path / "1.jsonl", TEXT)
    assert data_path_problem(tmp_path) is None
    assert len(read_records(tmp_path)[0]) == 2
    (tmp_path / "2.parquet").write_bytes(b"PAR1")
    assert data_path_problem(tmp_path) == f"reading {tmp_path} {NEEDS_DATASETS}"
    assert error_of(tmp_path / "2.parquet") == f"reading {tmp_path / '2.parquet'} {NEEDS_DATASETS}"


# --- the path check before a run ----------------------------------------------------------------------------


def test_data_path_problems(tmp_path):
    def problem(path) -> str:
        reason = data_path_problem(path)
        assert reason is not None and reason.startswith(f"{path}: ") and "; " in reason
        return reason

    assert "no such file or directory" in problem(tmp_path / "missing.jsonl")
    assert "is an empty directory; put the data in it as .jsonl" in problem(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    assert "no data files in this directory (found notes.txt, sub/); it must hold" in problem(tmp_path)
    assert "is not a regular file (a pipe or a device)" in problem(Path("/dev/null"))
    os.mkfifo(tmp_path / "pipe.jsonl")
    assert "is not a regular file" in problem(tmp_path / "pipe.jsonl")
    for name, reason in [
        ("data.csv", "CSV is not read; convert it to JSONL"),
        ("data.jsonl.gz", "compressed files are not read; decompress it first"),
        ("data.arrow", "give the directory Dataset.save_to_disk wrote"),
    ]:
        (tmp_path / name).write_text("x")
        assert reason in problem(tmp_path / name)
        assert error_of(tmp_path / name) == problem(tmp_path / name)  # reading says the same
    # Any other name is read as JSONL, as before: the check is on names, not contents.
    assert data_path_problem(write_jsonl(tmp_path / "data.txt", TEXT)) is None


def test_data_path_problem_needs_no_torch(tmp_path):
    code = (
        "import sys; from lowmem_ft.data.sources import data_path_problem; "
        f"print(data_path_problem({str(tmp_path)!r}), 'torch' in sys.modules, 'datasets' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split()[-2:] == ["False", "False"]


# --- Parquet and saved datasets (the optional `datasets` extra) --------------------------------------------

CHAT_ROWS = [
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    {
        "messages": [
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}],
            },
            {"role": "tool", "content": "sunny"},
            {"role": "assistant", "content": "Sunny."},
        ]
    },
]


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pyarrow = pytest.importorskip("pyarrow")
    parquet = pytest.importorskip("pyarrow.parquet")
    parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    return path


def test_parquet_rows_read_as_written(tmp_path):
    path = write_parquet(tmp_path / "data.parquet", CHAT_ROWS)
    records, fmt, _ = read_records(path)
    # Arrow gives every message every field, null where it had none; those nulls are left out again.
    assert fmt == "chat" and records[0].data == CHAT_ROWS[0]
    assert records[1].data["messages"][1] == {k: v for k, v in CHAT_ROWS[1]["messages"][1].items() if v}
    assert records[1].location == f"{path}: record 2"


def test_parquet_errors_name_the_record(tmp_path):
    path = write_parquet(tmp_path / "data.parquet", [{"text": "a"}, {"text": " "}])
    assert error_of(path).startswith(f'{path}: record 2: "text" is empty')
    assert read_records(path, skip_bad_lines=True)[2] == 1
    # no rows: said as an empty .json list is (it blamed --skip-bad-lines, which was not given)
    pyarrow = pytest.importorskip("pyarrow")
    empty = pyarrow.table({"instruction": pyarrow.array([], pyarrow.string())})
    pytest.importorskip("pyarrow.parquet").write_table(empty, tmp_path / "empty.parquet")
    assert (
        error_of(tmp_path / "empty.parquet")
        == f"{tmp_path / 'empty.parquet'}: holds no records; it must hold at least one record"
    )
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    assert error_of(tmp_path / "broken.parquet").startswith(
        f"{tmp_path / 'broken.parquet'}: cannot be read as Parquet"
    )


def test_empty_parquet_part_files_of_a_directory_are_left_out(tmp_path, caplog):
    """Dask and Spark write a part file of no rows where a partition is empty: the directory is read
    without it (it was refused whole); a directory of nothing but such files is refused."""
    pyarrow = pytest.importorskip("pyarrow")
    parquet = pytest.importorskip("pyarrow.parquet")
    parts = tmp_path / "parts"
    parts.mkdir()
    parquet.write_table(
        pyarrow.table({"text": pyarrow.array([], pyarrow.string())}), parts / "part-0.parquet"
    )
    write_parquet(parts / "part-1.parquet", [{"text": "a"}, {"text": "b"}])
    with caplog.at_level("INFO", logger="lowmem_ft"):
        records, fmt, _ = read_records(parts)
    assert [r.data["text"] for r in records] == ["a", "b"] and fmt == "text"
    assert f"{parts / 'part-0.parquet'}: no records; left out" in caplog.text
    (parts / "part-1.parquet").unlink()
    parquet.write_table(
        pyarrow.table({"text": pyarrow.array([], pyarrow.string())}), parts / "part-2.parquet"
    )
    assert error_of(parts) == f"{parts}: none of its files holds a record; it must hold at least one"


def test_saved_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(CHAT_ROWS).save_to_disk(tmp_path / "ds")
    assert data_path_problem(tmp_path / "ds") is None
    records, fmt, _ = read_records(tmp_path / "ds")
    assert fmt == "chat" and [r.data for r in records][0] == CHAT_ROWS[0]
    assert records[1].data["messages"][2] == {"role": "tool", "content": "sunny"}
    assert {p.name for p in data_files(tmp_path / "ds")} >= {"state.json", "dataset_info.json"}


def test_saved_dataset_errors_name_the_record(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{"text": "a"}, {"text": ""}]).save_to_disk(tmp_path / "ds")
    assert error_of(tmp_path / "ds").startswith(f'{tmp_path / "ds"}: record 2: "text" is empty')
    datasets.Dataset.from_dict({"text": []}).save_to_disk(tmp_path / "none")  # (an IndexError in datasets)
    assert (
        error_of(tmp_path / "none")
        == f"{tmp_path / 'none'}: the saved dataset has no records; it must hold at least one"
    )


def test_saved_dataset_dict_reads_its_train_split(tmp_path, caplog):
    datasets = pytest.importorskip("datasets")
    splits = {"train": [{"text": "t1"}, {"text": "t2"}], "test": [{"text": "e"}]}
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(
        tmp_path / "d"
    )
    with caplog.at_level(logging.INFO, logger="lowmem_ft"):
        records, _, _ = read_records(tmp_path / "d")
    assert [r.data["text"] for r in records] == ["t1", "t2"]
    assert records[0].location == f"{tmp_path / 'd' / 'train'}: record 1"
    assert "is a saved DatasetDict; reading its train split" in caplog.text

    only_test = tmp_path / "only_test"
    datasets.DatasetDict({"test": datasets.Dataset.from_list(splits["test"])}).save_to_disk(only_test)
    assert data_path_problem(only_test) == (
        f'{only_test}: a saved DatasetDict with no "train" split (splits: test); give the directory of the '
        f"split to train on instead, e.g. {only_test / 'test'}"
    )
    assert read_records(only_test / "test")[0][0].data == {"text": "e"}


def test_saved_dataset_that_cannot_be_read(tmp_path):
    pytest.importorskip("datasets")
    (tmp_path / "dataset_dict.json").write_text("{}")
    assert data_path_problem(tmp_path) == (
        f"{tmp_path}: dataset_dict.json is not what DatasetDict.save_to_disk writes; save the dataset again"
    )
    (tmp_path / "dataset_dict.json").unlink()
    (tmp_path / "state.json").write_text("{}")  # no list of its Arrow files
    (tmp_path / "dataset_info.json").write_text("{}")
    assert error_of(tmp_path).startswith(f"{tmp_path}: cannot be read as a saved dataset (")


def test_saved_dataset_without_the_library(tmp_path, monkeypatch):
    (tmp_path / "state.json").write_text("{}")
    (tmp_path / "dataset_info.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)
    assert data_path_problem(tmp_path) == f"reading {tmp_path} {NEEDS_DATASETS}"
    assert error_of(tmp_path) == f"reading {tmp_path} {NEEDS_DATASETS}"


# --- every container and format, trained on ---------------------------------------------------------------

TRAIN = ["--max-steps", "2", "--batch-size", "4", "--micro-batch-size", "4", "--seq-len", "64", "-q"]
PAIRS = [
    {"prompt": f"Count to {i}.", "completion": f" {', '.join(map(str, range(1, i + 2)))}."} for i in range(16)
]


def trained_losses(capsys, out: Path, model, data: Path) -> list[float]:
    """Run ``lowmem-ft run`` on ``data``; the job's training losses, step by step."""
    from test_cli import cli

    code, _, err = cli(capsys, "run", model, data, "--out", out, *TRAIN)
    assert code == 0, err
    assert json.loads((out / "job.json").read_text())["status"] == "done"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [m["loss"] for m in lines if "loss" in m]


def test_every_container_trains_as_its_jsonl_does(tmp_path, capsys):
    """A .json list, a .parquet file, a directory of .jsonl files and a saved dataset holding the
    records of a .jsonl file train on exactly what it does: the same losses, step by step."""
    datasets = pytest.importorskip("datasets")
    (tmp_path / "parts").mkdir()
    write_jsonl(tmp_path / "parts" / "a.jsonl", PAIRS[:7])
    write_jsonl(tmp_path / "parts" / "b.jsonl", PAIRS[7:])
    datasets.Dataset.from_list(PAIRS).save_to_disk(tmp_path / "saved")
    containers = {
        "json": write_json(tmp_path / "data.json", PAIRS),
        "parquet": write_parquet(tmp_path / "data.parquet", PAIRS),
        "directory": tmp_path / "parts",
        "saved dataset": tmp_path / "saved",
    }
    expected = trained_losses(
        capsys, tmp_path / "jobs" / "jsonl", "tiny", write_jsonl(tmp_path / "data.jsonl", PAIRS)
    )
    assert len(expected) == 2
    for name, path in containers.items():
        assert trained_losses(capsys, tmp_path / "jobs" / name, "tiny", path) == expected, name


def test_sharegpt_and_tool_calls_train(tmp_path, capsys):
    """ShareGPT conversations train as the same conversations in OpenAI's shape do; conversations
    with tools, tool calls and tool results train on a model whose chat template writes them."""
    from test_data import CONVERSATION, SHAREGPT, TOOL_CONVERSATION, TOOL_TEMPLATE, TOOLS

    def numbered(messages, key):  # 8 conversations that differ
        return [[{**m, key: f"{m[key]} ({i})"} for m in messages] for i in range(8)]

    sharegpt = write_jsonl(
        tmp_path / "sharegpt.jsonl", [{"conversations": c} for c in numbered(SHAREGPT, "value")]
    )
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in numbered(CONVERSATION, "content")])
    assert trained_losses(capsys, tmp_path / "sharegpt", "tiny", sharegpt) == trained_losses(
        capsys, tmp_path / "chat", "tiny", chat
    )

    model = tmp_path / "tiny-with-tools"
    shutil.copytree(TINY_DIR, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TOOL_TEMPLATE}))
    tools = write_jsonl(tmp_path / "tools.jsonl", [{"messages": TOOL_CONVERSATION, "tools": TOOLS}] * 8)
    losses = trained_losses(capsys, tmp_path / "tools", model, tools)
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    from test_cli import cli

    code, _, err = cli(capsys, "run", "tiny", tools, "--out", tmp_path / "refused", *TRAIN)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "tool" in err, err
    assert not (tmp_path / "refused").exists()


def test_a_compressed_file_with_a_data_name_is_refused_as_what_it_is(tmp_path):
    """By its first bytes: it was "not valid UTF-8 (byte 2 of the line)" on line 1."""
    import gzip
    import zipfile

    packed = tmp_path / "data.jsonl"
    packed.write_bytes(gzip.compress(b'{"text": "a"}\n'))
    assert error_of(packed) == f"{packed}: gzip-compressed files are not read; decompress it first"
    with zipfile.ZipFile(tmp_path / "z.jsonl", "w") as archive:
        archive.writestr("data.jsonl", '{"text": "a"}\n')
    assert error_of(tmp_path / "z.jsonl").startswith(f"{tmp_path / 'z.jsonl'}: archives are not read")
