"""Prompts for the RL stages: a prompt column (text, or messages ending in a user turn); every other column (a
reference answer, say) is passed to the reward functions under its own name."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from align.data.checks import attempt, available, log_detected, open_records, prompt_lengths, validated
from align.data.columns import looks_like, resolve_columns
from align.data.fields import prompt_messages, with_system
from align.data.files import DataError
from align.data.names import PROMPT_PARTS

if TYPE_CHECKING:
    from align.recipe import Columns, DataConfig


# Names TRL gives its own arguments of a reward function; a data column with one of them would be shadowed.
RESERVED_COLUMNS = ("completion", "completion_ids", "completions", "prompts", "trainer_state", "log_extra",
                    "log_metric", "environments")


def columns(path: str, names: list[str], mapping: Columns) -> tuple[dict[str, str], list[str]]:
    """The prompt column (text, or messages ending in a user turn); every other column is passed along."""
    found = resolve_columns(path, names, mapping, ("prompt", "messages"))
    name = "prompt" if "prompt" in found else "messages" if "messages" in found else None
    if name is None:
        raise DataError(f"{path}: cannot tell which column holds the prompt (columns: {', '.join(names)}); "
                        "set data.columns.prompt=<column>" + looks_like(names, "prompts"))
    clash = sorted(set(names) & set(RESERVED_COLUMNS))
    if clash:
        raise DataError(f"{path}: column '{clash[0]}' has a name TRL uses for its own reward-function arguments, so "
                        "the reward functions would never see it; rename the column (e.g. to 'reference')")
    resolved = {"prompt": found[name]}
    resolved |= resolve_columns(path, names, mapping, PROMPT_PARTS, resolved)
    return resolved, [n for n in resolved if getattr(mapping, "messages" if n == "prompt" and name == "messages" else n) is None]


def example(values: dict, columns: dict[str, str], cfg: DataConfig) -> dict[str, Any]:
    """One row as {prompt: messages, <every other column>: its value}."""
    prompt = with_system(prompt_messages(values, columns, cfg.columns), values, columns, cfg)
    return {"prompt": prompt, **{k: v for k, v in values.items()
                                 if k != columns["prompt"] and k not in cfg.columns.ignore}}


def load(path: str, cfg: DataConfig, tokenizer, max_length: int):
    """Prompts from `path` as a `datasets.Dataset` of {prompt: messages, other columns as they are}, and its
    DataReport. Errors and skips as in `qa.load`; a prompt longer than `max_length` tokens (with the generation
    prompt) is 'too_long'."""
    from datasets import Dataset

    records, report = open_records(path)
    report.columns, report.detected = columns(str(path), available(records), cfg.columns)
    report.ignored = [c for c in available(records) if c != report.columns["prompt"] and c in cfg.columns.ignore]
    report.passed = [c for c in available(records) if c != report.columns["prompt"] and c not in report.ignored]
    log_detected(report)
    items = [(row, record.where, attempt(example, record, report.columns, cfg))
             for row, record in enumerate(records)]

    def lengths(examples):
        tokens = prompt_lengths(tokenizer, examples)
        return {"prompt": tokens, "total": tokens}

    examples = validated(items, lengths, max_length, cfg, report)
    return Dataset.from_list(examples), report
