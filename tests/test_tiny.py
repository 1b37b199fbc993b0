"""The built-in tiny base: shipped in Hugging Face format, a real text continuer, reproducible from its seed."""

import torch
from conftest import ROOT, TINY_BASE
from transformers import AutoModelForCausalLM, AutoTokenizer

from align.arithmetic import split_pairs
from align.tiny import pretrain


def test_shipped_base_is_small_and_complete():
    names = {p.name for p in TINY_BASE.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= names
    assert sum(p.stat().st_size for p in TINY_BASE.iterdir()) < 8e6
    model = AutoModelForCausalLM.from_pretrained(TINY_BASE)
    assert 5e5 < model.num_parameters() < 5e6


def test_shipped_base_continues_held_out_sums():
    tokenizer = AutoTokenizer.from_pretrained(TINY_BASE)
    model = AutoModelForCausalLM.from_pretrained(TINY_BASE).eval()
    pairs = split_pairs()["heldout"][:100]  # sums it never read
    tokenizer.padding_side = "left"
    batch = tokenizer([f"{a} + {b} =" for a, b in pairs], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    correct = sum(text.strip().startswith(str(a + b)) for (a, b), text in zip(pairs, texts))
    assert correct >= 50, texts[:5]


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
    for name in ("corpus.txt", "arithmetic/sft_train.jsonl", "arithmetic/sft_heldout.jsonl"):
        assert (tmp_path / name).read_bytes() == (ROOT / "data" / name).read_bytes(), name


def test_splits_are_disjoint_in_both_orders():
    splits = split_pairs()
    for a in splits:
        for b in splits:
            if a != b:
                assert not set(splits[a]) & set(splits[b])
    assert all((y, x) in set(pairs) for pairs in splits.values() for x, y in pairs)
