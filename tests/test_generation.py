"""Generation on merged dense weights (generation.merged_weights): the same function as the 4-bit base with its
LoRA adapter, only faster; off where it is switched off, and gone once generation ends."""

import pytest
import torch
from conftest import TINY_BASE

from align.generation import generate, merged_weights, position_ids
from align.modeling import load_model, load_tokenizer, lora_config, prompt_ids
from align.recipe import LoraConfig, ModelConfig, Quantization

PROMPTS = [[{"role": "user", "content": f"What is {a} + {b}?"}] for a, b in ((12, 34), (456, 78), (9, 901))]


def _policy(quantization: Quantization, merged: bool | None = True):
    """The tiny base with a rank-4 adapter whose update is not zero, as an RL policy after some training."""
    from peft import get_peft_model

    cfg = ModelConfig(name_or_path=str(TINY_BASE), quantization=quantization, merged_generation=merged)
    torch.manual_seed(0)
    model = get_peft_model(load_model(cfg), lora_config(LoraConfig(r=4, alpha=8, dropout=0.0)))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.1)
    return model.eval(), load_tokenizer(cfg)


def _logits(model, tokenizer):
    ids = torch.tensor([prompt_ids(tokenizer, PROMPTS[1])])
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("quantization", [Quantization.nf4, Quantization.none])
def test_merged_weights_compute_what_the_base_and_adapter_compute(quantization):
    model, tokenizer = _policy(quantization)
    layered = _logits(model, tokenizer)
    with merged_weights(model):
        merged = _logits(model, tokenizer)
        replaced = [m for m in model.modules() if "forward" in vars(m)]
    assert len(replaced) == 4 * 7  # every linear layer of the 4 blocks, the LoRA layer and not its base twice
    assert torch.allclose(merged, layered, atol=1e-4, rtol=1e-4)
    assert (merged - layered).abs().max() > 0 or quantization == Quantization.none  # a dense path did run
    assert not any("forward" in vars(m) for m in model.modules())  # the layers' own forward again after
    assert torch.equal(_logits(model, tokenizer), layered)


def test_merged_weights_follow_the_active_adapter():
    """PPO's reference is a second adapter of the same base: merged weights are those of whichever is active."""
    from align.modeling import copy_adapter_weights

    model, tokenizer = _policy(Quantization.nf4)
    model.add_adapter("ref", model.peft_config["default"])
    copy_adapter_weights(model, "default", "ref")
    for name, param in model.named_parameters():
        if ".ref." in name and "lora_B" in name:
            param.data.zero_()  # the reference: the base model itself
    model.set_adapter("ref")
    reference = _logits(model, tokenizer)
    with merged_weights(model):
        assert torch.allclose(_logits(model, tokenizer), reference, atol=1e-4, rtol=1e-4)
    model.set_adapter("default")
    with merged_weights(model):
        assert not torch.allclose(_logits(model, tokenizer), reference, atol=1e-3)


def test_greedy_answers_are_the_same_merged_or_not():
    model, tokenizer = _policy(Quantization.nf4, merged=True)
    merged = generate(model, tokenizer, PROMPTS, max_new_tokens=12)
    model.get_base_model().align_merged_generation = False
    assert generate(model, tokenizer, PROMPTS, max_new_tokens=12) == merged


def test_merged_generation_is_off_when_switched_off():
    model, tokenizer = _policy(Quantization.nf4, merged=False)
    with merged_weights(model):
        assert not any("forward" in vars(m) for m in model.modules())


def test_merged_generation_defaults_to_on_on_a_cpu():
    model, _ = _policy(Quantization.nf4, merged=None)
    assert model.get_base_model().align_merged_generation is True


def test_position_ids_number_each_row_s_real_tokens_from_zero_as_if_it_were_alone():
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0]])  # left and right padding
    positions = position_ids(mask)
    for row, keep in zip(positions, mask.bool()):
        assert row[keep].tolist() == list(range(int(keep.sum())))
    assert positions.min() >= 0  # padding gets a valid position (masked out anyway)
