"""Time the offline quickstart: `align run recipes/quickstart.yaml` from nothing, in a fresh run root.

    python bench/quickstart.py                      # the recipe as shipped; target: <= 300 s on 2 CPU cores
    python bench/quickstart.py sft.max_steps=50     # with overrides

Prints the wall time of the whole command and of each stage (from its lineage.json), and appends them as one JSON
line to bench/results/quickstart.jsonl. Not part of the test suite.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_SECONDS = 300


def main(overrides: list[str]) -> int:
    with tempfile.TemporaryDirectory() as root:
        command = [sys.executable, "-m", "align", "run", "recipes/quickstart.yaml", f"run.root={root}", *overrides]
        started = time.monotonic()
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        seconds = time.monotonic() - started
        if result.returncode:
            print(result.stderr[-3000:], file=sys.stderr)
            return result.returncode
        stages = {}
        for lineage_path in sorted(Path(root, "quickstart").glob("*/lineage.json")):
            lineage = json.loads(lineage_path.read_text())
            start, end = (datetime.datetime.fromisoformat(lineage[k]) for k in ("start_time", "end_time"))
            stages[lineage["stage"]] = (end - start).total_seconds()
    record = {"date": datetime.date.today().isoformat(), "cpu": platform.processor() or platform.machine(),
              "cores": os.cpu_count(), "overrides": overrides, "seconds": round(seconds, 1),
              "stage_seconds": stages, "target_seconds": TARGET_SECONDS}
    print(result.stdout[-2500:])
    print(f"align run recipes/quickstart.yaml: {seconds:.0f} s on {os.cpu_count()} cores (target {TARGET_SECONDS} s); "
          + ", ".join(f"{stage} {s:.0f} s" for stage, s in stages.items())
          + " (each from its start to its checkpoint; the rest is start-up)")
    out = ROOT / "bench" / "results" / "quickstart.jsonl"
    with out.open("a") as f:
        f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
