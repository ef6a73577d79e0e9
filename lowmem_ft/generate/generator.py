"""The generation loop: streaming tokens as they are final, greedy or sampled, and `--chat`'s conversation."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.generation.streamers import BaseStreamer

from lowmem_ft.devices import measures_free_memory
from lowmem_ft.engine.streaming import LayerStreamer, place_model
from lowmem_ft.errors import UserError
from lowmem_ft.generate.loading import job_record, load_weights
from lowmem_ft.generate.memory import generation_memory, layers_to_stream, refuse
from lowmem_ft.generate.options import GenerateOptions, OnText
from lowmem_ft.generate.prompts import PromptStyle, encode, prompt_style, render_chat
from lowmem_ft.hardware import detect_budget
from lowmem_ft.models.units import decoder_layers
from lowmem_ft.precision import dtype_name
from lowmem_ft.sizes import format_bytes


def free_gpu_bytes(device: torch.device) -> int:
    """NVML's free memory on ``device``, read before CUDA starts (as the planner reads it); torch's
    where NVML has no answer."""
    budget = detect_budget(cuda_index=device.index or 0)
    return budget.gpu_bytes if budget.gpu is not None else torch.cuda.mem_get_info(device)[0]


# -- generating -----------------------------------------------------------------------------------
class _Streamer(BaseStreamer):
    """Receives token ids from ``model.generate`` and hands on the text that is final.

    The new tokens are decoded whole each time (a few hundred decodes of a few hundred tokens cost
    nothing beside a forward pass), so what is handed on adds up to the decoded reply, not to a
    concatenation of pieces decoded alone; a trailing partial character or whitespace waits for
    the next token, which may change it.
    """

    def __init__(self, tokenizer, on_text: OnText | None):
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.tokens: list[int] = []
        self.text = ""
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate hands over the prompt first
            self._prompt_seen = True
            return
        self.tokens.extend(value.reshape(-1).tolist())
        self._emit(final=False)

    def end(self) -> None:
        self._emit(final=True)

    def _emit(self, final: bool) -> None:
        decoded = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if not final:
            decoded = decoded.rstrip("\ufffd").rstrip()
        if len(decoded) > len(self.text) and decoded.startswith(self.text):
            piece, self.text = decoded[len(self.text) :], decoded
            if self.on_text is not None:
                self.on_text(piece)


@dataclass
class Generator:
    """A loaded model ready to generate: ``complete`` a prompt, or ``conversation`` for --chat."""

    model: torch.nn.Module
    tokenizer: object
    options: GenerateOptions
    device: torch.device
    dtype: torch.dtype
    style: PromptStyle
    lines: list[tuple[str, str]]
    placement: str | None = None  # how the model was placed, where the reader should know (layers streamed)
    streamer: LayerStreamer | None = field(default=None, repr=False)  # where layers are streamed
    _placed: bool = field(default=False, repr=False)

    def describe(self, chat: bool = False) -> list[tuple[str, str]]:
        """(label, text) lines: what was loaded, where it runs, how the prompt (or, for ``chat``,
        the conversation) is written."""
        o = self.options
        how = "greedy" if o.temperature == 0 else f"sampled, temperature {o.temperature}, top-p {o.top_p}"
        if o.temperature and o.top_k:
            how += f", top-k {o.top_k}"
        if o.temperature and o.seed is not None:
            how += f", seed {o.seed}"
        return [
            *self.lines,
            ("device", f"{self.device} {dtype_name(self.dtype)}"),
            ("prompt", self.style.describe(chat)),
            ("decoding", f"{how}, at most {o.max_new_tokens} new tokens"),
            *([("memory", self.placement)] if self.placement else []),
        ]

    def _encode_prompt(self, prompt: str) -> list[int]:
        if self.style.name == "alpaca":
            from lowmem_ft.data.formats import ALPACA_PROMPT_NO_INPUT

            return encode(self.tokenizer, ALPACA_PROMPT_NO_INPUT.format(instruction=prompt))
        if self.style.name == "chat":
            user = [{"role": "user", "content": prompt}]
            return encode(self.tokenizer, render_chat(user, self.tokenizer, self.style.chat_template))
        return encode(self.tokenizer, prompt)

    def prompt_ids(self, prompt: str) -> list[int]:
        """``prompt`` written in the job's style and tokenized; refused if the reply would not fit in
        the positions the model reads."""
        ids = self._encode_prompt(prompt)
        room = self.max_positions()
        if room is not None and len(ids) + self.options.max_new_tokens > room:
            raise UserError(
                f"the prompt is {len(ids):,} tokens and --max-new-tokens {self.options.max_new_tokens} "
                f"more would pass the {room:,} positions this model reads; shorten the prompt or lower "
                "--max-new-tokens"
            )
        return ids

    def complete(self, prompt: str, on_text: OnText | None = None) -> str:
        """The model's continuation of ``prompt`` (written in the job's style), streamed to ``on_text``."""
        return self.generate_ids(self.prompt_ids(prompt), on_text)

    def conversation(self) -> Conversation:
        """A chat (``--chat``): the tokenizer's chat template, or the default headers a job trained
        on chat data learned. A base model without a template has no format to chat in."""
        if self.style.name == "chat" or self.style.chat_template:
            return Conversation(self)
        raise UserError(
            "--chat needs the tokenizer's chat template to write the conversation, and this model's "
            "tokenizer has none (nor was the job trained on chat data); use --prompt TEXT"
        )

    def max_positions(self) -> int | None:
        config = self.model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)

    def generate_ids(self, ids: list[int], on_text: OnText | None = None) -> str:
        """Generate after the token ids ``ids``; the new text, streamed to ``on_text`` as it comes."""
        self._place(len(ids) + self.options.max_new_tokens)
        input_ids = torch.tensor([ids], device=self.device)
        streamer = _Streamer(self.tokenizer, on_text)
        try:
            with torch.inference_mode():
                self.model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    generation_config=self._generation_config(),
                    streamer=streamer,
                )
        except torch.OutOfMemoryError:
            # A conversation's KV cache grows turn by turn past what was checked at the first prompt.
            raise UserError(
                f"out of memory on {self.device} with a {len(ids):,}-token prompt and up to "
                f"{self.options.max_new_tokens} new tokens; lower --max-new-tokens or start a shorter "
                "conversation"
            ) from None
        return streamer.text

    def _generation_config(self):
        """What ``generate`` is told: the model's own end, padding and start ids, and for the rest
        what the user chose, spelled out. transformers fills every field left unset (None) from the
        model's generation_config.json, then from its own defaults: an Instruct model's shipped
        top-k, top-p or repetition penalty would change a greedy answer, and an unset top-k would
        be 50, not off."""
        from transformers import GenerationConfig

        o, model_config = self.options, self.model.generation_config
        sampled = o.temperature > 0
        config = GenerationConfig(**_NEUTRAL)
        for name in _TOKEN_IDS:
            setattr(config, name, getattr(model_config, name, None))
        config.max_new_tokens = o.max_new_tokens
        config.do_sample = sampled
        if sampled:  # (greedy keeps the neutral values: set otherwise, transformers warns they go unused)
            config.temperature, config.top_p, config.top_k = o.temperature, o.top_p, o.top_k  # top-k 0: off
            config.min_p = 0.0
        config.pad_token_id = self.tokenizer.pad_token_id
        if config.eos_token_id is None:
            config.eos_token_id = self.tokenizer.eos_token_id
        return config

    def place(self, prompt_tokens: int) -> None:
        """Place the model for a prompt of ``prompt_tokens`` tokens and ``max_new_tokens`` more (done
        by the first generation if not before; a GPU's free memory decides how)."""
        self._place(prompt_tokens + self.options.max_new_tokens)

    def _place(self, tokens: int) -> None:
        """Move the model to its device at the first prompt, once it is known to fit there; where
        its weights do not, the decoder layers that do not stay in host memory and are streamed
        through the device at each forward, by the engine training streams them with."""
        if self._placed:
            return
        streamed = 0
        if measures_free_memory(self.device):
            params = sum(p.numel() for p in self.model.parameters())
            memory = generation_memory(self.model.config, params, self.dtype, tokens)
            free = free_gpu_bytes(self.device)
            if memory.total > free:
                layers = decoder_layers(self.model)
                layer_bytes = [
                    sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in layers
                ]
                streamed = layers_to_stream(memory, layer_bytes, free)
                if streamed is None:
                    refuse(memory, free, self.device, tokens, layer_bytes)
                self.placement = (
                    f"{streamed} of {len(layers)} decoder layers stay in host memory and cross to "
                    f"{self.device} at each token (slower): the weights ({format_bytes(memory.weights)}) "
                    f"and a KV cache for {tokens:,} tokens do not fit the {format_bytes(free)} free there"
                )
        self.streamer = place_model(self.model, self.device, streamed)
        self._placed = True
        if self.options.seed is not None:
            # Once, just before the first draw: the session's draws then follow from the seed alone,
            # as `torch.manual_seed(seed); model.generate(...)` would (loading a LoRA adapter draws too).
            torch.manual_seed(self.options.seed)


# The ids generation starts, stops and pads with: the only fields taken from the model's own.
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
# Every way of choosing the next token that a model's generation_config.json may set, set to what
# leaves the model's distribution as it is (plain greedy, or sampling from all of it): what
# lowmem-ft's options say is then all that applies. (Token lists a model forces or bans stay its own.)
_NEUTRAL = dict(
    num_beams=1, temperature=1.0, top_k=50, top_p=1.0, typical_p=1.0, epsilon_cutoff=0.0,
    eta_cutoff=0.0, repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0,
    min_length=0, length_penalty=1.0, renormalize_logits=False, remove_invalid_values=False,
)  # fmt: skip


@dataclass
class Conversation:
    """A chat's history; each ``reply`` adds the user's message and the model's answer to it."""

    generator: Generator
    messages: list[dict] = field(default_factory=list)
    dropped: int = 0  # the oldest exchanges left out to stay within the model's positions

    def reply(self, message: str, on_text: OnText | None = None) -> str:
        g = self.generator
        self.messages.append({"role": "user", "content": message})
        room = g.max_positions()
        while True:
            ids = encode(g.tokenizer, render_chat(self.messages, g.tokenizer, g.style.chat_template))
            if room is None or len(ids) + g.options.max_new_tokens <= room or len(self.messages) < 3:
                break
            # The model reads a fixed number of positions: forget the oldest exchange, keep the rest.
            del self.messages[:2]
            self.dropped += 1
        if room is not None and len(ids) + g.options.max_new_tokens > room:
            self.messages.pop()
            raise UserError(
                f"this message is {len(ids):,} tokens and --max-new-tokens {g.options.max_new_tokens} more "
                f"would pass the {room:,} positions this model reads; write a shorter one or lower "
                "--max-new-tokens"
            )
        answer = g.generate_ids(ids, on_text)
        self.messages.append({"role": "assistant", "content": answer})
        return answer


def load_generator(target: str, options: GenerateOptions) -> Generator:
    """Check ``options``, then load ``target`` (a job directory, its result, or a model) on the host."""
    options.validate()
    device = options.resolved_device()
    dtype = options.compute_dtype(device)
    loaded = load_weights(target, options, dtype)
    loaded.model.eval()
    job_format = None
    if loaded.job_dir is not None:
        job_format = (job_record(loaded.job_dir).get("data") or {}).get("format")
    style = prompt_style(loaded.tokenizer, job_format, options.raw)
    return Generator(loaded.model, loaded.tokenizer, options, device, dtype, style, loaded.lines)
