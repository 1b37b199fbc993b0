"""Supervised fine-tuning: LoRA adapters on a frozen (4-bit NF4 by default) base, loss on the answers only.

    align sft recipes/quickstart.yaml
    align sft recipes/qwen2.5-0.5b.yaml sft.learning_rate=1e-4 lora.r=32
    accelerate launch --config_file accelerate_config.yaml -m align sft recipes/quickstart.yaml

TRL's SFTTrainer on conversational prompt-completion pairs, tokenized by align as it checks them (`qa.load`,
`modeling.sft_tokens`): the chat template renders the prompt (with the generation prompt) and the answer, every
prompt and template token gets label -100, the sequence ends at the end-of-turn EOS, and the loss is the mean NLL of
the answer tokens and that EOS.
Before and after training the stage measures that loss on the held-out file (its first `sft.eval_loss_rows` rows)
and the exact-match accuracy of greedy answers (final number), and it writes the adapter and the tokenizer to
runs/<run>/sft/checkpoint/, which loads with stock PEFT.
"""

from __future__ import annotations

import logging
from typing import Any

from align.data import qa
from align.data.checks import load_train_eval
from align.generation import generate
from align.modeling import (
    check_context, checkpointing, load_model, load_tokenizer, lora_config, trainable_in_float32,
)
from align import memory
from align.recipe import Recipe, RecipeError
from align.rewards import final_answer_match
from align.callbacks import MetricsCallback, ProgressBar, guarded_train
from align.summary import Summary, arrow, num, pct, style_lines, style_rows
from align.rundir import RunDir, model_identity
from align.processes import check_identical
from align.stages import batch, exclusive, trl_config
from align.styles import breakdown, describe, load_style

log = logging.getLogger(__name__)


@exclusive("sft")
def run(recipe: Recipe, *, resume: bool = False) -> dict[str, Any]:
    """Train, evaluate before and after, save; returns the results written to lineage.json. With `resume`,
    carry on from the stage's last complete trainer checkpoint, if there is one."""
    check(recipe)
    run_dir = RunDir(recipe, "sft")
    style = load_style(recipe.data.answer_style)
    # Data is validated before the model loads: a bad row should stop the run in seconds, not after a download.
    tokenizer = load_tokenizer(recipe.model)
    train, held_out, reports = load_data(recipe, tokenizer)
    memory.check(recipe, "sft", reports[0])  # before a model loads: a batch that cannot fit stops now
    model = load_model(recipe.model, activation_checkpointing=checkpointing(recipe.sft))
    resume_from = run_dir.resume_from() if resume else None
    trainer = build_trainer(recipe, model, tokenizer, train, held_out, run_dir)
    run_dir.start(base_model=model_identity(recipe.model), data=[r.summary() for r in reports],
                  resumed_from=resume_from)

    before = run_dir.evaluated_before(lambda: _evaluate(trainer, held_out, recipe, "before", style))
    train_output = guarded_train(trainer, "sft", resume_from_checkpoint=resume_from)
    after = _evaluate(trainer, held_out, recipe, "after", style)

    checksums = check_identical(trainer.model, "sft")
    with run_dir.checkpoint() as staging:
        trainer.save_model(str(staging))  # adapter (safetensors) + adapter_config.json + tokenizer
    results = {"train_loss": train_output.training_loss, "before": before, "after": after,
               "checkpoint": str(run_dir.checkpoint_path), "run_dir": str(run_dir.path), **batch(trainer),
               "rank_checksums": checksums}
    _write_samples(run_dir, before, after)
    run_dir.finish(results)
    return results


def check(recipe: Recipe, upcoming: tuple[str, ...] = ()) -> None:
    """Settings that cannot work, refused before anything loads."""
    if recipe.sft is None:
        raise RecipeError("the recipe has no sft section; add one (see recipes/quickstart.yaml)")
    checkpointing(recipe.sft)
    load_style(recipe.data.answer_style)


def summary(results: dict[str, Any]) -> Summary:
    """The held-out answer loss and greedy accuracy before and after, each answer style, a few answers."""
    before, after = results["before"], results["after"]
    if not after:
        return Summary(notes=["no held-out file (data.sft.eval), so no before/after evaluation"])
    rows = [("answer loss", num(before["answer_loss"], 4), num(after["answer_loss"], 4))]
    headline = [arrow("answer loss", before["answer_loss"], after["answer_loss"])]
    if "answer_accuracy" in after:
        rows.append(("answer accuracy (greedy, final number)", pct(before["answer_accuracy"]),
                     pct(after["answer_accuracy"])))
        headline.append(arrow("accuracy", before["answer_accuracy"], after["answer_accuracy"], pct))
    samples = [f"{'right' if s['correct'] else 'wrong'} {s['prompt']} -> "
               f"{s['answer'].strip()!r}" for s in after.get("samples", [])]
    return Summary(tables=[("SFT on held-out data", rows + style_rows(before, after))],
                   headline=headline + style_lines(before, after), samples=samples)


def load_data(recipe: Recipe, tokenizer):
    """Validated train and held-out QA pairs (held-out None when data.sft.eval is unset) and their reports."""
    check_context(recipe.model, recipe.sft.max_length, "sft.max_length")
    return load_train_eval(recipe.data.sft, qa.load, recipe.data, tokenizer, recipe.sft.max_length, what="sft")


def build_trainer(recipe: Recipe, model, tokenizer, train, held_out, run_dir: RunDir):
    """TRL's SFTTrainer on `model` (the 4-bit base) with the recipe's LoRA, answer-only loss, metrics to `run_dir`."""
    from trl import SFTConfig, SFTTrainer

    cfg = recipe.sft
    args = trl_config(SFTConfig, cfg, recipe, run_dir, has_eval=held_out is not None,
                      completion_only_loss=True)  # labels of prompt and template tokens are -100
    trainer = SFTTrainer(
        model=model,
        args=args,
        # tokenized as they were checked (qa.load): TRL takes input_ids and completion_mask as they are
        train_dataset=train,
        eval_dataset=_first(held_out, cfg.eval_loss_rows),
        processing_class=tokenizer,
        peft_config=lora_config(recipe.lora),
        callbacks=[MetricsCallback(run_dir)],
    )
    trainable_in_float32(trainer.model, recipe.model)
    ProgressBar("loss").attach(trainer)
    return trainer


def _first(examples, n: int | None):
    return examples if examples is None or n is None else examples.select(range(min(n, len(examples))))


def _evaluate(trainer, held_out, recipe: Recipe, when: str, style=None) -> dict[str, Any]:
    """Answer-only loss on the held-out set (the trainer's eval set: its first sft.eval_loss_rows rows) and
    exact-match accuracy of greedy answers to its first prompts (with `style`, also each answer style's share and
    accuracy)."""
    if held_out is None:
        return {}
    cfg = recipe.sft
    metrics = trainer.evaluate()
    result: dict[str, Any] = {"answer_loss": metrics["eval_loss"]}
    n = min(cfg.eval_generations, len(held_out))
    if n:
        rows = held_out.select(range(n))
        answers = generate(
            trainer.model,
            trainer.processing_class,
            rows["prompt"],
            max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.per_device_eval_batch_size,
            desc=f"answering {n} held-out prompts ({when})",
        )
        references = [c[-1]["content"] for c in rows["completion"]]
        correct = [final_answer_match(a, r) for a, r in zip(answers, references)]
        result["answer_accuracy"] = sum(correct) / n
        labels = [style(a) for a in answers] if style else None
        if labels:
            result.update(breakdown(labels, [float(c) for c in correct]))
        result["samples"] = [
            {"prompt": p[-1]["content"], "reference": r, "answer": a, "correct": c,
             **({"style": labels[i]} if labels else {})}
            for i, (p, r, a, c) in enumerate(zip(rows["prompt"], references, answers, correct))
        ]
        trainer.log({f"eval_{k}": v for k, v in result.items() if k.endswith(("_fraction", "_accuracy"))})
    log.info("%s training: held-out answer loss %.4f%s", when, result["answer_loss"],
             f", accuracy {result['answer_accuracy']:.1%} of {n}{describe(result)}" if n else "")
    return result


def _write_samples(run_dir: RunDir, before: dict, after: dict) -> None:
    """Held-out answers before and after training, side by side, in samples.jsonl."""
    if not after.get("samples"):
        return
    run_dir.write_samples([
        {"prompt": a["prompt"], "reference": a["reference"], "before": b["answer"], "after": a["answer"],
         "correct_before": b["correct"], "correct_after": a["correct"],
         **({"style_before": b["style"], "style_after": a["style"]} if "style" in a else {})}
        for b, a in zip(before["samples"], after["samples"])
    ])
    for stage_result in (before, after):  # lineage keeps two right and two wrong; samples.jsonl has all
        samples = stage_result["samples"]
        stage_result["samples"] = [s for s in samples if s["correct"]][:2] + [s for s in samples if not s["correct"]][:2]
