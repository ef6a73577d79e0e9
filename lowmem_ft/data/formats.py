"""The record shapes training data may use: how each is recognised, checked and turned into text.

Rendering produces the exact text the model sees plus the character ranges whose tokens carry loss,
so ``tokenize.py`` never needs to know about formats: it only maps character spans to tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from lowmem_ft.data.chat_template import USE_A_TOOL_MODEL, render_with_chat_template
from lowmem_ft.errors import DataError

FORMAT_NAMES = ("text", "prompt-completion", "alpaca", "chat", "sharegpt")

# The accepted shapes, quoted in error messages so the user sees what would work.
SHAPES = (
    '{"text": ...}, {"prompt": ..., "completion": ...}, '
    '{"instruction": ..., "input": ... (optional), "output": ...}, {"messages": [...]} '
    'or {"conversations": [...]}'
)

# The fields that identify a format, in detection order. Order matters: a record with both
# "messages" and "text" is chat, because "messages" is the more specific signal.
_REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "chat": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt-completion": ("prompt", "completion"),
    "text": ("text",),
}
_REQUIRED_KEY_SETS = {fmt: frozenset(keys) for fmt, keys in _REQUIRED_KEYS.items()}  # checked per record
CHAT_ROLES = ("system", "user", "assistant", "tool")

# ShareGPT's "from" values and the chat role each one is. Datasets scraped from several assistants
# name the assistant after the product; they are all the assistant's turns.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
    "tool": "tool",
}

# The shapes of tool calls and tool definitions, as Hugging Face chat templates read them.
TOOL_CALL_SHAPE = '{"type": "function", "function": {"name": ..., "arguments": {...}}}'
TOOL_SHAPE = '{"type": "function", "function": {"name": ..., "description": ..., "parameters": {...}}}'

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
    # [start, end) character ranges of `text` whose tokens carry loss, in order and not overlapping
    # (tokenize.py relies on it)
    train_spans: tuple[tuple[int, int], ...]


def detect_format(record: dict, forced: str | None = None) -> str | None:
    """The format whose identifying fields are all present, or None. Unknown extra keys are ignored.
    ``forced`` (--format NAME) wins where its fields are all there, whatever else the record holds
    (tatsu-lab/alpaca's rows carry a ready-made "text" beside instruction, input and output)."""
    keys = record.keys()
    if forced is not None and keys >= _REQUIRED_KEY_SETS[forced]:
        return forced
    for fmt, required in _REQUIRED_KEY_SETS.items():
        if keys >= required:
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
            return f'messages[{i}] {got}; role must be one of "system", "user", "assistant", "tool"'
        calls = message.get("tool_calls")
        if calls not in (None, []):
            if role != "assistant":
                return f'messages[{i}] has "tool_calls" but role "{role}"; only assistant messages call tools'
            if reason := _check_tool_calls(calls, f"messages[{i}].tool_calls"):
                return reason
        content = message.get("content")
        # OpenAI's format writes "content": null (or leaves it out) on a turn that only calls tools.
        if not isinstance(content, str) and not (content is None and calls):
            got = "is missing" if "content" not in message else f"is {json_type(content)}"
            return f"messages[{i}].content {got}; it must be a string"
        for key in ("tool_call_id", "name"):
            if role == "tool" and message.get(key) is not None and not isinstance(message[key], str):
                return f"messages[{i}].{key} is {json_type(message[key])}; it must be a string"
    if not any(
        m["role"] == "assistant" and ((m.get("content") or "").strip() or m.get("tool_calls"))
        for m in messages
    ):
        return (
            "no assistant message with content or tool calls; at least one assistant reply is needed to "
            "learn from"
        )
    return None


def _check_sharegpt(turns: object) -> str | None:
    if not isinstance(turns, list):
        return f'"conversations" is {json_type(turns)}; it must be a list of {{"from": ..., "value": ...}}'
    if not turns:
        return '"conversations" is an empty list; give at least one "human" and one "gpt" turn'
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            return f'conversations[{i}] is {json_type(turn)}; each turn must be {{"from": ..., "value": ...}}'
        speaker = turn.get("from")
        if speaker not in SHAREGPT_ROLES:
            got = f'has "from": "{speaker}"' if isinstance(speaker, str) else 'has no "from" string'
            known = ", ".join(f'"{name}"' for name in SHAREGPT_ROLES)
            return f"conversations[{i}] {got}; it must be one of {known}"
        if not isinstance(turn.get("value"), str):
            got = "is missing" if "value" not in turn else f"is {json_type(turn['value'])}"
            return f"conversations[{i}].value {got}; it must be a string"
    if not any(SHAREGPT_ROLES[t["from"]] == "assistant" and t["value"].strip() for t in turns):
        return 'no "gpt" turn with text; at least one assistant reply is needed to learn from'
    return None


def _check_tool_calls(calls: object, where: str) -> str | None:
    if not isinstance(calls, list):
        return f"{where} is {json_type(calls)}; it must be a list of {TOOL_CALL_SHAPE}"
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            return f'{where}[{j}] has no "function" object; each call must be {TOOL_CALL_SHAPE}'
        name = function.get("name")
        if not isinstance(name, str) or not name.strip():
            got = "is missing" if "name" not in function else f"is {json_type(name)}"
            if isinstance(name, str):
                got = "is empty"
            return f"{where}[{j}].function.name {got}; it must be the name of the tool called"
        arguments = function.get("arguments")
        if tool_arguments(arguments) is None:
            return f"{where}[{j}].function.arguments {_not_arguments(arguments, 'arguments' in function)}"
    return None


def _not_arguments(arguments: object, given: bool) -> str:
    """Why ``arguments`` (not a tool call's arguments, ``tool_arguments``) are not, and what would be."""
    wanted = "an object of arguments, or a string holding one in JSON"
    if not given:
        return f"is missing; it must be {wanted} ({{}} for none)"
    if not isinstance(arguments, str):
        return f"is {json_type(arguments)}; it must be {wanted}"
    try:
        parsed = json.loads(arguments)
    except ValueError as error:
        return f"is a string that is not valid JSON ({error}); it must hold an object of arguments in JSON"
    return f"is a string holding {json_type(parsed)} in JSON; it must hold an object of arguments"


def tool_arguments(arguments: object) -> dict | None:
    """A tool call's arguments as the object chat templates expect, or None if they are not one.

    OpenAI's API writes them as a string of JSON; Hugging Face templates read an object (most write it
    with ``tojson``, which would quote a string a second time), so a string holding an object is parsed.
    """
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    return arguments if isinstance(arguments, dict) else None


def _check_tools(tools: object) -> str | None:
    if tools is None:
        return None
    if not isinstance(tools, list):
        return f'"tools" is {json_type(tools)}; it must be a list of {TOOL_SHAPE}'
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name.strip():
            return f'tools[{i}] has no "function" with a "name"; each tool must be {TOOL_SHAPE}'
    return None


def validate(record: dict, fmt: str) -> str | None:
    """Why `record` is not a usable `fmt` record ("what is wrong; what would work"), or None if it is."""
    if fmt == "chat":
        return _check_chat(record.get("messages")) or _check_tools(record.get("tools"))
    if fmt == "sharegpt":
        return _check_sharegpt(record.get("conversations")) or _check_tools(record.get("tools"))
    if fmt == "alpaca":
        if "input" in record and (reason := _check_string(record, "input", allow_empty=True)):
            return reason
        return _check_string(record, "instruction") or _check_string(record, "output")
    if fmt == "prompt-completion":
        return _check_string(record, "prompt") or _check_string(record, "completion")
    if fmt == "text":
        return _check_string(record, "text")
    raise ValueError(f"unknown format {fmt!r}")


def chat_messages(record: dict, fmt: str) -> list[dict]:
    """The conversation of a valid chat or ShareGPT record as the messages a chat template reads.

    Only the fields templates use are kept, content is always a string (a tool-calling turn's null
    becomes ""), and tool-call arguments are objects (see ``tool_arguments``).
    """
    if fmt == "sharegpt":
        return [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in record["conversations"]]
    messages = []
    for message in record["messages"]:
        kept = {"role": message["role"], "content": message.get("content") or ""}
        if message.get("tool_calls"):
            kept["tool_calls"] = [_with_parsed_arguments(call) for call in message["tool_calls"]]
        if message["role"] == "tool":
            kept.update(
                {key: message[key] for key in ("tool_call_id", "name") if message.get(key) is not None}
            )
        messages.append(kept)
    return messages


def _with_parsed_arguments(call: dict) -> dict:
    function = call["function"]
    return {**call, "function": {**function, "arguments": tool_arguments(function.get("arguments"))}}


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
    if fmt in ("chat", "sharegpt"):
        messages = chat_messages(record, fmt)
        tools = record.get("tools") or None
        uses_tools = tools is not None or any(m["role"] == "tool" or "tool_calls" in m for m in messages)
        if getattr(tokenizer, "chat_template", None):
            field = "conversations" if fmt == "sharegpt" else "messages"  # for messages naming a turn
            return Rendered(*render_with_chat_template(messages, tokenizer, tools, uses_tools, field))
        if uses_tools:
            raise DataError(
                "the conversation has tools, tool calls or tool results, but the model has no chat template "
                f"and the default one writes plain conversations only; {USE_A_TOOL_MODEL}"
            )
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
