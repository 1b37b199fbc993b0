"""Reading the user's QA data: every format, column mapping, and errors that point at file, line and field."""

import json
import logging
import os
import re
import time
from pathlib import Path

from datasets import Dataset, DatasetDict
import pytest

from conftest import QA, QA_TRAIN, TINY_BASE, sft_section, write_rows

from align.cli import main
from align.data import qa
from align.data.files import DataError
from align.recipe import Columns, DataConfig

ROWS = [
    {"question": "What is 12 + 30?", "answer": "12 + 30 = 42. The answer is 42."},
    {"question": "What is 20 + 22?", "answer": "20 + 22 = 42. The answer is 42."},
    {"question": "Add 11 and 11.", "answer": "11 + 11 = 22. The answer is 22."},
]




def load(path, tokenizer, max_length=128, **data):
    return qa.load(str(path), DataConfig(**data), tokenizer, max_length)


@pytest.mark.parametrize("name", ["qa.jsonl", "qa.json", "qa.csv", "qa.parquet", "qa_saved"])
def test_every_format_gives_the_same_conversational_pairs(tmp_path, tokenizer, name):
    dataset, report = load(write_rows(tmp_path / name, ROWS), tokenizer)
    assert report.rows == report.examples == 3
    assert report.columns == {"prompt": "question", "completion": "answer"}
    assert report.detected == ["prompt", "completion"]
    first = dataset[0]
    assert {k: first[k] for k in ("prompt", "completion")} == {
        "prompt": [{"role": "user", "content": "What is 12 + 30?"}],
        "completion": [{"role": "assistant", "content": "12 + 30 = 42. The answer is 42."}],
    }
    assert report.lengths["total"][0] == report.lengths["prompt"][0] + report.lengths["completion"][0]


def test_each_pair_carries_the_tokens_sft_trains_on_as_one_rendering_of_it_gives(tmp_path, tokenizer):
    """The file is tokenised once, all rows together, as it is checked: every row's input_ids and answer mask are
    what rendering that pair alone gives (`modeling.sft_tokens` of its prompt and its conversation)."""
    from align.modeling import conversation_ids, prompt_ids, sft_tokens

    dataset, report = load(write_rows(tmp_path / "qa.jsonl", ROWS), tokenizer, system_prompt="Be brief.")
    for row, total in zip(dataset, report.lengths["total"]):
        conversation = conversation_ids(tokenizer, [row["prompt"] + row["completion"]])[0]
        alone = sft_tokens(prompt_ids(tokenizer, row["prompt"]), conversation, tokenizer.eos_token_id)
        assert {"input_ids": row["input_ids"], "completion_mask": row["completion_mask"]} == alone
        assert len(conversation) == total and row["input_ids"][-1] == tokenizer.eos_token_id
        answer = [t for t, m in zip(row["input_ids"], row["completion_mask"]) if m]
        assert tokenizer.decode(answer, skip_special_tokens=True).strip() == row["completion"][0]["content"]


def test_auto_detection_is_logged(tmp_path, tokenizer, caplog):
    with caplog.at_level(logging.INFO):
        load(write_rows(tmp_path / "qa.jsonl", ROWS), tokenizer)
    assert "prompt <- 'question', completion <- 'answer' (auto-detected" in caplog.text


def test_mapped_columns_and_system_prompt(tmp_path, tokenizer):
    rows = [{"q": r["question"], "a": r["answer"], "response": "decoy"} for r in ROWS]
    dataset, report = load(write_rows(tmp_path / "qa.jsonl", rows), tokenizer,
                           columns=Columns(prompt="q", completion="a"), system_prompt="Be brief.")
    assert report.columns == {"prompt": "q", "completion": "a"} and report.detected == []
    assert dataset[0]["prompt"][0] == {"role": "system", "content": "Be brief."}
    assert dataset[0]["completion"][0]["content"] == ROWS[0]["answer"]


def test_messages_become_prompt_and_final_answer(tmp_path, tokenizer):
    conversation = [{"role": "user", "content": "Hi, what is 1 + 1?"}, {"role": "assistant", "content": "It is 2."},
                    {"role": "user", "content": "And 2 + 2?"}, {"role": "assistant", "content": "It is 4."}]
    dataset, report = load(write_rows(tmp_path / "chat.jsonl", [{"messages": conversation}]), tokenizer)
    assert report.columns == {"messages": "messages"}
    assert dataset[0]["prompt"] == conversation[:-1]
    assert dataset[0]["completion"] == conversation[-1:]


def test_mapping_to_a_missing_column_suggests_the_closest(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"data.columns.prompt is 'questoin', but the file has no such column .*did you mean 'question'"):
        load(write_rows(tmp_path / "qa.jsonl", ROWS), tokenizer, columns=Columns(prompt="questoin"))


def test_undetectable_columns_say_which_keys_to_set(tmp_path, tokenizer):
    path = write_rows(tmp_path / "qa.jsonl", [{"body": "a", "note": "b"}])
    with pytest.raises(DataError, match=r"cannot tell which column holds the prompt and the completion.*set data.columns.prompt=<column>"):
        load(path, tokenizer)


BAD_ROWS = [
    ({"question": "What is 1 + 1?", "answer": "  "}, "empty", "field 'answer' is empty"),
    ({"question": "What is 1 + 1?"}, "missing_field", "field 'answer' is missing"),
    ({"question": "What is 1 + 1?", "answer": 2}, "wrong_type", "field 'answer' is int 2, expected text"),
    ({"question": "What is 1 + 1?", "answer": "2 " * 200}, "too_long", r"row is \d+ tokens, longer than max_length=128"),
]


@pytest.mark.parametrize("bad,reason,message", BAD_ROWS, ids=[b[1] for b in BAD_ROWS])
def test_bad_row_error_names_file_line_field_and_fix(tmp_path, tokenizer, bad, reason, message):
    path = write_rows(tmp_path / "qa.jsonl", ROWS[:2] + [bad] + ROWS[2:])
    fix = "raise the stage's max_length" if reason == "too_long" else "fix the row"
    with pytest.raises(DataError, match=rf"^{path}:3: {message} — {fix} or set data.skip_invalid=true$"):
        load(path, tokenizer)


def test_bad_json_line_is_located(tmp_path, tokenizer):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + '{"question": "x", "answer": \n')
    with pytest.raises(DataError, match=rf"^{path}:3: not valid JSON"):
        load(path, tokenizer)


def test_csv_errors_carry_the_file_line(tmp_path, tokenizer):
    path = tmp_path / "qa.csv"
    path.write_text('question,answer\n"What is 1 + 1?",""\n"What is 2 + 2?","2 + 2\n= 4"\n"What is 3 + 3?",""\n')
    with pytest.raises(DataError, match=rf"^{path}:2: field 'answer' is empty .*1 more problems"):
        load(path, tokenizer)
    _, report = load(path, tokenizer, skip_invalid=True)
    assert report.first_skipped["empty"].startswith(f"{path}:2:")
    assert report.examples == 1
    path.write_text('question,answer\n"What is 2 + 2?","2 + 2\n= 4"\n"What is 3 + 3?",""\n')
    with pytest.raises(DataError, match=rf"^{path}:4: field 'answer' is empty"):  # after a two-line quoted field
        load(path, tokenizer)


def test_bad_conversation_is_explained(tmp_path, tokenizer):
    path = write_rows(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "Hi"}]}])
    with pytest.raises(DataError, match=rf"{path}:1: field 'messages' must hold a user turn and end with the assistant's answer"):
        load(path, tokenizer)


def test_skip_invalid_counts_and_logs_every_reason(tmp_path, tokenizer, caplog):
    rows = ROWS + [b for b, _, _ in BAD_ROWS] + [{"question": "", "answer": "x"}]
    with caplog.at_level(logging.WARNING):
        dataset, report = load(write_rows(tmp_path / "qa.jsonl", rows), tokenizer, skip_invalid=True)
    assert len(dataset) == report.examples == 3 and report.rows == 8
    assert report.skipped == {"empty": 2, "missing_field": 1, "wrong_type": 1, "too_long": 1}
    assert "skipped 5 of 8 rows (empty=2" in caplog.text
    assert f"{tmp_path / 'qa.jsonl'}:4: field 'answer' is empty" in caplog.text


def test_without_skip_the_error_cites_the_first_bad_row_and_counts_the_others(tmp_path, tokenizer):
    rows = ROWS + [b for b, _, _ in reversed(BAD_ROWS)]  # the over-long row comes first
    with pytest.raises(DataError, match=r":4: row is \d+ tokens.*\(3 more problems: .*empty=1"):
        load(write_rows(tmp_path / "qa.jsonl", rows), tokenizer)


def test_empty_file_says_so(tmp_path, tokenizer):
    (tmp_path / "qa.jsonl").write_text("\n")
    with pytest.raises(DataError, match="the file has no rows"):
        load(tmp_path / "qa.jsonl", tokenizer)


def test_dataset_dict_directory_asks_for_a_split(tmp_path, tokenizer):
    DatasetDict({"train": Dataset.from_list(ROWS), "test": Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"holds several splits \(train, test\); point at one of them, e.g. .*dd/train"):
        load(tmp_path / "dd", tokenizer)
    assert load(tmp_path / "dd" / "train", tokenizer)[1].examples == 3


def test_unsupported_and_missing_files(tmp_path, tokenizer):
    (tmp_path / "qa.txt").write_text("hello")
    with pytest.raises(DataError, match=r"unsupported format '.txt'; use .jsonl"):
        load(tmp_path / "qa.txt", tokenizer)
    with pytest.raises(DataError, match="file not found"):
        load(tmp_path / "nope.jsonl", tokenizer)


def test_non_utf8_data_names_the_file_and_line(tmp_path, tokenizer):
    from align.recipe import DataConfig

    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"question": "What is 1 + 1?", "answer": "2"}\n{"question": "Caf\xe9?", "answer": "3"}\n')
    with pytest.raises(DataError, match=r"latin1.jsonl:2: not UTF-8 text \(byte 0xe9 at column 18\)"):
        qa.load(str(path), DataConfig(), tokenizer, 128)


def test_a_huge_row_is_rejected_before_it_is_tokenised(tmp_path, tokenizer, monkeypatch):
    from align.recipe import DataConfig

    path = write_rows(tmp_path / "huge.jsonl", [{"question": "What is 1 + 1?", "answer": "2 " * 2_000_000}])

    def never(*args, **kwargs):
        raise AssertionError("tokenised")

    monkeypatch.setattr("align.data.qa.token_ids", never)
    with pytest.raises(DataError, match=r"huge.jsonl:1: row is 4000014 characters, more than max_length=128 tokens "
                                        r"can hold \(at 100 characters a token\)"):
        qa.load(str(path), DataConfig(), tokenizer, 128)


def _endless_or_huge(kind: str, tmp_path: Path) -> Path:
    path = tmp_path / "data.jsonl"
    if kind == "link to /dev/zero":
        path.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "2 GB sparse file":
        with path.open("wb") as f:
            f.truncate(2 << 30)
    elif kind == "JSON nested 100,000 deep":
        path.write_text('{"question": ' + "[" * 100_000 + "]" * 100_000 + ', "answer": "1"}\n')
    return path


@pytest.mark.parametrize("kind, message", [
    ("link to /dev/zero", "not a regular file"),
    ("fifo", "not a regular file"),
    ("2 GB sparse file", r"data.jsonl:1: not a text file \(a NUL byte at byte 0\)"),
    ("JSON nested 100,000 deep", r"data.jsonl:1: JSON nested too deep to read"),
])
def test_data_check_on_an_endless_or_huge_input_answers_at_once_in_little_memory(tmp_path, capsys, kind, message):
    import resource

    path = _endless_or_huge(kind, tmp_path)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    started = time.monotonic()
    assert main(["data", "check", str(path), "--kind", "qa", "--model", str(TINY_BASE)]) in (1, 2)
    assert time.monotonic() - started < 10
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < (1 << 20)  # under 1 GiB more
    out = capsys.readouterr()
    assert re.search(message, out.err + out.out), out
    assert "Traceback" not in out.err


def test_align_run_checks_every_stages_data_before_training(write_recipe, tmp_path, capsys):
    empty = tmp_path / "prompts.jsonl"
    empty.write_text("")
    path = write_recipe(data={"sft": {"train": str(QA_TRAIN)}, "prompts": {"train": str(empty)}, **QA},
                        sft=sft_section(), grpo={"max_length": 128, "max_completion_length": 32,
                                                 "rewards": [{"name": "exact_match", "args": {"column": "answer"}}]})
    assert main(["run", str(path)]) == 2
    assert f"{empty}: the file has no rows" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "test" / "sft").exists()
