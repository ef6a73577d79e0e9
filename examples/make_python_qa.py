"""Write examples/python-qa.jsonl: Alpaca-format questions and answers about Python's builtins.

    python examples/make_python_qa.py                 # writes examples/python-qa.jsonl
    python examples/make_python_qa.py --out my.jsonl

Each record asks about one built-in function, class or exception, one method of str, list, dict,
set, tuple, bytes, int or float, or one function of a few standard-library modules (math,
itertools, re, ...): "What does the Python built-in `len` do?", "Explain the `str.split` method.".
The answer is the first paragraph of the object's docstring. Some questions carry a short code
snippet as their input.

Why this data: the embedded ``tiny`` model was pretrained (scripts/pretrain_tiny.py) on these same
docstrings, so it already knows the answers as running text. Fine-tuning on this file teaches it the
question/answer format, and the eval loss drops visibly within a few hundred steps on a CPU.

Deterministic: stdlib only, no network, fixed seed. The docstrings come from the running Python, so
the file is reproducible for a given Python version (the shipped one was made with CPython 3.11).
"""

from __future__ import annotations

import argparse
import builtins
import importlib
import inspect
import json
import random
import re
from pathlib import Path

SEED = 0
MAX_OUTPUT_CHARS = 400
MIN_DOC_CHARS = 20
TYPES = [str, list, dict, set, tuple, bytes, int, float]
# Standard-library modules whose docstrings are also in the tiny model's pretraining corpus.
MODULES = [
    "math", "os.path", "itertools", "functools", "random", "statistics", "json", "re", "heapq", "bisect",
    "textwrap", "collections",
]  # fmt: skip
DEFAULT_OUT = Path(__file__).resolve().parent / "python-qa.jsonl"

FUNCTION_QUESTIONS = [
    "What does the Python built-in `{name}` do?",
    "Explain the built-in function `{name}`.",
    "What is `{name}()` used for in Python?",
    "Describe Python's `{name}` built-in.",
]
CLASS_QUESTIONS = [
    "What is the built-in type `{name}` in Python?",
    "Explain the Python built-in class `{name}`.",
    "Describe what `{name}` is in Python.",
]
EXCEPTION_QUESTIONS = [
    "What does the Python exception `{name}` mean?",
    "When does Python raise `{name}`?",
    "Explain the built-in exception `{name}`.",
]
METHOD_QUESTIONS = [
    "Explain the `{name}` method.",
    "What does `{name}` do in Python?",
    "How does the `{method}` method of `{type}` objects work?",
    "Describe the Python method `{name}`.",
]
MODULE_QUESTIONS = [
    "What does `{name}` do in Python?",
    "Explain `{method}` from the `{type}` module.",
    "What is `{name}` used for?",
    "Describe the standard-library function `{name}`.",
]
ATTRIBUTE_QUESTIONS = [
    "What is the `{name}` attribute in Python?",
    "Explain the `{name}` attribute.",
]
SNIPPET_QUESTIONS = [
    "What does `{short}` do in this code?",
    "Explain the call to `{short}` in the following snippet.",
]
# Short contexts for some common names; a question about one of these uses the snippet as its
# input half of the time, so the dataset exercises Alpaca's "input" field too.
SNIPPETS = {
    "abs": "distance = abs(a - b)",
    "all": "ok = all(x > 0 for x in values)",
    "any": "has_error = any(line.startswith('E') for line in log)",
    "enumerate": "for i, name in enumerate(names):\n    print(i, name)",
    "isinstance": "if isinstance(value, str):\n    value = [value]",
    "len": "n = len(items)",
    "max": "best = max(scores)",
    "min": "lowest = min(prices)",
    "open": "with open('data.txt') as f:\n    text = f.read()",
    "print": "print('total:', total)",
    "range": "for i in range(10):\n    squares.append(i * i)",
    "reversed": "for item in reversed(stack):\n    print(item)",
    "round": "price = round(amount * 1.2, 2)",
    "sorted": "ranked = sorted(players, key=lambda p: p.score)",
    "sum": "total = sum(prices)",
    "zip": "for name, age in zip(names, ages):\n    print(name, age)",
    "str.join": "line = ', '.join(words)",
    "str.split": "fields = line.split(',')",
    "str.strip": "name = raw_name.strip()",
    "str.replace": "path = path.replace('\\\\', '/')",
    "str.startswith": "if url.startswith('https://'):\n    secure = True",
    "str.lower": "key = word.lower()",
    "str.format": "message = 'Hello, {}!'.format(name)",
    "list.append": "results.append(value)",
    "list.extend": "queue.extend(new_jobs)",
    "list.pop": "last = stack.pop()",
    "list.sort": "numbers.sort(reverse=True)",
    "dict.get": "port = config.get('port', 8080)",
    "dict.items": "for key, value in settings.items():\n    print(key, value)",
    "dict.setdefault": "groups.setdefault(key, []).append(item)",
    "dict.update": "defaults.update(overrides)",
    "set.add": "seen.add(word)",
    "set.union": "everyone = admins.union(users)",
    "bytes.decode": "text = payload.decode('utf-8')",
    "int.to_bytes": "header = length.to_bytes(4, 'big')",
    "float.is_integer": "if ratio.is_integer():\n    ratio = int(ratio)",
}

# Docstrings of C functions often open with call signatures ("int([x]) -> integer",
# "zip(*iterables) --> zip object"): a paragraph starting with one is not an answer.
SIGNATURE_LINE = re.compile(r"^(async )?[\w.]+\(.*\)\s*(-+>.*)?$")
# ... unless the description follows on the same line: "D.pop(k[,d]) -> v, remove specified key ...",
# "D.clear() -> None.  Remove all items from D." or "partial(func, *args) - new function with ...".
SIGNATURE_PREFIX = re.compile(r"^[\w.]+\(.*?\)\s*(-+>\s*\w+[,.]|-)\s+")


def answer_from_doc(doc: str | None) -> str | None:
    """The first prose paragraph of ``doc``, on one line, at most ~MAX_OUTPUT_CHARS; None if unusable."""
    if not doc:
        return None
    for paragraph in doc.split("\n\n"):
        lines = [line.strip() for line in paragraph.strip().splitlines()]
        if lines:
            lines[0] = SIGNATURE_PREFIX.sub("", lines[0])
        if not lines or SIGNATURE_LINE.match(lines[0]) or lines[0].startswith(">>>"):
            continue  # signatures and doctest examples are not an answer
        text = " ".join(" ".join(lines).split())  # one line, single spaces
        text = text[0].upper() + text[1:]
        if len(text) < MIN_DOC_CHARS or text.endswith(":"):  # too short, or introduces a list we cut off
            return None
        return cap_at_sentence(text)
    return None


def cap_at_sentence(text: str) -> str:
    """Keep whole sentences up to MAX_OUTPUT_CHARS, always at least the first one."""
    sentences = re.split(r"(?<=[.!?])\s+(?=[A-Z])", text)  # not after "e.g. a"
    kept = sentences[0]
    for sentence in sentences[1:]:
        # Code flattened onto one line ("then does: for k in E: D[k] = E[k]") reads badly: stop there.
        if len(kept) + 1 + len(sentence) > MAX_OUTPUT_CHARS or any(c in sentence for c in "=[]{}"):
            break
        kept += " " + sentence
    return kept


def collect_subjects() -> list[tuple[str, str, object]]:
    """(kind, dotted name, object) for every builtin, method and module function, in a fixed order."""
    subjects = []
    for name in sorted(vars(builtins)):
        obj = getattr(builtins, name)
        if name.startswith("_"):
            continue
        if inspect.isclass(obj) and issubclass(obj, BaseException):
            subjects.append(("exception", name, obj))
        elif inspect.isclass(obj):
            subjects.append(("class", name, obj))
        elif inspect.isbuiltin(obj):  # leaves out help/exit/copyright, which the site module adds
            subjects.append(("function", name, obj))
    for cls in TYPES:
        for attr in sorted(vars(cls)):
            if attr.startswith("_"):
                continue
            member = inspect.getattr_static(cls, attr)
            kind = "attribute" if inspect.isgetsetdescriptor(member) else "method"
            subjects.append((kind, f"{cls.__name__}.{attr}", getattr(cls, attr)))
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        public = getattr(module, "__all__", None) or [
            name for name in vars(module) if not name.startswith("_")
        ]
        for name in sorted(public):
            obj = getattr(module, name, None)
            if inspect.isroutine(obj) or inspect.isclass(obj):
                subjects.append(("module", f"{module_name}.{name}", obj))
    return subjects


def make_question(kind: str, name: str, rng: random.Random) -> tuple[str, str]:
    """(instruction, input) for one subject, with the phrasing drawn from ``rng``."""
    if name in SNIPPETS and rng.random() < 0.5:
        short = name.rsplit(".", 1)[-1]
        return rng.choice(SNIPPET_QUESTIONS).format(short=short), SNIPPETS[name]
    templates = {
        "function": FUNCTION_QUESTIONS,
        "class": CLASS_QUESTIONS,
        "exception": EXCEPTION_QUESTIONS,
        "method": METHOD_QUESTIONS,
        "attribute": ATTRIBUTE_QUESTIONS,
        "module": MODULE_QUESTIONS,
    }[kind]
    type_name, _, method = name.rpartition(".")
    return rng.choice(templates).format(name=name, type=type_name, method=method), ""


def build_records() -> list[dict[str, str]]:
    rng = random.Random(SEED)
    records, seen_answers = [], set()
    for kind, name, obj in collect_subjects():
        answer = answer_from_doc(inspect.getdoc(obj))
        # Many methods share a docstring (list.count and tuple.count, IOError and OSError). One copy
        # only, so no answer sits in both the training and the evaluation split.
        if answer is None or answer in seen_answers:
            continue
        seen_answers.add(answer)
        instruction, context = make_question(kind, name, rng)
        records.append({"instruction": instruction, "input": context, "output": answer})
    # Mixed order, so that a split taken by position sees every kind of question.
    rng.shuffle(records)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    records = build_records()
    with args.out.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"wrote {len(records)} records to {args.out}")


if __name__ == "__main__":
    main()
