"""Loading: the 4-bit NF4 path on CPU, the full-precision path, tokenizer defaults, and clear errors."""

import sys

import pytest
import torch
from conftest import TINY_BASE

from align.modeling import (
    DEFAULT_CHAT_TEMPLATE, ModelLoadError, load_model, load_tokenizer, lora_config, prompt_ids,
)
from align.recipe import LoraConfig, ModelConfig, Quantization


def test_nf4_base_loads_on_cpu_and_is_smaller():
    import bitsandbytes as bnb

    quantized = load_model(ModelConfig(name_or_path=str(TINY_BASE)))
    full = load_model(ModelConfig(name_or_path=str(TINY_BASE), quantization=Quantization.none))
    linear4bit = [m for m in quantized.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4bit) == 4 * 7  # q, k, v, o, gate, up, down in each of the 4 layers
    assert linear4bit[0].weight.quant_state.quant_type == "nf4"
    assert quantized.get_memory_footprint() < 0.6 * full.get_memory_footprint()
    assert not any(p.requires_grad for p in quantized.parameters())  # base frozen for LoRA


def test_missing_bitsandbytes_names_the_setting(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import now fails, as on a platform without it
    with pytest.raises(ModelLoadError, match="set model.quantization=none"):
        load_model(ModelConfig(name_or_path=str(TINY_BASE)))


def test_device_without_4bit_names_the_setting(monkeypatch):
    import align.modeling

    monkeypatch.setattr(align.modeling, "device", lambda: torch.device("mps"))
    with pytest.raises(ModelLoadError, match=r"not available on this device \(mps\).*Set model.quantization=none"):
        load_model(ModelConfig(name_or_path=str(TINY_BASE)))


def test_unloadable_model_names_the_key(tmp_path):
    with pytest.raises(ModelLoadError, match="model.name_or_path="):
        load_model(ModelConfig(name_or_path=str(tmp_path), quantization=Quantization.none))


def test_tokenizer_without_template_or_pad_gets_defaults(tmp_path):
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(TINY_BASE)))
    tokenizer.chat_template = None
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(ModelConfig(name_or_path=str(tmp_path)))
    assert loaded.chat_template == DEFAULT_CHAT_TEMPLATE
    assert loaded.pad_token == loaded.eos_token


def test_prompt_is_a_token_prefix_of_prompt_and_answer():
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(TINY_BASE)))
    prompt = [{"role": "user", "content": "What is 17 + 25?"}]
    full = tokenizer.apply_chat_template(
        prompt + [{"role": "assistant", "content": "17 + 25 = 42. The answer is 42."}], tokenize=True, return_dict=False
    )
    ids = prompt_ids(tokenizer, prompt)
    assert full[: len(ids)] == ids
    assert full[-1] == tokenizer.eos_token_id  # the answer ends the turn with EOS, nothing after it


def test_lora_targets():
    assert lora_config(LoraConfig()).target_modules == "all-linear"
    assert lora_config(LoraConfig(target_modules="q_proj, v_proj")).target_modules == {"q_proj", "v_proj"}
