"""A run you can look at: RUN_DIR/report.html, self-contained (plots embedded, no network), from what the run dir
holds. `align report RUN_DIR` writes it, and `align run` at its end, a failed or interrupted run too (what exists
so far, with the failure stated). One section per stage, in the order the run took them: its curves against the
step (the registry's `curves`, held-out evaluations as points), the before -> after tables the console prints,
the gates and their measurements from pipeline.jsonl, a few held-out prompts with the answers before and after,
and what ran (base model, data files, seed, versions, wall time, processes, batch). Everything read from the run
dir is untrusted text: escaped, never run."""

from __future__ import annotations

import datetime
import fnmatch
import html
import json
import logging
from pathlib import Path
from typing import Any

from align import plots
from align.registry import BY_NAME, STAGES

log = logging.getLogger(__name__)

SAMPLES = 5  # held-out prompts shown per stage


def write(run_dir: str | Path, failure: str | None = None) -> Path:
    """Writes run_dir/report.html and returns its path; `failure`: why the run stopped, if it did."""
    from align.rundir import write_file

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        from align.errors import AlignError

        raise AlignError(f"{run_dir}: not a run directory (align run writes runs/<run name>/)")
    journal = _json_lines(run_dir / "pipeline.jsonl")
    body = [f"<p>run dir: {html.escape(str(run_dir))}</p>"]
    if failure:
        body.append(f"<p class='failed'>The run stopped: {html.escape(failure)}</p>")
    body.append(_journal(journal))
    for name in _stages(run_dir, journal):
        body.append(_stage(run_dir / name, name, [r for r in journal if r.get("stage") == name]))
    path = run_dir / "report.html"
    write_file(path, plots.page(f"align run {run_dir.name}", "".join(body)))
    return path


def _stages(run_dir: Path, journal: list[dict]) -> list[str]:
    """The stages of the run dir, in the order the run took them (then any others, in the registry's order)."""
    seen = [r["stage"] for r in journal if r.get("stage") in BY_NAME]
    ordered = list(dict.fromkeys(seen + [s.name for s in STAGES]))
    return [name for name in ordered if (run_dir / name).is_dir()]


def _json_lines(path: Path) -> list[dict]:
    """The records of a run dir's .jsonl file (rundir.read_jsonl: a torn last line dropped), none if it is absent."""
    from align.rundir import read_jsonl

    return [r for r in read_jsonl(path) if isinstance(r, dict)] if path.is_file() else []


def _journal(journal: list[dict]) -> str:
    """pipeline.jsonl as a table: each decision, gate and end, with its reason or measurements."""
    if not journal:
        return ""
    rows = []
    for record in journal:
        what = record.get("action") or (f"gate {record['gate']}" if "gate" in record else "")
        if "passed" in record:
            what += ": passed" if record["passed"] else ": FAILED"
        details = {k: v for k, v in record.items() if k not in ("time", "stage", "action", "gate", "passed")}
        rows.append((record.get("time", ""), record.get("stage", ""), what,
                     "; ".join(f"{k}: {v}" for k, v in details.items())))
    return "<h2>Decisions (pipeline.jsonl)</h2>" + plots.table(("time", "stage", "what", "details"), rows)


def _stage(directory: Path, name: str, journal: list[dict]) -> str:
    spec = BY_NAME[name]
    lineage = _json(directory / "lineage.json")
    metrics = _json_lines(directory / "metrics.jsonl")
    parts = [f"<section id='{name}'><h2>{name}</h2><p>{html.escape(spec.help)}</p>"]
    if not lineage.get("end_time"):
        parts.append("<p class='failed'>Not finished: what it logged so far.</p>")
    error = directory / "error.log"
    if error.is_file():
        parts.append(f"<p class='failed'>error.log:</p><pre>{html.escape(error.read_text(errors='replace')[-3000:])}</pre>")
    parts.append(_curves(spec, metrics))
    parts.append(_results(spec, lineage.get("results")))
    gates = [r for r in journal if "gate" in r]
    if gates:
        parts.append("<h3>Gates</h3>" + plots.table(
            ("gate", "passed", "measured"),
            [(g["gate"], g.get("passed"), "; ".join(f"{k}: {v}" for k, v in g.items()
                                                    if k not in ("time", "stage", "gate", "passed"))) for g in gates]))
    parts.append(_samples(_json_lines(directory / "samples.jsonl")[:SAMPLES]))
    parts.append(_what_ran(lineage))
    return "".join(parts) + "</section>"


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(errors="replace"))
    except (OSError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _curves(spec, metrics: list[dict]) -> str:
    """One plot per curve of the stage that has data; held-out evaluations logged during training as points."""
    numeric = lambda r, k: isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)  # noqa: E731
    training = [r for r in metrics if isinstance(r.get("step"), (int, float)) and not any(k.startswith("eval_") for k in r)]
    figures = []
    for title, patterns in spec.curves:
        keys = [k for p in patterns for k in sorted({k for r in training for k in r if fnmatch.fnmatchcase(k, p)})]
        lines = {k: ([r["step"] for r in training if numeric(r, k)], [r[k] for r in training if numeric(r, k)])
                 for k in dict.fromkeys(keys)}
        lines = {k: v for k, v in lines.items() if v[0]}
        if lines:
            figures.append(plots.figure(title, plots.curves(title, title.split(" (")[0], lines), caption=""))
    held_out = {k: ([r["step"] for r in metrics if numeric(r, k)], [r[k] for r in metrics if numeric(r, k)])
                for k in spec.held_out}
    held_out = {k: v for k, v in held_out.items() if v[0]}
    if held_out:
        figures.append(plots.figure("held-out evaluations", plots.curves(
            "held-out evaluations during training", "value", {}, held_out), caption=""))
    return "<h3>Curves</h3>" + "".join(figures) if figures else "<p>No training steps logged.</p>"


def _results(spec, results: dict[str, Any] | None) -> str:
    """The before -> after tables and notes the console prints for this stage (`summary(results)`)."""
    if not results:
        return ""
    try:
        summary = spec.module.summary(results)
    except (KeyError, TypeError, ValueError) as e:  # results of another align version: say so, show the rest
        return f"<p>The results could not be summarised ({html.escape(type(e).__name__)}: {html.escape(str(e))}).</p>"
    parts = ["<h3>Before -&gt; after (held-out)</h3>"]
    parts += [f"<p>{html.escape(note)}</p>" for note in summary.notes]
    for title, rows in summary.tables:
        parts.append(f"<p><b>{html.escape(title)}</b></p>" + plots.table(("", "before", "after"), rows))
    if summary.headline:
        parts.append("<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in summary.headline) + "</ul>")
    return "".join(parts)


def _samples(samples: list[dict]) -> str:
    if not samples:
        return ""
    rows = [(s.get("prompt", ""), s.get("before", ""), s.get("after", ""),
             _scores(s.get("rewards_before")), _scores(s.get("rewards_after"))) for s in samples]
    return "<h3>Held-out answers before and after</h3>" + plots.table(
        ("prompt", "before", "after", "rewards before", "rewards after"), rows)


def _scores(rewards: Any) -> str:
    if not isinstance(rewards, dict):
        return "" if rewards is None else str(rewards)
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, (int, float)) else f"{k} {v}" for k, v in rewards.items())


def _what_ran(lineage: dict) -> str:
    if not lineage:
        return ""
    results = lineage.get("results") or {}
    base = lineage.get("base_model") or {}
    rows = [("base model", f"{base.get('name_or_path')} (weights sha256 {str(base.get('weights_sha256'))[:12]})"),
            ("started from", lineage.get("parent_checkpoint") or "the base"),
            ("reference", lineage.get("reference") or "none"),
            ("seed", lineage.get("seed")),
            ("wall time", _wall(lineage.get("start_time"), lineage.get("end_time"))),
            ("processes, effective batch", f"{results.get('processes')}, {results.get('effective_batch')}"),
            ("command", " ".join(map(str, lineage.get("command") or []))),
            ("git", lineage.get("git")),
            ("versions", ", ".join(f"{k} {v}" for k, v in (lineage.get("packages") or {}).items()))]
    data = [(d.get("path"), d.get("rows"), d.get("examples"), d.get("skipped"),
             ", ".join(f"{k}={v}" for k, v in (d.get("columns") or {}).items()), ", ".join(d.get("unused_columns") or []))
            for d in lineage.get("data") or [] if isinstance(d, dict)]
    return ("<h3>What ran</h3>" + plots.table(("", ""), rows)
            + (plots.table(("data file", "rows", "used", "skipped", "columns", "unused"), data) if data else ""))


def _wall(start: str | None, end: str | None) -> str:
    if not start:
        return "unknown"
    if not end:
        return f"started {start}, not finished"
    seconds = (datetime.datetime.fromisoformat(end) - datetime.datetime.fromisoformat(start)).total_seconds()
    return f"{int(seconds // 60)} min {int(seconds % 60)} s ({start} -> {end})"
