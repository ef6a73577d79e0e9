"""The engine moves tensors: optimizer state between host and device, master weights, (later)
streamed units. Methods decide *what* trains; the engine carries out *where* things live."""

# Stochastic rounding (master_weights.py) works through this many elements at a time: its temporary
# (the random integers, summed into in place) is 4 bytes x this, not 12 bytes x the largest tensor
# (5.9 GiB for Llama-3's 525M-element embedding). Here, free of torch, because the planner counts it.
ROUNDING_CHUNK = 1 << 24

# QLoRA's NF4 block size: 4-bit codes and one fp32 scale per 64 weights, 0.5 + 4/64 bytes per weight
# (quantised.py, sparse_delta.py; the planner's QUANT_BYTES).
NF4_BLOCKSIZE = 64
