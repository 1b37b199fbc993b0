"""Rewards: the reward model's scores and rule checks that need no model.

`RewardModelScorer` scores (prompt, completion) pairs with a reward stage checkpoint, formatting them exactly as
the reward stage trained on them (`modeling.conversation_ids`, right padding, score at the last non-pad token),
so a score read here equals the one the trainer saw. The quickstart's arithmetic is checked by rule: the final
number of the answer ("... The answer is 42." -> "42") against the reference answer's final number.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from tqdm.auto import tqdm

from align.modeling import conversation_ids

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
                        desc: str = "scoring") -> list[float]:
    """The reward model's score of each whole conversation (prompt + answer). Batches are padded on the right,
    as TRL's DataCollatorForPreference pads them in training, and the model reads the score at the last token
    that is not padding (transformers' sequence-classification heads, given config.pad_token_id)."""
    pad = tokenizer.pad_token_id
    if pad is None:
        raise ValueError("the tokenizer has no pad token; batched scoring needs one (modeling.load_tokenizer sets it)")
    model.config.pad_token_id = pad
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = conversation_ids(tokenizer, conversations)
    scores: list[float] = []
    for start in tqdm(range(0, len(ids), batch_size), desc=desc, leave=False, disable=len(ids) <= batch_size):
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
        return score_conversations(self.model, self.tokenizer, conversations, batch_size=self.batch_size)
