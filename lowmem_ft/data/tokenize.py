"""Turn records into token ids with loss labels; pack them into rows; split off an eval set."""

from __future__ import annotations

import random
from dataclasses import dataclass

from lowmem_ft.data.formats import render
from lowmem_ft.data.records import Record
from lowmem_ft.errors import DataError

IGNORE_INDEX = -100  # the label PyTorch's cross-entropy (and Hugging Face models) skip


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


def tokenize_records(
    records: list[Record], fmt: str, tokenizer, seq_len: int
) -> tuple[list[Example], TokenStats]:
    """Render, tokenize and label each record; truncate to `seq_len`; drop examples with nothing to learn.

    A token carries loss iff its character span overlaps a span the format marks as trained (the
    response). BOS is prepended untrained unless the rendered text already starts with it (chat
    templates often write it); EOS is appended, and trained iff the last content token is trained, so
    the model learns to stop after a response. It is not appended when the text already ends with it.
    """
    stats = TokenStats()
    if not records:
        return [], stats
    rendered = []
    for record in records:
        try:
            rendered.append(render(record.data, fmt, tokenizer))
        except DataError as error:  # raised without a location by the chat-template path
            raise DataError(f"{record.location}: {error}") from None
    # One batched call: fast tokenizers encode a list in parallel, far quicker than one call per text.
    encodings = tokenizer([r.text for r in rendered], add_special_tokens=False, return_offsets_mapping=True)

    examples: list[Example] = []
    for i, item in enumerate(rendered):
        input_ids = list(encodings["input_ids"][i])
        labels = [
            token if _overlaps(offset, item.train_spans) else IGNORE_INDEX
            for token, offset in zip(input_ids, encodings["offset_mapping"][i], strict=True)
        ]
        if tokenizer.bos_token_id is not None and not item.text.startswith(tokenizer.bos_token):
            input_ids.insert(0, tokenizer.bos_token_id)
            labels.insert(0, IGNORE_INDEX)
        if tokenizer.eos_token_id is not None and not item.text.endswith(tokenizer.eos_token):
            last_trained = bool(labels) and labels[-1] != IGNORE_INDEX
            input_ids.append(tokenizer.eos_token_id)
            labels.append(tokenizer.eos_token_id if last_trained else IGNORE_INDEX)

        truncated = len(input_ids) > seq_len
        input_ids, labels = input_ids[:seq_len], labels[:seq_len]
        target_tokens = sum(label != IGNORE_INDEX for label in labels)
        if target_tokens == 0:
            stats.dropped_no_target += 1
            continue
        examples.append(Example(input_ids, labels))
        stats.examples += 1
        stats.truncated += truncated
        stats.tokens += len(input_ids)
        stats.target_tokens += target_tokens
    return examples, stats


def _overlaps(offset: tuple[int, int], spans: tuple[tuple[int, int], ...]) -> bool:
    start, end = offset
    return any(start < span_end and end > span_start for span_start, span_end in spans)


def pack_examples(examples: list[Example], seq_len: int) -> list[Example]:
    """Concatenate examples in order and cut the stream into rows of exactly `seq_len` (the last may be
    shorter), so no compute is spent on padding.

    Caveat: attention is not masked at example boundaries, so a token can attend to the previous
    example in its row, and an example can be split across two rows. A row can also end up with no
    trained token (e.g. a long prompt split off from its response).
    """
    input_ids = [token for example in examples for token in example.input_ids]
    labels = [label for example in examples for label in example.labels]
    return [
        Example(input_ids[start : start + seq_len], labels[start : start + seq_len])
        for start in range(0, len(input_ids), seq_len)
    ]


def split_eval(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Split into (train, eval) with a seeded random choice of round(fraction * n) eval examples.

    At least one goes to eval when fraction > 0 and n >= 2, and at least one always stays in train.
    Both parts keep the original order, so the split does not depend on how examples are later shuffled.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"eval fraction must be in [0, 1), got {fraction}")
    n = len(examples)
    n_eval = round(fraction * n)
    if fraction > 0 and n >= 2:
        n_eval = max(n_eval, 1)
    n_eval = min(n_eval, max(n - 1, 0))
    indices = list(range(n))
    random.Random(seed).shuffle(indices)
    eval_indices = set(indices[:n_eval])
    train = [example for i, example in enumerate(examples) if i not in eval_indices]
    evaluation = [example for i, example in enumerate(examples) if i in eval_indices]
    return train, evaluation
