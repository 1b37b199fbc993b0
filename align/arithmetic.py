"""The quickstart task: sums of two numbers, small enough for a CPU and rewardable by rule.

    python -m align.arithmetic            # rewrites data/corpus.txt and data/arithmetic/*.jsonl

Every (a, b) pair lands in exactly one split, with its mirror (b, a) in the same split, so the held-out
questions are sums the tiny base never read during pretraining and SFT never trained on. The corpus states
sums in prose (that is what the base model "knows"); the QA pairs teach the assistant format
"17 + 25 = 42. The answer is 42." that the rule rewards check.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

LOW, HIGH = 10, 99  # operands are two-digit numbers
SPLITS = {"heldout": 0.1, "rl": 0.1}  # the rest is "train" (corpus and SFT)
SEED = 1234

QUESTION_FORMS = [
    "What is {a} + {b}?",
    "Compute {a} + {b}.",
    "What is the sum of {a} and {b}?",
    "Add {a} and {b}.",
    "How much is {a} plus {b}?",
]

CORPUS_FORMS = [
    "{a} + {b} = {s}.",
    "The sum of {a} and {b} is {s}.",
    "Adding {b} to {a} gives {s}.",
    "{a} plus {b} equals {s}.",
    "{a} and {b} make {s}, so the answer is {s}.",
    "If you add {a} and {b}, you get {s}.",
    "{name} had {a} {things} and found {b} more, so now {name} has {s} {things}.",
    "There are {a} {things} in one box and {b} in another: {s} {things} in all.",
]
NAMES = ["Ada", "Ben", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana", "Ivan", "Jun"]
THINGS = ["apples", "books", "coins", "shells", "stones", "cards", "pens", "stamps"]


def answer(a: int, b: int) -> str:
    """The completion the SFT data teaches, ending in the final number the rule rewards read."""
    return f"{a} + {b} = {a + b}. The answer is {a + b}."


def split_pairs(seed: int = SEED) -> dict[str, list[tuple[int, int]]]:
    """Every unordered pair {a, b} goes to one split; both orders of it go there."""
    rng = random.Random(seed)
    unordered = [(a, b) for a in range(LOW, HIGH + 1) for b in range(a, HIGH + 1)]
    rng.shuffle(unordered)
    splits: dict[str, list[tuple[int, int]]] = {}
    start = 0
    for name, fraction in SPLITS.items():
        count = int(len(unordered) * fraction)
        splits[name] = unordered[start : start + count]
        start += count
    splits["train"] = unordered[start:]
    return {
        name: sorted({p for a, b in pairs for p in ((a, b), (b, a))}) for name, pairs in splits.items()
    }


def corpus(pairs: list[tuple[int, int]], rng: random.Random, documents: int) -> list[str]:
    """Short documents of sums stated in prose; one document per line."""
    docs = []
    for _ in range(documents):
        sentences = []
        for _ in range(rng.randint(3, 6)):
            a, b = rng.choice(pairs)
            form = rng.choice(CORPUS_FORMS)
            sentences.append(form.format(a=a, b=b, s=a + b, name=rng.choice(NAMES), things=rng.choice(THINGS)))
        docs.append(" ".join(sentences))
    return docs


def qa_rows(pairs: list[tuple[int, int]], rng: random.Random, count: int) -> list[dict]:
    chosen = rng.sample(pairs, min(count, len(pairs)))
    return [
        {"question": rng.choice(QUESTION_FORMS).format(a=a, b=b), "answer": answer(a, b)} for a, b in chosen
    ]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main(out: Path = Path("data"), seed: int = SEED) -> None:
    rng = random.Random(seed)
    splits = split_pairs(seed)
    (out / "corpus.txt").write_text("\n".join(corpus(splits["train"], rng, documents=6000)) + "\n")
    write_jsonl(out / "arithmetic" / "sft_train.jsonl", qa_rows(splits["train"], rng, count=2000))
    write_jsonl(out / "arithmetic" / "sft_heldout.jsonl", qa_rows(splits["heldout"], rng, count=200))
    print(f"wrote {out}/corpus.txt and {out}/arithmetic/ (pairs per split: "
          + ", ".join(f"{k}={len(v)}" for k, v in splits.items()) + ")")


if __name__ == "__main__":
    main()
