"""Processes of their own for tests that kill a run or keep one case from another, made cheaply.

Each is forked from one server process that imported torch, transformers and the package once
(multiprocessing's "forkserver"): a fresh interpreter took about 13 s to import them on a 2-core
machine like CI's, more than most runs it would start take. A forked process starts from the state those
imports leave and nothing else: no test's work, no thread, no CUDA.
"""

from __future__ import annotations

import multiprocessing

# One list for every test module: the server is started once per process (an xdist worker runs
# several modules), with the list of its first user.
PRELOADED = [
    "lowmem_ft.cli",
    "lowmem_ft.train",
    "lowmem_ft.looptrace",
    "transformers.models.llama.modeling_llama",
    "fault_runner",
]


def forked():
    """The multiprocessing context whose processes fork from the preloaded server."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOADED)
    return context
