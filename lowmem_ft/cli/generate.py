"""`generate`: try a job's result (or any model) on a prompt, or chat with it."""

from __future__ import annotations

import sys

import typer

from lowmem_ft.cli.examples import examples
from lowmem_ft.cli.options import option
from lowmem_ft.errors import UserError

GENERATE_EPILOG = examples(
    'lowmem-ft generate runs/full -p "Explain the bytes.strip method."',
    'lowmem-ft generate runs/sift -p "Describe heapq.heapify." --temperature 0.7',
    "lowmem-ft generate qwen2.5-0.5b --chat        # needs a chat template",
    'echo "What is a heap?" | lowmem-ft generate runs/chat-job --chat',
)


def generate(
    target: str = typer.Argument(
        ...,
        metavar="JOB_OR_MODEL",
        help="A job directory (or its model, delta.safetensors or adapter), or a model: alias, local "
        "Hugging Face directory, cached hub id.",
    ),
    prompt: str | None = typer.Option(
        None,
        "--prompt",
        "-p",
        help="Text to continue. For a job, written the way its training data was (e.g. as an Alpaca "
        "instruction); see --raw.",
    ),
    chat: bool = typer.Option(
        False,
        "--chat",
        help="Chat: read messages from stdin, one a line, until an empty line, 'exit', 'quit' or the end "
        "of input; the conversation is kept. Needs the tokenizer's chat template (or a job trained on "
        "chat data).",
    ),
    max_new_tokens: int = typer.Option(256, help="Stop after this many new tokens (or at end-of-sequence)."),
    temperature: float = typer.Option(0.0, help="0 = greedy (the likeliest token each time); > 0 samples."),
    top_p: float = typer.Option(1.0, help="Sample from the likeliest tokens holding this much probability."),
    top_k: int = typer.Option(0, help="Sample from the K likeliest tokens only; 0 = no limit."),
    seed: int | None = typer.Option(None, help="Seed for sampling, to repeat a sampled answer."),
    raw: bool = typer.Option(
        False, "--raw", help="Send --prompt as it is, not in the job's training format."
    ),
    base: str | None = typer.Option(
        None, help="A delta's or adapter's base model, if not where the job found it (same sha256)."
    ),
    device: str = option("device", help="Where to generate: auto, cpu, cuda or cuda:N."),
    dtype: str = option("dtype", help="Precision: auto (fp32 on CPU, bf16 on GPU), fp32, bf16, fp16."),
    allow_download: bool = option("allow_download"),
    trust_remote_code: bool = option("trust_remote_code"),
) -> None:
    """Generate text with a job's result or a model: --prompt TEXT, or --chat."""
    from lowmem_ft.generate import CHAT_EXIT_WORDS, GenerateOptions, load_generator

    if prompt is None and not chat:
        raise UserError("give --prompt TEXT, or --chat to talk")
    if prompt is not None and chat:
        raise UserError("--prompt and --chat exclude each other; give one of them")
    if raw and chat:  # (each message is written in the chat format: there is no raw way to chat)
        raise UserError("--raw only applies to --prompt; --chat writes each message in the chat format")
    options = GenerateOptions(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        device=device,
        dtype=dtype,
        base=base,
        raw=raw,
        allow_download=allow_download,
        trust_remote_code=trust_remote_code,
    )
    generator = load_generator(target, options)
    # Checked before anything is shown: bad input is one line.
    prompt_ids = generator.prompt_ids(prompt) if prompt is not None else None
    conversation = generator.conversation() if chat else None
    if prompt_ids is not None:  # (a chat's first message decides where its model goes)
        generator.place(len(prompt_ids))
    # What was loaded goes to stderr: stdout carries only the generated text, for pipes and files.
    for label, text in generator.describe(chat):
        typer.echo(f"{label:<10} {text}", err=True)

    def show(piece: str) -> None:
        typer.echo(piece, nl=False)  # click flushes: each piece appears as it is generated

    if conversation is None:
        generator.generate_ids(prompt_ids, show)
        typer.echo()
        return
    interactive = sys.stdin.isatty()
    if interactive:
        typer.echo(f"chat       an empty line, {' or '.join(CHAT_EXIT_WORDS)} ends it", err=True)
    while True:
        if interactive:
            typer.echo("> ", nl=False, err=True)
        line = sys.stdin.readline()
        if interactive and not line.endswith("\n"):  # Ctrl-D: end the prompt's line, for the shell's
            typer.echo(err=True)
        message = line.strip()
        if not message or message.lower() in CHAT_EXIT_WORDS:
            break
        placed_before = generator.placement
        conversation.reply(message, show)
        typer.echo()
        if generator.placement != placed_before:  # the first message placed the model so
            typer.echo(f"memory     {generator.placement}", err=True)
    if conversation.dropped:
        typer.echo(
            f"note       the {conversation.dropped} oldest exchanges were left out to stay within "
            "the model's positions",
            err=True,
        )
