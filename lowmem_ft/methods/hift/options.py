"""HiFT's options (torch-free): how the units are grouped, in what order the groups train, and
where the waiting groups' optimizer state lives."""

from __future__ import annotations

from dataclasses import dataclass

from lowmem_ft.choices import ORDERS, STATE_POLICIES
from lowmem_ft.errors import UserError
from lowmem_ft.methods.options import MethodOptions, at_least, one_of, option, stream


@dataclass(frozen=True)
class HiFTOptions(MethodOptions):
    trained_units: str = option(
        "all",
        "all = the embedding and the head train too, in groups of their own (HiFT); layers = decoder "
        "layers only, the embedding and head frozen (BAdam).",
        check=one_of(("all", "layers")),
    )
    units_per_group: int | None = option(
        None,
        "units (embedding, each layer, head) trained together. [default: planner's]",
        check=at_least(1),
        planned=True,
    )
    groups: int | None = option(None, "number of groups (instead of --units-per-group).", check=at_least(1))
    order: str = option(
        "bottom-up",
        "order of the groups: bottom-up, top-down, random (one seeded order) or random-cycle (a new "
        "seeded order every cycle, as BAdam).",
        check=one_of(ORDERS),
    )
    switch_every: int = option(
        1, "optimizer steps per group before switching (BAdam uses 50).", check=at_least(1)
    )
    state_policy: str | None = option(
        None,
        "optimizer state of waiting groups: keep, keep-8bit or drop. [default: planner's]",
        check=one_of(STATE_POLICIES),
        planned=True,
    )
    stream: bool = stream()

    def check(self) -> None:
        if self.units_per_group is not None and self.groups is not None:
            raise UserError("--units-per-group and --groups say the same thing; give one of them")
