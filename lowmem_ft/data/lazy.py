"""The training examples of a large data set, encoded while the run trains.

Encoding a million records takes minutes on a small machine (docs/benchmarks.md), and a GPU step
reads a few dozen records. So a large data set is rendered and checked before the first step
(``tokenize.render_records``: a bad record still stops the run before it starts), and its token ids
are made by a background thread, in record order, a chunk at a time; a record the run asks for
before the thread reaches it is encoded at once, in the asking thread. Either way record i gives
the same example (a fast tokenizer encodes each text on its own), so the run trains on exactly what
it would have trained on had everything been encoded first.

Record i's example is empty when nothing is left to learn after truncation: ``Batcher`` steps over
it. Until the last chunk is encoded nobody knows how many there are, which is why positions are
records, not examples.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from lowmem_ft.data.bulk import cycle_collector_paused, progress_bar
from lowmem_ft.data.formats import Rendered
from lowmem_ft.data.tokenize import Example, ExampleTable, TokenStats, encode_chunk

# Records encoded at a time, by the thread or for a record asked for early. The thread holds the
# tokenizer (not safe to call from two threads at once) for one chunk: about 40,000 tokens, some
# 40 ms on 2 cores, the longest a training step can wait for it.
CHUNK = 256


class LazyExamples(Sequence):
    """Record i's example (``Example``; empty if it has nothing to learn) for ``len(self)`` records,
    encoded on first use or ahead of it by ``start()``'s thread. ``stats`` is complete once ``done``."""

    def __init__(self, rendered: list[Rendered], tokenizer, seq_len: int):
        self._rendered: list[Rendered] | None = rendered  # freed once every chunk is encoded
        self._tokenizer, self._seq_len = tokenizer, seq_len
        self._size = len(rendered)
        self._chunk = CHUNK  # records per entry of _chunks
        self._chunks: list[ExampleTable | None] = [None] * -(-self._size // CHUNK)
        self._left = len(self._chunks)
        self._lock = threading.Lock()  # one caller of the tokenizer at a time; guards the counts
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
        table = self._chunks[chunk]  # (one read: the thread only ever fills an entry in)
        return (table if table is not None else self._encode(chunk))[offset]

    @property
    def done(self) -> bool:
        if self._failed is not None:
            raise self._failed
        return self._left == 0

    def start(self) -> None:
        """Encode every record in a background thread, in order."""
        if self._left and self._thread is None:
            self._thread = threading.Thread(target=self._encode_all, name="lowmem-ft encoding", daemon=True)
            self._thread.start()

    @property
    def encoded_in_background(self) -> bool:
        return self._thread is not None

    def encode_all(self, show_progress: bool = False) -> None:
        """Encode every record now, in this thread (with the background thread, if it runs), with
        a progress bar unless ``show_progress`` is False."""
        bar = progress_bar(self._size, "tokenising", "records", show_progress)
        with bar, cycle_collector_paused():  # (not in the thread: the collector is the process's)
            for chunk in range(len(self._chunks)):
                if self._chunks[chunk] is None:
                    self._encode(chunk)
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
        return self._chunks[0] if len(self._chunks) == 1 else ExampleTable.concat(list(self._chunks))

    def _encode_all(self) -> None:
        try:
            for chunk in range(len(self._chunks)):
                if self._stop.is_set():
                    return
                if self._chunks[chunk] is None:
                    self._encode(chunk)
        except BaseException as exc:  # said by the training thread, the next time it asks (``done``)
            self._failed = exc

    def _encode(self, chunk: int) -> ExampleTable:
        with self._lock:
            if self._chunks[chunk] is None:
                start = chunk * self._chunk
                rendered = self._rendered[start : start + self._chunk]
                table = encode_chunk(rendered, self._tokenizer, self._seq_len, self.stats, keep_dropped=True)
                self._chunks[chunk] = table
                self._left -= 1
                if not self._left:
                    self._rendered = None  # the texts are no longer needed: gigabytes for a million
            return self._chunks[chunk]
