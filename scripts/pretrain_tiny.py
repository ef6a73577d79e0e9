"""Pretrain the embedded `tiny` model that ships in lowmem_ft/models/tiny/.

    python scripts/pretrain_tiny.py            # ~20 min on 2 CPU cores
    python scripts/pretrain_tiny.py --steps 20 --out /tmp/tiny   # smoke run

Why this exists: the quick start must fine-tune a *pretrained* model without downloading
anything, so the repo carries a small Llama-architecture model trained here, on text that every
Python installation has:

- the reference-manual topics in ``pydoc_data.topics`` (the text behind ``help('if')``), and
- the docstrings of the builtins and of a fixed list of standard-library modules.

Reproducibility: the corpus depends on the Python version (the shipped weights were made with
CPython 3.11.7), everything else is fixed here: seed, tokenizer vocabulary, model shape, steps,
batch and learning-rate schedule. With the same Python, torch version and thread count the run is
bit-for-bit repeatable on CPU.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import random
import time
import warnings
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SEED = 1234
VOCAB_SIZE = 4096
SEQ_LEN = 256
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
# Modules whose docstrings join the corpus. Sorted and fixed so the corpus is deterministic.
STDLIB_MODULES = sorted(
    [
        "abc",
        "argparse",
        "array",
        "base64",
        "bisect",
        "calendar",
        "collections",
        "collections.abc",
        "contextlib",
        "copy",
        "csv",
        "dataclasses",
        "datetime",
        "decimal",
        "difflib",
        "enum",
        "fnmatch",
        "fractions",
        "functools",
        "glob",
        "hashlib",
        "heapq",
        "hmac",
        "html",
        "inspect",
        "io",
        "itertools",
        "json",
        "logging",
        "math",
        "operator",
        "os",
        "os.path",
        "pathlib",
        "pickle",
        "pprint",
        "queue",
        "random",
        "re",
        "shlex",
        "shutil",
        "statistics",
        "string",
        "struct",
        "subprocess",
        "sys",
        "tempfile",
        "textwrap",
        "threading",
        "time",
        "timeit",
        "traceback",
        "types",
        "typing",
        "unittest",
        "urllib.parse",
        "uuid",
        "warnings",
        "weakref",
        "zipfile",
    ]
)
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "lowmem_ft" / "models" / "tiny"


def build_corpus() -> list[str]:
    """Return the documents of the corpus, in a fixed order."""
    import builtins
    import pydoc_data.topics

    warnings.simplefilter("ignore")  # deprecated attributes warn when their docstring is read
    docs = [pydoc_data.topics.topics[key].strip() for key in sorted(pydoc_data.topics.topics)]
    namespaces = [("builtins", builtins)] + [(m, importlib.import_module(m)) for m in STDLIB_MODULES]
    for module_name, module in namespaces:
        module_doc = inspect.getdoc(module)
        if module_doc:
            docs.append(f"Module {module_name}\n\n{module_doc}")
        for name in sorted(vars(module)):
            if name.startswith("_"):
                continue
            obj = getattr(module, name)
            doc = inspect.getdoc(obj) if callable(obj) or inspect.isclass(obj) else None
            if doc and len(doc) > 40:
                docs.append(f"{module_name}.{name}\n\n{doc}")
            if inspect.isclass(obj):  # methods of classes (str.split, list.append, ...)
                for attr in sorted(vars(obj)):
                    if attr.startswith("_"):
                        continue
                    member_doc = inspect.getdoc(getattr(obj, attr, None))
                    if member_doc and len(member_doc) > 40:
                        docs.append(f"{module_name}.{name}.{attr}\n\n{member_doc}")
    # The same docstring is inherited by many classes; keep the first occurrence only.
    seen, unique = set(), []
    for doc in docs:
        body = doc.split("\n\n", 1)[-1]
        if body not in seen:
            seen.add(body)
            unique.append(doc)
    return unique


def train_tokenizer(docs: list[str]) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(docs, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL)


def model_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, like Llama-3 and Mistral
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,  # tied embedding/head: one HiFT unit, as in small Qwen/Llama
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch", type=int, default=16, help="sequences of SEQ_LEN tokens per step")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    random.seed(SEED)
    torch.manual_seed(SEED)
    started = time.time()
    docs = build_corpus()
    tokenizer = train_tokenizer(docs)
    ids: list[int] = []
    for doc in docs:
        ids.extend(
            [tokenizer.bos_token_id, *tokenizer.encode(doc, add_special_tokens=False), tokenizer.eos_token_id]
        )
    tokens = torch.tensor(ids)
    n_chars = sum(map(len, docs))
    print(f"corpus: {len(docs)} documents, {n_chars:,} characters, {len(tokens):,} tokens")

    # Hold out the last 2% of the token stream to report a validation loss.
    split = int(len(tokens) * 0.98)
    train_tokens, val_tokens = tokens[:split], tokens[split:]
    config = model_config(tokenizer)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters")

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    def batch_from(source: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        return torch.stack([source[s : s + SEQ_LEN] for s in starts.tolist()])

    @torch.no_grad()
    def validation_loss() -> float:
        model.eval()
        starts = torch.arange(0, len(val_tokens) - SEQ_LEN, SEQ_LEN)
        losses = [model(input_ids=b, labels=b).loss.item() for b in batch_from(val_tokens, starts).split(16)]
        model.train()
        return sum(losses) / len(losses)

    generator = torch.Generator().manual_seed(SEED)
    model.train()
    for step in range(args.steps):
        starts = torch.randint(0, len(train_tokens) - SEQ_LEN, (args.batch,), generator=generator)
        batch = batch_from(train_tokens, starts)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.3f}  {time.time() - started:6.0f}s", flush=True)
    val = validation_loss()
    print(f"validation loss {val:.3f} (perplexity {math.exp(val):.1f})")

    args.out.mkdir(parents=True, exist_ok=True)
    # bf16 on disk, like the 7B checkpoints users bring; lowmem-ft upcasts to fp32 on CPU.
    model.to(torch.bfloat16).save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    provenance = {
        "script": "scripts/pretrain_tiny.py",
        "seed": SEED,
        "steps": args.steps,
        "batch_sequences": args.batch,
        "seq_len": SEQ_LEN,
        "peak_lr": args.lr,
        "corpus": f"pydoc_data.topics + docstrings of builtins and {len(STDLIB_MODULES)} stdlib modules",
        "corpus_documents": len(docs),
        "corpus_tokens": len(tokens),
        "parameters": n_params,
        "validation_loss": round(val, 4),
        "python": __import__("platform").python_version(),
        "torch": torch.__version__,
        "seconds": round(time.time() - started),
    }
    (args.out / "PROVENANCE.json").write_text(json.dumps(provenance, indent=2) + "\n")
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
