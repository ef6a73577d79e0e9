"""What one decoder layer keeps from its forward for its backward, per token, per architecture.

Measured exactly (every coefficient) on fake tensors of the recipe's own forward, layer by layer, at
several widths, depths and sequence lengths; planner/accounting.py turns these into a step's bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lowmem_ft.planner.shapes import ModelShape

if TYPE_CHECKING:  # (accounting.py imports this module)
    from lowmem_ft.planner.accounting import Precision


@dataclass(frozen=True)
class LayerKeeps:
    """Bytes per token that one decoder layer keeps from its forward for its backward."""

    trained: int  # its weights train (full fine-tuning, HiFT's active group)
    frozen: int  # frozen on the gradient path (HiFT, above the active group): its input's gradient
    sparse: int  # frozen with sparse increments (SIFT): frozen, plus its linear layers' inputs
    first: int  # what the first layer keeps less as a sparse one: nothing below it needs a gradient


# Per architecture, what a decoder layer keeps: measured exactly (every coefficient) on fake tensors
# of the recipe's own forward, layer by layer, at several widths, depths and sequence lengths; the
# whole step is checked against traces in tests/test_planner.py and tests/test_shapes_architectures.py.
# ``e`` is the compute element size; "autocast" is fp32 weights computed in 16 bits, where norms and
# softmax run in fp32 and the 16-bit weight copies are counted apart (autocast_copy_bytes). The
# frozen and sparse cases hold weights in the compute precision, never under autocast.


def _llama_keeps(h: int, q: int, i: int, a: int, s: int, e: int, autocast: bool) -> LayerKeeps:
    """Llama, Mistral, Qwen2/3: each RMSNorm keeps its fp32 input and its normalised output; q,
    rotate-half(q), k, v and the attention output; gate, SiLU(gate), up and their product; the
    attention's fp32 log-sum-exp; a copy of the causal mask row. Frozen, the linear layers' inputs
    go (the norms' outputs, the MLP's product) and the norms keep their fp32 inputs only."""
    trained = (
        34 * h + 8 * i + 4 * a + 2 * s + 8
        if autocast
        else 2 * (4 * h + e * h) + 6 * e * h + 4 * e * i + 4 * a + e * s + 8
    )
    frozen = 8 * h + 4 * e * h + 3 * e * i + 4 * a + e * s + 8
    return LayerKeeps(trained, frozen, sparse=frozen + e * (2 * h + i), first=4 * h)


def _phi3_keeps(h: int, q: int, i: int, a: int, s: int, e: int, autocast: bool) -> LayerKeeps:
    """Phi-3: Llama's, but v is a view of the fused q/k/v output, which SDPA then keeps whole (with
    fewer key/value heads than query heads v is a copy, and this is 2·e·h high), and gate and up
    are the halves of one output."""
    llama = _llama_keeps(h, q, i, a, s, e, autocast)
    return LayerKeeps(
        trained=llama.trained + (0 if autocast else 3 * e * h),
        frozen=llama.frozen + 2 * e * h,
        sparse=llama.sparse + 3 * e * h,
        first=llama.first,
    )


def _gemma2_keeps(h: int, q: int, i: int, a: int, s: int, e: int, autocast: bool) -> LayerKeeps:
    """Gemma-2: four RMSNorms (before and after attention and MLP) that compute in fp32 throughout,
    and eager attention (transformers has no SDPA path for its logit soft-capping): each head's
    scores, their fp32 softmax and its 16-bit copy, 8 bytes per position pair, instead of a log-sum-
    exp. q is heads × head_dim wide, not h."""
    trained = (
        42 * h + 8 * q + 8 * i + 8 * a * s + 16
        if autocast
        else (32 + 2 * e) * h + 4 * e * q + 4 * e * i + 8 * a * s + 16
    )
    frozen = 16 * h + 3 * e * q + 3 * e * i + 8 * a * s + 16
    sparse = (16 + 2 * e) * h + 4 * e * q + 4 * e * i + 8 * a * s + 16
    return LayerKeeps(trained, frozen, sparse, first=4 * h)


def _gemma3_keeps(h: int, q: int, i: int, a: int, s: int, e: int, autocast: bool) -> LayerKeeps:
    """Gemma-3: Gemma-2's norms, attention through SDPA (a log-sum-exp), and RMSNorms on q and k
    (their fp32 inputs). Counted for half as many key/value heads as query heads, as every Gemma-3
    from 4B up has; the 1B model's single key/value head keeps less."""
    trained = (
        42 * h + 20 * q + 8 * i + 10 * a + 2 * s + 16
        if autocast
        else (32 + 2 * e) * h + (12 + 4 * e) * q + 4 * e * i + 10 * a + e * s + 16
    )
    frozen = 16 * h + (6 + 4 * e) * q + 3 * e * i + 10 * a + e * s + 16
    sparse = (16 + 2 * e) * h + (6 + 4 * e) * q + 4 * e * i + 10 * a + e * s + 16
    return LayerKeeps(trained, frozen, sparse, first=4 * h)


def _gpt_neox_keeps(h: int, q: int, i: int, a: int, s: int, e: int, autocast: bool) -> LayerKeeps:
    """GPT-NeoX: the two LayerNorms read the same input (parallel residual) and keep it once, with
    their means and inverse deviations; the fused q/k/v output (v is a view of it), rotated q and k,
    the attention output and log-sum-exp; an MLP of two layers keeps the GELU's input and output.
    Under autocast the LayerNorms run in fp32. Frozen, the linear layers' inputs go; sparse, every
    input the frozen layer drops comes back, so it keeps what a trained one does."""
    trained = (
        22 * h + 4 * i + 4 * a + 2 * s + 16 if autocast else 10 * e * h + 2 * e * i + 4 * a + e * s + 4 * e
    )
    frozen = 7 * e * h + e * i + 4 * a + e * s + 4 * e
    return LayerKeeps(trained, frozen, sparse=trained, first=e * h + 4 * e)


def _opt_keeps(h: int, q: int, i: int, a: int, s: int, e: int, autocast: bool) -> LayerKeeps:
    """OPT: two LayerNorms (inputs, means, inverse deviations); q, k, v, the attention output and
    log-sum-exp; a ReLU MLP keeps only the ReLU's output (fc2's input); dropout's masks."""
    trained = 28 * h + 2 * i + 4 * a + 2 * s + 16 if autocast else 10 * e * h + e * i + 4 * a + e * s + 4 * e
    frozen = 8 * e * h + e * i + 4 * a + e * s + 4 * e
    return LayerKeeps(trained, frozen, sparse=trained, first=e * h + 2 * e)


def _gpt2_keeps(h: int, q: int, i: int, a: int, s: int, e: int, autocast: bool) -> LayerKeeps:
    """GPT-2: two LayerNorms; q, k, v, the attention output and log-sum-exp, as the fused attention
    kernels keep them; the MLP's GELU is the tanh approximation written out in Python, whose
    intermediate tensors make 5·i per token; dropout's masks."""
    trained = (
        24 * h + 10 * i + 4 * a + 2 * s + 16 if autocast else 10 * e * h + 5 * e * i + 4 * a + e * s + 4 * e
    )
    frozen = 8 * e * h + 4 * e * i + 4 * a + e * s + 4 * e
    return LayerKeeps(trained, frozen, sparse=trained, first=e * h + 2 * e)


def _gpt2_math_attention(keeps: LayerKeeps, h: int, a: int, s: int, e: int, autocast: bool) -> LayerKeeps:
    """GPT-2's attention through torch's math path instead of a fused kernel, as on a CPU whenever
    attention dropout is on (GPT-2's attn_pdrop, 0.1 by default; a GPU's fused kernels apply dropout
    themselves): the fp32 scores, their softmax and the dropped-out probabilities, 12 bytes per head
    and position pair, in place of the log-sum-exp and the mask row; and fp32 copies of q and k."""
    scores = 12 * a * s - 4 * a - (2 if autocast else e) * s
    more = (6 if autocast else 4 + e) * h + scores
    return LayerKeeps(keeps.trained + more, keeps.frozen + 4 * h + scores, keeps.sparse + more, keeps.first)


LAYER_KEEPS = {
    "llama": _llama_keeps, "mistral": _llama_keeps, "qwen2": _llama_keeps, "qwen3": _llama_keeps,
    "phi3": _phi3_keeps, "gemma2": _gemma2_keeps, "gemma3_text": _gemma3_keeps,
    "gpt_neox": _gpt_neox_keeps, "opt": _opt_keeps, "gpt2": _gpt2_keeps,
}  # fmt: skip


def layer_keeps(shape: ModelShape, seq_len: int, p: Precision) -> LayerKeeps:
    """What one decoder layer of this model keeps per token, at ``seq_len`` and precision ``p``."""
    h, i, a, e = shape.hidden, shape.intermediate, shape.heads, p.compute_bytes
    keeps = LAYER_KEEPS[shape.model_type](h, a * shape.head_dim, i, a, seq_len, e, p.autocast)
    if shape.model_type == "gpt2" and shape.attention_dropout and not p.on_gpu:
        keeps = _gpt2_math_attention(keeps, h, a, seq_len, e, p.autocast)
    return keeps
