"""Several processes, one job: PyTorch's own engine, nothing home-made.

    lowmem-ft run MODEL DATA --nproc 2                 # launch.py starts 2 ranks (torchrun's agent)
    torchrun --nproc-per-node 2 -m lowmem_ft run ...   # the same ranks, started by torchrun

Every rank runs the same recipe (train.py) on its slice of every global batch; rank 0 alone writes
the job record, the metrics and the result, and prints. What a method shares across ranks is its
own business (``Method.place`` / ``Method.reduce_gradients``): `full` and `hift` shard weights,
gradients and optimizer state with FSDP2 (fsdp.py); `lora`, `sift` and the masks all-reduce the
gradients of what they train (data-parallel), and SIFT sums its selection scores. ranks.py knows who
this process is (torch-free); group.py talks to the others (torch.distributed, gloo on CPU, NCCL
on GPUs).
"""
