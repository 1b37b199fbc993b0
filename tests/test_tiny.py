"""The built-in tiny base: shipped in Hugging Face format, a real text continuer, reproducible from its seed."""

import json
import math
import random
import re

import torch
from conftest import ROOT, TINY_BASE
from transformers import AutoModelForCausalLM, AutoTokenizer

from align.arithmetic import DIGITS, SPLITS, WORKED_SHARE, answer_style, direct, sample_pair, split_of, worked
from align.rewards import final_number
from align.tiny import pretrain


def test_shipped_base_is_small_and_complete():
    names = {p.name for p in TINY_BASE.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= names
    assert sum(p.stat().st_size for p in TINY_BASE.iterdir()) < 8e6
    model = AutoModelForCausalLM.from_pretrained(TINY_BASE)
    assert 5e5 < model.num_parameters() < 5e6


def test_shipped_base_continues_text_in_its_corpus_style():
    tokenizer = AutoTokenizer.from_pretrained(TINY_BASE)
    model = AutoModelForCausalLM.from_pretrained(TINY_BASE).eval()
    rng = random.Random(0)
    pairs = [sample_pair(rng, "heldout") for _ in range(32)]  # sums it never read
    sentences = [f"There are {a} coins in one box and {b} in another: {a + b} coins in all." for a, b in pairs]
    batch = tokenizer(sentences, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        nll = model(**batch, labels=labels).loss.item()
    assert nll < 0.35 * math.log(len(tokenizer))  # far below a uniform guess over the vocabulary
    prompt = tokenizer(f"There are {pairs[0][0]} coins in one box and {pairs[0][1]} in another:", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    continuation = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert re.match(r"^ \d+ [a-z]+ in all\.", continuation), continuation  # the noun it copies is not always right


def test_pretraining_is_reproducible_from_its_seed(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join((ROOT / "data" / "corpus.txt").read_text().splitlines()[:300]))
    first = pretrain(tmp_path / "a", corpus, steps=3, seed=7)
    second = pretrain(tmp_path / "b", corpus, steps=3, seed=7)
    for name in ("model.safetensors", "tokenizer.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    assert not (tmp_path / "a.tmp").exists() and not (tmp_path / "a.work").exists()


def test_shipped_data_is_what_the_seeded_script_writes(tmp_path):
    from align.arithmetic import main as write_data

    write_data(tmp_path)
    for name in ("corpus.txt", "arithmetic/sft_train.jsonl", "arithmetic/sft_heldout.jsonl",
                 "arithmetic/preference_train.jsonl", "arithmetic/preference_heldout.jsonl",
                 "arithmetic/feedback_train.jsonl", "arithmetic/feedback_heldout.jsonl",
                 "arithmetic/rl_prompts.jsonl"):
        assert (tmp_path / name).read_bytes() == (ROOT / "data" / name).read_bytes(), name


def test_every_pair_has_one_split_in_both_orders():
    rng = random.Random(0)
    pairs = [(rng.randrange(10, 1000), rng.randrange(10, 1000)) for _ in range(20000)]
    assert all(split_of(a, b) == split_of(b, a) for a, b in pairs)
    for name, fraction in SPLITS.items():
        share = sum(split_of(a, b) == name for a, b in pairs) / len(pairs)
        assert abs(share - fraction) < 0.01, (name, share)


def test_shipped_qa_files_hold_their_own_split():
    for file, split in (("sft_train.jsonl", "train"), ("sft_heldout.jsonl", "heldout"), ("rl_prompts.jsonl", "rl")):
        for line in (ROOT / "data" / "arithmetic" / file).read_text().splitlines():
            a, b = map(int, re.findall(r"\d+", json.loads(line)["question"]))
            assert split_of(a, b) == split and {len(str(a)), len(str(b))} <= set(DIGITS)


def _checked_columns(a: int, b: int, text: str) -> int:
    """The sum a worked answer states, after checking each written column: the right digits of a and b (0 past
    the shorter one), a '+ 1' exactly where the column before carried, and the right total."""
    steps = re.findall(r"(\d) \+ (\d)( \+ 1)? = (\d+)\.", text)
    assert len(steps) == max(len(str(a)), len(str(b))), text
    carry = 0
    for i, (x, y, plus_one, total) in enumerate(steps):
        assert (int(x), int(y)) == (a // 10**i % 10, b // 10**i % 10), (text, i)
        assert bool(plus_one) == bool(carry) and int(total) == int(x) + int(y) + carry, (text, i)
        carry = int(total) // 10
    return int(re.search(r"The answer is (\d+)\.$", text).group(1))


def test_every_worked_line_in_the_shipped_data_is_right_arithmetic():
    files = ("sft_train.jsonl", "sft_heldout.jsonl", "rl_prompts.jsonl", "preference_train.jsonl",
             "preference_heldout.jsonl")
    worked = 0
    for file in files:
        for line in (ROOT / "data" / "arithmetic" / file).read_text().splitlines():
            row = json.loads(line)
            a, b = map(int, re.findall(r"\d+", row["question"]))
            for text in (row.get("answer"), row.get("chosen")):
                if text is not None and answer_style(text) == "worked":
                    assert _checked_columns(a, b, text) == a + b
                    worked += 1
                elif text is not None:
                    assert text == f"{a} + {b} = {a + b}. The answer is {a + b}."
    assert worked > 3000
    corpus = (ROOT / "data" / "corpus.txt").read_text()
    for a, b, text in re.findall(r"(\d+) \+ (\d+), digit by digit: (.+?The answer is \d+\.)", corpus)[:2000]:
        assert _checked_columns(int(a), int(b), text) == int(a) + int(b)


def test_answer_styles_and_the_share_of_worked_sft_answers():
    assert answer_style(worked(97, 487)) == "worked" and answer_style(direct(97, 487)) == "direct"
    assert worked(263, 745) == "3 + 5 = 8. 6 + 4 = 10. 2 + 7 + 1 = 10. The answer is 1008."
    assert worked(97, 487) == "7 + 7 = 14. 9 + 8 + 1 = 18. 0 + 4 + 1 = 5. The answer is 584."
    answers = [json.loads(line)["answer"] for line in (ROOT / "data" / "arithmetic" / "sft_train.jsonl").open()]
    share = sum(answer_style(a) == "worked" for a in answers) / len(answers)
    assert abs(share - WORKED_SHARE) < 0.03


def test_a_column_slip_is_worked_wrong_arithmetic_and_every_rejected_answer_is_worse():
    rng = random.Random(0)
    for _ in range(200):
        a, b = sample_pair(rng, "train")
        slipped = worked(a, b, slip=rng.randrange(len(str(max(a, b)))), rng=rng)
        assert answer_style(slipped) == "worked" and final_number(slipped) != str(a + b)
    for line in (ROOT / "data" / "arithmetic" / "preference_heldout.jsonl").read_text().splitlines():
        row = json.loads(line)
        a, b = map(int, re.findall(r"\d+", row["question"]))
        assert row["chosen"] in (worked(a, b), direct(a, b))
        if row["kind"] in ("wrong_direct", "wrong_column"):
            assert final_number(row["rejected"]) != str(a + b), row
        else:  # badly put: malformed or rambling
            assert row["kind"] in ("malformed", "rambling") and row["rejected"] != row["chosen"], row
