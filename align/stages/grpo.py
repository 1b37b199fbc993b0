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
import time
from typing import Any

from align import rl
from align.generation import merged_weights
from align.modeling import load_tokenizer, trainable_in_float32, trainable_weights
from align import memory
from align.recipe import Quantization, Recipe, RecipeError
from align.rewards import RewardFunc
from align.callbacks import MetricsCallback, ProgressBar, eos_fraction, guarded_train
from align.summary import rl_summary
from align.rundir import RunDir, model_identity
from align.processes import check_identical, is_main_process
from align.stages import batch, exclusive, init_adapter, trl_config
from align.styles import load_style

log = logging.getLogger(__name__)


@exclusive("grpo")
def run(recipe: Recipe, *, resume: bool = False) -> dict[str, Any]:
    """Train, evaluate before and after, save; returns the results written to lineage.json. With `resume`,
    carry on from the stage's last complete trainer checkpoint, if there is one."""
    check(recipe)
    cfg = recipe.grpo
    run_dir = RunDir(recipe, "grpo")
    init = init_adapter(recipe, "grpo")
    specs = rl.RewardSpecs(recipe, cfg)
    tokenizer = load_tokenizer(recipe.model)
    train, held_out, reports = load_data(recipe, tokenizer)
    memory.check(recipe, "grpo", reports[0])  # before a model loads: a batch that cannot fit stops now
    model = rl.load_policy(recipe, cfg, init, "grpo")
    rewards = specs.functions(model)
    resume_from = run_dir.resume_from() if resume else None
    trainer, guard = build_trainer(recipe, model, tokenizer, train, held_out, rewards, run_dir)
    run_dir.start(base_model=model_identity(recipe.model), data=[r.summary() for r in reports],
                  parent=str(init) if init else None, reference=rl.reference_description(init),
                  rewards=specs.lineage(), resumed_from=resume_from)
    if resume_from:  # the KL the interrupted run logged up to its checkpoint: the first one is before any update
        guard.restore([record["kl"] for record in run_dir.logged() if "kl" in record])

    before = run_dir.evaluated_before(lambda: _evaluate(trainer, held_out, rewards, recipe, "before"))
    start = time.monotonic()
    train_output = guarded_train(trainer, "grpo", resume_from_checkpoint=resume_from)
    seconds = time.monotonic() - start
    guard.raise_if_exceeded()
    after = _evaluate(trainer, held_out, rewards, recipe, "after")

    checksums = check_identical(trainer.model, "grpo")
    with run_dir.checkpoint() as staging:
        if is_main_process():
            # The policy adapter only: TRL's "ref" copy and the reward adapter are not part of the result.
            trainer.model.save_pretrained(str(staging), selected_adapters=["default"])
            trainer.processing_class.save_pretrained(str(staging))
    return rl.finish(run_dir, init=init, resume_from=resume_from, steps=trainer.state.global_step, seconds=seconds,
                     kl=(guard.first, guard.last, guard.max), before=before, after=after,
                     train_loss=train_output.training_loss, eos_fraction_last=guard.eos_fraction,
                     kl_unit="nats per token", **batch(trainer), rank_checksums=checksums)


def load_data(recipe: Recipe, tokenizer):
    """Validated train and held-out prompts (held-out None when data.prompts.eval is unset) and their reports."""
    return rl.load_prompt_data(recipe, recipe.grpo, tokenizer)


summary = rl_summary  # the stage protocol's summary(results): where it started, the KL, rewards before and after

def check(recipe: Recipe, upcoming: tuple[str, ...] = ()) -> None:
    """Settings that cannot work, refused before anything loads (`upcoming`: stages `align run` trains first)."""
    cfg = rl.check_section(recipe, "grpo", upcoming)
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


def build_trainer(recipe: Recipe, model, tokenizer, train, held_out, rewards: list[RewardFunc],
                  run_dir: RunDir):
    """TRL's GRPOTrainer (align's subclass) on the policy `model`, with its reference a frozen copy of the adapter
    it starts from, and the KL guard; (trainer, guard)."""
    from trl import GRPOConfig

    cfg = recipe.grpo
    args = trl_config(GRPOConfig, cfg, recipe, run_dir, has_eval=held_out is not None,
                      # Dropout would make even the first KL non-zero; logging the first step alone records the
                      # KL before any update.
                      defaults={"disable_dropout": True, "logging_first_step": True},
                      reward_weights=[r.weight for r in rewards])
    guard = KLGuard(cfg.max_kl)
    exact = trainable_weights(model)
    trainer = _grpo_trainer_class()(
        model=model,
        reward_funcs=rewards,
        args=args,
        train_dataset=train,
        eval_dataset=held_out,
        processing_class=tokenizer,
        callbacks=[MetricsCallback(run_dir)],
    )
    trainable_in_float32(trainer.model, recipe.model, exact)
    return trainer, guard.attach(trainer)


def _grpo_trainer_class():
    from trl import GRPOTrainer

    class AlignGRPOTrainer(GRPOTrainer):
        """TRL's GRPOTrainer, generating its rollouts on merged dense weights (generation.merged_weights, on a CPU
        by default): the one change to TRL's loop."""

        def _generate_single_turn(self, *args, **kwargs):
            with merged_weights(self.accelerator.unwrap_model(self.model)):
                return super()._generate_single_turn(*args, **kwargs)

    return AlignGRPOTrainer


class KLGuard(ProgressBar):
    """The progress bar with KL and reward beside it; stops training when the logged KL exceeds `max_kl`.
    The first logged KL is measured before the first update, where it must be ~0; more means the reference
    is not the policy the run started from."""

    def __init__(self, max_kl: float | None):
        super().__init__("kl", "reward")
        self.max_kl = max_kl
        self.first = self.last = self.max = None
        self.eos_fraction: float | None = None  # of the last logged rollouts
        self.exceeded: str | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        super().on_log(args, state, control, logs=logs, **kwargs)
        if logs and eos_fraction(logs) is not None:
            self.eos_fraction = eos_fraction(logs)
        if not logs or logs.get("kl") is None:
            return
        kl = logs["kl"]
        if self.first is None:
            self.first = kl
            rl.warn_if_first_kl_not_zero(kl)
        self.last, self.max = kl, max(kl, self.max or kl)
        if self.max_kl is not None and kl > self.max_kl:
            self.exceeded = (f"the KL to the reference reached {kl:.4g} at step {state.global_step}, above "
                             f"grpo.max_kl={self.max_kl:g}: the policy is drifting away from the SFT policy. Lower "
                             "grpo.learning_rate, raise grpo.beta, or raise grpo.max_kl if this is intended")
            control.should_training_stop = True

    def restore(self, logged: list[float]) -> None:
        """Carry on from the KL values an interrupted run logged (none: a new run)."""
        if logged:
            self.first, self.last, self.max = logged[0], logged[-1], max(logged)

    def raise_if_exceeded(self) -> None:
        if self.exceeded:
            raise rl.KLExceeded(self.exceeded + " (no checkpoint written; metrics.jsonl has the run's curve)")


def _evaluate(trainer, held_out, rewards: list[RewardFunc], recipe: Recipe, when: str) -> dict[str, Any]:
    args = trainer.args
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "min_p": args.min_p,
                "repetition_penalty": args.repetition_penalty}
    return rl.evaluate(trainer.model, trainer.processing_class, held_out, rewards, recipe.grpo, when,
                       sampling=sampling, trainer_state=trainer.state, log_metrics=trainer.log,
                       style=load_style(recipe.data.answer_style))
