"""fp32 master weights for a group of 16-bit parameters, only while that group trains.

With bf16 weights, an update smaller than half a bf16 ulp (about 0.4% of the weight) would be
rounded away. The active group therefore gets fp32 copies (4 bytes per parameter, for that group
only); the optimizer updates the copies; the result is written back to bf16 with *stochastic
rounding*, which rounds up or down with probability proportional to the distance, so small
updates survive in expectation instead of vanishing. No fp32 copy of the whole model is kept.

Gradients are accumulated in fp32 too: each micro-batch's 16-bit gradient is added to the master's
fp32 gradient as soon as autograd has produced it (a post-accumulate-grad hook) and then freed.
Summing micro-batches in the bf16 ``.grad`` instead would round every partial sum to 8 bits of
mantissa (about 1-3% of the gradient at 4-16 accumulation steps). Memory: the fp32 gradient of
the group, which the update needs anyway, and one tensor's 16-bit gradient at a time.
"""

from __future__ import annotations

import torch

from lowmem_ft.engine import ROUNDING_CHUNK


def round_to_bf16_stochastically_(
    dst: torch.Tensor, src: torch.Tensor, generator: torch.Generator | None, chunk: int = ROUNDING_CHUNK
) -> None:
    """dst (bf16) ← src (fp32), rounding each value up or down at random, unbiased."""
    bits_in = src.contiguous().view(-1).view(torch.int32)
    out = dst.view(-1)
    for start in range(0, bits_in.numel(), chunk):
        part = bits_in[start : start + chunk]
        noise = torch.randint(
            0, 1 << 16, part.shape, dtype=torch.int32, device=src.device, generator=generator
        )
        # Adding noise below the 16 kept bits and truncating rounds up with probability = the remainder.
        noise.add_(part).bitwise_and_(-65536)  # -65536 == 0xFFFF0000: sign, exponent, 7 mantissa bits
        out[start : start + chunk].copy_(noise.view(torch.float32))  # exact: the dropped bits are zero
        del noise  # before the next chunk's is drawn: one chunk of temporaries at a time, as planned


class MasterWeights:
    """Pairs of (16-bit model parameter, fp32 master) for the active group."""

    def __init__(self, params: list[torch.nn.Parameter], generator: torch.Generator | None):
        self.params = params
        self.generator = generator
        self.masters = [torch.nn.Parameter(p.detach().float()) for p in params]
        self._hooks = [
            p.register_post_accumulate_grad_hook(self._accumulate_into(m))
            for p, m in zip(params, self.masters, strict=True)
        ]

    @staticmethod
    def _accumulate_into(master: torch.nn.Parameter):
        def hook(param: torch.nn.Parameter) -> None:
            if master.grad is None:
                master.grad = param.grad.float()
            else:
                master.grad.add_(param.grad)  # fp32 += 16-bit: promoted, no 16-bit partial sums
            param.grad = None  # the 16-bit gradient is freed at once

        return hook

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def masters_to_params(self) -> None:
        with torch.no_grad():
            for p, m in zip(self.params, self.masters, strict=True):
                if p.dtype == torch.bfloat16:
                    round_to_bf16_stochastically_(p, m, self.generator)
                else:
                    p.copy_(m)
