"""The user's data in the formats it comes in. Every cell of TRL's dataset-format table (type x
standard/conversational) and two answers with a choice, one file of each made here, through `align data check`,
the loaders and a short SFT or reward run; and the other toolkits' formats (Alpaca, ShareGPT, Anthropic-HH
transcripts, content parts, BOMs). Each loads to the token ids of the same data written plainly (rows that repeat
their prompt, or give it as messages, train on the same tokens and labels as the explicit form); every column is
accounted for; unpaired labels are refused where pairs or targets are read, and read as KTO's feedback."""

import json

import pytest

from conftest import PREF_TRAIN, QA_TRAIN, TINY_BASE, sft_section, write_rows

from align.cli import main
from align.data import feedback, preference, prompts, qa
from align.data.files import DataError
from align.modeling import conversation_ids
from align.recipe import load_recipe
from align.stages import reward, sft

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


def test_conversational_prompt_completion_trains_on_what_the_standard_form_does(tmp_path, tokenizer, write_recipe):
    system = {"role": "system", "content": "Be brief."}
    conversational = write_rows(tmp_path / "conversational.jsonl", [
        {"prompt": [system, USER], "completion": [{"role": "assistant", "content": PLAIN["completion"]}]}])
    standard = write_rows(tmp_path / "standard.jsonl", [{**PLAIN, "system": "Be brief."}])
    # the token ids and answer mask SFT trains on, as the loader tokenized them
    ids = [qa.load(str(p), data_config(), tokenizer, 256)[0].select_columns(["input_ids", "completion_mask"]).to_list()
           for p in (conversational, standard)]
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
