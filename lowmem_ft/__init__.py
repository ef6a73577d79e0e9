"""lowmem-ft: fine-tune 7B-class language models on one GPU that cannot hold them the usual way.

The library reports what it does through the ``lowmem_ft`` logger (INFO: the run's header, plan,
selection and result lines; WARNING: what the user should know); the command line shows them.
"""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
