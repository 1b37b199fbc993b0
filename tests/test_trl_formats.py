"""Every cell of TRL's dataset-format table (type x standard/conversational), and two answers with a choice: one file
of each, made here, through `align data check`, the loaders and a short SFT or reward run on the tiny base. Rows
that repeat their prompt, or give it as messages, train on the same tokens and labels as the explicit form."""

import json

import pytest
from conftest import PREF_TRAIN, QA_TRAIN, TINY_BASE, sft_section, write_rows

from align.cli import main
from align.data import preference, qa
from align.data.files import DataError
from align.modeling import load_tokenizer, sft_example
from align.recipe import ModelConfig, load_recipe
from align.stages import reward, sft

USER = {"role": "user", "content": "What is 2 + 3?"}
PLAIN = {"prompt": "What is 2 + 3?", "completion": "2 + 3 = 5. The answer is 5."}
PAIR = {"prompt": "What is 2 + 3?", "chosen": "The answer is 5.", "rejected": "The answer is 6."}

# TRL's table, one file per cell: (type, standard row, conversational row, the kind align reads it as, or None)
CELLS = {
    "language modeling": ({"text": "What is 2 + 3? The answer is 5."},
                          {"messages": [USER, {"role": "assistant", "content": "The answer is 5."}]}),
    "prompt-only": ({"prompt": "What is 2 + 3?"}, {"prompt": [USER]}),
    "prompt-completion": (PLAIN, {"prompt": [USER], "completion": [{"role": "assistant", "content": PLAIN["completion"]}]}),
    "preference (explicit prompt)": (PAIR, {"prompt": [USER], "chosen": [{"role": "assistant", "content": "The answer is 5."}],
                                            "rejected": [{"role": "assistant", "content": "The answer is 6."}]}),
    "preference (implicit prompt)": ({"chosen": "What is 2 + 3? The answer is 5.", "rejected": "What is 2 + 3? The answer is 6."},
                                     {"chosen": [USER, {"role": "assistant", "content": "The answer is 5."}],
                                      "rejected": [USER, {"role": "assistant", "content": "The answer is 6."}]}),
    "unpaired preference": ({"prompt": "What is 2 + 3?", "completion": "5", "label": True},
                            {"prompt": [USER], "completion": [{"role": "assistant", "content": "5"}], "label": True}),
}
KIND = {"language modeling": "qa", "prompt-only": "prompts", "prompt-completion": "qa",
        "preference (explicit prompt)": "preference", "preference (implicit prompt)": "preference",
        "unpaired preference": "feedback"}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig(name_or_path=str(TINY_BASE)))


def data_config(*overrides):
    return load_recipe(None, [f"model.name_or_path={TINY_BASE}", *overrides]).data


def check(path, capsys, *args) -> tuple[int, str]:
    code = main(["data", "check", str(path), *map(str, args)])
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("form", ["standard", "conversational"])
def test_every_cell_of_trls_table_is_checked_as_the_kind_it_is(tmp_path, capsys, monkeypatch, cell, form):
    """Each loads as its kind, auto-detected; standard language modeling is the one refused, with the mapping."""
    monkeypatch.setenv("COLUMNS", "300")
    row = CELLS[cell][form == "conversational"]
    path = write_rows(tmp_path / f"{form}.jsonl", [row, row] if cell != "unpaired preference" else
                      [row, {**row, "label": False}])
    code, printed = check(path, capsys)
    if (cell, form) == ("language modeling", "standard"):
        assert code == 2 and "a 'text' column alone is language-modeling data" in printed
        assert "Split each text into a prompt column and a completion column" in printed
        return
    assert code == 0, printed
    assert f"\n  {KIND[cell]} (max_length " in printed  # the kind it was read as


def sft_ids(dataset, tokenizer):
    """The token ids and answer mask SFT trains on, per example."""
    return [sft_example(tokenizer, p, c) for p, c in zip(dataset["prompt"], dataset["completion"])]


def test_conversational_prompt_completion_trains_on_what_the_standard_form_does(tmp_path, tokenizer, write_recipe):
    system = {"role": "system", "content": "Be brief."}
    conversational = write_rows(tmp_path / "conversational.jsonl", [
        {"prompt": [system, USER], "completion": [{"role": "assistant", "content": PLAIN["completion"]}]}])
    standard = write_rows(tmp_path / "standard.jsonl", [{**PLAIN, "system": "Be brief."}])
    ids = [sft_ids(qa.load(str(p), data_config(), tokenizer, 256)[0], tokenizer) for p in (conversational, standard)]
    assert ids[0] == ids[1] and sum(ids[0][0]["completion_mask"]) > 0  # same tokens, same answer-only labels

    refused = write_rows(tmp_path / "user_in_completion.jsonl", [{"prompt": [USER], "completion": [USER]}])
    with pytest.raises(DataError, match=r"user_in_completion.jsonl:1: field 'completion' holds a user turn where an "
                                        r"answer \(assistant turns only\) belongs"):
        qa.load(str(refused), data_config(), tokenizer, 256)

    rows = [json.loads(line) for line in QA_TRAIN.read_text().splitlines()[:32]]
    train = write_rows(tmp_path / "train.jsonl", [
        {"prompt": [{"role": "user", "content": r["question"]}], "completion": [{"role": "assistant", "content": r["answer"]}]}
        for r in rows])
    results = sft.run(load_recipe(write_recipe(data={"sft": {"train": str(train)}},
                                               sft=sft_section(max_steps=2, eval_generations=0))))
    assert results["train_loss"] > 0 and (tmp_path / "runs" / "test" / "sft" / "checkpoint").is_dir()


def test_implicit_prompt_texts_pair_as_the_explicit_prompt_does(tmp_path, tokenizer, capsys, monkeypatch):
    # the prompt is all the texts share, as in TRL: answers that start alike would start inside the prompt
    implicit = write_rows(tmp_path / "implicit.jsonl", [
        {"chosen": "What is 2 + 3? Five, since 2 + 3 = 5.", "rejected": "What is 2 + 3? Six."},
        {"chosen": "Add 12 and 13. 25", "rejected": "Add 12 and 13. 27"}])
    explicit = write_rows(tmp_path / "explicit.jsonl", [
        {"prompt": "What is 2 + 3?", "chosen": "Five, since 2 + 3 = 5.", "rejected": "Six."},
        {"prompt": "Add 12 and 13.", "chosen": "25", "rejected": "27"}])
    loaded = [preference.load(str(p), data_config(), tokenizer, 256) for p in (implicit, explicit)]
    for field in ("prompt", "chosen", "rejected", "chosen_ids", "rejected_ids"):
        assert loaded[0][0][field] == loaded[1][0][field], field
    # a word the answers share the start of stays whole: "12" vs "13" is not split into "1" + "2"/"3"
    split = write_rows(tmp_path / "split.jsonl", [{"chosen": "Sum 5 and 7: 12", "rejected": "Sum 5 and 7: 13"}])
    assert preference.load(str(split), data_config(), tokenizer, 256)[0][0]["chosen"][0]["content"] == "12"

    monkeypatch.setenv("COLUMNS", "300")
    code, printed = check(implicit, capsys)
    assert code == 0 and "the prompt of 2 rows was taken from the start chosen and rejected share" in printed

    nothing_shared = write_rows(tmp_path / "unshared.jsonl", [
        {"chosen": "What is 2 + 3? 5", "rejected": "What is 2 + 3? 6"}, {"chosen": "Five.", "rejected": "Six."}])
    with pytest.raises(DataError, match=r"unshared.jsonl:2: 'chosen' and 'rejected' are texts with no prompt in "
                                        r"common .*set data.columns.prompt=<column>"):
        preference.load(str(nothing_shared), data_config(), tokenizer, 256)
    pairs, report = preference.load(str(nothing_shared), data_config("data.skip_invalid=true"), tokenizer, 256)
    assert len(pairs) == 1 and report.skipped == {"no_shared_prompt": 1}


SAFE_RLHF = [  # PKU-SafeRLHF's shape: better_response_id is the index of the better response
    {"prompt": "What is 2 + 3?", "response_0": "5", "response_1": "6", "better_response_id": 0},
    {"prompt": "What is 4 + 4?", "response_0": "9", "response_1": "8", "better_response_id": 1}]
SHP = [  # Stanford SHP's shape: labels is 1 when the first answer (human_ref_A) is the better one
    {"history": "What is 2 + 3?", "human_ref_A": "5", "human_ref_B": "6", "labels": 1},
    {"history": "What is 4 + 4?", "human_ref_A": "9", "human_ref_B": "8", "labels": 0}]
EXPECTED = [{"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6"},
            {"prompt": "What is 4 + 4?", "chosen": "8", "rejected": "9"}]


@pytest.mark.parametrize("rows, mapping", [
    (SAFE_RLHF, ["data.columns.responses=[response_0,response_1]", "data.columns.choice=better_response_id"]),
    (SHP, ["data.columns.prompt=history", "data.columns.responses=[human_ref_A,human_ref_B]",
           "data.columns.choice=labels", "data.columns.choice_kind=first_better"]),
])
def test_two_answers_and_a_choice_map_to_chosen_and_rejected_the_right_way_round(
        tmp_path, tokenizer, capsys, monkeypatch, rows, mapping):
    path = write_rows(tmp_path / "two.jsonl", rows)
    explicit = write_rows(tmp_path / "explicit.jsonl", EXPECTED)
    pairs, report = preference.load(str(path), data_config(*mapping), tokenizer, 256)
    assert pairs["chosen_ids"] == preference.load(str(explicit), data_config(), tokenizer, 256)[0]["chosen_ids"]
    assert [p[-1]["content"] for p in pairs["rejected"]] == ["6", "9"]
    assert report.unused == []  # both answers and the choice are used

    monkeypatch.setenv("COLUMNS", "300")
    code, printed = check(path, capsys)  # without the mapping: guessed as preference data, told how to map it
    assert code == 2 and "look like two answers and a choice" in printed
    assert "data.columns.choice=" in printed and "data.columns.choice_kind=" in printed
    code, printed = check(path, capsys, *mapping)
    assert code == 0 and "gives, for the first pair: prompt 'What is 2 + 3?', chosen '5', rejected '6'" in printed


def test_a_missing_or_out_of_range_choice_is_skipped_and_counted(tmp_path, tokenizer):
    mapping = ["data.columns.responses=[response_0,response_1]", "data.columns.choice=better_response_id"]
    path = write_rows(tmp_path / "two.jsonl", [*SAFE_RLHF, {**SAFE_RLHF[0], "better_response_id": 2},
                                               {**SAFE_RLHF[0], "better_response_id": None}])
    with pytest.raises(DataError, match=r"two.jsonl:3: field 'better_response_id' is 2; with "
                                        r"data.columns.choice_kind=index it must be one of 0, 1, A or B"):
        preference.load(str(path), data_config(*mapping), tokenizer, 256)
    pairs, report = preference.load(str(path), data_config(*mapping, "data.skip_invalid=true"), tokenizer, 256)
    assert len(pairs) == 2 and report.skipped == {"bad_choice": 1, "missing_choice": 1}
    with pytest.raises(DataError, match="data.columns.choice is set, so data.columns.responses must name the two"):
        preference.load(str(path), data_config("data.columns.choice=better_response_id"), tokenizer, 256)


def pairs_file(tmp_path, n=64):
    """n arithmetic pairs with scores: the chosen (right) answer scored 9, the rejected 2."""
    rows = [json.loads(line) for line in PREF_TRAIN.read_text().splitlines()[:n]]
    return write_rows(tmp_path / "scored.jsonl", [
        {"prompt": r["question"], "chosen": r["chosen"], "rejected": r["rejected"], "score_chosen": 9,
         "score_rejected": 2} for r in rows])


def test_scores_of_chosen_and_rejected_become_the_margin_the_reward_loss_keeps(tmp_path, tokenizer, write_recipe):
    margin = ["data.columns.score_chosen=score_chosen", "data.columns.score_rejected=score_rejected"]
    path = pairs_file(tmp_path)
    pairs, report = preference.load(str(path), data_config(*margin), tokenizer, 256)
    assert set(pairs["margin"]) == {7.0} and report.unused == []
    plain, report = preference.load(str(path), data_config(), tokenizer, 256)
    assert "margin" not in plain.column_names and report.unused == ["score_chosen", "score_rejected"]  # opt-in

    first_loss = {}
    for name, overrides in (("with", margin), ("without", [])):
        recipe = write_recipe(name=name, data={"preference": {"train": str(path)}},
                              reward={"max_steps": 1, "per_device_train_batch_size": 16, "max_length": 128,
                                      "activation_checkpointing": False, "logging_steps": 1})
        results = reward.run(load_recipe(recipe, [*overrides, f"run.name={name}"]))
        logged = (tmp_path / "runs" / name / "reward" / "metrics.jsonl").read_text().splitlines()
        first_loss[name] = next(r["loss"] for r in map(json.loads, logged) if "loss" in r)
        assert (tmp_path / "runs" / name / "reward" / "checkpoint").is_dir() and results["train_loss"] > 0
    # -log sigmoid(r_chosen - r_rejected - 7) at a fresh head (scores near 0): about 7 more than log 2
    assert first_loss["with"] > first_loss["without"] + 5, first_loss
