"""Options that several commands share, declared once (their checks are RunConfig.validate)."""

import typer

# Options that change nothing in the result, so `resume` accepts them too.
SAVE_EVERY = typer.Option(0, help="Save a checkpoint every N optimizer steps; 0 = by time only.")
SAVE_EVERY_MINUTES = typer.Option(
    30.0, help="Save a checkpoint every M minutes; 0 = by steps only. (Also at the end and on Ctrl-C.)"
)
KEEP_CHECKPOINTS = typer.Option(2, help="Checkpoints kept in JOB/checkpoints; older ones are deleted.")
MAX_BAD_STEPS = typer.Option(
    5, help="Stop after this many steps in a row with a NaN/Inf loss (each one is skipped)."
)

# Options of the structured methods (lowmem_ft/selections.py), shared by `run` and `plan`.
# Options `run` and `plan` share: declared once.
METHOD = typer.Option(
    "full",
    help="full = every parameter every step; hift = one group of layers per step (all parameters); "
    "sift = the top entries of each weight by gradient; random / magnitude = sparse baselines; "
    "bitfit, lora, spafit = structured. `lowmem-ft methods` lists them.",
)
UNITS_PER_GROUP = typer.Option(
    None, help="HiFT: units (embedding, each layer, head) trained together. [default: planner's]"
)
STATE_POLICY = typer.Option(
    None, help="HiFT: optimizer state of waiting groups: keep, keep-8bit or drop. [default: planner's]"
)
SPARSITY = typer.Option(
    None,
    help="SIFT/random/magnitude: fraction of each target weight that trains, e.g. 0.01. "
    "[default: the planner's]",
)
TARGETS = typer.Option(
    "all-linear",
    help="Sparse methods and LoRA: all-linear, attention, mlp, or module names/patterns such as "
    "q_proj,v_proj.",
)
BASE_QUANT = typer.Option(
    None,
    help="Sparse methods: frozen base weights as none, int8 or nf4 (bitsandbytes); LoRA: none or "
    "nf4 (QLoRA). [default: the planner's]",
)
SELECTION_BATCHES = typer.Option(
    1, help="SIFT: micro-batches whose gradients choose the entries (not trained on)."
)
STREAM = typer.Option(
    False,
    "--stream",
    help="HiFT/sparse methods: keep every decoder layer's frozen weights in host memory and stream "
    "them in to compute (the smallest GPU footprint). [default: the planner streams what does not fit]",
)
SEQ_LEN = typer.Option(512, help="Maximum tokens per example; longer examples are truncated (and counted).")
BATCH_SIZE = typer.Option(16, help="Examples per optimizer step.")
MICRO_BATCH_SIZE = typer.Option(
    None,
    help="Examples per forward/backward; gradients accumulate to --batch-size. [default: the planner's]",
)
DTYPE = typer.Option("auto", help="Compute precision: auto (fp32 on CPU, bf16 on GPU), fp32, bf16, fp16.")
GRADIENT_CHECKPOINTING = typer.Option(
    None,
    "--gradient-checkpointing/--no-gradient-checkpointing",
    help="Recompute activations in backward: far less memory, ~30% more compute. [default: planner's]",
)
GPU_MEM = typer.Option(None, help="GPU memory to plan for, e.g. 20GiB. [default: the GPU's free memory]")
CPU_MEM = typer.Option(None, help="Host RAM to plan for, e.g. 48GiB. [default: available]")

LORA_RANK = typer.Option(8, help="LoRA/SPAFIT: rank r of the adapters.")
LORA_ALPHA = typer.Option(None, help="LoRA/SPAFIT: scale α (the update is α/r·BA). [default: 2 × rank]")
CUTOFFS = typer.Option(
    None,
    help="SPAFIT: N1,N2: layers below N1 frozen, N1 to N2-1 bias/norm only, N2 up LoRA on attention. "
    "[default: the paper's 4,9 of 24 layers, scaled to the model]",
)
VARIANT = typer.Option(
    "I", help="SPAFIT: I = LoRA only in the top layers; II = LoRA and bias/norm terms there."
)
ADD_BIASES = typer.Option(
    False,
    "--add-biases",
    help="BitFit/SPAFIT: add zero-initialised biases to the decoder's linear layers and train them "
    "(Llama has none).",
)
FREEZE_LAYERS = typer.Option(
    None, help="BitFit/LoRA: decoder layers that stay frozen, numbered from 0, e.g. 0-15 or 0-3,8."
)
