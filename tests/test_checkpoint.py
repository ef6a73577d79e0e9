"""The checkpoint format: nested state ↔ directory, atomic, verified, without pickle."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lowmem_ft import checkpoint as ckpt


def nested_state() -> dict:
    shared = torch.arange(12, dtype=torch.float32)
    return {
        "weights": {"embed.weight": shared, "lm_head.weight": shared},  # tied: one storage, two names
        "view": shared[3:7],  # a view into a larger storage
        "optimizer": {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 5, dtype=torch.bfloat16)}},
            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0], "fused": None}],
        },
        "codes": torch.randint(0, 255, (300,), dtype=torch.uint8),
        "indices": torch.tensor([1, 5, 9], dtype=torch.int32),
        "dtype": torch.bfloat16,
        "python_rng": (3, tuple(range(5)), None),
        "loss": float("nan"),
        "__odd_key__": "strings starting with __ survive",
        "group_states": {2: [], 0: [{"exp_avg": torch.zeros(2)}]},
    }


def assert_equal(a, b) -> None:
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_equal(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_equal(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


@pytest.mark.parametrize("setting", [None, "1", "0"])
def test_a_checkpoint_is_fsynced_file_by_file_unless_lowmem_ft_fsync_is_0(setting, tmp_path, monkeypatch):
    """By default every file of a checkpoint, its directory and the directory it is renamed into
    are fsynced before the checkpoint counts; LOWMEM_FT_FSYNC=0 (what the tests run with, see
    conftest.py) skips them all, and the checkpoint reads back the same."""
    import os

    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")))
    if setting is None:
        monkeypatch.delenv("LOWMEM_FT_FSYNC", raising=False)
    else:
        monkeypatch.setenv("LOWMEM_FT_FSYNC", setting)
    state = nested_state()
    path = ckpt.save_checkpoint(tmp_path, 7, state, keep=2)
    if setting == "0":
        assert synced == []
    else:
        # (named as they were when synced: in the partial directory, before its rename)
        partial = path.parent / f".partial-{path.name}"
        expected = {str(partial / p.name) for p in path.iterdir()} | {str(partial), str(path.parent)}
        assert expected <= set(synced), synced
    assert ckpt.verify_checkpoint(path) is None
    assert_equal(ckpt.load_checkpoint(path), state)


def test_state_round_trips_exactly_through_json_and_safetensors(tmp_path):
    state = nested_state()
    path = ckpt.save_checkpoint(tmp_path, 7, state, keep=2)
    assert path == tmp_path / "checkpoints" / "step-000007"
    assert sorted(p.name for p in path.iterdir()) == [
        "manifest.json",
        "state.json",
        "tensors-00000.safetensors",
    ]
    json.loads((path / "state.json").read_text())  # plain JSON: no pickle anywhere
    assert ckpt.verify_checkpoint(path) is None
    assert_equal(ckpt.load_checkpoint(path), state)


def test_objects_that_json_cannot_hold_are_refused(tmp_path):
    with pytest.raises(TypeError, match="cannot put a set"):
        ckpt.save_checkpoint(tmp_path, 1, {"x": {1, 2}}, keep=1)


def test_tensors_are_written_in_bounded_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "SHARD_BYTES", 1000)
    state = {f"t{i}": torch.full((100,), float(i)) for i in range(5)}  # 400 bytes each
    state["big"] = torch.zeros(1000)  # larger than a shard: a shard of its own
    path = ckpt.save_checkpoint(tmp_path, 1, state, keep=1)
    shards = sorted(path.glob("tensors-*.safetensors"))
    assert len(shards) == 4  # [t0 t1] [t2 t3] [t4] [big]
    assert_equal(ckpt.load_checkpoint(path), state)


def test_retention_keeps_the_newest_and_a_rewrite_of_the_same_step_is_skipped(tmp_path):
    for step in (2, 4, 6, 8):
        ckpt.save_checkpoint(tmp_path, step, {"step": step}, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000008", "step-000006"]
    manifest = (tmp_path / "checkpoints" / "step-000008" / "manifest.json").read_text()
    ckpt.save_checkpoint(tmp_path, 8, {"step": 8}, keep=2)
    assert (tmp_path / "checkpoints" / "step-000008" / "manifest.json").read_text() == manifest


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate", "has 7 bytes, the manifest says"),
        ("flip", "does not match its checksum"),
        ("delete", "is missing"),
        ("manifest", "no manifest"),
        ("garbage", "unreadable manifest"),
    ],
)
def test_damage_is_detected_and_the_previous_checkpoint_is_used(tmp_path, damage, message):
    ckpt.save_checkpoint(tmp_path, 1, {"w": torch.ones(10)}, keep=3)
    newest = ckpt.save_checkpoint(tmp_path, 2, {"w": torch.full((10,), 2.0)}, keep=3)
    tensors = newest / "tensors-00000.safetensors"
    if damage == "truncate":
        tensors.write_bytes(tensors.read_bytes()[:7])
    elif damage == "flip":
        raw = bytearray(tensors.read_bytes())
        raw[-1] ^= 1
        tensors.write_bytes(bytes(raw))
    elif damage == "delete":
        tensors.unlink()
    elif damage == "manifest":
        (newest / "manifest.json").unlink()
    else:
        (newest / "manifest.json").write_text("{not json")
    assert message in ckpt.verify_checkpoint(newest)
    restored, skipped = ckpt.latest_checkpoint(tmp_path)
    assert restored.step == 1 and torch.equal(restored.state["w"], torch.ones(10))
    assert [name for name, _ in skipped] == ["step-000002"]


def test_no_valid_checkpoint_and_leftovers_of_a_killed_write(tmp_path):
    assert ckpt.latest_checkpoint(tmp_path) == (None, [])
    partial = tmp_path / "checkpoints" / ".partial-step-000004"
    partial.mkdir(parents=True)
    (partial / "tensors-00000.safetensors").write_bytes(b"half")
    assert ckpt.list_checkpoints(tmp_path) == []  # never mistaken for a checkpoint
    ckpt.remove_partial(tmp_path)
    assert not partial.exists()


def test_a_failed_write_leaves_no_partial_directory_and_names_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    ckpt.save_checkpoint(tmp_path, 1, {"w": torch.ones(3)}, keep=2)

    def full_disk(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "_write_file", full_disk)
    with pytest.raises(
        ckpt.CheckpointWriteError, match=r"the disk is full \(.*\); the previous checkpoint step-000001"
    ):
        ckpt.save_checkpoint(tmp_path, 2, {"w": torch.ones(3)}, keep=2)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000001"]


def test_a_full_disk_reported_by_safetensors_is_the_same_clean_failure(tmp_path, monkeypatch):
    """safetensors raises its own SafetensorError (not OSError) when the disk fills up."""
    from safetensors import SafetensorError

    ckpt.save_checkpoint(tmp_path, 1, {"w": torch.ones(3)}, keep=2)

    def full_disk(path, tensors):
        (path.parent / "half-written").write_bytes(b"x")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(ckpt, "_write_tensors", full_disk)
    with pytest.raises(ckpt.CheckpointWriteError, match="the disk is full") as caught:
        ckpt.save_checkpoint(tmp_path, 2, {"w": torch.ones(3)}, keep=2)
    assert caught.value.exit_code == 4
    assert "the previous checkpoint step-000001 is intact" in str(caught.value)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000001"]


def test_a_checkpoint_the_disk_clearly_cannot_hold_is_refused_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "free_bytes", lambda path: 1000)
    with pytest.raises(ckpt.CheckpointWriteError, match=r"needs 3\.9 KiB and 1000 B is free"):
        ckpt.save_checkpoint(tmp_path, 1, {"w": torch.ones(1000)}, keep=2)
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_what_a_rank_raised_in_a_sharded_checkpoint_is_raised_as_itself():
    """torch.distributed.checkpoint wraps a rank's KeyboardInterrupt (a second Ctrl-C while the
    shards are written) or OSError (a full disk) in a CheckpointException, which no handler of the
    recipe knew: the ranks ended in tracebacks and the job stayed "running". Unwrapped, a second
    Ctrl-C is one (before any other rank's error), and a full disk is the OSError it was."""
    import errno

    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    from lowmem_ft.train_state import what_dcp_caught

    def failing(*raised):
        with what_dcp_caught():
            raise CheckpointException(
                "save failed", {rank: _wrap_exception(e) for rank, e in enumerate(raised)}
            )

    full = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(KeyboardInterrupt):
        failing(full, KeyboardInterrupt())
    with pytest.raises(OSError) as caught:
        failing(full)
    assert caught.value is full
    with pytest.raises(CheckpointException):  # nothing to unwrap: as it was
        failing()
