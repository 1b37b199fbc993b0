"""`align compare`: aligned checkpoints side by side on one prompt set.

    align compare base=data/tiny-base sft=runs/quickstart/sft rl=runs/quickstart/grpo \
        --eval data/arithmetic/sft_heldout.jsonl --reward runs/quickstart/reward

Every checkpoint answers every eval prompt with the same seed and decoding settings (sampled at `temperature`
by default, `answers_per_prompt` answers each, batched). Per checkpoint, over all answers, with intervals from
resampling prompts:
- reward: the reward model's score of each answer; mean, std and a 95% bootstrap interval over prompts;
- win rate against the baseline: per prompt (and answer i of it against the baseline's answer i), the reward
  model prefers this answer (win), the baseline's (loss),
  or neither (tie: equal scores, e.g. identical answers); win rate = (wins + ties / 2) / prompts, with ties also
  reported on their own, and a bootstrap interval;
- KL to the reference: the Monte-Carlo estimate mean over prompts of sum_t [log pi(y_t | x, y_<t) -
  log pi_ref(y_t | x, y_<t)] on the checkpoint's own answers y ~ pi (at temperature 1 an unbiased estimate of
  KL(pi || pi_ref) per answer, in nats; under other decoding settings a measure of the same drift, not the
  KL). The reference is the policy an RL checkpoint started from (its lineage) or --reference;
- accuracy: exact match of the final number with the eval set's reference answers, or a plug-in check
  (`pkg.mod:fn`, the RL reward-function signature); and for every two checkpoints the difference of their
  accuracies with the 95% interval of the *paired* difference (prompts resampled together for both);
- length: mean answer tokens and characters; and a few prompts with every checkpoint's answer.
One base model is in memory at a time (and then the reward model): checkpoints that are adapters of the same base
are adapters on one loaded copy of it, with their references, so the base loads and quantises once. Writes
results.json, report.md and a self-contained report.html (align/report.py).
"""

from __future__ import annotations

import gc
import json
import logging
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from align import registry
from align.errors import AlignError
from align.recipe import DataConfig, ModelConfig, Quantization, RewardFunction
from align.rundir import base_problem, parent_problem, policy_checkpoint, sha256_of, stage_model

log = logging.getLogger(__name__)


class CompareError(AlignError, ValueError):
    """A checkpoint, eval file or option that compare cannot use; raised before any generation."""


@dataclass
class Checkpoint:
    """One thing to compare: a LoRA adapter on its base (`adapter` set) or a whole model (`model.name_or_path`)."""

    name: str
    source: str
    model: ModelConfig
    adapter: Path | None = None
    lineage: dict[str, Any] | None = None
    reference: "Checkpoint | None" = None
    system_prompt: str | None = None  # data.system_prompt of the run it comes from (its config.yaml)
    from_run: bool = False

    @property
    def key(self) -> str:  # what identifies the weights, for loading a shared reference once
        return f"{self.model.name_or_path}+{self.adapter}"


def resolve(spec: str, quantization: Quantization = Quantization.nf4, trust_remote_code: bool = False, *,
            with_reference: bool = True) -> Checkpoint:
    """`name=path` or `path`: a run dir, a stage dir or checkpoint (its policy adapter, loaded on the base the stage
    trained on, from its config.yaml, checked against lineage.json's digest of it), an exported model dir, or a
    hub model id (loaded with `quantization`). `with_reference`: an RL checkpoint's reference from its lineage,
    checked to be the policy it started from."""
    from align.data.files import HUB_ID

    name, _, path = spec.rpartition("=")
    where = Path(path)
    if where.is_dir() and not (where / "config.json").is_file():
        try:
            adapter = policy_checkpoint(where)
        except AlignError as e:
            raise CompareError(f"{spec}: {e}") from None
        stage_dir = adapter.parent
        lineage = json.loads((stage_dir / "lineage.json").read_text()) if (stage_dir / "lineage.json").is_file() else None
        model = stage_model(stage_dir, trust_remote_code=trust_remote_code) or _adapter_base(adapter, quantization)
        problem = base_problem(stage_dir, model)
        if problem:
            raise CompareError(f"{spec}: {problem}; point model.name_or_path in {stage_dir / 'config.yaml'} at the "
                               "base it trained on")
        default_name = f"{lineage['run']}/{lineage['stage']}" if lineage else adapter.name
        checkpoint = Checkpoint(name or default_name, spec, model, adapter, lineage)
        checkpoint.reference = _reference(checkpoint) if with_reference else None
        if (stage_dir / "config.yaml").is_file():
            from align.recipe import load_recipe

            checkpoint.system_prompt = load_recipe(stage_dir / "config.yaml").data.system_prompt
            checkpoint.from_run = True
        return checkpoint
    if where.is_dir():
        return Checkpoint(name or where.name, spec, ModelConfig(name_or_path=path, quantization=quantization,
                                                                trust_remote_code=trust_remote_code))
    problem = "not a hub model id (owner/name)"
    if HUB_ID.match(path):
        from transformers import AutoConfig

        try:  # the config only: a typo or no hub access shows now, not after the other checkpoints generated
            AutoConfig.from_pretrained(path)
            return Checkpoint(name or path, spec, ModelConfig(name_or_path=path, quantization=quantization,
                                                              trust_remote_code=trust_remote_code))
        except (OSError, ValueError) as e:
            problem = f"and as a hub model id it does not load: {str(e).splitlines()[0]}"
    raise CompareError(f"{spec}: no such run dir, checkpoint or model directory, {problem}")


def _adapter_base(adapter: Path, quantization: Quantization) -> ModelConfig:
    from peft import PeftConfig

    return ModelConfig(name_or_path=PeftConfig.from_pretrained(str(adapter)).base_model_name_or_path,
                       quantization=quantization)


def _reference(checkpoint: Checkpoint) -> Checkpoint | None:
    """The policy an RL checkpoint started from, as its lineage records it: its parent adapter, or the base model
    (a fresh adapter's reference). None for SFT and other checkpoints: no reference is implied."""
    lineage = checkpoint.lineage or {}
    spec = registry.BY_NAME.get(lineage.get("stage"))
    if spec is None or not spec.reference:
        return None
    parent = lineage.get("parent_checkpoint")
    if parent is None:
        return Checkpoint("base", checkpoint.model.name_or_path, checkpoint.model)
    problem = parent_problem(lineage)
    if problem:
        raise CompareError(f"{checkpoint.name}: {problem}; its KL could be measured against another policy. Pass "
                           "--reference with the policy it started from (e.g. the run's sft stage)")
    return Checkpoint("reference", parent, checkpoint.model, Path(parent))


@dataclass
class Answers:
    texts: list[str]
    ids: list[list[int]]
    logprobs: list[float] = field(default_factory=list)  # sum over each answer's tokens, under its own model
    ref_logprobs: list[float] = field(default_factory=list)


class Models:
    """The checkpoints' models, one base in memory at a time. A checkpoint on the base already loaded is one more
    adapter on it (PEFT's load_adapter; a base checkpoint runs with the adapters disabled), so comparing several
    adapters of one base and their reference loads and quantises that base once, not once per checkpoint."""

    def __init__(self):
        self.config: ModelConfig | None = None
        self.model = None  # the loaded base; a PeftModel on it once an adapter is loaded
        self.adapters: dict[str, str] = {}  # adapter directory -> its name on self.model

    @contextmanager
    def of(self, checkpoint: Checkpoint):
        """(model, tokenizer) of `checkpoint`, with its tokenizer (`modeling.checkpoint_tokenizer`)."""
        from peft import PeftModel

        from align.modeling import checkpoint_tokenizer, load_model, load_tokenizer

        if checkpoint.model != self.config:
            self.release()
            self.model, self.config = load_model(checkpoint.model), checkpoint.model
        if checkpoint.adapter is None:
            with self.model.disable_adapter() if self.adapters else nullcontext():
                yield self.model, load_tokenizer(checkpoint.model)
            return
        key = str(checkpoint.adapter)
        if key not in self.adapters:
            self.adapters[key] = name = f"checkpoint_{len(self.adapters)}"
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(key, adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, key, adapter_name=name)
        self.model.set_adapter(self.adapters[key])
        yield self.model, checkpoint_tokenizer(checkpoint.adapter, checkpoint.model)

    def release(self) -> None:
        """Free the loaded base and its adapters before another loads (or the reward model does)."""
        self.model, self.config, self.adapters = None, None, {}
        _release_memory()


@torch.no_grad()
def answer_logprobs(model, tokenizer, prompts: list[list[dict]], answers: list[list[int]], *, batch_size: int,
                    temperature: float = 1.0) -> list[float]:
    """Sum of log-probabilities of each answer's tokens after its prompt (rendered as in generation)."""
    from trl.trainer.utils import selective_log_softmax

    from align.generation import position_ids
    from align.modeling import prompt_ids

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    totals = []
    for start in range(0, len(prompts), batch_size):
        rows = [(prompt_ids(tokenizer, p), a) for p, a in zip(prompts[start:start + batch_size],
                                                               answers[start:start + batch_size])]
        width = max(len(p) for p, _ in rows)  # left-pad prompts, right-pad answers: answers start at `width`
        length = max(len(a) for _, a in rows) or 1
        ids = torch.tensor([[pad] * (width - len(p)) + p + a + [pad] * (length - len(a)) for p, a in rows], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * (len(p) + len(a)) + [0] * (length - len(a))
                             for p, a in rows], device=device)
        # the LM head on the positions that predict the answer (and the last), not on every prompt token
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                       logits_to_keep=length + 1).logits[:, :-1].float()
        logprobs = selective_log_softmax(logits, ids[:, width:], temperature=temperature)
        answer_mask = mask[:, width:].bool()
        totals.extend((logprobs * answer_mask).sum(1).tolist())
    return totals


def bootstrap(values: np.ndarray, statistic, *, resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of `statistic` over prompts resampled with replacement (rows of `values`: a prompt's
    answers stay together)."""
    rng = np.random.default_rng(seed)
    n = len(values)
    stats = [statistic(values[rng.integers(0, n, n)]) for _ in range(resamples)]
    return float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))


def win_rate(rewards: np.ndarray, baseline: np.ndarray) -> dict[str, float]:
    """Wins, ties and losses of `rewards` against `baseline` prompt by prompt; win rate counts a tie as half."""
    wins, ties = float(np.mean(rewards > baseline)), float(np.mean(rewards == baseline))
    return {"win_rate": wins + ties / 2, "wins": wins, "ties": ties, "losses": 1 - wins - ties}


def summarise(rewards: np.ndarray | None, baseline: np.ndarray | None, kl: np.ndarray | None,
              correct: np.ndarray | None, tokens: np.ndarray, chars: np.ndarray, seed: int,
              styles: np.ndarray | None = None) -> dict[str, Any]:
    """Every number of one checkpoint, from arrays of prompts x answers per prompt; each mean with its 95%
    bootstrap interval over prompts. `styles`: each answer's style name (--answer-style): each style's share (with
    its interval) and accuracy over that style's answers."""
    mean_ci = lambda v: {"mean": float(np.mean(v)), "ci95": bootstrap(v, np.mean, seed=seed)}  # noqa: E731
    result: dict[str, Any] = {"length_tokens": float(tokens.mean()), "length_chars": float(chars.mean())}
    if rewards is not None:
        result["reward"] = {**mean_ci(rewards), "std": float(rewards.std())}
        pairs = np.stack([rewards, baseline], axis=-1)  # answer i to a prompt against the baseline's answer i
        result["win_rate"] = {**win_rate(rewards, baseline),
                              "ci95": bootstrap(pairs, lambda p: win_rate(p[..., 0], p[..., 1])["win_rate"], seed=seed)}
    if kl is not None:
        result["kl"] = {**mean_ci(kl), "std": float(kl.std())}
    if correct is not None:
        result["accuracy"] = mean_ci(correct)
    if styles is not None:
        result["styles"] = {}
        for name in sorted(set(styles.ravel())):
            mine = styles == name
            result["styles"][name] = {"fraction": mean_ci(mine.astype(float)),
                                      **({"accuracy": float(correct[mine].mean())} if correct is not None else {})}
    return result


def paired_differences(correct: dict[str, np.ndarray], *, seed: int) -> list[dict[str, Any]]:
    """Accuracy of each checkpoint minus that of each one listed before it, on the same prompts: the mean of the
    per-prompt differences, with a 95% bootstrap interval over prompts resampled together for both (a paired
    interval: far narrower than the two accuracies' own intervals when both answer the same prompts alike).
    `correct`: per checkpoint, prompts x answers per prompt of 0/1, in the order given."""
    names, pairs = list(correct), []
    for j, later in enumerate(names):
        for earlier in names[:j]:
            both = np.stack([correct[later].mean(1), correct[earlier].mean(1)], axis=-1)
            difference = lambda p: float(np.mean(p[:, 0] - p[:, 1]))  # noqa: E731
            pairs.append({"checkpoint": later, "minus": earlier, "difference": difference(both),
                          "ci95": bootstrap(both, difference, seed=seed)})
    return pairs


def compare(specs: list[str], eval_path: str, *, out: Path, reward: str | None = None, baseline: str | None = None,
            reference: str | None = None, accuracy: str | None = None, answer_column: str | None = None,
            answer_style: str | None = None,
            columns: dict[str, str] | None = None, system_prompt: str | None = None, max_new_tokens: int = 128,
            temperature: float = 1.0, top_p: float = 1.0, answers_per_prompt: int = 1, batch_size: int = 32, samples: int = 5, seed: int = 0,
            quantization: Quantization = Quantization.nf4, trust_remote_code: bool = False) -> dict[str, Any]:
    """Answer, score and report; returns what results.json holds. Everything that can be checked is checked
    before the first model loads."""
    from transformers import set_seed

    from align.data import prompts as prompt_data
    from align.generation import generate
    from align.modeling import load_tokenizer
    from align.recipe import Columns
    from align.rewards import RewardModelScorer
    from align.styles import load_style

    k = answers_per_prompt
    if k < 1 or (k > 1 and temperature <= 0):
        raise CompareError(f"--answers-per-prompt {k}: needs to be >= 1, and 1 with greedy decoding (temperature 0)")
    checkpoints = [resolve(spec, quantization, trust_remote_code, with_reference=reference is None) for spec in specs]
    names = [c.name for c in checkpoints]
    if len(set(names)) < len(names):
        raise CompareError(f"two checkpoints have the same name ({', '.join(names)}); label them as name=path")
    base_name = baseline or names[0]
    if base_name not in names:
        raise CompareError(f"--baseline {base_name}: not one of the checkpoints ({', '.join(names)})")
    if reference is not None:
        for checkpoint in checkpoints:
            checkpoint.reference = resolve(f"reference={reference}", quantization, trust_remote_code)
    reward_checkpoint = _reward_checkpoint(reward, checkpoints)
    system_prompt = common_system_prompt(system_prompt, checkpoints)
    data_cfg = DataConfig(columns=Columns(**(columns or {})), system_prompt=system_prompt)
    tokenizer = load_tokenizer(checkpoints[0].model)
    held_out, report = prompt_data.load(eval_path, data_cfg, tokenizer, max_length=1 << 30)
    prompts = held_out["prompt"]
    data_columns = {c: held_out[c] for c in held_out.column_names if c != "prompt"}
    repeat = lambda values: [v for v in values for _ in range(k)]  # noqa: E731  (a prompt's answers are adjacent)
    check = _accuracy_check(accuracy, answer_column, data_columns)
    style = load_style(answer_style, where="--answer-style")
    sampling = {"temperature": temperature, "top_p": top_p} if temperature > 0 else None
    log.info("compare: %d checkpoints x %d prompts (%s)", len(checkpoints), len(prompts),
             f"sampled at temperature {temperature}" if sampling else "greedy")

    answers: dict[str, Answers] = {}
    models = Models()
    for checkpoint in checkpoints:
        with models.of(checkpoint) as (model, tok):
            set_seed(seed)  # the same random stream for every checkpoint
            texts, ids = generate(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                  desc=f"{checkpoint.name}: answering {len(prompts)} prompts", with_ids=True,
                                  sampling=sampling, per_prompt=k)
            answers[checkpoint.name] = Answers(texts, ids)
            if checkpoint.reference is not None:
                answers[checkpoint.name].logprobs = answer_logprobs(model, tok, repeat(prompts), ids,
                                                                    batch_size=batch_size)
    for key in dict.fromkeys(c.reference.key for c in checkpoints if c.reference is not None):
        sharing = [c for c in checkpoints if c.reference is not None and c.reference.key == key]
        with models.of(sharing[0].reference) as (model, tok):
            for checkpoint in sharing:
                answers[checkpoint.name].ref_logprobs = answer_logprobs(
                    model, tok, repeat(prompts), answers[checkpoint.name].ids, batch_size=batch_size)
    models.release()

    rewards: dict[str, np.ndarray] = {}
    if reward_checkpoint is not None:
        base = stage_model(reward_checkpoint.parent, trust_remote_code=trust_remote_code)
        scorer = RewardModelScorer.from_checkpoint(reward_checkpoint, base, batch_size=batch_size)
        rewards = {name: np.array(scorer.score(repeat(prompts), a.texts)).reshape(-1, k) for name, a in answers.items()}
        del scorer
        _release_memory()

    results: dict[str, Any] = {
        "eval": {"path": eval_path, "sha256": sha256_of(eval_path), "prompts": len(prompts), **report.summary()},
        "settings": {"seed": seed, "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens,
                     "answers_per_prompt": k, "system_prompt": system_prompt,
                     "baseline": base_name, "reward_model": str(reward_checkpoint) if reward_checkpoint else None,
                     "accuracy": check.__name__ if check else None, "answer_style": answer_style,
                     "kl_estimator": "mean over prompts of sum_t log pi(y_t) - log pi_ref(y_t), y ~ pi"},
        "checkpoints": {},
    }
    corrects: dict[str, np.ndarray] = {}
    for checkpoint in checkpoints:
        a = answers[checkpoint.name]
        correct = None
        if check is not None:
            scores = check(repeat(prompts), [[{"role": "assistant", "content": t}] for t in a.texts],
                           completion_ids=a.ids, **{c: repeat(v) for c, v in data_columns.items()})
            correct = corrects[checkpoint.name] = np.array([s or 0.0 for s in scores], dtype=float).reshape(-1, k)
        kl = (np.array(a.logprobs) - np.array(a.ref_logprobs)).reshape(-1, k) if a.ref_logprobs else None
        lengths = lambda values: np.array([len(v) for v in values], dtype=float).reshape(-1, k)  # noqa: E731
        styles = np.array([style(t) for t in a.texts], dtype=object).reshape(-1, k) if style else None
        metrics = summarise(rewards.get(checkpoint.name), rewards.get(base_name), kl, correct, lengths(a.ids),
                            lengths(a.texts), seed, styles)
        results["checkpoints"][checkpoint.name] = {
            "source": checkpoint.source, "adapter": str(checkpoint.adapter) if checkpoint.adapter else None,
            "base_model": checkpoint.model.name_or_path, "quantization": checkpoint.model.quantization.value,
            "reference": checkpoint.reference.source if checkpoint.reference else None,
            "lineage": checkpoint.lineage, "metrics": metrics,
            "rewards": rewards[checkpoint.name].ravel().tolist() if checkpoint.name in rewards else None,
            "lengths": [len(i) for i in a.ids]}
    if corrects:
        results["paired_accuracy"] = paired_differences(corrects, seed=seed)
    results["samples"] = [{"prompt": prompts[i][-1]["content"],
                           **({"reference": str(data_columns[answer_column or "answer"][i])}
                              if (answer_column or "answer") in data_columns else {}),
                           "answers": {name: answers[name].texts[i * k] for name in names}}
                          for i in range(min(samples, len(prompts)))]
    from align.report import write_reports

    write_reports(results, Path(out))
    return results


def common_system_prompt(given: str | None, checkpoints: list[Checkpoint]) -> str | None:
    """The system prompt every checkpoint answers under: --system-prompt, else the one the run-dir checkpoints
    trained with (their data.system_prompt), which must then be one; None: the chat template's own."""
    if given is not None:
        return given or None
    used = {c.system_prompt for c in checkpoints if c.from_run}
    if len(used) > 1:
        listed = "; ".join(f"{c.name}: {c.system_prompt!r}" for c in checkpoints if c.from_run)
        raise CompareError(f"the checkpoints were trained with different system prompts ({listed}); choose the one "
                           "every checkpoint answers under with --system-prompt TEXT ('' for the template's own)")
    chosen = next(iter(used), None)
    if chosen:
        log.info("compare: every checkpoint answers under the system prompt its runs trained with: %r", chosen)
    return chosen


def _reward_checkpoint(reward: str | None, checkpoints: list[Checkpoint]) -> Path | None:
    """--reward (a run dir or a reward checkpoint), else the reward model the compared RL checkpoints used."""
    if reward is not None:
        where = Path(reward)
        for candidate in (where, where / "checkpoint", where / "reward" / "checkpoint"):
            if (candidate / "adapter_config.json").is_file():
                return candidate
        raise CompareError(f"--reward {reward}: no reward checkpoint there (a run dir, runs/<run>/reward, or its "
                           "checkpoint/)")
    for checkpoint in checkpoints:
        for spec in (checkpoint.lineage or {}).get("rewards", []):
            if spec.get("checkpoint"):
                return Path(spec["checkpoint"])
    log.warning("compare: no reward model (--reward, or one in an RL checkpoint's lineage): no reward, no win rate")
    return None



def _accuracy_check(accuracy: str | None, answer_column: str | None, columns: dict[str, list]):
    """The reward function that marks an answer right (1) or wrong (0), or None when there is nothing to check."""
    from align.rewards import reward_function

    if accuracy is not None:
        return reward_function(RewardFunction(name=accuracy, args={"column": answer_column} if answer_column else {}))
    column = answer_column or "answer"
    if column not in columns:
        if answer_column:
            raise CompareError(f"--answer-column {answer_column}: the eval file has no such column "
                               f"(columns: {', '.join(columns) or 'none'})")
        log.info("compare: the eval file has no 'answer' column: no accuracy (set --answer-column)")
        return None
    return reward_function(RewardFunction(name="exact_match", args={"column": column}))


def _release_memory() -> None:
    """Free what the last model held before the next one loads (one model at a time)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
