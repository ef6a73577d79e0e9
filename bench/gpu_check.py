"""One prepared GPU check: what a GPU must confirm about lowmem-ft, in one command.

    python bench/gpu_check.py --write docs/benchmarks.md  # every step (meant for < 8 min; not yet run)
    python bench/gpu_check.py --quick                     # steps 1-2 and one plan case (meant for < 3 min)
    python bench/gpu_check.py --rehearse                  # the same plumbing on a CPU (what CI runs)

Nothing in lowmem-ft has run on a GPU until this does. A GPU comes by chance and for minutes, so the
steps run most valuable first, each figure is written to the JSON file (``--json``, default
gpu_check.json) and, with ``--write``, to the ``gpu-check`` section of docs/benchmarks.md as soon
as it is measured: a run cut off by its time limit keeps everything it finished. Each step runs in
a subprocess of its own (each plan case too), so one crash or out-of-memory loses nothing else.
It ends with a one-screen summary, PASS / FAIL / SKIP per check.

  1. environment      versions; the GPU, the NVML card the planner picks against torch's own (by
                      UUID; also with CUDA_VISIBLE_DEVICES=GPU-<uuid> and a prefix), free memory;
                      the CUDA context measured after a matmul, an SDPA forward and backward and
                      `import bitsandbytes`; pinned 256 MiB host<->device copies
  2. gpu tests        `pytest -m gpu` with CUBLAS_WORKSPACE_CONFIG set (streamed = resident, also with
                      compute or copies slowed: races), then the streaming and state-store tests
                      again under TORCH_CUDA_SANITIZER=1 (unsynchronised streams)
  3. plan vs measured the recipe's own loop (lowmem_ft/looptrace.py: plan_run, prepare_model, the
                      steps, evaluation, checkpoint capture) on the real GPU, random weights from
                      the shipped configs (no download), the budget enforced with
                      set_per_process_memory_fraction; the plan's peak against the traced live
                      bytes, max_memory_allocated/reserved, NVML's used memory, allocator retries,
                      pinned host bytes, and the phase that ran out of memory if one did
  4. streaming        bench/streaming.py: streamed against resident HiFT tokens/s, the copy
                      bandwidth, and (torch.profiler) the copy time overlapped by compute (full run only)

Step 2 holds the races: streamed against resident with compute or copies slowed, on the tiny model
and on three bf16 layers of Llama-2-7B's size (HiFT and SIFT), and the state store's export right
after a save with the side stream held back; and the out-of-memory path: a run capped between
what micro-batch 2 and 16 need retries smaller, finishes and gives its memory back. Step 4 also
profiles a short streamed run for how much of the copying overlaps compute.

``--rehearse`` runs every step's plumbing without a GPU: the environment step reports the CPU, the
GPU tests are collected and skip, the plan cases trace the loop on fake tensors (the tiny model).
tests/test_gpu_check.py runs it and kills it half-way to check the JSON it leaves.

On a lent machine (the device tool), docs/benchmarks.md says what to carry and the one call.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_report, whatever the working directory
from _report import REPO, command_line, write_section  # noqa: E402

SECTION = "gpu-check"
GiB = 1 << 30

# Plan cases, most valuable first: (model, method variant, GPU budget in GiB). The variants are
# bench/plan_vs_trace.py's. The first is the --quick one.
CASES = [
    ("llama-2-7b", "hift keep", 24),
    ("llama-3-8b", "hift keep", 24),
    ("llama-2-7b", "hift --stream", 8),
    ("llama-2-7b", "sift nf4", 16),
    ("llama-3-8b", "sift nf4", 24),
    ("llama-2-7b", "lora", 24),
    ("llama-2-7b", "hift keep-8bit", 16),
    ("llama-3-8b", "hift --stream", 16),
    ("llama-2-7b", "hift drop", 8),
]
REHEARSAL_CASES = [("tiny", "hift keep", 2), ("tiny", "sift bf16", 2)]
CASE_SECONDS = 240  # one plan case at most (a 7B model built and run for ~9 steps)


# -- the report: written after every figure ----------------------------------------------------------
class Report:
    def __init__(self, path: Path, docs: Path | None, argv: list[str]):
        self.path, self.docs = path, docs
        self.data = {
            "command": command_line(argv),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": None,
            "steps": {},
        }
        self.save()

    def record(self, step: str, result: dict) -> None:
        self.data["steps"][step] = result
        self.save()

    def save(self) -> None:
        # The docs first, then the JSON: a step the JSON holds is in the docs too, even when the run
        # is killed between the two writes (a lent machine's time limit).
        if self.docs is not None:
            write_section(self.docs, SECTION, self.markdown())
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        tmp.replace(self.path)  # a reader (or a kill) never sees half a file

    def markdown(self) -> str:
        device = self.data["device"] or "not measured (no GPU)"
        lines = [
            "## GPU check",
            "",
            f"Generated by `{self.data['command']}` on {device}, {self.data['started']}. Every figure "
            "below was measured there; a step not listed was not measured.",
            "",
            "| step | result | figures |",
            "|---|---|---|",
        ]
        for name, result in self.data["steps"].items():
            figures = "; ".join(f"{k} {v}" for k, v in result.get("figures", {}).items())
            lines.append(f"| {name} | {result['status']} | {figures} |")
        cases = [r for r in self.data["steps"].values() if "cases" in r]
        for result in cases:
            header = (
                "| model | method | budget | plan | planned peak | max reserved | max allocated | traced "
                "| NVML used | retries | out of memory in |"
            )
            lines += ["", header, "|---" * header.count(" | ") + "|---|"]
            for c in result["cases"]:
                lines.append(
                    f"| {c['model']} | {c['method']} | {c['budget_gib']} GiB | {c.get('plan', '')} | "
                    f"{_gib(c.get('planned_peak'))} | {_gib(c.get('max_reserved'))} | "
                    f"{_gib(c.get('max_allocated'))} | {_gib(c.get('traced'))} | "
                    f"{_gib(c.get('nvml_used'))} | "
                    f"{c.get('alloc_retries', '')} | {c.get('oom_phase') or c.get('error', '')} |"
                )
        return "\n".join(lines)


def _gib(value) -> str:
    return f"{value / GiB:.2f} GiB" if isinstance(value, int | float) else ""


def run_child(args: list[str], timeout: float, env: dict | None = None) -> tuple[int, str, str]:
    """A subprocess with a time limit: (exit code, stdout, stderr); 124 when it ran out of time."""
    try:
        done = subprocess.run(
            [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
            env={**os.environ, **(env or {})},
        )  # fmt: skip
        return done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as exc:
        return 124, exc.stdout or "", exc.stderr or ""


def last_json(stdout: str | bytes) -> dict | None:
    text = stdout.decode() if isinstance(stdout, bytes) else stdout
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return None


# -- step 1: the environment ---------------------------------------------------------------------------
def environment() -> dict:
    """Runs in its own process (a fresh CUDA context). Prints one JSON line."""
    import platform

    import torch
    import transformers

    import lowmem_ft

    figures = {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda or "none",
        "transformers": transformers.__version__, "lowmem_ft": lowmem_ft.__version__,
    }  # fmt: skip
    try:
        import bitsandbytes

        figures["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        figures["bitsandbytes"] = "missing"
    if not torch.cuda.is_available():
        return {"status": "SKIP", "device": None, "figures": figures, "note": "no CUDA device"}

    from lowmem_ft.gpus import detect_cuda_gpu
    from lowmem_ft.sizes import format_bytes

    props = torch.cuda.get_device_properties(0)
    picked, note = detect_cuda_gpu(0)
    figures |= {"gpu": props.name, "total": format_bytes(props.total_memory)}
    same_card = picked is not None and _nvml_uuid(picked.index) == "GPU-" + str(props.uuid)
    figures["planner's card is torch's"] = same_card if note is None else f"{same_card} ({note})"
    by_uuid = _card_named_by_uuid("GPU-" + str(props.uuid))
    figures["CUDA_VISIBLE_DEVICES=GPU-<uuid> picks it"] = by_uuid
    same_card = same_card and all(by_uuid.values())
    nvml_before = _nvml_used()
    free, _ = torch.cuda.mem_get_info()
    figures["free at start"] = format_bytes(free)
    # what a training step loads: cuBLAS(Lt), SDPA forward and backward, bitsandbytes
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    (a @ a).sum().backward()
    q = torch.randn(2, 32, 512, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
    if figures["bitsandbytes"] != "missing":
        import bitsandbytes.functional as bnbf

        bnbf.quantize_4bit(torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16))
    torch.cuda.synchronize()
    nvml_after = _nvml_used()
    if nvml_before is not None and nvml_after is not None:
        context = nvml_after - nvml_before - torch.cuda.memory_reserved()
        figures["CUDA context"] = format_bytes(context)
        figures["planner's context"] = format_bytes(_planned_context())
    figures |= _pinned_copies()
    status = "PASS" if same_card else "FAIL"
    return {
        "status": status,
        "device": f"{props.name} ({format_bytes(props.total_memory)})",
        "figures": figures,
    }


def _card_named_by_uuid(uuid: str) -> dict[str, bool]:
    """The planner's card when CUDA_VISIBLE_DEVICES names this one by its full UUID and by a short
    prefix (what schedulers write): is it still this card? NVML alone answers, so the variable can
    change after CUDA started."""
    from lowmem_ft.gpus import detect_cuda_gpu

    answers = {}
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        for name, entry in (("full", uuid), ("prefix", uuid[:12])):
            os.environ["CUDA_VISIBLE_DEVICES"] = entry
            picked, _ = detect_cuda_gpu(0)
            answers[name] = picked is not None and _nvml_uuid(picked.index) == uuid
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved
    return answers


def _planned_context() -> int:
    from lowmem_ft.planner.plan import CUDA_CONTEXT_BYTES

    return CUDA_CONTEXT_BYTES


def _nvml_uuid(index: int) -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        uuid = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(index))
        return uuid.decode() if isinstance(uuid, bytes) else uuid
    except Exception:
        return None


def _nvml_used(index: int = 0) -> int | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).used)
    except Exception:
        return None


def _pinned_copies() -> dict:
    import torch

    host = torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True)
    device = torch.empty_like(host, device="cuda")
    out = {}
    for name, (dst, src) in {"H2D": (device, host), "D2H": (host, device)}.items():
        dst.copy_(src, non_blocking=True)  # warm-up
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        out[f"pinned {name}"] = f"{5 * host.numel() / (start.elapsed_time(end) / 1000) / 1e9:.1f} GB/s"
    return out


# -- step 2: the GPU test tier -----------------------------------------------------------------------------
def gpu_tests(rehearse: bool) -> dict:
    env = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    # `-o addopts=`: without pyproject's pytest-xdist options, which a GPU machine that has pytest but
    # not the test extra would refuse
    pytest = ["-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py", "-p", "no:cacheprovider"]
    pytest += ["-o", "addopts="]
    code, out, err = run_child(pytest, timeout=300, env=env)
    summary = (out.strip().splitlines() or [""])[-1]
    figures = {"pytest -m gpu": summary}
    sanitizer = None
    if not rehearse:
        races = [*pytest, "-k", "state_store or stream"]
        code2, out2, _ = run_child(races, timeout=300, env={**env, "TORCH_CUDA_SANITIZER": "1"})
        sanitizer = code2
        figures["under TORCH_CUDA_SANITIZER"] = (out2.strip().splitlines() or [""])[-1]
    if "passed" not in summary and "skipped" in summary:
        status = "SKIP"
    else:
        status = "PASS" if code == 0 and sanitizer in (None, 0) else "FAIL"
    return {"status": status, "figures": figures, "tail": (out + err)[-2000:] if status == "FAIL" else ""}


# -- step 3: plan against measured, one case per process ------------------------------------------------
def plan_case(model: str, variant: str, budget: int, rehearse: bool) -> dict:
    """Runs in its own process. The recipe's loop for the plan of ``variant`` at ``budget`` GiB."""
    import torch
    from plan_vs_trace import VARIANTS

    from lowmem_ft.config import RunConfig
    from lowmem_ft.errors import UserError
    from lowmem_ft.looptrace import trace_run
    from lowmem_ft.phases import OutOfMemoryIn

    row = {"model": model, "method": variant, "budget_gib": budget}
    on_gpu = torch.cuda.is_available() and not rehearse
    if on_gpu:  # the budget, enforced: the allocator refuses beyond it as a smaller card would
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget * GiB / total))
    config = RunConfig.create(
        model=model, data=Path("gpu_check.jsonl"), dtype="bf16", device="cuda" if on_gpu else "cpu",
        gpu_mem=f"{budget}GiB", cpu_mem="1TiB" if not on_gpu else None, seq_len=512, **VARIANTS[variant],
    )  # fmt: skip
    started = time.perf_counter()
    try:
        plan, trace = trace_run(config, on_gpu=on_gpu)
        row |= {
            "traced": trace.peak,
            "traced_phase": trace.peak_phase,
            "pinned_host": trace.host_buffer_bytes,
        }
    except UserError as exc:
        return row | {"status": "SKIP", "error": str(exc)[:200]}
    except (OutOfMemoryIn, torch.OutOfMemoryError) as exc:
        row |= {"oom_phase": getattr(exc, "phase", None) or "forward/backward", "error": str(exc)[:200]}
        plan = None
    if plan is not None:
        row |= {"plan": _settings(plan), "planned_peak": plan.gpu_peak_bytes, "plan_phase": plan.peak_phase}
    if on_gpu:
        stats = torch.cuda.memory_stats()
        row |= {
            "max_allocated": torch.cuda.max_memory_allocated(),
            "max_reserved": torch.cuda.max_memory_reserved(),
            "alloc_retries": stats.get("num_alloc_retries", 0),
            "nvml_used": _nvml_used(),
        }
    row["seconds"] = round(time.perf_counter() - started, 1)
    row["status"] = "FAIL" if "oom_phase" in row else "PASS"
    return row


def _settings(plan) -> str:
    keys = ("units_per_group", "state_policy", "streamed_units", "sparsity", "base_quant", "micro_batch_size")
    return ", ".join(f"{k} {plan.settings[k]}" for k in keys if plan.settings.get(k) not in (None, 0))


def plan_vs_measured(report: Report, cases, rehearse: bool) -> dict:
    rows = []
    for model, variant, budget in cases:
        args = [__file__, "--case", model, variant, str(budget)] + (["--rehearse"] if rehearse else [])
        code, out, err = run_child(args, timeout=CASE_SECONDS)
        row = last_json(out) or {
            "model": model, "method": variant, "budget_gib": budget, "status": "FAIL",
            "error": "timed out" if code == 124 else (err.strip().splitlines() or ["no output"])[-1][:200],
        }  # fmt: skip
        rows.append(row)
        report.record("plan vs measured", _cases_result(rows))  # each case as it ends
        print(f"  {model} {variant} {budget} GiB: {row['status']} {row.get('error', '')}", flush=True)
    return _cases_result(rows)


def _cases_result(rows: list[dict]) -> dict:
    failed = [r for r in rows if r["status"] == "FAIL"]
    ran = [r for r in rows if r["status"] == "PASS"]
    status = "FAIL" if failed else "PASS" if ran else "SKIP"
    return {"status": status, "figures": {"cases": f"{len(ran)} ran, {len(failed)} failed"}, "cases": rows}


# -- step 4: streaming throughput -----------------------------------------------------------------------
def streaming() -> dict:
    code, out, err = run_child(["bench/streaming.py"], timeout=300)
    tail = (out + err).strip().splitlines()[-12:]
    return {"status": "PASS" if code == 0 else "FAIL", "figures": {}, "tail": "\n".join(tail)}


# -- the command ------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="steps 1-2 and one plan case (meant for under 3 minutes)"
    )
    parser.add_argument(
        "--rehearse", action="store_true", help="the plumbing on a CPU: fake tensors, tiny model"
    )
    parser.add_argument("--json", type=Path, default=Path("gpu_check.json"), help="where every figure goes")
    parser.add_argument("--write", type=Path, help="also write the gpu-check section of this Markdown file")
    parser.add_argument("--case", nargs=3, metavar=("MODEL", "VARIANT", "GIB"), help=argparse.SUPPRESS)
    parser.add_argument("--step", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.case:  # a child: one plan case
        print(json.dumps(plan_case(args.case[0], args.case[1], int(args.case[2]), args.rehearse)), flush=True)
        return 0
    if args.step == "environment":  # a child: a fresh CUDA context
        print(json.dumps(environment()), flush=True)
        return 0

    report = Report(args.json, args.write, [__file__, *(argv if argv is not None else sys.argv[1:])])
    started = time.perf_counter()

    code, out, err = run_child([__file__, "--step", "environment"], timeout=120)
    env = last_json(out) or {"status": "FAIL", "figures": {}, "tail": (out + err)[-2000:]}
    report.data["device"] = env.get("device")
    report.record("environment", env)
    print(f"environment: {env['status']} {env.get('device') or ''}", flush=True)

    report.record("gpu tests", gpu_tests(args.rehearse))
    print(f"gpu tests: {report.data['steps']['gpu tests']['status']}", flush=True)

    cases = REHEARSAL_CASES if args.rehearse else CASES[:1] if args.quick else CASES
    report.record("plan vs measured", plan_vs_measured(report, cases, args.rehearse))

    if not (args.quick or args.rehearse):
        report.record("streaming", streaming())

    print(f"\nsummary ({time.perf_counter() - started:.0f} s, {args.json}):")
    for name, result in report.data["steps"].items():
        print(f"  {result['status']:<5} {name}")
    return 1 if any(r["status"] == "FAIL" for r in report.data["steps"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
