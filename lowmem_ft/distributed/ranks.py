"""Which rank this process is, from the environment torchrun's agent sets (torch-free)."""

from __future__ import annotations

import os
from dataclasses import dataclass

# Methods that run on several ranks, and how: what the other methods would need is not built yet.
DISTRIBUTED_METHODS = {
    "full": "FSDP2: weights, gradients and optimizer state sharded",
    "hift": "FSDP2 as full; one group trains per step, the others' state waits sharded in host memory",
    "lora": "data-parallel",
    "sift": "data-parallel (each rank scores its share of the selection window, the scores summed)",
    "random": "data-parallel",
    "magnitude": "data-parallel",
    "bitfit": "data-parallel",
    "spafit": "data-parallel",
}


# Of those, the methods whose model FSDP2 shards (the others hold it whole on every rank).
SHARDED_METHODS = ("full", "hift")


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1  # the ranks on this rank's node

    @classmethod
    def from_env(cls) -> Ranks:
        """This process's place among the ranks torchrun started (one rank when not started so)."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls()
        return cls(
            int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")),
            int(os.environ.get("LOCAL_WORLD_SIZE", str(size))),
        )  # fmt: skip

    @property
    def main(self) -> bool:
        """Rank 0: it writes the job and prints."""
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.size > 1


def nproc_problem(
    nproc: int,
    method: str,
    streams: bool,
    batch_size: int,
    gpus: int | None,
    state_policy: str | None = None,
    micro_batch_size: int | None = None,
) -> str | None:
    """What is wrong with running ``nproc`` ranks, in one line, or None. ``gpus``: GPUs on this
    machine when the run is on GPUs (None: the ranks run on CPU, with gloo)."""
    if nproc < 1:
        return f"--nproc must be at least 1, got {nproc}"
    if nproc == 1:
        return None
    if method not in DISTRIBUTED_METHODS:
        return (
            f"--method {method} runs on one process only so far; --nproc {nproc} takes --method "
            f"{' or '.join(DISTRIBUTED_METHODS)} (docs/distributed.md)"
        )
    if state_policy == "keep-8bit":
        return (
            f"--nproc {nproc} cannot keep HiFT's waiting state in 8 bits (its blocks do not reshard); "
            "give --state-policy keep or drop"
        )
    if streams:
        return f"--nproc {nproc} cannot stream layers from host memory; drop --stream"
    if batch_size % nproc:
        return (
            f"--batch-size {batch_size} does not split evenly over {nproc} ranks; give a multiple of {nproc}"
        )
    share = batch_size // nproc
    if micro_batch_size is not None and micro_batch_size > share:
        # each rank cuts only its share of the batch into micro-batches: a larger one is never run,
        # and the plan would count activations for sequences no rank holds
        return (
            f"--micro-batch-size {micro_batch_size} is more than each rank's share of the batch "
            f"(--batch-size {batch_size} over {nproc} ranks: {share}); "
            f"give --micro-batch-size {share} or less"
        )
    if gpus is not None and nproc > gpus:
        return f"--nproc {nproc} asks for more ranks than this machine has GPUs ({gpus}); give --nproc {gpus}"
    return None
