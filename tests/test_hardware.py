"""Machine detection: size parsing, NVML (through a fake pynvml; there is no GPU in CI) and budgets."""

from __future__ import annotations

import ctypes
import os
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import torch

from lowmem_ft import cli, hardware
from lowmem_ft.config import RunConfig
from lowmem_ft.errors import UserError
from lowmem_ft.gpus import GPUInfo, detect_cuda_gpu, detect_gpu
from lowmem_ft.hardware import Budget, PeakMemory, configure_cuda_allocator, detect_budget
from lowmem_ft.planner import build_plan
from lowmem_ft.sizes import format_bytes, parse_size

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
        ("100000KB", 10**8),
        ("4096K", 4 * 1024**2),
        ("2048KiB", 2 * 1024**2),
        (".5GiB", GiB // 2),
        ("7000000B", 7 * 10**6),
        ("24e9", 24 * 10**9),
        ("2.4E10", 24 * 10**9),
        ("24000000000", 24 * 10**9),
        ("9007199254740993", 2**53 + 1),  # above float precision: stays exact
    ],
)
def test_parse_size_accepts(text, expected):
    assert parse_size(text, "--gpu-mem") == expected


NOT_SIZES = ["", "   ", "abc", "GiB", "24XB", "24GiBs", "1.2.3G", "--1GiB", "inf", "nan", "1e999", "2EiB"]
# what is wrong with a size that is written as one
WRONG_SIZES = {
    "0": "is less than a byte", "0GiB": "is less than a byte", "0.1B": "is less than a byte",  # (rounds to 0)
    "-1GiB": "is negative", "-24": "is negative",
    "1e30": "is over 1 EiB, more than a machine holds",  # accepted, printed as "...TiB" before
    "99999999999999999999GiB": "is over 1 EiB, more than a machine holds", "-0.1B": "is negative",
    # a budget under a MiB, with a unit (a G left out: "24B" for a 24 GB card) means nothing either
    "24B": "is 24 bytes, less than a MiB", "24KB": "is 24,000 bytes, less than a MiB",
}  # fmt: skip


@pytest.mark.parametrize("text", [*NOT_SIZES, *WRONG_SIZES])
def test_parse_size_rejects(text):
    with pytest.raises(UserError) as info:
        parse_size(text, "--cpu-mem")
    message = str(info.value)
    said = WRONG_SIZES.get(text, "is not a memory size")
    assert message.startswith(f"--cpu-mem {text!r} ") and said in message and "24GiB" in message
    assert parse_size("1048576TiB", "--cpu-mem") == 1 << 60  # the most there is


# ----------------------------------------------------------------------------------------------
# A fake pynvml


class FakeNVMLError(Exception):
    pass


@dataclass
class FakeMIG:
    """A MIG slice: NVML reports its own memory only on its own handle."""

    uuid: str
    total: int
    free: int
    gpu_instance: int = 1
    compute_instance: int = 0
    name: str = "NVIDIA A100-SXM4-80GB MIG 1g.10gb"


@dataclass
class FakeGPU:
    name: str | bytes = H100
    uuid: str = "GPU-00000000-1111-2222-3333-444444444444"
    total: int = 80 * GiB
    free: int = 79 * GiB
    migs: dict[int, FakeMIG] = field(default_factory=dict)  # MIG slot -> slice


def fake_pynvml(
    *,
    count: int = 1,
    name: str | bytes = H100,
    total: int = 80 * GiB,
    free: int = 79 * GiB,
    gpus: list[FakeGPU] | None = None,
    curr_gen: int = 1,
    max_gen: int = 5,
    gpu_max_gen: int | None = 5,
    curr_width: int = 16,
    max_width: int = 16,
    missing: tuple[str, ...] = (),
    failing: tuple[str, ...] = (),
    init_error: Exception | None = None,
) -> types.SimpleNamespace:
    """A pynvml with ``count`` identical devices, or the ``gpus`` given, in NVML's (PCI) order.

    ``missing`` functions are absent; ``failing`` ones raise NVMLError. ``calls`` records the order
    of init/shutdown so tests can check the cleanup; ``handles`` the indices asked for.
    """
    if gpus is None:
        gpus = [
            FakeGPU(name=name, uuid=f"GPU-{i:08x}-1111-2222-3333-444444444444", total=total, free=free)
            for i in range(count)
        ]
    calls: list[str] = []
    handles: list[int] = []

    def init():
        calls.append("init")
        if init_error is not None:
            raise init_error

    def handle_by_index(i):
        handles.append(i)
        return gpus[i]

    def link(value):
        def query(handle):
            if isinstance(handle, FakeMIG):
                raise FakeNVMLError("Not Supported")  # a slice has no PCIe link of its own
            return value

        return query

    def max_mig_count(handle):
        if not handle.migs:
            raise FakeNVMLError("Not Supported")
        return 7

    def mig_handle(handle, slot):
        if slot not in handle.migs:
            raise FakeNVMLError("Not Found")
        return handle.migs[slot]

    functions = {
        "nvmlInit": init,
        "nvmlShutdown": lambda: calls.append("shutdown"),
        "nvmlDeviceGetCount": lambda: len(gpus),
        "nvmlDeviceGetHandleByIndex": handle_by_index,
        "nvmlDeviceGetName": lambda h: h.name,
        "nvmlDeviceGetUUID": lambda h: h.uuid,
        "nvmlDeviceGetMemoryInfo": lambda h: types.SimpleNamespace(
            total=h.total, free=h.free, used=h.total - h.free
        ),
        "nvmlDeviceGetMaxMigDeviceCount": max_mig_count,
        "nvmlDeviceGetMigDeviceHandleByIndex": mig_handle,
        "nvmlDeviceGetGpuInstanceId": lambda h: h.gpu_instance,
        "nvmlDeviceGetComputeInstanceId": lambda h: h.compute_instance,
        "nvmlDeviceGetCurrPcieLinkGeneration": link(curr_gen),
        "nvmlDeviceGetMaxPcieLinkGeneration": link(max_gen),
        "nvmlDeviceGetCurrPcieLinkWidth": link(curr_width),
        "nvmlDeviceGetMaxPcieLinkWidth": link(max_width),
    }
    if gpu_max_gen is not None:
        functions["nvmlDeviceGetGpuMaxPcieLinkGeneration"] = link(gpu_max_gen)
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


# ----------------------------------------------------------------------------------------------
# The GPU the user means: torch's cuda:N, found in NVML


@pytest.fixture(autouse=True)
def cuda_env(monkeypatch):
    """Every test starts from no CUDA_VISIBLE_DEVICES and CUDA's default device order."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)


def uuid_of(n: int) -> str:
    return f"{n:x}" * 8 + "-aaaa-bbbb-cccc-dddddddddddd"  # the form torch's str(props.uuid) has


A100 = "NVIDIA A100-SXM4-80GB"
L4 = "NVIDIA L4"


def two_cards() -> list[FakeGPU]:
    """An H100 and an A100 with different free memory, in NVML's order."""
    return [
        FakeGPU(name=H100, uuid="GPU-" + uuid_of(1), total=80 * GiB, free=70 * GiB),
        FakeGPU(name=A100, uuid="GPU-" + uuid_of(2), total=80 * GiB, free=20 * GiB),
    ]


def partitioned_a100() -> FakeGPU:
    """An A100 split into a 1g.10gb and a 3g.40gb slice."""
    migs = {
        0: FakeMIG(uuid="MIG-" + uuid_of(7), total=10 * GiB, free=9 * GiB, gpu_instance=9),
        3: FakeMIG(
            uuid="MIG-" + uuid_of(8),
            total=40 * GiB,
            free=39 * GiB,
            gpu_instance=2,
            name="NVIDIA A100-SXM4-80GB MIG 3g.40gb",
        ),
    }
    return FakeGPU(name=A100, uuid="GPU-" + uuid_of(3), total=80 * GiB, free=80 * GiB, migs=migs)


@pytest.mark.parametrize(
    ("visible", "cuda_index", "nvml_index"),
    [(None, 0, 0), (None, 3, 3), ("2", 0, 2), ("3,1", 0, 3), ("3,1", 1, 1), (" 2 , 0", 1, 0)],
)
def test_integer_entries_map_to_nvml_on_same_cards(use_nvml, monkeypatch, visible, cuda_index, nvml_index):
    use_nvml(count=4)  # four identical cards: CUDA's order is PCI order, whatever CUDA_DEVICE_ORDER says
    if visible is not None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    info, note = detect_cuda_gpu(cuda_index)
    assert info.index == nvml_index
    assert note is None


@pytest.mark.parametrize(
    ("visible", "nvml_index"),
    [("GPU-" + uuid_of(2), 1), ("GPU-22222222", 1), ("GPU-2", 1), ("GPU-1", 0)],  # full UUID and prefixes
)
def test_uuid_entry_picks_that_card(use_nvml, monkeypatch, host_memory, tmp_path, visible, nvml_index):
    use_nvml(gpus=two_cards())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    budget = detect_budget(disk_path=tmp_path)
    assert budget.gpu.index == nvml_index
    assert budget.gpu_bytes == two_cards()[nvml_index].free
    assert budget.sources["gpu"] == "NVML free memory of 80.0 GiB total"  # certain: no note


def test_uuid_list_in_its_own_order(use_nvml, monkeypatch):
    use_nvml(gpus=two_cards())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"GPU-{uuid_of(2)[:8]},GPU-{uuid_of(1)[:8]}")
    assert detect_cuda_gpu(0)[0].name == A100
    assert detect_cuda_gpu(1)[0].name == H100


@pytest.mark.parametrize("visible", ["GPU-", "GPU-3", "gpu-" + uuid_of(1), uuid_of(1)])
def test_ambiguous_or_unknown_uuid_shows_no_card(use_nvml, monkeypatch, visible):
    use_nvml(gpus=two_cards())  # "GPU-" fits both cards; no card starts with GPU-3; case and prefix count
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    info, note = detect_cuda_gpu(0)
    assert info is None
    assert note == f"no cuda:0: CUDA_VISIBLE_DEVICES={visible!r} shows 0 device(s)"


@pytest.mark.parametrize("visible", ["MIG-" + uuid_of(8), "MIG-88888888", f"MIG-GPU-{uuid_of(3)}/2/0"])
def test_mig_slice_plans_for_the_slice_not_the_card(use_nvml, monkeypatch, host_memory, tmp_path, visible):
    use_nvml(gpus=[FakeGPU(uuid="GPU-" + uuid_of(1)), partitioned_a100()], max_gen=4, gpu_max_gen=4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    budget = detect_budget(disk_path=tmp_path)
    assert budget.gpu.name == "NVIDIA A100-SXM4-80GB MIG 3g.40gb"
    assert (budget.gpu.total_bytes, budget.gpu_bytes) == (40 * GiB, 39 * GiB)  # not the card's 80 GiB
    assert budget.gpu.index == 1  # NVML's index of the parent card
    assert (budget.gpu.pcie_gen, budget.gpu.pcie_width) == (4, 16)  # the parent's link
    assert budget.sources["gpu"] == "NVML free memory of 40.0 GiB total"


@pytest.mark.parametrize("visible", ["MIG-9", f"MIG-GPU-{uuid_of(3)}/2/1", f"MIG-GPU-{uuid_of(1)}/2/0"])
def test_unknown_mig_entry_shows_no_card(use_nvml, monkeypatch, visible):
    use_nvml(gpus=[FakeGPU(uuid="GPU-" + uuid_of(1)), partitioned_a100()])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert detect_cuda_gpu(0)[0] is None


def test_partitioned_card_named_by_index_says_to_name_a_slice(use_nvml, monkeypatch):
    use_nvml(gpus=[partitioned_a100()])
    info, note = detect_cuda_gpu(0)
    assert info.total_bytes == 80 * GiB  # all NVML can say for the whole card
    assert "MIG-<uuid>" in note


@pytest.mark.parametrize(
    ("visible", "cuda_index", "nvml_index"),
    [
        ("1,-1,0", 0, 1),
        ("1,-1,0", 1, None),  # the list ends at -1: 0 is not visible
        ("0,4,1", 1, None),  # there is no device 4
        ("GPU-9,0", 0, None),  # no such UUID: nothing after it counts either
        ("1,GPU-9", 0, 1),
        ("", 0, None),  # an empty list hides every GPU
        ("0,1,0", 0, None),  # a device named twice: CUDA shows none
    ],
)
def test_invalid_entry_ends_the_list(use_nvml, monkeypatch, visible, cuda_index, nvml_index):
    use_nvml(count=2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    info, note = detect_cuda_gpu(cuda_index)
    if nvml_index is None:
        assert info is None
        assert visible in note
    else:
        assert info.index == nvml_index


def test_budget_names_why_the_card_is_not_visible(use_nvml, monkeypatch, host_memory, tmp_path):
    use_nvml(count=2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,-1,0")
    budget = detect_budget(disk_path=tmp_path, cuda_index=1)
    assert budget.gpu is None
    assert budget.sources["gpu"] == (
        "none detected (no cuda:1: CUDA_VISIBLE_DEVICES='1,-1,0' shows 1 device(s)); "
        "pass --gpu-mem to plan for a GPU"
    )


def test_budget_gpu_mem_names_why_no_card_was_found(use_nvml, monkeypatch, host_memory, tmp_path):
    use_nvml(count=1)
    budget = detect_budget(gpu_mem="24GiB", disk_path=tmp_path, cuda_index=1)
    assert budget.gpu.name == "(described by --gpu-mem)"
    assert budget.sources["gpu"] == "--gpu-mem; no GPU detected (no cuda:1: NVML shows 1 device(s))"


def fake_torch_cuda(monkeypatch, uuids: list[str] | None):
    """torch sees these devices in CUDA's order (None: torch sees no CUDA); returns the indices asked."""
    asked = []

    def properties(n):
        asked.append(n)
        return types.SimpleNamespace(uuid=uuids[n])  # str() of it is the UUID without "GPU-"

    monkeypatch.setattr(torch.cuda, "is_available", lambda: uuids is not None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    return asked


def test_pci_bus_id_order_maps_integers_directly(use_nvml, monkeypatch, host_memory, tmp_path):
    use_nvml(gpus=two_cards())
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    asked = fake_torch_cuda(monkeypatch, [uuid_of(2), uuid_of(1)])
    budget = detect_budget(disk_path=tmp_path)
    assert budget.gpu.name == A100
    assert budget.sources["gpu"] == "NVML free memory of 80.0 GiB total"
    assert asked == []  # no need to ask torch


@pytest.mark.parametrize("order", [None, "FASTEST_FIRST"])
def test_fastest_first_with_different_cards_asks_torch(use_nvml, monkeypatch, host_memory, tmp_path, order):
    use_nvml(gpus=two_cards())
    if order is not None:
        monkeypatch.setenv("CUDA_DEVICE_ORDER", order)
    # CUDA puts the A100 (NVML's 1) first; NVML's order alone would pick the H100.
    asked = fake_torch_cuda(monkeypatch, [uuid_of(2), uuid_of(1)])
    budget = detect_budget(disk_path=tmp_path)
    assert budget.gpu.name == A100
    assert budget.gpu_bytes == 20 * GiB
    assert budget.sources["gpu"] == "NVML free memory of 80.0 GiB total"
    assert asked == [0]
    assert detect_cuda_gpu(1)[0].name == H100


@pytest.mark.parametrize("torch_state", ["no CUDA", "not imported", "unknown uuid"])
def test_fastest_first_without_torch_assumes_pci_order_and_says_so(
    use_nvml, monkeypatch, host_memory, tmp_path, torch_state
):
    use_nvml(gpus=two_cards())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    fake_torch_cuda(monkeypatch, None if torch_state == "no CUDA" else [uuid_of(5), uuid_of(6)])
    if torch_state == "not imported":  # `lowmem-ft plan` does not import torch
        monkeypatch.setitem(sys.modules, "torch", None)
    budget = detect_budget(disk_path=tmp_path)
    assert budget.gpu.name == A100  # NVML's device 1
    assert budget.sources["gpu"] == (
        "NVML free memory of 80.0 GiB total; CUDA_DEVICE_ORDER=FASTEST_FIRST with different GPUs: "
        "assumed PCI order; set CUDA_DEVICE_ORDER=PCI_BUS_ID to be sure"
    )
    assert "set CUDA_DEVICE_ORDER=PCI_BUS_ID to be sure" in budget.describe()


def test_fastest_first_uuid_entries_need_no_torch(use_nvml, monkeypatch):
    use_nvml(gpus=two_cards())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-2")
    asked = fake_torch_cuda(monkeypatch, [uuid_of(1), uuid_of(2)])
    info, note = detect_cuda_gpu(0)
    assert (info.name, note, asked) == (A100, None, [])


def test_budget_cuda_index_picks_the_second_visible_card(use_nvml, monkeypatch, host_memory, tmp_path):
    use_nvml(gpus=[*two_cards(), FakeGPU(name=L4, uuid="GPU-" + uuid_of(4), total=24 * GiB, free=23 * GiB)])
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,2")
    assert detect_budget(disk_path=tmp_path).gpu.name == A100
    budget = detect_budget(disk_path=tmp_path, cuda_index=1)
    assert (budget.gpu.name, budget.gpu_bytes) == (L4, 23 * GiB)


def run_config(device: str, tmp_path) -> RunConfig:
    data = tmp_path / "train.jsonl"  # validate() checks that the data can be read
    data.write_text('{"text": "hello"}\n')
    return RunConfig(model="tiny", data=data, device=device)


@pytest.fixture()
def two_visible_gpus(monkeypatch):
    """torch sees two CUDA devices."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_device_cuda_1_plans_for_the_second_visible_card(
    use_nvml, monkeypatch, host_memory, two_visible_gpus, tmp_path
):
    use_nvml(gpus=two_cards())
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    config = run_config("cuda:1", tmp_path)
    config.validate()
    device = config.resolved_device()
    assert device == torch.device("cuda", 1)
    result = build_plan("tiny", cuda_index=device.index or 0)  # what `run` does (train.plan_run)
    assert (result.budget.gpu.name, result.budget.gpu_bytes) == (A100, 20 * GiB)
    assert build_plan("tiny").budget.gpu.name == H100  # `plan` and `run --device cuda`: cuda:0


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1", "auto", "cpu"])
def test_device_values_accepted(two_visible_gpus, tmp_path, device):
    run_config(device, tmp_path).validate()


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:-1", "cuda:01", "cuda:x", "CUDA:0", "cuda:0,1"])
def test_device_values_refused(tmp_path, device):
    with pytest.raises(UserError, match=r"^--device must be auto, cpu, cuda or cuda:N"):
        run_config(device, tmp_path).validate()


def test_device_beyond_the_visible_gpus_is_refused(two_visible_gpus, tmp_path):
    with pytest.raises(UserError) as info:
        run_config("cuda:5", tmp_path).validate()
    assert str(info.value) == (
        "--device cuda:5 is not visible: CUDA shows 2 device(s), cuda:0 to cuda:1 "
        "(CUDA_VISIBLE_DEVICES decides which)"
    )


def test_run_device_beyond_the_visible_gpus_is_one_line(two_visible_gpus, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "hello"}\n')
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", "tiny", str(data), "--device", "cuda:5", "--out", str(tmp_path / "job")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == (
        "error: --device cuda:5 is not visible: CUDA shows 2 device(s), cuda:0 to cuda:1 "
        "(CUDA_VISIBLE_DEVICES decides which)\n"
    )
    assert not (tmp_path / "job").exists()


def test_device_cuda_without_cuda_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match=r"^--device cuda:1 was asked for but no CUDA device is visible"):
        run_config("cuda:1", tmp_path).validate()


# ----------------------------------------------------------------------------------------------
# The CUDA caching allocator

ALLOC_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF")


@pytest.fixture()
def no_alloc_conf(monkeypatch):
    """None of the allocator variables is set; whatever a test sets is undone after it."""
    for name in ALLOC_VARS:
        monkeypatch.setenv(name, "")  # recorded, so that teardown removes what the test adds
        monkeypatch.delenv(name)


def test_allocator_gets_expandable_segments(no_alloc_conf):
    configure_cuda_allocator()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


@pytest.mark.parametrize("name", ALLOC_VARS)
def test_allocator_setting_of_the_user_wins(no_alloc_conf, monkeypatch, name):
    monkeypatch.setenv(name, "max_split_size_mb:128")
    configure_cuda_allocator()
    assert os.environ[name] == "max_split_size_mb:128"
    assert {n: os.environ.get(n) for n in ALLOC_VARS if n != name} == dict.fromkeys(set(ALLOC_VARS) - {name})


def test_main_configures_the_allocator(no_alloc_conf, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
