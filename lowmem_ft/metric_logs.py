"""Copies of metrics.jsonl in the formats other tools read: `--log csv,tensorboard`.

    JOB/metrics.csv       one row per training step or evaluation (spreadsheets, pandas)
    JOB/tensorboard/      event files for `tensorboard --logdir JOB/tensorboard`

metrics.jsonl stays the record (checkpoints count its bytes, resume cuts it back); these follow it.
A resumed job forgets what it logged after its checkpoint, since it logs those steps again: the CSV
is rewritten from the cut-back metrics.jsonl, and TensorBoard is told to purge the events from the
first step that is logged again (SummaryWriter's ``purge_step``).
"""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

LOG_KINDS = ("csv", "tensorboard")
# CSV columns and TensorBoard tags, in the order a reader wants them
COLUMNS = ("step", "loss", "eval_loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_bytes", "skipped")
TAGS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "tokens_per_s": "train/tokens_per_s",
    "peak_mem_bytes": "memory/peak_bytes",
    "eval_loss": "eval/loss",
}


def log_kinds(value: str) -> tuple[str, ...]:
    """``--log csv,tensorboard`` as its kinds ('' : none)."""
    return tuple(dict.fromkeys(kind.strip() for kind in value.split(",") if kind.strip()))


def log_problem(value: str) -> str | None:
    """What is wrong with a ``--log`` value, in one line, or None."""
    for kind in log_kinds(value):
        if kind not in LOG_KINDS:
            return f"--log {kind!r} is not known; give csv, tensorboard or both (--log csv,tensorboard)"
    if "tensorboard" in log_kinds(value) and importlib.util.find_spec("tensorboard") is None:
        return '--log tensorboard needs the tensorboard package: pip install "lowmem-ft[tensorboard]"'
    return None


def _logged(metrics: Path) -> list[dict]:
    """The records of a metrics.jsonl (a torn last line of a killed run left out)."""
    records = []
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


class CsvLog:
    def __init__(self, job_dir: Path):
        self.path = job_dir / "metrics.csv"
        with open(self.path, "w", newline="") as f:  # rewritten from metrics.jsonl: a resume cut it back
            writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(_logged(job_dir / "metrics.jsonl"))

    def write(self, record: dict) -> None:
        with open(self.path, "a", newline="") as f:  # flushed per line, like metrics.jsonl
            csv.DictWriter(f, COLUMNS, extrasaction="ignore").writerow(record)

    def close(self) -> None:
        pass


class TensorBoardLog:
    def __init__(self, job_dir: Path, first_step: int):
        from torch.utils.tensorboard import SummaryWriter

        directory = job_dir / "tensorboard"
        # A job that had none (`resume --log tensorboard` on a job run without it) gets what it has
        # logged so far, as the CSV does, not a curve that starts where the resume did.
        logged = [] if directory.exists() else _logged(job_dir / "metrics.jsonl")
        # A resumed job logs again from first_step: events a killed run wrote from there are purged.
        self.writer = SummaryWriter(str(directory), purge_step=first_step)
        for record in logged:
            self._add(record)
        self.writer.flush()

    def write(self, record: dict) -> None:
        self._add(record)
        self.writer.flush()  # a killed run keeps what it logged, as metrics.jsonl does

    def _add(self, record: dict) -> None:
        for key, tag in TAGS.items():
            if record.get(key) is not None:
                self.writer.add_scalar(tag, record[key], record["step"])

    def close(self) -> None:
        self.writer.close()


def open_logs(job_dir: Path, kinds: str, first_step: int) -> list:
    """The logs ``--log`` asks for, ready for the records from step ``first_step`` on (what was
    logged from there before, by a run that was stopped, is forgotten)."""
    chosen = log_kinds(kinds)
    logs: list = [CsvLog(job_dir)] if "csv" in chosen else []
    if "tensorboard" in chosen:
        logs.append(TensorBoardLog(job_dir, first_step))
    return logs
