"""Batched generation from chat prompts, rendered exactly as the trainers render them (modeling.prompt_ids), and
the dense weights generation runs on (`merged_weights`)."""

from __future__ import annotations

from contextlib import contextmanager

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
    with merged_weights(model):
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False,
                          disable=not state().is_main_process):
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


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask -> (B, T) positions: each real token numbered from 0 at its row's first real token, as generate()
    numbers a left-padded prompt, so that a batched forward pass sees every token where it is alone (padding 0)."""
    return (attention_mask.cumsum(1) - 1).clamp(min=0)


def use_merged_generation(model, setting: bool | None) -> None:
    """Turn `merged_weights` on for `model` (a base model as modeling.load_model returns it) per
    model.merged_generation (None: on a CPU, off on a GPU)."""
    on = setting if setting is not None else model.device.type == "cpu"
    model.align_merged_generation = on


@contextmanager
def merged_weights(model):
    """Within it, every linear layer of `model` that is a 4-bit base layer (bitsandbytes Linear4bit) or a LoRA layer
    on a 4-bit or full-precision base computes x @ W.T + b with one dense W: the dequantised base weight plus each
    active plain-LoRA adapter's update (B @ A x scaling), made once on entry. The same function as the layers compute
    token by token (up to rounding in the compute dtype), without a dequantisation and two extra matmuls per layer
    and token. No gradients: for generation only. Does nothing unless `use_merged_generation` turned it on; a layer
    it cannot merge exactly (DoRA and other LoRA variants, LoRA bias, mixed adapter batches) is left as it is."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "align_merged_generation", False):
        yield
        return
    from peft.tuners.lora import LoraLayer

    patched, merged_bases = [], set()
    try:
        with torch.no_grad():
            for module in model.modules():
                weight = None if id(module) in merged_bases else _merged_weight(module)
                if weight is None:
                    continue
                base = module.get_base_layer() if isinstance(module, LoraLayer) else module
                merged_bases.add(id(base))  # a LoRA layer's base, seen next, is part of its dense weight
                module.forward = _dense_forward(weight, base.bias)
                patched.append(module)
        yield
    finally:
        for module in patched:
            del module.forward  # the class's forward again


def _merged_weight(module) -> torch.Tensor | None:
    """The dense weight `module` computes with, or None where it is not a layer `merged_weights` replaces."""
    from peft.tuners.lora import LoraLayer

    try:  # a full-precision base needs no bitsandbytes (not installed off Linux)
        from bitsandbytes.nn import Linear4bit
        from bitsandbytes.functional import dequantize_4bit
    except ImportError:
        Linear4bit = dequantize_4bit = None
    is_lora = isinstance(module, LoraLayer)
    base = module.get_base_layer() if is_lora else module
    if is_lora:
        active = [a for a in module.active_adapters if a in module.lora_A]
        if module.merged or module.disable_adapters or any(
                a in module.lora_variant or module.lora_bias.get(a) for a in active):
            return None
    elif Linear4bit is None or not isinstance(module, Linear4bit):
        return None
    if Linear4bit is not None and isinstance(base, Linear4bit):
        weight = dequantize_4bit(base.weight.data, base.weight.quant_state).to(base.compute_dtype)
    elif isinstance(base, torch.nn.Linear):
        weight = base.weight.detach().clone()
    else:
        return None
    for adapter in active if is_lora else []:
        weight += module.get_delta_weight(adapter).to(weight.dtype)
    return weight


def _dense_forward(weight: torch.Tensor, bias: torch.Tensor | None):
    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return torch.nn.functional.linear(x.to(weight.dtype), weight,
                                          None if bias is None else bias.to(weight.dtype)).to(x.dtype)
    return forward
