"""Machine detection: size parsing, NVML (through a fake pynvml; there is no GPU in CI) and budgets."""

from __future__ import annotations

import ctypes
import sys
import types
from pathlib import Path

import psutil
import pytest
import torch

from lowmem_ft import hardware
from lowmem_ft.errors import UserError
from lowmem_ft.hardware import (
    Budget,
    GPUInfo,
    PeakMemory,
    detect_budget,
    detect_gpu,
    format_bytes,
    parse_size,
)

GiB = 1024**3
H100 = "NVIDIA H100 80GB HBM3"

# ----------------------------------------------------------------------------------------------
# parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24GiB", 24 * GiB),
        ("24 GiB", 24 * GiB),
        (" 24gib ", 24 * GiB),
        ("24GB", 24 * 10**9),
        ("24gb", 24 * 10**9),
        ("8G", 8 * GiB),  # bare letter is binary
        ("8g", 8 * GiB),
        ("1.5TiB", 3 * 1024**4 // 2),
        ("2TB", 2 * 10**12),
        ("3T", 3 * 1024**4),
        ("512MiB", 512 * 1024**2),
        ("512MB", 512 * 10**6),
        ("16M", 16 * 1024**2),
        ("100KB", 100_000),
        ("4K", 4096),
        ("2KiB", 2048),
        (".5GiB", GiB // 2),
        ("7B", 7),
        ("24e9", 24 * 10**9),
        ("2.4E10", 24 * 10**9),
        ("24000000000", 24 * 10**9),
        ("9007199254740993", 2**53 + 1),  # above float precision: stays exact
    ],
)
def test_parse_size_accepts(text, expected):
    assert parse_size(text, "--gpu-mem") == expected


NOT_SIZES = ["", "   ", "0", "0GiB", "-1GiB", "-24", "abc", "GiB", "24XB", "24GiBs", "1.2.3G"]
NOT_SIZES += ["inf", "nan", "1e999", "0.1B"]  # 0.1 B rounds to zero bytes


@pytest.mark.parametrize("text", NOT_SIZES)
def test_parse_size_rejects(text):
    with pytest.raises(UserError) as info:
        parse_size(text, "--cpu-mem")
    message = str(info.value)
    assert message.startswith(f"--cpu-mem {text!r} is not a memory size")
    assert "24GiB" in message


# ----------------------------------------------------------------------------------------------
# A fake pynvml


class FakeNVMLError(Exception):
    pass


def fake_pynvml(
    *,
    count: int = 1,
    name: str | bytes = H100,
    total: int = 80 * GiB,
    free: int = 79 * GiB,
    curr_gen: int = 1,
    max_gen: int = 5,
    gpu_max_gen: int | None = 5,
    curr_width: int = 16,
    max_width: int = 16,
    missing: tuple[str, ...] = (),
    failing: tuple[str, ...] = (),
    init_error: Exception | None = None,
) -> types.SimpleNamespace:
    """A pynvml with one device. ``missing`` functions are absent; ``failing`` ones raise NVMLError.

    ``calls`` records the order of init/shutdown so tests can check the cleanup; ``handles`` the
    indices asked for.
    """
    calls: list[str] = []
    handles: list[int] = []

    def init():
        calls.append("init")
        if init_error is not None:
            raise init_error

    def handle_by_index(i):
        handles.append(i)
        return f"handle{i}"

    functions = {
        "nvmlInit": init,
        "nvmlShutdown": lambda: calls.append("shutdown"),
        "nvmlDeviceGetCount": lambda: count,
        "nvmlDeviceGetHandleByIndex": handle_by_index,
        "nvmlDeviceGetName": lambda h: name,
        "nvmlDeviceGetMemoryInfo": lambda h: types.SimpleNamespace(total=total, free=free, used=total - free),
        "nvmlDeviceGetCurrPcieLinkGeneration": lambda h: curr_gen,
        "nvmlDeviceGetMaxPcieLinkGeneration": lambda h: max_gen,
        "nvmlDeviceGetCurrPcieLinkWidth": lambda h: curr_width,
        "nvmlDeviceGetMaxPcieLinkWidth": lambda h: max_width,
    }
    if gpu_max_gen is not None:
        functions["nvmlDeviceGetGpuMaxPcieLinkGeneration"] = lambda h: gpu_max_gen
    for fn in failing:

        def fail(*args, _fn=fn):
            raise FakeNVMLError(f"{_fn}: Not Supported")

        functions[fn] = fail
    for fn in missing:
        functions.pop(fn, None)
    return types.SimpleNamespace(NVMLError=FakeNVMLError, calls=calls, handles=handles, **functions)


@pytest.fixture()
def use_nvml(monkeypatch):
    """Install a fake pynvml built with the given options; returns it."""

    def install(**kwargs) -> types.SimpleNamespace:
        fake = fake_pynvml(**kwargs)
        monkeypatch.setitem(sys.modules, "pynvml", fake)
        return fake

    return install


# ----------------------------------------------------------------------------------------------
# detect_gpu


@pytest.mark.parametrize("name", [H100, H100.encode()])
def test_detect_gpu_reads_name_and_memory(use_nvml, name):
    fake = use_nvml(name=name, total=80 * GiB, free=70 * GiB)
    info = detect_gpu()
    assert info == GPUInfo(
        index=0, name=H100, total_bytes=80 * GiB, free_bytes=70 * GiB, pcie_gen=5, pcie_width=16
    )
    assert fake.calls == ["init", "shutdown"]


@pytest.mark.parametrize(("gen", "expected"), [(4, 31.5e9), (5, 63e9)])
def test_link_bandwidth_x16(use_nvml, gen, expected):
    use_nvml(max_gen=gen, gpu_max_gen=gen)
    info = detect_gpu()
    assert info.pcie_gen == gen
    assert info.link_bytes_per_s == pytest.approx(expected, rel=0.01)


def test_idle_link_reports_max_generation_not_current(use_nvml):
    # An idle card trains down to Gen1; under load it runs at Gen5.
    use_nvml(curr_gen=1, max_gen=5, curr_width=8, max_width=16)
    info = detect_gpu()
    assert (info.pcie_gen, info.pcie_width) == (5, 16)


def test_link_generation_is_limited_by_the_card(use_nvml):
    # A Gen4 card: the system max may say 5, the card's own max says 4.
    use_nvml(max_gen=5, gpu_max_gen=4)
    assert detect_gpu().pcie_gen == 4


def test_link_generation_without_gpu_max_function(use_nvml):
    use_nvml(max_gen=4, gpu_max_gen=None)
    assert detect_gpu().pcie_gen == 4


@pytest.mark.parametrize("how", ["missing", "failing"])
def test_link_falls_back_to_current_when_max_is_unavailable(use_nvml, how):
    max_calls = (
        "nvmlDeviceGetMaxPcieLinkGeneration",
        "nvmlDeviceGetGpuMaxPcieLinkGeneration",
        "nvmlDeviceGetMaxPcieLinkWidth",
    )
    use_nvml(curr_gen=3, curr_width=8, **{how: max_calls})
    info = detect_gpu()
    assert (info.pcie_gen, info.pcie_width) == (3, 8)


@pytest.mark.parametrize("how", ["missing", "failing"])
def test_missing_pcie_functions_leave_link_unknown(use_nvml, how):
    pcie = tuple(name for name in vars(fake_pynvml()) if "Pcie" in name)
    assert len(pcie) == 5  # the test covers every link call
    fake = use_nvml(**{how: pcie})
    info = detect_gpu()
    assert info.name == H100
    assert info.total_bytes == 80 * GiB
    assert (info.pcie_gen, info.pcie_width) == (None, None)
    assert info.link_bytes_per_s is None
    assert fake.calls == ["init", "shutdown"]


@pytest.mark.parametrize(
    ("gen", "width"),
    [(None, 16), (4, None), (4, 0), (7, 16)],  # Gen7 is not in the table: unknown, not a guess
)
def test_link_bytes_per_s_unknown(gen, width):
    info = GPUInfo(index=0, name="x", total_bytes=1, free_bytes=1, pcie_gen=gen, pcie_width=width)
    assert info.link_bytes_per_s is None


@pytest.mark.parametrize("error", [FakeNVMLError("Driver Not Loaded"), OSError("libnvidia-ml.so.1")])
def test_detect_gpu_init_failure_returns_none_without_shutdown(use_nvml, error):
    fake = use_nvml(init_error=error)
    assert detect_gpu() is None
    assert fake.calls == ["init"]  # shutting down an uninitialised NVML is itself an error


@pytest.mark.parametrize(("count", "index"), [(0, 0), (1, 1), (2, -1)])
def test_detect_gpu_no_device_at_index(use_nvml, count, index):
    fake = use_nvml(count=count)
    assert detect_gpu(index) is None
    assert fake.handles == []  # checked before asking NVML for a handle
    assert fake.calls == ["init", "shutdown"]


def test_detect_gpu_second_device(use_nvml):
    fake = use_nvml(count=2)
    assert detect_gpu(1).index == 1
    assert fake.handles == [1]


def test_detect_gpu_failure_after_init_still_shuts_down(use_nvml):
    fake = use_nvml(failing=("nvmlDeviceGetMemoryInfo",))
    assert detect_gpu() is None
    assert fake.calls == ["init", "shutdown"]


def test_detect_gpu_without_pynvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    assert detect_gpu() is None


def _nvml_library_loads() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


def test_real_detect_gpu_without_driver_returns_none():
    if _nvml_library_loads():
        pytest.skip("an NVIDIA driver is installed; this checks the machine without one")
    assert detect_gpu() is None


# ----------------------------------------------------------------------------------------------
# detect_budget


@pytest.fixture()
def host_memory(monkeypatch):
    """psutil reports 100 GiB total, 60 GiB available."""
    memory = types.SimpleNamespace(total=100 * GiB, available=60 * GiB)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory)


def test_budget_uses_free_gpu_memory_and_psutil(use_nvml, host_memory, tmp_path):
    use_nvml(total=80 * GiB, free=70 * GiB, max_gen=5)
    budget = detect_budget(disk_path=tmp_path)
    assert budget.gpu.name == H100
    assert budget.gpu_bytes == 70 * GiB
    assert budget.link_bytes_per_s == pytest.approx(63e9, rel=0.01)
    assert (budget.host_bytes, budget.host_total_bytes) == (60 * GiB, 100 * GiB)
    assert budget.sources["host"] == "psutil"
    assert "NVML" in budget.sources["gpu"]
    text = budget.describe()
    assert f"GPU {H100}: 70.0 GiB usable (NVML free memory of 80.0 GiB total)" in text
    assert "PCIe Gen5 x16 ≈ 63.0 GB/s" in text
    assert "host 60.0 GiB available of 100.0 GiB (psutil)" in text


def test_budget_gpu_none_ignores_a_present_gpu(use_nvml, host_memory, tmp_path):
    fake = use_nvml()
    budget = detect_budget(gpu="none", disk_path=tmp_path)
    assert budget.gpu is None
    assert budget.gpu_bytes == 0
    assert budget.link_bytes_per_s is None
    assert fake.calls == []  # NVML is not even asked
    assert budget.describe().startswith("no GPU: --gpu none;")


@pytest.mark.parametrize("value", ["cuda", "0", "", "no"])
def test_budget_rejects_other_gpu_values(value):
    with pytest.raises(UserError, match="--gpu accepts only 'none'"):
        detect_budget(gpu=value)


def test_budget_gpu_none_with_gpu_mem_is_an_error():
    with pytest.raises(UserError, match="contradict"):
        detect_budget(gpu="none", gpu_mem="24GiB")


def test_budget_gpu_mem_without_gpu_describes_a_card(use_nvml, host_memory, tmp_path):
    use_nvml(init_error=FakeNVMLError("Driver Not Loaded"))
    budget = detect_budget(gpu_mem="24GiB", disk_path=tmp_path)
    assert budget.gpu == GPUInfo(
        index=0,
        name="(described by --gpu-mem)",
        total_bytes=24 * GiB,
        free_bytes=24 * GiB,
        pcie_gen=None,
        pcie_width=None,
    )
    assert budget.gpu_bytes == 24 * GiB
    assert budget.link_bytes_per_s is None
    assert budget.sources["gpu"].startswith("--gpu-mem")
    assert "24.0 GiB usable (--gpu-mem; no GPU detected)" in budget.describe()
    assert "PCIe link unknown" in budget.describe()


def test_budget_gpu_mem_with_gpu_keeps_name_and_link(use_nvml, host_memory, tmp_path):
    use_nvml(total=80 * GiB, free=70 * GiB, max_gen=4, gpu_max_gen=4)
    budget = detect_budget(gpu_mem="24GiB", disk_path=tmp_path)
    assert budget.gpu.name == H100
    assert budget.gpu_bytes == 24 * GiB  # the described size, not the free memory
    assert budget.link_bytes_per_s == pytest.approx(31.5e9, rel=0.01)
    # Both numbers are on record: what was asked for and what NVML saw.
    assert budget.sources["gpu"] == "--gpu-mem; NVML reports 70.0 GiB free of 80.0 GiB"


def test_budget_without_gpu_says_how_to_plan_for_one(use_nvml, host_memory, tmp_path):
    use_nvml(count=0)
    budget = detect_budget(disk_path=tmp_path)
    assert budget.gpu is None
    assert budget.gpu_bytes == 0
    assert "pass --gpu-mem" in budget.sources["gpu"]
    assert "pass --gpu-mem" in budget.describe()


def test_budget_cpu_mem_overrides_psutil(use_nvml, monkeypatch, tmp_path):
    use_nvml(count=0)

    def no_psutil():
        raise AssertionError("psutil must not be asked when --cpu-mem is given")

    monkeypatch.setattr(psutil, "virtual_memory", no_psutil)
    budget = detect_budget(cpu_mem="64GB", disk_path=tmp_path)
    assert (budget.host_bytes, budget.host_total_bytes) == (64 * 10**9, 64 * 10**9)
    assert budget.sources["host"] == "--cpu-mem"
    assert f"host {format_bytes(64 * 10**9)} (--cpu-mem)" in budget.describe()


def test_budget_bad_sizes_name_their_flag(use_nvml):
    use_nvml()
    with pytest.raises(UserError, match="^--gpu-mem 'lots'"):
        detect_budget(gpu_mem="lots")
    with pytest.raises(UserError, match="^--cpu-mem '-4G'"):
        detect_budget(cpu_mem="-4G")


def test_budget_disk_uses_nearest_existing_parent(use_nvml, host_memory, monkeypatch, tmp_path):
    use_nvml(count=0)
    seen = []

    def usage(path):
        seen.append(Path(path))
        return types.SimpleNamespace(total=10 * GiB, used=3 * GiB, free=7 * GiB)

    monkeypatch.setattr(hardware.shutil, "disk_usage", usage)
    budget = detect_budget(disk_path=tmp_path / "runs" / "job1")
    assert seen == [tmp_path]
    assert budget.disk_free_bytes == 7 * GiB
    assert f"disk 7.0 GiB free ({tmp_path})" in budget.describe()


def test_budget_disk_error_is_unknown(use_nvml, host_memory, monkeypatch, tmp_path):
    use_nvml(count=0)

    def usage(path):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(hardware.shutil, "disk_usage", usage)
    budget = detect_budget(disk_path=tmp_path)
    assert budget.disk_free_bytes is None
    assert "disk free space unknown" in budget.describe()


def test_budget_real_disk(use_nvml, host_memory, tmp_path):
    use_nvml(count=0)
    assert detect_budget(disk_path=tmp_path).disk_free_bytes > 0


def test_describe_names_every_source():
    budget = Budget(
        gpu=GPUInfo(index=0, name="G", total_bytes=GiB, free_bytes=GiB, pcie_gen=3, pcie_width=8),
        gpu_bytes=GiB,
        host_bytes=2 * GiB,
        host_total_bytes=2 * GiB,
        disk_free_bytes=3 * GiB,
        link_bytes_per_s=7.88e9,
        sources={"gpu": "SRC-GPU", "host": "SRC-HOST", "disk": "SRC-DISK", "link": "SRC-LINK"},
    )
    text = budget.describe()
    for source in budget.sources.values():
        assert source in text
    assert "\n" not in text


# ----------------------------------------------------------------------------------------------
# The pre-existing helpers still work


def test_format_bytes_unchanged():
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(24 * GiB) == "24.0 GiB"
    assert format_bytes(3 * 1024**5) == "3072.0 TiB"


def test_peak_memory_cpu_grows_with_rss():
    peak = PeakMemory(torch.device("cpu"))
    first = peak.sample()
    assert first > 0
    assert peak.sample() >= first


@pytest.mark.parametrize(("value", "index"), [(None, 0), ("2", 2), ("3,1", 3), ("GPU-5e1b", 0), ("", 0)])
def test_nvml_index_follows_cuda_visible_devices(value, index, monkeypatch):
    from lowmem_ft.hardware import visible_gpu_index

    if value is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    assert visible_gpu_index() == index
