"""The values each option can take, in one torch-free place: the options, the planner, the CLI's
help and the runtime modules all read them from here, so a name is spelled once."""

from __future__ import annotations

from lowmem_ft.registry import METHOD_SPECS

METHOD_NAMES = tuple(METHOD_SPECS)
# one sparse-increment engine; they differ in the mask, and leave a sparse delta
SPARSE_METHODS = tuple(name for name, spec in METHOD_SPECS.items() if spec.result == "delta")

STATE_POLICIES = ("keep", "keep-8bit", "drop")  # HiFT: the waiting groups' optimizer state
# HiFT: the order groups train in; random: one seeded order for the run (HiFT's), random-cycle: a
# new seeded order every cycle (BAdam's)
ORDERS = ("bottom-up", "top-down", "random", "random-cycle")
OPTIMIZERS = ("adamw", "sgd", "adagrad", "adamw8bit")
SELECTION_SCORES = ("grad", "grad2")  # SIFT: |Σg| or Σg² over the selection window
BASE_QUANTS = ("none", "int8", "nf4")  # the frozen base of the sparse methods and LoRA
SPAFIT_VARIANTS = ("I", "II")
SCHEDULES = ("cosine", "linear", "constant")

# --dtype and --save-dtype (besides "auto"); lowmem_ft/precision.py maps them to torch dtypes
DTYPE_NAMES = ("fp32", "bf16", "fp16")


def precision_problem(option: str, value: str) -> str | None:
    """What is wrong with ``value`` given to ``option`` (--dtype, --save-dtype: `run`, `generate`
    and `export` take them), or None: the one check, and message, of a precision."""
    if value == "auto" or value in DTYPE_NAMES:
        return None
    return f"{option} must be auto, {', '.join(DTYPE_NAMES[:-1])} or {DTYPE_NAMES[-1]}, got {value!r}"


def flag(name: str) -> str:
    """The command-line flag of an option (a RunConfig or method-options field name)."""
    return "--" + name.replace("_", "-")
