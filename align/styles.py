"""Answer styles: a plug-in names the style of each answer (the quickstart's sums: `worked` column by column, or
`direct`), and every held-out evaluation (SFT, GRPO, PPO, `align compare`) reports each style's share of the
answers and its accuracy. RL that raises accuracy by changing how the policy answers shows it here."""

from __future__ import annotations

import statistics
from typing import Callable

from align.recipe import RecipeError


def load_style(spec: str | None, where: str = "data.answer_style") -> Callable[[str], str] | None:
    """The plug-in 'package.module:function' (answer text -> style name), or None when `spec` is unset."""
    if spec is None:
        return None
    from align.rewards import RewardError, import_plugin

    try:
        fn = import_plugin(spec, f"{where}={spec}")
    except RewardError as e:
        raise RecipeError(str(e)) from None

    def style(answer: str) -> str:
        name = fn(answer)
        if not isinstance(name, str) or not name:
            raise RecipeError(f"{where}={spec} returned {name!r} for the answer {answer[:60]!r}; it must return the "
                              "style's name (a non-empty string)")
        return name

    return style


def breakdown(labels: list[str], correct: list[float] | None) -> dict[str, float]:
    """For each style among `labels` (one per answer), `<style>_fraction` of the answers and, when `correct` is
    given (1 right, 0 wrong, per answer), `<style>_accuracy` over that style's answers."""
    result: dict[str, float] = {}
    for name in sorted(set(labels)):
        mine = [i for i, label in enumerate(labels) if label == name]
        result[f"{name}_fraction"] = len(mine) / len(labels)
        if correct is not None:
            result[f"{name}_accuracy"] = statistics.fmean(correct[i] for i in mine)
    return result


def names(*results: dict) -> list[str]:
    """The styles that results with a `breakdown` name, sorted."""
    return sorted({k.removesuffix("_fraction") for r in results for k in r if k.endswith("_fraction")})


def describe(result: dict) -> str:
    """', worked 12% (76% right), direct 88% (57% right)' for a result that has a breakdown, else ''."""
    styles = names(result)
    return "".join(f", {s} {result[s + '_fraction']:.0%}"
                   + (f" ({result[s + '_accuracy']:.0%} right)" if f"{s}_accuracy" in result else "") for s in styles)
