"""The `align` command. Heavy libraries are imported inside the commands, so `--help` answers at once."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
import threading
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

    run = commands.add_parser(
        "run",
        help="run every stage of a recipe in order (sft, reward, grpo|ppo), skipping finished ones",
        description="Run the recipe's stages in order, each starting from the previous ones' checkpoints: sft, "
        "reward, then grpo or ppo (rl.algorithm). A stage that finished with the same inputs (recipe keys, data "
        "files, earlier stages) is skipped; one that was interrupted resumes from its last trainer checkpoint; one "
        "whose inputs changed re-runs, with every stage after it, and the log says which inputs changed. Gates: "
        "RL waits for a reward model with held-out accuracy >= rl.min_reward_accuracy, and every stage must render "
        "prompts to the same token ids (rl.check_prompt_rendering). Ends with a table of what each stage achieved. "
        "Decisions are appended to runs/<run>/pipeline.jsonl.",
        epilog="examples:\n  align run recipes/quickstart.yaml\n  align run recipes/quickstart.yaml --from reward\n"
        "  align run recipes/quickstart.yaml --only sft sft.max_steps=100\n"
        "  accelerate launch --config_file accelerate_config.yaml -m align run recipes/quickstart.yaml\n\n"
        + _recipe_keys("rl"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--from", dest="start", metavar="STAGE",
                     help="re-run this stage (sft, reward, rl) and every one after it, even if finished")
    run.add_argument("--only", metavar="STAGE", help="run just this stage (sft, reward, rl); earlier ones must be finished")
    run.add_argument("--fresh", action="store_true",
                     help="ignore finished and interrupted stages: run every selected stage from step 0")

    sft = commands.add_parser(
        "sft",
        help="supervised fine-tuning with LoRA (loss on answers only)",
        description="Fine-tune the recipe's base model on question-answer pairs with LoRA; the loss is on the "
        "answer tokens only. Writes runs/<run>/sft/ (config.yaml, lineage.json, metrics.jsonl, checkpoint/).",
        epilog=_recipe_keys("model", "lora", "data", "run", "sft"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    reward = commands.add_parser(
        "reward",
        help="train a pairwise reward model (LoRA + score head) on preference data",
        description="Train a reward model on chosen/rejected pairs (or rated responses) with TRL's RewardTrainer: "
        "the recipe's base model with a LoRA adapter (from the SFT stage's by default) and a one-output score "
        "head. Reports held-out pairwise accuracy, mean margin and reward mean/std before and after. Writes "
        "runs/<run>/reward/ (config.yaml, lineage.json, metrics.jsonl, samples.jsonl, checkpoint/).",
        epilog=_recipe_keys("model", "lora", "data", "run", "reward"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    grpo = commands.add_parser(
        "grpo",
        help="optimise the SFT policy with GRPO against reward functions, with a KL penalty to the SFT policy",
        description="Reinforcement learning with TRL's GRPOTrainer: completions sampled per prompt, scored by the "
        "recipe's reward functions (reward model, rules, plug-ins; grpo.rewards), and the policy (the SFT adapter "
        "on the 4-bit base) pushed towards the better ones, minus grpo.beta x KL to the frozen SFT policy. "
        "Reports held-out greedy answers' rewards before and after and the KL per step. Writes runs/<run>/grpo/.",
        epilog=_recipe_keys("model", "lora", "data", "run", "grpo"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ppo = commands.add_parser(
        "ppo",
        help="optimise the SFT policy with PPO (value model, per-token KL penalty to the SFT policy)",
        description="Reinforcement learning with align's PPO loop (TRL has no PPOTrainer): one completion sampled "
        "per prompt and scored by the recipe's reward functions (ppo.rewards); per-token rewards -ppo.beta x "
        "(log pi - log pi_ref) plus the score at the last token; GAE advantages from a value model (by default "
        "the reward model when it is the whole score); clipped policy and value losses over several epochs per rollout. Policy, "
        "reference, reward and value models are adapters on one 4-bit base. Reports held-out rewards before and "
        "after and the KL per step. Writes runs/<run>/ppo/ (checkpoint/ = policy adapter, checkpoint/value/ = "
        "value model).",
        epilog=_recipe_keys("model", "lora", "data", "run", "ppo"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for stage in (sft, reward, grpo, ppo):
        name = stage.prog.split()[-1]
        stage.add_argument("--resume", action="store_true",
                           help=f"continue from the last complete checkpoint in runs/<run>/{name}/trainer/ (written "
                           f"every {name}.save_steps); `align run` does this by itself for an interrupted stage")
    for stage in (run, sft, reward, grpo, ppo):
        name = stage.prog.split()[-1]
        stage.add_argument("recipe", help="recipe YAML file, e.g. recipes/quickstart.yaml")
        stage.add_argument("overrides", nargs="*", metavar="key=value",
                           help=f"recipe overrides, e.g. {name if stage is not run else 'sft'}.learning_rate=1e-4")

    export = commands.add_parser(
        "export",
        help="merge a policy's LoRA adapter into its base and save a standard transformers model",
        description="Merge the LoRA policy of a run (or of a stage checkpoint) into a full-precision copy of its "
        "base model and save a model + tokenizer that AutoModelForCausalLM.from_pretrained loads without align or "
        "PEFT. A 4-bit base is dequantised first, so the merged model computes what the adapter on the 4-bit base "
        "computed.",
        epilog="examples:\n  align export runs/quickstart --out exported/quickstart   # the run's RL policy (or SFT)\n"
        "  align export runs/quickstart/sft --out exported/sft\n"
        "  align export runs/quickstart/ppo/checkpoint --out exported/ppo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("source", help="a run dir (runs/<run>), a stage dir (runs/<run>/ppo) or a checkpoint dir")
    export.add_argument("--out", required=True, type=Path, help="directory to write the merged model to (new, "
                        "empty, or an earlier export, which is replaced)")
    export.add_argument("--overwrite", action="store_true",
                        help="replace --out even if it holds something other than an earlier export")
    export.add_argument("--trust-remote-code", action="store_true",
                        help="let the base model's own code run (a run dir's model.trust_remote_code is not honoured)")

    compare = commands.add_parser(
        "compare",
        help="compare checkpoints side by side: reward, win rate, KL to the reference, accuracy, length, samples",
        description="Every checkpoint answers every prompt of the eval file (same seed and decoding for all), and "
        "each is measured: reward under the reward model (mean, std, 95%% bootstrap interval), win rate against "
        "the baseline judged by the reward model (ties separate), KL to its reference (mean over prompts of "
        "sum_t log pi - log pi_ref on its own answers; the reference is the policy an RL checkpoint started from, "
        "from its lineage, or --reference), accuracy against the eval file's reference answers, answer length. "
        "Checkpoints load one at a time. Writes results.json, report.md and a self-contained report.html (plots "
        "embedded) to --out.",
        epilog="checkpoints: a run dir (its RL policy, else SFT), a stage dir or checkpoint, an exported model dir, "
        "or a hub model id; name=path labels one.\nexample:\n  align compare base=data/tiny-base "
        "sft=runs/quickstart/sft rl=runs/quickstart/grpo \\\n      --eval data/arithmetic/sft_heldout.jsonl "
        "--reward runs/quickstart/reward --out runs/quickstart/compare",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compare.add_argument("checkpoints", nargs="+", metavar="[NAME=]CHECKPOINT", help="what to compare")
    compare.add_argument("--eval", required=True, help="prompts (jsonl, json, csv, parquet, saved dir, hub id), "
                         "with a reference answer column for accuracy")
    compare.add_argument("--reward", help="reward model: a run dir or reward checkpoint (default: the one the RL "
                         "checkpoints were trained with, from their lineage)")
    compare.add_argument("--baseline", help="the checkpoint win rates are against (default: the first)")
    compare.add_argument("--reference", help="reference policy for the KL of every checkpoint (default: each RL "
                         "checkpoint's own starting policy; none for others)")
    compare.add_argument("--accuracy", help="plug-in check 'pkg.mod:fn' (reward-function signature; 1 = right) "
                         "instead of exact match of the final number")
    compare.add_argument("--answer-column", help="the eval file's reference answer column (default: answer)")
    compare.add_argument("--answer-style", help="plug-in 'pkg.mod:fn' naming each answer's style (text -> name, "
                         "e.g. align.arithmetic:answer_style): each style's share and accuracy per checkpoint")
    compare.add_argument("--prompt-column", help="the eval file's prompt column (default: auto-detected)")
    compare.add_argument("--system-prompt", help="system message before every prompt ('' : the chat template's "
                         "own); default: the data.system_prompt the run-dir checkpoints trained with")
    compare.add_argument("--out", type=Path, default=Path("compare"), help="output directory (default: ./compare)")
    compare.add_argument("--max-new-tokens", type=int, default=128, help="longest answer (default 128)")
    compare.add_argument("--temperature", type=float, default=1.0,
                         help="sampling temperature (default 1.0, where the KL estimate is unbiased); 0: greedy")
    compare.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0: off)")
    compare.add_argument("--answers-per-prompt", type=int, default=1,
                         help="sampled answers per prompt (default 1); more narrow the intervals of every mean")
    compare.add_argument("--batch-size", type=int, default=32, help="prompts per generation batch (default 32)")
    compare.add_argument("--samples", type=int, default=5, help="prompts shown with every answer (default 5)")
    compare.add_argument("--seed", type=int, default=0, help="sampling and bootstrap seed (default 0)")
    compare.add_argument("--trust-remote-code", action="store_true",
                         help="let the models' own code run (a run dir's model.trust_remote_code is not honoured)")
    compare.add_argument("--quantization", choices=("nf4", "none"), default="nf4",
                         help="how to load bases and models that have no recipe config (default nf4)")

    data = commands.add_parser("data", help="inspect data files").add_subparsers(dest="action", required=True)
    check = data.add_parser(
        "check",
        help="validate data files and print a summary",
        description="Validate a recipe's data files (or one file) without training: rows, columns found, QA "
        "or preference pairs or prompts formed, rows that would be skipped and why, and token-length percentiles. "
        "Exits 1 if any row is invalid.",
        epilog="examples:\n  align data check recipes/quickstart.yaml\n"
        "  align data check my_qa.csv data.columns.prompt=q data.columns.completion=a --model Qwen/Qwen2.5-0.5B\n"
        "  align data check prefs.csv data.columns.chosen=better_answer data.columns.rejected=worse_answer",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("target", help="a recipe (.yaml) or a data file (.jsonl, .json, .csv, .parquet, saved dir)")
    check.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. data.columns.prompt=q")
    check.add_argument("--model", default=None, help=f"tokenizer for a bare data file (default: {TINY_BASE})")
    check.add_argument("--max-length", type=int, default=None,
                       help="token limit (default: the recipe's sft.max_length, reward.max_length, or for prompts "
                       "grpo.max_length - grpo.max_completion_length)")
    check.add_argument("--kind", choices=("auto", "qa", "preference", "prompts"), default="auto",
                       help="what a bare data file holds (default auto: preference if it has chosen/rejected or "
                       "responses/scores columns, else qa if it has answers, else prompts)")

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

    args, extra = parser.parse_known_args(argv)
    # Overrides may come before or after options (`align run R --only sft sft.max_steps=100`): argparse leaves
    # those after an option unparsed.
    unknown = [item for item in extra if item.startswith("-") or "=" not in item or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command in ("run", "sft", "reward", "grpo", "ppo"):
            return _stage(args)
        if args.command == "data":
            return _data_check(args)
        if args.command == "export":
            return _export(args)
        if args.command == "compare":
            return _compare(args)
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
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno not in UNWRITABLE:
            raise
        print(f"error: cannot write {e.filename or 'the output'}: {e.strerror} (a read-only or full disk?); "
              "nothing after this was written", file=sys.stderr)
        return 2


UNWRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT)


def _stage(args) -> int:
    import importlib

    from rich.console import Console

    from align.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)  # a bad key fails before torch is even imported
    import torch

    from align.processes import state
    from align.rewards import RewardFailed

    state()  # the process group, before any model or trainer: every rank decision below reads it

    running = {"stage": args.command}
    stop = _StopOnSignal(lambda how: _interrupted(running["stage"], args, recipe, how))
    handlers = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if args.command == "run":
            from align import pipeline

            names = pipeline.stage_names(recipe)
            outcomes = pipeline.run(recipe, start=args.start, only=args.only, fresh=args.fresh,
                                    on_stage=lambda name: running.update(stage=name))
        else:
            results = importlib.import_module(f"align.stages.{args.command}").run(recipe, resume=args.resume)
    except torch.OutOfMemoryError as e:
        print(_out_of_memory(running["stage"], recipe, e), file=sys.stderr)
        return 3
    except KeyboardInterrupt as e:
        print(_interrupted(running["stage"], args, recipe, "terminated" if isinstance(e, Terminated) else
                           "interrupted"), file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except RewardFailed as e:
        print(_reward_failed(e, running["stage"], args, recipe), file=sys.stderr)
        return 2
    finally:
        stop.cancel()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    from align.processes import is_main_process

    if not is_main_process():
        return 0
    console = Console()
    if args.command == "run":
        _print_pipeline(console, names, outcomes, recipe)
        return 0
    PRINTERS[args.command](console, results)
    if "train_loss" in results:
        console.print(f"train loss {results['train_loss']:.4f}", soft_wrap=True)
    console.print(f"checkpoint: {results['checkpoint']}", soft_wrap=True)
    console.print(f"run dir: {results['run_dir']}", soft_wrap=True)
    return 0


def _print_pipeline(console, names: list[str], outcomes, recipe) -> None:
    """One row per stage: what happened to it and what it achieved on held-out data (before -> after)."""
    from rich.table import Table

    arrow = lambda b, a, f: f"{f(b)} -> {f(a)}"  # noqa: E731
    pct, num = (lambda v: f"{v:.1%}"), (lambda v: f"{v:.3f}")  # noqa: E731
    table = Table(title=f"align run {recipe.run.name}: held-out results (before -> after)")
    for column in ("stage", "", "result"):
        table.add_column(column)
    by_name = {o.stage: o for o in outcomes}
    for name in names:
        outcome = by_name.get(name)
        if outcome is None:
            table.add_row(name, "not selected", "")
            continue
        r = outcome.results
        b, a = r.get("before") or {}, r.get("after") or {}
        lines = []
        if name == "sft" and a:
            lines.append(f"answer loss {arrow(b['answer_loss'], a['answer_loss'], num)}")
            if "answer_accuracy" in a:
                lines.append(f"accuracy {arrow(b['answer_accuracy'], a['answer_accuracy'], pct)}")
            lines += _style_lines(b, a)
        elif name == "reward" and a:
            lines.append(f"pair accuracy {arrow(b['pair_accuracy'], a['pair_accuracy'], pct)}")
        elif a:
            for decoding in ("greedy", "sampled"):
                if decoding in a:
                    lines.append(f"{decoding} reward {arrow(b[decoding]['reward_mean'], a[decoding]['reward_mean'], num)}")
                    if "rewards/exact_match" in a[decoding]:
                        lines.append(f"{decoding} accuracy {arrow(b[decoding]['rewards/exact_match'], a[decoding]['rewards/exact_match'], pct)}")
                    lines += _style_lines(b[decoding], a[decoding], f"{decoding} ")
        if name in ("grpo", "ppo") and r.get("kl_last") is not None:
            lines.append(f"KL {r['kl_first']:.3g} -> {r['kl_last']:.3g} {kl_unit(r)} (max {r['kl_max']:.3g})")
        table.add_row(name, outcome.action, "\n".join(lines) or "(no held-out data)")
    console.print(table)
    console.print(f"run dir: {Path(recipe.run.root) / recipe.run.name} (checkpoints: <stage>/checkpoint)", soft_wrap=True)


def _style_lines(before: dict, after: dict, prefix: str = "") -> list[str]:
    """'worked 12.5% -> 100.0% (of answers)' per answer style (data.answer_style), before -> after."""
    from align.styles import names

    return [f"{prefix}{s} {before.get(s + '_fraction', 0):.1%} -> {after.get(s + '_fraction', 0):.1%} of answers"
            for s in names(before, after)]


def _resume_command(stage: str, args) -> str:
    """The command that carries on an interrupted stage: `align run` again, or the stage with --resume."""
    return f"align run {args.recipe}" if args.command == "run" else f"align {stage} {args.recipe} --resume"


def _reward_failed(error, stage: str, args, recipe) -> str:
    """One line for a reward function that raised or hung; its traceback goes to the stage dir's error.log."""
    from align.processes import is_main_process
    from align.rundir import write_file

    log_path = Path(recipe.run.root) / recipe.run.name / stage / "error.log"
    if is_main_process():
        write_file(log_path, f"{error}\n\n{error.details}")
    again = _resume_command(stage, args)
    return (f"error: {error}; the traceback is in {log_path}. Once it is fixed, `{again}` (with the same overrides) "
            "resumes from the stage's last checkpoint")


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a scheduler's stop): handled as Ctrl-C is."""


class _StopOnSignal:
    """The SIGINT and SIGTERM handler of a stage: raises KeyboardInterrupt (Terminated) so that the stage stops
    where it is and `_stage` prints the resume line. Should the exception be lost on its way (raised inside a
    finaliser or a library that swallows it: seen in two full test runs under load, training went on), a timer prints
    that line and ends the process GRACE_S seconds later; a second signal ends it at once."""

    GRACE_S = 20.0

    def __init__(self, message):
        self.message, self.timer = message, None

    def __call__(self, signum, frame):
        how, code = ("terminated", 143) if signum == signal.SIGTERM else ("interrupted", 130)
        if self.timer is not None:
            self._exit(how, code)
        self.timer = threading.Timer(self.GRACE_S, self._exit, args=(how, code))
        self.timer.daemon = True
        self.timer.start()
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    def _exit(self, how: str, code: int):
        print(self.message(how), file=sys.stderr, flush=True)
        os._exit(code)

    def cancel(self):
        if self.timer is not None:
            self.timer.cancel()


def _interrupted(stage: str, args, recipe, how: str) -> str:
    """One line for Ctrl-C or SIGTERM (`how`): where the stage's resumable checkpoints are, and the command that
    resumes."""
    if stage == "run":  # stopped before any stage began
        return f"{how} before any stage started; nothing was trained"
    trainer = Path(recipe.run.root) / recipe.run.name / stage / "trainer"
    again = _resume_command(stage, args)
    return (f"{how} during the {stage} stage; `{again}` (with the same overrides) resumes from the last "
            f"checkpoint in {trainer} (one every {stage}.save_steps={getattr(recipe, stage).save_steps} steps), "
            "if it had written one")


def _out_of_memory(stage: str, recipe, error: Exception) -> str:
    first_line = str(error).splitlines()[0] if str(error) else "out of memory"
    from align.memory import SETTINGS

    settings = "\n".join(f"  {stage}.{setting}" for setting in SETTINGS[stage])
    nf4 = "" if recipe.model.quantization.value == "nf4" else "\n  model.quantization=nf4 (a 4-bit base)"
    return (f"error: the {stage} stage ran out of GPU memory ({first_line}).\nLower, the biggest saving first:\n"
            f"{settings}{nf4}\nResumable checkpoints, if any were written, are in "
            f"{recipe.run.root}/{recipe.run.name}/{stage}/trainer/.")


def _before_after(title: str, rows: list[tuple[str, str, str]]):
    from rich.table import Table

    table = Table(title=title)
    for column in ("", "before", "after"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    return table


def _print_sft(console, results: dict) -> None:
    before, after = results["before"], results["after"]
    if not after:
        console.print("no held-out file (data.sft.eval), so no before/after evaluation")
        return
    rows = [("answer loss", f"{before['answer_loss']:.4f}", f"{after['answer_loss']:.4f}")]
    if "answer_accuracy" in after:
        rows.append(("answer accuracy (greedy, final number)", f"{before['answer_accuracy']:.1%}",
                     f"{after['answer_accuracy']:.1%}"))
    console.print(_before_after("SFT on held-out data", rows + _style_rows(before, after)))
    for sample in after.get("samples", []):
        mark = "[green]right[/green]" if sample["correct"] else "[red]wrong[/red]"
        console.print(f"  {mark} {sample['prompt']} -> {sample['answer'].strip()!r}", soft_wrap=True)


def _print_reward(console, results: dict) -> None:
    before, after = results["before"], results["after"]
    console.print(f"reward model LoRA initialised from: {results['init_from'] or 'fresh (reward.init_from=base)'}",
                  soft_wrap=True)
    if not after:
        console.print("no held-out file (data.preference.eval), so no before/after evaluation")
        return
    rows = [("pairwise accuracy (chosen > rejected)", f"{before['pair_accuracy']:.1%}", f"{after['pair_accuracy']:.1%}")]
    rows += [(label, f"{before[key]:.3f}", f"{after[key]:.3f}") for label, key in (
        ("mean margin (chosen - rejected)", "margin_mean"), ("reward mean", "reward_mean"),
        ("reward std", "reward_std"), ("loss", "loss"))]
    console.print(_before_after(f"reward model on {after['pairs']} held-out pairs", rows))


def kl_unit(results: dict) -> str:
    """An RL stage's KL unit, as its results say (a run dir written before they said so: PPO's has beta_last)."""
    return results.get("kl_unit") or ("nats per completion" if "beta_last" in results else "nats per token")


def _print_rl(console, results: dict) -> None:
    """GRPO's and PPO's results: KL per token (GRPO) or per completion (PPO), rewards before and after."""
    before, after = results["before"], results["after"]
    console.print(f"policy started from: {results['init_from'] or 'a fresh adapter on the base'}; "
                  f"{results['steps']} steps in {results['train_seconds']:.0f} s", soft_wrap=True)
    kl = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    console.print(f"KL to the reference ({kl_unit(results)}): first step {kl(results['kl_first'])}, last "
                  f"{kl(results['kl_last'])}, max {kl(results['kl_max'])}")
    if results.get("eos_fraction_last") is not None:
        console.print(f"rollouts that ended at EOS (the last logged): {results['eos_fraction_last']:.1%}")
    if not after:
        console.print("no held-out prompts (data.prompts.eval), so no before/after evaluation")
        return
    for decoding, title in (("greedy", f"greedy answers to {after['prompts']} held-out prompts"),
                            ("sampled", f"{after.get('sampled', {}).get('per_prompt')} sampled answers to each of "
                                        f"{after['prompts']} held-out prompts (training temperature)")):
        if decoding not in after:
            continue
        b, a = before[decoding], after[decoding]
        rows = [("reward (weighted total)", f"{b['reward_mean']:.4f}", f"{a['reward_mean']:.4f}")]
        rows += [(key.split("/", 1)[1], f"{b[key]:.4f}", f"{a[key]:.4f}") for key in a if key.startswith("rewards/")]
        rows.append(("answer tokens (mean)", f"{b['completion_tokens_mean']:.1f}", f"{a['completion_tokens_mean']:.1f}"))
        if "ended_at_eos" in a and "ended_at_eos" in b:
            rows.append(("ended at EOS", f"{b['ended_at_eos']:.1%}", f"{a['ended_at_eos']:.1%}"))
        console.print(_before_after(title, rows + _style_rows(b, a)))


def _style_rows(before: dict, after: dict) -> list[tuple[str, str, str]]:
    """Each answer style's share and accuracy (data.answer_style), before and after; '-' where it had no answer."""
    from align.styles import names

    rows = []
    for style in names(before, after):
        rows.append((f"{style} answers: share", f"{before.get(style + '_fraction', 0):.1%}",
                     f"{after.get(style + '_fraction', 0):.1%}"))
        if style + "_accuracy" in (*before, *after):
            rows.append((f"{style} answers: accuracy", *(f"{r[style + '_accuracy']:.1%}" if style + "_accuracy" in r
                                                         else "-" for r in (before, after))))
    return rows


PRINTERS = {"sft": _print_sft, "reward": _print_reward, "grpo": _print_rl, "ppo": _print_rl}


def _compare(args) -> int:
    import time

    from rich.console import Console
    from rich.table import Table

    from align.compare import compare
    from align.recipe import Quantization
    from align.report import metrics_table, paired_table

    started = time.monotonic()
    results = compare(args.checkpoints, args.eval, out=args.out, reward=args.reward, baseline=args.baseline,
                      reference=args.reference, accuracy=args.accuracy, answer_column=args.answer_column,
                      answer_style=args.answer_style,
                      columns={"prompt": args.prompt_column} if args.prompt_column else None,
                      system_prompt=args.system_prompt,
                      max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                      answers_per_prompt=args.answers_per_prompt,
                      batch_size=args.batch_size, samples=args.samples, seed=args.seed,
                      quantization=Quantization(args.quantization), trust_remote_code=args.trust_remote_code)
    header, rows = metrics_table(results)
    table = Table(title=f"{results['eval']['prompts']} prompts from {args.eval} (95% bootstrap intervals)")
    for column in header:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    console = Console()
    console.print(table)
    paired_header, paired_rows = paired_table(results)
    if paired_rows:
        paired = Table(title="accuracy differences on the same prompts (95% bootstrap intervals of the paired "
                             "difference)")
        for column in paired_header:
            paired.add_column(column)
        for row in paired_rows:
            paired.add_row(*row)
        console.print(paired)
    console.print(f"{time.monotonic() - started:.0f} s; report: {args.out / 'report.html'} (and report.md, "
                  f"results.json)", soft_wrap=True)
    return 0


def _export(args) -> int:
    from align.modeling import export_merged
    from align.rundir import base_problem, policy_checkpoint, stage_model

    checkpoint = policy_checkpoint(Path(args.source))
    cfg = stage_model(checkpoint.parent, trust_remote_code=args.trust_remote_code)  # how it loaded its base
    problem = cfg and base_problem(checkpoint.parent, cfg)
    if problem:
        raise AlignError(f"{problem}; point model.name_or_path in {checkpoint.parent / 'config.yaml'} at the base it "
                         "trained on")
    out = export_merged(checkpoint, args.out, cfg, overwrite=args.overwrite)
    print(f"merged {checkpoint} into its base; saved to {out} (load it with AutoModelForCausalLM.from_pretrained)")
    return 0


def _data_check(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from align.data import load_preferences, load_prompts, load_qa, percentiles
    from align.modeling import load_tokenizer, model_context
    from align.recipe import GRPOStage, RewardStage, SFTStage, load_recipe

    overrides = list(args.overrides) + ["data.skip_invalid=true"]  # count every problem instead of stopping
    if args.target.endswith((".yaml", ".yml")):
        recipe = load_recipe(args.target, overrides)
        files = [(f, "qa") for f in (recipe.data.sft.train, recipe.data.sft.eval) if f]
        files += [(f, "preference") for f in (recipe.data.preference.train, recipe.data.preference.eval) if f]
        files += [(f, "prompts") for f in (recipe.data.prompts.train, recipe.data.prompts.eval) if f]
    else:
        recipe = load_recipe(None, [f"model.name_or_path={args.model or TINY_BASE}"] + overrides)
        files = [(args.target, args.kind if args.kind != "auto" else _kind(args.target, recipe))]
    rl = recipe.grpo or GRPOStage()
    limits = {"qa": (recipe.sft or SFTStage()).max_length, "preference": (recipe.reward or RewardStage()).max_length,
              "prompts": rl.max_length - rl.max_completion_length}
    loaders = {"qa": load_qa, "preference": load_preferences, "prompts": load_prompts}
    tokenizer = load_tokenizer(recipe.model)
    # A bare file is checked with the stage defaults, capped at the model's context (a recipe's own max_length
    # above it is refused in training, and shown here as it is).
    context = None if args.target.endswith((".yaml", ".yml")) else model_context(recipe.model)

    table = Table(title=f"data check (tokens by {recipe.model.name_or_path})")
    for column in ("file", "kind", "rows", "examples", "columns", "skipped", "tokens p50/p90/p99/max"):
        table.add_column(column)
    notes, invalid = [], False
    for path, kind in files:
        max_length = args.max_length or min(limits[kind], context or limits[kind])
        _, report = loaders[kind](path, recipe.data, tokenizer, max_length)
        lengths = "\n".join(f"{k}: {'/'.join(map(str, percentiles(v)))}" for k, v in report.lengths.items())
        columns = ", ".join(f"{k}={v}" + (" (auto)" if k in report.detected else "") for k, v in report.columns.items())
        columns += f"\nunused: {', '.join(report.unused)}" if report.unused else ""
        columns += f"\nto the rewards: {', '.join(report.passed)}" if report.passed else ""
        skipped = ", ".join(f"{k}={n}" for k, n in report.skipped.most_common()) or "none"
        table.add_row(path, f"{kind}\nmax_length {max_length}", str(report.rows), str(report.examples), columns,
                      skipped, lengths)
        notes.extend(f"first {reason}: {problem}" for reason, problem in report.first_skipped.items())
        invalid = invalid or bool(report.skipped)
        if report.pairing:
            notes.append(f"{path}: rated responses paired by {report.pairing['rule']}: "
                         + ", ".join(f"{k}={v}" for k, v in report.pairing.items() if k != "rule"))
    console = Console()
    console.print(table)
    for note in notes:
        console.print(f"  {note}", soft_wrap=True)
    return 1 if invalid else 0


def _kind(path: str, recipe) -> str:
    """'preference' if the file's columns are preference columns (mapped or by their usual names), else 'qa' if
    they are question-answer columns, else 'prompts'."""
    from align.data import DataError, preference_columns, preference_pair_columns, qa_columns, read_records

    records = read_records(path)
    columns = list(dict.fromkeys(k for r in records if isinstance(r.values, dict) for k in r.values))
    if preference_pair_columns(columns):  # chosen_x / rejected_x columns: the error will say how to map them
        return "preference"
    for kind, detect in (("preference", preference_columns), ("qa", qa_columns)):
        try:
            detect(path, columns, recipe.data.columns)
            return kind
        except DataError:
            pass
    return "prompts"
