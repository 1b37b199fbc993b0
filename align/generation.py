"""Batched generation from chat prompts, rendered exactly as the trainers render them (modeling.prompt_ids)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from align.modeling import prompt_ids


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[list[dict]],
    *,
    max_new_tokens: int,
    batch_size: int = 32,
    desc: str = "generating",
) -> list[str]:
    """One greedy answer per prompt, decoded without special tokens."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    answers = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False):
        batch = [prompt_ids(tokenizer, p) for p in prompts[start : start + batch_size]]
        width = max(len(ids) for ids in batch)
        # Left padding, so that every prompt ends where generation starts.
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=device)
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
            do_sample=False,
        )
        answers.extend(tokenizer.batch_decode(out[:, width:], skip_special_tokens=True))
    model.train(was_training)
    return answers
