"""Turn records into token ids with loss labels; pack them into rows; split off an eval set.

Tokenised examples are kept in an ``ExampleTable``: one flat array of token ids, one of loss marks and
the examples' boundaries, about 5 bytes a token. A million short records are some 150 million
tokens; as the Python lists of ints an ``Example`` holds they would take about 8 GB.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date
from itertools import chain

import numpy as np

from lowmem_ft.data.bulk import cycle_collector_paused, progress_bar
from lowmem_ft.data.chat_template import templates_dated
from lowmem_ft.data.formats import Rendered, render
from lowmem_ft.data.records import Record
from lowmem_ft.errors import DataError

IGNORE_INDEX = -100  # the label PyTorch's cross-entropy (and Hugging Face models) skip

# Records encoded at a time (here and by data/lazy.py's thread): one call of the fast tokenizer (which
# spreads a list over the cores) per chunk, and its Python lists of ids and offsets for one chunk only
# in memory at once.
# 8,192 was as fast on 2 cores and took 200 MB more at the peak for 300,000 chat records.
CHUNK = 2048


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # same length; the token id where the token carries loss, -100 elsewhere (NOT shifted)


@dataclass
class TokenStats:
    examples: int = 0  # examples kept
    truncated: int = 0  # kept examples that were longer than seq_len and cut to seq_len
    dropped_no_target: int = 0  # examples with no trained token left after truncation (dropped)
    tokens: int = 0  # total tokens kept
    target_tokens: int = 0  # tokens that carry loss

    def describe(self, seq_len: int) -> str:
        """For the run's header."""
        return (
            f"{self.target_tokens:,} target tokens"
            + (f", {self.truncated} truncated to {seq_len} tokens" if self.truncated else "")
            + (f", {self.dropped_no_target} dropped (no response left)" if self.dropped_no_target else "")
        )


class ExampleTable(Sequence):
    """Examples stored flat. ``table[i]`` is an ``Example`` (lists, made when asked for), so the
    batcher and ``collate`` take a table or a list alike.

    A label is always either the token's own id or -100 (the labels are not shifted), so one bool
    per token holds it: ``trained``.
    """

    def __init__(self, input_ids: np.ndarray, trained: np.ndarray, starts: np.ndarray):
        self.input_ids = np.asarray(input_ids, dtype=np.int32)  # every example's tokens, one after another
        self.trained = np.asarray(trained, dtype=bool)  # per token: it carries loss
        self.starts = np.asarray(starts, dtype=np.int64)  # example i is [starts[i], starts[i + 1])
        if (
            len(self.input_ids) != len(self.trained)
            or self.starts[0] != 0
            or self.starts[-1] != len(self.input_ids)
        ):
            raise ValueError("input_ids, trained and starts do not describe one table")

    @classmethod
    def from_examples(cls, examples: Iterable[Example]) -> ExampleTable:
        examples = list(examples)
        ids = np.fromiter(chain.from_iterable(e.input_ids for e in examples), np.int64)
        labels = np.fromiter(chain.from_iterable(e.labels for e in examples), np.int64)
        if len(labels) != len(ids) or not np.all((labels == ids) | (labels == IGNORE_INDEX)):
            raise ValueError("every label must be its token's id or -100")
        lengths = [len(e.input_ids) for e in examples]
        return cls(ids, labels != IGNORE_INDEX, np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]))

    @classmethod
    def concat(cls, tables: list[ExampleTable]) -> ExampleTable:
        """The tables' examples one after another. ``tables`` is emptied as they are copied, so that
        the parts and the whole are never all in memory at once (a million examples' tokens are
        most of a gigabyte)."""
        tokens = sum(len(t.input_ids) for t in tables)
        examples = sum(len(t) for t in tables)
        ids, trained = np.empty(tokens, np.int32), np.empty(tokens, bool)
        starts = np.empty(examples + 1, np.int64)
        token = example = 0
        while tables:
            table = tables.pop(0)
            n, m = len(table.input_ids), len(table)
            ids[token : token + n], trained[token : token + n] = table.input_ids, table.trained
            starts[example : example + m] = table.starts[:-1] + token
            token, example = token + n, example + m
        starts[example] = token
        return cls(ids, trained, starts)

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} of {len(self)}")
        start, end = self.starts[index], self.starts[index + 1]
        ids = self.input_ids[start:end]
        return Example(ids.tolist(), np.where(self.trained[start:end], ids, IGNORE_INDEX).tolist())

    def lengths(self) -> np.ndarray:
        return np.diff(self.starts)

    def select(self, indices: Sequence[int]) -> ExampleTable:
        """The examples at ``indices``, in that order, copied into a table of their own."""
        indices = np.asarray(indices, dtype=np.int64)
        lengths = self.lengths()[indices]
        starts = np.concatenate([[0], np.cumsum(lengths)])
        # Where each token of the new table comes from: its index here, moved by how far its example moves.
        source = np.repeat(self.starts[indices] - starts[:-1], lengths) + np.arange(starts[-1])
        return ExampleTable(self.input_ids[source], self.trained[source], starts)


def as_table(examples: Sequence[Example]) -> ExampleTable:
    return examples if isinstance(examples, ExampleTable) else ExampleTable.from_examples(examples)


def tokenize_records(
    records: list[Record], fmt: str, tokenizer, seq_len: int, show_progress: bool = False
) -> tuple[ExampleTable, TokenStats]:
    """Render, tokenize and label each record; truncate to `seq_len`; drop examples with nothing to learn.
    All are rendered, then encoded ``CHUNK`` at a time, with progress bars unless ``show_progress`` is False.

    A token carries loss iff its character span overlaps a span the format marks as trained (the
    response). BOS is prepended untrained unless the rendered text already starts with it (chat
    templates often write it); EOS is appended, and trained iff the last content token is trained, so
    the model learns to stop after a response. It is not appended when the text already ends with it.
    """
    return encode_rendered(render_records(records, fmt, tokenizer), tokenizer, seq_len, show_progress)


def render_records(
    records: list[Record], fmt: str, tokenizer, show_progress: bool = False, day: date | None = None
) -> list[Rendered]:
    """Each record's text and trained spans (``formats.render``; ``day``: the date a chat template
    writes): every record is checked here, so a bad one stops the run before its first step even
    when the encoding is left for later."""
    rendered = []
    bar = progress_bar(len(records), "rendering", "records", show_progress)
    with bar, cycle_collector_paused(), templates_dated(day):
        for start in range(0, len(records), CHUNK):  # (an update of the bar per record costs more)
            for record in records[start : start + CHUNK]:
                try:
                    rendered.append(render(record.data, fmt, tokenizer))
                except DataError as error:  # raised without a location by the chat-template path
                    raise DataError(f"{record.location}: {error}") from None
            bar.update(min(CHUNK, len(records) - start))
    return rendered


def encode_rendered(
    rendered: list[Rendered], tokenizer, seq_len: int, show_progress: bool = False
) -> tuple[ExampleTable, TokenStats]:
    """The examples of ``rendered`` (``tokenize_records``), ``CHUNK`` at a time, the dropped ones left out."""
    stats = TokenStats()
    tables = []
    with progress_bar(len(rendered), "tokenising", "records", show_progress) as bar, cycle_collector_paused():
        for start in range(0, len(rendered), CHUNK):
            chunk = rendered[start : start + CHUNK]
            tables.append(encode_chunk(chunk, tokenizer, seq_len, stats))
            bar.update(len(chunk))
    return ExampleTable.concat(tables), stats


def encode_chunk(
    rendered: Sequence[Rendered], tokenizer, seq_len: int, stats: TokenStats, keep_dropped: bool = False
) -> ExampleTable:
    """The examples of ``rendered``, as ``tokenize_records`` describes; adds to ``stats``.
    ``keep_dropped``: a text with nothing to learn is an empty example in its place (so that
    example i is text i's), not left out.

    Everything after the tokenizer's call is done on whole arrays: a Python step per token would
    take longer than the tokenizer itself.
    """
    texts = [r.text for r in rendered]
    ids_lists, offsets_lists = _encode_texts(texts, tokenizer)
    lengths = np.fromiter(map(len, ids_lists), np.int64, count=len(texts))
    total = int(lengths.sum())
    ids = np.fromiter(chain.from_iterable(ids_lists), np.int64, count=total)
    offsets = np.fromiter(
        chain.from_iterable(chain.from_iterable(offsets_lists)), np.int64, count=2 * total
    ).reshape(total, 2)
    trained = _overlaps_trained_span(offsets, lengths, rendered)

    # BOS in front of each example that does not start with it, EOS after each that does not end
    # with it: the examples' tokens move right to make room.
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = np.array([bos is not None and not t.startswith(tokenizer.bos_token) for t in texts], bool)
    add_eos = np.array([eos is not None and not t.endswith(tokenizer.eos_token) for t in texts], bool)
    ends = np.cumsum(lengths)
    # Whether each text's last token is trained (an appended EOS is trained then); a text can have none.
    last_trained = (lengths > 0) & trained[np.maximum(ends - 1, 0)] if total else np.zeros(len(texts), bool)
    full = lengths + add_bos + add_eos
    starts = np.concatenate([[0], np.cumsum(full)])
    out_ids = np.empty(starts[-1], np.int64)
    out_trained = np.zeros(starts[-1], bool)
    # Where each token goes: its index, moved by how far its example's start moves.
    moved = np.repeat(starts[:-1] + add_bos - (ends - lengths), lengths) + np.arange(total)
    out_ids[moved], out_trained[moved] = ids, trained
    if bos is not None:
        out_ids[starts[:-1][add_bos]] = bos  # untrained
    if eos is not None:
        out_ids[starts[1:][add_eos] - 1] = eos
        out_trained[starts[1:][add_eos] - 1] = last_trained[add_eos]

    # Truncate to seq_len, then drop the examples with no trained token left.
    owner = np.repeat(np.arange(len(texts)), full)
    keep = np.arange(starts[-1]) - starts[:-1][owner] < seq_len
    targets = np.bincount(owner[keep], weights=out_trained[keep], minlength=len(texts)).astype(np.int64)
    kept = targets > 0
    keep &= kept[owner]
    kept_lengths = np.where(kept, np.minimum(full, seq_len), 0)
    stats.examples += int(kept.sum())
    stats.truncated += int((full[kept] > seq_len).sum())
    stats.dropped_no_target += int((~kept).sum())
    stats.tokens += int(kept_lengths.sum())
    stats.target_tokens += int(targets[kept].sum())
    if not keep_dropped:
        kept_lengths = kept_lengths[kept]
    return ExampleTable(out_ids[keep], out_trained[keep], np.concatenate([[0], np.cumsum(kept_lengths)]))


def _encode_texts(texts: list[str], tokenizer) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    """Each text's token ids and their character ranges, special tokens not added: what
    ``tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)`` gives.

    One batched call: a fast tokenizer encodes a list on every core. Its Rust tokenizer is called
    directly where the Python wrapper would only set it as it is (no truncation, no padding, special
    tokens kept whole when the wrapper keeps them): the wrapper then turns every encoding into a
    dictionary of lists we would not read: 3.3 s for 20,000 Alpaca records, 2.9 s without.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (
        backend is not None
        and backend.truncation is None
        and backend.padding is None
        and backend.encode_special_tokens == bool(getattr(tokenizer, "split_special_tokens", False))
    ):
        encodings = backend.encode_batch(texts, add_special_tokens=False)
        return [e.ids for e in encodings], [e.offsets for e in encodings]
    encodings = tokenizer(
        texts,
        add_special_tokens=False,
        return_offsets_mapping=True,
        return_attention_mask=False,
        return_token_type_ids=False,
    )
    return encodings["input_ids"], encodings["offset_mapping"]


def _overlaps_trained_span(offsets: np.ndarray, lengths: np.ndarray, rendered: list[Rendered]) -> np.ndarray:
    """Per token, whether its character range [start, end) overlaps one of its text's trained spans.

    All texts are laid end to end on one line (a gap of one between them, so no range of one text
    touches another's), spans included. A token overlaps a span iff the last span that starts before
    the token ends also ends after the token starts: the spans of a text are sorted and disjoint
    (``Rendered``), so that span ends furthest of those that start before it.
    """
    text_start = np.concatenate([[0], np.cumsum([len(r.text) + 1 for r in rendered])[:-1]])
    span_counts = [len(r.train_spans) for r in rendered]
    spans = np.array([span for r in rendered for span in r.train_spans], np.int64).reshape(-1, 2)
    spans += np.repeat(text_start, span_counts)[:, None]
    if np.any(spans[1:, 0] < spans[:-1, 1]) or np.any(spans[:, 1] < spans[:, 0]):
        raise ValueError("render() must give each text's trained spans sorted and disjoint")
    tokens = offsets + np.repeat(text_start, lengths)[:, None]
    last = np.searchsorted(spans[:, 0], tokens[:, 1], side="left") - 1
    return (last >= 0) & (spans[np.maximum(last, 0), 1] > tokens[:, 0]) if len(spans) else last >= 0


def pack_examples(examples: Sequence[Example], seq_len: int) -> ExampleTable:
    """Concatenate examples in order and cut the stream into rows of exactly `seq_len` (the last may be
    shorter), so no compute is spent on padding.

    Caveat: attention is not masked at example boundaries, so a token can attend to the previous
    example in its row, and an example can be split across two rows. A row can also end up with no
    trained token (e.g. a long prompt split off from its response).
    """
    table = as_table(examples)
    total = len(table.input_ids)
    starts = np.append(np.arange(0, total, seq_len), total) if total else np.zeros(1)
    return ExampleTable(table.input_ids, table.trained, starts)


def split_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The (train, eval) indices of n items: a seeded random choice of round(fraction * n) for eval.

    At least one goes to eval when fraction > 0 and n >= 2, and at least one always stays in train.
    Both parts keep the original order, so the split does not depend on how examples are later shuffled.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"eval fraction must be in [0, 1), got {fraction}")
    n_eval = round(fraction * n)
    if fraction > 0 and n >= 2:
        n_eval = max(n_eval, 1)
    n_eval = min(n_eval, max(n - 1, 0))
    indices = list(range(n))
    random.Random(seed).shuffle(indices)
    is_eval = np.zeros(n, bool)
    is_eval[indices[:n_eval]] = True
    return np.flatnonzero(~is_eval), np.flatnonzero(is_eval)


def split_eval(examples: Sequence[Example], fraction: float, seed: int) -> tuple[ExampleTable, ExampleTable]:
    """``examples`` split into (train, eval) as ``split_indices`` splits their indices."""
    table = as_table(examples)
    train, evaluation = split_indices(len(table), fraction, seed)
    return table.select(train), table.select(evaluation)


def choose_indices(n: int, limit: int, seed: int) -> np.ndarray:
    """At most ``limit`` of ``range(n)`` (0: all), a seeded random choice kept in order: the same
    seed evaluates on the same examples, in a resumed run too."""
    if limit == 0 or n <= limit:
        return np.arange(n)
    return np.array(sorted(random.Random(seed).sample(range(n), limit)), np.int64)


def choose_eval_examples(examples: Sequence[Example], limit: int, seed: int) -> Sequence[Example]:
    """At most ``limit`` of the evaluation examples, chosen as ``choose_indices`` chooses."""
    if limit == 0 or len(examples) <= limit:
        return examples
    return as_table(examples).select(choose_indices(len(examples), limit, seed))
