"""Rewards: the reward model's scores, rule rewards that need no model, and the user's own reward functions.

Every reward an RL stage optimises is a function with TRL's reward signature,
`fn(prompts, completions, **kwargs) -> list[float | None]`, where kwargs holds the prompt data's other columns
(e.g. a reference answer), `completion_ids` and TRL's `trainer_state`; None means "does not apply". Recipes list
them by name with a weight (`RewardFunction`): `reward_model` (a reward stage checkpoint), the rules below, or a
plug-in `package.module:function`. `reward_function` checks a spec before any model loads and wraps the function
so that a wrong number of values, NaN or a non-number is an error naming the reward, not a crash inside TRL.

`RewardModelScorer` scores (prompt, completion) pairs with a reward stage checkpoint, formatting them exactly as
the reward stage trained on them (`modeling.conversation_ids`, right padding, score at the last non-pad token),
so a score read here equals the one the trainer saw. It runs on its own base model, or on the policy's base
(`SharedBaseRewardModel`) when both are the same model: one copy of the 4-bit weights in memory.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import logging
import math
import numbers
import re
import sys
import threading
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from align.errors import AlignError
from align.modeling import conversation_ids

log = logging.getLogger(__name__)

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """The last number in `text`, without thousands separators; None if there is none."""
    numbers = NUMBER.findall(text)
    return numbers[-1].replace(",", "").rstrip(".") if numbers else None


def final_answer_match(completion: str, reference: str) -> bool:
    """Whether the completion ends on the same number as the reference answer."""
    expected = final_number(reference)
    return expected is not None and final_number(completion) == expected


@torch.no_grad()
def score_conversations(model, tokenizer, conversations: list[list[dict]], *, batch_size: int = 16,
                        desc: str | None = "scoring") -> list[float]:
    """The reward model's score of each whole conversation (prompt + answer). Batches are padded on the right,
    as TRL's DataCollatorForPreference pads them in training, and the model reads the score at the last token
    that is not padding (transformers' sequence-classification heads, given config.pad_token_id). A progress
    bar named `desc` shows for more than one batch; None: none."""
    pad = tokenizer.pad_token_id
    if pad is None:
        raise ValueError("the tokenizer has no pad token; batched scoring needs one (modeling.load_tokenizer sets it)")
    model.config.pad_token_id = pad
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = conversation_ids(tokenizer, conversations)
    scores: list[float] = []
    for start in tqdm(range(0, len(ids), batch_size), desc=desc, leave=False, disable=desc is None or len(ids) <= batch_size):
        batch = ids[start : start + batch_size]
        width = max(len(x) for x in batch)
        input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in batch], device=device)
        attention_mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in batch], device=device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, 1)
        scores.extend(logits[:, 0].float().tolist())
    model.train(was_training)
    return scores


def as_messages(prompt: str | list[dict], completion: str | list[dict]) -> list[dict]:
    """A (prompt, completion) pair as one conversation; text becomes a user turn and an assistant turn."""
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    completion = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else list(completion)
    return prompt + completion


class RewardModelScorer:
    """A reward model ready to score batches of (prompt, completion): prompts and completions as text or as
    messages (TRL's conversational format)."""

    def __init__(self, model, tokenizer, *, batch_size: int = 16):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, model_cfg=None, *, batch_size: int = 16) -> "RewardModelScorer":
        """Load a reward stage checkpoint (LoRA adapter + score head + tokenizer) onto its base model. `model_cfg`
        (the recipe's `model` section) says how to load the base (4-bit or not); by default the base named in
        the adapter's config, in 4-bit NF4."""
        from peft import PeftConfig, PeftModel
        from transformers import AutoTokenizer

        from align.modeling import load_model
        from align.recipe import ModelConfig

        if model_cfg is None:
            model_cfg = ModelConfig(name_or_path=PeftConfig.from_pretrained(str(checkpoint)).base_model_name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))  # with the chat template the stage trained with
        model = PeftModel.from_pretrained(load_model(model_cfg, head="score"), str(checkpoint))
        return cls(model, tokenizer, batch_size=batch_size)

    def score(self, prompts: list, completions: list) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        conversations = [as_messages(p, c) for p, c in zip(prompts, completions)]
        # No progress bar of its own: it runs as a reward inside the RL stages' steps, which have theirs.
        return score_conversations(self.model, self.tokenizer, conversations, batch_size=self.batch_size, desc=None)



class SharedBaseRewardModel(torch.nn.Module):
    """A reward stage checkpoint run on the policy's base weights instead of a second copy of them: its LoRA is
    a second adapter of the policy's PeftModel (`adapter`, "reward"), and its score head reads the base model's
    last hidden state at the last non-pad token, exactly as transformers' sequence-classification heads do. Gives
    the reward model's own scores (tests compare the two) for the memory of one adapter and one linear head.

    PPO's value model is the same thing, trainable and read at every token (`token_scores`): adapter "value",
    from a reward checkpoint, or with `checkpoint=None` a copy of the policy's own adapter and a zero head."""

    def __init__(self, policy, checkpoint: str | Path | None, *, adapter: str = "reward", trainable: bool = False):
        from peft import PeftConfig

        from align.modeling import copy_adapter_weights, load_adapter_weights

        super().__init__()
        self.__dict__["policy"] = policy  # not a submodule: eval()/train() of the scorer must not touch the policy
        self.adapter = adapter
        config = PeftConfig.from_pretrained(str(checkpoint)) if checkpoint else copy.deepcopy(policy.peft_config["default"])
        config.modules_to_save, config.task_type = None, policy.peft_config["default"].task_type
        config.inference_mode = not trainable
        policy.add_adapter(adapter, config)
        if checkpoint:
            head = load_adapter_weights(policy, checkpoint, adapter_name=adapter)
            if len(head) != 1 or next(iter(head.values())).shape[0] != 1:
                raise RewardError(f"{checkpoint}: expected one score head beside the LoRA weights, found "
                                  f"{sorted(head) or 'none'}; set the reward_model's args.share_base=false")
            weight = next(iter(head.values()))
        else:
            copy_adapter_weights(policy, "default", adapter)
            weight = torch.zeros(1, policy.get_base_model().config.hidden_size)
        for name, param in policy.named_parameters():
            if f".{adapter}." in name:
                param.requires_grad_(trainable)
        device = next(policy.parameters()).device
        self.score = torch.nn.Linear(weight.shape[1], 1, bias=False, device=device)
        self.score.weight.data = weight.to(device, torch.float32)
        self.score.requires_grad_(trainable)
        self.config = SimpleNamespace(pad_token_id=None)  # set by score_conversations
        self.eval()

    def parameters_of_adapter(self) -> list[torch.nn.Parameter]:
        """The adapter's LoRA weights and the head: what a trainable one optimises."""
        return [p for n, p in self.policy.named_parameters() if f".{self.adapter}." in n] + [self.score.weight]

    def save(self, directory: str | Path) -> None:
        """The adapter and head in a reward stage checkpoint's layout (what `checkpoint` takes)."""
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        weights = get_peft_model_state_dict(self.policy, adapter_name=self.adapter)
        weights["score.weight"] = self.score.weight
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, directory / "adapter_model.safetensors")
        self.policy.peft_config[self.adapter].save_pretrained(str(directory))

    def token_scores(self, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        """The head's output at every position, (batch, length), in the policy's current train/eval mode."""
        from trl.trainer.utils import use_adapter

        with use_adapter(self.policy, self.adapter):
            body = self.policy.get_base_model().base_model  # the transformer without the LM head
            hidden = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
        return self.score(hidden.to(self.score.weight.dtype)).squeeze(-1)

    def forward(self, input_ids, attention_mask):
        policy = self.policy
        was_training = policy.training
        policy.eval()  # no dropout while scoring, whatever the policy is doing
        try:
            scores = self.token_scores(input_ids, attention_mask)
        finally:
            policy.train(was_training)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        last = (positions * (input_ids != self.config.pad_token_id)).argmax(-1)  # as in transformers' heads
        return SimpleNamespace(logits=scores[torch.arange(len(input_ids), device=scores.device), last, None])


def reward_model_scorer(checkpoint: str | Path, model_cfg, *, policy=None, share_base: bool | str = "auto",
                        batch_size: int = 16) -> RewardModelScorer:
    """The reward model of `checkpoint`, on the policy's base when it was trained on the same base model
    (`share_base` auto; true insists, false never shares), else on its own copy of its base model."""
    import dataclasses

    from peft import PeftConfig

    base = PeftConfig.from_pretrained(str(checkpoint)).base_model_name_or_path
    same = base == model_cfg.name_or_path or (Path(base).is_dir() and Path(base).resolve() == Path(model_cfg.name_or_path).resolve())
    if share_base not in (True, False, "auto"):
        raise RewardError(f"reward 'reward_model': args.share_base is {share_base!r}; use auto, true or false")
    if share_base is True and (policy is None or not same):
        raise RewardError(f"reward 'reward_model': args.share_base=true, but {checkpoint} was trained on {base}, "
                          f"not the policy's base {model_cfg.name_or_path}")
    if policy is not None and same and share_base is not False:
        log.info("reward model %s runs on the policy's base weights (a second adapter + score head; no second "
                 "copy of the base)", checkpoint)
        from transformers import AutoTokenizer

        return RewardModelScorer(SharedBaseRewardModel(policy, checkpoint), AutoTokenizer.from_pretrained(str(checkpoint)),
                                 batch_size=batch_size)
    if not same:
        model_cfg = dataclasses.replace(model_cfg, name_or_path=base, revision=None)
    log.info("reward model %s loads its own copy of its base %s", checkpoint, base)
    return RewardModelScorer.from_checkpoint(checkpoint, model_cfg, batch_size=batch_size)

class RewardError(AlignError, ValueError):
    """A reward function that cannot be used as specified; the message names it and what is wrong."""


class RewardFailed(RewardError):
    """A reward function raised or hung during a stage; `details` is its traceback (or where it hung)."""

    def __init__(self, message: str, *, details: str):
        super().__init__(message)
        self.details = details


# -- rule rewards shipped with align --------------------------------------------------------------------------


def completion_text(completion: str | list[dict]) -> str:
    """The text of a completion, given as text or as TRL's conversational [{role: assistant, content}]."""
    return completion if isinstance(completion, str) else "".join(m["content"] for m in completion)


def exact_match(prompts, completions, *, column: str = "answer", **data) -> list[float]:
    """1.0 where the completion's final number equals that of the reference answer in `column`, else 0.0."""
    if column not in data:
        columns = sorted(k for k in data if k not in ("completion_ids", "trainer_state", "log_extra", "log_metric"))
        raise RewardError(f"exact_match: the prompt data has no column '{column}' with reference answers "
                          f"(columns: {', '.join(columns) or 'none'}); set its args.column")
    return [float(final_answer_match(completion_text(c), str(ref))) for c, ref in zip(completions, data[column])]


def format_match(prompts, completions, *, pattern: str, **_) -> list[float]:
    """1.0 where the completion matches the regular expression `pattern` (re.search; anchor it with ^...$ to
    demand the whole completion), else 0.0."""
    regex = re.compile(pattern)
    return [float(regex.search(completion_text(c).strip()) is not None) for c in completions]


def length_penalty(prompts, completions, *, completion_ids, max_tokens: int, per_token: float = 0.01, **_) -> list[float]:
    """-per_token for each completion token beyond `max_tokens`; 0.0 within it."""
    return [-per_token * max(0, len(ids) - max_tokens) for ids in completion_ids]


RULES: dict[str, Callable] = {"exact_match": exact_match, "format": format_match, "length": length_penalty}
# What TRL passes to every reward function besides the prompt data's columns.
TRL_ARGUMENTS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")


# -- specs -> checked reward functions --------------------------------------------------------------------------


class RewardFunc:
    """A reward function with its recipe name, weight and arguments, callable as TRL calls reward functions.
    Its output is checked: one finite number (or None) per completion."""

    def __init__(self, name: str, fn: Callable, weight: float, args: dict[str, Any],
                 scorer: "RewardModelScorer | None" = None, timeout_s: float | None = None):
        self.__name__ = name  # TRL logs rewards/<__name__>/mean and /std
        self.fn, self.weight, self.args, self.timeout_s = fn, weight, dict(args), timeout_s
        self.scorer = scorer  # the reward model behind a reward_model reward

    def __call__(self, prompts, completions, **kwargs) -> list[float | None]:
        values = self._call(prompts=prompts, completions=completions, **self.args, **kwargs)
        if isinstance(values, torch.Tensor):
            values = values.tolist()
        try:
            values = list(values)
        except TypeError:
            raise RewardError(f"reward '{self.__name__}' returned {type(values).__name__}, not a list with one "
                              "number per completion") from None
        if len(values) != len(completions):
            raise RewardError(f"reward '{self.__name__}' returned {len(values)} values for {len(completions)} "
                              "completions; return one per completion (None where it does not apply)")
        for i, value in enumerate(values):
            bad = (value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                                          or not math.isfinite(value)))
            if bad:
                raise RewardError(f"reward '{self.__name__}' returned {value!r} for completion {i} "
                                  f"({completion_text(completions[i])[:60]!r}); return a finite number, or None "
                                  "where the reward does not apply")
        return [None if v is None else float(v) for v in values]

    def _call(self, **kwargs):
        """The function's values, from a thread of its own, so that one that never returns stops the stage
        after `timeout_s` (the thread is left behind; the process ends with the stage). A failure is one line
        naming the function and where; its traceback (or, for a hang, where it hangs) is the error's `details`."""
        outcome: dict[str, Any] = {}

        def call():
            try:
                outcome["values"] = self.fn(**kwargs)
            except BaseException as e:  # noqa: BLE001  (handed to the stage's thread below)
                outcome["error"] = e

        thread = threading.Thread(target=call, name=f"reward {self.__name__}", daemon=True)
        thread.start()
        thread.join(self.timeout_s)
        if thread.is_alive():
            stack = traceback.format_stack(sys._current_frames()[thread.ident])
            raise RewardFailed(f"reward '{self.__name__}' ({_where(self.fn)}) did not return within timeout_s="
                               f"{self.timeout_s:g} s for {len(kwargs['completions'])} completions; fix it, or "
                               "raise its timeout_s in the recipe's rewards list if it is only slow",
                               details="where it was waiting:\n" + "".join(stack))
        error = outcome.get("error")
        if isinstance(error, AlignError):
            raise error
        if error is not None:
            raise RewardFailed(f"reward '{self.__name__}' raised {type(error).__name__}: {str(error)[:200]} (at "
                               f"{_raised_at(error)})", details="".join(traceback.format_exception(error)))
        return outcome["values"]


def _where(fn: Callable) -> str:
    """file:line of a function's definition."""
    code = getattr(inspect.unwrap(fn), "__code__", None)
    return f"{code.co_filename}:{code.co_firstlineno}" if code else repr(fn)


def _raised_at(error: BaseException) -> str:
    """file:line where an exception was raised (the innermost frame of its traceback)."""
    frames = traceback.extract_tb(error.__traceback__)
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "unknown"


def reward_function(spec, scorer: "RewardModelScorer | None" = None) -> RewardFunc:
    """A recipe's reward spec (`recipe.RewardFunction`) as a checked function. Plug-ins are imported here, and
    only the ones the recipe names; `scorer` is the reward model, for the `reward_model` spec."""
    if spec.name == "reward_model":
        if scorer is None:
            raise ValueError("the reward_model reward needs its scorer")
        check_reward_model_args(spec.args)
        return RewardFunc("reward_model", lambda prompts, completions, **_: scorer.score(prompts, completions),
                          spec.weight, {}, scorer=scorer, timeout_s=spec.timeout_s)
    if spec.name in RULES:
        fn = RULES[spec.name]
        _check_rule_args(spec.name, fn, spec.args)
        return RewardFunc(spec.name, fn, spec.weight, spec.args, timeout_s=spec.timeout_s)
    if ":" not in spec.name:
        raise RewardError(f"reward '{spec.name}': not a reward shipped with align ({', '.join(['reward_model', *RULES])}) "
                          "nor a plug-in 'package.module:function'")
    fn = load_plugin(spec.name)
    return RewardFunc(spec.name.rpartition(":")[2], fn, spec.weight, spec.args, timeout_s=spec.timeout_s)


REWARD_MODEL_ARGS = ("checkpoint", "batch_size", "share_base")


def check_reward_model_args(args: dict[str, Any]) -> None:
    """Called before any model loads, so that a typo fails in a second, not after the policy is in memory."""
    unknown = sorted(set(args) - set(REWARD_MODEL_ARGS))
    if unknown:
        raise RewardError(f"reward 'reward_model': unknown args {unknown}; it takes {', '.join(REWARD_MODEL_ARGS)}")


def _check_rule_args(name: str, fn: Callable, args: dict[str, Any]) -> None:
    params = {p.name: p for p in inspect.signature(fn).parameters.values() if p.kind == p.KEYWORD_ONLY
              and p.name not in TRL_ARGUMENTS}
    unknown = sorted(set(args) - set(params))
    missing = sorted(n for n, p in params.items() if p.default is p.empty and n not in args)
    if unknown or missing:
        takes = ", ".join(n + ("" if p.default is p.empty else f"={p.default!r}") for n, p in params.items())
        problem = f"unknown args {unknown}" if unknown else f"args {missing} required"
        raise RewardError(f"reward '{name}': {problem}; it takes args {{{takes}}}")


def load_plugin(spec: str) -> Callable:
    """The function named by 'package.module:function', checked to take TRL's reward arguments."""
    where = f"reward plug-in '{spec}'"
    fn = import_plugin(spec, where)
    attr = spec.rpartition(":")[2]
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return fn  # a builtin or extension callable without a signature: its output is still checked
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    takes_kwargs = any(p.kind == p.VAR_KEYWORD for p in params)
    if not takes_kwargs or not {"prompts", "completions"} <= names:
        raise RewardError(f"{where}: its signature {attr}{inspect.signature(fn)} does not take TRL's reward "
                          "arguments; define it as def " + attr + "(prompts, completions, **kwargs) -> list[float] "
                          "(kwargs: the prompt data's other columns, completion_ids, trainer_state)")
    return fn


def import_plugin(spec: str, where: str) -> Callable:
    """The plain function named by 'package.module:function'; `where` names the setting in errors."""
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise RewardError(f"{where}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001  (the plug-in's own import errors are the user's to see)
        raise RewardError(f"{where}: cannot import module '{module_name}' ({type(e).__name__}: {e}); is it "
                          "installed, or on PYTHONPATH?") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise RewardError(f"{where}: module '{module_name}' ({getattr(module, '__file__', '?')}) has no '{attr}'")
    if not callable(fn):
        raise RewardError(f"{where}: '{attr}' is a {type(fn).__name__}, not a function")
    if inspect.iscoroutinefunction(fn):
        raise RewardError(f"{where}: is async; align takes plain functions (run the async work inside it)")
    return fn
