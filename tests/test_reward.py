"""The reward stage on the tiny base, 4-bit NF4 on CPU: TRL's RewardTrainer, a real checkpoint, the scorer."""

import json

import pytest
import torch
from conftest import LEARNING_SEED, PREF_HELDOUT, PREF_TRAIN, TINY_BASE, few_rows, first_rows, run_keeping_trainer
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from align.modeling import ModelLoadError, load_model, load_tokenizer
from align.recipe import RecipeError, load_recipe
from align.rewards import RewardModelScorer, score_conversations
from align.rundir import RunDir
from align.stages import init_adapter, reward


def reward_section(**overrides):
    """A few seconds of reward training on the tiny base."""
    return {"learning_rate": 1e-3, "max_steps": 30, "per_device_train_batch_size": 16,
            "per_device_eval_batch_size": 64, "max_length": 128, "activation_checkpointing": False,
            "logging_steps": 5, **overrides}


@pytest.fixture(scope="module")
def held_out_path(tmp_path_factory):
    return first_rows(PREF_HELDOUT, 64, tmp_path_factory.mktemp("data") / "held_out.jsonl")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, held_out_path):
    """One reward run through `reward.run` (fresh adapter: no sft section), keeping the in-memory trainer."""
    tmp = tmp_path_factory.mktemp("reward")
    recipe_path = tmp / "r.yaml"
    recipe_path.write_text(json.dumps({
        # float32 as every test's (conftest.float32_on_every_cpu, which a module fixture does not see)
        "model": {"name_or_path": str(TINY_BASE), "compute_dtype": "float32"},
        "run": {"root": str(tmp / "runs"), "seed": LEARNING_SEED},
        "data": {"preference": {"train": str(few_rows(PREF_TRAIN, tmp)), "eval": str(held_out_path)}},
        "reward": reward_section(),
    }))
    recipe = load_recipe(recipe_path)
    return (recipe, *run_keeping_trainer(reward, recipe))


@pytest.mark.slow
def test_reward_model_learns_to_rank_held_out_pairs(trained):
    """Passes on seeds 42, 1 and 2 (LEARNING_SEED; checked 2026-12-07 on the first 256 pairs, 30 steps: held-out
    pair accuracy 0.95-1.0, margin 2.1-2.5)."""
    _, results, _ = trained
    before, after = results["before"], results["after"]
    assert abs(before["margin_mean"]) < 0.05  # a fresh head barely tells the answers apart
    assert after["pair_accuracy"] >= 0.7 and after["margin_mean"] > 0.5
    assert after["loss"] < before["loss"] < 0.75
    assert after["reward_std"] > before["reward_std"]


@pytest.mark.slow
def test_run_dir_has_config_lineage_metrics_samples_and_checkpoint(trained):
    recipe, results, _ = trained
    run = RunDir(recipe, "reward")
    assert load_recipe(run.config_path).reward.max_steps == 30
    lineage = json.loads(run.lineage_path.read_text())
    assert lineage["parent_checkpoint"] is None and results["init_from"] is None
    assert [d["examples"] for d in lineage["data"]] == [256, 64]
    assert lineage["results"]["after"]["pair_accuracy"] == results["after"]["pair_accuracy"]
    metrics = [json.loads(line) for line in run.metrics_path.read_text().splitlines()]
    assert len([m for m in metrics if "loss" in m]) == 6
    assert [m["step"] for m in metrics if "eval_pair_accuracy" in m] == [0, 30]
    samples = [json.loads(line) for line in run.samples_path.read_text().splitlines()]
    assert len(samples) == 64 and sum(s["right_after"] for s in samples) / 64 == results["after"]["pair_accuracy"]
    saved = load_file(run.checkpoint_path / "adapter_model.safetensors")
    assert any(k.endswith("score.weight") for k in saved)  # the trained head is in the checkpoint
    assert "score" in json.loads((run.checkpoint_path / "adapter_config.json").read_text())["modules_to_save"]


@pytest.mark.slow
def test_scorer_from_the_checkpoint_gives_the_trainers_own_scores(trained, held_out_path):
    recipe, results, trainer = trained
    prediction = trainer.predict(trainer.eval_dataset)  # one batch of 64 pairs: 64 chosen, then 64 rejected
    in_trainer = torch.tensor(prediction.predictions).reshape(-1)
    rows = [json.loads(line) for line in held_out_path.read_text().splitlines()]
    scorer = RewardModelScorer.from_checkpoint(results["checkpoint"], recipe.model)
    prompts = [r["question"] for r in rows]
    chosen = scorer.score(prompts, [r["chosen"] for r in rows])
    rejected = scorer.score(prompts, [r["rejected"] for r in rows])
    torch.testing.assert_close(torch.tensor(chosen + rejected), in_trainer, rtol=1e-4, atol=1e-4)
    assert sum(c > r for c, r in zip(chosen, rejected)) / len(rows) == results["after"]["pair_accuracy"]


@pytest.mark.slow
def test_scores_do_not_depend_on_padding_side_batching_or_pad_token(trained):
    recipe, results, _ = trained
    scorer = RewardModelScorer.from_checkpoint(results["checkpoint"], recipe.model)
    conversations = [[{"role": "user", "content": f"What is {a} + {b}?"},
                      {"role": "assistant", "content": f"{a} + {b} = {a + b}." + " The answer is" * (a % 3)}]
                     for a, b in [(12, 30), (250, 17), (99, 999), (7, 41)]]
    alone = [score_conversations(scorer.model, scorer.tokenizer, [c])[0] for c in conversations]
    for side in ("left", "right"):
        scorer.tokenizer.padding_side = side
        batched = score_conversations(scorer.model, scorer.tokenizer, conversations, batch_size=4)
        torch.testing.assert_close(torch.tensor(batched), torch.tensor(alone), rtol=1e-4, atol=1e-4)
    scorer.tokenizer.pad_token = scorer.tokenizer.eos_token  # as load_tokenizer does for models without one
    alone = [score_conversations(scorer.model, scorer.tokenizer, [c])[0] for c in conversations]
    batched = score_conversations(scorer.model, scorer.tokenizer, conversations, batch_size=4)
    torch.testing.assert_close(torch.tensor(batched), torch.tensor(alone), rtol=1e-4, atol=1e-4)


def test_reward_adapter_starts_from_the_sft_adapter(write_recipe, sft_adapter):
    recipe = load_recipe(write_recipe(sft={}, reward={}))  # init_from: auto, and the recipe has an sft section
    assert init_adapter(recipe, "reward") == sft_adapter
    model = reward.build_model(recipe, sft_adapter)
    saved = load_file(sft_adapter / "adapter_model.safetensors")
    loaded = dict(model.named_parameters())
    for key, value in saved.items():
        name = key.replace(".weight", ".default.weight")
        torch.testing.assert_close(loaded[name].float(), value.float())
    assert model.peft_config["default"].r == 8  # the adapter's shape, not the recipe's lora.r=16
    assert loaded["base_model.model.score.modules_to_save.default.weight"].requires_grad


def test_missing_sft_checkpoint_or_unfit_adapter_is_a_clear_error(write_recipe, tmp_path):
    recipe = load_recipe(write_recipe(sft={}, reward={}))
    with pytest.raises(RecipeError, match=r"no finished sft checkpoint at .*sft/checkpoint; run `align sft`.* "
                                          r"or set reward.init_from=base"):
        init_adapter(recipe, "reward")
    assert init_adapter(load_recipe(write_recipe(sft={}, reward={"init_from": "base"})), "reward") is None
    with pytest.raises(RecipeError, match=r"reward.init_from=nowhere: not auto, sft, base, or a LoRA adapter"):
        init_adapter(load_recipe(write_recipe(reward={"init_from": "nowhere"})), "reward")
    other = get_peft_model(AutoModelForCausalLM.from_pretrained(str(TINY_BASE)),
                           LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    other.save_pretrained(str(tmp_path / "other"))
    recipe = load_recipe(write_recipe(reward={"init_from": str(tmp_path / "other"), "max_steps": 1}))
    adapter = init_adapter(recipe, "reward")
    model = reward.build_model(recipe, adapter)  # takes the adapter's own targets: fits
    assert model.peft_config["default"].target_modules == {"q_proj"}
    broken = tmp_path / "other" / "adapter_config.json"
    broken.write_text(broken.read_text().replace('"q_proj"', '"v_proj"'))
    with pytest.raises(ModelLoadError, match=r"the adapter does not fit this model .* no place"):
        reward.build_model(recipe, adapter)


def test_reward_model_on_a_full_precision_base_has_an_fp32_head(write_recipe):
    recipe = load_recipe(write_recipe(reward={}), ["model.quantization=none"])
    model = load_model(recipe.model, head="score")
    assert model.score.weight.shape == (1, model.config.hidden_size)
    assert model.score.weight.dtype == torch.float32
    tokenizer = load_tokenizer(recipe.model)
    scores = score_conversations(model, tokenizer, [[{"role": "user", "content": "hi"}]] * 2)
    assert len(scores) == 2 and scores[0] == pytest.approx(scores[1])  # one score per conversation, deterministic
