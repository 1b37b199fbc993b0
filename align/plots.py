"""Plots and self-contained HTML pages, for both reports (`align compare`'s and a run's): figures as PNG bytes
embedded as data (no external file or URL), tables and text always HTML-escaped (model text and run dirs are
untrusted)."""

from __future__ import annotations

import base64
import html
import io
from typing import Any, Iterable

STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}"
         "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
         "figure{display:inline-block;margin:0.5em}pre{white-space:pre-wrap;margin:0}.failed{color:#b00020}")


def pyplot():
    """matplotlib's pyplot, drawing to files only (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png(fig) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    plt = pyplot()
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def curves(title: str, ylabel: str, lines: dict[str, tuple[list[float], list[float]]],
           points: dict[str, tuple[list[float], list[float]]] | None = None) -> bytes:
    """Lines (label -> (steps, values)) against the step, with optional points (held-out evaluations), as PNG."""
    fig, ax = pyplot().subplots(figsize=(4.8, 3.2))
    for label, (steps, values) in lines.items():
        ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=label)
    for label, (steps, values) in (points or {}).items():
        ax.plot(steps, values, "o", markersize=7, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(lines) + len(points or {}) > 1:
        ax.legend(fontsize="small")
    return png(fig)


def figure(name: str, data: bytes, caption: str | None = None) -> str:
    """An embedded PNG; its caption `name` with spaces for underscores unless given ("" for none)."""
    esc = html.escape
    caption = name.replace("_", " ") if caption is None else caption
    return (f'<figure><img alt="{esc(name)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'
            + (f"<figcaption>{esc(caption)}</figcaption>" if caption else "") + "</figure>")


def table(header: Iterable[Any], rows: Iterable[Iterable[Any]]) -> str:
    """An HTML table; every cell escaped."""
    esc = lambda value: html.escape(str(value))  # noqa: E731
    return ("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>" + "".join(
        "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows) + "</table>")


def page(title: str, body: str) -> str:
    """A whole HTML page around `body` (already escaped HTML)."""
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>\n")
