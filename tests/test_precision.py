"""The compute dtype: what `model.compute_dtype: auto` picks per device, and the bfloat16 path on a CPU (autocast
over a bfloat16 base, float32 trainable weights), which must train what the float32 path trains."""

import json
from pathlib import Path

import pytest
import torch
from conftest import (LEARNING_SEED, PREF_HELDOUT, PREF_TRAIN, QA_HELDOUT, QA_TRAIN, TINY_BASE, first_rows,
                      run_keeping_trainer, sft_section)
from safetensors.torch import load_file

import align.modeling
from align.modeling import compute_dtype, load_model, lora_config, precision_args
from align.recipe import DType, LoraConfig, ModelConfig, load_recipe
from align.stages import grpo, ppo, reward, sft

BF16 = {"name_or_path": str(TINY_BASE), "compute_dtype": "bfloat16"}  # as a recipe section


@pytest.mark.parametrize("amx", [True, False])
def test_auto_is_bfloat16_on_a_cpu_with_amx_units_and_float32_without(monkeypatch, amx):
    monkeypatch.setattr(align.modeling, "cpu_has_amx_bf16", lambda: amx)
    cfg = ModelConfig(name_or_path=str(TINY_BASE))
    assert compute_dtype(cfg) == (torch.bfloat16 if amx else torch.float32)
    # transformers refuses bf16 without a GPU unless the trainer is told it runs on the CPU
    assert precision_args(cfg) == ({"bf16": True, "fp16": False, "use_cpu": True} if amx
                                   else {"bf16": False, "fp16": False})
    explicit = ModelConfig(name_or_path=str(TINY_BASE), compute_dtype=DType.float32)
    assert compute_dtype(explicit) == torch.float32


def test_amx_is_read_from_this_cpus_flags(monkeypatch):
    monkeypatch.undo()  # the real probe, not conftest's stand-in
    flags = next((line.split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    assert align.modeling.cpu_has_amx_bf16() == ("amx_bf16" in flags)


def _one_step(cfg: ModelConfig, ids: torch.Tensor, like=None):
    """A rank-4 adapter (lora_B non-zero, or `like`'s weights) on the tiny 4-bit base in `cfg`'s compute dtype,
    after one loss.backward() on `ids`: (model, logits, LoRA gradients)."""
    from peft import get_peft_model
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    torch.manual_seed(0)
    model = get_peft_model(load_model(cfg), lora_config(LoraConfig(r=4, alpha=8, dropout=0.0)))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.1)
    if like is not None:
        set_peft_model_state_dict(model, get_peft_model_state_dict(like))
    out = model.train()(input_ids=ids, labels=ids)
    out.loss.backward()
    return model, out.logits, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_bfloat16_on_a_cpu_computes_under_autocast_with_float32_adapters_and_float32_gradients():
    ids = torch.tensor([[3, 17, 42, 8, 99, 5, 61, 7, 23, 11]])
    half, logits, grads = _one_step(ModelConfig(name_or_path=str(TINY_BASE), compute_dtype=DType.bfloat16), ids)
    full, _, full_grads = _one_step(ModelConfig(name_or_path=str(TINY_BASE)), ids, like=half)
    import bitsandbytes as bnb

    base_linear = next(m for m in half.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert base_linear.compute_dtype == torch.bfloat16  # the base's matmuls in bf16
    assert all(p.dtype == torch.float32 for p in half.parameters() if p.requires_grad)
    assert logits.dtype == torch.float32  # outputs widened, as Accelerate's mixed precision does
    assert len(grads) == 2 * 4 * 7 and all(g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads.values())
    # The same function up to bf16 rounding (measured on this input: loss within 0.022, gradient cosine 0.999
    # overall and at least 0.976 per tensor).
    assert abs(half(input_ids=ids, labels=ids).loss - full(input_ids=ids, labels=ids).loss) < 0.05
    flat = lambda g: torch.cat([g[name].flatten() for name in grads])  # noqa: E731
    assert torch.nn.functional.cosine_similarity(flat(grads), flat(full_grads), dim=0) > 0.99
    for name, grad in grads.items():
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), full_grads[name].flatten(), dim=0)
        assert cosine > 0.95, (name, float(cosine))


def prompts_data():
    return {"sft": {"train": str(QA_TRAIN), "eval": str(QA_HELDOUT)},
            "preference": {"train": str(PREF_TRAIN), "eval": str(PREF_HELDOUT)},
            "prompts": {"train": str(QA_TRAIN), "eval": str(QA_HELDOUT)}, "columns": {"prompt": "question"}}


RL = {"learning_rate": 2e-3, "max_steps": 3, "warmup_steps": 0, "max_completion_length": 16, "max_length": 64,
      "activation_checkpointing": False, "logging_steps": 1, "per_device_eval_batch_size": 16,
      "eval_generations": 8, "save_steps": 100,
      "rewards": [{"name": "exact_match", "args": {"column": "answer"}},
                  {"name": "format", "weight": 0.5, "args": {"pattern": r"\+ 1 ="}},
                  # answers of different lengths score differently: a group's rewards are never all equal, so
                  # every step updates the policy whatever the seed (exact match and format alone: often all 0)
                  {"name": "length", "args": {"max_tokens": 4}}]}


def fp32_checkpoint(results) -> dict:
    saved = load_file(results["checkpoint"] + "/adapter_model.safetensors")
    assert saved and {v.dtype for v in saved.values()} == {torch.float32}
    return saved


def metrics(results) -> list[dict]:
    return [json.loads(line) for line in (Path(results["run_dir"]) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_every_stage_trains_in_bfloat16_on_a_cpu_with_float32_weights_and_a_first_kl_of_zero(write_recipe, tmp_path):
    """Passes on seeds 42, 1 and 2 (LEARNING_SEED; checked 2026-12-06): the SFT loss falls, GRPO's policy moves."""
    data = prompts_data()
    data["preference"]["eval"] = str(first_rows(PREF_HELDOUT, 32, tmp_path / "pairs.jsonl"))
    recipe = load_recipe(write_recipe(
        model=BF16, data=data, run={"seed": LEARNING_SEED},
        sft=sft_section(max_steps=20, eval_generations=4),
        reward={"max_steps": 5, "per_device_train_batch_size": 8, "max_length": 128,
                "activation_checkpointing": False},
        grpo={**RL, "per_device_train_batch_size": 8, "num_generations": 4},
    ))
    sft_results, trainer = run_keeping_trainer(sft, recipe)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters() if p.requires_grad)
    losses = [m["loss"] for m in metrics(sft_results) if "loss" in m]
    assert losses[-1] < losses[0]  # it learns
    fp32_checkpoint(sft_results)

    reward_results = reward.run(recipe)
    assert "score.weight" in "".join(fp32_checkpoint(reward_results))

    grpo_results, (trainer, _) = run_keeping_trainer(grpo, recipe)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters() if p.requires_grad)
    kls = [m["kl"] for m in metrics(grpo_results) if "kl" in m]
    assert kls[0] == 0.0 and all(0 < kl < recipe.grpo.max_kl for kl in kls[1:])  # the reference is the SFT policy
    fp32_checkpoint(grpo_results)

    ppo_results = ppo.run(load_recipe(write_recipe(
        model=BF16, data=data, sft={}, run={"seed": LEARNING_SEED},
        ppo={**RL, "per_device_train_batch_size": 4, "num_mini_batches": 2,
             "rewards": [*RL["rewards"], {"name": "reward_model", "weight": 0.1,
                                          "args": {"checkpoint": reward_results["checkpoint"]}}]})))
    kls = [m["kl"] for m in metrics(ppo_results) if "kl" in m]
    assert kls[0] == 0.0 and all(0 < abs(kl) < 10 for kl in kls[1:])
    fp32_checkpoint(ppo_results)
