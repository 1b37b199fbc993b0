"""Failing well: a NaN in training stops the stage with a message naming the step and the likely causes, writes no
final checkpoint and keeps the last good resumable one."""

import json
from pathlib import Path

import pytest
import torch
from conftest import QA_HELDOUT, QA_TRAIN, sft_section
from safetensors.torch import load_file
from transformers import TrainerCallback

from align.recipe import load_recipe
from align.callbacks import NonFinite
from align.stages import ppo, sft


class PoisonAt(TrainerCallback):
    """Sets one LoRA weight to NaN at the end of optimizer step `step`: what an fp16 overflow does."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            next(p for n, p in model.named_parameters() if "lora_B" in n).data.fill_(float("nan"))


def test_a_nan_in_sft_stops_at_its_step_and_keeps_the_last_good_checkpoint(write_recipe, monkeypatch):
    build = sft.build_trainer

    def poisoned(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.add_callback(PoisonAt(3))
        return trainer

    monkeypatch.setattr(sft, "build_trainer", poisoned)
    recipe = load_recipe(write_recipe(data={"sft": {"train": str(QA_TRAIN)}},
                                      sft=sft_section(max_steps=8, save_steps=2, logging_steps=1)))
    with pytest.raises(NonFinite, match=r"sft: the trainable weight .* is not finite at step 4; training stopped "
                                        r"without saving.*fp16.*bfloat16.*sft.learning_rate.*reward plug-in"):
        sft.run(recipe)
    stage = Path(recipe.run.root) / "test" / "sft"
    assert not (stage / "checkpoint").exists()  # no final checkpoint
    assert sorted(p.name for p in (stage / "trainer").glob("checkpoint-*")) == ["checkpoint-2"]  # the last good one
    weights = load_file(str(stage / "trainer" / "checkpoint-2" / "adapter_model.safetensors"))
    assert all(w.isfinite().all() for w in weights.values())


def test_a_nan_in_ppo_stops_with_the_step_logged(write_recipe, sft_adapter, monkeypatch):
    real = ppo.value_loss
    monkeypatch.setattr(ppo, "value_loss", lambda *a, **k: (real(*a, **k)[0] * float("nan"), real(*a, **k)[1]))
    recipe = load_recipe(write_recipe(sft={}, data={"prompts": {"train": str(QA_TRAIN), "eval": str(QA_HELDOUT)},
                                                    "columns": {"prompt": "question"}},
                                      ppo={"max_steps": 3, "per_device_train_batch_size": 4, "max_length": 64,
                                           "max_completion_length": 8, "activation_checkpointing": False,
                                           "eval_generations": 0, "logging_steps": 1,
                                           "rewards": [{"name": "length", "args": {"max_tokens": 4}}]}))
    # The value loss's NaN reaches the policy's weights too (one gradient-norm clip over both): either loss names it.
    with pytest.raises(NonFinite, match=r"ppo: the (policy|value)_loss is nan at step 1; training stopped without saving"):
        ppo.run(recipe)
    stage = Path(recipe.run.root) / "test" / "ppo"
    logged = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["step"] == 1 and logged[-1]["score"] == pytest.approx(logged[-1]["score"])  # score finite
    assert not (stage / "checkpoint").exists()
    assert torch.isnan(torch.tensor(logged[-1]["value_loss"]))


@pytest.mark.parametrize("command", ["sft", "run"])
def test_out_of_gpu_memory_is_answered_with_the_settings_to_lower(write_recipe, monkeypatch, capsys, command):
    from align.cli import main

    def out_of_memory(recipe, resume):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total)")

    monkeypatch.setattr(sft, "run", out_of_memory)
    recipe = write_recipe(sft={"max_length": 128}, data={"sft": {"train": str(QA_TRAIN)}})
    assert main([command, str(recipe), "model.quantization=none"]) == 3
    err = capsys.readouterr().err
    assert "the sft stage ran out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB" in err
    assert "sft.per_device_train_batch_size (raise gradient_accumulation_steps" in err and "sft.max_length" in err
    assert "model.quantization=nf4" in err and "Traceback" not in err
