"""PPO: the SFT policy optimised against a weighted sum of rewards, with a per-token KL penalty to the frozen SFT
policy and a learned value function as the baseline.

    align ppo recipes/quickstart.yaml
    align ppo recipes/quickstart.yaml ppo.beta=0.1 ppo.kl_target=2
    align ppo recipes/quickstart.yaml --resume          # continue from the last checkpoint in runs/<run>/ppo/trainer

This loop is align's own, on Accelerate + PEFT, because TRL 1.16 has no PPOTrainer (removed in 1.13). It follows
the published recipe as TRL 0.12's PPOTrainer did (InstructGPT; Huang et al. 2024, "The N+ implementation details
of RLHF with PPO"), with TRL's log-prob and entropy helpers. One PPO step:

1. Rollout: one sampled completion per prompt, cut after its EOS; its score from the reward functions
   (`align.rewards`, as in GRPO); per-token log-probs under the policy and the reference, and values.
2. Rewards and advantages: -beta x (log pi - log pi_ref) at every completion token, plus the score at its last
   token; GAE (gamma, lambda) over them; advantages whitened. The logged `kl` (nats per completion) is the mean
   over the rollout of that sum: an unbiased estimate, which on a few samples near the reference can fall below 0.
3. Update: `num_ppo_epochs` passes over the rollout in `num_mini_batches` optimizer steps (micro-batches
   accumulated), each with the clipped policy loss and vf_coef x the clipped value loss.

Four models on one copy of the 4-bit base: the policy (LoRA adapter "default", trainable), the reference (its
frozen copy "ref", as TRL's GRPO makes it), the reward model (adapter "reward" + score head, frozen) and the value
model (adapter "value" + value head, trainable, initialised from the reward model) are adapters of one PeftModel;
each forward pass selects its adapter. The policy and value losses are backpropagated one after the other, each
while its own adapter is active: with activation checkpointing the backward pass recomputes the forward, which
must see the adapter the forward saw.
"""

from __future__ import annotations

import logging
import math
import pickle
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from align import rl
from align.errors import AlignError
from align.generation import generate_batch, merged_weights, position_ids
from align.processes import check_identical
from align.modeling import copy_adapter_weights, load_adapter_weights, load_tokenizer, prompt_ids
from align import memory
from align.recipe import Recipe, RecipeError
from align.rewards import RewardFunc, SharedBaseRewardModel
from align.callbacks import NonFinite, non_finite_message
from align.summary import rl_summary
from align.rundir import RunDir, model_identity, replace_dir, stage_inputs, step_of, write_manifest
from align.stages import exclusive, init_adapter
from align.styles import load_style

log = logging.getLogger(__name__)


@exclusive("ppo")
def run(recipe: Recipe, *, resume: bool = False) -> dict[str, Any]:
    """Train, evaluate before and after, save; returns the results written to lineage.json. With `resume`, carry
    on from the stage's last trainer checkpoint (policy and value adapters, optimizer, scheduler, KL controller,
    random states, step), if there is one."""
    from accelerate import Accelerator

    check(recipe)
    cfg = recipe.ppo
    run_dir = RunDir(recipe, "ppo")
    # The trackers the HF stages reach through report_to, through Accelerate's tracking API here.
    accelerator = Accelerator(log_with=recipe.run.report_to or None, project_dir=str(run_dir.trainer_dir / "runs"))
    init = init_adapter(recipe, "ppo")
    specs = rl.RewardSpecs(recipe, cfg)
    tokenizer = load_tokenizer(recipe.model)
    train, held_out, reports = load_data(recipe, tokenizer)
    memory.check(recipe, "ppo", reports[0])  # before a model loads: a batch that cannot fit stops now
    _rollouts_per_epoch(cfg, len(train), accelerator.num_processes)  # enough prompts, before loading the model
    resume_from = run_dir.resume_from() if resume else None
    policy = rl.load_policy(recipe, cfg, init, "ppo")
    _add_reference(policy)
    rewards = specs.functions(policy)
    value_from, scale = (resume_from / "value", 1.0) if resume_from else value_init(cfg.value_init, specs, policy)
    value = SharedBaseRewardModel(policy, value_from, adapter="value", trainable=True)
    value.score.weight.data *= scale
    ppo = build_trainer(recipe, policy, value, rewards, tokenizer, train, held_out, run_dir, accelerator)
    run_dir.start(base_model=model_identity(recipe.model), data=[r.summary() for r in reports],
                  parent=str(init) if init else None, reference=rl.reference_description(init),
                  rewards=specs.lineage(), value_init=str(value_from) if value_from else "the policy's adapter",
                  resumed_from=resume_from)
    hparams = {k: v for k, v in stage_inputs(recipe, "ppo").items() if isinstance(v, (bool, int, float, str))}
    accelerator.init_trackers(f"{recipe.run.name}-ppo", config=hparams)
    if resume_from:
        ppo.load(resume_from)

    before = run_dir.evaluated_before(lambda: ppo.evaluate("before"))
    start = time.monotonic()
    ppo.train()
    seconds = time.monotonic() - start
    after = ppo.evaluate("after")

    checksums = check_identical(policy, "ppo")
    with run_dir.checkpoint() as staging:
        ppo.save_models(staging)
    results = rl.finish(run_dir, init=init, resume_from=resume_from, steps=ppo.step, seconds=seconds,
                        kl=ppo.kl.values(), before=before, after=after,
                        beta_last=ppo.kl_ctl.value, eos_fraction_last=ppo.eos_fraction, kl_unit="nats per completion",
                        processes=accelerator.num_processes,
                        effective_batch=ppo.prompts_per_rollout * accelerator.num_processes, rank_checksums=checksums)
    # What accelerator.end_training() does, less ending the process group: a stage after this one in the same
    # processes (as after TRL's stages) would wait forever for a new group to form.
    for tracker in accelerator.trackers:
        tracker.finish()
    return results


def load_data(recipe: Recipe, tokenizer):
    """Validated train and held-out prompts (held-out None when data.prompts.eval is unset) and their reports."""
    return rl.load_prompt_data(recipe, recipe.ppo, tokenizer)


summary = rl_summary  # the stage protocol's summary(results): where it started, the KL, rewards before and after

def check(recipe: Recipe, upcoming: tuple[str, ...] = ()) -> None:
    """Settings that cannot work, refused before anything loads (`upcoming`: stages `align run` trains first)."""
    cfg = rl.check_section(recipe, "ppo", upcoming)  # sizes below 1 were refused with the recipe (recipe.check_values)
    if cfg.kl_target is not None and cfg.kl_target <= 0:
        raise RecipeError(f"ppo.kl_target={cfg.kl_target}; set a positive KL per sequence (nats), or null for a fixed beta")


def _prompts_per_rollout(cfg) -> int:
    return cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * cfg.num_mini_batches


def _rollouts_per_epoch(cfg, prompts: int, processes: int) -> int:
    """Rollouts in one pass over the prompts (the last incomplete one is left out)."""
    per_rollout = _prompts_per_rollout(cfg)
    if prompts < per_rollout * processes:
        raise RecipeError(
            f"{prompts} training prompts are fewer than one rollout: ppo.per_device_train_batch_size x "
            f"gradient_accumulation_steps x num_mini_batches = {per_rollout} per device x {processes} devices; "
            "lower one of them or add prompts")
    return prompts // (per_rollout * processes)


def _add_reference(policy) -> None:
    """The reference policy: a frozen copy "ref" of the policy's starting adapter on the same base (as TRL's GRPO
    makes it), so the reference is exactly the policy the run starts from."""
    policy.add_adapter("ref", policy.peft_config["default"])
    copy_adapter_weights(policy, "default", "ref")
    for name, param in policy.named_parameters():
        if ".ref." in name:
            param.requires_grad_(False)


def value_init(choice: str, specs: rl.RewardSpecs, policy) -> tuple[Path | None, float]:
    """Where the value model starts: (a reward stage checkpoint, the factor its score head is scaled by), or
    (None, 0) for a copy of the policy's adapter with a zero head. The value model predicts the score, so the
    reward model (scaled by its weight) is a good start when it is the whole score (auto); next to other rewards
    it predicts the wrong thing at the wrong scale, and a zero head is the better start (auto)."""
    shared = sorted(specs.checkpoints) if "reward" in policy.peft_config else []
    if choice == "auto":
        choice = "reward" if shared and len(specs.cfg.rewards) == 1 else "policy"
    if choice == "policy":
        log.info("ppo: the value model starts from the policy's adapter with a zero value head")
        return None, 0.0
    if choice == "reward":
        if not shared:
            raise RecipeError("ppo.value_init=reward, but no reward_model reward runs on the policy's base; list "
                              "one in ppo.rewards, or set ppo.value_init=policy")
        weight = specs.cfg.rewards[shared[0]].weight
        log.info("ppo: the value model starts from the reward model %s, its head scaled by the reward's weight %g",
                 specs.checkpoints[shared[0]], weight)
        return specs.checkpoints[shared[0]], weight
    if not (Path(choice) / "adapter_config.json").is_file():
        raise RecipeError(f"ppo.value_init={choice}: not auto, reward, policy, or a reward stage checkpoint "
                          "directory (no adapter_config.json there)")
    return Path(choice), 1.0


# -- the maths, one function each (tests check them against hand-computed values) ------------------------------


def completion_mask(responses: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 for a completion's tokens up to and including its first EOS, 0 for what generation put after it
    (padding, which may be the EOS token itself)."""
    is_eos = (responses == eos_token_id).long()
    after_eos = (is_eos.cumsum(1) - is_eos) > 0
    return (~after_eos).long()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum()


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """x scaled to unit variance over the masked entries (unbiased variance), and centred unless `shift_mean`
    is off (rewards keep their mean)."""
    mean = masked_mean(x, mask)
    variance = masked_mean((x - mean) ** 2, mask) * mask.sum() / (mask.sum() - 1).clamp(min=1)
    whitened = (x - mean) * torch.rsqrt(variance + 1e-8)
    return (whitened if shift_mean else whitened + mean) * mask


def kl_penalised_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -beta x (log pi - log pi_ref) at every completion token, plus the sequence's score at
    its last token. Returns (rewards, per-token KL)."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -beta * kl
    last = mask.sum(1) - 1
    rewards[torch.arange(len(scores)), last] += scores
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over each completion; the value after its last
    token is 0 (the episode ends there). Returns (advantages, returns = advantages + values)."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(len(rewards), dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, advantages + values


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate: max(-A r, -A clip(r, 1-eps, 1+eps)) with r = pi / pi_old, mean over tokens."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    return loss, {"clipfrac": masked_mean((clipped > unclipped).float(), mask),
                  "approxkl": 0.5 * masked_mean(log_ratio**2, mask)}


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """0.5 x max((V - R)^2, (V_clipped - R)^2), V_clipped = V_old + clip(V - V_old, -eps, eps), mean over tokens."""
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_error, clipped_error = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_error, clipped_error), mask)
    return loss, {"value_clipfrac": masked_mean((clipped_error > unclipped_error).float(), mask)}


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over completion tokens: 1 is a perfect value function."""
    variance = lambda x: masked_mean((x - masked_mean(x, mask)) ** 2, mask)  # noqa: E731
    return float(1 - variance(returns - values) / variance(returns).clamp(min=1e-8))


@dataclass
class KLController:
    """beta of the KL penalty: fixed, or adapted towards `target` (Ziegler et al. 2019): after each rollout,
    beta x= 1 + clip(KL / target - 1, -0.2, 0.2) x samples / horizon."""

    value: float
    target: float | None = None
    horizon: int = 10000

    def update(self, kl: float, samples: int) -> None:
        if self.target is not None:
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.value *= 1 + error * samples / self.horizon


# -- the loop ---------------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """One rollout, per completion (rows) and per completion token (columns)."""

    query_responses: torch.Tensor  # prompt (left-padded) + completion (right-padded)
    attention_mask: torch.Tensor
    responses: torch.Tensor
    mask: torch.Tensor  # completion tokens
    logprobs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor

    def __len__(self) -> int:
        return len(self.responses)


class KLWatch:
    """The KL to the reference over PPO's rollouts (nats per completion): first (before any update), last and max;
    a negative estimate explained once in the log; above `max_kl` the run stops (rl.KLExceeded)."""

    def __init__(self, max_kl: float | None):
        self.max_kl = max_kl
        self.first = self.last = self.max = None
        self.negative_explained = False

    def values(self) -> tuple[float | None, float | None, float | None]:
        return self.first, self.last, self.max

    def record(self, kl: float, step: int) -> None:
        """This rollout's KL (step counts from 1)."""
        if self.first is None:  # the first rollout, before any update (a resumed run has it already)
            self.first = kl
            rl.warn_if_first_kl_not_zero(kl)
        if kl < 0 and not self.negative_explained:
            self.negative_explained = True
            log.info("ppo: the KL to the reference is %.4g nats per completion at step %d. It is estimated from this "
                     "step's sampled answers as the sum of log pi - log pi_ref over their tokens (the estimate the "
                     "penalty uses): unbiased, but on a few samples of a policy close to the reference it can fall "
                     "below 0, though the KL itself cannot", kl, step)
        self.last, self.max = kl, max(kl, self.max if self.max is not None else kl)
        if self.max_kl is not None and kl > self.max_kl:
            raise rl.KLExceeded(
                f"the KL to the reference reached {kl:.4g} nats per completion at step {step}, above "
                f"ppo.max_kl={self.max_kl:g}: the policy is drifting away from the SFT policy. Lower "
                "ppo.learning_rate, raise ppo.beta (or set ppo.kl_target), or raise ppo.max_kl if this is intended "
                "(no checkpoint written; metrics.jsonl has the run's curve)")


class PPOLoop:
    def __init__(self, recipe: Recipe, policy, value: SharedBaseRewardModel, rewards: list[RewardFunc], tokenizer,
                 train, held_out, run_dir: RunDir, accelerator):
        from transformers import TrainerState, get_scheduler
        from trl.trainer.utils import disable_dropout_in_model

        self.cfg = cfg = recipe.ppo
        self.recipe, self.policy, self.value, self.rewards = recipe, policy, value, rewards
        self.tokenizer, self.train_data, self.held_out = tokenizer, train, held_out
        self.run_dir, self.accelerator = run_dir, accelerator
        disable_dropout_in_model(policy)  # dropout would make pi differ from pi_old and pi_ref on the same weights
        self.prompts_per_rollout = _prompts_per_rollout(cfg)
        self.rollouts_per_epoch = _rollouts_per_epoch(cfg, len(train), accelerator.num_processes)
        self.total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * self.rollouts_per_epoch)
        self.trainable = [p for n, p in policy.named_parameters() if ".default." in n] + value.parameters_of_adapter()
        # eps 1e-5: the N+ implementation details of PPO (TRL 0.12's PPO default).
        self.optimizer = torch.optim.AdamW(self.trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, eps=1e-5)
        updates = self.total_steps * cfg.num_ppo_epochs * cfg.num_mini_batches
        warmup = cfg.warmup_steps if cfg.warmup_steps >= 1 else math.ceil(cfg.warmup_steps * updates)
        self.scheduler = get_scheduler(cfg.lr_scheduler_type, self.optimizer, num_warmup_steps=int(warmup),
                                       num_training_steps=updates)
        self.kl_ctl = KLController(cfg.beta, cfg.kl_target, cfg.kl_horizon)
        self.step = 0
        self.state = TrainerState(max_steps=self.total_steps)  # what reward functions get as trainer_state
        self.kl = KLWatch(cfg.max_kl)
        self.eos_fraction: float | None = None  # of the last rollout
        self.sampling = {"temperature": cfg.temperature, "top_p": cfg.top_p}

    # The steps, in order.

    def train(self) -> None:
        cfg = self.cfg
        bar = tqdm(total=self.total_steps, initial=self.step, desc="ppo", disable=not self.accelerator.is_main_process)
        while self.step < self.total_steps:
            started = time.perf_counter()
            rows = self._prompts(self.step)
            rollout, stats = self.rollout(rows)
            self._check_finite(stats, ("score", "kl"))  # before an update spreads it into the weights
            self.eos_fraction = stats["eos_fraction"]
            rollout_seconds = time.perf_counter() - started
            stats.update(self.update(rollout))
            self._check_finite(stats, ("policy_loss", "value_loss"))
            self.step += 1
            self.state.global_step = self.step
            self.kl_ctl.update(stats["kl"], self.prompts_per_rollout * self.accelerator.num_processes)
            seconds = time.perf_counter() - started
            stats.update(step_seconds=seconds, rollout_seconds=rollout_seconds,
                         tokens_per_second=stats.pop("completion_tokens") / seconds,
                         learning_rate=self.scheduler.get_last_lr()[0])
            if self.step == 1 or self.step % cfg.logging_steps == 0 or self.step == self.total_steps:
                self._log({"epoch": self.step / self.rollouts_per_epoch, **stats})
            bar.update(1)
            bar.set_postfix({k: f"{stats[k]:.4g}" for k in ("kl", "score")})
            if cfg.save_steps and self.step % cfg.save_steps == 0 and self.step < self.total_steps:
                self.save_checkpoint()
            if cfg.eval_steps and self.step % cfg.eval_steps == 0 and self.step < self.total_steps:
                self.evaluate(f"step {self.step}")
        bar.close()

    def _prompts(self, step: int) -> list[dict]:
        """This process's prompts for PPO step `step`: a shuffle of the prompts per epoch (the same on every
        process, each taking its own slice), so a resumed run sees the same prompts at the same step."""
        epoch, index = divmod(step, self.rollouts_per_epoch)
        order = torch.randperm(len(self.train_data), generator=torch.Generator().manual_seed(self.recipe.run.seed + epoch))
        n, rank = self.prompts_per_rollout, self.accelerator.process_index
        start = (index * self.accelerator.num_processes + rank) * n
        return self.train_data.select(order[start : start + n].tolist()).to_list()

    @torch.no_grad()
    def rollout(self, rows: list[dict]) -> tuple[Rollout, dict[str, float]]:
        """Sample, score, and compute everything the update needs, with no gradients."""
        from trl.trainer.utils import pad, use_adapter

        cfg, tokenizer, policy = self.cfg, self.tokenizer, self.policy
        device = self.accelerator.device
        policy.eval()  # generation with the KV cache (training mode with checkpointing turns it off)
        prompts = [prompt_ids(tokenizer, row["prompt"]) for row in rows]
        completions: list[list[int]] = []
        with merged_weights(policy):
            for start in range(0, len(prompts), cfg.per_device_eval_batch_size):  # generation batches: no gradients
                _, _, out = generate_batch(policy, tokenizer, prompts[start : start + cfg.per_device_eval_batch_size],
                                           max_new_tokens=cfg.max_completion_length, sampling=self.sampling)
                keep = completion_mask(out, tokenizer.eos_token_id).sum(1).tolist()
                completions.extend(ids[:n] for ids, n in zip(out.tolist(), keep))
        has_eos = torch.tensor([ids[-1] == tokenizer.eos_token_id for ids in completions], device=device)

        texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
        columns = {k: [row[k] for row in rows] for k in rows[0] if k != "prompt"}
        per_reward, totals = rl.score_completions(self.rewards, [row["prompt"] for row in rows], texts, completions,
                                                  columns, self.state)
        scores = torch.tensor(totals, device=device, dtype=torch.float32)
        if cfg.missing_eos_penalty is not None:
            scores = scores - cfg.missing_eos_penalty * (~has_eos).float()

        as_tensors = lambda seqs: [torch.tensor(s, device=device) for s in seqs]  # noqa: E731
        query = pad(as_tensors(prompts), tokenizer.pad_token_id, padding_side="left")
        query_mask = pad(as_tensors([[1] * len(p) for p in prompts]), 0, padding_side="left")
        responses = pad(as_tensors(completions), tokenizer.pad_token_id, padding_side="right")
        mask = pad(as_tensors([[1] * len(c) for c in completions]), 0, padding_side="right")
        query_responses, attention_mask = torch.cat([query, responses], 1), torch.cat([query_mask, mask], 1)

        logprobs, ref_logprobs, values = [], [], []
        for idx in torch.arange(len(rows), device=device).split(cfg.per_device_train_batch_size):
            batch = (query_responses[idx], attention_mask[idx], responses[idx])
            logprobs.append(self._logprobs(*batch))
            with use_adapter(policy, "ref"):
                ref_logprobs.append(self._logprobs(*batch))
            values.append(self._values(*batch[:2], responses.shape[1]))
        logprobs, ref_logprobs, values = torch.cat(logprobs), torch.cat(ref_logprobs), torch.cat(values) * mask

        beta = self.kl_ctl.value
        rewards, kl = kl_penalised_rewards(scores, logprobs, ref_logprobs, mask, beta)
        if cfg.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        advantages = masked_whiten(advantages, mask)

        kl_per_sequence = self._mean(kl.sum(1))
        self.kl.record(kl_per_sequence, self.step + 1)
        stats = {"score": self._mean(scores), "kl": kl_per_sequence, "non_score_reward": self._mean(-beta * kl.sum(1)),
                 "beta": beta, "completion_length": self._mean(mask.sum(1).float()),
                 "eos_fraction": self._mean(has_eos.float()),
                 "explained_variance": explained_variance(values, returns, mask),
                 "completion_tokens": float(self.accelerator.reduce(mask.sum(), "sum")),
                 **{f"rewards/{name}": self._mean(torch.tensor([v for v in vals if v is not None]))
                    for name, vals in per_reward.items() if any(v is not None for v in vals)}}
        stats["rlhf_reward"] = stats["score"] + stats["non_score_reward"]
        return Rollout(query_responses, attention_mask, responses, mask, logprobs, values, advantages, returns), stats

    def update(self, rollout: Rollout) -> dict[str, float]:
        """num_ppo_epochs passes over the rollout in num_mini_batches optimizer steps each."""
        cfg = self.cfg
        self.policy.train()
        generator = torch.Generator().manual_seed(self.recipe.run.seed * 100003 + self.step)
        mini_batch = len(rollout) // cfg.num_mini_batches
        totals: dict[str, list[float]] = {}
        for _ in range(cfg.num_ppo_epochs):
            order = torch.randperm(len(rollout), generator=generator).to(rollout.responses.device)
            for mini in order.split(mini_batch):
                micro_batches = mini.split(cfg.per_device_train_batch_size)
                for idx in micro_batches:
                    for key, value in self._losses(rollout, idx, len(micro_batches)).items():
                        totals.setdefault(key, []).append(value)
                self._optimizer_step()
        return {key: self._mean(torch.tensor(values)) for key, values in totals.items()}

    def _losses(self, rollout: Rollout, idx: torch.Tensor, accumulation: int) -> dict[str, float]:
        """Policy loss, then value loss, each backpropagated while its adapter is active."""
        from trl.trainer.utils import entropy_from_logits, selective_log_softmax

        cfg = self.cfg
        query_responses, attention_mask, responses = rollout.query_responses[idx], rollout.attention_mask[idx], rollout.responses[idx]
        mask = rollout.mask[idx]
        logits = self._logits(query_responses, attention_mask, responses.shape[1])
        logprobs = selective_log_softmax(logits, responses, temperature=cfg.temperature)
        pg_loss, pg_stats = policy_loss(logprobs, rollout.logprobs[idx], rollout.advantages[idx], mask, cfg.cliprange)
        self.accelerator.backward(pg_loss / accumulation)
        with torch.no_grad():
            entropy = masked_mean(entropy_from_logits(logits.detach() / cfg.temperature), mask)
        del logits
        values = self._values(query_responses, attention_mask, responses.shape[1])
        vf_loss, vf_stats = value_loss(values, rollout.values[idx], rollout.returns[idx], mask, cfg.cliprange_value)
        self.accelerator.backward(cfg.vf_coef * vf_loss / accumulation)
        return {"policy_loss": pg_loss.item(), "value_loss": vf_loss.item(), "entropy": entropy.item(),
                **{k: v.item() for k, v in {**pg_stats, **vf_stats}.items()}}

    def _optimizer_step(self) -> None:
        # Gradients are averaged across processes by hand, not by a DistributedDataParallel wrapper: the model
        # runs several forward passes per backward (policy, value), on different adapters of one module.
        if self.accelerator.num_processes > 1:
            for param in self.trainable:
                if param.grad is not None:
                    param.grad = self.accelerator.reduce(param.grad, "mean")
        self.accelerator.clip_grad_norm_(self.trainable, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def evaluate(self, when: str) -> dict[str, Any]:
        """Held-out answers, greedy and sampled, scored by every reward (rl.evaluate); logged at this step."""
        return rl.evaluate(self.policy, self.tokenizer, self.held_out, self.rewards, self.cfg, when,
                           sampling=self.sampling, trainer_state=self.state,
                           log_metrics=self._log, style=load_style(self.recipe.data.answer_style))

    def _log(self, metrics: dict[str, Any]) -> None:
        """metrics.jsonl, and the trackers of run.report_to (Accelerate's tracking API)."""
        self.run_dir.log_metrics({"step": self.step, **metrics})
        self.accelerator.log(metrics, step=self.step)

    # Forward passes.

    def _logits(self, query_responses, attention_mask, completion_length) -> torch.Tensor:
        """The policy's next-token logits at the positions that predict the completion's tokens (the LM head runs
        on those positions and the last one only: not through the vocabulary for every prompt token)."""
        logits = self.policy(input_ids=query_responses, attention_mask=attention_mask,
                             position_ids=position_ids(attention_mask), logits_to_keep=completion_length + 1).logits
        return logits[:, :-1].float()

    def _logprobs(self, query_responses, attention_mask, responses) -> torch.Tensor:
        from trl.trainer.utils import selective_log_softmax

        logits = self._logits(query_responses, attention_mask, responses.shape[1])
        return selective_log_softmax(logits, responses, temperature=self.cfg.temperature)

    def _values(self, query_responses, attention_mask, completion_length: int) -> torch.Tensor:
        """The value of each state a completion token is chosen in (the text before that token)."""
        values = self.value.token_scores(query_responses, attention_mask, position_ids(attention_mask))
        return values[:, -completion_length - 1 : -1].float()

    # Bookkeeping.

    def _mean(self, x: torch.Tensor) -> float:
        """Mean over this process's values and every other process's."""
        x = x.float().to(self.accelerator.device)
        return float(self.accelerator.reduce(x.mean(), "mean"))

    def _check_finite(self, stats: dict[str, float], keys: tuple[str, ...]) -> None:
        """Stops the run at a NaN or infinite value, with the step's metrics logged and no checkpoint written."""
        bad = next((k for k in keys if not math.isfinite(stats[k])), None)
        if bad:
            self.run_dir.log_metrics({"step": self.step + 1, **stats})
            raise NonFinite(non_finite_message("ppo", f"the {bad}", stats[bad], self.step + 1))

    def save_models(self, directory: Path) -> None:
        """The policy adapter (loads with stock PEFT) and tokenizer at the top; the value model (adapter + head,
        in the reward stage's checkpoint layout) in value/. Main process only; the caller synchronises."""
        if self.accelerator.is_main_process:
            self.policy.save_pretrained(str(directory), selected_adapters=["default"])
            self.tokenizer.save_pretrained(str(directory))
            self.value.save(directory / "value")

    def save_checkpoint(self) -> None:
        """A resumable checkpoint in trainer/checkpoint-<step>, renamed into place once written; only the last
        save_total_limit are kept."""
        if self.accelerator.is_main_process:
            trainer_dir = self.run_dir.trainer_dir
            staging = trainer_dir / f"checkpoint-{self.step}.tmp"
            self.save_models(staging)
            torch.save({"step": self.step, "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(), "kl_controller": asdict(self.kl_ctl),
                        "kl": self.kl.values(), "rng": rng_state()}, staging / "state.pt")
            write_manifest(staging)
            replace_dir(staging, trainer_dir / f"checkpoint-{self.step}")
            for old in sorted(trainer_dir.glob("checkpoint-*[0-9]"), key=step_of)[:-self.cfg.save_total_limit]:
                shutil.rmtree(old)
        self.accelerator.wait_for_everyone()

    def load(self, checkpoint: Path) -> None:
        """Continue from a checkpoint of save_checkpoint (the value adapter and head were loaded with the value
        model): policy adapter, optimizer, scheduler, KL controller, random states, step."""
        load_adapter_weights(self.policy, checkpoint, adapter_name="default")
        state = read_state(checkpoint / "state.pt")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_ctl = KLController(**state["kl_controller"])
        self.kl.first, self.kl.last, self.kl.max = state["kl"]
        self.step = self.state.global_step = state["step"]
        restore_rng_state(state["rng"])
        log.info("ppo: resumed from %s at step %d (beta %.4g)", checkpoint, self.step, self.kl_ctl.value)


def build_trainer(*args) -> PPOLoop:
    """align's PPO loop (`PPOLoop`'s arguments)."""
    return PPOLoop(*args)


def read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's state.pt, unpickled with weights_only: tensors, numbers, strings and numpy's RNG arrays, and
    nothing that runs code (a run dir may come from anyone, and `align run` resumes by itself)."""
    from transformers.trainer_pt_utils import safe_globals

    try:
        with safe_globals():
            return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        raise AlignError(f"{path}: refused to load: it holds more than tensors and numbers (a PPO checkpoint "
                         f"written by align does not): {str(e).splitlines()[0]}") from None


def rng_state() -> dict[str, Any]:
    """The python, numpy, torch (and CUDA) random states a trainer checkpoint keeps, so that a resumed run samples
    what the uninterrupted one would have."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng_state(state: dict[str, Any]) -> None:
    """Sets the random states `rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])
