"""GRPO: the SFT policy optimised against a weighted sum of rewards, with a KL penalty to the frozen SFT policy.

    align grpo recipes/quickstart.yaml
    align grpo recipes/quickstart.yaml grpo.beta=0.1 grpo.rewards.1.weight=0.5

TRL's GRPOTrainer: for each prompt it samples `num_generations` completions, scores each with every reward
function (`align.rewards`), and raises the log-probability of the completions that beat their group's mean,
minus beta x KL(policy || reference) per token. The policy is the recipe's base (4-bit NF4 by default) with the
SFT stage's LoRA adapter, trainable. The reference is that same SFT adapter, frozen: TRL, given a PeftModel that
already carries an adapter and beta != 0, copies it into a second adapter "ref" on the same base weights, so
there is one copy of the base in memory. Without an SFT stage the policy gets a fresh adapter, whose frozen copy
(a zero LoRA update) makes the reference the base model itself. A reward model trained on the same base runs on
the policy's base too (one more adapter and its score head). Before and after training the stage answers
held-out prompts greedily and scores the answers with every reward function.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Any

from align.data import load_prompts, load_train_eval
from align.errors import AlignError
from align.generation import generate
from align.modeling import (
    load_model,
    load_tokenizer,
    lora_config,
    trainable_in_compute_dtype,
    trainable_weights,
)
from align.recipe import Quantization, Recipe, RecipeError
from align.rewards import RewardFunc, check_reward_model_args, reward_function, reward_model_scorer
from align.rundir import MetricsCallback, ProgressBar, RunDir, model_identity
from align.stages import adapter_dir, finished_checkpoint, init_adapter, trl_config

log = logging.getLogger(__name__)


class KLExceeded(AlignError, RuntimeError):
    """The policy moved further from the reference than grpo.max_kl allows."""


def run(recipe: Recipe) -> dict[str, Any]:
    """Train, evaluate before and after, save; returns the results written to lineage.json."""
    _check(recipe)
    cfg = recipe.grpo
    run_dir = RunDir(recipe, "grpo")
    init = init_adapter(recipe, "grpo")
    rules = {i: reward_function(spec) for i, spec in enumerate(cfg.rewards) if spec.name != "reward_model"}
    reward_checkpoints = {i: _reward_checkpoint(recipe, spec) for i, spec in enumerate(cfg.rewards)
                          if spec.name == "reward_model"}
    tokenizer = load_tokenizer(recipe.model)
    train, held_out, reports = load_train_eval(recipe.data.prompts, load_prompts, recipe.data, tokenizer,
                                               cfg.max_length - cfg.max_completion_length, what="prompts")
    model = _policy(recipe, init)
    rewards = [rules.get(i) or reward_function(spec, _scorer(recipe, spec, reward_checkpoints[i], model))
               for i, spec in enumerate(cfg.rewards)]
    run_dir.start(
        base_model=model_identity(recipe.model), data=[r.summary() for r in reports],
        parent=str(init) if init else None,
        reference=f"the starting adapter {init}, frozen" if init else "the base model (fresh adapter's frozen copy)",
        rewards=[{"name": s.name, "weight": s.weight, "args": dict(s.args),
                  **({"checkpoint": str(reward_checkpoints[i])} if i in reward_checkpoints else {})}
                 for i, s in enumerate(cfg.rewards)],
    )
    trainer, guard = _trainer(recipe, model, tokenizer, train, held_out, rewards, run_dir)

    before = _evaluate(trainer, held_out, rewards, recipe, "before")
    start = time.monotonic()
    train_output = trainer.train()
    seconds = time.monotonic() - start
    guard.raise_if_exceeded()
    after = _evaluate(trainer, held_out, rewards, recipe, "after")

    with run_dir.checkpoint() as staging:
        # The policy adapter only: TRL's "ref" copy and the reward adapter are not part of the result.
        trainer.model.save_pretrained(str(staging), selected_adapters=["default"])
        trainer.processing_class.save_pretrained(str(staging))
    results = {"train_loss": train_output.training_loss, "init_from": str(init) if init else None,
               "steps": trainer.state.global_step, "train_seconds": round(seconds, 1),
               "kl_first": guard.first, "kl_last": guard.last, "kl_max": guard.max,
               "before": before, "after": after, "checkpoint": str(run_dir.checkpoint_path),
               "run_dir": str(run_dir.path)}
    _write_samples(run_dir, before, after)
    run_dir.finish(results)
    return results


def _check(recipe: Recipe) -> None:
    """Settings that cannot work, refused before anything loads."""
    cfg = recipe.grpo
    if cfg is None:
        raise RecipeError("the recipe has no grpo section; add one (see recipes/quickstart.yaml)")
    if not cfg.rewards:
        raise RecipeError("grpo.rewards is empty; list at least one reward, e.g. "
                          "grpo.rewards=[{name: reward_model}] (see docs/rewards.md)")
    if cfg.max_completion_length >= cfg.max_length:
        raise RecipeError(f"grpo.max_completion_length={cfg.max_completion_length} leaves no room for the prompt in "
                          f"grpo.max_length={cfg.max_length}")
    per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    if per_step % cfg.num_generations:
        raise RecipeError(f"grpo.per_device_train_batch_size x gradient_accumulation_steps = {per_step} completions "
                          f"per step is not a multiple of grpo.num_generations={cfg.num_generations}; every prompt's "
                          "group must be complete")
    if cfg.use_vllm:
        if recipe.model.quantization == Quantization.nf4:
            raise RecipeError("grpo.use_vllm=true with model.quantization=nf4: vLLM cannot load a bitsandbytes 4-bit "
                              "policy with its LoRA adapter (an open upstream failure); set grpo.use_vllm=false, or "
                              "model.quantization=none if the full-precision base fits")
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise RecipeError("grpo.use_vllm=true, but vllm is not installed (pip install vllm)") from None


def _reward_checkpoint(recipe: Recipe, spec) -> Path:
    """The reward stage checkpoint a reward_model reward uses: args.checkpoint, or this recipe's (auto)."""
    check_reward_model_args(spec.args)
    choice = spec.args.get("checkpoint", "auto")
    setting = f"reward 'reward_model' (args.checkpoint={choice})"
    if choice == "auto":
        return finished_checkpoint(recipe, "reward", setting, "or set its args.checkpoint=<dir>")
    return adapter_dir(choice, setting, "not a reward stage checkpoint")


def _policy(recipe: Recipe, init: Path | None):
    """The policy as a PeftModel: base + the starting adapter (trainable), or + a fresh adapter. A PeftModel
    before the trainer exists, in both cases, so that a reward model can share its base (and TRL's reference is
    always its frozen copy of the starting adapter: a fresh adapter's LoRA update is zero, so it is the base)."""
    from peft import PeftModel, get_peft_model
    from transformers import set_seed

    set_seed(recipe.run.seed)  # a fresh adapter's initial weights
    model = load_model(recipe.model, activation_checkpointing=recipe.grpo.activation_checkpointing)
    if init is None:
        log.info("grpo: no SFT adapter to start from: the policy is a fresh LoRA adapter, and the reference is the "
                 "base model (a frozen copy of that adapter, whose LoRA update is zero)")
        return get_peft_model(model, lora_config(recipe.lora))
    log.info("grpo: the policy starts from %s; the reference is a frozen copy of it", init)
    return PeftModel.from_pretrained(model, str(init), is_trainable=True)


def _scorer(recipe: Recipe, spec, checkpoint: Path, policy):
    args = spec.args
    return reward_model_scorer(checkpoint, recipe.model, policy=policy, share_base=args.get("share_base", "auto"),
                               batch_size=args.get("batch_size", recipe.grpo.per_device_eval_batch_size))


def _trainer(recipe: Recipe, model, tokenizer, train, held_out, rewards: list[RewardFunc],
             run_dir: RunDir):
    from trl import GRPOConfig, GRPOTrainer

    cfg = recipe.grpo
    args = trl_config(GRPOConfig, cfg, recipe, run_dir, has_eval=held_out is not None,
                      # Dropout would make even the first KL non-zero; logging the first step alone records the
                      # KL before any update.
                      defaults={"disable_dropout": True, "logging_first_step": True},
                      reward_weights=[r.weight for r in rewards])
    guard = KLGuard(cfg.max_kl)
    exact = trainable_weights(model)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=rewards,
        args=args,
        train_dataset=train,
        eval_dataset=held_out,
        processing_class=tokenizer,
        callbacks=[MetricsCallback(run_dir)],
    )
    trainable_in_compute_dtype(trainer.model, recipe.model, exact)
    return trainer, guard.attach(trainer)


class KLGuard(ProgressBar):
    """The progress bar with KL and reward beside it; stops training when the logged KL exceeds `max_kl`.
    The first logged KL is measured before the first update, where it must be ~0; more means the reference
    is not the policy the run started from."""

    def __init__(self, max_kl: float | None):
        super().__init__("kl", "reward")
        self.max_kl = max_kl
        self.first = self.last = self.max = None
        self.exceeded: str | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        super().on_log(args, state, control, logs=logs, **kwargs)
        if not logs or logs.get("kl") is None:
            return
        kl = logs["kl"]
        if self.first is None:
            self.first = kl
            if kl > 1e-4:
                log.warning("the KL to the reference is %.3g at the first step, before any update; it should be ~0: "
                            "the reference is not the policy this run started from", kl)
        self.last, self.max = kl, max(kl, self.max or kl)
        if self.max_kl is not None and kl > self.max_kl:
            self.exceeded = (f"the KL to the reference reached {kl:.4g} at step {state.global_step}, above "
                             f"grpo.max_kl={self.max_kl:g}: the policy is drifting away from the SFT policy. Lower "
                             "grpo.learning_rate, raise grpo.beta, or raise grpo.max_kl if this is intended")
            control.should_training_stop = True

    def raise_if_exceeded(self) -> None:
        if self.exceeded:
            raise KLExceeded(self.exceeded + " (no checkpoint written; metrics.jsonl has the run's curve)")


def _evaluate(trainer, held_out, rewards: list[RewardFunc], recipe: Recipe, when: str) -> dict[str, Any]:
    """The first held-out prompts answered greedily, and `eval_samples` times each with the training sampling
    settings (the expected reward is what GRPO maximises; a greedy answer can flip on a small change), each
    answer scored by every reward function and their weighted sum."""
    cfg = recipe.grpo
    n = min(cfg.eval_generations, len(held_out)) if held_out is not None else 0
    if not n:
        return {}
    rows = held_out.select(range(n))
    columns = {k: rows[k] for k in rows.column_names if k != "prompt"}
    greedy, scores, totals, answers = _score(trainer, rows["prompt"], columns, rewards, cfg, f"{when}, greedy")
    result: dict[str, Any] = {"prompts": n, "greedy": greedy}
    if cfg.eval_samples:
        args = trainer.args
        sampling = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "min_p": args.min_p,
                    "repetition_penalty": args.repetition_penalty}
        k = cfg.eval_samples
        result["sampled"] = _score(trainer, rows["prompt"], columns, rewards, cfg, f"{when}, {k} sampled each",
                                   sampling=sampling, per_prompt=k)[0]
        result["sampled"]["per_prompt"] = k
    result["samples"] = [{"prompt": p[-1]["content"], "completion": a, "reward": t,
                          "rewards": {name: values[i] for name, values in scores.items()},
                          "columns": {c: v[i] for c, v in columns.items()}}  # apart: a column may be named 'answer'
                         for i, (p, a, t) in enumerate(zip(rows["prompt"], answers, totals))]
    trainer.log({f"eval_{decoding}_{key}": value for decoding in ("greedy", "sampled")
                 for key, value in result.get(decoding, {}).items()})
    for decoding in ("greedy", "sampled"):
        if decoding in result:
            log.info("%s training, %s: %d held-out prompts, mean reward %.4f (%s)", when, decoding, n,
                     result[decoding]["reward_mean"], ", ".join(f"{k.split('/')[1]} {v:.4f}" for k, v in
                                                                 result[decoding].items() if k.startswith("rewards/")))
    return result


def _score(trainer, prompts, columns, rewards, cfg, desc, sampling=None, per_prompt=1):
    """Answers to `prompts` (`per_prompt` each), every reward and the weighted total: (summary, per-reward
    scores, totals, answers)."""
    answers, answer_ids = generate(trainer.model, trainer.processing_class, prompts,
                                   max_new_tokens=cfg.max_completion_length,
                                   batch_size=max(1, cfg.per_device_eval_batch_size // per_prompt),
                                   desc=f"answering {len(prompts)} held-out prompts ({desc})", with_ids=True,
                                   sampling=sampling, per_prompt=per_prompt)
    repeat = lambda values: [v for v in values for _ in range(per_prompt)]  # noqa: E731
    prompts, columns = repeat(prompts), {k: repeat(v) for k, v in columns.items()}
    completions = [[{"role": "assistant", "content": a}] for a in answers]
    scores = {r.__name__: r(prompts, completions, completion_ids=answer_ids, trainer_state=trainer.state,
                            log_extra=lambda *a, **k: None, log_metric=lambda *a, **k: None, **columns)
              for r in rewards}
    totals = [sum(r.weight * (scores[r.__name__][i] or 0.0) for r in rewards) for i in range(len(answers))]
    summary = {
        "reward_mean": statistics.fmean(totals),
        **{f"rewards/{name}": statistics.fmean(v for v in values if v is not None) for name, values in scores.items()
           if any(v is not None for v in values)},
        "completion_tokens_mean": statistics.fmean(len(ids) for ids in answer_ids),
    }
    return summary, scores, totals, answers


def _write_samples(run_dir: RunDir, before: dict, after: dict) -> None:
    """Held-out answers before and after training, side by side, in samples.jsonl."""
    if not after:
        return
    run_dir.write_samples([
        {"prompt": b["prompt"], "columns": b["columns"], "before": b["completion"], "after": a["completion"],
         "reward_before": b["reward"], "reward_after": a["reward"], "rewards_before": b["rewards"],
         "rewards_after": a["rewards"]}
        for b, a in zip(before.pop("samples"), after.pop("samples"))
    ])
