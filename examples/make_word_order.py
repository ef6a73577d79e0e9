"""Write examples/word-order.jsonl: a second, synthetic task for comparing methods.

    python examples/make_word_order.py                  # writes examples/word-order.jsonl
    python examples/make_word_order.py --out my.jsonl

Each prompt-completion record asks for a short list of common English words sorted alphabetically,
reversed, or with its first and last word swapped ("Sort alphabetically: pear apple fig" →
" apple fig pear"). Unlike python-qa.jsonl, nothing of it is in the tiny model's pretraining
corpus: the model must learn a rule, not recall text. Deterministic: stdlib only, fixed seed, the
same file on every Python version.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 0
RECORDS = 440  # 396 training examples after a 10% evaluation split: 25 steps of 16 per epoch
WORDS = """
apple river stone paper window garden table light music number letter water orange yellow
silver market forest candle bridge castle dragon engine flower guitar island jacket kitten
ladder mirror needle ocean pencil rabbit saddle tunnel violin wagon basket button carpet
dinner finger hammer kettle lemon monkey pepper pocket rocket summer turtle winter zebra
""".split()  # noqa: SIM905 (a list literal of 53 strings reads worse)
TASKS = {
    "Sort alphabetically:": sorted,
    "Reverse the order:": lambda words: words[::-1],
    "Swap the first and last word:": lambda words: [words[-1], *words[1:-1], words[0]],
}
DEFAULT_OUT = Path(__file__).resolve().parent / "word-order.jsonl"


def records(n: int = RECORDS, seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        instruction, rule = rng.choice(list(TASKS.items()))
        words = rng.sample(WORDS, rng.randint(3, 6))
        out.append({"prompt": f"{instruction} {' '.join(words)}\n", "completion": " ".join(rule(words))})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    rows = records()
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} records to {args.out}")


if __name__ == "__main__":
    main()
