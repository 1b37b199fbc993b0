"""The kinds of data, each described once: the data section a recipe names its files in and the module that
reads it (its fields, their checks, its loader: `columns(path, column names, data.columns)` and `load(path,
data config, tokenizer, max_length)`). `align data check`, its `--kind` choices and its guess of a file's kind,
and the stages read files through these. Light to import: a kind's module loads when it is first used."""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Kind:
    name: str
    section: str  # data.<section>: where a recipe names its files
    module: str  # align.data.<module>

    @property
    def columns(self):
        return importlib.import_module(self.module).columns

    @property
    def load(self):
        return importlib.import_module(self.module).load


KINDS = {kind.name: kind for kind in (
    Kind("qa", section="sft", module="align.data.qa"),
    Kind("preference", section="preference", module="align.data.preference"),
    Kind("feedback", section="feedback", module="align.data.feedback"),
    Kind("prompts", section="prompts", module="align.data.prompts"),
)}


def guess(path: str, available: list[str], mapping) -> str:
    """The kind a file's columns suggest: preference if they map to preference columns (or look like chosen_x /
    rejected_x, or two answers and a choice: the error then says how to map them), else feedback if they are
    question-answer columns with a true/false label, else qa if they are question-answer columns, else prompts."""
    from align.data.columns import answer_pair_mapping, preference_pair_columns
    from align.data.files import DataError

    if preference_pair_columns(available) or answer_pair_mapping(available):
        return "preference"
    for name in ("preference", "feedback", "qa"):
        try:
            KINDS[name].columns(path, available, mapping)
            return name
        except DataError:
            pass
    return "qa" if "text" in available else "prompts"  # language-modeling text: qa says how to map it
