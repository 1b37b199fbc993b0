"""Reward model: a pairwise scorer on the same (4-bit NF4 by default) base, a LoRA adapter plus a score head.

    align reward recipes/quickstart.yaml
    align reward recipes/quickstart.yaml reward.init_from=base reward.max_steps=100

TRL's RewardTrainer with the Bradley-Terry loss -log sigmoid(r(prompt, chosen) - r(prompt, rejected)), where r is
a one-output linear head (`AutoModelForSequenceClassification`, num_labels=1) read at the last non-pad token of
the chat-formatted conversation. The LoRA adapter starts from the SFT stage's adapter when the recipe has one
(`reward.init_from`), the score head from random; both are trained, and both are saved (the head through PEFT's
`modules_to_save`). Pairs are tokenized by align (`data.preference.load`) with the same function the
`RewardModelScorer` uses, so RL and compare score exactly what the trainer saw. TRL disables dropout in reward
models by default (`reward.trainer_args.disable_dropout`). Before and after training the stage scores the
held-out pairs: pairwise accuracy, mean margin, reward mean and std.
"""

from __future__ import annotations

import logging
import math
import statistics
from pathlib import Path
from typing import Any

from align.data import preference
from align.data.checks import load_train_eval
from align.modeling import (
    ModelLoadError,
    check_context,
    checkpointing,
    load_adapter_weights,
    load_model,
    load_tokenizer,
    lora_config,
    trainable_in_float32,
    trainable_weights,
)
from align import memory
from align.recipe import Recipe, RecipeError
from align.rewards import score_conversations
from align.callbacks import MetricsCallback, ProgressBar, guarded_train
from align.summary import Summary, arrow, num, pct
from align.rundir import RunDir, model_identity
from align.processes import check_identical, in_shares
from align.stages import batch, exclusive, init_adapter, trl_config

log = logging.getLogger(__name__)


@exclusive("reward")
def run(recipe: Recipe, *, resume: bool = False) -> dict[str, Any]:
    """Train, evaluate before and after, save; returns the results written to lineage.json. With `resume`,
    carry on from the stage's last complete trainer checkpoint, if there is one."""
    check(recipe)
    run_dir = RunDir(recipe, "reward")
    init = init_adapter(recipe, "reward")
    tokenizer = load_tokenizer(recipe.model)
    train, held_out, reports = load_data(recipe, tokenizer)
    memory.check(recipe, "reward", reports[0])  # before a model loads: a batch that cannot fit stops now
    model = build_model(recipe, init)
    resume_from = run_dir.resume_from() if resume else None
    trainer = build_trainer(recipe, model, tokenizer, train, held_out, run_dir)
    run_dir.start(base_model=model_identity(recipe.model), data=[r.summary() for r in reports],
                  parent=str(init) if init else None, resumed_from=resume_from)

    before = run_dir.evaluated_before(lambda: _evaluate(trainer, held_out, recipe, "before"))
    train_output = guarded_train(trainer, "reward", resume_from_checkpoint=resume_from)
    after = _evaluate(trainer, held_out, recipe, "after")

    checksums = check_identical(trainer.model, "reward")
    with run_dir.checkpoint() as staging:
        trainer.save_model(str(staging))  # adapter + score head (safetensors), adapter_config.json, tokenizer
    results = {"train_loss": train_output.training_loss, "init_from": str(init) if init else None,
               "before": before, "after": after, "checkpoint": str(run_dir.checkpoint_path),
               "run_dir": str(run_dir.path), **batch(trainer), "rank_checksums": checksums}
    _write_samples(run_dir, held_out, before, after)
    run_dir.finish(results)
    return results


def check(recipe: Recipe, upcoming: tuple[str, ...] = ()) -> None:
    """Settings that cannot work, refused before anything loads (`upcoming`: stages `align run` trains first)."""
    if recipe.reward is None:
        raise RecipeError("the recipe has no reward section; add one (see recipes/quickstart.yaml)")
    checkpointing(recipe.reward)
    init_adapter(recipe, "reward", upcoming)


def summary(results: dict[str, Any]) -> Summary:
    """Held-out pairwise accuracy, margin and reward statistics before and after."""
    before, after = results["before"], results["after"]
    notes = [f"reward model LoRA initialised from: {results['init_from'] or 'fresh (reward.init_from=base)'}"]
    if not after:
        return Summary(notes=notes + ["no held-out file (data.preference.eval), so no before/after evaluation"])
    rows = [("pairwise accuracy (chosen > rejected)", pct(before["pair_accuracy"]), pct(after["pair_accuracy"]))]
    rows += [(label, num(before[key]), num(after[key])) for label, key in (
        ("mean margin (chosen - rejected)", "margin_mean"), ("reward mean", "reward_mean"),
        ("reward std", "reward_std"), ("loss", "loss"))]
    return Summary(notes=notes, tables=[(f"reward model on {after['pairs']} held-out pairs", rows)],
                   headline=[arrow("pair accuracy", before["pair_accuracy"], after["pair_accuracy"], pct)])


def load_data(recipe: Recipe, tokenizer):
    """Validated train and held-out preference pairs (held-out None when data.preference.eval is unset)."""
    check_context(recipe.model, recipe.reward.max_length, "reward.max_length")
    return load_train_eval(recipe.data.preference, preference.load, recipe.data, tokenizer,
                           recipe.reward.max_length, what="preference")


def build_model(recipe: Recipe, init: Path | None):
    """Base + score head + LoRA (SEQ_CLS: the head is trained and saved), the adapter's weights from `init`."""
    from peft import PeftConfig, get_peft_model
    from transformers import set_seed

    set_seed(recipe.run.seed)  # the score head is drawn at random when the model loads
    model = load_model(recipe.model, head="score", activation_checkpointing=checkpointing(recipe.reward))
    peft_config = lora_config(recipe.lora, task_type="SEQ_CLS")
    if init is not None:
        # The adapter's shape is the saved one's; dropout stays a training choice of this stage.
        saved = PeftConfig.from_pretrained(str(init))
        if getattr(saved, "peft_type", None) is None or saved.peft_type.value != "LORA":
            raise ModelLoadError(f"reward.init_from: {init} holds a {saved.peft_type} adapter, not LoRA")
        peft_config.r, peft_config.lora_alpha = saved.r, saved.lora_alpha
        peft_config.target_modules = saved.target_modules
        if (saved.r, saved.lora_alpha) != (recipe.lora.r, recipe.lora.alpha):
            log.info("reward model starts from %s, so its LoRA has that adapter's r=%d, alpha=%d", init, saved.r,
                     saved.lora_alpha)
    model = get_peft_model(model, peft_config)
    if init is not None:
        load_adapter_weights(model, init)
        log.info("reward model: LoRA adapter initialised from %s, score head fresh", init)
    return model


def build_trainer(recipe: Recipe, model, tokenizer, train, held_out, run_dir: RunDir):
    """TRL's RewardTrainer on `model` (`build_model`), on align's token ids of the pairs, metrics to `run_dir`."""
    from trl import RewardConfig, RewardTrainer

    cfg = recipe.reward
    args = trl_config(RewardConfig, cfg, recipe, run_dir, has_eval=held_out is not None)
    exact = trainable_weights(model)
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=held_out,
        processing_class=tokenizer,
        callbacks=[MetricsCallback(run_dir)],
    )
    trainable_in_float32(trainer.model, recipe.model, exact)
    ProgressBar("loss", "accuracy").attach(trainer)
    return trainer


def pair_scores(model, tokenizer, pairs, *, batch_size: int) -> tuple[list[float], list[float]]:
    """Scores of every pair's chosen and rejected conversation, through the scorer's code path (under several
    processes, each scores its share)."""
    def score(share):
        if not share:  # fewer pairs than processes
            return [], []
        chosen = score_conversations(model, tokenizer, [p["prompt"] + p["chosen"] for p in share],
                                     batch_size=batch_size, desc="scoring chosen")
        rejected = score_conversations(model, tokenizer, [p["prompt"] + p["rejected"] for p in share],
                                       batch_size=batch_size, desc="scoring rejected")
        return chosen, rejected

    return in_shares(pairs, score)


def _evaluate(trainer, held_out, recipe: Recipe, when: str) -> dict[str, Any]:
    """Held-out pairwise accuracy (chosen scored above rejected), mean margin, reward mean and std, and the
    Bradley-Terry loss, all from one scoring pass (TRL's `evaluate` would score every pair a second time)."""
    if held_out is None:
        return {}
    chosen, rejected = pair_scores(trainer.model, trainer.processing_class, held_out,
                                   batch_size=recipe.reward.per_device_eval_batch_size)
    margins = [c - r for c, r in zip(chosen, rejected)]
    result = {
        "loss": statistics.fmean(math.log1p(math.exp(-m)) if m > -30 else -m for m in margins),  # -log sigmoid(m)
        "pair_accuracy": sum(m > 0 for m in margins) / len(margins),
        "margin_mean": statistics.fmean(margins),
        "reward_mean": statistics.fmean(chosen + rejected),
        "reward_std": statistics.pstdev(chosen + rejected),
        "chosen_mean": statistics.fmean(chosen),
        "rejected_mean": statistics.fmean(rejected),
        "pairs": len(margins),
        "scores": list(zip(chosen, rejected)),
    }
    trainer.log({f"eval_{k}": v for k, v in result.items() if k not in ("scores", "pairs")})
    log.info("%s training: held-out pairwise accuracy %.1f%% of %d pairs, mean margin %.3f", when,
             100 * result["pair_accuracy"], len(margins), result["margin_mean"])
    return result


def _write_samples(run_dir: RunDir, held_out, before: dict, after: dict) -> None:
    """Every held-out pair with its scores before and after training, in samples.jsonl (lineage keeps the
    summary numbers only)."""
    if not after:
        return
    run_dir.write_samples([
        {"prompt": pair["prompt"][-1]["content"], "chosen": pair["chosen"][-1]["content"],
         "rejected": pair["rejected"][-1]["content"], "before": list(b), "after": list(a), "right_after": a[0] > a[1]}
        for pair, b, a in zip(held_out, before.pop("scores"), after.pop("scores"))
    ])
