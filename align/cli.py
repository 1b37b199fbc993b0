"""The `align` command. Heavy libraries are imported inside the commands, so `--help` answers at once."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from align.errors import AlignError
from align.recipe import describe

TINY_BASE = "data/tiny-base"


def _recipe_keys(*sections: str) -> str:
    return "recipe keys (set in the YAML or override as key=value):\n" + "\n".join(describe(s) for s in sections)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="align",
        description="Align open language models: SFT with LoRA on a 4-bit base, reward models, RL with a KL "
        "penalty to the SFT policy. Each stage reads a YAML recipe; any key can be overridden as key=value.",
        epilog="example: align sft recipes/quickstart.yaml sft.max_steps=50 lora.r=8",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sft = commands.add_parser(
        "sft",
        help="supervised fine-tuning with LoRA (loss on answers only)",
        description="Fine-tune the recipe's base model on question-answer pairs with LoRA; the loss is on the "
        "answer tokens only. Writes runs/<run>/sft/ (config.yaml, lineage.json, metrics.jsonl, checkpoint/).",
        epilog=_recipe_keys("model", "lora", "data", "run", "sft"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sft.add_argument("recipe", help="recipe YAML file, e.g. recipes/quickstart.yaml")
    sft.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. sft.learning_rate=1e-4")

    data = commands.add_parser("data", help="inspect data files").add_subparsers(dest="action", required=True)
    check = data.add_parser(
        "check",
        help="validate data files and print a summary",
        description="Validate a recipe's data files (or one file) without training: rows, columns found, rows "
        "that would be skipped and why, and token-length percentiles. Exits 1 if any row is invalid.",
        epilog="examples:\n  align data check recipes/quickstart.yaml\n"
        "  align data check my_qa.csv data.columns.prompt=q data.columns.completion=a --model Qwen/Qwen2.5-0.5B",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("target", help="a recipe (.yaml) or a data file (.jsonl, .json, .csv, .parquet, saved dir)")
    check.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. data.columns.prompt=q")
    check.add_argument("--model", default=None, help=f"tokenizer for a bare data file (default: {TINY_BASE})")
    check.add_argument("--max-length", type=int, default=None, help="token limit (default: the recipe's sft.max_length)")

    tiny = commands.add_parser("tiny", help="the built-in tiny base model and its data").add_subparsers(
        dest="action", required=True
    )
    pretrain = tiny.add_parser(
        "pretrain", help="pretrain the tiny base model from scratch (about 13 minutes on 2 CPU cores)",
        description="Train the tokenizer and the ~1M-parameter Llama from scratch on the corpus (causal language "
        "modelling, TRL's SFTTrainer); with the defaults this remakes data/tiny-base/.",
    )
    pretrain.add_argument("--out", type=Path, default=Path(TINY_BASE), help="output model directory")
    pretrain.add_argument("--corpus", type=Path, default=Path("data/corpus.txt"), help="text corpus, one document per line")
    pretrain.add_argument("--steps", type=int, default=2000, help="optimizer steps (batch 32 x 128 tokens)")
    pretrain.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the data order")
    tiny_data = tiny.add_parser("data", help="regenerate data/corpus.txt and data/arithmetic/ (seeded)")
    tiny_data.add_argument("--out", type=Path, default=Path("data"), help="data directory")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "sft":
            return _sft(args)
        if args.command == "data":
            return _data_check(args)
        if args.action == "pretrain":
            from align.tiny import pretrain as run_pretrain

            print(f"tiny base model written to {run_pretrain(args.out, args.corpus, args.steps, args.seed)}")
            return 0
        from align.arithmetic import main as write_data

        write_data(args.out)
        return 0
    except AlignError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _sft(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from align.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)  # a bad key fails before torch is even imported
    from align.stages import sft

    results = sft.run(recipe)
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return 0
    before, after = results["before"], results["after"]
    console = Console()
    if after:
        table = Table(title="SFT on held-out data")
        for column in ("", "before", "after"):
            table.add_column(column)
        table.add_row("answer loss", f"{before['answer_loss']:.4f}", f"{after['answer_loss']:.4f}")
        if "answer_accuracy" in after:
            table.add_row("answer accuracy (greedy, final number)", f"{before['answer_accuracy']:.1%}",
                          f"{after['answer_accuracy']:.1%}")
        console.print(table)
        for sample in after.get("samples", []):
            mark = "[green]right[/green]" if sample["correct"] else "[red]wrong[/red]"
            console.print(f"  {mark} {sample['prompt']} -> {sample['answer'].strip()!r}", soft_wrap=True)
    else:
        console.print("no held-out file (data.sft.eval), so no before/after evaluation")
    console.print(f"train loss {results['train_loss']:.4f}; checkpoint: {results['checkpoint']}", soft_wrap=True)
    console.print(f"run dir: {results['run_dir']}", soft_wrap=True)
    return 0


def _data_check(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from align.data import load_qa, percentiles
    from align.modeling import load_tokenizer
    from align.recipe import SFTStage, load_recipe

    is_recipe = args.target.endswith((".yaml", ".yml"))
    overrides = list(args.overrides) + ["data.skip_invalid=true"]  # count every problem instead of stopping
    if is_recipe:
        recipe = load_recipe(args.target, overrides)
        files = [f for f in (recipe.data.sft.train, recipe.data.sft.eval) if f]
    else:
        base = [f"model.name_or_path={args.model or TINY_BASE}"]
        recipe = load_recipe(None, base + overrides)
        files = [args.target]
    max_length = args.max_length or (recipe.sft or SFTStage()).max_length
    tokenizer = load_tokenizer(recipe.model)

    table = Table(title=f"data check (tokens by {recipe.model.name_or_path}, max_length {max_length})")
    for column in ("file", "rows", "kept", "columns", "skipped", "tokens p50/p90/p99/max"):
        table.add_column(column)
    problems = []
    for path in files:
        _, report = load_qa(path, recipe.data, tokenizer, max_length)
        lengths = "\n".join(f"{k}: {'/'.join(map(str, percentiles(v)))}" for k, v in report.lengths.items())
        columns = ", ".join(f"{k}={v}" + (" (auto)" if k in report.detected else "") for k, v in report.columns.items())
        skipped = ", ".join(f"{k}={n}" for k, n in report.skipped.most_common()) or "none"
        table.add_row(path, str(report.rows), str(report.kept), columns, skipped, lengths)
        problems.extend(report.first_skipped.values())
    console = Console()
    console.print(table)
    for problem in problems:
        console.print(f"  first of its kind: {problem}", soft_wrap=True)
    return 1 if problems else 0
