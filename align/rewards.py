"""Rule rewards: checks of an answer that need no model. The quickstart's arithmetic is scored by the final
number of the answer ("... The answer is 42." -> "42") against the reference answer's final number."""

from __future__ import annotations

import re

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """The last number in `text`, without thousands separators; None if there is none."""
    numbers = NUMBER.findall(text)
    return numbers[-1].replace(",", "").rstrip(".") if numbers else None


def final_answer_match(completion: str, reference: str) -> bool:
    """Whether the completion ends on the same number as the reference answer."""
    expected = final_number(reference)
    return expected is not None and final_number(completion) == expected
