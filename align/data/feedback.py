"""Unpaired feedback (the KTO stage): a prompt, one answer and a label per row, true for a good answer and false
for a bad one (TRL's unpaired preference type, LLaMA-Factory's kto_tag); the question and answer columns are read
as question-answer pairs are."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from align.data import qa
from align.data.checks import account, attempt, available, open_records, token_ids, token_lengths, validated
from align.data.columns import resolve_columns
from align.data.files import DataError, Invalid

if TYPE_CHECKING:
    from align.recipe import Columns, DataConfig


def columns(path: str, names: list[str], mapping: Columns) -> tuple[dict[str, str], list[str]]:
    """A question-answer file's columns (`qa.columns`) and a label column: true for a good answer, false for a bad
    one (TRL's unpaired preference type, LLaMA-Factory's kto_tag)."""
    resolved, detected = qa.columns(path, names, mapping)
    label = resolve_columns(path, names, mapping, ("label",))
    if not label:
        raise DataError(f"{path}: cannot tell which column labels each answer good or bad (columns: "
                        f"{', '.join(names)}); set data.columns.label=<column> (true: a good answer, false: a bad "
                        "one)")
    return resolved | label, detected + (["label"] if mapping.label is None else [])


def example(values: dict, columns: dict[str, str], cfg: DataConfig) -> dict[str, Any]:
    """One row as TRL's conversational unpaired-preference example {prompt, completion, label}."""
    label = values.get(columns["label"])
    if isinstance(label, str) and label.strip().lower() in ("true", "false"):  # CSV cells are text
        label = label.strip().lower() == "true"
    if not isinstance(label, bool):
        raise Invalid("bad_label", f"field '{columns['label']}' is {label!r}; expected true (a good answer) or "
                      "false (a bad one)")
    return {**qa.example(values, columns, cfg), "label": label}


def load(path: str, cfg: DataConfig, tokenizer, max_length: int):
    """Answers labelled good or bad one at a time from `path` as a `datasets.Dataset` of {prompt, completion,
    label}, and its DataReport (`report.labels`: how many of each). Errors and skips as in `qa.load`."""
    from datasets import Dataset

    records, report = open_records(path)
    report.columns, report.detected = columns(str(path), available(records), cfg.columns)
    account(records, report, "KTO", cfg.columns.ignore)
    items = [(row, record.where, attempt(example, record, report.columns, cfg))
             for row, record in enumerate(records)]
    examples = validated(items, lambda ex: token_lengths(*token_ids(tokenizer, ex)), max_length, cfg, report)
    good = sum(e["label"] for e in examples)
    report.labels = {"good": good, "bad": len(examples) - good}
    if examples and not (good and len(examples) - good):
        raise DataError(f"{path}: every answer is labelled {'good' if good else 'bad'}; KTO needs answers of both "
                        "kinds to tell them apart")
    return Dataset.from_list(examples), report
