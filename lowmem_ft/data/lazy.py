"""The training examples of a large data set, encoded while the run trains.

Encoding a million records takes minutes on a small machine (docs/benchmarks.md), and a GPU step
reads a few dozen records. So a large data set is rendered and checked before the first step
(``tokenize.render_records``: a bad record still stops the run before it starts), and its token ids
are made by a background thread, in record order, a chunk at a time; a record the run asks for
before the thread reaches it is encoded at once, on its own, in the asking thread. Either way record i gives
the same example (a fast tokenizer encodes each text on its own), so the run trains on exactly what
it would have trained on had everything been encoded first.

Record i's example is empty when nothing is left to learn after truncation: ``Batcher`` steps over
it. Until the last chunk is encoded nobody knows how many there are, which is why positions are
records, not examples.
"""

from __future__ import annotations

import copy
import gc
import threading
from collections.abc import Sequence

from lowmem_ft.data.bulk import cycle_collector_paused, progress_bar
from lowmem_ft.data.formats import Rendered
from lowmem_ft.data.tokenize import CHUNK, Example, ExampleTable, TokenStats, encode_chunk


class LazyExamples(Sequence):
    """Record i's example (``Example``; empty if it has nothing to learn) for ``len(self)`` records,
    encoded on first use or ahead of it by ``start()``'s thread. ``stats`` is complete once ``done``.

    The thread encodes ``tokenize.CHUNK`` records at a time with a copy of the tokenizer of its own
    (a tokenizer is not safe to call from two threads at once), so a record asked for early is
    encoded on its own with the caller's tokenizer, without waiting for the thread's chunk; the
    thread encodes it again in its turn (and counts it then, once).
    """

    def __init__(self, rendered: list[Rendered], tokenizer, seq_len: int):
        self._rendered: list[Rendered] | None = rendered  # freed once every chunk is encoded
        self._tokenizer, self._seq_len = tokenizer, seq_len
        self._size = len(rendered)
        self._chunk = CHUNK  # records per entry of _chunks
        self._chunks: list[ExampleTable | None] = [None] * -(-self._size // CHUNK)
        self._left = len(self._chunks)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failed: BaseException | None = None
        self.stats = TokenStats()

    @classmethod
    def encoded(cls, table: ExampleTable, stats: TokenStats) -> LazyExamples:
        """Examples encoded already (kept in the job, or packed rows): nothing left to do."""
        examples = cls([], None, 0)
        examples._size, examples._chunks, examples._left, examples.stats = len(table), [table], 0, stats
        examples._chunk = len(table)
        return examples

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, index: int) -> Example:
        if not 0 <= index < self._size:
            raise IndexError(f"record {index} of {self._size}")
        chunk, offset = divmod(index, self._chunk)
        # (Reads of a list entry and an attribute are atomic. The thread fills an entry in before
        # it drops the texts, so texts that are gone mean the entry is there.)
        table, rendered = self._chunks[chunk], self._rendered
        if table is None and rendered is not None:
            return encode_chunk([rendered[index]], self._tokenizer, self._seq_len, TokenStats(), True)[0]
        return (table if table is not None else self._chunks[chunk])[offset]

    @property
    def done(self) -> bool:
        if self._failed is not None:  # (a tokenizer's panic is a BaseException: a plain error here)
            raise RuntimeError(f"encoding the training records failed: {self._failed!r}") from self._failed
        return self._left == 0

    @property
    def encoded_in_background(self) -> bool:
        return self._thread is not None

    def any_example(self) -> bool:
        """Whether any record has something to learn. Before ``start()``: chunks are encoded here, in
        order, until one has (the thread does not encode them again), so a data set that --seq-len
        empties says so after one batched call a chunk, not one call a record."""
        for chunk in range(len(self._chunks)):
            if self._chunks[chunk] is None:
                self._encode(chunk, self._tokenizer)
            if self._chunks[chunk].lengths().any():
                return True
        return False

    def start(self) -> None:
        """Encode every record in a background thread, in order."""
        if self._left and self._thread is None:
            tokenizer = copy.deepcopy(self._tokenizer)  # the thread's own
            # Python's cycle collector walks every object it tracks in each full collection, and the
            # thread's encoding makes them often: with 300,000 records' texts and spans alive, the
            # encoding took 102 s against 89 s. Those live until they are all encoded, so they are
            # left out of collections until then (gc.freeze; objects made later are collected as
            # usual, and a frozen one whose last reference goes is freed as usual).
            gc.freeze()
            self._thread = threading.Thread(
                target=self._encode_all, args=(tokenizer,), name="lowmem-ft encoding", daemon=True
            )
            self._thread.start()

    def encode_all(self, show_progress: bool = False) -> None:
        """Encode every record now, in this thread (after the background thread, if one runs),
        with a progress bar unless ``show_progress`` is False."""
        if self._thread is not None:
            self._thread.join()
        bar = progress_bar(self._size, "tokenising", "records", show_progress)
        with bar, cycle_collector_paused():  # (not in the thread: the collector is the process's)
            for chunk in range(len(self._chunks)):
                if self._chunks[chunk] is None:
                    self._encode(chunk, self._tokenizer)
                bar.update(min(self._chunk, self._size - chunk * self._chunk))

    def close(self) -> None:
        """Stop the background thread after its current chunk (the run ends or stops)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def table(self, show_progress: bool = False) -> ExampleTable:
        """Every record's example in one table (empty ones included), encoded now if need be."""
        if self._left:
            self.encode_all(show_progress)
        if len(self._chunks) != 1:  # one table from now on, each chunk freed as it is copied into it
            parts, self._chunks = self._chunks, [None]  # (concat empties parts: no other reference)
            self._chunks, self._chunk = [ExampleTable.concat(parts)], max(self._size, 1)
        return self._chunks[0]

    def _encode_all(self, tokenizer) -> None:
        try:
            for chunk in range(len(self._chunks)):
                if self._stop.is_set():
                    return
                if self._chunks[chunk] is None:
                    self._encode(chunk, tokenizer)
        except BaseException as exc:  # said by the training thread, the next time it asks (``done``)
            self._failed = exc
        finally:
            gc.unfreeze()

    def _encode(self, chunk: int, tokenizer) -> None:
        """Fill chunk ``chunk`` in: one thread at a time (the background thread, or ``encode_all``
        once it has ended)."""
        start = chunk * self._chunk
        rendered = self._rendered[start : start + self._chunk]
        self._chunks[chunk] = encode_chunk(rendered, tokenizer, self._seq_len, self.stats, keep_dropped=True)
        self._left -= 1
        if not self._left:
            self._rendered = None  # the texts are no longer needed: gigabytes for a million
