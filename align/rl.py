"""What the RL stages (GRPO, PPO) share: the policy on its base, the reward functions a recipe lists, and the
held-out evaluation before and after training (greedy and sampled answers, every reward, samples.jsonl)."""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Any, Callable

from align import memory
from align.callbacks import guarded_train
from align.data import prompts as prompt_data
from align.data.checks import load_train_eval
from align.generation import generate
from align.modeling import check_context, checkpointing, load_model, load_tokenizer, lora_config
from align.processes import check_identical, is_main_process
from align.recipe import Recipe, RecipeError, RLStage, section_name
from align.rewards import RewardFunc, check_reward_model_args, reward_function, reward_model_scorer
from align.rundir import RunDir, model_identity
from align.styles import breakdown, describe, load_style
from align.errors import AlignError
from align.stages import adapter_dir, batch, finished_checkpoint, init_adapter

log = logging.getLogger(__name__)


def load_prompt_data(recipe: Recipe, cfg: RLStage, tokenizer):
    """Validated train and held-out prompts, each short enough to leave max_completion_length for the answer."""
    check_context(recipe.model, cfg.max_length, f"{section_name(cfg)}.max_length")
    return load_train_eval(recipe.data.prompts, prompt_data.load, recipe.data, tokenizer,
                           cfg.max_length - cfg.max_completion_length, what="prompts")


class KLExceeded(AlignError, RuntimeError):
    """The policy moved further from the reference than the stage's max_kl allows."""


def check_section(recipe: Recipe, section: str, upcoming: tuple[str, ...] = ()) -> RLStage:
    """The recipe's `section` (grpo, ppo), refused before anything loads if it cannot work: its settings, its
    reward functions, and the checkpoints it starts from and is scored by (`upcoming`: stages `align run` trains
    before it)."""
    cfg = getattr(recipe, section)
    if cfg is None:
        raise RecipeError(f"the recipe has no {section} section; add one (see recipes/quickstart.yaml)")
    if not cfg.rewards:
        raise RecipeError(f"{section}.rewards is empty; list at least one reward, e.g. "
                          f"{section}.rewards=[{{name: reward_model}}] (see docs/rewards.md)")
    load_style(recipe.data.answer_style)
    checkpointing(cfg)
    if cfg.max_completion_length >= cfg.max_length:
        raise RecipeError(f"{section}.max_completion_length={cfg.max_completion_length} leaves no room for the "
                          f"prompt in {section}.max_length={cfg.max_length}")
    check_rewards(recipe, section, upcoming)
    init_adapter(recipe, section, upcoming)
    return cfg


def check_rewards(recipe: Recipe, section: str, upcoming: tuple[str, ...] = ()) -> None:
    """Each of the section's rewards can be built: a known name or a plug-in that imports, and for the reward
    model a checkpoint that is there (or a reward stage in `upcoming`)."""
    for spec in getattr(recipe, section).rewards:
        if spec.name == "reward_model":
            reward_checkpoint(recipe, spec, upcoming)
        else:
            reward_function(spec)


def held_out_prompts(recipe: Recipe, section: str, tokenizer, reports: list):
    """For a stage that trains offline (DPO, KTO): the held-out prompts (data.prompts.eval) whose answers its
    rewards score before and after, as GRPO's and PPO's are, or None when there are none or no reward scores
    them. Their report joins `reports`."""
    cfg = getattr(recipe, section)
    why = ("data.prompts.eval is not set" if recipe.data.prompts.eval is None else f"{section}.rewards is empty"
           if not cfg.rewards else f"{section}.eval_generations=0" if not cfg.eval_generations else None)
    if why:
        log.info("%s: no held-out answers are scored (%s)", section, why)
        return None
    prompts, report = prompt_data.load(recipe.data.prompts.eval, recipe.data, tokenizer,
                                   cfg.max_length - cfg.max_completion_length)
    reports.append(report)
    return prompts


def evaluate_answers(trainer, prompts, rewards: list[RewardFunc], recipe: Recipe, section: str, when: str) -> dict:
    """`evaluate` for a stage that trains offline: its own temperature and top_p for the sampled answers."""
    if prompts is None:
        return {}
    cfg = getattr(recipe, section)
    return evaluate(trainer.model, trainer.processing_class, prompts, rewards, cfg, when,
                    sampling={"temperature": cfg.temperature, "top_p": cfg.top_p}, trainer_state=trainer.state,
                    log_metrics=trainer.log, style=load_style(recipe.data.answer_style))


class RewardSpecs:
    """A stage's rewards, checked before any model loads (a typo fails in a second): the rule and plug-in
    functions, and the reward stage checkpoint each `reward_model` entry uses. `functions(policy)` builds the
    callable list once the policy exists (a reward model may run on its base)."""

    def __init__(self, recipe: Recipe, cfg: RLStage):
        self.recipe, self.cfg = recipe, cfg
        self.rules = {i: reward_function(s) for i, s in enumerate(cfg.rewards) if s.name != "reward_model"}
        self.checkpoints = {i: reward_checkpoint(recipe, s) for i, s in enumerate(cfg.rewards)
                            if s.name == "reward_model"}

    def functions(self, policy) -> list[RewardFunc]:
        return [self.rules.get(i) or reward_function(spec, self._scorer(spec, self.checkpoints[i], policy))
                for i, spec in enumerate(self.cfg.rewards)]

    def lineage(self) -> list[dict[str, Any]]:
        return [{"name": s.name, "weight": s.weight, "args": dict(s.args),
                 **({"checkpoint": str(self.checkpoints[i])} if i in self.checkpoints else {})}
                for i, s in enumerate(self.cfg.rewards)]

    def _scorer(self, spec, checkpoint: Path, policy):
        args = spec.args
        return reward_model_scorer(checkpoint, self.recipe.model, policy=policy,
                                   share_base=args.get("share_base", "auto"),
                                   batch_size=args.get("batch_size", self.cfg.per_device_eval_batch_size))


def reward_checkpoint(recipe: Recipe, spec, upcoming: tuple[str, ...] = ()) -> Path:
    """The reward stage checkpoint a reward_model reward uses: args.checkpoint, or this recipe's (auto; `upcoming`:
    stages `align run` trains first)."""
    check_reward_model_args(spec.args)
    choice = spec.args.get("checkpoint", "auto")
    setting = f"reward 'reward_model' (args.checkpoint={choice})"
    if choice == "auto":
        return finished_checkpoint(recipe, "reward", setting, "or set its args.checkpoint=<dir>", upcoming)
    return adapter_dir(choice, setting, "not a reward stage checkpoint")


def load_policy(recipe: Recipe, cfg: RLStage, init: Path | None, stage: str):
    """The policy as a PeftModel: base + the starting adapter (trainable), or + a fresh adapter. A PeftModel in
    both cases, so that the reference can be a frozen copy of its adapter (a fresh adapter's LoRA update is zero,
    so its copy is the base) and a reward model can share its base."""
    from peft import PeftModel, get_peft_model
    from transformers import set_seed

    set_seed(recipe.run.seed)  # a fresh adapter's initial weights
    model = load_model(recipe.model, activation_checkpointing=checkpointing(cfg))
    if init is None:
        log.info("%s: no SFT adapter to start from: the policy is a fresh LoRA adapter, and the reference is the "
                 "base model (a frozen copy of that adapter, whose LoRA update is zero)", stage)
        return get_peft_model(model, lora_config(recipe.lora))
    log.info("%s: the policy starts from %s; the reference is a frozen copy of it", stage, init)
    return PeftModel.from_pretrained(model, str(init), is_trainable=True)


def reference_description(init: Path | None) -> str:
    return f"the starting adapter {init}, frozen" if init else "the base model (fresh adapter's frozen copy)"


def warn_if_first_kl_not_zero(kl: float, tolerance: float = 1e-4) -> None:
    """The first KL is measured before any update, where the policy is the reference."""
    if abs(kl) > tolerance:
        log.warning("the KL to the reference is %.3g at the first step, before any update; it should be ~0: the "
                    "reference is not the policy this run started from", kl)


def evaluate(model, tokenizer, held_out, rewards: list[RewardFunc], cfg: RLStage, when: str, *,
             sampling: dict[str, Any], trainer_state=None, log_metrics: Callable[[dict], None],
             style: Callable[[str], str] | None = None) -> dict[str, Any]:
    """The first held-out prompts answered greedily, and `eval_samples` times each with the training `sampling`
    settings (the expected reward is what RL maximises; a greedy answer can flip on a small change), each answer
    scored by every reward function and their weighted sum, and with `style` (data.answer_style) each style's
    share (and accuracy: its mean exact_match, when that is a reward). Logged through `log_metrics`."""
    n = min(cfg.eval_generations, len(held_out)) if held_out is not None else 0
    if not n:
        return {}
    rows = held_out.select(range(n))
    columns = {k: rows[k] for k in rows.column_names if k != "prompt"}
    ask = dict(model=model, tokenizer=tokenizer, prompts=rows["prompt"], columns=columns, rewards=rewards, cfg=cfg,
               trainer_state=trainer_state, style=style)
    greedy, scores, totals, answers = _score(**ask, desc=f"{when}, greedy")
    result: dict[str, Any] = {"prompts": n, "greedy": greedy}
    if cfg.eval_samples:
        k = cfg.eval_samples
        result["sampled"] = _score(**ask, desc=f"{when}, {k} sampled each", sampling=sampling, per_prompt=k)[0]
        result["sampled"]["per_prompt"] = k
    result["samples"] = [{"prompt": p[-1]["content"], "completion": a, "reward": t,
                          "rewards": {name: values[i] for name, values in scores.items()},
                          **({"style": style(a)} if style else {}),
                          "columns": {c: v[i] for c, v in columns.items()}}  # apart: a column may be named 'answer'
                         for i, (p, a, t) in enumerate(zip(rows["prompt"], answers, totals))]
    log_metrics({f"eval_{decoding}_{key}": value for decoding in ("greedy", "sampled")
                 for key, value in result.get(decoding, {}).items()})
    for decoding in ("greedy", "sampled"):
        if decoding in result:
            log.info("%s training, %s: %d held-out prompts, mean reward %.4f (%s)%s", when, decoding, n,
                     result[decoding]["reward_mean"], ", ".join(f"{k.split('/')[1]} {v:.4f}" for k, v in
                                                                 result[decoding].items() if k.startswith("rewards/")),
                     describe(result[decoding]))
    return result


def score_completions(rewards: list[RewardFunc], prompts: list, answers: list[str], answer_ids: list[list[int]],
                      columns: dict[str, list], trainer_state=None) -> tuple[dict[str, list], list[float]]:
    """Every reward of each (prompt, answer) as TRL calls reward functions (conversational completions, the
    prompt data's other columns, completion_ids, trainer_state), and their weighted sum (a None counts 0)."""
    completions = [[{"role": "assistant", "content": a}] for a in answers]
    scores = {r.__name__: r(prompts, completions, completion_ids=answer_ids, trainer_state=trainer_state,
                            log_extra=lambda *a, **k: None, log_metric=lambda *a, **k: None, **columns)
              for r in rewards}
    totals = [sum(r.weight * (scores[r.__name__][i] or 0.0) for r in rewards) for i in range(len(answers))]
    return scores, totals


def _score(model, tokenizer, prompts, columns, rewards, cfg, trainer_state, style, desc, sampling=None, per_prompt=1):
    """Answers to `prompts` (`per_prompt` each), every reward and the weighted total: (summary, per-reward
    scores, totals, answers)."""
    answers, answer_ids = generate(model, tokenizer, prompts, max_new_tokens=cfg.max_completion_length,
                                   batch_size=max(1, cfg.per_device_eval_batch_size // per_prompt),
                                   desc=f"answering {len(prompts)} held-out prompts ({desc})", with_ids=True,
                                   sampling=sampling, per_prompt=per_prompt)
    repeat = lambda values: [v for v in values for _ in range(per_prompt)]  # noqa: E731
    scores, totals = score_completions(rewards, repeat(prompts), answers, answer_ids,
                                       {k: repeat(v) for k, v in columns.items()}, trainer_state)
    summary = {
        "reward_mean": statistics.fmean(totals),
        **{f"rewards/{name}": statistics.fmean(v for v in values if v is not None) for name, values in scores.items()
           if any(v is not None for v in values)},
        "completion_tokens_mean": statistics.fmean(len(ids) for ids in answer_ids),
        # the share of answers that ended at the end-of-turn token rather than at max_completion_length (not named
        # *_fraction: that names an answer style's share)
        "ended_at_eos": statistics.fmean(float(bool(ids) and ids[-1] == tokenizer.eos_token_id) for ids in answer_ids),
    }
    if style is not None:
        correct = [v or 0.0 for v in scores["exact_match"]] if "exact_match" in scores else None
        summary.update(breakdown([style(a) for a in answers], correct))
    return summary, scores, totals, answers


def finish(run_dir: RunDir, *, init: Path | None, resume_from: Path | None, steps: int, seconds: float,
           kl: tuple[float | None, float | None, float | None], before: dict, after: dict, **extra: Any) -> dict:
    """An RL stage's results (lineage.json, the CLI's report), with samples.jsonl written: where the policy
    started, steps and time, the KL to the reference (first, last, max), the held-out evaluations, and `extra`."""
    from align.rundir import step_of

    results = {**extra, "init_from": str(init) if init else None, "steps": steps, "train_seconds": round(seconds, 1),
               "resumed_from_step": step_of(resume_from) if resume_from else None,
               "kl_first": kl[0], "kl_last": kl[1], "kl_max": kl[2], "before": before, "after": after,
               "checkpoint": str(run_dir.checkpoint_path), "run_dir": str(run_dir.path)}
    write_samples(run_dir, before, after)
    run_dir.finish(results)
    return results


def write_samples(run_dir: RunDir, before: dict, after: dict) -> None:
    """Held-out answers before and after training, side by side, in samples.jsonl."""
    if "samples" not in after:
        return
    run_dir.write_samples([
        {"prompt": b["prompt"], "columns": b["columns"], "before": b["completion"], "after": a["completion"],
         "reward_before": b["reward"], "reward_after": a["reward"], "rewards_before": b["rewards"],
         "rewards_after": a["rewards"]}
        for b, a in zip(before.pop("samples"), after.pop("samples"))
    ])


def train_offline(recipe: Recipe, section: str, *, resume: bool, load_data, trainer, held_out_metrics,
                  logged_results: Callable[[list[dict], Any], dict]) -> dict[str, Any]:
    """The run of a stage that trains offline against a frozen copy of the adapter it starts from (DPO, KTO):
    its data and held-out prompts read and checked, the memory estimate, the policy, TRL's trainer
    (`trainer(recipe, model, tokenizer, train, held_out, run_dir)`), the held-out evaluation before and after
    (`held_out_metrics(trainer, held_out, when)` on its own held-out data, plus the prompts' answers), training,
    the policy adapter saved without TRL's "ref" copy, and the results, with `logged_results(metrics.jsonl
    records, cfg)` added."""
    cfg = getattr(recipe, section)
    run_dir = RunDir(recipe, section)
    init = init_adapter(recipe, section)
    specs = RewardSpecs(recipe, cfg)
    tokenizer = load_tokenizer(recipe.model)
    train, held_out, reports = load_data(recipe, tokenizer)
    prompts = held_out_prompts(recipe, section, tokenizer, reports)
    memory.check(recipe, section, reports[0])  # before a model loads: a batch that cannot fit stops now
    model = load_policy(recipe, cfg, init, section)
    rewards = specs.functions(model)
    resume_from = run_dir.resume_from() if resume else None
    built = trainer(recipe, model, tokenizer, train, held_out, run_dir)
    run_dir.start(base_model=model_identity(recipe.model), data=[r.summary() for r in reports],
                  parent=str(init) if init else None, reference=reference_description(init),
                  rewards=specs.lineage(), resumed_from=resume_from)

    def evaluate(when: str) -> dict[str, Any]:
        measured = held_out_metrics(built, held_out, when) if held_out is not None else {}
        return measured | evaluate_answers(built, prompts, rewards, recipe, section, when)

    before = run_dir.evaluated_before(lambda: evaluate("before"))
    start = time.monotonic()
    train_output = guarded_train(built, section, resume_from_checkpoint=resume_from)
    seconds = time.monotonic() - start
    after = evaluate("after")

    checksums = check_identical(built.model, section)
    with run_dir.checkpoint() as staging:
        if is_main_process():
            built.model.save_pretrained(str(staging), selected_adapters=["default"])  # not TRL's "ref" copy
            tokenizer.save_pretrained(str(staging))
    extra = logged_results(run_dir.logged(), cfg)
    return finish(run_dir, init=init, resume_from=resume_from, steps=built.state.global_step, seconds=seconds,
                  kl=extra.pop("kl", (None, None, None)), before=before, after=after,
                  train_loss=train_output.training_loss, **extra, **batch(built), rank_checksums=checksums)
