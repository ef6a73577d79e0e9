"""What the structured methods (BitFit, LoRA, SPAFIT) share to say which whole tensors train: the
Selection, decoder-layer numbering and ranges, and how a selection is described. Each method's own
rule is in its package's plan.py (``select_bitfit``, ``select_lora``, ``select_spafit``).

Shared by the methods (on the model's real parameter names) and the planner (on the names a
Llama-family model would have), as targets.py is for the sparse methods, so a plan counts exactly
what a run trains. No torch import here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lowmem_ft.errors import UserError
from lowmem_ft.targets import DECODER_LAYER


@dataclass(frozen=True)
class Selection:
    terms: tuple[str, ...]  # existing bias and norm parameters that train, by parameter name
    added_biases: tuple[str, ...]  # linear modules that get a zero-initialised bias, which trains
    lora_targets: tuple[str, ...]  # linear modules that get a LoRA adapter
    summary: str  # what trains, in words, for the run header

    def count(self, terms: dict[str, int], linears: dict[str, tuple[int, int]], rank: int) -> int:
        """Trainable values: the terms, the added biases (one per output) and LoRA's A and B."""
        return (
            sum(terms[name] for name in self.terms)
            + sum(linears[name][0] for name in self.added_biases)
            + rank * sum(sum(linears[name]) for name in self.lora_targets)
        )


def layer_index(name: str) -> int | None:
    """The decoder layer a parameter or module belongs to (None: outside the layers)."""
    found = DECODER_LAYER.search(name)
    return int(found.group(1)) if found else None


def parse_layer_ranges(spec: str, n_layers: int) -> set[int]:
    """``0-3,8`` → {0, 1, 2, 3, 8}: decoder layers as numbered in module names (from 0)."""
    chosen: set[int] = set()
    for item in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", item)
        if not match:
            raise UserError(
                f"--freeze-layers {spec!r}: expected layer numbers and ranges such as 0-3,8 "
                f"(layers are numbered 0 to {n_layers - 1})"
            )
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        if first > last:
            raise UserError(
                f"--freeze-layers {spec!r}: {item.strip()} runs backwards; write the lower layer first "
                f"({last}-{first})"
            )
        if last >= n_layers:
            raise UserError(
                f"--freeze-layers {spec!r}: {item.strip()} is not a range within the model's layers "
                f"0-{n_layers - 1}"
            )
        chosen.update(range(first, last + 1))
    return chosen


def check_added_biases(model_type: str) -> None:
    """--add-biases: the result must load, so the model's config must be able to declare them."""
    if model_type != "llama":
        raise UserError(
            "--add-biases needs a model whose config can declare the added biases, so that the result "
            f"loads (llama: attention_bias, mlp_bias); this model is {model_type!r}"
        )


def checked(selection: Selection, method: str) -> Selection:
    """``selection``, unless it trains nothing."""
    if not (selection.terms or selection.added_biases or selection.lora_targets):
        raise UserError(f"--method {method} would train nothing in this model with these options")
    return selection


def in_layers(names, keep) -> list[str]:
    """The names inside decoder layers whose index ``keep`` accepts."""
    return [n for n in names if layer_index(n) is not None and keep(layer_index(n))]


def without_bias(terms: dict[str, int], linears: dict[str, tuple[int, int]]) -> list[str]:
    """The linear layers that have no bias (BitFit and SPAFIT can add one)."""
    return [name for name in linears if f"{name}.bias" not in terms]


def kinds(trained: list[str], added: list[str], first: int = 0, end: int | None = None) -> str:
    """ "norm weights", "biases + norm weights + added biases", ... of the names in layers [first, end)."""

    def within(name: str) -> bool:
        i = layer_index(name)
        return end is None or (i is not None and first <= i < end)

    biases = any(n.endswith(".bias") and within(n) for n in trained)
    norms = any(not n.endswith(".bias") and within(n) for n in trained)
    kinds = (
        ["biases"] * biases
        + ["norm weights"] * norms
        + ["added zero-initialised biases"] * any(within(n) for n in added)
    )
    return " + ".join(kinds) or "nothing"


def layer_ranges(layers: set[int]) -> str:
    """{0, 1, 2, 5} → "layers 0-2, 5"."""
    spans, run = [], []
    for i in sorted(layers):
        if run and i != run[-1] + 1:
            spans.append(run)
            run = []
        run.append(i)
    if run:
        spans.append(run)
    text = ", ".join(str(s[0]) if len(s) == 1 else f"{s[0]}-{s[-1]}" for s in spans)
    return ("layer " if len(layers) == 1 else "layers ") + text if layers else "no layers"
