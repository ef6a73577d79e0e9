"""`lowmem-ft generate`: a job's result (or any model) loaded for generation, and the sampling loop.

    lowmem-ft generate runs/tiny-full-20261122-104609 --prompt "Explain the `bytes.strip` method."
    lowmem-ft generate runs/sift --chat

What a job left decides how the weights are put together. Everything happens in memory; nothing
is written:

    JOB/model/               a Hugging Face model (full, hift, bitfit, spafit): loaded as it is
    JOB/delta.safetensors    the base it names, refused unless its sha256 is the one trained on, and
                             each trained weight w + Δ in fp32, rounded once: what `export --merge`
                             writes, without writing it
    JOB/adapter/             the base, checked the same way, with the peft LoRA adapter merged in

A job's prompt is written the way its training data was (an Alpaca instruction, a chat turn), so
that the model sees what it learned from; ``raw`` sends it as it is. A model that is not a job
gets the prompt as it is. Prompts are tokenized as training tokenized examples (data/tokenize.py:
BOS in front unless the text starts with it), for the same reason.

The model waits on the host until the first prompt: on a GPU, its weights and a KV cache for that
prompt and ``max_new_tokens`` are checked against the free memory first; where the weights do not
fit, as many decoder layers as need be stay in host memory and are streamed through the GPU at
each forward (``layers_to_stream``; engine/streaming.py), as training streams them.
"""

from lowmem_ft.generate.generator import Conversation, Generator, load_generator
from lowmem_ft.generate.memory import GenerationMemory, generation_memory, layers_to_stream
from lowmem_ft.generate.options import CHAT_EXIT_WORDS, GenerateOptions
from lowmem_ft.generate.prompts import render_chat

__all__ = [
    "CHAT_EXIT_WORDS", "Conversation", "GenerateOptions", "GenerationMemory", "Generator",
    "generation_memory", "layers_to_stream", "load_generator", "render_chat",
]  # fmt: skip
