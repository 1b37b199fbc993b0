"""Recipe schema: one typed dataclass per section, loaded from YAML and `key=value` overrides by OmegaConf.

A recipe file mirrors `Recipe` one to one. Every field carries its help text in `metadata["help"]`, which
`align <stage> --help` prints. Stage sections hold the TRL config fields align sets defaults for (same names as
in `trl.SFTConfig` etc., passed straight through by `trainer_kwargs`), a few align-only fields, and
`trainer_args` for any other field of the TRL config class.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from align.data.files import FORMATS
from align.data.names import auto_detected
from align.errors import AlignError
from align.registry import FINAL


class RecipeError(AlignError, ValueError):
    """A recipe or override that does not fit the schema; the message says where and how to fix it."""


def doc(default: Any = MISSING, help: str = "") -> Any:
    """A dataclass field with its help text; a list/dict/dataclass default is given as a factory."""
    if callable(default) and not isinstance(default, Enum):
        return field(default_factory=default, metadata={"help": help})
    return field(default=default, metadata={"help": help})


class Quantization(Enum):
    nf4 = "nf4"
    none = "none"


class DType(Enum):
    auto = "auto"
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


@dataclass
class ModelConfig:
    name_or_path: str = doc(help="Hugging Face model id (e.g. Qwen/Qwen2.5-0.5B) or local model directory.")
    revision: Optional[str] = doc(None, help="Hub revision (branch, tag or commit) to load; recorded in lineage.")
    quantization: Quantization = doc(
        Quantization.nf4,
        help="nf4: 4-bit NormalFloat base with double quantisation (bitsandbytes; QLoRA). "
        "none: full-precision base in compute_dtype.",
    )
    compute_dtype: DType = doc(
        DType.auto,
        help="Dtype of activations (and of the base weights when quantization=none). auto: bfloat16 on a GPU "
        "that supports it, else float16 on GPU; on a CPU bfloat16 where lscpu lists amx_bf16 (AMX units: "
        "a bf16 matmul ~6x a float32 one there), else float32 (without them bf16 is slower). On a CPU in "
        "bfloat16 the LoRA weights and optimizer stay float32 and the forward runs under autocast. The choice "
        "and its reason are logged.",
    )
    attn_implementation: Optional[str] = doc(None, help="sdpa, eager, flash_attention_2, ...; None: transformers' default.")
    merged_generation: Optional[bool] = doc(
        None,
        help="Generate (rollouts, evaluations) with dense weights: each 4-bit layer dequantised and the active LoRA "
        "adapter merged in, once per generate call, instead of dequantising and running the adapter on every "
        "token. The same function (up to rounding in compute_dtype); costs one dense copy of the linear weights "
        "while generating (2 bytes a parameter in bf16, 4 in fp32). None (auto): on a CPU, where it makes "
        "generation several times faster; off on a GPU, where that copy would take the memory 4-bit saves.",
    )
    chat_template: Optional[str] = doc(
        None,
        help="Jinja chat template (inline text or a .jinja file). None: the tokenizer's own, or align's plain "
        "'User:/Assistant:' template when the base model has none.",
    )
    trust_remote_code: bool = doc(False, help="Allow model code from the hub repository to run.")


@dataclass
class LoraConfig:
    r: int = doc(16, help="Rank of the LoRA update; higher = more capacity and memory.")
    alpha: int = doc(32, help="LoRA scaling numerator (update is scaled by alpha/r).")
    dropout: float = doc(0.05, help="Dropout on the LoRA input.")
    target_modules: str = doc(
        "all-linear", help="'all-linear' (every linear layer but the output head) or comma-separated module names."
    )


class ChoiceKind(Enum):
    index = "index"
    first_better = "first_better"


@dataclass
class Columns:
    prompt: Optional[str] = doc(None, help=f"Column with the question/prompt (text or messages). {auto_detected('prompt')}")
    completion: Optional[str] = doc(
        None, help=f"Column with the answer (text or assistant messages). {auto_detected('completion')}")
    messages: Optional[str] = doc(
        None, help=f"Column with a conversation (list of {{role, content}}). {auto_detected('messages')}")
    chosen: Optional[str] = doc(
        None, help=f"Preference data: the better answer (text or messages). {auto_detected('chosen')}")
    rejected: Optional[str] = doc(
        None, help=f"Preference data: the worse answer (text or messages). {auto_detected('rejected')}")
    responses: Any = doc(
        None, help="Rated preference data: the column of responses, a list per row or one per row (rows grouped by "
        f"prompt). {auto_detected('responses')} Or two answer columns, [first, second], that data.columns.choice "
        "chooses between (PKU-SafeRLHF: [response_0, response_1]).")
    scores: Optional[str] = doc(
        None, help="Rated preference data: numeric score of each response (higher is better), a list per row or "
        f"one per row. {auto_detected('scores')}")
    choice: Optional[str] = doc(
        None, help="Two answers and a choice: the column saying which of the two data.columns.responses is better "
        "(its meaning: data.columns.choice_kind). Never auto-detected: the same 0/1 means opposite things in "
        "different files.")
    choice_kind: ChoiceKind = doc(
        ChoiceKind.index, help="What data.columns.choice holds: index (0 or A: the first answer is better, 1 or B: "
        "the second; PKU-SafeRLHF's better_response_id) or first_better (1, true or A: the first answer is better; "
        "Stanford SHP's labels).")
    score_chosen: Optional[str] = doc(
        None, help="Preference pairs: a score of the chosen answer; with data.columns.score_rejected, their "
        "difference is a margin the reward model's loss keeps between chosen and rejected (TRL's margin). Opt-in.")
    score_rejected: Optional[str] = doc(None, help="Preference pairs: a score of the rejected answer (see "
                                        "data.columns.score_chosen).")
    label: Optional[str] = doc(
        None, help=f"Unpaired feedback (KTO): true for a good answer, false for a bad one. {auto_detected('label')}")
    ignore: List[str] = doc(
        list, help="Columns that are informational (ids, sources, categories): not used and not warned about; "
        "listed as ignored in align data check and lineage.json.")
    input: Optional[str] = doc(
        None, help="Alpaca: extra input joined to the prompt text after a newline (instruction + '\\n' + input) "
        f"when not empty. {auto_detected('input')}")
    system: Optional[str] = doc(None, help=f"A per-row system message put before the prompt. {auto_detected('system')}")
    history: Optional[str] = doc(
        None, help=f"Alpaca: earlier turns before the prompt, a list of [user, assistant] pairs. {auto_detected('history')}")
    role_key: Optional[str] = doc(
        None, help="Conversations: the key of each message's role (ShareGPT: from). None: auto-detect (role, from).")
    content_key: Optional[str] = doc(
        None, help="Conversations: the key of each message's text (ShareGPT: value). None: auto-detect (content, "
        "value, text).")
    user_tag: Optional[str] = doc(None, help="Conversations: the role value of user turns. None: user or human.")
    assistant_tag: Optional[str] = doc(
        None, help="Conversations: the role value of assistant turns. None: assistant, gpt, bot, model or chatgpt.")
    system_tag: Optional[str] = doc(None, help="Conversations: the role value of system turns. None: system.")
    transcript_user: str = doc(
        "Human:", help="Transcripts (Anthropic HH): the marker that opens a user turn, after a blank line.")
    transcript_assistant: str = doc(
        "Assistant:", help="Transcripts (Anthropic HH): the marker that opens an assistant turn, after a blank line.")


@dataclass
class DataFiles:
    train: Optional[str] = doc(None, help=f"Training data: {FORMATS}; a hub split as 'owner/name:test' (default train), a config and split as 'owner/name:main:test'.")
    eval: Optional[str] = doc(None, help="Held-out data in the same forms (optional; enables the before/after evaluation).")


class PairRule(Enum):
    best_vs_rest = "best_vs_rest"
    best_vs_worst = "best_vs_worst"


@dataclass
class DataConfig:
    sft: DataFiles = doc(DataFiles, help="Question-answer pairs for the SFT stage.")
    preference: DataFiles = doc(
        DataFiles, help="Preference data for the reward stage: chosen/rejected pairs (text or conversations), or "
        "rated responses (see docs/data.md).")
    feedback: DataFiles = doc(
        DataFiles, help="Unpaired feedback for the KTO stage: a prompt, one answer and a label (true: good, false: "
        "bad) per row (see docs/data.md).")
    prompts: DataFiles = doc(
        DataFiles, help="Prompts for the RL stages (a prompt column, text or messages). Every other column (e.g. a "
        "reference answer) is passed to the reward functions under its own name.")
    columns: Columns = doc(Columns, help="Which column holds which field; unset ones are auto-detected and logged.")
    pair_rule: PairRule = doc(
        PairRule.best_vs_rest,
        help="How rated responses become pairs: best_vs_rest pairs the best-scored response with each lower-scored "
        "one; best_vs_worst makes one pair per prompt. Responses tied with the best are dropped and counted.")
    system_prompt: Optional[str] = doc(None, help="System message put before every prompt (same in every stage).")
    skip_invalid: bool = doc(
        False, help="Skip invalid or over-long rows (counted and logged by reason) instead of stopping at them."
    )
    answer_style: Optional[str] = doc(
        None, help="Plug-in 'package.module:function' naming an answer's style (answer text -> a name, e.g. "
        "align.arithmetic:answer_style: worked or direct). Held-out evaluations then report each style's share "
        "(<style>_fraction) and accuracy (<style>_accuracy). None: no styles.")


@dataclass
class RunConfig:
    name: Optional[str] = doc(None, help="Run name; the run dir is <root>/<name>/<stage>. None: the recipe file's name.")
    root: str = doc("runs", help="Directory that holds all runs.")
    seed: int = doc(42, help="Seed for data order, LoRA init and sampling.")
    report_to: List[str] = doc(
        list, help="Experiment trackers every stage also logs to, as transformers' report_to names them: "
        "tensorboard, wandb, trackio, mlflow, ... (each installed separately; tensorboard writes under the stage's "
        "trainer/runs/). Empty: metrics.jsonl only.")


@dataclass
class TrainingStage:
    """Fields every trained stage shares, named as in TRL's configs (passed straight through)."""

    # Optimisation
    learning_rate: float = doc(2e-4, help="Peak learning rate; LoRA tolerates ~10x the full fine-tuning rate.")
    num_train_epochs: float = doc(1.0, help="Passes over the training data (ignored when max_steps > 0).")
    max_steps: int = doc(-1, help="Stop after this many optimizer steps; -1: run num_train_epochs.")
    per_device_train_batch_size: int = doc(8, help="Examples per device per forward pass.")
    gradient_accumulation_steps: int = doc(1, help="Forward passes per optimizer step (effective batch = product).")
    per_device_eval_batch_size: int = doc(16, help="Examples per device per eval forward pass.")
    lr_scheduler_type: str = doc("cosine", help="transformers scheduler name: cosine, linear, constant, ...")
    warmup_steps: float = doc(0.03, help="Warm-up: a number of steps, or a fraction of all steps when < 1.")
    weight_decay: float = doc(0.0, help="AdamW weight decay on the LoRA weights.")
    max_grad_norm: float = doc(1.0, help="Gradient clipping norm.")
    # Sequences
    max_length: int = doc(
        1024, help="Longest prompt+answer in tokens; longer rows are errors (or skipped and counted with data.skip_invalid)."
    )
    activation_checkpointing: bool = doc(
        True, help="Gradient (activation) checkpointing: recompute activations in the backward pass; less memory, slower."
    )
    activation_checkpointing_every_n_layers: int = doc(
        1, help="Checkpoint only every n-th decoder layer; the others keep their activations: more memory, less "
        "recompute (1: every layer).")
    activation_checkpointing_offload: bool = doc(
        False, help="Keep the checkpointed activations in pinned CPU memory: less GPU memory at long sequences, "
        "slower steps.")
    # Logging and saving
    logging_steps: int = doc(10, help="Log loss and learning rate every N steps (metrics.jsonl, progress bar).")
    eval_steps: Optional[int] = doc(None, help="Also evaluate every N steps; None: only before and after training.")
    save_steps: int = doc(500, help="Write a resumable trainer checkpoint every N steps.")
    save_total_limit: int = doc(2, help="Keep at most this many resumable trainer checkpoints.")


@dataclass
class TRLStage(TrainingStage):
    """A stage run by a TRL trainer: any other field of its TRL config passes through."""

    trainer_args: Dict[str, Any] = doc(
        dict, help="Any other field of the stage's TRL config (trl.SFTConfig, trl.RewardConfig), passed through "
        "(e.g. {neftune_noise_alpha: 5})."
    )


@dataclass
class SFTStage(TRLStage):
    packing: bool = doc(False, help="Pack several examples into each max_length sequence (faster on short data).")
    eval_loss_rows: Optional[int] = doc(
        None, help="Held-out rows the answer loss is measured on, before and after training: the first N (None: "
        "all). On a CPU each row costs about a third of a training example.")
    # align: greedy answers on held-out prompts, before and after training
    eval_generations: int = doc(64, help="Held-out prompts answered greedily before and after training (0: none).")
    max_new_tokens: int = doc(128, help="Longest generated answer in those evaluations.")


@dataclass
class RewardStage(TRLStage):
    learning_rate: float = doc(1e-4, help="Peak learning rate (TRL's RewardConfig default).")
    center_rewards_coefficient: Optional[float] = doc(
        None, help="Pull the mean reward towards 0 (Eisenstein et al. 2023, eq. 2; 0.01 is usual). None: off."
    )
    init_from: str = doc(
        "auto",
        help="Where the reward model's LoRA starts. auto: the SFT stage's adapter when the recipe has an sft "
        "section, else fresh; sft: the SFT adapter (required); base: a fresh adapter; or a path to a LoRA adapter "
        "directory. The score head always starts fresh.",
    )


@dataclass
class RewardFunction:
    name: str = doc(
        help="reward_model (the reward stage's checkpoint), exact_match, format, length (rules shipped with align), "
        "or a plug-in 'package.module:function' with TRL's reward signature fn(prompts, completions, **kwargs) -> "
        "list[float]. See docs/rewards.md.")
    weight: float = doc(1.0, help="Weight of this reward in the total the policy is optimised for.")
    args: Dict[str, Any] = doc(
        dict, help="Keyword arguments for the function, e.g. exact_match {column: answer}, format {pattern: ...}, "
        "length {max_tokens: 64}, reward_model {checkpoint: auto}.")
    timeout_s: Optional[float] = doc(
        300.0, help="Seconds one call (one batch of completions) may take: a function that has not returned by then "
        "stops the stage, naming it. None: no limit.")


@dataclass
class RLStage(TrainingStage):
    """What the RL stages (GRPO, PPO) share: where the policy starts, what it is rewarded for, how completions
    are sampled, and the held-out evaluation before and after."""

    learning_rate: float = doc(1e-5, help="Peak learning rate (LoRA; TRL's full fine-tuning default is 1e-6).")
    max_length: int = doc(
        512, help="Longest prompt + completion in tokens: prompts longer than max_length - max_completion_length "
        "are errors (or skipped and counted with data.skip_invalid).")
    init_from: str = doc(
        "auto",
        help="Where the policy starts, and so what the frozen reference is. auto: the SFT stage's adapter when "
        "the recipe has an sft section (reference = that SFT policy), else a fresh adapter (reference = the base "
        "model with the adapter off); sft: the SFT adapter (required); base: a fresh adapter; or a path to a LoRA "
        "adapter directory.")
    rewards: List[RewardFunction] = doc(
        list, help="Reward functions, each {name, weight, args}; the policy maximises the weighted sum. name: "
        "reward_model, exact_match, format, length, or a plug-in 'package.module:function' (docs/rewards.md). "
        "Override one entry as <stage>.rewards.0.weight=0.5.")
    max_completion_length: int = doc(256, help="Longest completion in tokens; longer ones are cut.")
    temperature: float = doc(1.0, help="Sampling temperature of the completions.")
    top_p: float = doc(1.0, help="Nucleus sampling of the completions; 1.0: off.")
    eval_generations: int = doc(64, help="Held-out prompts answered greedily and scored before and after (0: none).")
    eval_samples: int = doc(
        4, help="Answers sampled per held-out prompt with the training settings (temperature, top_p), scored "
        "before and after: the expected reward RL maximises (0: greedy answers only).")


@dataclass
class GRPOStage(RLStage, TRLStage):
    per_device_train_batch_size: int = doc(
        8, help="Completions per device per forward pass; the prompts per step are this x devices x "
        "gradient_accumulation_steps / num_generations.")
    beta: float = doc(
        0.04, help="Weight of the KL penalty to the frozen reference policy. TRL's default is 0 (no KL term); "
        "align's is not: the KL term is what keeps the aligned policy close to the SFT policy it started from.")
    max_kl: Optional[float] = doc(
        1.0, help="Stop the run when the logged KL to the reference (mean per completion token, nats) exceeds "
        "this: the policy has run away from the reference. None: no ceiling.")
    num_generations: int = doc(8, help="Completions sampled per prompt (the group whose mean is the baseline).")
    # TRL's defaults for the next three change the loss between releases; align sets each itself (TRL 1.16's value).
    loss_type: str = doc(
        "dapo", help="How per-token losses are averaged (TRL's loss_type). dapo: over every completion token of the "
        "batch (no length bias); grpo: per completion, then over completions (favours short wrong answers); "
        "dr_grpo: divided by max_completion_length (small steps when answers are far shorter than the cap); "
        "bnpo, cispo, sapo, vespo: see TRL's GRPOConfig.")
    scale_rewards: str = doc(
        "group", help="Advantages are reward minus the group's mean, divided by the std of: group (each prompt's "
        "completions; weighs hard and easy prompts alike), batch (the whole batch; Lite PPO), or none (no "
        "division; Dr. GRPO).")
    use_bias_correction_kl: bool = doc(
        True, help="Multiply the KL term by the importance ratio pi/pi_old, so its gradient is unbiased when a "
        "rollout is reused (num_iterations > 1); with one iteration the ratio is 1.")
    use_vllm: bool = doc(
        False, help="Generate with vLLM (must be installed). Not with model.quantization=nf4: vLLM cannot take "
        "a bitsandbytes 4-bit policy.")
    trainer_args: Dict[str, Any] = doc(
        dict, help="Any other field of trl.GRPOConfig, passed through (e.g. {loss_type: grpo, num_iterations: 2}).")


@dataclass
class PPOStage(RLStage):
    """align's own PPO loop (TRL has no PPOTrainer): defaults from InstructGPT and "The N+ implementation details
    of RLHF with PPO" (Huang et al. 2024), as in TRL 0.12's PPOConfig."""

    per_device_train_batch_size: int = doc(
        8, help="Completions per device per PPO forward/backward pass (the micro-batch). A rollout is this x "
        "gradient_accumulation_steps x num_mini_batches prompts per device, one completion each.")
    max_steps: int = doc(-1, help="PPO steps (rollout + update) to run; -1: num_train_epochs passes over the prompts.")
    num_mini_batches: int = doc(1, help="Optimizer steps per PPO epoch: the rollout is split into this many mini-batches. "
                                "(Rollouts are generated per_device_eval_batch_size prompts at a time.)")
    num_ppo_epochs: int = doc(4, help="Passes over each rollout (its mini-batches) before sampling the next.")
    beta: float = doc(
        0.05, help="Initial weight of the per-token KL penalty -beta x (log pi - log pi_ref) added to the rewards "
        "(pi_ref: the frozen reference policy).")
    kl_target: Optional[float] = doc(
        None, help="Adaptive KL controller (Ziegler et al. 2019): adjust beta so that the KL per sequence (nats) "
        "tracks this target. None: beta stays fixed.")
    kl_horizon: int = doc(10000, help="Adaptive KL controller horizon in samples: how fast beta moves.")
    max_kl: Optional[float] = doc(
        20.0, help="Stop the run when the KL to the reference (mean per completion, summed over its tokens, nats) "
        "exceeds this: the policy has run away from the reference. None: no ceiling.")
    gamma: float = doc(1.0, help="Discount factor of the rewards (GAE).")
    lam: float = doc(0.95, help="GAE lambda: bias/variance trade-off of the advantage estimates.")
    cliprange: float = doc(0.2, help="PPO clip range of the policy ratio.")
    cliprange_value: float = doc(0.2, help="Clip range of the value function's change from its rollout values.")
    vf_coef: float = doc(0.1, help="Weight of the value loss against the policy loss.")
    whiten_rewards: bool = doc(False, help="Whiten the per-token rewards before GAE (with the mean kept off).")
    missing_eos_penalty: Optional[float] = doc(
        None, help="Subtract this from the score of a completion that ends without EOS (cut at "
        "max_completion_length); encourages answers that finish. None: no penalty.")
    value_init: str = doc(
        "auto",
        help="Where the value model starts. reward: the reward model's adapter and score head (scaled by the "
        "reward's weight; the reward model must share the policy's base); policy: the policy's starting adapter "
        "with a zero head; or a reward stage checkpoint directory. auto: reward when the reward model is the only "
        "reward, else policy (next to other rewards it predicts the wrong score at the wrong scale).")


@dataclass
class OfflineStage(RLStage, TRLStage):
    """What the stages that learn from preference data without sampling share (DPO, KTO): the implicit reward's
    beta; rewards, max_completion_length, temperature and the eval_* fields only score held-out answers
    (data.prompts.eval) before and after, as GRPO's and PPO's are scored."""

    learning_rate: float = doc(5e-5, help="Peak learning rate (LoRA; TRL's full fine-tuning default is 1e-6).")
    max_length: int = doc(
        512, help="Longest prompt + answer in tokens (a pair's longer side); longer rows are errors (or skipped and "
        "counted with data.skip_invalid).")
    beta: float = doc(
        0.1, help="Inverse temperature of the implicit reward beta x (log pi - log pi_ref): higher keeps the "
        "policy closer to the reference (the SFT policy). TRL's default, set here so an upgrade cannot move it.")
    eval_samples: int = doc(0, help="Answers sampled per held-out prompt at `temperature`, scored before and "
                            "after (0: greedy answers only).")


@dataclass
class DPOStage(OfflineStage):
    """DPO with TRL's DPOTrainer, on the data.preference pairs."""

    loss_type: List[str] = doc(
        lambda: ["sigmoid"], help="TRL's DPO losses: sigmoid (DPO), ipo, hinge, robust, bco_pair, apo_zero, "
        "apo_down, sppo_hard, nca_pair, exo_pair, aot, aot_unpaired, discopop, sigmoid_norm, sft; several are "
        "combined with loss_weights (e.g. [sigmoid, sft] for DPO + NLL).")
    loss_weights: Optional[List[float]] = doc(
        None, help="One weight per loss_type entry; None: 1 each.")
    label_smoothing: float = doc(
        0.0, help="Probability that a pair's label is flipped (conservative DPO, robust); 0: trust the labels.")


@dataclass
class KTOStage(OfflineStage):
    """KTO with TRL's KTOTrainer, on answers labelled good or bad one at a time (data.feedback)."""

    per_device_train_batch_size: int = doc(
        8, help="Answers per device per forward pass; at least 2: KTO's KL estimate pairs each prompt with "
        "another row's answer in the batch.")
    loss_type: str = doc("kto", help="kto (KTO's loss, with its KL reference point), or apo_zero_unpaired.")
    desirable_weight: float = doc(
        1.0, help="Weight of the good answers' losses; with unequal numbers of good and bad answers, weigh them so "
        "that good x desirable_weight / (bad x undesirable_weight) is in [1, 4/3] (the KTO paper).")
    undesirable_weight: float = doc(1.0, help="Weight of the bad answers' losses.")


# auto, or a stage that can end `align run` (align/registry.py)
RLAlgorithm = Enum("RLAlgorithm", {"auto": "auto", **{name: name for name in FINAL}})


@dataclass
class RLChoice:
    """What `align run` does at the RL step."""

    algorithm: RLAlgorithm = doc(
        RLAlgorithm.auto, help=f"The stage that ends `align run`: {', '.join(FINAL)}, or auto: the one the recipe "
        "has a section for (a recipe with several must choose).")
    min_reward_accuracy: float = doc(
        0.6, help="Gate: `align run` does not start RL on a reward model whose held-out pairwise accuracy is below "
        "this (a weak reward model is the usual cause of runaway KL). Applies when the RL rewards include "
        "reward_model; 0: no gate.")
    check_prompt_rendering: bool = doc(
        True, help="Gate: before each stage, `align run` renders one prompt with every stage's settings and stops "
        "with a diff if the token ids differ (chat template, system prompt, generation prompt).")


@dataclass
class Recipe:
    model: ModelConfig = doc(ModelConfig, help="Base model and how it is loaded.")
    lora: LoraConfig = doc(LoraConfig, help="LoRA adapters trained on the frozen base.")
    data: DataConfig = doc(DataConfig, help="Data files, column mapping and validation.")
    run: RunConfig = doc(RunConfig, help="Where runs are written, and the seed.")
    sft: Optional[SFTStage] = doc(None, help="Supervised fine-tuning stage (LoRA, loss on answers only).")
    reward: Optional[RewardStage] = doc(None, help="Reward model stage (pairwise, LoRA + score head).")
    grpo: Optional[GRPOStage] = doc(None, help="GRPO stage (policy LoRA, KL penalty to the frozen SFT policy).")
    ppo: Optional[PPOStage] = doc(None, help="PPO stage (policy and value LoRA, KL penalty to the frozen SFT policy).")
    dpo: Optional[DPOStage] = doc(None, help="DPO stage (policy LoRA trained on preference pairs against the frozen "
                                  "SFT policy; no reward model).")
    kto: Optional[KTOStage] = doc(None, help="KTO stage (policy LoRA trained on answers labelled good or bad "
                                  "against the frozen SFT policy; no reward model).")
    rl: RLChoice = doc(RLChoice, help="`align run`: which RL stage, and the gates before it.")


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    """Recipe from a YAML file (or none: the schema's defaults) plus `key=value` overrides, type-checked."""
    cfg = OmegaConf.structured(Recipe)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"{path}: recipe file not found")
        cfg = _merge(cfg, lambda: _mapping(path), where=str(path))
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} is not key=value (e.g. sft.learning_rate=1e-4)")
        cfg = _override(cfg, item)
    if cfg.run.name is None:
        cfg.run.name = path.stem if path is not None else "align"
    where = path or "command line"
    _refuse_env(OmegaConf.to_container(cfg, resolve=False), where)
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise RecipeError(
                f"{where}: required value {missing[0]} is not set; add it to the recipe or pass {missing[0]}=..."
            )
        recipe = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:  # e.g. an interpolation that points nowhere
        raise RecipeError(f"{where}: {e.full_key}: {str(e.msg).splitlines()[0]}") from None
    check_values(recipe, where)
    local = Path(recipe.model.name_or_path).expanduser()
    if local.is_dir():  # recorded absolute, so that export and compare find it from any working directory
        recipe.model.name_or_path = str(local.resolve())
    return recipe


def _refuse_env(node: Any, where, key: str = "") -> None:
    """`${oc.env:VAR}` is refused: its value (a token, a password) would be written into config.yaml, lineage.json
    and the trainer's arguments in the run dir, which are made to be shared."""
    if isinstance(node, dict):
        for name, value in node.items():
            _refuse_env(value, where, f"{key}.{name}" if key else str(name))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _refuse_env(value, where, f"{key}.{i}")
    elif isinstance(node, str) and "oc.env" in node and "${" in node:
        raise RecipeError(f"{where}: {key}: ${{oc.env:...}} is not allowed in a recipe: the resolved value would be "
                          "written to the run dir (config.yaml, lineage.json). Pass the value itself as an override "
                          "if it is not secret; a secret such as HF_TOKEN or WANDB_API_KEY is read from the "
                          "environment by the library that needs it, so leave it out of the recipe")


# Fields that must be >= 1, and fields that must be > 0, in whichever section has them.
AT_LEAST_ONE = ("r", "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                "max_length", "logging_steps", "save_steps", "save_total_limit", "max_new_tokens",
                "max_completion_length", "num_generations", "num_mini_batches", "num_ppo_epochs", "kl_horizon",
                "activation_checkpointing_every_n_layers", "eval_loss_rows")
POSITIVE = ("learning_rate", "alpha", "num_train_epochs", "temperature", "top_p", "timeout_s")
NOT_NEGATIVE = ("warmup_steps", "weight_decay", "dropout", "eval_generations", "eval_samples", "beta",
                "max_grad_norm")  # max_grad_norm=0: no clipping


def check_values(recipe: Recipe, where) -> None:
    """Settings that cannot work, refused with their key before anything loads (a trainer would take some of them
    silently: max_steps=0 trains one step, a negative learning rate ascends the loss)."""
    for key, f, section in schema_keys():
        if section is not None:
            continue
        parent, _, name = key.rpartition(".")
        owner = recipe
        for part in parent.split("."):
            owner = getattr(owner, part, None)
        if owner is None:  # a stage the recipe does not have
            continue
        value = getattr(owner, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        problem = None
        if name in AT_LEAST_ONE and value < 1:
            problem = "must be at least 1"
        elif name in POSITIVE and not value > 0:
            problem = "must be positive"
        elif name in NOT_NEGATIVE and not value >= 0:
            problem = "must not be negative"
        elif name == "max_steps" and value != -1 and value < 1:
            problem = "must be at least 1, or -1 to train for num_train_epochs"
        elif name == "top_p" and value > 1 or name == "dropout" and value >= 1:
            problem = "must be at most 1" if name == "top_p" else "must be below 1"
        elif name == "eval_steps" and value < 1:
            problem = "must be at least 1 (or null: evaluate only before and after training)"
        elif name == "num_generations" and value < 2:
            problem = "must be at least 2: a group's mean reward is each completion's baseline"
        if problem:
            raise RecipeError(f"{where}: {key}={value}: {problem}")
    name = recipe.run.name
    if not name or name in (".", "..") or "/" in name or "\\" in name or Path(name).is_absolute():
        raise RecipeError(f"{where}: run.name={name!r}: a run name is one directory name under run.root "
                          f"({recipe.run.root}), without '/' or '..'; to write elsewhere, set run.root")


def _mapping(path: Path):
    """The recipe file's content, which must be a mapping of sections (model:, data:, sft:, ...)."""
    loaded = OmegaConf.load(path)
    if not isinstance(loaded, DictConfig):
        raise RecipeError(f"{path}: a recipe is a mapping of sections (model:, data:, sft:, ...), and this file's top "
                          "level is a list; see recipes/quickstart.yaml")
    return loaded


def _merge(cfg, load, where: str):
    try:
        return OmegaConf.merge(cfg, load())
    except ConfigKeyError as e:
        hint = closest_key(e.full_key)
        raise RecipeError(
            f"{where}: unknown key '{e.full_key}'" + (f"; did you mean '{hint}'?" if hint else "")
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise RecipeError(f"{where}{line}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    except OmegaConfBaseException as e:
        msg = str(getattr(e, "msg", e)).splitlines()[0]  # the rest is OmegaConf's internals (reference_type=...)
        key = getattr(e, "full_key", None)
        raise RecipeError(f"{where}: {key + ': ' if key else ''}{msg}") from None


def _override(cfg, item: str):
    """One key=value on top of the recipe. A key through a list (grpo.rewards.0.weight) is set in place, as a
    merge cannot reach into a list."""
    key = item.split("=", 1)[0].strip()
    where = f"override {item!r}"
    if not any(part.isdigit() for part in key.split(".")):
        return _merge(cfg, lambda: OmegaConf.from_dotlist([item]), where=where)
    value = OmegaConf.select(OmegaConf.from_dotlist([item]), key)
    parts = key.split(".")
    for i, part in enumerate(parts):
        items = OmegaConf.select(cfg, ".".join(parts[:i])) if i else cfg
        if part.isdigit() and (items is None or int(part) >= len(items)):
            raise RecipeError(f"{where}: {'.'.join(parts[:i])} has {len(items or [])} items, so there is no item "
                              f"{part} (items count from 0; set the whole list to add one)")
    try:
        OmegaConf.update(cfg, key, value, merge=True)
    except (OmegaConfBaseException, IndexError) as e:
        raise RecipeError(f"{where}: {str(e).splitlines()[0]}") from None
    return cfg


@functools.cache
def schema_keys(cls: type = Recipe, prefix: str = "") -> tuple[tuple[str, dataclasses.Field, type | None], ...]:
    """Every dotted key of the schema: (key, field, its dataclass type if it is a section), depth first. Read once
    per process: `align`'s help texts read it per section and stage on every command (87 ms a command before)."""
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        hint = hints[f.name]
        is_list = typing.get_origin(hint) in (list, List)  # a list of sections is one value (grpo.rewards)
        section = None if is_list else next(
            (t for t in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(t)), None)
        keys.append((key, f, section))
        if section is not None:
            keys.extend(schema_keys(section, key + "."))
    return tuple(keys)


def closest_key(key: str) -> str | None:
    """The valid dotted key nearest to `key`, preferring keys under the same parent."""
    valid = [k for k, _, _ in schema_keys()]
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    siblings = [k for k in valid if k.rsplit(".", 1)[0] == parent] if parent else valid
    match = difflib.get_close_matches(key, siblings, n=1, cutoff=0.6) or difflib.get_close_matches(
        key, valid, n=1, cutoff=0.6
    )
    return match[0] if match else None


def describe(section: str) -> str:
    """Help text of one section's keys, for `align <stage> --help`."""
    lines = []
    for key, f, inner in schema_keys():
        if key.split(".")[0] != section or inner is not None:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required"
        )
        if isinstance(default, Enum):
            default = default.value
        lines.append(f"  {key} = {default!r}\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)


def to_yaml(recipe: Recipe) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(recipe))


def section_defaults(name: str):
    """The stage section `name` of a recipe with every field at its default (what a recipe without it would get)."""
    hint = typing.get_type_hints(Recipe)[name]
    return typing.get_args(hint)[0]()  # Optional[XStage] -> XStage()


def section_name(stage: Any) -> str:
    """The recipe key of a stage section: SFTStage -> sft, GRPOStage -> grpo."""
    return type(stage).__name__.removesuffix("Stage").lower()


def trainer_kwargs(stage: Any, trl_config_cls: type, *, defaults: dict[str, Any] = {}, **fixed: Any) -> dict[str, Any]:
    """Keyword arguments for a TRL config class, later ones winning: align's `defaults`, the stage's fields that
    the class has (same names), `trainer_args`, and the values align itself must set (`fixed`), which
    `trainer_args` may not override."""
    trl_fields = {f.name for f in dataclasses.fields(trl_config_cls)}
    section = section_name(stage)
    kwargs = dict(defaults)
    kwargs.update({f.name: getattr(stage, f.name) for f in dataclasses.fields(stage) if f.name in trl_fields})
    for key, value in stage.trainer_args.items():
        if key not in trl_fields:
            hint = difflib.get_close_matches(key, sorted(trl_fields), n=1)
            raise RecipeError(
                f"{section}.trainer_args.{key}: not a field of {trl_config_cls.__name__}"
                + (f"; did you mean '{hint[0]}'?" if hint else "")
            )
        if key in fixed:
            raise RecipeError(f"{section}.trainer_args.{key}: align sets this itself; remove it from trainer_args")
        kwargs[key] = value
    kwargs.update(fixed)
    return kwargs
