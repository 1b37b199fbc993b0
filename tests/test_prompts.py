"""Prompts for the RL stages: any columns, extra columns kept for the reward functions, errors as elsewhere."""

import pytest
from conftest import write_rows

from align.data import prompts
from align.data.files import DataError
from align.recipe import Columns, DataConfig

ROWS = [
    {"q": "What is 12 + 30?", "reference": "42", "level": 2},
    {"q": "What is 2 + 3?", "reference": "5", "level": 1},
]


def load(path, tokenizer, max_length=64, **data):
    return prompts.load(str(path), DataConfig(**data), tokenizer, max_length)


@pytest.mark.parametrize("name", ["p.jsonl", "p.csv", "p.parquet", "p_saved"])
def test_prompt_column_is_mapped_and_other_columns_ride_along(tmp_path, tokenizer, name):
    dataset, report = load(write_rows(tmp_path / name, ROWS), tokenizer, columns=Columns(prompt="q"))
    assert report.rows == report.examples == 2 and report.columns == {"prompt": "q"}
    first = dataset[0]
    assert first["prompt"] == [{"role": "user", "content": "What is 12 + 30?"}]
    assert first["reference"] == "42" and str(first["level"]) == "2"  # csv keeps text; the others their type


def test_messages_prompts_and_system_prompt(tmp_path, tokenizer):
    rows = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
            {"prompt": "What is 2 + 3?"}]
    dataset, report = load(write_rows(tmp_path / "p.jsonl", rows), tokenizer, system_prompt="Answer sums.")
    assert report.detected == ["prompt"]
    assert dataset[0]["prompt"][0] == {"role": "system", "content": "Be brief."}
    assert dataset[1]["prompt"] == [{"role": "system", "content": "Answer sums."},
                                    {"role": "user", "content": "What is 2 + 3?"}]


def test_a_column_that_trl_would_shadow_is_an_error(tmp_path, tokenizer):
    path = write_rows(tmp_path / "p.jsonl", [{"prompt": "Hi", "completion": "Hello"}])
    with pytest.raises(DataError, match=r"p.jsonl: column 'completion' has a name TRL uses .* rename the column"):
        load(path, tokenizer)


def test_bad_and_long_prompts_are_located_and_counted(tmp_path, tokenizer):
    rows = [{"prompt": "Hi"}, {"prompt": ""}, {"prompt": "word " * 80},
            {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}]
    path = write_rows(tmp_path / "p.jsonl", rows)
    with pytest.raises(DataError, match=r"p.jsonl:2: field 'prompt' is empty — fix the row or set "
                                        r"data.skip_invalid=true \(2 more problems"):
        load(path, tokenizer)
    dataset, report = load(path, tokenizer, skip_invalid=True)
    assert len(dataset) == 1 and dict(report.skipped) == {"empty": 1, "too_long": 1, "bad_messages": 1}
    assert "p.jsonl:4: field 'prompt' must end with a user turn" in report.first_skipped["bad_messages"]


def test_no_prompt_column_says_which_key_to_set(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"cannot tell which column holds the prompt \(columns: text\); "
                                        r"set data.columns.prompt=<column>"):
        load(write_rows(tmp_path / "p.jsonl", [{"text": "Hi"}]), tokenizer)
