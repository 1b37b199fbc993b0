"""Every stage align runs, declared once: the CLI's subcommands and their help, `align run`'s order, data checks
and RL choice, the run dir's input keys and upstream stages, compare's and export's notion of a policy, the memory
settings an error suggests, and the printed summaries are all read from here.

A stage is a module `align.stages.<name>` with this public protocol:
- `check(recipe)`: refuse, before anything loads or trains, what the stage would refuse later (settings,
  reward functions, a starting point no stage provides); nothing is read but the recipe and the run dir;
- `load_data(recipe, tokenizer) -> (train, held_out, reports)`: read and validate its data files;
- `run(recipe, *, resume=False) -> results`: train, evaluate before and after, save; the results are what
  lineage.json records (`checkpoint`, `run_dir`, `before`, `after`, ...);
- `summary(results) -> align.summary.Summary`: what the CLI prints about those results.
Its `build_trainer(recipe, model, tokenizer, ...)` is public too: the trainer `run` trains with (TRL's, or
align's PPO loop), built and configured but not started, for tests and for users who drive it themselves.
Adding a stage: the module, its recipe section (align/recipe.py) and one `Stage` entry below.

Light on purpose (no torch): `align --help` reads it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

BATCH = "per_device_train_batch_size (raise gradient_accumulation_steps to keep the batch)"

Curve = tuple[str, tuple[str, ...]]  # a plot in the run report: (title with its unit, metrics.jsonl keys or globs)
TRAINING: tuple[Curve, ...] = (("training loss", ("loss",)), ("learning rate", ("learning_rate",)),
                               ("gradient norm", ("grad_norm",)), ("seconds per step", ("step_seconds",)))


@dataclass(frozen=True)
class Stage:
    name: str  # the subcommand, the recipe section and the run dir's folder
    help: str  # one line in `align --help`
    description: str  # `align <name> --help`
    data: str  # the data.<section> it trains on: sft, preference, prompts
    keys: tuple[str, ...]  # recipe keys its result depends on besides the shared ones (rundir.stage_inputs)
    upstream: tuple[str, ...] = ()  # stages it starts from or is scored by, earliest first
    policy: bool = False  # its checkpoint is a causal-LM policy adapter (compare, export)
    final: bool = False  # one of the alternatives for the last step of `align run` (rl.algorithm)
    reference: bool = False  # trained against a frozen copy of the policy it started from (compare's KL)
    generates: bool = False  # samples completions while training (memory estimate, the prompt it renders)
    generation_batch: str = "per_device_train_batch_size"  # the setting that sizes a generation batch
    head: str = "lm"  # the head it trains: lm (a policy's logits) or score (a reward model's one output)
    adapters: int = 1  # LoRA adapters on the base while it trains (memory estimate)
    trained_adapters: int = 1
    memory_settings: tuple[str, ...] = (BATCH, "max_length", "activation_checkpointing=true",
                                        "per_device_eval_batch_size")  # what to lower, biggest saving first
    curves: tuple[Curve, ...] = TRAINING  # what the run report draws against the step (align.run_report)
    held_out: tuple[str, ...] = ()  # held-out metrics logged during training, drawn as points (eval_ keys)

    @property
    def module(self) -> ModuleType:
        return importlib.import_module(f"align.stages.{self.name}")


STAGES: tuple[Stage, ...] = (
    Stage(
        "sft", data="sft", keys=("sft", "data.sft"), policy=True,
        curves=(*TRAINING, ("token accuracy on training answers", ("mean_token_accuracy",))),
        held_out=("eval_loss", "eval_answer_accuracy"),
        help="supervised fine-tuning with LoRA (loss on answers only)",
        description="Fine-tune the recipe's base model on question-answer pairs with LoRA; the loss is on the "
        "answer tokens only. Writes runs/<run>/sft/ (config.yaml, lineage.json, metrics.jsonl, checkpoint/).",
    ),
    Stage(
        "reward", data="preference", keys=("reward", "data.preference", "data.pair_rule"), upstream=("sft",),
        head="score",
        curves=(*TRAINING, ("pair accuracy on training batches", ("accuracy",)),
                ("mean margin chosen - rejected", ("margin",))),
        held_out=("eval_pair_accuracy", "eval_margin_mean"),
        help="train a pairwise reward model (LoRA + score head) on preference data",
        description="Train a reward model on chosen/rejected pairs (or rated responses) with TRL's RewardTrainer: "
        "the recipe's base model with a LoRA adapter (from the SFT stage's by default) and a one-output score "
        "head. Reports held-out pairwise accuracy, mean margin and reward mean/std before and after. Writes "
        "runs/<run>/reward/ (config.yaml, lineage.json, metrics.jsonl, samples.jsonl, checkpoint/).",
    ),
    Stage(
        "grpo", data="prompts", keys=("grpo", "data.prompts"), upstream=("sft", "reward"), policy=True, final=True,
        reference=True, generates=True, adapters=2,
        curves=(*TRAINING, ("mean reward per function", ("rewards/*/mean", "reward")),
                ("KL to the reference (nats per token)", ("kl",)),
                ("completion length (tokens)", ("completions/mean_length",)),
                ("fractions of completions: clipped at the length limit, ended at EOS",
                 ("completions/clipped_ratio", "eos_fraction"))),
        held_out=("eval_greedy_reward_mean", "eval_sampled_reward_mean"),
        memory_settings=("per_device_train_batch_size (raise gradient_accumulation_steps to keep the prompts per "
                         "step)", "num_generations", "max_completion_length", "activation_checkpointing=true",
                         "per_device_eval_batch_size"),
        help="optimise the SFT policy with GRPO against reward functions, with a KL penalty to the SFT policy",
        description="Reinforcement learning with TRL's GRPOTrainer: completions sampled per prompt, scored by the "
        "recipe's reward functions (reward model, rules, plug-ins; grpo.rewards), and the policy (the SFT adapter "
        "on the 4-bit base) pushed towards the better ones, minus grpo.beta x KL to the frozen SFT policy. "
        "Reports held-out greedy answers' rewards before and after and the KL per step. Writes runs/<run>/grpo/.",
    ),
    Stage(
        "ppo", data="prompts", keys=("ppo", "data.prompts"), upstream=("sft", "reward"), policy=True, final=True,
        reference=True, generates=True, generation_batch="per_device_eval_batch_size", adapters=4,
        trained_adapters=2,
        curves=(("policy and value loss", ("policy_loss", "value_loss")), ("learning rate", ("learning_rate",)),
                ("seconds per step", ("step_seconds",)), ("mean reward per function", ("rewards/*", "score")),
                ("KL to the reference (nats per answer)", ("kl",)), ("completion length (tokens)", ("completion_length",)),
                ("fractions: answers ended at EOS, clipped policy updates", ("eos_fraction", "clipfrac"))),
        held_out=("eval_greedy_reward_mean", "eval_sampled_reward_mean"),
        memory_settings=("per_device_train_batch_size (raise gradient_accumulation_steps to keep the rollout)",
                         "per_device_eval_batch_size (the generation batch)", "max_completion_length",
                         "activation_checkpointing=true"),
        help="optimise the SFT policy with PPO (value model, per-token KL penalty to the SFT policy)",
        description="Reinforcement learning with align's PPO loop (TRL has no PPOTrainer): one completion sampled "
        "per prompt and scored by the recipe's reward functions (ppo.rewards); per-token rewards -ppo.beta x "
        "(log pi - log pi_ref) plus the score at the last token; GAE advantages from a value model (by default "
        "the reward model when it is the whole score); clipped policy and value losses over several epochs per "
        "rollout. Policy, reference, reward and value models are adapters on one 4-bit base. Reports held-out "
        "rewards before and after and the KL per step. Writes runs/<run>/ppo/ (checkpoint/ = policy adapter, "
        "checkpoint/value/ = value model).",
    ),

    Stage(
        "dpo", data="preference", keys=("dpo", "data.preference", "data.pair_rule", "data.prompts.eval"),
        upstream=("sft",), policy=True, final=True, reference=True, adapters=2,
        curves=(*TRAINING, ("implicit reward margin chosen - rejected", ("rewards/margins",)),
                ("implicit rewards beta x log-ratio to the reference", ("rewards/chosen", "rewards/rejected")),
                ("pair accuracy on training batches", ("rewards/accuracies",))),
        help="optimise the SFT policy on preference pairs with DPO (no reward model; the SFT policy as reference)",
        description="Direct preference optimisation with TRL's DPOTrainer on the data.preference pairs: the "
        "policy (the SFT adapter on the 4-bit base) raises the implicit reward dpo.beta x (log pi - log pi_ref) of "
        "each chosen answer above its rejected one's, against a frozen copy of the SFT adapter on the same base. "
        "Reports the implicit-reward accuracy on held-out pairs and the held-out prompts' greedy answers scored by "
        "dpo.rewards, before and after. Writes runs/<run>/dpo/.",
    ),
    Stage(
        "kto", data="feedback", keys=("kto", "data.feedback", "data.prompts.eval"), upstream=("sft",), policy=True,
        final=True, reference=True, adapters=2,
        curves=(*TRAINING, ("implicit rewards beta x log-ratio to the reference", ("rewards/chosen", "rewards/rejected")),
                ("KL estimate to the reference (nats per answer)", ("kl",))),
        help="optimise the SFT policy on answers labelled good or bad with KTO (no pairs, no reward model)",
        description="Kahneman-Tversky optimisation with TRL's KTOTrainer on data.feedback (a prompt, one answer "
        "and a true/false label per row): the policy (the SFT adapter on the 4-bit base) raises the implicit "
        "reward kto.beta x (log pi - log pi_ref) of good answers and lowers that of bad ones, against a frozen copy "
        "of the SFT adapter on the same base. Reports the implicit rewards on held-out labelled answers and the "
        "held-out prompts' greedy answers scored by kto.rewards, before and after. Writes runs/<run>/kto/.",
    ),
)

BY_NAME = {stage.name: stage for stage in STAGES}
FINAL = tuple(stage.name for stage in STAGES if stage.final)


def stage(name: str) -> Stage:
    """The stage called `name`; a KeyError names the stages there are."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"no stage {name!r}; the stages are {', '.join(BY_NAME)}") from None
