"""The offline quickstart on several seeds: does every stage do what the README says, on every seed?

    python bench/quickstart.py                          # seeds 42, 1, 2; the recipe as shipped
    python bench/quickstart.py --seeds 42 sft.max_steps=300      # with overrides (key=value, as for align run)
    python bench/quickstart.py --keep runs/bench      # keep the run dirs (runs/bench/seed42/quickstart/...)

Per seed, from nothing in a temporary run root: `align run recipes/quickstart.yaml` (sft -> reward -> grpo), the
same with `rl.algorithm=ppo`, `dpo` and `kto` (finished stages are then skipped), and the README's `align compare`
of the base, the SFT policy and the GRPO, PPO, DPO and KTO policies. Prints one table (each stage's held-out
figures and wall time per seed, and their range), checks the quickstart's bars (BARS) on every seed, and appends
one JSON line to bench/results/quickstart.jsonl. Not part of the test suite: about 12 minutes a seed on 2 CPU
cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "recipes/quickstart.yaml"
TARGET_SECONDS = 300  # `align run` (sft -> reward -> grpo), median over seeds, on 2 CPU cores
COMPARE = ["--eval", "data/arithmetic/sft_heldout.jsonl", "--baseline", "sft", "--max-new-tokens", "48",
           "--answers-per-prompt", "4", "--answer-style", "align.arithmetic:answer_style"]


def run_seed(seed: int, overrides: list[str], root: Path) -> dict:
    """Every command for one seed; the figures read back from lineage.json and results.json."""
    run = root / "quickstart"
    seconds = {}
    for label, extra in (("run", []), ("ppo", ["rl.algorithm=ppo"]), ("dpo", ["rl.algorithm=dpo"]),
                         ("kto", ["rl.algorithm=kto"])):
        command = [sys.executable, "-m", "align", "run", RECIPE, f"run.root={root}", f"run.seed={seed}", *overrides,
                   *extra]
        seconds[label] = _timed(command)
    seconds["compare"] = _timed([sys.executable, "-m", "align", "compare", "base=data/tiny-base", f"sft={run}/sft",
                                 f"grpo={run}/grpo", f"ppo={run}/ppo", f"dpo={run}/dpo", f"kto={run}/kto",
                                 "--reward", f"{run}/reward",
                                 "--reference",
                                 f"{run}/sft", "--out", str(run / "compare"), *COMPARE])
    lineage = {stage: json.loads((run / stage / "lineage.json").read_text())
               for stage in ("sft", "reward", "grpo", "ppo", "dpo", "kto")}
    results = {stage: data["results"] for stage, data in lineage.items()}
    compare = json.loads((run / "compare" / "results.json").read_text())["checkpoints"]
    return {"seed": seed, "seconds": seconds, "results": results,
            "stage_seconds": {stage: _duration(data) for stage, data in lineage.items()},
            "compare": {name: entry["metrics"] for name, entry in compare.items()}}


def _timed(command: list[str]) -> float:
    started = time.monotonic()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return round(time.monotonic() - started, 1)


def _duration(lineage: dict) -> float:
    start, end = (datetime.datetime.fromisoformat(lineage[k]) for k in ("start_time", "end_time"))
    return round((end - start).total_seconds(), 1)


def figures(record: dict) -> dict[str, float]:
    """The figures of one seed, by row name of the table."""
    r, c = record["results"], record["compare"]
    sft, grpo, ppo = r["sft"]["after"], r["grpo"], r["ppo"]
    out = {
        "sft accuracy (greedy)": sft["answer_accuracy"],
        "sft worked share (greedy)": sft.get("worked_fraction", 0.0),
        "sft worked accuracy": sft.get("worked_accuracy"),
        "sft direct accuracy": sft.get("direct_accuracy"),
        "reward pair accuracy": r["reward"]["after"]["pair_accuracy"],
    }
    for name, stage in (("grpo", grpo), ("ppo", ppo)):
        for decoding in ("greedy", "sampled"):
            for when in ("before", "after"):
                out[f"{name} {decoding} accuracy {when}"] = stage[when][decoding]["rewards/exact_match"]
                out[f"{name} {decoding} reward {when}"] = stage[when][decoding]["reward_mean"]
            out[f"{name} {decoding} worked share after"] = stage["after"][decoding].get("worked_fraction", 0.0)
        out[f"{name} KL first"], out[f"{name} KL max"] = stage["kl_first"], stage["kl_max"]
    dpo = r["dpo"]
    for when in ("before", "after"):
        out[f"dpo greedy accuracy {when}"] = dpo[when]["greedy"]["rewards/exact_match"]
    out["dpo first margin"], out["dpo pair accuracy (implicit reward)"] = dpo["margin_first"], dpo["after"]["reward_accuracy"]
    kto = r["kto"]
    for when in ("before", "after"):
        out[f"kto greedy accuracy {when}"] = kto[when]["greedy"]["rewards/exact_match"]
    out["kto KL first"], out["kto held-out good - bad implicit reward"] = kto["kl_first"], kto["after"]["margin_mean"]
    for name in ("base", "sft", "grpo", "ppo", "dpo", "kto"):
        for metric in ("reward", "accuracy"):
            out[f"compare {name} {metric}"] = c[name][metric]["mean"]
            out[f"compare {name} {metric} low"], out[f"compare {name} {metric} high"] = c[name][metric]["ci95"]
        out[f"compare {name} worked share"] = c[name].get("styles", {}).get("worked", {}).get("fraction", {}).get("mean", 0.0)
    out["wall: align run (s)"] = record["seconds"]["run"]
    out["wall: align run rl.algorithm=ppo (s)"] = record["seconds"]["ppo"]
    out["wall: align run rl.algorithm=dpo (s)"] = record["seconds"]["dpo"]
    out["wall: align run rl.algorithm=kto (s)"] = record["seconds"]["kto"]
    out["wall: align compare (s)"] = record["seconds"]["compare"]
    return out


# The quickstart's promises (issue: "the quickstart proves each stage works on every seed"), checked per seed.
BARS = {
    "sft accuracy in [30%, 70%]": lambda f: 0.30 <= f["sft accuracy (greedy)"] <= 0.70,
    "reward pair accuracy >= 90%": lambda f: f["reward pair accuracy"] >= 0.90,
    "grpo greedy accuracy >= sft + 15 points": lambda f: f["grpo greedy accuracy after"] >= f["sft accuracy (greedy)"] + 0.15,
    "grpo sampled accuracy and reward rise": lambda f: (f["grpo sampled accuracy after"] > f["grpo sampled accuracy before"]
                                                        and f["grpo sampled reward after"] > f["grpo sampled reward before"]),
    "grpo first KL <= 1e-4": lambda f: abs(f["grpo KL first"]) <= 1e-4,
    "ppo greedy accuracy >= sft + 10 points": lambda f: f["ppo greedy accuracy after"] >= f["sft accuracy (greedy)"] + 0.10,
    "dpo greedy accuracy >= sft + 10 points": lambda f: f["dpo greedy accuracy after"] >= f["sft accuracy (greedy)"] + 0.10,
    "dpo first margin 0": lambda f: f["dpo first margin"] == 0.0,
    "compare: rl > sft > base on reward and accuracy, rl and sft intervals apart": lambda f: all(
        f[f"compare {rl} {m} low"] > f[f"compare sft {m} high"] and f[f"compare sft {m}"] > f[f"compare base {m}"]
        for rl in ("grpo", "ppo") for m in ("reward", "accuracy")),
}


def table(records: list[dict]) -> str:
    rows = [figures(r) for r in records]
    header = "| figure | " + " | ".join(f"seed {r['seed']}" for r in records) + " | range |"
    lines = [header, "|" + " --- |" * (len(records) + 2)]
    fmt = lambda k, v: "-" if v is None else (f"{v:.0f}" if k.startswith("wall") else  # noqa: E731
                                              f"{v:.3g}" if ("reward" in k and "pair" not in k) or "KL" in k else f"{v:.1%}")
    for key in rows[0]:
        if key.endswith((" low", " high")):
            continue
        values = [row[key] for row in rows]
        known = [v for v in values if v is not None]
        span = f"{fmt(key, min(known))} - {fmt(key, max(known))}" if known else "-"
        lines.append(f"| {key} | " + " | ".join(fmt(key, v) for v in values) + f" | {span} |")
    spread = max(r["sft accuracy (greedy)"] for r in rows) - min(r["sft accuracy (greedy)"] for r in rows)
    lines.append(f"\nSFT accuracy spread across seeds: {spread:.1%} (bar: <= 15 points)")
    median = statistics.median(r["wall: align run (s)"] for r in rows)
    lines.append(f"align run: median {median:.0f} s over seeds (bar: <= {TARGET_SECONDS} s on 2 cores)")
    for name, check in BARS.items():
        verdicts = ["pass" if check(row) else "FAIL" for row in rows]
        lines.append(f"{name}: " + ", ".join(f"seed {r['seed']} {v}" for r, v in zip(records, verdicts)))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="42,1,2", help="comma-separated run.seed values (default 42,1,2)")
    parser.add_argument("--keep", type=Path, help="keep each seed's run dirs under KEEP/seed<N> (default: a "
                        "temporary directory, removed)")
    args, overrides = parser.parse_known_args(argv)
    records = []
    for seed in (int(s) for s in args.seeds.split(",")):
        if args.keep:
            root = args.keep / f"seed{seed}"
            if root.exists():
                sys.exit(f"--keep {args.keep}: {root} exists; runs start from nothing, so give an empty directory")
            records.append(run_seed(seed, overrides, root))
        else:
            with tempfile.TemporaryDirectory() as root:
                records.append(run_seed(seed, overrides, Path(root)))
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.0f} s" for k, v in records[-1]["seconds"].items()), flush=True)
    print(table(records))
    out = ROOT / "bench" / "results" / "quickstart.jsonl"
    with out.open("a") as f:
        f.write(json.dumps({"date": datetime.date.today().isoformat(), "cpu": _cpu(), "cores": os.cpu_count(),
                            "overrides": overrides, "seeds": [figures(r) | {"seed": r["seed"]} for r in records],
                            "target_seconds": TARGET_SECONDS}) + "\n")
    return 0


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
