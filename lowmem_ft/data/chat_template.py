"""Chat and ShareGPT records through the model's own chat template (formats.py renders the
other shapes): the text, and which of it each assistant turn is, to train on."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import date, datetime

from lowmem_ft.errors import DataError

USE_A_TOOL_MODEL = (
    "use a model whose chat template supports tools (an instruct model such as Qwen2.5-Instruct or "
    "Llama-3.1-Instruct)"
)


@contextlib.contextmanager
def templates_dated(day: date | None) -> Iterator[None]:
    """While records render: the day chat templates write is ``day`` (None: the clock's). A template
    reads it from transformers' ``strftime_now`` (Llama-3's "Today Date: 26 Jul 2024"), and so from
    the clock, which would make a resume on another day train on other text than the run it
    continues. transformers passes a template only plain data (no function of ours), so what can be
    set is its clock: its module's ``datetime``, for the moment the records render. (The background
    encoding does not render. A template that stops reading that clock is caught by
    tests/test_large_data.py.)"""
    if day is None:
        yield
        return
    from transformers.utils import chat_template_utils as templates

    if getattr(templates, "datetime", None) is not datetime:
        yield
        return

    class OnThatDay(datetime):
        @classmethod
        def now(cls, tz=None):
            return cls.combine(day, datetime.min.time(), tzinfo=tz)

    templates.datetime = OnThatDay
    try:
        yield
    finally:
        templates.datetime = datetime


def render_with_chat_template(
    messages: list[dict], tokenizer, tools: list[dict] | None, uses_tools: bool, field: str
) -> tuple[str, tuple[tuple[int, int], ...]]:
    """The conversation rendered with the model's own template, and the character spans to train:
    each assistant turn, tool calls included.

    A turn's span is the difference between the conversation up to and including that turn and the
    conversation before it with the generation prompt (the assistant header) added. That span covers
    the reply, its tool calls, and whatever end-of-turn marker the template writes, which the model
    must learn to emit. Tool results are context, like user turns. Templates that rewrite earlier
    turns (some drop reasoning, some add dates) break the prefix property; then we fall back to
    finding the reply's text in the full rendering.
    """
    from jinja2 import TemplateError  # jinja2 is present whenever a tokenizer has a chat template

    def apply(conversation: list[dict], add_generation_prompt: bool = False, tools=tools) -> str:
        try:
            return tokenizer.apply_chat_template(
                conversation, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False
            )
        except TemplateError as error:
            what_works = USE_A_TOOL_MODEL if uses_tools else "arrange the messages the way this model expects"
            raise DataError(
                f"the model's chat template rejected this conversation ({error}); {what_works}"
            ) from error

    full = apply(messages)
    if uses_tools and (reason := _tools_left_out(messages, tools, full, apply, field)):
        raise DataError(
            f"the model's chat template {reason}, so it cannot train on tool use; {USE_A_TOOL_MODEL}"
        )
    spans: list[tuple[int, int]] = []
    previous_end = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or not (message["content"].strip() or "tool_calls" in message):
            continue
        prefix = apply(messages[:i], add_generation_prompt=True) if i > 0 else ""
        upto = apply(messages[: i + 1])
        if full.startswith(upto) and upto.startswith(prefix) and len(prefix) >= previous_end:
            span = (len(prefix), len(upto))
        elif "tool_calls" in message:
            # How a template writes a call is its own business, so there is no text to search for.
            raise DataError(
                f"the model's chat template writes earlier turns differently once later turns follow, so "
                f"the tool call in {field}[{i}] cannot be found in the text to train on; use a model whose "
                "chat template writes each turn the same whatever follows it"
            )
        else:
            # Stripped, because some templates trim the content they render.
            content = message["content"].strip()
            start = full.find(content, previous_end)
            if start < 0:
                continue  # the template dropped this reply; nothing to train on here
            span = (start, start + len(content))
        spans.append(span)
        previous_end = span[1]
    return full, tuple(spans)


def _tools_left_out(
    messages: list[dict], tools: list[dict] | None, full: str, apply, field: str
) -> str | None:
    """What of the conversation's tool use the template does not write into ``full``, or None.

    A template written before tool calling existed renders such a conversation without complaint: it
    writes each message's content and ignores the rest. Rendering again without the tool parts shows
    whether they changed anything.
    """
    if tools is not None and apply(messages, tools=None) == full:
        return 'ignores the "tools" list'
    if any("tool_calls" in m for m in messages):
        without_calls = [{k: v for k, v in m.items() if k != "tool_calls"} for m in messages]
        if apply(without_calls) == full:
            return "ignores tool calls"
    for i, message in enumerate(messages):
        if message["role"] == "tool" and message["content"].strip() not in full:
            return f"leaves out the tool result in {field}[{i}]"
    return None
