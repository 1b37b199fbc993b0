"""The markdown table of a bench/run.py results file: align and stock TRL + PEFT side by side, one row per run.

    python bench/table.py bench/results/2026-11-23-h100.jsonl

Columns: peak allocated GiB, s/step, tokens/s and MFU (SFT, reward) for align, then for the baseline where the
run had one (--baseline), then align's tokens/s and peak memory as multiples of the baseline's. The last column
names a run's --recipe, activation checkpointing when off, and recipe overrides (the speed levers). Rows keep the
file's order.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HEADER = ("arch", "stage", "align GiB", "align s/step", "align tok/s", "align MFU", "TRL+PEFT GiB", "TRL+PEFT s/step",
          "TRL+PEFT tok/s", "TRL+PEFT MFU", "tok/s ratio", "GiB ratio", "settings")


def cells(run: dict | None) -> list[str]:
    """Peak GiB, s/step, tokens/s, MFU of one measurement ('-' where there is none)."""
    if run is None:
        return ["-"] * 4
    gib, mfu = run.get("peak_allocated_gib"), run.get("mfu")
    tok = run.get("tokens_per_s")  # records from before the baseline counted tokens have none
    return ["-" if gib is None else f"{gib:.2f}", f"{run['seconds_per_step']:.3f}", "-" if tok is None else f"{tok:,.0f}",
            "-" if mfu is None else f"{100 * mfu:.1f}%"]


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def settings(run: dict) -> str:
    """What the run changed: a recipe's sizes (--recipe), checkpointing off, recipe overrides (the speed levers)."""
    named = ([f"sized by {run['recipe']}"] if run.get("recipe") else []) + (
        ["no activation checkpointing"] if run.get("activation_checkpointing") is False else []) + [
        f"`{o}`" for o in run.get("overrides", [])]
    return ", ".join(named) or "-"


def table(records: list[dict]) -> str:
    rows = [HEADER, ("---",) * len(HEADER)]
    for r in records:
        base = r.get("baseline_trl")
        rows.append((r["arch"], r["stage"], *cells(r), *cells(base),
                     ratio(r["tokens_per_s"], base and base.get("tokens_per_s")),
                     ratio(r["peak_allocated_gib"], base and base["peak_allocated_gib"]),
                     settings(r)))
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="a JSON-lines file written by bench/run.py --out")
    args = parser.parse_args(argv)
    records = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
    if not records:
        parser.error(f"{args.results} holds no results")
    devices = sorted({r["device"] for r in records})
    print(f"{args.results}: {len(records)} runs on {', '.join(devices)}\n")
    print(table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
