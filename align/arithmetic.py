"""The quickstart task: sums of two- and three-digit numbers, small enough for a CPU and rewardable by rule.

    align tiny data            # rewrites data/corpus.txt and data/arithmetic/*.jsonl (python -m align.arithmetic)

Each operand has two or three digits (even odds), so questions range from easy (23 + 45) to hard (487 + 365),
which leaves the RL stages room above the SFT policy. Every unordered pair {a, b} belongs to one split (a seeded
hash decides), so held-out and RL questions are sums the tiny base never read during pretraining and SFT never
trained on. The corpus states sums in prose (what the base "knows"); the QA pairs teach the assistant format
"17 + 25 = 42. The answer is 42." that the rule rewards check.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

DIGITS = (2, 3)
SPLITS = {"heldout": 0.05, "rl": 0.05}  # the rest is "train" (corpus and SFT)
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


def split_of(a: int, b: int, seed: int = SEED) -> str:
    """The split of the unordered pair {a, b}: the same for (a, b) and (b, a), fixed by the seed."""
    key = f"{seed}:{min(a, b)}:{max(a, b)}".encode()
    u = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64
    for name, fraction in SPLITS.items():
        if u < fraction:
            return name
        u -= fraction
    return "train"


def sample_pair(rng: random.Random, split: str) -> tuple[int, int]:
    """A random pair of the split; each operand first draws its number of digits."""
    while True:
        a, b = (rng.randrange(10 ** (d - 1), 10**d) for d in (rng.choice(DIGITS), rng.choice(DIGITS)))
        if split_of(a, b) == split:
            return a, b


def corpus(rng: random.Random, documents: int) -> list[str]:
    """Short documents of training-split sums stated in prose; one document per line."""
    docs = []
    for _ in range(documents):
        sentences = []
        for _ in range(rng.randint(3, 6)):
            a, b = sample_pair(rng, "train")
            form = rng.choice(CORPUS_FORMS)
            sentences.append(form.format(a=a, b=b, s=a + b, name=rng.choice(NAMES), things=rng.choice(THINGS)))
        docs.append(" ".join(sentences))
    return docs


def qa_rows(rng: random.Random, split: str, count: int) -> list[dict]:
    rows, seen = [], set()
    while len(rows) < count:
        a, b = sample_pair(rng, split)
        if (a, b) not in seen:
            seen.add((a, b))
            rows.append({"question": rng.choice(QUESTION_FORMS).format(a=a, b=b), "answer": answer(a, b)})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main(out: Path = Path("data"), seed: int = SEED) -> None:
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "corpus.txt").write_text("\n".join(corpus(rng, documents=8000)) + "\n")
    write_jsonl(out / "arithmetic" / "sft_train.jsonl", qa_rows(rng, "train", count=2000))
    write_jsonl(out / "arithmetic" / "sft_heldout.jsonl", qa_rows(rng, "heldout", count=200))
    print(f"wrote {out}/corpus.txt and {out}/arithmetic/")


if __name__ == "__main__":
    main()
