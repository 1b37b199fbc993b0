"""The report of `align compare`: results.json, report.md and a self-contained report.html (plots embedded as PNG
data, no external file or URL; drawn with `align.plots`, as a run's report is), with the metrics table, reward vs KL (the alignment frontier), reward
distributions, win rates with their intervals, answer lengths and sample answers."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

from align.plots import figure, page, png, pyplot, table

METRICS = (  # (label, metric, field, format)
    ("reward", "reward", "mean", "{:.3f}"),
    ("win rate vs baseline", "win_rate", "win_rate", "{:.1%}"),
    ("ties", "win_rate", "ties", "{:.1%}"),
    ("KL to reference (nats/answer)", "kl", "mean", "{:.3f}"),
    ("accuracy", "accuracy", "mean", "{:.1%}"),
    ("answer tokens", "length_tokens", None, "{:.1f}"),
    ("answer characters", "length_chars", None, "{:.1f}"),
)


def write_reports(results: dict[str, Any], out: Path) -> None:
    """results.json, a PNG per plot, report.md and report.html in `out` (none written through a link)."""
    from align.rundir import write_file

    out.mkdir(parents=True, exist_ok=True)
    write_file(out / "results.json", json.dumps(results, indent=2) + "\n")
    plots = _plots(results)
    for name, data in plots.items():
        write_file(out / f"{name}.png", data)
    write_file(out / "report.md", _markdown(results, plots))
    write_file(out / "report.html", _html(results, plots))


def metrics_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows (one per checkpoint) of the metrics each checkpoint has; means with their 95% intervals."""
    checkpoints = results["checkpoints"]
    shown = [m for m in METRICS if any(_value(c["metrics"], m) is not None for c in checkpoints.values())]
    rows = []
    for name, entry in checkpoints.items():
        row = [name]
        for metric in shown:
            value = _value(entry["metrics"], metric)
            cell = "-" if value is None else metric[3].format(value)
            ci = entry["metrics"].get(metric[1], {}).get("ci95") if metric[2] in ("mean", "win_rate") else None
            if value is not None and ci:
                cell += f" [{metric[3].format(ci[0])}, {metric[3].format(ci[1])}]"
            row.append(cell)
        rows.append(row)
    # --answer-style: each style's share of the answers (with its interval), and its accuracy
    styles = sorted({s for c in checkpoints.values() for s in c["metrics"].get("styles", {})})
    with_accuracy = any("accuracy" in c["metrics"] for c in checkpoints.values())
    for entry, row in zip(checkpoints.values(), rows):
        for style in styles:
            mine = entry["metrics"].get("styles", {}).get(style)
            if mine is None:  # none of this checkpoint's answers has the style
                row += ["0.0%"] + (["-"] if with_accuracy else [])
                continue
            (low, high), share = mine["fraction"]["ci95"], mine["fraction"]["mean"]
            row += [f"{share:.1%} [{low:.1%}, {high:.1%}]"] + ([f"{mine['accuracy']:.1%}"] if with_accuracy else [])
    columns = [c for s in styles for c in (f"{s} share", f"{s} accuracy")[: 2 if with_accuracy else 1]]
    return ["checkpoint"] + [m[0] for m in shown] + columns, rows


def paired_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the paired accuracy differences (compare.paired_differences); no rows without accuracy."""
    rows = [[p["checkpoint"], p["minus"], f"{p['difference']:+.1%}", f"[{p['ci95'][0]:+.1%}, {p['ci95'][1]:+.1%}]",
             "yes" if p["ci95"][0] > 0 or p["ci95"][1] < 0 else "no"]
            for p in results.get("paired_accuracy", [])]
    return ["checkpoint", "minus", "accuracy difference", "95% interval (paired)", "interval excludes 0"], rows


def _value(metrics: dict[str, Any], metric) -> float | None:
    _, key, field, _ = metric
    value = metrics.get(key)
    return value if field is None or value is None else value.get(field)


def _plots(results: dict[str, Any]) -> dict[str, bytes]:
    """name -> PNG bytes, for the plots the results have data for."""
    plt = pyplot()
    checkpoints = results["checkpoints"]
    names = list(checkpoints)
    plots = {}

    def save(fig, name):
        plots[name] = png(fig)

    with_reward = [n for n in names if "reward" in checkpoints[n]["metrics"]]
    with_kl = [n for n in with_reward if "kl" in checkpoints[n]["metrics"]]
    if with_reward:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in with_reward:
            m = checkpoints[name]["metrics"]
            kl = m["kl"]["mean"] if "kl" in m else 0.0
            r, (lo, hi) = m["reward"]["mean"], m["reward"]["ci95"]
            xerr = [[kl - m["kl"]["ci95"][0]], [m["kl"]["ci95"][1] - kl]] if "kl" in m else None
            ax.errorbar(kl, r, yerr=[[r - lo], [hi - r]], xerr=xerr, fmt="o", capsize=4, label=name)
            ax.annotate(name, (kl, r), textcoords="offset points", xytext=(6, 6))
        ax.set_xscale("symlog", linthresh=1.0)  # linear below 1 nat, logarithmic above: 0.5 and 80 both readable
        ax.set_xlabel("KL to the reference (nats per answer, symlog; 0 where there is none)")
        ax.set_ylabel("mean reward")
        ax.set_title("Reward vs KL: the alignment frontier" + ("" if with_kl else " (no reference: KL not measured)"))
        ax.grid(alpha=0.3)
        save(fig, "reward_vs_kl")

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.violinplot([checkpoints[n]["rewards"] for n in with_reward], showmeans=True)
        ax.set_xticks(range(1, len(with_reward) + 1), with_reward)
        ax.set_ylabel("reward of each answer")
        ax.set_title("Reward distributions")
        ax.grid(alpha=0.3, axis="y")
        save(fig, "reward_distributions")

        fig, ax = plt.subplots(figsize=(6, 4))
        rates = [checkpoints[n]["metrics"]["win_rate"] for n in with_reward]
        values = [w["win_rate"] for w in rates]
        errors = [[v - w["ci95"][0] for v, w in zip(values, rates)], [w["ci95"][1] - v for v, w in zip(values, rates)]]
        ax.bar(with_reward, values, yerr=errors, capsize=5, color="#4c72b0")
        ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"win rate vs {results['settings']['baseline']} (ties count half)")
        ax.set_title("Win rate with 95% bootstrap intervals")
        save(fig, "win_rates")

    fig, ax = plt.subplots(figsize=(6, 4))
    longest = max(max(checkpoints[n]["lengths"], default=0) for n in names)
    bins = range(0, longest + 2, max(1, (longest + 1) // 30))
    for name in names:
        ax.hist(checkpoints[name]["lengths"], bins=bins, alpha=0.5, label=name)
    ax.set_xlabel("answer length (tokens)")
    ax.set_ylabel("answers")
    ax.set_title("Answer lengths")
    ax.legend()
    save(fig, "lengths")
    return plots


def _settings_line(results: dict[str, Any]) -> str:
    s, e = results["settings"], results["eval"]
    decoding = f"sampled at temperature {s['temperature']}, top_p {s['top_p']}" if s["temperature"] > 0 else "greedy"
    per_prompt = s.get("answers_per_prompt", 1)
    return (f"{e['prompts']} prompts from {e['path']} (sha256 {e['sha256'][:12]}), {per_prompt} answer"
            f"{'s' if per_prompt > 1 else ''} each, {decoding}, "
            f"at most {s['max_new_tokens']} tokens, seed {s['seed']}; reward model: {s['reward_model'] or 'none'}; "
            f"baseline: {s['baseline']}; accuracy: {s['accuracy'] or 'none'}; system prompt: "
            f"{repr(s['system_prompt']) if s.get('system_prompt') else 'the chat template own'}")


def _markdown(results: dict[str, Any], plots: dict[str, bytes]) -> str:
    header, rows = metrics_table(results)
    lines = ["# align compare", "", _md(_settings_line(results)) + ".", "",
             "Means with 95% bootstrap intervals over prompts. KL: " + results["settings"]["kl_estimator"] + ".", "",
             "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join([_md(row[0])] + row[1:]) + " |" for row in rows]
    paired_header, paired_rows = paired_table(results)
    if paired_rows:
        lines += ["", "Accuracy differences on the same prompts, with 95% bootstrap intervals of the paired "
                  "difference:", "", "| " + " | ".join(paired_header) + " |", "|" + " --- |" * len(paired_header)]
        lines += ["| " + " | ".join([_md(row[0]), _md(row[1])] + row[2:]) + " |" for row in paired_rows]
    lines += [""] + [f"![{name}]({name}.png)" for name in plots] + ["", "## Sample answers", ""]
    for sample in results["samples"]:  # model text is data: fenced, never read as markdown or HTML
        lines += ["Prompt" + (f" (reference: {_md(sample['reference'])})" if "reference" in sample else "") + ":",
                  _fenced(sample["prompt"])]
        for name, answer in sample["answers"].items():
            lines += [f"{_md(name)}:", _fenced(answer.strip())]
        lines.append("")
    return "\n".join(lines)


def _md(text: Any) -> str:
    """`text` inline in markdown: HTML-escaped, markdown punctuation backslash-escaped, on one line."""
    escaped = html.escape(" ".join(str(text).split()))
    return "".join("\\" + c if c in "\\`*_{}[]()#+-.!|~>" else c for c in escaped)


def _fenced(text: str) -> str:
    """`text` as a fenced code block, its fence longer than any run of backticks in it."""
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall("`+", text)), default=0))
    return f"{fence}text\n{text}\n{fence}"


def _html(results: dict[str, Any], plots: dict[str, bytes]) -> str:
    esc = html.escape
    metrics = table(*metrics_table(results))
    paired_header, paired_rows = paired_table(results)
    paired = ("<p>Accuracy differences on the same prompts, with 95% bootstrap intervals of the paired difference:"
              "</p>" + table(paired_header, paired_rows)) if paired_rows else ""
    images = "".join(figure(name, data) for name, data in plots.items())
    names = list(results["checkpoints"])
    samples = "<table><tr><th>prompt</th>" + "".join(f"<th>{esc(n)}</th>" for n in names) + "</tr>" + "".join(
        f"<tr><td>{esc(s['prompt'])}" + (f"<br><small>reference: {esc(s['reference'])}</small>" if "reference" in s
                                          else "") + "</td>"
        + "".join(f"<td><pre>{esc(s['answers'][n].strip())}</pre></td>" for n in names) + "</tr>"
        for s in results["samples"]) + "</table>"
    return page("align compare", f"<p>{esc(_settings_line(results))}.</p><p>Means with 95% bootstrap intervals over "
                f"prompts. KL: {esc(results['settings']['kl_estimator'])}.</p>{metrics}{paired}<h2>Plots</h2>"
                f"{images}<h2>Sample answers</h2>{samples}")
