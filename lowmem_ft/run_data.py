"""The run's examples: every record read and checked, rendered, split into training and evaluation,
and tokenised (the training records partly in the background, data/lazy.py), or read back from the
job's kept tokenised data on `resume` (data/cache.py)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

import numpy as np

from lowmem_ft.config import RunConfig
from lowmem_ft.data import Example, TokenStats, data_files, pack_examples, read_records
from lowmem_ft.data.cache import read_cache, tokenizer_sha256, write_cache
from lowmem_ft.data.lazy import LazyExamples
from lowmem_ft.data.tokenize import (
    CHUNK,
    as_table,
    choose_indices,
    encode_chunk,
    encode_rendered,
    render_records,
    split_indices,
)
from lowmem_ft.errors import DataError, UserError
from lowmem_ft.files import sha256_of

log = logging.getLogger(__name__)  # the CLI shows it (cli.report_to_console)


@dataclass
class Data:
    train: LazyExamples  # record i's example (empty: nothing to learn); a plain sequence is taken as encoded
    eval: Sequence[Example]  # what every evaluation runs on: at most --max-eval-examples
    format: str
    eval_stats: TokenStats  # the evaluated examples' counts (the training ones': train.stats)
    skipped_lines: int
    eval_available: int | None = None  # evaluation records --max-eval-examples chose from (None: eval's)
    cache_key: dict | None = None  # what the examples were made from (data/cache.py); None: not kept
    from_cache: bool = False  # read from the job's tokenised data, not from the data files
    keep_dir: Path | None = None  # the job to keep the examples in once every one is encoded
    reported: bool = False  # the background encoding's end was reported

    def __post_init__(self):
        if self.eval_available is None:
            self.eval_available = len(self.eval)
        if not isinstance(self.train, LazyExamples):
            table = as_table(self.train)
            kept = int(np.count_nonzero(table.lengths()))
            self.train = LazyExamples.encoded(table, TokenStats(examples=kept))

    def stats(self) -> TokenStats | None:
        """The counts of every example made, training and evaluation; None while the training
        records are being encoded in the background, until ``report_when_encoded`` says they are
        done (so that what the header and job.json say does not depend on the thread's speed)."""
        if self.train.encoded_in_background and not self.reported:
            return None
        train, evaluated = asdict(self.train.stats), asdict(self.eval_stats)
        return TokenStats(**{name: train[name] + evaluated[name] for name in train})

    def summary(self) -> dict:
        stats = self.stats()
        return {
            "format": self.format,
            "train_records": len(self.train),
            "train_examples": None if stats is None else self.train.stats.examples,  # (None: being encoded)
            "eval_examples": len(self.eval),
            "eval_examples_available": self.eval_available,
            "skipped_bad_lines": self.skipped_lines,
            **({f"tokenize_{k}": v for k, v in asdict(stats).items()} if stats is not None else {}),
        }

    def keep_in(self, job_dir: Path) -> None:
        """Keep the tokenised examples in the job, for `resume` (data/cache.py): now, or once the
        background encoding is done (``report_when_encoded``); already there when they were read
        from it."""
        self.keep_dir = job_dir
        if self.cache_key is None or self.from_cache or self.stats() is None:
            return
        summary = {
            "format": self.format, "train_stats": asdict(self.train.stats),
            "eval_stats": asdict(self.eval_stats), "skipped_lines": self.skipped_lines,
            "eval_available": self.eval_available,
        }  # fmt: skip
        tables = {"train": self.train.table(), "eval": as_table(self.eval)}
        write_cache(job_dir, self.cache_key, tables, summary)

    def digests(self, config: RunConfig) -> dict:
        """The data's and --eval-data's digests (``data_digests``), as the kept data's key already
        holds them: the files are not read a second time (a large one takes seconds)."""
        if self.cache_key is not None:
            return {name: self.cache_key[name] for name in ("data_sha256", "eval_data_sha256")}
        return data_digests(config)

    def describe(self, config: RunConfig) -> str:
        """What the examples are, for the run's data line: the counts of every example made
        (training and evaluation) once they are known."""
        source = "--eval-data" if config.eval_data is not None else "held-out"
        if 0 < config.max_eval_examples < self.eval_available:
            chosen = f"{len(self.eval):,} of {self.eval_available:,} {source} examples (chosen by --seed)"
            evaluated = f"eval {chosen}"
        else:
            evaluated = f"{len(self.eval):,} eval examples"
        stats = self.stats()
        if stats is None:  # (data/lazy.py) report_when_encoded says it when they are done
            return f"{len(self.train):,} train records (encoded as the run trains) / {evaluated}"
        return f"{self.train.stats.examples:,} train / {evaluated}, {stats.describe(config.seq_len)}"

    def warnings(self, config: RunConfig) -> list[str]:
        """What the counts say is likely a mistake, once they are known: most examples dropped (their
        response starts beyond --seq-len), fewer examples than a step takes, or no evaluation example
        left."""
        stats, said = self.stats(), []
        if stats is None:
            return said
        longer = f"a larger --seq-len than {config.seq_len} keeps them"
        if stats.dropped_no_target > stats.examples:
            made = stats.examples + stats.dropped_no_target
            said.append(
                f"{stats.dropped_no_target:,} of {made:,} examples dropped: nothing to learn from is left "
                f"within their first {config.seq_len} tokens; {longer}"
            )
        # What a step draws from (data/batching.py): the examples with something to learn, or the rows
        # they were packed into. With fewer, the batcher goes on into the next epochs to fill a step.
        drawn, what = (
            (len(self.train), "packed rows")
            if config.pack
            else (self.train.stats.examples, "training examples")
        )
        if 0 < drawn < config.batch_size:
            said.append(
                f"each step's {config.batch_size} examples repeat the {drawn:,} {what} "
                f"({config.batch_size / drawn:.1f} times each on average); --batch-size {drawn} takes "
                "each once a step"
            )
        if not self.eval_available and config.eval_data is None and config.eval_fraction > 0:
            said.append(  # (split_indices holds one out of two records or more)
                f"no evaluation: one record is too few to hold any out for --eval-fraction "
                f"{config.eval_fraction}; give more records, or --eval-data"
            )
        if not self.eval and self.eval_available:
            said.append(
                f"no evaluation: none of the {self.eval_available:,} evaluation examples has anything to "
                f"learn from within its first {config.seq_len} tokens; {longer}"
            )
        return said

    def report_when_encoded(self, job, say, config: RunConfig) -> None:
        """Once the background encoding of the training records is done: what it made, said with
        ``say`` as the header would have said it, and recorded in job.json, and the examples kept
        in the job. Between steps, on rank 0."""
        if self.reported or not self.train.encoded_in_background or not self.train.done:
            return  # (encoded before the first step: the header said it all)
        self.reported = True
        say(f"data       every training record encoded: {self.describe(config)}")
        for warning in self.warnings(config):
            say(f"warning    {warning}")
        job.update(data=self.summary())
        if self.keep_dir is not None:
            self.keep_in(self.keep_dir)


def load_data(config: RunConfig, tokenizer, show_progress: bool = False, digests: dict | None = None) -> Data:
    """The training and evaluation examples. When ``config.out`` is a job that kept its tokenised
    data (``Data.keep_in``) made from the same data, tokenizer and settings, they are read from there
    (`resume`); otherwise from the data files, with progress bars unless ``show_progress`` is False.

    Every record is read and checked here. The evaluation records are encoded here; so are the
    training records, up to ``ENCODE_FIRST`` of them (or all, with --pack), and more are encoded
    in the background while the run trains (data/lazy.py). ``digests``: ``data_digests(config)``,
    where the caller has it already.
    """
    key = _data_key(config, tokenizer, digests)
    if config.out is not None and key is not None and (kept := read_cache(config.out, key)) is not None:
        tables, summary = kept
        log.info(f"data       tokenised data read from {config.out}; the data files are not read again")
        train = LazyExamples.encoded(tables["train"], TokenStats(**summary["train_stats"]))
        return Data(
            train, tables["eval"], summary["format"], TokenStats(**summary["eval_stats"]),
            summary["skipped_lines"], summary["eval_available"], key, from_cache=True,
        )  # fmt: skip
    records, fmt, skipped = read_records(config.data, config.format, config.skip_bad_lines, show_progress)
    day = date.fromisoformat(config.chat_date) if config.chat_date else None
    rendered = render_records(records, fmt, tokenizer, show_progress, day)
    del records  # a million records are gigabytes of Python objects
    if config.eval_data is not None:
        shared = {p.resolve() for p in data_files(config.data)} & {
            p.resolve() for p in data_files(config.eval_data)
        }
        if shared:  # (a warning: evaluating on what trains is a choice, but rarely a wanted one)
            log.warning(
                f"warning    --eval-data shares {len(shared)} file(s) with the training data "
                f"({sorted(shared)[0]}): its losses say how well the model fits what it trains on, "
                "not how it does on examples it never saw"
            )
        # The evaluation file is detected on its own (it may be in another format than the training file).
        try:
            eval_records, eval_fmt, eval_skipped = read_records(
                config.eval_data, config.format, config.skip_bad_lines, show_progress
            )
        except DataError as error:  # said as a missing --eval-data file is (config.py)
            raise DataError(f"{error} (given as --eval-data)") from None
        train_rendered, held_out = (
            rendered,
            render_records(eval_records, eval_fmt, tokenizer, show_progress, day),
        )
        skipped += eval_skipped
    else:
        train_indices, eval_indices = split_indices(len(rendered), config.eval_fraction, config.seed)
        train_rendered = [rendered[i] for i in train_indices]
        held_out = [rendered[i] for i in eval_indices]
    del rendered
    # The records left out of evaluation by the cap are neither encoded nor trained on: the cap
    # changes what an evaluation costs, never what the run trains on.
    chosen = choose_indices(len(held_out), config.max_eval_examples, config.seed)
    evaluated = [held_out[i] for i in chosen]
    eval_examples, eval_stats = encode_rendered(evaluated, tokenizer, config.seq_len, show_progress)
    if config.pack:  # packed rows follow the examples in order: every one is needed first, whole
        # (rows are cut from the stream of examples, so an example longer than a row goes on in the
        # next: cut to --seq-len first, all but its first row's worth would be lost)
        whole = LazyExamples(train_rendered, tokenizer, UNTRUNCATED)
        train = LazyExamples.encoded(pack_examples(whole.table(show_progress), config.seq_len), whole.stats)
    else:
        train = LazyExamples(train_rendered, tokenizer, config.seq_len)
        if len(train) <= ENCODE_FIRST:
            train.encode_all(show_progress)
    if not train.any_example():
        raise UserError(_nothing_to_learn(config, train_rendered, tokenizer))
    train.start()  # the rest, while the model loads and the run trains
    return Data(train, eval_examples, fmt, eval_stats, skipped, len(held_out), key)


def _nothing_to_learn(config: RunConfig, rendered: list, tokenizer) -> str:
    """Why no training record made an example (each has nothing to learn within its first --seq-len
    tokens), and the --seq-len that keeps half of them, from the first ``CHUNK`` records."""
    table = encode_chunk(rendered[:CHUNK], tokenizer, UNTRUNCATED, TokenStats())
    trained = np.flatnonzero(table.trained)  # token positions that carry loss, in order
    owners = np.searchsorted(table.starts, trained, side="right") - 1
    examples, first = np.unique(owners, return_index=True)  # each example's first trained token
    reaches = np.sort(trained[first] - table.starts[examples] + 1)  # the --seq-len that keeps it
    records = f"{len(rendered):,} training record{'s' * (len(rendered) != 1)}"
    if not len(reaches):  # (no response at all: --seq-len is not why)
        return f"{config.data}: none of its {records} has a response to learn from; check the data"
    half = int(reaches[(len(reaches) - 1) // 2])  # the least that keeps at least half
    judged = f" (judged from the first {CHUNK:,})" if len(rendered) > CHUNK else ""
    return (
        f"{config.data}: none of its {records} has anything to learn from within its first "
        f"{config.seq_len} tokens (the responses start after them); --seq-len {half} keeps half of "
        f"them{judged}"
    )


def data_digests(config: RunConfig) -> dict:
    """The data's and --eval-data's digests: what job.json records, so that `resume` can refuse
    files that changed, and part of the kept data's key."""
    return {
        "data_sha256": sha256_of(data_files(config.data)),
        "eval_data_sha256": sha256_of(data_files(config.eval_data)) if config.eval_data else None,
    }


def _data_key(config: RunConfig, tokenizer, digests: dict | None) -> dict | None:
    """Everything the examples depend on: what ``Data.keep_in`` keeps them under."""
    tokenizer_digest = tokenizer_sha256(tokenizer)
    if tokenizer_digest is None:
        return None
    return {
        **(digests or data_digests(config)),
        "tokenizer_sha256": tokenizer_digest,
        **{name: getattr(config, name) for name in _EXAMPLE_SETTINGS},
    }


# An example's length limit where none applies (--pack cuts rows from the whole examples).
UNTRUNCATED = 2**62

# Training records encoded before the first step, so that the run's header counts its examples:
# a few seconds' work. Beyond it they are encoded while the run trains (a million take minutes).
ENCODE_FIRST = 10_000

# The options that change the examples made from the same data and tokenizer.
_EXAMPLE_SETTINGS = (
    "format", "skip_bad_lines", "seq_len", "pack", "eval_fraction", "seed", "max_eval_examples", "chat_date",
)  # fmt: skip
