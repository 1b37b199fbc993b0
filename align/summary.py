"""What a stage's results say, as the CLI prints them: each stage module's `summary(results)` returns a
`Summary`, which `align <stage>` prints in full and `align run` condenses to its headline lines."""

from __future__ import annotations

from dataclasses import dataclass, field

Row = tuple[str, str, str]  # label, before, after


@dataclass
class Summary:
    notes: list[str] = field(default_factory=list)  # printed before the tables
    tables: list[tuple[str, list[Row]]] = field(default_factory=list)  # (title, rows)
    headline: list[str] = field(default_factory=list)  # `align run`'s table: "label before -> after"
    samples: list[str] = field(default_factory=list)  # printed after the tables


def pct(value: float) -> str:
    return f"{value:.1%}"


def num(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}"


def arrow(label: str, before: float, after: float, fmt=num) -> str:
    return f"{label} {fmt(before)} -> {fmt(after)}"


def style_rows(before: dict, after: dict) -> list[Row]:
    """Each answer style's share and accuracy (data.answer_style), before and after; '-' where it had no answer."""
    from align.styles import names

    rows = []
    for style in names(before, after):
        rows.append((f"{style} answers: share", pct(before.get(style + "_fraction", 0)),
                     pct(after.get(style + "_fraction", 0))))
        if style + "_accuracy" in (*before, *after):
            rows.append((f"{style} answers: accuracy", *(pct(r[style + "_accuracy"]) if style + "_accuracy" in r
                                                         else "-" for r in (before, after))))
    return rows


def style_lines(before: dict, after: dict, prefix: str = "") -> list[str]:
    """'worked 12.5% -> 100.0% of answers' per answer style (data.answer_style), before -> after."""
    from align.styles import names

    return [f"{prefix}{s} {pct(before.get(s + '_fraction', 0))} -> {pct(after.get(s + '_fraction', 0))} of answers"
            for s in names(before, after)]


def policy_answers(summary: Summary, results: dict) -> None:
    """Adds the held-out answers of a policy stage that generates them (GRPO, PPO): rewards of greedy and
    sampled answers before and after, as tables and headline lines."""
    before, after = results["before"], results["after"]
    if not after:
        summary.notes.append("no held-out prompts (data.prompts.eval), so no before/after evaluation")
        return
    for decoding, title in (("greedy", f"greedy answers to {after['prompts']} held-out prompts"),
                            ("sampled", f"{after.get('sampled', {}).get('per_prompt')} sampled answers to each of "
                                        f"{after['prompts']} held-out prompts (training temperature)")):
        if decoding not in after:
            continue
        b, a = before[decoding], after[decoding]
        rows = [("reward (weighted total)", num(b["reward_mean"], 4), num(a["reward_mean"], 4))]
        rows += [(key.split("/", 1)[1], num(b[key], 4), num(a[key], 4)) for key in a if key.startswith("rewards/")]
        rows.append(("answer tokens (mean)", f"{b['completion_tokens_mean']:.1f}", f"{a['completion_tokens_mean']:.1f}"))
        if "ended_at_eos" in a and "ended_at_eos" in b:
            rows.append(("ended at EOS", pct(b["ended_at_eos"]), pct(a["ended_at_eos"])))
        summary.tables.append((title, rows + style_rows(b, a)))
        summary.headline.append(arrow(f"{decoding} reward", b["reward_mean"], a["reward_mean"]))
        if "rewards/exact_match" in a:
            summary.headline.append(arrow(f"{decoding} accuracy", b["rewards/exact_match"], a["rewards/exact_match"], pct))
        summary.headline += style_lines(b, a, f"{decoding} ")


def kl_notes(summary: Summary, results: dict) -> None:
    """The KL to the reference of an RL stage, in the unit its results name, and the rollouts' EOS fraction."""
    unit = results.get("kl_unit", "unit not recorded")
    kl = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    summary.notes.append(f"KL to the reference ({unit}): first step {kl(results['kl_first'])}, last "
                         f"{kl(results['kl_last'])}, max {kl(results['kl_max'])}")
    if results.get("eos_fraction_last") is not None:
        summary.notes.append(f"rollouts that ended at EOS (the last logged): {pct(results['eos_fraction_last'])}")
    if results.get("kl_last") is not None:
        summary.headline.append(f"KL {results['kl_first']:.3g} -> {results['kl_last']:.3g} {unit} "
                                f"(max {results['kl_max']:.3g})")


def policy_note(results: dict) -> str:
    """Where a policy stage started, and its steps and training time."""
    return (f"policy started from: {results['init_from'] or 'a fresh adapter on the base'}; "
            f"{results['steps']} steps in {results['train_seconds']:.0f} s")


def rl_summary(results: dict) -> Summary:
    """GRPO's and PPO's results: where the policy started, KL, rewards before and after."""
    summary = Summary(notes=[policy_note(results)])
    policy_answers(summary, results)
    kl_notes(summary, results)
    return summary
