"""Prompts written the way a job's training data was (an Alpaca instruction, a chat turn),
tokenized as training tokenized them."""

from __future__ import annotations

from dataclasses import dataclass


# -- prompts --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptStyle:
    """How a prompt is written before it is tokenized: the job's training format, or as it is."""

    name: str  # "raw", "alpaca", "chat"
    chat_template: bool  # chat: the tokenizer's own template (else lowmem-ft's default headers)

    def describe(self, chat: bool = False) -> str:
        how = "the tokenizer's chat template" if self.chat_template else "lowmem-ft's default chat headers"
        if chat:
            trained = ", as the job's chat data was" if self.name == "chat" else ""
            return f"the conversation in {how}{trained}"
        if self.name == "alpaca":
            return "--prompt written as the job's alpaca instructions were (--raw sends it as it is)"
        if self.name == "chat":
            return f"a user turn in {how}, as the job's chat data was (--raw sends --prompt as it is)"
        return "--prompt as it is"


def prompt_style(tokenizer, job_format: str | None, raw: bool) -> PromptStyle:
    """The job's data format decides (data/formats.py renders it the same way for training)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if raw or job_format not in ("alpaca", "chat", "sharegpt"):
        return PromptStyle("raw", has_template)
    return PromptStyle("alpaca" if job_format == "alpaca" else "chat", has_template)


def render_chat(messages: list[dict], tokenizer, chat_template: bool) -> str:
    """The conversation so far followed by the assistant's header: what the model continues."""
    if chat_template:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # The headers a job trained on chat data learned when its tokenizer had no template.
    from lowmem_ft.data.formats import DEFAULT_CHAT_HEADERS, DEFAULT_CHAT_SEPARATOR

    turns = [DEFAULT_CHAT_HEADERS[m["role"]] + m["content"] for m in messages]
    return DEFAULT_CHAT_SEPARATOR.join([*turns, DEFAULT_CHAT_HEADERS["assistant"]])


def encode(tokenizer, text: str) -> list[int]:
    """Token ids as training made them (data/tokenize.py): BOS in front unless the text has it."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if tokenizer.bos_token_id is not None and not text.startswith(tokenizer.bos_token):
        ids.insert(0, tokenizer.bos_token_id)
    return ids
