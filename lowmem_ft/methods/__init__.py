"""The fine-tuning methods: one module each, one line each in lowmem_ft/registry.py."""

from lowmem_ft.methods.base import Method
from lowmem_ft.registry import METHOD_SPECS

# name -> runtime class, in the registry's order (importing this package imports every method)
METHODS: dict[str, type[Method]] = {name: spec.load() for name, spec in METHOD_SPECS.items()}


def build_method(name: str) -> Method:
    return METHODS[name]()


__all__ = ["METHODS", "Method", "build_method"]
