"""The registry of fine-tuning methods: one module per method, one entry here."""

from lowmem_ft.methods.base import Method
from lowmem_ft.methods.full import FullFineTuning
from lowmem_ft.methods.hift import HiFT
from lowmem_ft.methods.masks import MagnitudeMask, RandomMask
from lowmem_ft.methods.sift import SIFT
from lowmem_ft.methods.structured import SPAFIT, BitFit, LoRA

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (FullFineTuning, HiFT, SIFT, RandomMask, MagnitudeMask, BitFit, LoRA, SPAFIT)
}


def build_method(name: str) -> Method:
    return METHODS[name]()


__all__ = ["METHODS", "Method", "build_method"]
