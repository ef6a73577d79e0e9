"""lowmem-ft: fine-tune 7B-class language models on one GPU that cannot hold them the usual way.

The library reports what it does through the ``lowmem_ft`` logger (INFO: the run's header, plan,
selection and result lines; WARNING: what the user should know); the command line shows them.
"""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())


def _no_hub_kernel_warning(record: logging.LogRecord) -> bool:
    """On CPUs with AVX512-BF16, importing bitsandbytes tries to fetch a 4-bit matmul kernel from the
    Hugging Face hub (the ``kernels`` package), which refuses code it cannot trust, and bitsandbytes
    then warns on every import to "set trust_remote_code=True": advice that reads as if it were about
    lowmem-ft's own --trust-remote-code, for code lowmem-ft never wants run. Its built-in kernel is
    used either way; the warning is dropped."""
    return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_no_hub_kernel_warning)
