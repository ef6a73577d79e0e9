"""Padding examples into tensors, and the resumable stream of optimizer steps the trainer consumes."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from lowmem_ft.data.tokenize import IGNORE_INDEX, Example
from lowmem_ft.errors import UserError


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example. Padding gets attention 0 and label -100, so it never affects loss."""
    length = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example.labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class Batcher:
    """Deterministic, resumable stream of optimizer steps over the training examples.

    Epoch e is a permutation drawn from torch.Generator seeded with seed + e; steps take consecutive
    slices of batch_size examples from the concatenation of epochs (the last slice of an epoch continues
    into the next epoch's permutation), each slice split into micro-batches of micro_batch_size.
    An empty example (a record with nothing to learn, data/lazy.py) is stepped over.

    Because every permutation is a function of (seed, epoch), the state is just two integers, and a
    resumed run sees exactly the batches the interrupted run would have seen.
    """

    def __init__(
        self, examples: list[Example], batch_size: int, micro_batch_size: int, pad_id: int, seed: int,
        rank: int = 0, ranks: int = 1,
    ):  # fmt: skip
        if not examples:
            raise ValueError("Batcher needs at least one example")
        if batch_size < 1 or micro_batch_size < 1:
            raise ValueError(f"batch sizes must be >= 1, got {batch_size} and {micro_batch_size}")
        self.examples = examples
        self.batch_size = batch_size
        self.micro_batch_size = micro_batch_size
        self.pad_id = pad_id
        self.seed = seed
        # With several ranks each takes its slice of every global batch, the same on every rank
        # (same seed): rank r the r-th of ``ranks`` equal slices (batch_size is a multiple of ranks).
        self.rank, self.ranks = rank, ranks
        self.steps_per_epoch = math.ceil(len(examples) / batch_size)
        self.epoch = 0  # the epoch the next example is drawn from
        self.position = 0  # index of the next example in that epoch's permutation
        self._order = self._permutation(0)

    @property
    def examples_seen(self) -> int:
        """Examples handed out so far; divide by len(examples) for the fractional epoch."""
        return self.epoch * len(self.examples) + self.position

    def _permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.examples), generator=generator).tolist()

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        """The micro-batches of one optimizer step: batch_size examples in all."""
        chosen: list[Example] = []
        passed = 0  # empty examples stepped over since the last one taken
        while len(chosen) < self.batch_size:
            if self.position == len(self.examples):
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
            example = self.examples[self._order[self.position]]
            self.position += 1
            if example.input_ids:
                chosen.append(example)
                passed = 0
            elif (passed := passed + 1) > len(self.examples):  # (load_data refuses such data first)
                raise ValueError("Batcher needs at least one example that is not empty")
        share = self.batch_size // self.ranks
        chosen = chosen[self.rank * share : (self.rank + 1) * share]
        return [
            collate(chosen[start : start + self.micro_batch_size], self.pad_id)
            for start in range(0, len(chosen), self.micro_batch_size)
        ]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if not 0 <= state["position"] <= len(self.examples):
            raise UserError(
                f"saved data position {state['position']} does not fit {len(self.examples)} examples; "
                "resume with the same data and settings"
            )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = self._permutation(self.epoch)


def eval_batches(
    examples: list[Example], micro_batch_size: int, pad_id: int
) -> Iterator[dict[str, torch.Tensor]]:
    """The eval examples in order, micro_batch_size at a time."""
    for start in range(0, len(examples), micro_batch_size):
        yield collate(examples[start : start + micro_batch_size], pad_id)
