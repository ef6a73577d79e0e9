"""The fine-tuning methods: one package each (options.py, plan.py, method.py), one line each in
lowmem_ft/registry.py. Importing this package imports no method (and no torch): the options and
planners are read by the command line without torch, and ``build_method`` imports the one a run
needs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lowmem_ft.registry import METHOD_SPECS

if TYPE_CHECKING:
    from lowmem_ft.config import RunConfig
    from lowmem_ft.methods.base import Method


def build_method(config: RunConfig) -> Method:
    """The method ``config.method`` names, given the resolved run."""
    return METHOD_SPECS[config.method].load()(config)


__all__ = ["build_method"]
