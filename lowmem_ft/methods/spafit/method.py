"""SPAFIT (stratified progressive adaptation): by depth, frozen, then bias/norm terms, then LoRA on
attention. The structured methods' runtime (structured/method.py) with SPAFIT's selection
(plan.py); its adapters are merged into the full model it writes."""

from __future__ import annotations

from lowmem_ft.methods.spafit.plan import select_spafit
from lowmem_ft.methods.structured.method import StructuredMethod


class SPAFIT(StructuredMethod):
    name = "spafit"

    def select(self, terms, linears, n_layers, model_type):
        return select_spafit(self.config.method_options, terms, linears, n_layers, model_type)
