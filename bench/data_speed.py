"""How fast a large JSONL file is read and tokenised, and how much memory that takes, on this machine.

    python bench/data_speed.py --write docs/benchmarks.md            # 1,000,000 records, alpaca and chat
    python bench/data_speed.py --records 20000 --formats alpaca      # a quick look

For each format it writes a seeded file of short records to a temporary directory (nothing is kept):
Alpaca records of the Alpaca data set's shape (an instruction of 6-24 words, an input of 4-20 words
in 40% of them, an output of 10-90 words) and chat records of one to three exchanges (a user turn of
5-30 words, an assistant turn of 15-100, a system message in 30% of them). The words are drawn from
the English of Python's own documentation (``pydoc_data``) at the frequency they have there.

Each file is then measured in a process of its own, so its peak RSS is the loading's alone, with the
functions a run uses and the embedded ``tiny`` model's tokenizer (a byte-level BPE of 4,096 tokens):
``read_records`` (parse and check every line), ``tokenize_records`` (render, tokenise in chunks,
labels, truncation to 512 tokens), then keeping the examples in a job directory and reading them back
as ``resume`` does. The tokenizer's own encoding of the same texts (``encode_batch`` on the first
100,000, ids and offsets left in Rust) is the floor no Python around it can go under.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import command_line, write_section  # noqa: E402
from quickstart import machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FLOOR_RECORDS = 100_000


# -- the data ----------------------------------------------------------------------------------------------
def vocabulary() -> list[str]:
    """Every word of Python's documentation topics, repeats kept: drawing from it draws words at
    the frequency English technical prose uses them."""
    import pydoc_data.topics

    return re.findall(r"[A-Za-z][a-z']*|[0-9]+|[.,;:()]", " ".join(pydoc_data.topics.topics.values()))


def sentence(rng: random.Random, words: list[str], low: int, high: int) -> str:
    text = " ".join(rng.choices(words, k=rng.randint(low, high)))
    return text[:1].upper() + text[1:] + "."


def alpaca(rng: random.Random, words: list[str]) -> dict:
    return {
        "instruction": sentence(rng, words, 6, 24),
        "input": sentence(rng, words, 4, 20) if rng.random() < 0.4 else "",
        "output": sentence(rng, words, 10, 90),
    }


def chat(rng: random.Random, words: list[str]) -> dict:
    messages = [{"role": "system", "content": sentence(rng, words, 5, 15)}] if rng.random() < 0.3 else []
    for _ in range(rng.randint(1, 3)):
        messages.append({"role": "user", "content": sentence(rng, words, 5, 30)})
        messages.append({"role": "assistant", "content": sentence(rng, words, 15, 100)})
    return {"messages": messages}


RECORDS = {"alpaca": alpaca, "chat": chat}


def write_data(path: Path, kind: str, n: int, seed: int = 0) -> None:
    rng, words = random.Random(seed), vocabulary()
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            f.write(json.dumps(RECORDS[kind](rng, words)) + "\n")


# -- one measurement, in a process of its own --------------------------------------------------------------
def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure(path: Path) -> dict:
    from lowmem_ft.data import read_records, render, tokenize_records
    from lowmem_ft.data.cache import read_cache, write_cache
    from lowmem_ft.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model("tiny"))
    rss_before = peak_rss()
    cpu, started = time.process_time(), time.perf_counter()
    records, fmt, _ = read_records(path)
    read_s = time.perf_counter() - started
    table, stats = tokenize_records(records, fmt, tokenizer, seq_len=512)
    tokenize_s = time.perf_counter() - started - read_s
    cpu_s = time.process_time() - cpu
    rss = peak_rss()

    texts = [render(r.data, fmt, tokenizer).text for r in records[:FLOOR_RECORDS]]
    del records
    started = time.perf_counter()
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    floor_s = time.perf_counter() - started
    floor_tokens = sum(len(e) for e in encodings)
    del encodings, texts

    with tempfile.TemporaryDirectory(dir=path.parent) as job:
        started = time.perf_counter()
        write_cache(Path(job), {"bench": 1}, {"train": table}, {})
        keep_s = time.perf_counter() - started
        kept_bytes = sum(f.stat().st_size for f in (Path(job) / "tokenized").iterdir())
        started = time.perf_counter()
        assert read_cache(Path(job), {"bench": 1}) is not None
        reread_s = time.perf_counter() - started
    return {
        "format": fmt, "records": stats.examples + stats.dropped_no_target, "tokens": stats.tokens,
        "read_s": read_s, "tokenize_s": tokenize_s, "cpu_s": cpu_s, "peak_rss": rss, "rss_before": rss_before,
        "floor_tokens_per_s": floor_tokens / floor_s, "keep_s": keep_s, "kept_bytes": kept_bytes,
        "reread_s": reread_s, "file_bytes": path.stat().st_size,
    }  # fmt: skip


def run_measure(path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run(
        [sys.executable, __file__, "--measure", str(path)], capture_output=True, text=True, env=env
    )
    if result.returncode != 0:
        raise SystemExit(f"measuring {path} failed:\n{result.stderr}")
    return json.loads(result.stdout.splitlines()[-1])


# -- the report ----------------------------------------------------------------------------------------------
def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def rows(m: dict) -> list[tuple[str, str]]:
    n, total_s = m["records"], m["read_s"] + m["tokenize_s"]
    return [
        ("file", f"{n:,} records, {mib(m['file_bytes'])}, {m['tokens'] / n:.0f} tokens a record"),
        ("read and check (`read_records`)", f"{m['read_s']:.1f} s, {n / m['read_s']:,.0f} records/s"),
        (
            "tokenise (`tokenize_records`, seq-len 512)",
            f"{m['tokenize_s']:.1f} s, {n / m['tokenize_s']:,.0f} records/s, "
            f"{m['tokens'] / m['tokenize_s'] / 1e6:.2f} M tokens/s",
        ),
        (
            "read and tokenise",
            f"**{total_s:.0f} s** ({n / total_s:,.0f} records/s); {m['cpu_s']:.0f} s of CPU: "
            f"{m['cpu_s'] / total_s:.1f} cores busy on average",
        ),
        (
            "the tokenizer's own encoding (floor)",
            f"{m['floor_tokens_per_s'] / 1e6:.2f} M tokens/s = "
            f"{m['tokens'] / m['floor_tokens_per_s']:.0f} s for these tokens",
        ),
        ("peak RSS", f"{mib(m['peak_rss'])}, {mib(m['rss_before'])} of it before reading"),
        ("kept in the job for resume", f"{mib(m['kept_bytes'])}, written in {m['keep_s']:.1f} s"),
        ("read back by resume (sha256 verified)", f"{m['reread_s']:.1f} s"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--formats", nargs="+", choices=list(RECORDS), default=list(RECORDS))
    parser.add_argument("--write", type=Path, help="the Markdown file to write the section to")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return

    load = os.getloadavg()[0]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.formats:
            path = Path(tmp) / f"{kind}.jsonl"
            write_data(path, kind, args.records)
            results[kind] = run_measure(path)
            path.unlink()
            for label, value in rows(results[kind]):
                print(f"{kind:7s} {label}: {value.replace('**', '')}", flush=True)
    if args.write:
        table = "| | " + " | ".join(results) + " |\n|---|" + "---|" * len(results) + "\n"
        by_format = [rows(m) for m in results.values()]
        for i, (label, _) in enumerate(by_format[0]):
            table += f"| {label} | " + " | ".join(r[i][1] for r in by_format) + " |\n"
        markdown = (
            "## Reading and tokenising a large file (CPU)\n\n"
            f"Machine: {machine()}; load average {load:.1f} when it started (the machine is shared). "
            f"Measured {date.today().isoformat()} with `{command_line()}`. Seeded files of "
            f"{args.records:,} short records (see the script's docstring), read and tokenised with the "
            "embedded `tiny` model's tokenizer, each in a process of its own.\n\n"
            f"{table}\n"
            "Most of the time is the tokenizer's: its own encoding (the floor row) and turning its ids "
            "and offsets into Python lists (transformers' part of the call). Reading is a small part, "
            "and what is done per token after the tokenizer runs on whole arrays (numpy). A run takes "
            "as long before its first step; `resume` reads the kept examples instead. The encoding "
            'spreads over the cores that are free: "cores busy" says how many were.\n'
        )
        write_section(args.write, "data-speed", markdown)
        print(f"written to {args.write}")


if __name__ == "__main__":
    main()
