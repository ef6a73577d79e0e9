"""The fine-tuning methods: one module each, one line each in lowmem_ft/registry.py."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from lowmem_ft.methods.base import Method
from lowmem_ft.registry import METHOD_SPECS

if TYPE_CHECKING:
    from lowmem_ft.config import RunConfig

# name -> what builds it from the resolved run (a Method class or a function), in the registry's
# order (importing this package imports every method)
METHODS: dict[str, Callable[[RunConfig], Method]] = {name: spec.load() for name, spec in METHOD_SPECS.items()}


def build_method(config: RunConfig) -> Method:
    """The method ``config.method`` names, given the resolved run's options."""
    return METHODS[config.method](config)


__all__ = ["METHODS", "Method", "build_method"]
