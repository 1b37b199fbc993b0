"""The user's own preference data: every shape and format becomes the same pairs; bad rows are named and counted."""

import logging

import pytest
from conftest import write_rows
from datasets import Dataset
from trl.data_utils import _tokenize

from align.data import preference
from align.data.files import DataError
from align.recipe import Columns, DataConfig, PairRule

USER = [{"role": "user", "content": "What is 12 + 30?"}]
GOOD = [{"role": "assistant", "content": "12 + 30 = 42. The answer is 42."}]
BAD = [{"role": "assistant", "content": "12 + 30 = 52. The answer is 52."}]
PAIR = {"prompt": USER, "chosen": GOOD, "rejected": BAD}
TEXT_ROW = {"prompt": USER[0]["content"], "chosen": GOOD[0]["content"], "rejected": BAD[0]["content"]}




def load(path, tokenizer, max_length=128, **data):
    if "columns" in data:
        data["columns"] = Columns(**data["columns"])
    return preference.load(str(path), DataConfig(**data), tokenizer, max_length)


def messages_only(example):
    return {k: example[k] for k in ("prompt", "chosen", "rejected")}


@pytest.mark.parametrize("name", ["p.jsonl", "p.json", "p.csv", "p.parquet", "p_saved"])
def test_every_format_gives_the_same_pairs(tmp_path, tokenizer, name):
    dataset, report = load(write_rows(tmp_path / name, [TEXT_ROW, TEXT_ROW]), tokenizer)
    assert report.rows == report.examples == 2
    assert messages_only(dataset[0]) == PAIR


SHAPES = {
    "text": [TEXT_ROW],
    "messages_with_prompt": [{"prompt": USER, "chosen": GOOD, "rejected": BAD}],
    "conversations, prompt implicit": [{"chosen": USER + GOOD, "rejected": USER + BAD}],
    "conversations next to a prompt column (UltraFeedback)": [
        {"prompt": USER[0]["content"], "chosen": USER + GOOD, "rejected": USER + BAD, "score_chosen": 8.0}],
    "rated, lists per row": [{"prompt": USER[0]["content"], "responses": [BAD[0]["content"], GOOD[0]["content"]],
                              "scores": [1, 9.5]}],
    "rated, one response per row": [{"prompt": USER[0]["content"], "response": BAD[0]["content"], "score": "1"},
                                    {"prompt": USER[0]["content"], "response": GOOD[0]["content"], "score": "9.5"}],
}


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_gives_the_same_pair_and_token_ids(tmp_path, tokenizer, shape):
    dataset, report = load(write_rows(tmp_path / "p.jsonl", SHAPES[shape]), tokenizer)
    assert len(dataset) == 1 and messages_only(dataset[0]) == PAIR
    # The ids the reward model trains on are what TRL itself would tokenize.
    assert dataset[0]["chosen_ids"] == _tokenize(tokenizer, USER + GOOD)["input_ids"]
    assert dataset[0]["rejected_ids"] == _tokenize(tokenizer, USER + BAD)["input_ids"]
    assert report.lengths["chosen"][0] == len(dataset[0]["chosen_ids"]) - report.lengths["prompt"][0]


def test_renamed_columns_are_mapped_and_auto_detection_is_logged(tmp_path, tokenizer, caplog):
    rows = [{"q": TEXT_ROW["prompt"], "better_answer": TEXT_ROW["chosen"], "worse": TEXT_ROW["rejected"]}]
    path = write_rows(tmp_path / "p.csv", rows)
    with pytest.raises(DataError, match=r"cannot tell which columns hold the preferences .*data.columns.chosen"):
        load(path, tokenizer)
    dataset, report = load(path, tokenizer, columns={"prompt": "q", "chosen": "better_answer", "rejected": "worse"})
    assert messages_only(dataset[0]) == PAIR and report.detected == []
    with caplog.at_level(logging.INFO):
        _, report = load(write_rows(tmp_path / "auto.jsonl", [TEXT_ROW]), tokenizer)
    assert report.detected == ["prompt", "chosen", "rejected"]
    assert "chosen <- 'chosen'" in caplog.text


def test_a_mapped_column_that_is_absent_suggests_the_closest(tmp_path, tokenizer):
    path = write_rows(tmp_path / "p.jsonl", [TEXT_ROW])
    with pytest.raises(DataError, match=r"data.columns.chosen is 'chosn'.*did you mean 'chosen'"):
        load(path, tokenizer, columns={"chosen": "chosn"})


BAD_ROWS = [
    ({"prompt": "q", "chosen": "a"}, "missing_field", r"field 'rejected' is missing"),
    ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "empty", r"field 'chosen' is empty"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "identical",
     r"fields 'chosen' and 'rejected' hold the same answer"),
    ({"prompt": "q", "chosen": 42, "rejected": "b"}, "wrong_type", r"field 'chosen' is int 42, expected text"),
    ({"prompt": "q", "chosen": "a " * 200, "rejected": "b"}, "too_long", r"row is \d+ tokens, longer than max_length=128"),
    ({"chosen": USER + GOOD, "rejected": [{"role": "user", "content": "Other?"}] + BAD}, "bad_messages",
     r"'chosen' and 'rejected' do not start with the same prompt"),
]


@pytest.mark.parametrize("row,reason,message", BAD_ROWS, ids=[r for _, r, _ in BAD_ROWS])
def test_bad_pair_error_names_file_line_field_and_fix(tmp_path, tokenizer, row, reason, message):
    good = TEXT_ROW if "prompt" in row else {"chosen": USER + GOOD, "rejected": USER + BAD}
    path = write_rows(tmp_path / "p.jsonl", [good, row])
    with pytest.raises(DataError, match=rf"^{path}:2: {message}.* — .* or set data.skip_invalid=true$"):
        load(path, tokenizer)
    dataset, report = load(path, tokenizer, skip_invalid=True)
    assert len(dataset) == 1 and report.skipped == {reason: 1}


def test_score_that_is_not_a_number_is_named_with_its_csv_line(tmp_path, tokenizer):
    path = tmp_path / "rated.csv"
    path.write_text("prompt,response,score\nq,a,3\nq,b,high\nq,c,1\n")
    with pytest.raises(DataError, match=rf"^{path}:3: field 'score' is 'high', not a number — fix the row"):
        load(path, tokenizer)
    dataset, report = load(path, tokenizer, skip_invalid=True)
    assert report.skipped == {"not_a_number": 1} and len(dataset) == 1  # a (3) over c (1)


def test_rated_responses_become_pairs_by_the_rule_and_ties_are_counted(tmp_path, tokenizer):
    rows = [
        {"prompt": "p1", "responses": ["a", "b", "c", "d"], "scores": [3, 3, 1, 2]},  # b ties with the best
        {"prompt": "p2", "responses": ["x", "y"], "scores": [5, 5]},  # all tied: no pair
        {"prompt": "p3", "responses": ["only"], "scores": [4]},  # one response: no pair
    ]
    path = write_rows(tmp_path / "rated.jsonl", rows)
    dataset, report = load(path, tokenizer)
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in dataset] == [("a", "c"), ("a", "d")]
    assert report.pairing == {"rule": "best_vs_rest", "prompts": 3, "tied_with_best": 2, "single_response": 1}
    dataset, report = load(path, tokenizer, pair_rule=PairRule.best_vs_worst)
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in dataset] == [("a", "c")]
    assert report.summary()["pairing"]["rule"] == "best_vs_worst"


def test_rated_lists_of_unequal_length_are_an_error(tmp_path, tokenizer):
    path = write_rows(tmp_path / "rated.jsonl", [{"prompt": "p", "responses": ["a", "b"], "scores": [1]}])
    with pytest.raises(DataError, match=r"rated.jsonl:1: field 'scores' must be a list with one score per response"):
        load(path, tokenizer)


def test_hub_dataset_ids_load_through_datasets(tmp_path, tokenizer, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        if name == "nobody/nothing":
            raise FileNotFoundError("Couldn't find a dataset script or file")
        return Dataset.from_list([TEXT_ROW])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dataset, report = load("someone/prefs:test", tokenizer)
    assert calls == [("someone/prefs", None, "test")] and messages_only(dataset[0]) == PAIR
    load("openai/gsm8k-like:main:test[:200]", tokenizer)
    assert calls[-1] == ("openai/gsm8k-like", "main", "test[:200]")
    with pytest.raises(DataError, match=r"^nobody/nothing: not a local file, and loading it as hub dataset "
                                        r"'nobody/nothing' split 'train' failed: FileNotFoundError"):
        load("nobody/nothing", tokenizer)
