"""Batched generation from chat prompts, rendered exactly as the trainers render them (modeling.prompt_ids)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from align.modeling import prompt_ids
from align.processes import in_shares, state


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[list[dict]],
    *,
    max_new_tokens: int,
    batch_size: int = 32,
    desc: str = "generating",
    with_ids: bool = False,
    sampling: dict | None = None,
    per_prompt: int = 1,
) -> list[str] | tuple[list[str], list[list[int]]]:
    """One greedy answer per prompt, decoded without special tokens; with `sampling` (temperature, top_p, ...),
    `per_prompt` sampled answers per prompt instead, a prompt's answers next to each other. With `with_ids`,
    also each answer's token ids up to and including its EOS (as TRL hands completion_ids to reward functions).
    Under several processes each answers its share of the prompts, and every process gets all the answers."""
    answers, answer_ids = in_shares(prompts, lambda share: _generate(
        model, tokenizer, share, max_new_tokens, batch_size, desc, sampling, per_prompt))
    return (answers, answer_ids) if with_ids else answers


def _generate(model, tokenizer, prompts, max_new_tokens, batch_size, desc, sampling, per_prompt):
    was_training = model.training
    model.eval()
    answers, answer_ids = [], []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False, disable=not state().is_main_process):
        batch = [prompt_ids(tokenizer, p) for p in prompts[start : start + batch_size]]
        _, _, out = generate_batch(model, tokenizer, batch, max_new_tokens=max_new_tokens, sampling=sampling,
                                   per_prompt=per_prompt)
        answers.extend(tokenizer.batch_decode(out, skip_special_tokens=True))
        for ids in out.tolist():
            end = ids.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in ids else len(ids)
            answer_ids.append(ids[:end])
    model.train(was_training)
    return answers, answer_ids


@torch.no_grad()
def generate_batch(model, tokenizer, batch: list[list[int]], *, max_new_tokens: int, sampling: dict | None = None,
                   per_prompt: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt token ids in, (prompts left-padded, their attention mask, the generated tokens) out: left padding,
    so that every prompt ends where generation starts; each prompt repeated `per_prompt` times. The generated
    tokens run to the longest answer: after an answer's EOS come pad tokens."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    width = max(len(ids) for ids in batch)
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=device)
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
        do_sample=sampling is not None,
        num_return_sequences=per_prompt,
        **(sampling or {}),
    )
    repeat = lambda t: t.repeat_interleave(per_prompt, dim=0)  # noqa: E731  (generate's order: a prompt's answers together)
    return repeat(input_ids), repeat(attention_mask), out[:, width:]
