"""The GRPO stage on the tiny base, 4-bit NF4 on CPU: TRL's GRPOTrainer with the SFT adapter as policy and
frozen reference, align's reward functions, the KL guard, and what the run writes."""

import json
from pathlib import Path
import sys

import pytest
import torch
from conftest import LEARNING_SEED, QA_HELDOUT, QA_TRAIN, TINY_BASE, run_keeping_trainer
from peft import PeftModel
from safetensors.torch import load_file
from trl.trainer.utils import use_adapter

from align.modeling import load_model
from align.recipe import ModelConfig, RecipeError, load_recipe
from align.rewards import RewardError
from align import rl
from align.stages import grpo


REWARDS = [{"name": "exact_match", "args": {"column": "answer"}},
           {"name": "format", "weight": 0.5, "args": {"pattern": r"\+ 1 ="}}]  # a carry: varies, so updates happen


def grpo_section(**overrides):
    """A few seconds of GRPO: 2 prompts x 4 completions of at most 16 tokens per step."""
    return {"learning_rate": 5e-3, "max_steps": 3, "warmup_steps": 0, "per_device_train_batch_size": 8, "num_generations": 4,
            "max_completion_length": 16, "max_length": 64, "activation_checkpointing": False, "logging_steps": 1,
            "per_device_eval_batch_size": 16, "eval_generations": 8, "save_steps": 100, "rewards": REWARDS,
            **overrides}


def prompts_data(**files):
    return {"prompts": {"train": str(QA_TRAIN), "eval": str(QA_HELDOUT), **files},
            "columns": {"prompt": "question"}}


def metrics(results) -> list[dict]:
    lines = (Path(results["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_kl_is_zero_before_the_first_update_and_the_reference_is_the_sft_policy(write_recipe, sft_adapter,
                                                                                   reward_checkpoint):
    data = {**prompts_data(), "answer_style": "align.arithmetic:answer_style"}
    # A reward model's scores differ from answer to answer: every step updates, whatever the seed (42, 1, 2 checked
    # 2026-12-06; with the rules alone a step's rewards were all equal on seed 2, and the KL stayed 0)
    rewards = [*REWARDS, {"name": "reward_model", "weight": 0.1, "args": {"checkpoint": str(reward_checkpoint)}}]
    recipe = load_recipe(write_recipe(sft={}, data=data, run={"seed": LEARNING_SEED},
                                      grpo=grpo_section(learning_rate=2e-3, rewards=rewards)))
    results, (trainer, _) = run_keeping_trainer(grpo, recipe)
    train_logs = [m for m in metrics(results) if "kl" in m]
    assert [m["step"] for m in train_logs] == [1, 2, 3]
    assert train_logs[0]["kl"] == pytest.approx(0.0, abs=1e-7)  # measured before the first optimizer step
    assert all(0 < m["kl"] < recipe.grpo.max_kl for m in train_logs[1:])  # logged, positive, bounded
    assert results["kl_first"] == train_logs[0]["kl"] and results["kl_last"] == train_logs[-1]["kl"]
    assert {"rewards/exact_match/mean", "rewards/exact_match/std", "rewards/format/mean", "rewards/format/std",
            "reward", "reward_std"} <= train_logs[0].keys()
    # data.answer_style: each style's share of the held-out answers, and its accuracy (exact_match) within it
    for decoding in ("greedy", "sampled"):
        r = results["after"][decoding]
        styles = [k.removesuffix("_fraction") for k in r if k.endswith("_fraction")]
        assert styles and set(styles) <= {"worked", "direct"}
        assert sum(r[f"{s}_fraction"] for s in styles) == pytest.approx(1)
        assert sum(r[f"{s}_fraction"] * r[f"{s}_accuracy"] for s in styles) == pytest.approx(r["rewards/exact_match"])

    # The reference adapter still computes exactly what the saved SFT checkpoint computes; the policy moved.
    policy = trainer.model
    sft = PeftModel.from_pretrained(load_model(ModelConfig(name_or_path=str(TINY_BASE))), str(sft_adapter)).eval()
    ids = torch.tensor([[3, 17, 42, 8, 99, 5, 61]])
    policy.eval()
    with torch.no_grad(), use_adapter(policy, "ref"):
        reference_logits = policy(input_ids=ids).logits
    with torch.no_grad():
        policy_logits = policy(input_ids=ids).logits
        sft_logits = sft(input_ids=ids).logits
    torch.testing.assert_close(reference_logits.log_softmax(-1), sft_logits.log_softmax(-1), rtol=1e-5, atol=1e-5)
    assert (policy_logits - sft_logits).abs().max() > 1e-3

    # The checkpoint holds the policy adapter only, and loads with stock PEFT; lineage names what it came from.
    saved = load_file(results["checkpoint"] + "/adapter_model.safetensors")
    assert saved and not any(".ref." in k or "reward" in k for k in saved)
    PeftModel.from_pretrained(load_model(ModelConfig(name_or_path=str(TINY_BASE))), results["checkpoint"])
    lineage = json.loads((Path(results["run_dir"]) / "lineage.json").read_text())
    assert lineage["parent_checkpoint"] == str(sft_adapter)
    assert lineage["rewards"] == [{"name": "exact_match", "weight": 1.0, "args": {"column": "answer"}},
                                  {"name": "format", "weight": 0.5, "args": {"pattern": r"\+ 1 ="}},
                                  {"name": "reward_model", "weight": 0.1, "args": {"checkpoint": str(reward_checkpoint)},
                                   "checkpoint": str(reward_checkpoint)}]  # the reward model it was scored by
    assert results["before"]["prompts"] == 8 and results["after"]["sampled"]["per_prompt"] == 4  # eval_samples default
    for decoding in ("greedy", "sampled"):
        assert set(results["before"][decoding]) >= {"reward_mean", "rewards/exact_match", "rewards/format"}


EASY_PLUGIN = '''
CALLS = []

def says_answer(prompts, completions, completion_ids, answer, **kwargs):
    """1 for an answer that reaches "The answer is" within its 16 tokens (the base, working column by column,
    does on about a fifth of its samples): an easy target."""
    CALLS.append({"prompts": prompts, "completions": completions, "answer": answer})
    return [1.0 if "The answer is" in c[0]["content"] else 0.0 for c in completions]
'''


@pytest.mark.slow
def test_reward_rises_on_an_easy_rule_and_the_plugin_sees_prompt_completion_and_columns(
        write_recipe, tmp_path, monkeypatch):
    """Passes on seeds 42, 1 and 2 (LEARNING_SEED; checked 2026-12-06)."""
    (tmp_path / "easy_rewards.py").write_text(EASY_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "easy_rewards", raising=False)
    section = grpo_section(max_steps=8, learning_rate=5e-3, rewards=[{"name": "easy_rewards:says_answer"}], max_kl=None,
                           eval_generations=0, init_from="base", per_device_train_batch_size=32)  # 8 prompts a step
    recipe = load_recipe(write_recipe(data=prompts_data(), run={"seed": LEARNING_SEED}, grpo=section))
    results = grpo.run(recipe)
    rewards = [m["reward"] for m in metrics(results) if "reward" in m]
    assert len(rewards) == 8
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.1, rewards

    import easy_rewards

    call = easy_rewards.CALLS[0]
    assert len(call["prompts"]) == len(call["completions"]) == len(call["answer"]) == 32
    assert call["prompts"][0][-1]["role"] == "user"
    assert call["completions"][0][0]["role"] == "assistant"
    # The reference answer of each prompt arrives beside it, one per completion (4 completions per prompt).
    references = {json.loads(line)["question"]: json.loads(line)["answer"] for line in QA_TRAIN.open()}
    assert [references[p[-1]["content"]] for p in call["prompts"]] == call["answer"]


def test_max_kl_stops_the_run_with_its_message(write_recipe, sft_adapter):
    recipe = load_recipe(write_recipe(sft={}, data=prompts_data(), grpo=grpo_section(max_kl=1e-9, max_steps=5)))
    with pytest.raises(rl.KLExceeded, match=r"the KL to the reference reached .* at step 2, above grpo.max_kl=1e-09"
                                              r".*raise grpo.beta.*no checkpoint written"):
        grpo.run(recipe)
    run_dir = sft_adapter.parents[1] / "grpo"
    assert not (run_dir / "checkpoint").exists()
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").open() if "kl" in line] == [1, 2]


@pytest.mark.parametrize("quantization", ["nf4", "none"])
def test_activation_checkpointing_trains_the_adapter(write_recipe, sft_adapter, quantization):
    section = grpo_section(max_steps=2, activation_checkpointing=True, eval_generations=0, max_kl=None)
    recipe = load_recipe(write_recipe(sft={}, data=prompts_data(), grpo=section),
                         [f"model.quantization={quantization}"])
    results, (trainer, _) = run_keeping_trainer(grpo, recipe)
    assert trainer.args.gradient_checkpointing
    before = load_file(sft_adapter / "adapter_model.safetensors")
    after = load_file(results["checkpoint"] + "/adapter_model.safetensors")
    changed = [k for k in before if not torch.equal(before[k].float(), after[k].float())]
    assert len(changed) > len(before) // 2  # gradients reached the LoRA weights through the checkpointed layers


def test_settings_that_cannot_work_fail_before_loading(write_recipe, monkeypatch):
    def error(**section):
        return load_recipe(write_recipe(data=prompts_data(), grpo=grpo_section(**section)))

    monkeypatch.setattr(rl, "load_model", lambda *a, **k: pytest.fail("a model was loaded before the error"))

    with pytest.raises(RecipeError, match=r"grpo.use_vllm=true with model.quantization=nf4: vLLM cannot load"):
        grpo.run(error(use_vllm=True))
    with pytest.raises(RecipeError, match=r"grpo.rewards is empty"):
        grpo.run(error(rewards=[]))
    with pytest.raises(RecipeError, match=r"8 completions per step is not a multiple of grpo.num_generations=3"):
        grpo.run(error(num_generations=3))
    with pytest.raises(RecipeError, match=r"reward 'reward_model' \(args.checkpoint=auto\) needs the reward stage's "
                                          r"checkpoint, and the recipe has no reward section \(there is no finished "
                                          r"reward checkpoint at .*reward/checkpoint\)"):
        grpo.run(error(rewards=[{"name": "reward_model"}], init_from="base"))
    with pytest.raises(RecipeError, match=r"grpo.init_from=sft needs the sft stage's checkpoint, and the recipe has no "
                                          r"sft section \(there is no finished sft checkpoint"):
        grpo.run(error(init_from="sft"))
    with pytest.raises(RewardError, match=r"reward 'reward_model': unknown args \['batch'\]; it takes checkpoint"):
        grpo.run(error(rewards=[{"name": "reward_model", "args": {"batch": 4}}], init_from="base"))
