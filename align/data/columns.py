"""Which column holds which field: the recipe's mapping where set, else the usual names (`names.AUTO_COLUMNS`);
and, for a file whose columns did not map, a hint that names the keys to set for the kind of data they suggest."""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Any

from align.data.files import DataError
from align.data.names import ANSWER_PAIRS, AUTO_COLUMNS, CHOICE_COLUMNS

if TYPE_CHECKING:
    from align.recipe import Columns


def resolve_columns(path: str, available: list[str], mapping: Columns, fields: tuple[str, ...],
                    taken: dict[str, Any] | None = None) -> dict[str, Any]:
    """Column for each of `fields`: the recipe's mapping where set (and present), else the first common name found
    that no field of `taken` (field -> column, resolved before) already uses."""
    used = {c for v in (taken or {}).values() for c in (v if isinstance(v, list) else [v])}
    resolved = {}
    for name in fields:
        wanted = getattr(mapping, name)
        if wanted is not None:
            for column in wanted if isinstance(wanted, (list, tuple)) else [wanted]:
                if column not in available:
                    close = difflib.get_close_matches(str(column), available, n=1)
                    raise DataError(
                        f"{path}: data.columns.{name} {'names' if column != wanted else 'is'} '{column}', but the "
                        "file has no such column "
                        f"(columns: {', '.join(available)})" + (f"; did you mean '{close[0]}'?" if close else ""))
            resolved[name] = wanted
        else:
            found = next((c for c in AUTO_COLUMNS.get(name, ()) if c in available and c not in used), None)
            if found is not None:
                resolved[name] = found
    return resolved


def preference_pair_columns(available: list[str]) -> tuple[str, str] | None:
    """The (chosen, rejected) columns a file's names suggest (chosen_messages, rejected_response, ...), if any."""
    chosen = [c for c in available if "chosen" in c.lower() or "preferred" in c.lower()]
    rejected = [c for c in available if "rejected" in c.lower()]
    return (chosen[0], rejected[0]) if chosen and rejected else None


def answer_pair_mapping(available: list[str]) -> str | None:
    """For a file of two answers and a choice (response_0, response_1, better_response_id; human_ref_A,
    human_ref_B, labels), the keys that map it to chosen/rejected, with the choice_kind its usual meaning has."""
    pair = next((p for p in ANSWER_PAIRS if set(p) <= set(available)), None)
    choice = next((c for c in CHOICE_COLUMNS if c in available), None)
    if pair is None or choice is None:
        return None
    return (f"data.columns.responses=[{pair[0]},{pair[1]}] data.columns.choice={choice} "
            f"data.columns.choice_kind={CHOICE_COLUMNS[choice]}")


def looks_like(available: list[str], kind: str) -> str:
    """A hint for a file whose columns did not map: the keys to set, for the kind of data they suggest."""
    two_answers = answer_pair_mapping(available)
    if two_answers:
        return (f". The columns look like two answers and a choice, which the reward and DPO stages read as "
                f"preference pairs: map them with {two_answers} (check the direction: `align data check FILE --kind "
                "preference key=value ...` shows one mapped pair; choice_kind=index means the value is the better "
                "answer's position, first_better that 1 means the first answer is the better one)")
    pair = preference_pair_columns(available)
    if pair and kind == "preference":
        return f"; map them: data.columns.chosen={pair[0]} data.columns.rejected={pair[1]}"
    if pair:
        return (f". The columns look like preference data ({pair[0]}, {pair[1]}), which the reward stage reads "
                f"(data.preference; data.columns.chosen={pair[0]} data.columns.rejected={pair[1]})")
    if kind == "preference":
        return ""
    return (". If the file holds question-answer pairs, map data.columns.prompt and data.columns.completion; "
            "preference pairs, data.columns.prompt, data.columns.chosen and data.columns.rejected (align data check "
            "FILE --kind qa|preference|feedback|prompts key=value ... tries a mapping)")
