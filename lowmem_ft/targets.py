"""Which linear weights a sparse method trains (``--targets``), by module name.

Shared by the methods (on real module names) and the planner (on the names a Llama-family model
would have), so a plan counts exactly the weights a run trains. No torch import here.

    all-linear   every linear layer inside a decoder layer (the default; SIFT's choice for Llama)
    attention    the attention block's linear layers in every decoder layer (q, k, v, o in Llama)
    mlp          the rest of every decoder layer's (gate, up, down in Llama; fc1, fc2 in OPT)
    PATTERNS     comma-separated module names or glob patterns, matched against the full name or
                 its ending: ``q_proj,v_proj``, ``layers.1*.mlp.*``, ``lm_head``; may be mixed with
                 the keywords above (``attention,lm_head``)
"""

from __future__ import annotations

import re
from fnmatch import fnmatchcase

from lowmem_ft.errors import UserError

KEYWORDS = ("all-linear", "attention", "mlp")
# A module inside decoder layer N, whatever the architecture calls the list: model.layers.N
# (Llama, Qwen, Mistral, Gemma, Phi-3), gpt_neox.layers.N, model.decoder.layers.N (OPT),
# transformer.h.N (GPT-2).
DECODER_LAYER = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")
# The attention block of a decoder layer: self_attn (Llama, OPT, ...), attention (GPT-NeoX), attn (GPT-2)
_ATTENTION = re.compile(r"\.(?:self_attn|attention|attn)\.")


def _keyword_matches(keyword: str, name: str) -> bool:
    if not DECODER_LAYER.search(name):
        return False
    if keyword == "attention":
        return _ATTENTION.search(name) is not None
    if keyword == "mlp":  # the rest of the layer: mlp.* in most models, fc1 and fc2 in OPT
        return _ATTENTION.search(name) is None
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
    first = [n for n in names if (m := DECODER_LAYER.search(n)) and m.group(1) == "0"]
    return first or names[:7]
