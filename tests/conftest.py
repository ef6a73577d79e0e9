"""Shared fixtures. Tests never download anything: they use the tiny model shipped in the package
or models built in-process from a config."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
import torch

# A test never needs what a run writes to survive a power cut, only the run being killed at any
# moment (the kernel keeps what was written): fsync off (lowmem_ft/files.py) here and in every process
# the tests start. Checkpoint-heavy tests spent a fifth of their time waiting for it.
os.environ.setdefault("LOWMEM_FT_FSYNC", "0")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `-n 2` (README): two workers on two cores, one thread each, and so the processes they start.
    # torch's OpenMP threads wait for work spinning: with more of them than cores, in-process runs
    # took 2-7 times as long and the suite gained nothing from its second worker. (One thread
    # changes no result: the ranks of test_distributed.py, one thread each, equal one process.)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

from lowmem_ft.pictures import LossPicture

TINY_DIR = Path(__file__).resolve().parents[1] / "lowmem_ft" / "models" / "tiny"
DRAW = LossPicture.draw


@pytest.fixture(autouse=True, scope="session")
def _library_reports_on_stdout():
    """The library reports through logging; the CLI shows it on stdout, and so do tests that call
    the library directly (several check what a run says)."""
    from lowmem_ft.cli import report_to_console

    report_to_console()


@pytest.fixture(autouse=True, scope="session")
def _loss_pictures_only_where_looked_at():
    """A run draws JOB/loss.png at its first checkpoint and at its end: about 0.4 s of CPU each,
    and the suite runs most of its jobs in its own process. Only test_pictures.py, which looks at the
    pictures, draws them (``loss_pictures_drawn``); the runs started as processes of their own (the
    README's quick start among them) draw them as a user's run does."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LossPicture, "draw", _not_drawn)
        yield


def _not_drawn(picture) -> None:
    picture._drawn_at, picture._behind = picture.clock(), False


@contextlib.contextmanager
def loss_pictures_drawn():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LossPicture, "draw", DRAW)
        yield


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    return TINY_DIR


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_DIR)


@pytest.fixture()
def small_model():
    """A 2-layer Llama with random weights, small enough for numeric tests to run in milliseconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


# The modules that take longest (about 7, 5 and 4 minutes, measured on a 2-core machine like CI's), first:
# with `-n 2` (README), pytest-xdist hands each worker one module at a time in this order, and a
# long module handed out last would leave one worker on it alone while the other is idle.
LONGEST_FIRST = ("test_distributed.py", "test_looptrace.py", "test_resume.py")


def pytest_collection_modifyitems(config, items):
    """The longest modules first (above); tests marked `gpu` need CUDA: skipped, with the reason
    shown, where there is none."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # (stable: the rest keep their order)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture()
def data(tmp_path) -> Path:
    """48 prompt-completion records (test_resume.py, test_large_data.py)."""
    return _write_sums(tmp_path / "data.jsonl")


@pytest.fixture(scope="module")
def data_module(tmp_path_factory) -> Path:
    """``data``, once for a module (its jobs made once, in module fixtures)."""
    return _write_sums(tmp_path_factory.mktemp("data") / "data.jsonl")


def _write_sums(path: Path) -> Path:
    rows = [{"prompt": f"What is {i} plus {i}?", "completion": f" It is {2 * i}."} for i in range(48)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
