"""Which whole tensors a structured method trains: bias and norm terms, LoRA adapters, layer ranges.

    bitfit    the bias terms (BitFit). Llama-family models have no biases, so their norm weights
              train, and with ``--add-biases`` zero-initialised biases on every linear layer too
    lora      a LoRA adapter on each ``--targets`` linear layer
    spafit    by depth, with cut-offs N1 < N2 (SPAFIT): layers [0, N1) frozen, [N1, N2) their bias
              and norm terms only, [N2, L) LoRA on the attention projections (variant II: and
              their bias and norm terms)

``--freeze-layers`` (bitfit, lora) leaves ranges of decoder layers out altogether.

Shared by the methods (on the model's real parameter names) and the planner (on the names a
Llama-family model would have), as targets.py is for the sparse methods, so a plan counts exactly
what a run trains. No torch import here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lowmem_ft.choices import ADD_BIASES_METHODS
from lowmem_ft.errors import UserError
from lowmem_ft.targets import match_targets

# SPAFIT's cut-offs on BERT-large (24 layers) were 4 and 9; other depths keep the proportions.
PAPER_CUTOFFS, PAPER_LAYERS = (4, 9), 24
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


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
    found = _LAYER.search(name)
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
        if first > last or last >= n_layers:
            raise UserError(
                f"--freeze-layers {spec!r}: {item.strip()} is not a range within the model's layers "
                f"0-{n_layers - 1}"
            )
        chosen.update(range(first, last + 1))
    return chosen


def spafit_cutoffs(spec: str | None, n_layers: int) -> tuple[int, int]:
    """N1, N2 from ``--cutoffs N1,N2``, or the paper's 4 and 9 of 24 layers scaled to this depth."""
    if spec is None:
        return tuple(round(c * n_layers / PAPER_LAYERS) for c in PAPER_CUTOFFS)
    match = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*", spec)
    if not match or not int(match.group(1)) <= int(match.group(2)) < n_layers:
        raise UserError(
            f"--cutoffs {spec!r}: expected N1,N2 with 0 <= N1 <= N2 < {n_layers} (the model's layers): "
            f"layers below N1 frozen, N1 to N2-1 bias/norm only, N2 and above LoRA"
        )
    return int(match.group(1)), int(match.group(2))


def select(
    method: str,
    terms: dict[str, int],
    linears: dict[str, tuple[int, int]],
    n_layers: int,
    *,
    targets: str = "all-linear",
    freeze_layers: str | None = None,
    cutoffs: str | None = None,
    variant: str = "I",
    add_biases: bool = False,
    model_type: str = "llama",
) -> Selection:
    """What ``method`` trains in a model with these ``terms`` ({name: numel} of its bias and norm
    weights) and ``linears`` ({module name: (out, in)} of the linear layers of its decoder layers)."""
    if add_biases and method in ADD_BIASES_METHODS and model_type != "llama":
        raise UserError(
            "--add-biases needs a model whose config can declare the added biases, so that the result "
            f"loads (llama: attention_bias, mlp_bias); this model is {model_type!r}"
        )
    frozen = parse_layer_ranges(freeze_layers, n_layers) if freeze_layers else set()
    in_layers = lambda names, keep: [n for n in names if layer_index(n) is not None and keep(layer_index(n))]  # noqa: E731
    without_bias = [name for name in linears if f"{name}.bias" not in terms]

    if method == "bitfit":
        trained = [n for n in terms if layer_index(n) not in frozen]  # the final norm (layer None) too
        added = in_layers(without_bias, lambda i: i not in frozen) if add_biases else []
        kinds = _kinds(trained, added)
        where = f" in {_ranges(set(range(n_layers)) - frozen)} and the final norm" if frozen else ""
        selection = Selection(tuple(trained), tuple(added), (), f"{kinds}{where}")
    elif method == "lora":
        chosen = [n for n in match_targets(list(linears), targets) if layer_index(n) not in frozen]
        where = f" in {_ranges(set(range(n_layers)) - frozen)}" if frozen else ""
        summary = f"LoRA on {len(chosen)} linear layers ({targets}){where}"
        selection = Selection((), (), tuple(chosen), summary)
    elif method == "spafit":
        n1, n2 = spafit_cutoffs(cutoffs, n_layers)
        terms_from = n1 if variant == "II" else None  # variant I: terms only in [N1, N2)
        keep_terms = lambda i: n1 <= i < n2 or (terms_from is not None and i >= n2)  # noqa: E731
        trained = in_layers(terms, keep_terms)
        added = in_layers(without_bias, keep_terms) if add_biases else []
        attention = match_targets(list(linears), "attention")
        chosen = in_layers(attention, lambda i: i >= n2)
        summary = (
            (f"{_ranges(set(range(n1)))} frozen, " if n1 else "")
            + (f"{_ranges(set(range(n1, n2)))}: {_kinds(trained, added, n1, n2)}, " if n2 > n1 else "")
            + f"{_ranges(set(range(n2, n_layers)))}: LoRA on attention"
            + (f" + {_kinds(trained, added, n2, n_layers)}" if variant == "II" else "")
            + f" (SPAFIT-{n1}-{n2}-{variant})"
        )
        selection = Selection(tuple(trained), tuple(added), tuple(chosen), summary)
    else:
        raise ValueError(f"not a structured method: {method}")
    if not (selection.terms or selection.added_biases or selection.lora_targets):
        raise UserError(f"--method {method} would train nothing in this model with these options")
    return selection


def _kinds(trained: list[str], added: list[str], first: int = 0, end: int | None = None) -> str:
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


def _ranges(layers: set[int]) -> str:
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
