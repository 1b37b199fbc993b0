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

from align.data.files import FORMATS
from align.data.kinds import KINDS
from align.errors import AlignError
from align.recipe import describe
from align.registry import BY_NAME, FINAL, STAGES

log = logging.getLogger("align.cli")

TINY_BASE = "data/tiny-base"


def _order() -> str:
    """'sft, reward, grpo|ppo': the stages `align run` goes through."""
    return ", ".join([*(s.name for s in STAGES if not s.final), "|".join(FINAL)])


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
        help=f"run every stage of a recipe in order ({_order()}), skipping finished ones",
        description=f"Run the recipe's stages in order, each starting from the previous ones' checkpoints: "
        f"{_order()} (the last by rl.algorithm). A stage that finished with the same inputs (recipe keys, data "
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
    names = ", ".join([*(s.name for s in STAGES if not s.final), "rl"])
    run.add_argument("--from", dest="start", metavar="STAGE",
                     help=f"re-run this stage ({names}) and every one after it, even if finished")
    run.add_argument("--only", metavar="STAGE", help=f"run just this stage ({names}); earlier ones must be finished")
    run.add_argument("--fresh", action="store_true",
                     help="ignore finished and interrupted stages: run every selected stage from step 0")

    stages = []
    for spec in STAGES:
        parser_ = commands.add_parser(spec.name, help=spec.help, description=spec.description,
                                      epilog=_recipe_keys("model", "lora", "data", "run", spec.name),
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
        parser_.add_argument("--resume", action="store_true",
                             help=f"continue from the last complete checkpoint in runs/<run>/{spec.name}/trainer/ "
                             f"(written every {spec.name}.save_steps); `align run` does this by itself for an "
                             "interrupted stage")
        stages.append(parser_)
    for stage in (run, *stages):
        name = stage.prog.split()[-1]
        stage.add_argument("recipe", help="recipe YAML file, e.g. recipes/quickstart.yaml")
        stage.add_argument("overrides", nargs="*", metavar="key=value",
                           help=f"recipe overrides, e.g. {name if stage is not run else 'sft'}.learning_rate=1e-4")

    report = commands.add_parser(
        "report",
        help="draw a run: RUN_DIR/report.html with every stage's curves, results, gates and sample answers",
        description="Write RUN_DIR/report.html, one self-contained page (plots embedded, no network): per stage, in "
        "the order the run took them, its curves against the step (loss, learning rate, gradient norm, seconds per "
        "step; pair accuracy and margin for the reward model; reward per function, KL, completion length, clipped "
        "and EOS fractions for RL; held-out evaluations as points), the before -> after tables, the gates and "
        "their measurements, held-out answers before and after, and what ran. `align run` writes it at its end.",
        epilog="example:\n  align report runs/quickstart && xdg-open runs/quickstart/report.html",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_argument("run_dir", help="a run dir, runs/<run name>")

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
    compare.add_argument("--eval", required=True, help=f"prompts ({FORMATS}), "
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
    check.add_argument("target", help=f"a recipe (.yaml) or a data file ({FORMATS})")
    check.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. data.columns.prompt=q")
    check.add_argument("--model", default=None, help=f"tokenizer for a bare data file (default: {TINY_BASE})")
    check.add_argument("--max-length", type=int, default=None,
                       help="token limit (default: the recipe's sft.max_length, reward.max_length, or for prompts "
                       "grpo.max_length - grpo.max_completion_length)")
    check.add_argument("--kind", choices=("auto", *KINDS), default="auto",
                       help="what a bare data file holds (default auto: preference if it has chosen/rejected, "
                       "two answers and a choice, or responses/scores columns; else feedback if it has answers "
                       "with a true/false label; else qa if it has answers; else prompts)")

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
        if args.command == "run" or args.command in BY_NAME:
            return _stage(args)
        if args.command == "data":
            return _data_check(args)
        if args.command == "export":
            return _export(args)
        if args.command == "report":
            from align import run_report

            print(f"wrote {run_report.write(args.run_dir)}")
            return 0
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


def _write_report(recipe, failure: str | None) -> None:
    """`align run`'s report.html, on the main process, whatever happened; a report that cannot be written is a
    warning, never the run's error."""
    from align import run_report
    from align.processes import is_main_process

    run_dir = Path(recipe.run.root) / recipe.run.name
    if not is_main_process() or not run_dir.is_dir():
        return
    try:
        log.info("report: %s", run_report.write(run_dir, failure))
    except Exception as e:  # noqa: BLE001  (the run's own outcome matters more than its report)
        log.warning("the run report could not be written: %s: %s", type(e).__name__, e)


def _stage(args) -> int:
    from rich.console import Console

    from align.memory import imports_left_out_of_garbage_collection, keep_freed_memory
    from align.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)  # a bad key fails before torch is even imported
    with imports_left_out_of_garbage_collection():
        import torch

        from align import pipeline
        from align.processes import state
        from align.rewards import RewardFailed

        # The stages the command may run: its own, or each one the recipe has a section for (which of those `align
        # run` runs is decided in the try below, where a recipe error becomes the run's recorded failure).
        stages = [BY_NAME[args.command]] if args.command in BY_NAME else [
            s for s in STAGES if getattr(recipe, s.name) is not None]
        for stage in stages:
            stage.module  # imports it, and what it trains with
    state()  # the process group, before any model or trainer: every rank decision below reads it
    log.info("memory: %s", keep_freed_memory())

    running = {"stage": args.command, "failure": None}
    stop = StopOnSignal(lambda how: _interrupted(running["stage"], args, recipe, how))
    handlers = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if args.command == "run":
            names = pipeline.stage_names(recipe)
            outcomes = pipeline.run(recipe, start=args.start, only=args.only, fresh=args.fresh,
                                    on_stage=lambda name: running.update(stage=name))
        else:
            results = BY_NAME[args.command].module.run(recipe, resume=args.resume)
    except torch.OutOfMemoryError as e:
        running["failure"] = _out_of_memory(running["stage"], recipe, e)
        _print_failure(running["failure"])
        return 3
    except KeyboardInterrupt as e:
        running["failure"] = _interrupted(running["stage"], args, recipe, "terminated" if isinstance(e, Terminated)
                                          else "interrupted")
        _print_failure(running["failure"])
        return 143 if isinstance(e, Terminated) else 130
    except RewardFailed as e:
        running["failure"] = _reward_failed(e, running["stage"], args, recipe)
        _print_failure(running["failure"])
        return 2
    except BaseException as e:
        running["failure"] = f"{running['stage']}: {type(e).__name__}: {e}"
        raise
    finally:
        stop.cancel()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if args.command == "run":
            _write_report(recipe, running["failure"])
    from align.processes import is_main_process

    if not is_main_process():
        return 0
    console = Console()
    if args.command == "run":
        _print_pipeline(console, names, outcomes, recipe)
        return 0
    print_summary(console, BY_NAME[args.command].module.summary(results))
    if "train_loss" in results:
        console.print(f"train loss {results['train_loss']:.4f}", soft_wrap=True)
    console.print(f"checkpoint: {results['checkpoint']}", soft_wrap=True, markup=False)
    console.print(f"run dir: {results['run_dir']}", soft_wrap=True, markup=False)
    return 0


def print_summary(console, summary) -> None:
    """A stage's Summary in full: notes, before/after tables, samples. Printed as plain text, never as rich markup:
    answers, prompts and paths are data ("[1, 2]" is not a style)."""
    from rich.table import Table
    from rich.text import Text

    for note in summary.notes:
        console.print(note, soft_wrap=True, markup=False)
    for title, rows in summary.tables:
        table = Table(title=Text(title))
        for column in ("", "before", "after"):
            table.add_column(column)
        for row in rows:
            table.add_row(*map(Text, row))
        console.print(table)
    for sample in summary.samples:
        console.print(f"  {sample}", soft_wrap=True, markup=False)


def _print_pipeline(console, names: list[str], outcomes, recipe) -> None:
    """One row per stage: what happened to it and what it achieved on held-out data (before -> after)."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(f"align run {recipe.run.name}: held-out results (before -> after)"))
    for column in ("stage", "", "result"):
        table.add_column(column)
    by_name = {o.stage: o for o in outcomes}
    for name in names:
        outcome = by_name.get(name)
        if outcome is None:
            table.add_row(name, "not selected", "")
            continue
        lines = BY_NAME[name].module.summary(outcome.results).headline
        table.add_row(name, outcome.action, Text("\n".join(lines) or "(no held-out data)"))
    console.print(table)
    console.print(f"run dir: {Path(recipe.run.root) / recipe.run.name} (checkpoints: <stage>/checkpoint)", soft_wrap=True,
                  markup=False)


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


class StopOnSignal:
    """The SIGINT and SIGTERM handler of a stage: raises KeyboardInterrupt (Terminated) so that the stage stops
    where it is and `_stage` prints the resume line. Should the exception be lost on its way (raised inside a
    finaliser or a library that swallows it: seen in three full test runs under load, training went on; not
    reproduced in 43 signals sent one at a time, with and without load), a timer prints
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
        _print_failure(self.message(how))
        os._exit(code)

    def cancel(self):
        if self.timer is not None:
            self.timer.cancel()


def _print_failure(message: str) -> None:
    """Prints the one-line (or few-line) message a stopped stage ends with on a line of its own: the trainer leaves
    its progress bars open when an exception stops it, the cursor after the last one. Open bars are closed (each
    ends its line); a bar that was being closed when the signal came has already left tqdm's registry without
    ending its line (seen: "0/1 [00:00<?, ?it/s]interrupted during ..."), so the message starts with a line break."""
    from tqdm import tqdm

    for bar in list(tqdm._instances):  # tqdm's own registry of open bars (what tqdm.write clears the screen of)
        bar.close()
    print("\n" + message, file=sys.stderr, flush=True)


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
    settings = "\n".join(f"  {stage}.{setting}" for setting in BY_NAME[stage].memory_settings)
    nf4 = "" if recipe.model.quantization.value == "nf4" else "\n  model.quantization=nf4 (a 4-bit base)"
    return (f"error: the {stage} stage ran out of GPU memory ({first_line}).\nLower, the biggest saving first:\n"
            f"{settings}{nf4}\nResumable checkpoints, if any were written, are in "
            f"{recipe.run.root}/{recipe.run.name}/{stage}/trainer/.")


def _compare(args) -> int:
    import time

    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from align.memory import imports_left_out_of_garbage_collection, keep_freed_memory
    from align.recipe import Quantization
    from align.report import metrics_table, paired_table

    with imports_left_out_of_garbage_collection():
        from align.compare import compare
    log.info("memory: %s", keep_freed_memory())
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
    table = Table(title=Text(f"{results['eval']['prompts']} prompts from {args.eval} (95% bootstrap intervals)"))
    for column in header:
        table.add_column(column)
    for row in rows:
        table.add_row(*map(Text, row))  # checkpoint names and paths are data, not rich markup
    console = Console()
    console.print(table)
    paired_header, paired_rows = paired_table(results)
    if paired_rows:
        paired = Table(title="accuracy differences on the same prompts (95% bootstrap intervals of the paired "
                             "difference)")
        for column in paired_header:
            paired.add_column(column)
        for row in paired_rows:
            paired.add_row(*map(Text, row))
        console.print(paired)
    console.print(f"{time.monotonic() - started:.0f} s; report: {args.out / 'report.html'} (and report.md, "
                  f"results.json)", soft_wrap=True, markup=False)
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

    from align.data.checks import available, percentiles
    from align.data.files import read_records
    from align.data.kinds import guess
    from align.modeling import load_tokenizer, model_context
    from align.recipe import load_recipe

    overrides = list(args.overrides) + ["data.skip_invalid=true"]  # count every problem instead of stopping
    if args.target.endswith((".yaml", ".yml")):
        recipe = load_recipe(args.target, overrides)
        files = [(f, kind) for kind, spec in KINDS.items()
                 for f in (getattr(recipe.data, spec.section).train, getattr(recipe.data, spec.section).eval) if f]
    else:
        recipe = load_recipe(None, [f"model.name_or_path={args.model or TINY_BASE}"] + overrides)
        kind = args.kind if args.kind != "auto" else guess(args.target, available(read_records(args.target)),
                                                           recipe.data.columns)
        files = [(args.target, kind)]
    limits = _limits(recipe)
    tokenizer = load_tokenizer(recipe.model)
    # A bare file is checked with the stage defaults, capped at the model's context (a recipe's own max_length
    # above it is refused in training, and shown here as it is).
    context = None if args.target.endswith((".yaml", ".yml")) else model_context(recipe.model)

    console = Console()
    console.print(f"data check (tokens by {_shown_path(recipe.model.name_or_path)})", style="bold", markup=False)
    invalid = False
    for path, kind in files:
        limit = limits[KINDS[kind].section]
        max_length = args.max_length or min(limit, context or limit)
        _, report = KINDS[kind].load(path, recipe.data, tokenizer, max_length)
        invalid = invalid or bool(report.skipped)
        # One block per file, a fact per line, so that it reads in an 80-column terminal (long lines wrap whole).
        lines = [f"{kind} (max_length {max_length}): {report.rows} rows, {report.examples} "
                 f"{'pairs' if kind == 'preference' else 'examples'}, skipped: "
                 + (", ".join(f"{k}={n}" for k, n in report.skipped.most_common()) or "none"),
                 "columns: " + ", ".join(f"{k}={'[' + ','.join(v) + ']' if isinstance(v, (list, tuple)) else v}"
                                         + (" (auto)" if k in report.detected else "") for k, v in report.columns.items())]
        lines += [f"{what}: {', '.join(names)}" for what, names in (
            ("unused", report.unused), ("ignored", report.ignored), ("to the rewards", report.passed)) if names]
        lengths = [f"{k} {'/'.join(map(str, percentiles(v)))}" for k, v in report.lengths.items()]
        lines.append("tokens p50/p90/p99/max:")
        lines += ["  " + "  ".join(lengths)] if 6 + len("  ".join(lengths)) <= console.width else [
            f"  {field}" for field in lengths]
        if report.labels:
            lines.append(f"{report.labels['good']} answers labelled good, {report.labels['bad']} bad")
        if report.pairing:
            lines.append(f"rated responses paired by {report.pairing['rule']}: "
                         + ", ".join(f"{k}={v}" for k, v in report.pairing.items() if k != "rule"))
        lines += report.notes + [f"first {reason}: {problem}" for reason, problem in report.first_skipped.items()]
        console.print()
        # markup=False: column names and values are data, and "[a,b]" is not a style
        console.print(_shown_path(path), style="bold", soft_wrap=True, highlight=False, markup=False)
        for line in lines:
            console.print(f"  {line}", highlight=False, markup=False)
    return 1 if invalid else 0


def _shown_path(path: str) -> str:
    """A path as short as it reads: relative to the working directory when it is under it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except (ValueError, OSError):
        return str(path)


def _limits(recipe) -> dict[str, int]:
    """Per data section, the token limit of the first stage that trains on it (its max_length; for prompts, what
    leaves room for max_completion_length), from the recipe's section or that stage's defaults."""
    from align.recipe import TrainingStage, section_defaults

    limits = {}
    for spec in STAGES:
        cfg = getattr(recipe, spec.name) or section_defaults(spec.name)
        limits.setdefault(spec.data, cfg.max_length - cfg.max_completion_length if spec.generates else cfg.max_length)
    return {kind.section: limits.get(kind.section, TrainingStage().max_length) for kind in KINDS.values()}

