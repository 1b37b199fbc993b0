"""Loading: the 4-bit NF4 path on CPU, the full-precision path, tokenizer defaults, and clear errors."""

import sys

import pytest
import torch
from conftest import ROOT, TINY_BASE

from align.modeling import (
    DEFAULT_CHAT_TEMPLATE, ModelLoadError, compute_dtype, load_model, load_tokenizer, lora_config, prompt_ids,
    quantization_config,
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


def _lora_gradients(base, ids, *, eval_pass_first=False, like=None):
    """The LoRA gradients of one training step (loss on `ids`) on `base` with a rank-4 adapter on every linear
    layer: lora_B non-zero, so that gradients flow through the frozen base weights to every adapter. `like`: a
    model whose adapter weights to copy (the same adapter on another base). `eval_pass_first`: an eval forward
    without gradients before training, as every stage's "before" evaluation does."""
    from peft import get_peft_model
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    torch.manual_seed(0)
    model = get_peft_model(base, lora_config(LoraConfig(r=4, alpha=8, dropout=0.0)))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.1)
    if like is not None:
        set_peft_model_state_dict(model, get_peft_model_state_dict(like))
    if eval_pass_first:
        with torch.no_grad():
            model.eval()(input_ids=ids)
    model.train()(input_ids=ids, labels=ids).loss.backward()
    return model, {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def test_4bit_lora_gradients_are_those_of_the_dequantised_model_after_an_eval_pass():
    """bitsandbytes, on CPUs with AVX-512 BF16, moves a 4-bit layer to a fused bf16 kernel without autograd after
    its first eval forward without gradients (align/modeling.py: keep_4bit_on_the_autograd_path). On any CPU:
    no layer leaves the standard path, and the gradients of a training step do not depend on an earlier eval."""
    import bitsandbytes as bnb

    cfg = ModelConfig(name_or_path=str(TINY_BASE))
    ids = torch.tensor([[3, 17, 42, 8, 99, 5, 61, 7, 23, 11]])
    evaluated, after_eval = _lora_gradients(load_model(cfg), ids, eval_pass_first=True)
    layers = [m for m in evaluated.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 4 * 7
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    _, fresh = _lora_gradients(load_model(cfg), ids, like=evaluated)
    _, dequantised = _lora_gradients(load_model(cfg).dequantize(), ids, like=evaluated)
    assert len(after_eval) == 2 * 4 * 7 and all(g.abs().sum() > 0 for g in after_eval.values())
    for name, grad in after_eval.items():
        torch.testing.assert_close(grad, fresh[name], rtol=0, atol=0, msg=name)
        # The same NF4 values, dequantised once up front: only the order of float32 sums may differ.
        torch.testing.assert_close(grad, dequantised[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("temperature", [1.0, 0.7])  # SFT's head; GRPO's at the recipes' sampling temperature
def test_on_a_cpu_the_fused_lm_head_scores_only_labelled_positions_with_the_same_loss_and_gradients(monkeypatch,
                                                                                                   temperature):
    """TRL's fused LM head, as its trainers add it, on a base that load_model loaded: the vocabulary projection
    sees the labelled positions only (align/modeling.py: score_labelled_positions_only), not the prompt and the
    padding as TRL's own choice off Triton does, and the loss, per-token outputs and LoRA gradients are the same."""
    import trl.trainer.utils as trl_utils
    from trl.trainer.utils import add_fused_lm_head

    ids = torch.tensor([[3, 17, 42, 8, 99, 5, 61, 7, 23, 11], [4, 9, 33, 12, 50, 6, 70, 2, 0, 0]])
    labels = ids.clone()
    labels[0, :6] = labels[1, :4] = -100  # the prompts
    labels[1, 8:] = -100  # padding
    scored_rows = []
    projection = trl_utils._ChunkedLogProbFunction

    class Counted:
        @staticmethod
        def apply(hidden, *args):
            scored_rows.append(hidden.shape[0])
            return projection.apply(hidden, *args)

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", Counted)

    def step(trl_s_own_choice=False):
        base = load_model(ModelConfig(name_or_path=str(TINY_BASE)))
        if trl_s_own_choice:  # off Triton, every position
            monkeypatch.setattr(trl_utils, "_use_triton", lambda device: False)
        add_fused_lm_head(base, temperature=temperature, outputs=("log_probs", "entropy", "is_top1"))
        model, _ = _lora_gradients(base, ids[:, :1])  # the adapter, with lora_B non-zero (seeded)
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=(labels != -100) | (ids != 0), labels=labels, fused_lm_head=True)
        out.loss.backward()
        return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}

    labelled, labelled_grads = step()
    every, every_grads = step(trl_s_own_choice=True)
    assert scored_rows == [(labels[:, 1:] != -100).sum().item(), ids[:, 1:].numel()] == [8, 18]
    torch.testing.assert_close(labelled.loss, every.loss)
    for field in ("log_probs", "entropy", "is_top1"):
        torch.testing.assert_close(getattr(labelled, field), getattr(every, field), msg=field)
    assert labelled_grads.keys() == every_grads.keys() and len(labelled_grads) == 4 * 7 * 2
    for name, grad in labelled_grads.items():
        torch.testing.assert_close(grad, every_grads[name], rtol=1e-5, atol=1e-7, msg=name)


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


def test_under_fsdp_the_4bit_weights_are_stored_in_the_compute_dtype_and_compute_the_same(monkeypatch):
    """FSDP-QLoRA (recipes/accelerate/fsdp_qlora.yaml): FSDP shards float tensors only, so the packed NF4 weights
    are stored in the compute dtype; the values the model computes do not change."""
    cfg = ModelConfig(name_or_path=str(TINY_BASE))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    assert quantization_config(cfg).bnb_4bit_quant_storage == torch.uint8
    plain = load_model(cfg)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert quantization_config(cfg).bnb_4bit_quant_storage == compute_dtype(cfg) == torch.float32
    sharded = load_model(cfg)
    weight = sharded.get_submodule("model.layers.0.self_attn.q_proj").weight
    assert type(weight).__name__ == "Params4bit" and weight.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, sharded(ids).logits)


def test_every_accelerate_config_loads_with_accelerate():
    from accelerate.commands.config.config_args import load_config_from_file

    configs = [ROOT / "accelerate_config.yaml", *sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))]
    kinds = {path.stem: load_config_from_file(str(path)).distributed_type.value for path in configs}
    assert kinds == {"accelerate_config": "NO", "ddp": "MULTI_GPU", "zero2": "DEEPSPEED", "fsdp_qlora": "FSDP"}
