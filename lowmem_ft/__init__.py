"""lowmem-ft: fine-tune 7B-class language models on one GPU that cannot hold them the usual way."""

__version__ = "0.1.0"
