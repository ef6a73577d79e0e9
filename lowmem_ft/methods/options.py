"""A method's own options: a frozen dataclass per method (its package's options.py), each field
declared once with its default, its help and its check. Torch-free: `lowmem-ft --help`, `plan` and
the option checks read them without importing a method.

The command line has one flag per option name across all methods (``--targets`` means the same for
SIFT and LoRA), so an option several methods take is declared once here, by a function each
method's options class calls, and differs between them only where the method restricts it (LoRA's
``--base-quant`` takes none or nf4). tests/test_cli.py checks that every method declares a shared
name with the same default and help.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lowmem_ft.choices import BASE_QUANTS, flag
from lowmem_ft.errors import UserError

Check = Callable[[Any], str | None]  # the option's value -> what is wrong with it, or None


def option(
    default: Any,
    help: str,
    *,
    check: Check | None = None,
    planned: bool = False,
    kept: bool = False,
    flags: tuple[str, ...] = (),
) -> Any:
    """One option of a method.

    ``help``: for `--help` (the methods that take it are named in front of it); ``check``: says what
    is wrong with a value the user gave (None is never checked: it means "the planner chooses");
    ``planned``: the planner fills it in when the user leaves it open (None), and a resumed job keeps
    the first machine's choice, because it decides what trains; ``kept``: a resumed job keeps it too
    although the planner does not choose it; ``flags``: typer's flag spelling when not the default
    ``--name`` (a boolean ``--stream`` rather than ``--stream/--no-stream``).
    """
    meta = {"help": help, "check": check, "planned": planned, "kept": planned or kept, "flags": flags}
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class MethodOptions:
    """A method with no options of its own (full fine-tuning)."""

    def validate(self) -> None:
        """Each option's own check, then the checks that relate several of them (``check``)."""
        for field in dataclasses.fields(self):
            value, check = getattr(self, field.name), field.metadata.get("check")
            if value is not None and check is not None and (problem := check(value)):
                raise UserError(f"{flag(field.name)} {problem}")
        self.check()

    def check(self) -> None:
        """Checks across this method's options; raise UserError with the flags named."""

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(field.name for field in dataclasses.fields(cls))

    @classmethod
    def from_values(cls, values: dict) -> MethodOptions:
        """This method's options out of a flat dict of option values (the others are ignored)."""
        return cls(**{name: values[name] for name in cls.names() if name in values})


# -- checks -------------------------------------------------------------------------------------
def at_least(low: float) -> Check:
    return lambda value: None if value >= low else f"must be at least {low}, got {value}"


def one_of(choices: tuple[str, ...]) -> Check:
    return lambda value: None if value in choices else f"must be one of {', '.join(choices)}, got {value!r}"


def within(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Check:
    """low <= value <= high, either end open."""
    left, right = "(" if low_open else "[", ")" if high_open else "]"

    def check(value) -> str | None:
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        return None if above and below else f"must be in {left}{low}, {high}{right}, got {value}"

    return check


def _targets_problem(spec: str) -> str | None:
    from lowmem_ft.targets import parse_targets

    parse_targets(spec)  # raises UserError with the flag named
    return None


# -- options several methods take: declared here once ----------------------------------------------
def targets() -> Any:
    return option(
        "all-linear",
        "which linear layers: all-linear, attention, mlp, or module names/patterns such as q_proj,v_proj.",
        check=_targets_problem,
    )


def base_quant(check: Check = one_of(BASE_QUANTS)) -> Any:
    return option(
        None,
        "the frozen base weights as none, int8 or nf4 (bitsandbytes); LoRA: none or nf4 (QLoRA). "
        "[default: the planner's]",
        check=check,
        planned=True,
    )


def stream() -> Any:
    return option(
        False,
        "keep every decoder layer's frozen weights in host memory and stream them in to compute "
        "(the smallest GPU footprint). [default: the planner streams what does not fit]",
        kept=True,  # what lives where is the job's: a resumed job streams as it did
        flags=("--stream",),
    )


def lora_rank() -> Any:
    return option(8, "rank r of the adapters.", check=at_least(1))


def lora_alpha() -> Any:
    return option(
        None,
        "scale α (the update is α/r·BA). [default: 2 × rank]",
        check=lambda value: None if value > 0 else f"must be positive, got {value}",
    )


def lora_dropout() -> Any:
    return option(0.0, "dropout on the adapters' input.", check=within(0, 1, high_open=True))


def add_biases() -> Any:
    return option(
        False,
        "add zero-initialised biases to the decoder's linear layers and train them (Llama has none).",
        flags=("--add-biases",),
    )


def freeze_layers() -> Any:
    return option(None, "decoder layers that stay frozen, numbered from 0, e.g. 0-15 or 0-3,8.")
