"""How fast a large JSONL file is read and tokenised, and how much memory that takes, on this machine.

    python bench/data_speed.py --write docs/benchmarks.md            # 1,000,000 records, alpaca and chat
    python bench/data_speed.py --records 20000 --formats alpaca      # a quick look

For each format it writes a seeded file of short records to a temporary directory (nothing is kept):
Alpaca records of the Alpaca data set's shape (an instruction of 6-24 words, an input of 4-20 words
in 40% of them, an output of 10-90 words) and chat records of one to three exchanges (a user turn of
5-30 words, an assistant turn of 15-100, a system message in 30% of them). The words are drawn from
the English of Python's own documentation (``pydoc_data``) at the frequency they have there.

Each file is then measured in a process of its own, so its peak RSS is the loading's alone, as a
run loads it, with the embedded ``tiny`` model's tokenizer (a byte-level BPE of 4,096 tokens):
``run_data.load_data`` reads and checks every line, renders every record, encodes the evaluation set
and returns, which is when a run loads its model and starts training; the rest of the records are
encoded in the background meanwhile (lowmem_ft/data/lazy.py; seq-len 512), and the script waits for
them as a GPU run would, asleep. Then it keeps the examples in a job directory and reads them back as
``resume`` does. The tokenizer's own encoding of the same texts (``encode_batch`` on the first
100,000, ids and offsets left in Rust) is the floor no Python around it can go under.
"""

from __future__ import annotations

import argparse
import itertools
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
    """What a run does with the file: ``run_data.load_data`` (read and check every record, render
    it, encode the evaluation set and the first records) until it returns, when the run would go on
    to load the model and train; then the background encoding of the rest, waited for as a GPU run
    waits for its steps (this thread mostly asleep)."""
    from lowmem_ft import run_data
    from lowmem_ft.config import RunConfig
    from lowmem_ft.data import render
    from lowmem_ft.data.cache import read_cache, write_cache
    from lowmem_ft.models import load_tokenizer, resolve_model

    spent = {}

    def timed(name, function):
        def call(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - started

        return call

    run_data.read_records = timed("read", run_data.read_records)
    run_data.render_records = timed("render", run_data.render_records)
    tokenizer = load_tokenizer(resolve_model("tiny"))
    config = RunConfig.create(model="tiny", data=path, seq_len=512)
    rss_before = peak_rss()
    cpu, started = time.process_time(), time.perf_counter()
    data = run_data.load_data(config, tokenizer)
    first_step_s = time.perf_counter() - started
    while not data.train.done:
        time.sleep(0.05)
    total_s = time.perf_counter() - started
    cpu_s = time.process_time() - cpu
    rss = peak_rss()
    stats = data.train.stats  # (the evaluation set's few hundred records are left out of the rates)

    records = [render(r.data, data.format, tokenizer).text for r in _first_records(path, FLOOR_RECORDS)]
    started = time.perf_counter()
    encodings = tokenizer.backend_tokenizer.encode_batch(records, add_special_tokens=False)
    floor_s = time.perf_counter() - started
    floor_tokens = sum(len(e) for e in encodings)
    del encodings, records

    with tempfile.TemporaryDirectory(dir=path.parent) as job:
        started = time.perf_counter()
        write_cache(Path(job), {"bench": 1}, {"train": data.train.table(), "eval": data.eval}, {})
        keep_s = time.perf_counter() - started
        kept_bytes = sum(f.stat().st_size for f in (Path(job) / "tokenized").iterdir())
        started = time.perf_counter()
        assert read_cache(Path(job), {"bench": 1}) is not None
        reread_s = time.perf_counter() - started
    return {
        "format": data.format, "records": len(data.train) + data.eval_available, "tokens": stats.tokens,
        "encoded": len(data.train),
        "read_s": spent["read"], "render_s": spent["render"], "first_step_s": first_step_s,
        "total_s": total_s, "cpu_s": cpu_s, "peak_rss": rss, "rss_before": rss_before,
        "floor_tokens_per_s": floor_tokens / floor_s, "keep_s": keep_s, "kept_bytes": kept_bytes,
        "reread_s": reread_s, "file_bytes": path.stat().st_size,
    }  # fmt: skip


def _first_records(path: Path, n: int):
    from lowmem_ft.data import Record

    with open(path, encoding="utf-8") as f:
        lines = itertools.islice(f, n)
        return [Record(line=i + 1, data=json.loads(line), path=str(path)) for i, line in enumerate(lines)]


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
    n, encode_s = m["records"], m["total_s"] - m["first_step_s"]
    return [
        ("file", f"{n:,} records, {mib(m['file_bytes'])}, {m['tokens'] / m['encoded']:.0f} tokens a record"),
        ("read and check every record (`read_records`)", f"{m['read_s']:.1f} s"),
        ("render and check every record (`render_records`)", f"{m['render_s']:.1f} s"),
        (
            "**before the first step** (`load_data`: the above, the evaluation set, the first records)",
            f"**{m['first_step_s']:.0f} s**",
        ),
        (
            "the rest encoded, in the background as the run trains",
            f"{encode_s:.0f} s more, {m['tokens'] / encode_s / 1e6:.2f} M tokens/s",
        ),
        (
            "read and tokenise, all of it",
            f"{m['total_s']:.0f} s ({n / m['total_s']:,.0f} records/s); {m['cpu_s']:.0f} s of CPU: "
            f"{m['cpu_s'] / m['total_s']:.1f} cores busy on average",
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
            "A run starts training after the row in bold (`load_data`): every record has been "
            "read and checked, so a bad one still stops it before its first step. The rest runs in "
            "the background while the run trains (a GPU step reads a few dozen records, the encoding "
            "makes thousands a second): the tokenizer's own encoding (the floor row), and its results "
            "turned into arrays, which holds Python's lock and so keeps to one core. `resume` reads "
            "the kept examples instead. The encoding spreads over the cores that are free: "
            '"cores busy" says how many were.\n'
        )
        write_section(args.write, "data-speed", markdown)
        print(f"written to {args.write}")


if __name__ == "__main__":
    main()
