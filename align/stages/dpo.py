"""DPO: the SFT policy optimised directly on preference pairs, with no reward model, against the frozen SFT policy.

    align dpo recipes/quickstart.yaml
    align run recipes/quickstart.yaml rl.algorithm=dpo
    align dpo recipes/quickstart.yaml dpo.beta=0.3 dpo.loss_type=[sigmoid,sft] dpo.loss_weights=[1,0.2]

TRL's DPOTrainer on the data.preference pairs (the reward model's data, columns and checks): the loss raises the
implicit reward beta x (log pi(answer) - log pi_ref(answer)) of each chosen answer above its rejected one's. The
policy is the recipe's base (4-bit NF4 by default) with the SFT stage's LoRA adapter, trainable. The reference is
that same SFT adapter, frozen: given a PeftModel and no ref_model, TRL copies its adapter into a second adapter
"ref" on the same base weights (one base in memory), so the reference is the SFT policy, not the base with the
adapter switched off, and the implicit rewards start at 0. Before and after training the stage measures the
implicit-reward accuracy and margin on the held-out pairs (data.preference.eval), and answers held-out prompts
(data.prompts.eval) greedily, scored by dpo.rewards, as GRPO's and PPO's policies are.
"""

from __future__ import annotations

import logging
from typing import Any

from align import rl
from align.callbacks import MetricsCallback, ProgressBar
from align.data import preference
from align.data.checks import load_train_eval
from align.modeling import check_context, checkpointing, trainable_in_float32, trainable_weights
from align.recipe import Recipe, RecipeError
from align.rundir import RunDir
from align.stages import exclusive, init_adapter, trl_config
from align.styles import load_style
from align.summary import Summary, arrow, num, pct, policy_answers, policy_note

log = logging.getLogger(__name__)


@exclusive("dpo")
def run(recipe: Recipe, *, resume: bool = False) -> dict[str, Any]:
    """Train, evaluate before and after, save; returns the results written to lineage.json. With `resume`,
    carry on from the stage's last complete trainer checkpoint, if there is one."""
    check(recipe)
    return rl.train_offline(recipe, "dpo", resume=resume, load_data=load_data, trainer=build_trainer,
                            held_out_metrics=_held_out_metrics, logged_results=_logged_results)


def _logged_results(records: list[dict], cfg) -> dict[str, Any]:
    """The implicit reward margin and the chosen answers' log-ratio to the reference at the first and last
    logged training step (both 0 at the first: the reference is the policy the run started from)."""
    logged = [record for record in records if "rewards/margins" in record]
    margins = [record["rewards/margins"] for record in logged]
    log_ratios = [record["rewards/chosen"] / cfg.beta for record in logged]
    return {"margin_first": margins[0] if margins else None, "margin_last": margins[-1] if margins else None,
            "log_ratio_first": log_ratios[0] if log_ratios else None,
            "log_ratio_last": log_ratios[-1] if log_ratios else None}


def check(recipe: Recipe, upcoming: tuple[str, ...] = ()) -> None:
    """Settings that cannot work, refused before anything loads (`upcoming`: stages `align run` trains first)."""
    cfg = recipe.dpo
    if cfg is None:
        raise RecipeError("the recipe has no dpo section; add one (see recipes/quickstart.yaml)")
    checkpointing(cfg)
    load_style(recipe.data.answer_style)
    if cfg.beta <= 0:
        raise RecipeError(f"dpo.beta={cfg.beta}; set a positive beta (TRL's default is 0.1)")
    if cfg.loss_weights is not None and len(cfg.loss_weights) != len(cfg.loss_type):
        raise RecipeError(f"dpo.loss_weights has {len(cfg.loss_weights)} entries and dpo.loss_type "
                          f"{len(cfg.loss_type)}; give one weight per loss")
    rl.check_rewards(recipe, "dpo", upcoming)
    init_adapter(recipe, "dpo", upcoming)


def load_data(recipe: Recipe, tokenizer):
    """Validated train and held-out preference pairs (held-out None when data.preference.eval is unset) and their
    reports, with TRL's column names (prompt, chosen, rejected: conversations it renders with the chat template)."""
    check_context(recipe.model, recipe.dpo.max_length, "dpo.max_length")
    train, held_out, reports = load_train_eval(recipe.data.preference, preference.load, recipe.data, tokenizer,
                                               recipe.dpo.max_length, what="preference")
    # align's own tokenisation and the margin are the reward model's; DPOTrainer tokenizes, and has no margin
    def for_dpo(pairs):
        return pairs.remove_columns([c for c in ("chosen_ids", "rejected_ids", "margin") if c in pairs.column_names])

    return for_dpo(train), for_dpo(held_out) if held_out is not None else None, reports


def build_trainer(recipe: Recipe, model, tokenizer, train, held_out, run_dir: RunDir):
    """TRL's DPOTrainer on the policy `model`, its reference a frozen copy of the adapter it starts from."""
    from trl import DPOConfig, DPOTrainer

    cfg = recipe.dpo
    args = trl_config(DPOConfig, cfg, recipe, run_dir, has_eval=held_out is not None,
                      # the first step's implicit rewards are logged before any update: 0 if the reference is the
                      # policy this run started from
                      defaults={"logging_first_step": True},
                      # Dropout would make the policy differ from its own frozen copy, and the first margin with it;
                      # the rest fixes what TRL's defaults would otherwise decide (the reference stays the SFT
                      # policy, computed alongside, never refreshed).
                      disable_dropout=True, precompute_ref_log_probs=False, sync_ref_model=False,
                      f_divergence_type="reverse_kl")
    exact = trainable_weights(model)
    trainer = DPOTrainer(model=model, args=args, train_dataset=train, eval_dataset=held_out,
                         processing_class=tokenizer, callbacks=[MetricsCallback(run_dir)])
    trainable_in_float32(trainer.model, recipe.model, exact)
    ProgressBar("loss", "rewards/margins").attach(trainer)
    return trainer


def _held_out_metrics(trainer, held_out, when: str) -> dict[str, Any]:
    """The implicit reward on the held-out pairs: accuracy (chosen above rejected), mean margin, loss."""
    metrics = trainer.evaluate()
    result = dict(pairs=len(held_out), reward_accuracy=metrics["eval_rewards/accuracies"],
                  margin_mean=metrics["eval_rewards/margins"], loss=metrics["eval_loss"])
    log.info("%s training: held-out implicit-reward accuracy %.1f%% of %d pairs, mean margin %.3f", when,
             100 * result["reward_accuracy"], len(held_out), result["margin_mean"])
    return result


def summary(results: dict[str, Any]) -> Summary:
    """Where the policy started, the implicit reward on held-out pairs, held-out answers before and after."""
    before, after = results["before"], results["after"]
    out = Summary(notes=[policy_note(results)])
    if results.get("margin_first") is not None:
        out.notes.append(f"implicit reward margin (chosen - rejected) on training batches: first step "
                         f"{results['margin_first']:.4f}, last {results['margin_last']:.4f}; log-ratio of chosen "
                         f"answers to the reference: first {results['log_ratio_first']:.4f}, last "
                         f"{results['log_ratio_last']:.4f} nats")
    if "pairs" in after:
        out.tables.append((f"implicit reward on {after['pairs']} held-out pairs", [
            ("accuracy (chosen > rejected)", pct(before["reward_accuracy"]), pct(after["reward_accuracy"])),
            ("mean margin", num(before["margin_mean"], 4), num(after["margin_mean"], 4)),
            ("loss (dpo.loss_type)", num(before["loss"], 4), num(after["loss"], 4))]))
        out.headline.append(arrow("pair accuracy (implicit reward)", before["reward_accuracy"],
                                  after["reward_accuracy"], pct))
    if "greedy" in after:
        policy_answers(out, results)
    return out
