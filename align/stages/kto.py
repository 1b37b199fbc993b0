"""KTO: the SFT policy optimised on answers labelled good or bad one at a time, with no pairs and no reward model,
against the frozen SFT policy.

    align kto recipes/quickstart.yaml
    align run recipes/quickstart.yaml rl.algorithm=kto

TRL's KTOTrainer on data.feedback (a prompt, one answer and a true/false label per row: TRL's unpaired preference
type, LLaMA-Factory's kto_tag): the loss raises the implicit reward beta x (log pi(answer) - log pi_ref(answer)) of
good answers above, and lowers that of bad ones below, a reference point (the batch's KL estimate). The policy is
the recipe's base (4-bit NF4 by default) with the SFT stage's LoRA adapter, trainable; the reference is a frozen
copy of that adapter on the same base (TRL's "ref" adapter, as for DPO), so the implicit rewards and the KL start
at 0. Before and after training the stage measures the implicit rewards of the held-out labelled answers
(data.feedback.eval), and answers held-out prompts (data.prompts.eval) greedily, scored by kto.rewards.
"""

from __future__ import annotations

import logging
from typing import Any

from align import rl
from align.callbacks import MetricsCallback, ProgressBar
from align.data import feedback
from align.data.checks import load_train_eval
from align.modeling import check_context, checkpointing, trainable_in_float32, trainable_weights
from align.recipe import Recipe, RecipeError
from align.rundir import RunDir
from align.stages import exclusive, init_adapter, trl_config
from align.styles import load_style
from align.summary import Summary, arrow, kl_notes, num, policy_answers, policy_note

log = logging.getLogger(__name__)


@exclusive("kto")
def run(recipe: Recipe, *, resume: bool = False) -> dict[str, Any]:
    """Train, evaluate before and after, save; returns the results written to lineage.json. With `resume`,
    carry on from the stage's last complete trainer checkpoint, if there is one."""
    check(recipe)
    return rl.train_offline(recipe, "kto", resume=resume, load_data=load_data, trainer=build_trainer,
                            held_out_metrics=_held_out_metrics, logged_results=_logged_results)


def _logged_results(records: list[dict], cfg) -> dict[str, Any]:
    """KTO's KL estimate at the training steps (0 at the first: the reference is the policy the run started
    from), first, last and max."""
    kls = [record["kl"] for record in records if "kl" in record and "rewards/margins" in record]
    return {"kl": (kls[0], kls[-1], max(kls)) if kls else (None, None, None),
            "kl_unit": "nats per answer (KTO's batch estimate)"}


def check(recipe: Recipe, upcoming: tuple[str, ...] = ()) -> None:
    """Settings that cannot work, refused before anything loads (`upcoming`: stages `align run` trains first)."""
    cfg = recipe.kto
    if cfg is None:
        raise RecipeError("the recipe has no kto section; add one (see recipes/quickstart.yaml)")
    checkpointing(cfg)
    load_style(recipe.data.answer_style)
    if cfg.beta <= 0:
        raise RecipeError(f"kto.beta={cfg.beta}; set a positive beta (TRL's default is 0.1)")
    if cfg.loss_type == "kto" and cfg.per_device_train_batch_size < 2:
        raise RecipeError("kto.per_device_train_batch_size=1: KTO's KL reference point pairs each prompt with another "
                          "row's answer in the batch; set it to 2 or more")
    rl.check_rewards(recipe, "kto", upcoming)
    init_adapter(recipe, "kto", upcoming)


def load_data(recipe: Recipe, tokenizer):
    """Validated train and held-out labelled answers (held-out None when data.feedback.eval is unset) and their
    reports, as TRL's unpaired preference examples {prompt, completion, label}."""
    check_context(recipe.model, recipe.kto.max_length, "kto.max_length")
    return load_train_eval(recipe.data.feedback, feedback.load, recipe.data, tokenizer, recipe.kto.max_length,
                           what="feedback")


def build_trainer(recipe: Recipe, model, tokenizer, train, held_out, run_dir: RunDir):
    """TRL's KTOTrainer on the policy `model`, its reference a frozen copy of the adapter it starts from."""
    from trl import KTOConfig, KTOTrainer

    cfg = recipe.kto
    args = trl_config(KTOConfig, cfg, recipe, run_dir, has_eval=held_out is not None,
                      defaults={"logging_first_step": True},  # the implicit rewards before any update: 0
                      # as for DPO: no dropout (the policy is its own frozen copy at the first step), the reference
                      # computed alongside and never refreshed; KTO's KL needs the batch in its fixed order
                      disable_dropout=True, precompute_ref_log_probs=False, sync_ref_model=False,
                      train_sampling_strategy="sequential" if cfg.loss_type == "kto" else "random")
    exact = trainable_weights(model)
    trainer = KTOTrainer(model=model, args=args, train_dataset=train, eval_dataset=held_out,
                         processing_class=tokenizer, callbacks=[MetricsCallback(run_dir)])
    trainable_in_float32(trainer.model, recipe.model, exact)
    ProgressBar("loss", "kl").attach(trainer)
    return trainer


def _held_out_metrics(trainer, held_out, when: str) -> dict[str, Any]:
    """The implicit rewards of the held-out labelled answers: good, bad, their difference, the KL estimate, the
    loss."""
    metrics = trainer.evaluate()
    result = dict(answers=len(held_out), reward_good=metrics["eval_rewards/chosen"],
                  reward_bad=metrics["eval_rewards/rejected"], margin_mean=metrics["eval_rewards/margins"],
                  kl=metrics["eval_kl"], loss=metrics["eval_loss"])
    log.info("%s training: held-out implicit reward of good answers %.3f, of bad ones %.3f (%d answers)", when,
             result["reward_good"], result["reward_bad"], len(held_out))
    return result


def summary(results: dict[str, Any]) -> Summary:
    """Where the policy started, the KL, the implicit rewards of held-out good and bad answers, held-out answers."""
    before, after = results["before"], results["after"]
    out = Summary(notes=[policy_note(results)])
    if "answers" in after:
        out.tables.append((f"implicit reward of {after['answers']} held-out labelled answers", [
            ("good answers (mean)", num(before["reward_good"], 4), num(after["reward_good"], 4)),
            ("bad answers (mean)", num(before["reward_bad"], 4), num(after["reward_bad"], 4)),
            ("good - bad", num(before["margin_mean"], 4), num(after["margin_mean"], 4)),
            ("KTO loss", num(before["loss"], 4), num(after["loss"], 4))]))
        out.headline.append(arrow("good - bad implicit reward", before["margin_mean"], after["margin_mean"]))
    if "greedy" in after:
        policy_answers(out, results)
    kl_notes(out, results)
    return out
