"""`align export`: a LoRA policy merged into its dequantised base is a plain transformers model that computes what
the adapter on the 4-bit base computed."""

import shutil

import torch
from conftest import TINY_BASE, finished
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from align.cli import main
from align.modeling import load_model, load_tokenizer
from align.recipe import ModelConfig


def test_merged_model_computes_what_the_adapter_on_the_4bit_base_computed(sft_adapter, tmp_path, capsys):
    load_tokenizer(ModelConfig(name_or_path=str(TINY_BASE))).save_pretrained(str(sft_adapter))
    run = sft_adapter.parents[1]  # runs/test: the run dir; its sft stage is the only policy
    assert main(["export", str(run), "--out", str(tmp_path / "exported")]) == 0
    assert f"merged {sft_adapter} into its base" in capsys.readouterr().out

    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "exported"))  # plain transformers, no PEFT
    assert not hasattr(merged.config, "quantization_config") and not any("lora" in n for n, _ in merged.named_parameters())
    adapter = PeftModel.from_pretrained(load_model(ModelConfig(name_or_path=str(TINY_BASE))), str(sft_adapter))
    ids = torch.tensor([[3, 17, 42, 8, 99, 5, 61]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapter.eval()(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "exported"))
    assert tokenizer.chat_template  # answers are rendered as in training
    assert not (tmp_path / "exported.tmp").exists()


def test_export_says_what_it_cannot_export(sft_adapter, reward_checkpoint, tmp_path, capsys):
    assert main(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")]) == 2
    assert "no LoRA checkpoint here" in capsys.readouterr().err
    assert main(["export", str(reward_checkpoint), "--out", str(tmp_path / "out")]) == 2
    assert "a SEQ_CLS adapter (a reward model?), not a policy" in capsys.readouterr().err
    run = sft_adapter.parents[1]
    for stage in ("grpo", "ppo"):
        finished(shutil.copytree(sft_adapter, run / stage / "checkpoint"))
    assert main(["export", str(run), "--out", str(tmp_path / "out")]) == 2
    assert "has both a ppo and a grpo checkpoint; name one" in capsys.readouterr().err
    assert main(["export", str(run / "ppo"), "--out", str(tmp_path / "out")]) == 0
