"""The user's data as it comes: Alpaca, ShareGPT, Anthropic-HH transcripts, content parts, BOMs. Each format loads
to the token ids of the same data written plainly; every column is accounted for; unpaired labels are refused
where pairs or targets are read, and read as KTO's feedback."""

import json

import pytest

from conftest import TINY_BASE, write_rows

from align.cli import main
from align.data import feedback, preference, prompts, qa
from align.data.files import DataError
from align.modeling import conversation_ids
from align.recipe import load_recipe

PLAIN_QA = [{"prompt": "Add the numbers.\n2 + 3", "completion": "2 + 3 = 5. The answer is 5."},
            {"prompt": "What is 1 + 1?", "completion": "1 + 1 = 2. The answer is 2."}]


def data_config(*overrides):
    return load_recipe(None, [f"model.name_or_path={TINY_BASE}", *overrides]).data


def qa_ids(path, tokenizer, *overrides):
    dataset, report = qa.load(str(path), data_config(*overrides), tokenizer, 256)
    return conversation_ids(tokenizer, [p + c for p, c in zip(dataset["prompt"], dataset["completion"])]), report


def pair_ids(path, tokenizer, *overrides):
    dataset, report = preference.load(str(path), data_config(*overrides), tokenizer, 256)
    return (dataset["chosen_ids"], dataset["rejected_ids"]), report


def test_alpaca_input_history_and_system_join_the_prompt(tmp_path, tokenizer):
    alpaca = write_rows(tmp_path / "alpaca.jsonl", [
        {"instruction": "Add the numbers.", "input": "2 + 3", "output": "2 + 3 = 5. The answer is 5."},
        {"instruction": "What is 1 + 1?", "input": "", "output": "1 + 1 = 2. The answer is 2."}])
    ids, report = qa_ids(alpaca, tokenizer)
    assert ids == qa_ids(write_rows(tmp_path / "plain.jsonl", PLAIN_QA), tokenizer)[0]
    assert report.columns == {"prompt": "instruction", "completion": "output", "input": "input"}
    assert report.unused == []

    with_history = write_rows(tmp_path / "history.jsonl", [
        {"instruction": "And 2 + 2?", "input": "", "output": "4", "system": "Be brief.", "history": [["1 + 1?", "2"]]}])
    messages = write_rows(tmp_path / "messages.jsonl", [{"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "1 + 1?"},
        {"role": "assistant", "content": "2"}, {"role": "user", "content": "And 2 + 2?"},
        {"role": "assistant", "content": "4"}]}])
    assert qa_ids(with_history, tokenizer)[0] == qa_ids(messages, tokenizer)[0]


def test_sharegpt_conversations_with_any_role_spelling(tmp_path, tokenizer):
    messages = write_rows(tmp_path / "messages.jsonl", [{"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 1 + 1?"},
        {"role": "assistant", "content": "2"}]}])
    sharegpt = write_rows(tmp_path / "sharegpt.jsonl", [{"system": "Be brief.", "conversations": [
        {"from": "human", "value": "What is 1 + 1?"}, {"from": "gpt", "value": "2"}]}])
    custom = write_rows(tmp_path / "custom.jsonl", [{"dialog": [
        {"speaker": "SYS", "says": "Be brief."}, {"speaker": "Q", "says": "What is 1 + 1?"},
        {"speaker": "A", "says": "2"}]}])
    expected = qa_ids(messages, tokenizer)[0]
    ids, report = qa_ids(sharegpt, tokenizer)
    assert ids == expected and report.columns == {"messages": "conversations", "system": "system"}
    assert qa_ids(custom, tokenizer, "data.columns.messages=dialog", "data.columns.role_key=speaker",
                  "data.columns.content_key=says", "data.columns.user_tag=Q", "data.columns.assistant_tag=A",
                  "data.columns.system_tag=SYS")[0] == expected
    with pytest.raises(DataError, match=r"message 1 has role speaker='SYS'.*data.columns.user_tag/assistant_tag/system_tag"):
        qa_ids(custom, tokenizer, "data.columns.messages=dialog", "data.columns.role_key=speaker",
               "data.columns.content_key=says")


def test_content_parts_are_text_and_other_parts_are_refused(tmp_path, tokenizer):
    plain = write_rows(tmp_path / "plain.jsonl", PLAIN_QA[1:])
    parts = write_rows(tmp_path / "parts.jsonl", [{"messages": [
        {"role": "user", "content": [{"type": "text", "text": "What is 1 + 1?"}]},
        {"role": "assistant", "content": [{"type": "text", "value": "1 + 1 = 2. The answer is 2."}]}]}])
    assert qa_ids(parts, tokenizer)[0] == qa_ids(plain, tokenizer)[0]
    image = write_rows(tmp_path / "image.jsonl", [{"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}, {"type": "text", "text": "?"}]},
        {"role": "assistant", "content": "2"}]}])
    with pytest.raises(DataError, match=r"image.jsonl:1: field 'messages' message 1 \(content\) has a 'image_url' part; "
                                        r"align trains on text only"):
        qa_ids(image, tokenizer)


def test_sharegpt_preferences_and_hh_transcripts_pair_like_plain_pairs(tmp_path, tokenizer):
    plain = write_rows(tmp_path / "plain.jsonl", [
        {"prompt": "What is 2 + 2?", "chosen": "2 + 2 = 4.", "rejected": "2 + 2 = 5."}])
    sharegpt = write_rows(tmp_path / "sharegpt.jsonl", [{
        "conversations": [{"from": "human", "value": "What is 2 + 2?"}],
        "chosen": {"from": "gpt", "value": "2 + 2 = 4."}, "rejected": {"from": "gpt", "value": "2 + 2 = 5."}}])
    hh = write_rows(tmp_path / "hh.jsonl", [{"chosen": "\n\nHuman: What is 2 + 2?\n\nAssistant: 2 + 2 = 4.",
                                             "rejected": "\n\nHuman: What is 2 + 2?\n\nAssistant: 2 + 2 = 5."}])
    expected = pair_ids(plain, tokenizer)[0]
    ids, report = pair_ids(sharegpt, tokenizer)
    assert ids == expected and report.columns == {"prompt": "conversations", "chosen": "chosen", "rejected": "rejected"}
    assert pair_ids(hh, tokenizer)[0] == expected

    # a longer HH transcript: the prompt is everything up to the last assistant turn, shared by both
    longer = write_rows(tmp_path / "hh2.jsonl", [{
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: What is 2 + 2?\n\nAssistant: 2 + 2 = 4.",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: What is 2 + 2?\n\nAssistant: 2 + 2 = 5."}])
    dataset, _ = preference.load(str(longer), data_config(), tokenizer, 256)
    assert [m["role"] for m in dataset[0]["prompt"]] == ["user", "assistant", "user"]
    assert dataset[0]["chosen"] == [{"role": "assistant", "content": "2 + 2 = 4."}]
    markers = write_rows(tmp_path / "hh3.jsonl", [{"chosen": "\n\nQ: What is 2 + 2?\n\nA: 2 + 2 = 4.",
                                                   "rejected": "\n\nQ: What is 2 + 2?\n\nA: 2 + 2 = 5."}])
    assert pair_ids(markers, tokenizer, "data.columns.transcript_user='Q:'",
                    "data.columns.transcript_assistant='A:'")[0] == expected


def test_alpaca_preferences_and_prompts_use_the_input_too(tmp_path, tokenizer):
    plain = write_rows(tmp_path / "plain.jsonl", [{"prompt": "Add.\n2 + 2", "chosen": "4", "rejected": "5"}])
    alpaca = write_rows(tmp_path / "alpaca.jsonl", [{"instruction": "Add.", "input": "2 + 2", "chosen": "4",
                                                     "rejected": "5"}])
    assert pair_ids(alpaca, tokenizer)[0] == pair_ids(plain, tokenizer)[0]
    rows, report = prompts.load(str(write_rows(tmp_path / "p.jsonl", [{"instruction": "Add.", "input": "2 + 2",
                                                                       "answer": "4"}])), data_config(), tokenizer, 64)
    assert rows[0]["prompt"] == [{"role": "user", "content": "Add.\n2 + 2"}] and rows[0]["answer"] == "4"
    assert report.passed == ["input", "answer"]


def test_unpaired_labels_are_refused_for_sft_and_reward(tmp_path, tokenizer):
    kto = write_rows(tmp_path / "kto.jsonl", [
        {"prompt": "What is 1 + 1?", "completion": "2", "label": True},
        {"prompt": "What is 1 + 1?", "completion": "3", "label": False}])
    with pytest.raises(DataError, match=r"column 'label' labels each answer good \(true\) or bad \(false\) on its own: "
                                        r"unpaired feedback \(the KTO shape\), which the SFT stage cannot train on"):
        qa.load(str(kto), data_config(), tokenizer, 256)
    with pytest.raises(DataError, match="cannot tell which columns hold the preferences"):
        preference.load(str(kto), data_config(), tokenizer, 256)
    with pytest.raises(DataError, match="which the reward model stage cannot train on"):
        preference.load(str(kto), data_config("data.columns.chosen=completion", "data.columns.rejected=prompt"),
                         tokenizer, 256)


def test_unpaired_labels_load_as_feedback_from_any_qa_shape(tmp_path, tokenizer, capsys, monkeypatch):
    rows = [{"prompt": "What is 1 + 1?", "completion": "2", "label": True},
            {"prompt": "What is 1 + 1?", "completion": "3", "label": False},
            {"prompt": "What is 2 + 2?", "completion": "4", "label": True}]
    plain, report = feedback.load(str(write_rows(tmp_path / "kto.jsonl", rows)), data_config(), tokenizer, 256)
    assert plain.column_names == ["prompt", "completion", "label"] and plain["label"] == [True, False, True]
    assert plain[1]["completion"] == [{"role": "assistant", "content": "3"}]
    assert report.labels == {"good": 2, "bad": 1} and report.summary()["labels"] == {"good": 2, "bad": 1}
    # CSV cells are text; LLaMA-Factory's kto_tag with a ShareGPT conversation; the same examples
    csv = tmp_path / "kto.csv"
    csv.write_text("q,a,ok\nWhat is 1 + 1?,2,true\nWhat is 1 + 1?,3,False\nWhat is 2 + 2?,4,TRUE\n")
    mapped = feedback.load(str(csv), data_config("data.columns.prompt=q", "data.columns.completion=a",
                                                 "data.columns.label=ok"), tokenizer, 256)[0]
    sharegpt = write_rows(tmp_path / "sharegpt.jsonl", [
        {"conversations": [{"from": "human", "value": r["prompt"]}, {"from": "gpt", "value": r["completion"]}],
         "kto_tag": r["label"]} for r in rows])
    assert mapped.to_list() == plain.to_list() == feedback.load(str(sharegpt), data_config(), tokenizer, 256)[0].to_list()

    bad = write_rows(tmp_path / "bad.jsonl", [rows[0], {**rows[1], "label": "maybe"}])
    with pytest.raises(DataError, match=r"bad.jsonl:2: .*field 'label' is 'maybe'; expected true \(a good answer\) or "
                                        r"false"):
        feedback.load(str(bad), data_config(), tokenizer, 256)
    with pytest.raises(DataError, match="every answer is labelled good; KTO needs answers of both kinds"):
        feedback.load(str(write_rows(tmp_path / "good.jsonl", [rows[0], rows[2]])), data_config(), tokenizer, 256)
    with pytest.raises(DataError, match="cannot tell which column labels each answer good or bad .* "
                                        "set data.columns.label=<column>"):
        feedback.load(str(write_rows(tmp_path / "qa.jsonl", PLAIN_QA)), data_config(), tokenizer, 256)

    monkeypatch.setenv("COLUMNS", "300")
    assert main(["data", "check", str(tmp_path / "kto.jsonl")]) == 0  # auto: the feedback kind
    printed = capsys.readouterr().out
    assert "feedback" in printed and "label=label (auto)" in printed and "2 answers labelled good, 1 bad" in printed


def test_every_column_is_accounted_for(tmp_path, tokenizer, caplog, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # the data check table on one line per row
    path = write_rows(tmp_path / "dolly.jsonl", [
        {"instruction": "Add.", "context": "2 + 2", "response": "4", "category": "math", "notes": "n"}])
    dataset, report = qa.load(str(path), data_config("data.columns.input=notes"), tokenizer, 256)
    assert dataset[0]["prompt"][0]["content"] == "Add.\nn"
    assert report.unused == ["context", "category"] and report.summary()["unused_columns"] == ["context", "category"]
    assert "columns not used: context, category; it may hold content: 'context' (set data.columns.input=context" in caplog.text
    assert main(["data", "check", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "prompt=instruction (auto)" in printed and "input=context (auto)" in printed and "unused: category" in printed
    assert "max_length 256" in printed  # sft.max_length's default (1024), capped at the tiny base's context


def test_byte_order_marks_are_not_data(tmp_path, tokenizer):
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes("\ufeff".encode() + json.dumps(PLAIN_QA[1]).encode() + b"\n")
    csv = tmp_path / "bom.csv"
    csv.write_bytes("\ufeffq,a\nWhat is 1 + 1?,1 + 1 = 2. The answer is 2.\n".encode())
    plain = qa_ids(write_rows(tmp_path / "plain.jsonl", PLAIN_QA[1:]), tokenizer)[0]
    assert qa_ids(jsonl, tokenizer)[0] == plain
    assert qa_ids(csv, tokenizer, "data.columns.prompt=q", "data.columns.completion=a")[0] == plain


def test_hints_fit_the_file(tmp_path, tokenizer, capsys):
    prefs = write_rows(tmp_path / "prefs.jsonl", [{"chosen_messages": "4", "rejected_messages": "5", "q": "2 + 2?"}])
    with pytest.raises(DataError, match=r"look like preference data \(chosen_messages, rejected_messages\), which the "
                                        r"reward stage reads"):
        qa.load(str(prefs), data_config(), tokenizer, 256)
    assert main(["data", "check", str(prefs)]) == 2  # guessed as preference data: told what to map
    assert "map them: data.columns.chosen=chosen_messages data.columns.rejected=rejected_messages" in capsys.readouterr().err
    # options after the file and overrides after options
    assert main(["data", "check", str(prefs), "--kind", "preference", "data.columns.chosen=chosen_messages",
                 "data.columns.rejected=rejected_messages", "data.columns.prompt=q"]) == 0

    unknown = write_rows(tmp_path / "q.csv", [{"q": "2 + 2?", "good": "4", "bad": "5"}])
    with pytest.raises(DataError, match=r"If the file holds question-answer pairs, map data.columns.prompt and "
                                        r"data.columns.completion; preference pairs, data.columns.prompt, "
                                        r"data.columns.chosen and data.columns.rejected"):
        prompts.load(str(unknown), data_config(), tokenizer, 64)

    empty_answers = write_rows(tmp_path / "empty.jsonl", [{"prompt": "a", "completion": " "}] * 3)
    with pytest.raises(DataError) as error:
        qa.load(str(empty_answers), data_config(), tokenizer, 256)
    assert "no row is usable (3 rows read: empty=3)" in str(error.value) and "skip_invalid" not in str(error.value)


def test_max_length_beyond_the_models_context_is_refused(write_recipe):
    from align.recipe import RecipeError
    from align.stages import sft

    from align.modeling import load_tokenizer

    context = json.loads((TINY_BASE / "config.json").read_text())["max_position_embeddings"]
    recipe = load_recipe(write_recipe(data={"sft": {"train": str(TINY_BASE.parent / "arithmetic" / "sft_train.jsonl")},
                                            "columns": {"prompt": "question", "completion": "answer"}},
                                      sft={"max_length": context + 1}))
    with pytest.raises(RecipeError, match=f"sft.max_length={context + 1} is longer than .*tiny-base's context of "
                                          f"{context} tokens"):
        sft.load_data(recipe, load_tokenizer(recipe.model))
