"""The four record shapes a data file may use: how each is recognised, checked and turned into text.

Rendering produces the exact text the model sees plus the character ranges whose tokens carry loss,
so ``tokenize.py`` never needs to know about formats: it only maps character spans to tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowmem_ft.errors import DataError

FORMAT_NAMES = ("text", "prompt-completion", "alpaca", "chat")

# The accepted shapes, quoted in error messages so the user sees what would work.
SHAPES = (
    '{"text": ...}, {"prompt": ..., "completion": ...}, '
    '{"instruction": ..., "input": ... (optional), "output": ...} or {"messages": [...]}'
)

# The fields that identify a format, in detection order. Order matters: a record with both
# "messages" and "text" is chat, because "messages" is the more specific signal.
_REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "chat": ("messages",),
    "alpaca": ("instruction", "output"),
    "prompt-completion": ("prompt", "completion"),
    "text": ("text",),
}
_KNOWN_KEYS = {"messages", "instruction", "input", "output", "prompt", "completion", "text"}

CHAT_ROLES = ("system", "user", "assistant")

# The Stanford Alpaca prompts (github.com/tatsu-lab/stanford_alpaca), verbatim, so models already tuned
# on Alpaca-style data see the prompt they know. The output follows "### Response:\n" directly.
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

# Chat template for tokenizers that have none (base models). Each message is a header plus its content;
# messages are separated by a blank line. The text ends right after the last message, with no trailing
# blank line, so that when the conversation ends with an assistant reply the appended end-of-sequence
# token follows a trained token and is trained too: the model learns to stop.
DEFAULT_CHAT_HEADERS = {
    "system": "### System:\n",
    "user": "### User:\n",
    "assistant": "### Assistant:\n",
}
DEFAULT_CHAT_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Rendered:
    text: str
    # [start, end) character ranges of `text` whose tokens carry loss
    train_spans: tuple[tuple[int, int], ...]


def detect_format(record: dict) -> str | None:
    """The format whose identifying fields are all present, or None. Unknown extra keys are ignored."""
    for fmt, keys in _REQUIRED_KEYS.items():
        if all(key in record for key in keys):
            return fmt
    return None


def unknown_shape_reason(record: dict) -> str:
    """Why `record` matches no format, naming the fields found and, for a near miss, the missing field."""
    found = sorted(record)
    found_text = ", ".join(f'"{key}"' for key in found) if found else "no fields"
    near_misses = [
        f'{fmt} needs "{missing}"'
        for fmt, keys in _REQUIRED_KEYS.items()
        if any(key in record for key in keys)
        for missing in keys
        if missing not in record
    ]
    hint = f" ({'; '.join(near_misses)})" if near_misses else ""
    return f"no known format for fields {found_text}{hint}; each line must look like one of {SHAPES}"


def json_type(value: object) -> str:
    """The JSON name of a parsed value's type, for messages a user can relate to their file."""
    if value is None:
        return "null"
    if isinstance(value, bool):  # before int: bool is a subclass of int
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _check_string(record: dict, key: str, allow_empty: bool = False) -> str | None:
    value = record.get(key)
    if not isinstance(value, str):
        return f'"{key}" is {json_type(value)}; it must be a string'
    if not allow_empty and not value.strip():
        return f'"{key}" is empty; it must contain text'
    return None


def _check_chat(messages: object) -> str | None:
    if not isinstance(messages, list):
        return f'"messages" is {json_type(messages)}; it must be a list of {{"role": ..., "content": ...}}'
    if not messages:
        return '"messages" is an empty list; give at least one user and one assistant message'
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return (
                f'messages[{i}] is {json_type(message)}; each message must be {{"role": ..., "content": ...}}'
            )
        role = message.get("role")
        if role not in CHAT_ROLES:
            got = f'has role "{role}"' if isinstance(role, str) else 'has no "role" string'
            return f'messages[{i}] {got}; role must be one of "system", "user", "assistant"'
        content = message.get("content")
        if not isinstance(content, str):
            return f"messages[{i}].content is {json_type(content)}; it must be a string"
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        return "no assistant message with content; at least one assistant reply is needed to learn from"
    return None


def validate(record: dict, fmt: str) -> str | None:
    """Why `record` is not a usable `fmt` record ("what is wrong; what would work"), or None if it is."""
    if fmt == "chat":
        return _check_chat(record.get("messages"))
    if fmt == "alpaca":
        if "input" in record and (reason := _check_string(record, "input", allow_empty=True)):
            return reason
        return _check_string(record, "instruction") or _check_string(record, "output")
    if fmt == "prompt-completion":
        return _check_string(record, "prompt") or _check_string(record, "completion")
    if fmt == "text":
        return _check_string(record, "text")
    raise ValueError(f"unknown format {fmt!r}")


def render(record: dict, fmt: str, tokenizer) -> Rendered:
    """The text the model trains on and the spans of it that carry loss. `record` must be valid."""
    if fmt == "text":
        return Rendered(record["text"], ((0, len(record["text"])),))
    if fmt == "prompt-completion":
        # Concatenated as-is: the user chooses the separator (a space, a newline) inside their data.
        prompt, completion = record["prompt"], record["completion"]
        return Rendered(prompt + completion, ((len(prompt), len(prompt) + len(completion)),))
    if fmt == "alpaca":
        if record.get("input", "").strip():
            prompt = ALPACA_PROMPT_WITH_INPUT.format(instruction=record["instruction"], input=record["input"])
        else:
            prompt = ALPACA_PROMPT_NO_INPUT.format(instruction=record["instruction"])
        output = record["output"]
        return Rendered(prompt + output, ((len(prompt), len(prompt) + len(output)),))
    if fmt == "chat":
        messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
        if getattr(tokenizer, "chat_template", None):
            return _render_with_chat_template(messages, tokenizer)
        return _render_default_chat(messages)
    raise ValueError(f"unknown format {fmt!r}")


def _render_default_chat(messages: list[dict]) -> Rendered:
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    position = 0
    for i, message in enumerate(messages):
        separator = DEFAULT_CHAT_SEPARATOR if i > 0 else ""
        header = separator + DEFAULT_CHAT_HEADERS[message["role"]]
        content_start = position + len(header)
        if message["role"] == "assistant":
            spans.append((content_start, content_start + len(message["content"])))
        parts += [header, message["content"]]
        position = content_start + len(message["content"])
    return Rendered("".join(parts), tuple(spans))


def _render_with_chat_template(messages: list[dict], tokenizer) -> Rendered:
    """Render with the model's own template and train each assistant turn.

    A turn's span is the difference between the conversation up to and including that turn and the
    conversation before it with the generation prompt (the assistant header) added. That span covers
    the reply plus whatever end-of-turn marker the template writes, which the model must learn to emit.
    Templates that rewrite earlier turns (some drop reasoning, some add dates) break the prefix
    property; then we fall back to finding the reply's text in the full rendering.
    """
    from jinja2 import TemplateError  # jinja2 is present whenever a tokenizer has a chat template

    def apply(conversation: list[dict], add_generation_prompt: bool = False) -> str:
        try:
            return tokenizer.apply_chat_template(
                conversation, add_generation_prompt=add_generation_prompt, tokenize=False
            )
        except TemplateError as error:
            raise DataError(
                f"the model's chat template rejected this conversation ({error}); "
                "arrange the messages the way this model expects"
            ) from error

    full = apply(messages)
    spans: list[tuple[int, int]] = []
    previous_end = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or not message["content"].strip():
            continue
        prefix = apply(messages[:i], add_generation_prompt=True) if i > 0 else ""
        upto = apply(messages[: i + 1])
        if full.startswith(upto) and upto.startswith(prefix) and len(prefix) >= previous_end:
            span = (len(prefix), len(upto))
        else:
            # Stripped, because some templates trim the content they render.
            content = message["content"].strip()
            start = full.find(content, previous_end)
            if start < 0:
                continue  # the template dropped this reply; nothing to train on here
            span = (start, start + len(content))
        spans.append(span)
        previous_end = span[1]
    return Rendered(full, tuple(spans))
