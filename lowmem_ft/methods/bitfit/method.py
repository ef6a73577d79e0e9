"""BitFit (Ben Zaken et al., 2022): only the bias terms train; Llama has none, so its norm weights
do, and with --add-biases zero-initialised biases on every linear layer too. The structured
methods' runtime (structured/method.py) with BitFit's selection (plan.py)."""

from __future__ import annotations

from lowmem_ft.methods.bitfit.plan import select_bitfit
from lowmem_ft.methods.structured.method import StructuredMethod


class BitFit(StructuredMethod):
    name = "bitfit"

    def select(self, terms, linears, n_layers, model_type):
        return select_bitfit(self.config.method_options, terms, linears, n_layers, model_type)
