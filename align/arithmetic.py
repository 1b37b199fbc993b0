"""The quickstart task: sums of two- and three-digit numbers, small enough for a CPU and rewardable by rule.

    align tiny data            # rewrites data/corpus.txt and data/arithmetic/*.jsonl (python -m align.arithmetic)

Each operand has two or three digits (even odds). Every unordered pair {a, b} belongs to one split (a seeded hash
decides), so held-out and RL questions are sums the tiny base never read during pretraining and SFT never trained
on.

Answers come in two styles, and the gap between them is what RL has to find:
- direct: "263 + 745 = 1008. The answer is 1008." The model must produce the sum's digits left to right, though
  the carries come from the right: often wrong on three-digit sums.
- worked: "3 + 5 = 8. 6 + 4 = 10. 2 + 7 + 1 = 10. The answer is 1008." Column by column from the right (the
  shorter operand padded with 0, a carry written as "+ 1"), each step one-digit arithmetic: right far more often.
The corpus states sums in prose and in worked form (what the base "knows"). The SFT data is mostly direct
(`WORKED_SHARE`), so the SFT policy usually answers directly; exact-match reward then teaches it to show its work.

RL prompts (`rl_prompts.jsonl`) are questions of their own split with their reference answers: what RL learns
on them must carry over to the held-out sums to show, rather than sharpen what SFT memorised.

Preference pairs for the reward model: chosen is a correct answer; rejected is, in proportions 2:1:2:2, a direct
answer with a wrong number (as many digits as the sum) or a worked answer with one wrong column (its sum wrong
with it), both against a correct worked answer, or a malformed answer (cut short, bare, columns without the
answer sentence) or a rambling one (filler and repetition, or a worked answer that runs on into the next sum as
the base does), against a correct answer of either style. The reward model thus prefers shown, correct work,
the behaviour RL should find; `cues` measures how far rankers that do not add get.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
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
WORKED_FORMS = [
    "{a} + {b}, digit by digit: {w}",
    "Adding {a} and {b} column by column: {w}",
    "What is {a} + {b}? {w}",
    "To add {a} and {b}, start from the right. {w}",
]
CORPUS_WORKED_SHARE = 0.4  # of corpus sentences: the base learns worked sums in pretraining, which SFT alone
                           # cannot teach it (LoRA SFT on worked answers learned their form, 0% held-out)
NAMES = ["Ada", "Ben", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana", "Ivan", "Jun"]
THINGS = ["apples", "books", "coins", "shells", "stones", "cards", "pens", "stamps"]


WORKED_SHARE = 0.3  # of SFT answers (train and held-out); the rest are direct


def direct(a: int, b: int) -> str:
    """The sum stated at once, ending in the final number the rule rewards read."""
    return f"{a} + {b} = {a + b}. The answer is {a + b}."


def columns(a: int, b: int) -> list[list[int]]:
    """The terms of each column, from the right: a's digit, b's digit (0 past the shorter one), 1 for a carry."""
    da, db = str(a)[::-1], str(b)[::-1]
    carry, out = 0, []
    for i in range(max(len(da), len(db))):
        terms = [int(d[i]) if i < len(d) else 0 for d in (da, db)] + ([1] if carry else [])
        carry = sum(terms) // 10
        out.append(terms)
    return out


def worked(a: int, b: int, slip: int | None = None, rng: random.Random | None = None) -> str:
    """Column by column from the right, then the sum. `slip`: that column's total is wrong (by 1 or 2, a wrong
    answer that looks like work) and the sum is read off the wrong totals, as a careless solver would."""
    totals = [sum(terms) for terms in columns(a, b)]
    if slip is not None:
        totals[slip] = max(0, totals[slip] + rng.choice((-2, -1, 1, 2)))
        totals[slip] = totals[slip] if totals[slip] != sum(columns(a, b)[slip]) else totals[slip] + 3
    steps = " ".join(f"{' + '.join(map(str, terms))} = {t}." for terms, t in zip(columns(a, b), totals))
    digits, carry = [], 0
    for t in totals:  # the sum the written totals give: each total's last digit, the last total whole
        digits.append(t % 10)
        carry = t // 10
    stated = int((str(carry) if carry else "") + "".join(map(str, reversed(digits))))
    return f"{steps} The answer is {stated}."


def answer(a: int, b: int, style: str = "direct") -> str:
    """The completion the SFT data teaches in `style` (direct or worked)."""
    return worked(a, b) if style == "worked" else direct(a, b)


def shows_work(text: str) -> bool:
    """Whether an answer is worked column by column (it opens with a one-digit column sum)."""
    return re.match(r"\d \+ \d( \+ 1)? = \d+\.", text.strip()) is not None


def answer_style(text: str) -> str:
    """The quickstart's `data.answer_style` plug-in: worked or direct."""
    return "worked" if shows_work(text) else "direct"


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
    """Short documents of training-split sums, stated in prose or worked; one document per line."""
    docs = []
    for _ in range(documents):
        sentences = []
        for _ in range(rng.randint(3, 6)):
            a, b = sample_pair(rng, "train")
            if rng.random() < CORPUS_WORKED_SHARE:
                sentences.append(rng.choice(WORKED_FORMS).format(a=a, b=b, w=worked(a, b)))
                continue
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
            style = "worked" if rng.random() < WORKED_SHARE else "direct"
            rows.append({"question": rng.choice(QUESTION_FORMS).format(a=a, b=b), "answer": answer(a, b, style)})
    return rows


def wrong_number(rng: random.Random, s: int) -> int:
    """A wrong sum with as many digits as the right one (so as many tokens): telling them apart takes adding.
    (Subtler slips, one digit off, were tried: the tiny reward model stayed at chance on them, 55-60%.)"""
    while True:
        w = rng.randrange(10 ** (len(str(s)) - 1), 10 ** len(str(s)))
        if w != s:
            return w


# {w}: the worked answer, {c}: its columns alone
MALFORMED = ["{s}", "{a} + {b} = {s}", "{a} + {b} = {s}. The answer", "answer {s}", "= {s}. {s}",
             "{c}", "{c} The answer", "{c} {s}"]
RAMBLING = [
    "Let me think. {a} plus {b}. Hmm, {a} and {b}. {a} + {b} = {s}. The answer is {s}. The answer is {s}.",
    "Well, well. Adding {b} to {a}, let me see, let me see. {a} + {b} = {s}. So, so, the answer is {s}.",
    "{a} + {b} = {s}. The answer is {s}. I am sure the answer is {s}, yes, {s}, the answer is {s}.",
    "{a} + {b}, that is a sum. A sum of {a} and {b}. {a} + {b} = {s}. The answer is {s}, the answer.",
    "{w} {b} + {a}, digit by digit:",  # runs on into the next sum, as a text continuer does
    "{w} The answer is {s}. I am sure: the answer is {s}.",
]


# A slip in one column is what the reward model learns least (near chance at 1 in 5 pairs): 1 in 7.
KINDS = ("wrong_direct", "wrong_direct", "wrong_column", "malformed", "malformed", "rambling", "rambling")


def preference_rows(rng: random.Random, split: str, count: int) -> list[dict]:
    """{question, chosen, rejected, kind}: chosen is correct (worked, or direct against a malformed or rambling
    answer); kind says how the rejected answer is worse."""
    rows, seen = [], set()
    while len(rows) < count:
        a, b = sample_pair(rng, split)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        kind = rng.choice(KINDS)
        if kind == "wrong_direct":
            rejected = direct(a, b).replace(str(a + b), str(wrong_number(rng, a + b)))
        elif kind == "wrong_column":
            rejected = worked(a, b, slip=rng.randrange(len(columns(a, b))), rng=rng)
        else:
            w = worked(a, b)
            rejected = rng.choice(MALFORMED if kind == "malformed" else RAMBLING).format(
                a=a, b=b, s=a + b, w=w, c=w.rpartition(" The answer is")[0])
        question = rng.choice(QUESTION_FORMS).format(a=a, b=b)
        # A right direct answer beats a badly put one too: without such pairs the reward model learns "direct is
        # bad" and rates the base's run-on worked text above the SFT policy's right direct answers.
        style = "direct" if kind in ("malformed", "rambling") and rng.random() < 0.5 else "worked"
        rows.append({"question": question, "chosen": answer(a, b, style), "rejected": rejected, "kind": kind})
    return rows


def cues(rows: list[dict]) -> dict[str, float]:
    """Pairwise accuracy of rankers that do not add: by length (either way) and by the answer's form."""
    def accuracy(key):  # the higher key wins; a tie is a coin flip
        return sum(1.0 if key(r["chosen"]) > key(r["rejected"]) else 0.5 if key(r["chosen"]) == key(r["rejected"])
                   else 0.0 for r in rows) / len(rows)

    return {
        "shorter_wins": accuracy(lambda t: -len(t)),
        "longer_wins": accuracy(len),
        "shown_work_wins": accuracy(shows_work),
    }


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def feedback_rows(pairs: list[dict]) -> list[dict]:
    """Answers labelled good or bad one at a time (KTO's unpaired shape): each pair's chosen answer true, its
    rejected one false."""
    return [{"question": p["question"], "answer": answer, "label": good}
            for p in pairs for answer, good in ((p["chosen"], True), (p["rejected"], False))]


def main(out: Path = Path("data"), seed: int = SEED) -> None:
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "corpus.txt").write_text("\n".join(corpus(rng, documents=8000)) + "\n")
    write_jsonl(out / "arithmetic" / "sft_train.jsonl", qa_rows(rng, "train", count=2000))
    write_jsonl(out / "arithmetic" / "sft_heldout.jsonl", qa_rows(rng, "heldout", count=200))
    rng = random.Random(seed + 1)  # its own stream: adding preference data left the files above unchanged
    train, held_out = preference_rows(rng, "train", count=3000), preference_rows(rng, "heldout", count=200)
    write_jsonl(out / "arithmetic" / "preference_train.jsonl", train)
    write_jsonl(out / "arithmetic" / "preference_heldout.jsonl", held_out)
    # Unpaired feedback (KTO): the same pairs' answers labelled one at a time; no draws, so nothing else changes.
    write_jsonl(out / "arithmetic" / "feedback_train.jsonl", feedback_rows(train))
    write_jsonl(out / "arithmetic" / "feedback_heldout.jsonl", feedback_rows(held_out))
    # RL prompts: sums of the rl split, which neither pretraining nor SFT saw, with the reference answer that
    # exact_match compares with. Own stream again, so the files above stay as they were.
    write_jsonl(out / "arithmetic" / "rl_prompts.jsonl", qa_rows(random.Random(seed + 2), "rl", count=2000))
    print(f"wrote {out}/corpus.txt and {out}/arithmetic/")
    for name, rows in (("train", train), ("held-out", held_out)):
        print(f"preference {name}: accuracy of rankers that do not add: "
              + ", ".join(f"{k} {v:.1%}" for k, v in cues(rows).items()))


if __name__ == "__main__":
    main()
