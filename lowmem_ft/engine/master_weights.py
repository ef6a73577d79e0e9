"""fp32 master weights for a group of 16-bit parameters, only while that group trains.

With bf16 weights, an update smaller than half a bf16 ulp (about 0.4% of the weight) would be
rounded away. The active group therefore gets fp32 copies (4 bytes per parameter, for that group
only); the optimizer updates the copies; the result is written back to bf16 with *stochastic
rounding*, which rounds up or down with probability proportional to the distance, so small
updates survive in expectation instead of vanishing. No fp32 copy of the whole model is kept.
"""

from __future__ import annotations

import torch


def round_to_bf16_stochastically_(
    dst: torch.Tensor, src: torch.Tensor, generator: torch.Generator | None
) -> None:
    """dst (bf16) ← src (fp32), rounding each value up or down at random, unbiased."""
    bits = src.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, src.shape, dtype=torch.int32, device=src.device, generator=generator)
    # Adding noise below the 16 kept bits and truncating rounds up with probability = the remainder.
    rounded = (bits + noise) & -65536  # -65536 == 0xFFFF0000: keep sign, exponent and 7 mantissa bits
    dst.copy_(rounded.view(torch.float32))  # exact: the dropped bits are zero


class MasterWeights:
    """Pairs of (16-bit model parameter, fp32 master) for the active group."""

    def __init__(self, params: list[torch.nn.Parameter], generator: torch.Generator | None):
        self.params = params
        self.generator = generator
        self.masters = [torch.nn.Parameter(p.detach().float()) for p in params]

    def grads_to_masters(self) -> None:
        for p, m in zip(self.params, self.masters, strict=True):
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None  # the 16-bit gradient is no longer needed

    def masters_to_params(self) -> None:
        with torch.no_grad():
            for p, m in zip(self.params, self.masters, strict=True):
                if p.dtype == torch.bfloat16:
                    round_to_bf16_stochastically_(p, m, self.generator)
                else:
                    p.copy_(m)
