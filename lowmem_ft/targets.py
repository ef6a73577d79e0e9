"""Which linear weights a sparse method trains (``--targets``), by module name.

Shared by the methods (on real module names) and the planner (on the names a Llama-family model
would have), so a plan counts exactly the weights a run trains. No torch import here.

    all-linear   every linear layer inside a decoder layer (the default; SIFT's choice for Llama)
    attention    q, k, v and o projections of every decoder layer
    mlp          gate, up and down projections of every decoder layer
    PATTERNS     comma-separated module names or glob patterns, matched against the full name or
                 its ending: ``q_proj,v_proj``, ``layers.1*.mlp.*``, ``lm_head``; may be mixed with
                 the keywords above (``attention,lm_head``)
"""

from __future__ import annotations

import re
from fnmatch import fnmatchcase

from lowmem_ft.errors import UserError

KEYWORDS = ("all-linear", "attention", "mlp")
_IN_DECODER_LAYER = re.compile(r"(^|\.)layers\.\d+\.")


def _keyword_matches(keyword: str, name: str) -> bool:
    if not _IN_DECODER_LAYER.search(name):
        return False
    if keyword == "attention":
        return ".self_attn." in name or ".attention." in name
    if keyword == "mlp":
        return ".mlp." in name
    return True  # all-linear


def _pattern_matches(pattern: str, name: str) -> bool:
    return fnmatchcase(name, pattern) or fnmatchcase(name, "*." + pattern)


def parse_targets(spec: str) -> list[str]:
    items = [item.strip() for item in spec.split(",")]
    if not spec.strip() or not all(items):
        raise UserError(
            f"--targets {spec!r} is empty or has an empty item; use all-linear, attention, mlp "
            "or comma-separated module names such as q_proj,v_proj"
        )
    return items


def match_targets(
    linear_names: list[str], spec: str, other_names: list[str] = (), tied_names: list[str] = ()
) -> list[str]:
    """The linear layers ``spec`` selects, in model order.

    Every item must select something: a typo would otherwise silently train less than asked.
    ``other_names`` are the model's non-linear modules, to explain a pattern that names one;
    ``tied_names`` linear layers whose weight is the input embedding's (a tied LM head), which
    cannot take an increment of their own.
    """
    chosen: set[str] = set()
    for item in parse_targets(spec):
        if item in KEYWORDS:
            found = {n for n in linear_names if _keyword_matches(item, n)}
        else:
            found = {n for n in linear_names if _pattern_matches(item, n)}
        tied = [n for n in tied_names if _pattern_matches(item, n)]
        if tied:
            raise UserError(
                f"--targets {item!r} names {tied[0]}, which shares its weight with the input embedding "
                "in this model (tie_word_embeddings); leave it out"
            )
        if not found:
            others = [n for n in other_names if _pattern_matches(item, n)]
            if others:
                raise UserError(
                    f"--targets {item!r} names {others[0]}, which is not a linear layer; "
                    "sparse methods train linear weights"
                )
            example = ", ".join(n.rsplit(".", 1)[-1] for n in _first_layer(linear_names)) or "none"
            raise UserError(
                f"--targets {item!r} matches no linear layer of this model; "
                f"its layers have: {example} (or use all-linear, attention, mlp)"
            )
        chosen |= found
    return [n for n in linear_names if n in chosen]


def _first_layer(names: list[str]) -> list[str]:
    first = [n for n in names if re.search(r"(^|\.)layers\.0\.", n)]
    return first or names[:7]
