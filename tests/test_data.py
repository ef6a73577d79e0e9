"""Tests for lowmem_ft.data: reading, formats, labels, packing, splitting and batching."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lowmem_ft.data import (
    Batcher,
    Example,
    Record,
    collate,
    detect_format,
    eval_batches,
    pack_examples,
    read_jsonl,
    render,
    split_eval,
    tokenize_records,
)
from lowmem_ft.data.formats import ALPACA_PROMPT_NO_INPUT, ALPACA_PROMPT_WITH_INPUT
from lowmem_ft.errors import DataError

# A small ChatML-like template: every turn ends with "</s>", the generation prompt is the assistant header.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Say hello."},
    {"role": "assistant", "content": "Hello there!"},
    {"role": "user", "content": "Now say bye."},
    {"role": "assistant", "content": "Bye."},
]


def write_jsonl(tmp_path: Path, rows: list[dict], name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def trained_text(tokenizer, example: Example) -> str:
    """The decoded tokens that carry loss, in order."""
    return tokenizer.decode([label for label in example.labels if label != -100])


def untrained_text(tokenizer, example: Example) -> str:
    return tokenizer.decode(
        [t for t, label in zip(example.input_ids, example.labels, strict=True) if label == -100]
    )


def tokenize_one(tokenizer, data: dict, fmt: str, seq_len: int = 512) -> Example:
    examples, stats = tokenize_records(
        [Record(line=1, data=data, path="data.jsonl")], fmt, tokenizer, seq_len
    )
    assert stats.examples == 1
    return examples[0]


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# --- formats -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"text": "hi"}, "text"),
        ({"prompt": "a", "completion": "b"}, "prompt-completion"),
        ({"instruction": "a", "input": "", "output": "b"}, "alpaca"),
        ({"instruction": "a", "output": "b", "id": 7}, "alpaca"),
        ({"messages": [], "source": "x"}, "chat"),
        ({"conversations": [], "id": "x"}, "sharegpt"),
        ({"messages": [], "conversations": []}, "chat"),
        ({"text": "hi", "id": 3, "source": "web"}, "text"),
        ({"prompt": "a"}, None),
        ({"question": "a", "answer": "b"}, None),
    ],
)
def test_detect_format(record, expected):
    assert detect_format(record) == expected


def test_text_trains_everything_and_eos(tiny_tokenizer):
    example = tokenize_one(tiny_tokenizer, {"text": "The cat sat on the mat."}, "text")
    assert example.input_ids[0] == tiny_tokenizer.bos_token_id
    assert example.labels[0] == -100
    assert example.input_ids[-1] == tiny_tokenizer.eos_token_id
    assert trained_text(tiny_tokenizer, example) == "The cat sat on the mat.</s>"
    assert len(example.input_ids) == len(example.labels)


def test_bos_not_doubled_when_text_starts_with_it(tiny_tokenizer):
    example = tokenize_one(tiny_tokenizer, {"text": "<s>Hello world"}, "text")
    assert example.input_ids.count(tiny_tokenizer.bos_token_id) == 1


def test_prompt_completion_trains_only_completion(tiny_tokenizer):
    record = {"prompt": "Question: what is 2+2?\nAnswer:", "completion": " four"}
    rendered = render(record, "prompt-completion", tiny_tokenizer)
    assert rendered.text == "Question: what is 2+2?\nAnswer: four"
    example = tokenize_one(tiny_tokenizer, record, "prompt-completion")
    assert trained_text(tiny_tokenizer, example) == " four</s>"
    assert untrained_text(tiny_tokenizer, example) == "<s>Question: what is 2+2?\nAnswer:"


@pytest.mark.parametrize("with_input", [True, False])
def test_alpaca_prompt_and_labels(tiny_tokenizer, with_input):
    record = {"instruction": "Name the capital.", "input": "France" if with_input else "", "output": "Paris."}
    rendered = render(record, "alpaca", tiny_tokenizer)
    if with_input:
        expected_prompt = ALPACA_PROMPT_WITH_INPUT.format(instruction="Name the capital.", input="France")
        assert "### Input:\nFrance\n\n" in rendered.text
    else:
        expected_prompt = ALPACA_PROMPT_NO_INPUT.format(instruction="Name the capital.")
        assert "### Input:" not in rendered.text
    assert rendered.text == expected_prompt + "Paris."
    assert rendered.text.startswith("Below is an instruction that describes a task")
    assert rendered.train_spans == ((len(expected_prompt), len(rendered.text)),)
    example = tokenize_one(tiny_tokenizer, record, "alpaca")
    assert trained_text(tiny_tokenizer, example) == "Paris.</s>"


def test_default_chat_template_trains_assistant_turns(tiny_tokenizer):
    rendered = render({"messages": CONVERSATION}, "chat", tiny_tokenizer)
    assert rendered.text == (
        "### System:\nBe brief.\n\n### User:\nSay hello.\n\n### Assistant:\nHello there!\n\n"
        "### User:\nNow say bye.\n\n### Assistant:\nBye."
    )
    assert [rendered.text[a:b] for a, b in rendered.train_spans] == ["Hello there!", "Bye."]
    example = tokenize_one(tiny_tokenizer, {"messages": CONVERSATION}, "chat")
    assert trained_text(tiny_tokenizer, example) == "Hello there!Bye.</s>"


def test_chat_ending_with_user_turn_does_not_train_eos(tiny_tokenizer):
    example = tokenize_one(tiny_tokenizer, {"messages": CONVERSATION[:4]}, "chat")
    assert trained_text(tiny_tokenizer, example) == "Hello there!"
    assert example.labels[-1] == -100


def test_model_chat_template_trains_only_assistant_turns(chat_tokenizer):
    rendered = render({"messages": CONVERSATION}, "chat", chat_tokenizer)
    assert rendered.text == chat_tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    # Each span is the reply plus the template's end-of-turn marker.
    assert [rendered.text[a:b] for a, b in rendered.train_spans] == ["Hello there!</s>", "Bye.</s>"]
    example = tokenize_one(chat_tokenizer, {"messages": CONVERSATION}, "chat")
    assert trained_text(chat_tokenizer, example) == "Hello there!</s>Bye.</s>"
    untrained = untrained_text(chat_tokenizer, example)
    assert "Say hello." in untrained and "Now say bye." in untrained and "<|assistant|>" in untrained
    # The text already ends with EOS, so none is appended.
    assert example.input_ids.count(chat_tokenizer.eos_token_id) == 5


def test_chat_template_fallback_finds_reply_text(tiny_tokenizer):
    # The generation prompt differs from how assistant turns are rendered, so the prefix property fails.
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE.replace(
        "{% if add_generation_prompt %}<|assistant|>", "{% if add_generation_prompt %}<|reply|>"
    )
    example = tokenize_one(tokenizer, {"messages": CONVERSATION}, "chat")
    assert trained_text(tokenizer, example) == "Hello there!Bye."


def test_chat_template_error_names_file_and_line(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    record = Record(line=4, data={"messages": CONVERSATION}, path="data.jsonl")
    with pytest.raises(DataError) as excinfo:
        tokenize_records([record], "chat", tokenizer, 64)
    assert str(excinfo.value).startswith("data.jsonl:4: ")
    assert "roles must alternate" in str(excinfo.value)


# --- ShareGPT and tool use --------------------------------------------------------------------------------

SHAREGPT = [
    {"from": "system", "value": "Be brief."},
    {"from": "human", "value": "Say hello."},
    {"from": "gpt", "value": "Hello there!"},
    {"from": "user", "value": "Now say bye."},
    {"from": "bard", "value": "Bye."},
]


@pytest.mark.parametrize("model_template", [False, True])
def test_sharegpt_is_rendered_and_trained_as_chat(tiny_tokenizer, chat_tokenizer, model_template):
    tokenizer = chat_tokenizer if model_template else tiny_tokenizer
    assert render({"conversations": SHAREGPT}, "sharegpt", tokenizer) == render(
        {"messages": CONVERSATION}, "chat", tokenizer
    )
    example = tokenize_one(tokenizer, {"conversations": SHAREGPT}, "sharegpt")
    assert trained_text(tokenizer, example) == trained_text(
        tokenizer, tokenize_one(tokenizer, {"messages": CONVERSATION}, "chat")
    )
    assert "Say hello." in untrained_text(tokenizer, example)


# A template that writes tools, tool calls and tool results (as Qwen2.5's and Llama 3.1's do, in their
# own markup). CHAT_TEMPLATE above writes only each message's content: a template from before tools.
TOOL_TEMPLATE = (
    "{% if tools %}<|tools|>\n{% for t in tools %}{{ t.function.name }};{% endfor %}</s>{% endif %}"
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<call>{{ c.function.name }} {{ c.function.arguments | tojson }}</call>"
    "{% endfor %}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},  # OpenAI's shape: null content
    {"role": "tool", "content": "18 C, sunny", "tool_call_id": "call_1"},
    {"role": "assistant", "content": "18 C and sunny."},
]


@pytest.fixture(scope="module")
def tool_tokenizer(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = TOOL_TEMPLATE
    return tokenizer


def test_tool_calls_are_trained_and_tool_results_are_not(tool_tokenizer):
    record = {"messages": TOOL_CONVERSATION, "tools": TOOLS}
    rendered = render(record, "chat", tool_tokenizer)
    # The arguments string is parsed, so the template's tojson writes the object once, not a quoted string.
    assert rendered.text == (
        "<|tools|>\nget_weather;</s><|user|>\nWeather in Paris?</s>"
        '<|assistant|>\n<call>get_weather {"city": "Paris"}</call></s>'
        "<|tool|>\n18 C, sunny</s><|assistant|>\n18 C and sunny.</s>"
    )
    assert [rendered.text[a:b] for a, b in rendered.train_spans] == [
        '<call>get_weather {"city": "Paris"}</call></s>',
        "18 C and sunny.</s>",
    ]
    example = tokenize_one(tool_tokenizer, record, "chat")
    untrained = untrained_text(tool_tokenizer, example)
    assert "18 C, sunny" in untrained and "get_weather;" in untrained and "Weather in Paris?" in untrained


def test_sharegpt_tool_turns_go_to_the_template_as_tool_messages(tool_tokenizer):
    turns = [
        {"from": "human", "value": "Weather?"},
        {"from": "tool", "value": "18 C"},
        {"from": "gpt", "value": "Warm."},
    ]
    rendered = render({"conversations": turns}, "sharegpt", tool_tokenizer)
    assert "<|tool|>\n18 C</s>" in rendered.text
    assert [rendered.text[a:b] for a, b in rendered.train_spans] == ["Warm.</s>"]


# A template that drops role "tool" messages, and one that writes tool calls but not the tools list.
NO_TOOL_RESULTS = TOOL_TEMPLATE.replace(
    "{% for m in messages %}", "{% for m in messages if m.role != 'tool' %}"
)
NO_TOOLS_LIST = TOOL_TEMPLATE.replace("{% if tools %}", "{% if false %}")
REJECTS_TOOL_ROLE = CHAT_TEMPLATE.replace(
    "{% for m in messages %}",
    "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('unknown role tool') }}{% endif %}",
)
# The generation prompt is not how assistant turns start, so the prefix property fails.
OTHER_PROMPT = TOOL_TEMPLATE.replace(
    "{% if add_generation_prompt %}<|assistant|>", "{% if add_generation_prompt %}<|reply|>"
)


# (the model's chat template, None for none; the record; what the refusal says)
TOOL_REFUSALS = {
    "no template": (None, {"messages": TOOL_CONVERSATION}, "model has no chat template and the default one"),
    "tools, no template": (None, {"messages": CONVERSATION, "tools": TOOLS}, "model has no chat template"),
    "sharegpt tool, no template": (
        None,
        {"conversations": [*SHAREGPT, {"from": "tool", "value": "x"}]},
        "model has no chat template",
    ),
    "ignores calls": (CHAT_TEMPLATE, {"messages": TOOL_CONVERSATION}, "template ignores tool calls, so it"),
    "ignores tools": (NO_TOOLS_LIST, {"messages": CONVERSATION, "tools": TOOLS}, 'ignores the "tools" list'),
    "drops results": (
        NO_TOOL_RESULTS,
        {"messages": TOOL_CONVERSATION},
        "leaves out the tool result in messages[2]",
    ),
    "rejects tool role": (
        REJECTS_TOOL_ROLE,
        {"messages": TOOL_CONVERSATION},
        "rejected this conversation (unknown",
    ),
    "no prefix property": (
        OTHER_PROMPT,
        {"messages": TOOL_CONVERSATION},
        "tool call in messages[1] cannot be found",
    ),
}


@pytest.mark.parametrize(("template", "record", "reason"), TOOL_REFUSALS.values(), ids=TOOL_REFUSALS.keys())
def test_tool_use_the_template_cannot_write_is_refused(tiny_tokenizer, template, record, reason):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = template
    fmt = detect_format(record)
    with pytest.raises(DataError) as excinfo:
        tokenize_records([Record(line=3, data=record, path="tools.jsonl")], fmt, tokenizer, 256)
    message = str(excinfo.value)
    assert message.startswith("tools.jsonl:3: ") and reason in message
    assert "use a model whose chat template" in message and "\n" not in message


def test_tool_result_errors_in_other_containers_name_the_record(tiny_tokenizer):
    record = Record(line=2, data={"messages": TOOL_CONVERSATION}, path="data.json", unit="record")
    with pytest.raises(DataError, match=r"^data\.json: record 2: the conversation has tools"):
        tokenize_records([record], "chat", tiny_tokenizer, 64)


# --- truncation, packing, splitting ----------------------------------------------------------------------


def test_truncation_and_dropping_counts(tiny_tokenizer):
    long_prompt = "word " * 40
    records = [
        Record(1, {"prompt": "Q:", "completion": " short answer"}),
        Record(2, {"prompt": "Q:", "completion": " " + "long answer " * 20}),  # truncated, still trained
        Record(3, {"prompt": long_prompt, "completion": " lost"}),  # response cut away entirely: dropped
    ]
    examples, stats = tokenize_records(records, "prompt-completion", tiny_tokenizer, seq_len=16)
    assert (stats.examples, stats.truncated, stats.dropped_no_target) == (2, 1, 1)
    assert len(examples[1].input_ids) == 16
    assert examples[0].input_ids[-1] == tiny_tokenizer.eos_token_id  # the short one keeps its EOS
    assert tiny_tokenizer.eos_token_id not in examples[1].input_ids
    assert stats.tokens == sum(len(e.input_ids) for e in examples)
    assert stats.target_tokens == sum(label != -100 for e in examples for label in e.labels)


def test_pack_cuts_rows_from_whole_examples_not_from_examples_cut_to_a_row(tmp_path, tiny_tokenizer):
    """--pack: an example longer than --seq-len goes on in the next row. Each was cut to --seq-len
    before packing, so ten 200-token texts at --seq-len 32 trained on 10 rows of their first 32
    tokens (84% of the text lost, and every end of text with it)."""
    from lowmem_ft.config import RunConfig
    from lowmem_ft.run_data import load_data

    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps({"text": f"{i} " + "word " * 150}) + "\n" for i in range(10)))
    config = RunConfig.create(model="tiny", data=path, seq_len=4096, eval_fraction=0)
    whole = load_data(config, tiny_tokenizer)
    packed = load_data(config.replace(seq_len=32, pack=True), tiny_tokenizer)
    tokens = whole.train.table().input_ids
    rows = packed.train.table()
    assert np.array_equal(rows.input_ids, tokens) and rows.trained.sum() == whole.train.table().trained.sum()
    assert set(rows.lengths()[:-1]) == {32} and len(rows) == -(-len(tokens) // 32)
    assert packed.train.stats.truncated == 0


def test_a_problem_with_the_eval_data_says_it_was_given_as_eval_data(tmp_path, tiny_tokenizer):
    from lowmem_ft.config import RunConfig
    from lowmem_ft.run_data import load_data

    train, held_out = tmp_path / "train.jsonl", tmp_path / "dev.jsonl"
    train.write_text(json.dumps({"text": "a b c"}) + "\n")
    held_out.write_text(json.dumps({"prompt": "a"}) + "\n")
    with pytest.raises(DataError) as error:
        load_data(RunConfig.create(model="tiny", data=train, eval_data=held_out), tiny_tokenizer)
    assert str(error.value).startswith(f"{held_out}:1: no known format")
    assert str(error.value).endswith(" (given as --eval-data)")


def test_one_record_holds_none_out_and_a_warning_says_so(tmp_path, tiny_tokenizer):
    from lowmem_ft.config import RunConfig
    from lowmem_ft.run_data import load_data

    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"prompt": "Say hi.", "completion": " Hi."}) + "\n")
    config = RunConfig.create(model="tiny", data=path, batch_size=1)
    data = load_data(config, tiny_tokenizer)
    assert len(data.eval) == 0 and data.warnings(config) == [
        "no evaluation: one record is too few to hold any out for --eval-fraction 0.1; give more records, "
        "or --eval-data"
    ]
    assert (
        load_data(config.replace(eval_fraction=0), tiny_tokenizer).warnings(config.replace(eval_fraction=0))
        == []
    )


def test_a_seq_len_that_leaves_nothing_to_learn_says_which_would(tmp_path, tiny_tokenizer):
    """Every response starts beyond --seq-len: the error says so, and gives the --seq-len that keeps
    half of them (it said "check --seq-len")."""
    import re

    from lowmem_ft.config import RunConfig
    from lowmem_ft.errors import UserError
    from lowmem_ft.run_data import load_data

    path = tmp_path / "long-prompts.jsonl"
    rows = [{"instruction": "Tell me a story. " * (2 + i), "output": f"Story {i}."} for i in range(12)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = RunConfig.create(model="tiny", data=path, seq_len=30, eval_fraction=0)
    with pytest.raises(UserError) as error:
        load_data(config, tiny_tokenizer)
    said = str(error.value)
    assert said.startswith(
        f"{path}: none of its 12 training records has anything to learn from within its first 30 tokens "
        "(the responses start after them); --seq-len "
    ) and said.endswith(" keeps half of them")
    seq_len = int(re.search(r"--seq-len (\d+) keeps", said).group(1))
    kept = load_data(config.replace(seq_len=seq_len), tiny_tokenizer).train.stats.examples
    assert (
        kept >= 6 and load_data(config.replace(seq_len=seq_len - 1), tiny_tokenizer).train.stats.examples < 6
    )


def test_pack_examples_keeps_tokens_and_labels():
    # the first two tokens of each example untrained, like a prompt; a label is its token's id
    examples = [
        Example(list(range(i * 10, i * 10 + n)), [-100] * 2 + list(range(i * 10 + 2, i * 10 + n)))
        for i, n in enumerate([5, 9, 3, 7])
    ]
    rows = pack_examples(examples, seq_len=8)
    assert [len(row.input_ids) for row in rows] == [8, 8, 8]
    assert [len(row.labels) for row in rows] == [8, 8, 8]
    assert [t for row in rows for t in row.input_ids] == [t for e in examples for t in e.input_ids]
    assert [x for row in rows for x in row.labels] == [x for e in examples for x in e.labels]
    assert [len(row.input_ids) for row in pack_examples(examples[:2], seq_len=8)] == [8, 6]


def test_split_eval_is_seeded_disjoint_and_ordered():
    examples = [Example([i], [i]) for i in range(20)]
    train, evaluation = split_eval(examples, 0.2, seed=1)
    assert (len(train), len(evaluation)) == (16, 4)
    ids = [e.input_ids[0] for e in train], [e.input_ids[0] for e in evaluation]
    assert set(ids[0]).isdisjoint(ids[1]) and set(ids[0]) | set(ids[1]) == set(range(20))
    assert ids[0] == sorted(ids[0]) and ids[1] == sorted(ids[1])
    again = split_eval(examples, 0.2, seed=1)[1]
    assert [e.input_ids[0] for e in again] == ids[1]
    other = split_eval(examples, 0.2, seed=2)[1]
    assert [e.input_ids[0] for e in other] != ids[1]


def test_split_eval_sizes():
    examples = [Example([i], [i]) for i in range(5)]
    assert [len(part) for part in split_eval(examples, 0.0, seed=0)] == [5, 0]
    assert [len(part) for part in split_eval(examples, 0.01, seed=0)] == [4, 1]  # at least one
    assert [len(part) for part in split_eval(examples[:2], 0.9, seed=0)] == [1, 1]  # at least one trains
    assert [len(part) for part in split_eval(examples[:1], 0.5, seed=0)] == [1, 0]


# --- batching --------------------------------------------------------------------------------------------


def test_collate_pads_right_with_masked_labels():
    batch = collate([Example([5, 6, 7], [-100, 6, 7]), Example([8], [8])], pad_id=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


def numbered_examples(n: int) -> list[Example]:
    """Example i has length 1 + i % 3 and first token i, so batches can be traced back to examples."""
    return [Example([i] + [100] * (i % 3), [i] + [100] * (i % 3)) for i in range(n)]


def step_ids(step: list[dict[str, torch.Tensor]]) -> list[int]:
    return [i for micro in step for i in micro["input_ids"][:, 0].tolist()]


def test_batcher_micro_batches_and_epoch_wraparound():
    batcher = Batcher(numbered_examples(7), batch_size=5, micro_batch_size=2, pad_id=0, seed=3)
    assert batcher.steps_per_epoch == 2
    epoch0 = torch.randperm(7, generator=torch.Generator().manual_seed(3)).tolist()
    epoch1 = torch.randperm(7, generator=torch.Generator().manual_seed(4)).tolist()
    first = batcher.next_step()
    assert [micro["input_ids"].shape[0] for micro in first] == [2, 2, 1]
    assert step_ids(first) == epoch0[:5]
    assert step_ids(batcher.next_step()) == epoch0[5:] + epoch1[:3]  # the slice continues into epoch 1
    assert batcher.state_dict() == {"epoch": 1, "position": 3}
    assert batcher.examples_seen == 10
    json.dumps(batcher.state_dict())  # must be JSON-serialisable


def test_batcher_is_deterministic_and_resumes(tmp_path):
    examples = numbered_examples(9)

    def make() -> Batcher:
        return Batcher(examples, batch_size=4, micro_batch_size=3, pad_id=0, seed=11)

    reference = make()
    expected = [reference.next_step() for _ in range(7)]
    other = make()
    assert [step_ids(other.next_step()) for _ in range(7)] == [step_ids(step) for step in expected]

    interrupted = make()
    for _ in range(3):
        interrupted.next_step()
    state = json.loads(json.dumps(interrupted.state_dict()))
    resumed = make()
    resumed.load_state_dict(state)
    for step in expected[3:]:
        got = resumed.next_step()
        assert len(got) == len(step)
        for got_micro, want_micro in zip(got, step, strict=True):
            for key in ("input_ids", "attention_mask", "labels"):
                assert torch.equal(got_micro[key], want_micro[key])


def test_eval_batches_in_order():
    batches = list(eval_batches(numbered_examples(5), micro_batch_size=2, pad_id=0))
    assert [b["input_ids"][:, 0].tolist() for b in batches] == [[0, 1], [2, 3], [4]]


# --- reading files ---------------------------------------------------------------------------------------


def test_read_jsonl_happy_path(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(
        b'\xef\xbb\xbf{"prompt": "a", "completion": "b", "id": 1}\r\n\n   \n'
        b'{"prompt": "c", "completion": "d", "source": "x"}\n'
    )
    records, fmt, skipped = read_jsonl(path)
    assert fmt == "prompt-completion"
    assert skipped == 0
    assert [r.line for r in records] == [1, 4]
    assert records[1].data["completion"] == "d"
    # two such files joined with `cat`: the second one's mark is mid-file (it was "invalid JSON")
    joined = tmp_path / "joined.jsonl"
    joined.write_bytes(path.read_bytes() + b'\xef\xbb\xbf{"prompt": "e", "completion": "f"}\n')
    assert [r.data["prompt"] for r in read_jsonl(joined)[0]] == ["a", "c", "e"]
    (tmp_path / "mark-only.jsonl").write_bytes(b"\xef\xbb\xbf\n")
    with pytest.raises(DataError, match="mark-only.jsonl: file has only blank lines"):
        read_jsonl(tmp_path / "mark-only.jsonl")


def test_forced_format_is_used(tmp_path):
    path = write_jsonl(tmp_path, [{"text": "a"}, {"text": "b"}])
    assert read_jsonl(path, fmt="text")[1] == "text"
    # a record that has every field of the forced format is read as it, whatever else it holds
    # (tatsu-lab/alpaca's rows: instruction, input, output and the prompt rendered as "text");
    # before, --format text was refused as "line is alpaca format"
    rows = [{"instruction": f"Double {i}.", "input": "", "output": f"{2 * i}", "text": f"Double {i}: {2 * i}"}
            for i in range(3)]  # fmt: skip
    path = write_jsonl(tmp_path, rows, name="tatsu.jsonl")
    for fmt in ("text", "alpaca"):
        assert read_jsonl(path, fmt=fmt)[1] == fmt
    assert detect_format(rows[0]) == "alpaca"  # without --format: as before
    with pytest.raises(DataError, match="line is alpaca format but --format chat was given"):
        read_jsonl(path, fmt="chat")


def test_tool_use_and_sharegpt_records_are_read(tmp_path):
    plain = {"role": "assistant", "content": "Hi.", "tool_calls": []}  # an empty list is no call
    call = {**CALL, "function": {"name": "f", "arguments": {"x": 1}}}  # arguments as an object
    rows = [
        {"messages": TOOL_CONVERSATION, "tools": TOOLS},
        {"messages": [{"role": "user", "content": "q"}, plain, {"role": "assistant", "tool_calls": [call]}]},
    ]
    assert read_jsonl(write_jsonl(tmp_path, rows))[1:] == ("chat", 0)
    path = write_jsonl(tmp_path, [{"conversations": SHAREGPT}], name="sharegpt.jsonl")
    assert read_jsonl(path)[1] == "sharegpt"


C = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "hello"}


def _line(obj) -> bytes:
    return json.dumps(obj).encode() + b"\n"


# (content of the file, None for no file; forced format; line of the error or None if file-level; reason)
MALFORMED = {
    "invalid json": (
        _line({"text": "a"}) + b'{"text": "b" "c"}\n',
        "auto",
        2,
        "invalid JSON (Expecting ',' delimiter",
    ),
    "unterminated string": (
        _line({"text": "a"}) + b'{"text": "b',  # (the last line, cut short)
        "auto",
        2,
        "invalid JSON (Unterminated string starting at column 10); each line",
    ),
    "json list": (b'["a", "b"]\n', "auto", 1, "JSON is a list, not an object"),
    "json string": (b'"just text"\n', "auto", 1, "JSON is a string, not an object"),
    "not utf-8": (_line({"text": "a"}) + b'{"text": "caf\xe9"}\n', "auto", 2, "not valid UTF-8"),
    "unknown fields": (
        _line({"question": "q", "answer": "a"}),
        "auto",
        1,
        'no known format for fields "answer", "question"',
    ),
    "number for text": (_line({"text": 5}), "auto", 1, '"text" is a number; it must be a string'),
    "null completion": (_line({"prompt": "p", "completion": None}), "auto", 1, '"completion" is null'),
    "empty text": (_line({"text": "  \t"}), "auto", 1, '"text" is empty'),
    "alpaca without output": (_line({"instruction": "i", "input": ""}), "auto", 1, 'alpaca needs "output"'),
    "alpaca empty output": (_line({"instruction": "i", "output": ""}), "auto", 1, '"output" is empty'),
    "mixed formats": (
        _line({"prompt": "p", "completion": "c"}) + b"\n" + _line({"instruction": "i", "output": "o"}),
        "auto",
        3,
        "line is alpaca format but the file is prompt-completion (detected from line 1)",
    ),
    "chat without assistant": (_line({"messages": [C]}), "auto", 1, "no assistant message"),
    "chat bad role": (
        _line({"messages": [C, {"role": "bot", "content": "x"}]}),
        "auto",
        1,
        'messages[1] has role "bot"',
    ),
    "chat messages not a list": (_line({"messages": "hi"}), "auto", 1, '"messages" is a string'),
    "chat empty messages": (_line({"messages": []}), "auto", 1, '"messages" is an empty list'),
    "chat message not object": (_line({"messages": ["hi", A]}), "auto", 1, "messages[0] is a string"),
    "chat content number": (
        _line({"messages": [C, {"role": "assistant", "content": 3}]}),
        "auto",
        1,
        "messages[1].content is a number",
    ),
    "chat null content without tool calls": (
        _line({"messages": [C, {"role": "assistant", "content": None}]}),
        "auto",
        1,
        "messages[1].content is null; it must be a string",
    ),
    "chat message without content": (  # (said "is null" before: the key is not there at all)
        _line({"messages": [C, {"role": "assistant"}]}),
        "auto",
        1,
        "messages[1].content is missing; it must be a string",
    ),
    "sharegpt turn without value": (
        _line({"conversations": [{"from": "human", "text": "hi"}]}),
        "auto",
        1,
        "conversations[0].value is missing; it must be a string",
    ),
    "tool calls from a user": (
        _line({"messages": [{**C, "tool_calls": [CALL]}, A]}),
        "auto",
        1,
        'messages[0] has "tool_calls" but role "user"; only assistant messages call tools',
    ),
    "tool calls not a list": (
        _line({"messages": [C, {**A, "tool_calls": CALL}]}),
        "auto",
        1,
        "messages[1].tool_calls is an object; it must be a list of",
    ),
    "tool call without function": (
        _line({"messages": [C, {**A, "tool_calls": [{"name": "f", "arguments": {}}]}]}),
        "auto",
        1,
        'messages[1].tool_calls[0] has no "function" object; each call must be {"type": "function"',
    ),
    "tool call without name": (
        _line({"messages": [C, {**A, "tool_calls": [{"function": {"arguments": {}}}]}]}),
        "auto",
        1,
        "messages[1].tool_calls[0].function.name is missing; it must be the name of the tool called",
    ),
    "tool call with an empty name": (
        _line({"messages": [C, {**A, "tool_calls": [{"function": {"name": " ", "arguments": {}}}]}]}),
        "auto",
        1,
        "messages[1].tool_calls[0].function.name is empty; it must be the name of the tool called",
    ),
    "tool call arguments, a string that is not JSON": (
        _line({"messages": [C, {**A, "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]}),
        "auto",
        1,
        "messages[1].tool_calls[0].function.arguments is a string that is not valid JSON (Expecting "
        "property name enclosed in double quotes: line 1 column 2 (char 1)); it must hold an object of "
        "arguments in JSON",
    ),
    "tool call arguments, a string holding a list": (
        _line({"messages": [C, {**A, "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}]}),
        "auto",
        1,
        "messages[1].tool_calls[0].function.arguments is a string holding a list in JSON; it must hold an "
        "object",
    ),
    "tool call arguments missing": (
        _line({"messages": [C, {**A, "tool_calls": [{"function": {"name": "f"}}]}]}),
        "auto",
        1,
        "messages[1].tool_calls[0].function.arguments is missing; it must be an object of arguments, or a "
        "string holding one in JSON ({} for none)",
    ),
    "tool call arguments a number": (
        _line({"messages": [C, {**A, "tool_calls": [{"function": {"name": "f", "arguments": 5}}]}]}),
        "auto",
        1,
        "messages[1].tool_calls[0].function.arguments is a number; it must be an object of arguments",
    ),
    "tool call id not a string": (
        _line({"messages": [C, A, {"role": "tool", "content": "r", "tool_call_id": 7}]}),
        "auto",
        1,
        "messages[2].tool_call_id is a number; it must be a string",
    ),
    "only tool turns": (
        _line({"messages": [C, {"role": "tool", "content": "r"}]}),
        "auto",
        1,
        "no assistant message with content or tool calls",
    ),
    "tools not a list": (
        _line({"messages": [C, A], "tools": "get_weather"}),
        "auto",
        1,
        '"tools" is a string',
    ),
    "tool without a name": (
        _line({"messages": [C, A], "tools": [{"type": "function", "function": {}}]}),
        "auto",
        1,
        'tools[0] has no "function" with a "name"; each tool must be {"type": "function"',
    ),
    "sharegpt bad from": (
        _line({"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}),
        "auto",
        1,
        'conversations[1] has "from": "bot"; it must be one of "system", "human"',
    ),
    "sharegpt no from": (
        _line({"conversations": [{"value": "q"}]}),
        "auto",
        1,
        'conversations[0] has no "from"',
    ),
    "sharegpt value not text": (
        _line({"conversations": [{"from": "gpt", "value": ["a"]}]}),
        "auto",
        1,
        "conversations[0].value is a list; it must be a string",
    ),
    "sharegpt not a list": (_line({"conversations": {}}), "auto", 1, '"conversations" is an object'),
    "sharegpt empty": (_line({"conversations": []}), "auto", 1, '"conversations" is an empty list'),
    "sharegpt turn not object": (_line({"conversations": ["hi"]}), "auto", 1, "conversations[0] is a string"),
    "sharegpt no reply": (
        _line({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": " "}]}),
        "auto",
        1,
        'no "gpt" turn with text',
    ),
    "sharegpt tools not a list": (
        _line({"conversations": [{"from": "gpt", "value": "a"}], "tools": {}}),
        "auto",
        1,
        '"tools" is an object',
    ),
    "forced format mismatch": (
        _line({"text": "a"}) + _line({"prompt": "p", "completion": "c"}),
        "text",
        2,
        "line is prompt-completion format but --format text was given",
    ),
    "empty file": (b"", "auto", None, "file is empty"),
    "blank lines only": (b"\n  \n\t\n", "auto", None, "file has only blank lines"),
    "missing file": (None, "auto", None, "no such file"),
    "unknown format name": (_line({"text": "a"}), "csv", None, "unknown format 'csv'; use one of auto, text"),
}


@pytest.mark.parametrize(("content", "fmt", "line", "reason"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_files_raise_located_errors(tmp_path, content, fmt, line, reason):
    path = tmp_path / "data.jsonl"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError) as excinfo:
        read_jsonl(path, fmt=fmt)
    message = str(excinfo.value)
    assert message.startswith(f"{path}:{line}: " if line else f"{path}: ")
    assert reason in message
    assert "\n" not in message
    assert "; " in message  # "what is wrong; what would work"
    assert excinfo.value.exit_code == 2


def test_directory_is_rejected(tmp_path):
    with pytest.raises(DataError, match="is a directory"):
        read_jsonl(tmp_path)


def test_skip_bad_lines_counts_and_decides_format_from_first_valid_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(
        b"not json\n"
        + _line({"text": ""})  # detected as text but invalid: must not fix the format
        + _line({"prompt": "p", "completion": "c"})
        + _line({"text": "other format"})
        + b"\xff\xfe\n"
        + _line({"prompt": "p2", "completion": "c2"})
    )
    records, fmt, skipped = read_jsonl(path, skip_bad_lines=True)
    assert fmt == "prompt-completion"
    assert skipped == 4
    assert [r.line for r in records] == [3, 6]
    with pytest.raises(DataError, match=r":1: invalid JSON"):
        read_jsonl(path)


def test_skip_bad_lines_with_nothing_valid(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"[1]\n{}\n")
    with pytest.raises(DataError) as excinfo:
        read_jsonl(path, skip_bad_lines=True)
    assert str(excinfo.value).startswith(f"{path}: no valid records (2 bad lines skipped); ")
    path.write_bytes(b"[1]\n")
    with pytest.raises(DataError) as excinfo:
        read_jsonl(path, skip_bad_lines=True)
    assert str(excinfo.value).startswith(f"{path}: no valid records (1 bad line skipped); ")  # (was "lines")


TURN = '{"role": "user", "content": "a"}'


@pytest.mark.parametrize(
    "line",
    [
        '{"messages": [' + TURN + ', {"role": "assistant", "content": "b", "content": "c"}]}',
        '{"messages": [' + TURN + ', {"role": "assistant", "content": "\\ud800"}]}',
    ],
)
def test_a_key_given_twice_or_a_lone_surrogate_deep_in_a_line_is_found_after_plain_lines(line, tmp_path):
    # (a plain line skips the search for them: the line before must not make the next one skip it)
    plain = '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}'
    path = tmp_path / "data.jsonl"
    path.write_text(f"{plain}\n{line}\n{plain}\n")
    with pytest.raises(DataError, match=r"data\.jsonl:2: .*(appears twice|lone UTF-16 surrogate)"):
        read_jsonl(path)
