"""The PPO stage: its maths against hand-computed values, then the loop on the tiny base in 4-bit NF4 on CPU
(KL 0 before the first update, one copy of the base for policy, reference, reward and value models, the score
rising on an easy task, resuming a run exactly)."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import (
    LEARNING_SEED, QA_HELDOUT, QA_TRAIN, TINY_BASE, assert_reference_is_the_sft_policy, make_sft_adapter, run_keeping_trainer,
)
from peft import PeftModel
from safetensors.torch import load_file

from align import rl
from align.modeling import load_model
from align.recipe import ModelConfig, RecipeError, RewardFunction, load_recipe
from align.stages import ppo
from align.stages.ppo import (
    KLController,
    completion_mask,
    gae,
    kl_penalised_rewards,
    masked_whiten,
    policy_loss,
    value_loss,
)

# -- the maths ------------------------------------------------------------------------------------------------


def test_gae_on_a_four_token_completion():
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.4, 0.3, 0.2]])
    mask = torch.ones(1, 4)
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # By hand: deltas (0.4-0.5, 0.3-0.4, 0.2-0.3, 1-0.2) = (-0.1, -0.1, -0.1, 0.8), A_t = delta_t + 0.95 A_{t+1}.
    expected = torch.tensor([[-0.1 + 0.95 * 0.527, -0.1 + 0.95 * 0.66, -0.1 + 0.95 * 0.8, 0.8]])
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, expected + values)
    # lambda = 1: the returns are the discounted reward-to-go, whatever the values.
    _, returns = gae(rewards, values, mask, gamma=0.9, lam=1.0)
    torch.testing.assert_close(returns, torch.tensor([[0.729, 0.81, 0.9, 1.0]]))


def test_gae_ends_each_completion_at_its_last_token():
    rewards = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    values = torch.tensor([[0.5, 0.4, 9.0, 9.0]])  # padding's values must not be bootstrapped from
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    torch.testing.assert_close(advantages, torch.tensor([[-0.1 + 0.95 * 0.6, 0.6, 0.0, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.47 + 0.5, 1.0, 0.0, 0.0]]))


def test_whitening_uses_only_the_completion_tokens():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # mean 2, unbiased variance 1 over the first three
    torch.testing.assert_close(masked_whiten(x, mask), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=False), torch.tensor([[1.0, 2.0, 3.0, 0.0]]),
                               atol=1e-6, rtol=0)


def test_kl_penalty_at_every_token_and_score_at_the_last():
    scores = torch.tensor([2.0, -1.0])
    logprobs = torch.tensor([[-1.0, -1.0, -1.0, 0.0], [-2.0, -0.1, 0.0, 0.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, -0.5, -9.0], [-1.0, -0.1, -5.0, -5.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    rewards, kl = kl_penalised_rewards(scores, logprobs, ref_logprobs, mask, beta=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, -0.5, 0.0], [-1.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, 0.05 + 2.0, 0.0], [0.1, -1.0, 0.0, 0.0]]))


def test_clipped_policy_loss():
    ratios = torch.tensor([[1.5, 0.5, 1.5, 0.5, 3.0]])
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])  # the last token is padding: huge values must not count
    old = torch.zeros(1, 5)
    loss, stats = policy_loss(ratios.log(), old, advantages, mask, cliprange=0.2)
    # Per token max(-A r, -A clip(r)): -1.2 (clipped), -0.5, 1.5, 0.8 (clipped).
    torch.testing.assert_close(loss, torch.tensor((-1.2 - 0.5 + 1.5 + 0.8) / 4))
    torch.testing.assert_close(stats["clipfrac"], torch.tensor(0.5))
    logs = ratios.log()[0, :4]
    torch.testing.assert_close(stats["approxkl"], 0.5 * (logs**2).mean())


def test_clipped_value_loss():
    values = torch.tensor([[0.5, 1.5, 7.0]])
    old_values = torch.tensor([[0.0, 1.0, 0.0]])
    returns = torch.tensor([[1.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, stats = value_loss(values, old_values, returns, mask, cliprange_value=0.2)
    # Token 1: clipped to 0.2, error 0.64 > 0.25. Token 2: clipped to 1.2, error 0.04 < 0.25.
    torch.testing.assert_close(loss, torch.tensor(0.5 * (0.64 + 0.25) / 2))
    torch.testing.assert_close(stats["value_clipfrac"], torch.tensor(0.5))


def test_completion_mask_stops_after_the_first_eos():
    eos = 2
    responses = torch.tensor([[5, 7, eos, eos, eos], [5, eos, 3, 4, 0], [1, 3, 3, 4, 5]])
    assert completion_mask(responses, eos).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_a_negative_kl_estimate_is_explained_once(caplog):
    """The KL logged is the k1 estimate over sampled answers: unbiased, and below 0 on a small batch near the
    reference (it was -0.0295 on 8 answers of SmolLM2); the log says so where it first happens."""
    watch = ppo.KLWatch(max_kl=1.0)
    with caplog.at_level("INFO", logger="align.stages.ppo"):
        watch.record(0.0, 1)
        watch.record(-0.0295, 4)
        watch.record(-0.01, 5)
    explained = [r.getMessage() for r in caplog.records if "can fall below 0" in r.getMessage()]
    assert len(explained) == 1 and "-0.0295 nats per completion at step 4" in explained[0]
    assert watch.values() == (0.0, -0.01, 0.0)  # first, last, max
    with pytest.raises(rl.KLExceeded, match=r"reached 1.5 nats per completion at step 6, above ppo.max_kl=1"):
        watch.record(1.5, 6)


def test_adaptive_kl_controller():
    fixed = KLController(0.05)
    fixed.update(kl=100.0, samples=64)
    assert fixed.value == 0.05
    adaptive = KLController(0.1, target=1.0, horizon=1000)
    adaptive.update(kl=2.0, samples=100)  # error clipped to +0.2: beta x (1 + 0.2 x 100/1000)
    assert adaptive.value == pytest.approx(0.1 * 1.02)
    adaptive.update(kl=0.9, samples=100)  # error -0.1
    assert adaptive.value == pytest.approx(0.1 * 1.02 * 0.99)


# -- the loop on the tiny base ------------------------------------------------------------------------------


REWARDS = [{"name": "exact_match", "args": {"column": "answer"}},
           {"name": "length", "weight": 0.5, "args": {"max_tokens": 8, "per_token": 0.1}}]


def ppo_section(**overrides):
    """A few seconds of PPO: rollouts of 8 prompts, completions of at most 16 tokens."""
    return {"learning_rate": 2e-3, "max_steps": 3, "warmup_steps": 0, "per_device_train_batch_size": 4,
            "num_mini_batches": 2, "num_ppo_epochs": 2, "max_completion_length": 16, "max_length": 64,
            "activation_checkpointing": False, "logging_steps": 1, "per_device_eval_batch_size": 16,
            "eval_generations": 8, "eval_samples": 2, "save_steps": 100, "rewards": REWARDS, **overrides}


def prompts_data():
    return {"prompts": {"train": str(QA_TRAIN), "eval": str(QA_HELDOUT)}, "columns": {"prompt": "question"}}


def metrics(results) -> list[dict]:
    lines = (Path(results["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if '"score"' in line]


def base_weight_storages(loop: ppo.PPOLoop) -> set[int]:
    """The storages of every 4-bit base weight that the loop's policy, reference, reward and value models use."""
    import bitsandbytes as bnb

    models = [loop.policy, loop.value.policy] + [r.scorer.model for r in loop.rewards if r.scorer is not None]
    return {p.untyped_storage().data_ptr() for m in models for p in m.parameters() if isinstance(p, bnb.nn.Params4bit)}


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory, reward_checkpoint):
    """One PPO run (3 rollouts) from an SFT adapter, scored by rules and the reward model, the value model from the
    reward model: (recipe, results, the PPO loop, the SFT adapter). Its tests pass on seeds 42, 1 and 2
    (LEARNING_SEED; checked 2026-12-06)."""
    tmp = tmp_path_factory.mktemp("ppo")
    adapter = make_sft_adapter(tmp / "runs" / "test" / "sft" / "checkpoint")
    rewards = [*REWARDS, {"name": "reward_model", "weight": 0.1, "args": {"checkpoint": str(reward_checkpoint)}}]
    path = tmp / "r.yaml"
    path.write_text(json.dumps({  # float32 as every test's (a module fixture does not see conftest's autouse one)
        "model": {"name_or_path": str(TINY_BASE), "compute_dtype": "float32"},
        "run": {"root": str(tmp / "runs"), "name": "test", "seed": LEARNING_SEED}, "sft": {}, "data": prompts_data(),
        "ppo": ppo_section(rewards=rewards, value_init="reward")}))
    recipe = load_recipe(path)
    results, loop = run_keeping_trainer(ppo, recipe)
    return recipe, results, loop, adapter


def test_policy_reference_reward_and_value_are_adapters_on_one_copy_of_the_base(ppo_run):
    import bitsandbytes as bnb

    recipe, _, loop, _ = ppo_run
    one_base = sum(isinstance(p, bnb.nn.Params4bit) for p in load_model(recipe.model).parameters())
    assert len(base_weight_storages(loop)) == one_base > 0
    assert set(loop.policy.peft_config) == {"default", "ref", "reward", "value"}


def test_the_first_kl_is_zero_then_it_moves_within_max_kl_and_every_step_is_logged(ppo_run):
    recipe, results, _, _ = ppo_run
    logs = metrics(results)
    assert [m["step"] for m in logs] == [1, 2, 3]
    assert logs[0]["kl"] == 0.0 and logs[0]["non_score_reward"] == 0.0  # the rollout before any update
    assert all(0 < abs(m["kl"]) < recipe.ppo.max_kl for m in logs[1:])  # logged, moved, bounded
    assert (results["kl_first"], results["kl_last"]) == (logs[0]["kl"], logs[-1]["kl"])
    assert {"score", "kl", "non_score_reward", "policy_loss", "value_loss", "clipfrac", "approxkl", "entropy",
            "explained_variance", "completion_length", "tokens_per_second", "rewards/exact_match",
            "rewards/length", "rewards/reward_model", "beta", "learning_rate"} <= logs[0].keys()
    assert logs[0]["approxkl"] >= 0 and 0 <= logs[0]["clipfrac"] <= 1


def test_the_reference_is_still_the_sft_policy_and_the_policy_moved(ppo_run):
    _, _, loop, adapter = ppo_run
    assert_reference_is_the_sft_policy(loop.policy, adapter)


def test_the_checkpoint_holds_the_policy_adapter_and_value_the_value_model(ppo_run, reward_checkpoint):
    _, results, loop, adapter = ppo_run
    saved = load_file(results["checkpoint"] + "/adapter_model.safetensors")
    assert saved and not any(f".{name}." in k for k in saved for name in ("ref", "reward", "value"))
    PeftModel.from_pretrained(load_model(ModelConfig(name_or_path=str(TINY_BASE))), results["checkpoint"])  # stock PEFT
    value = load_file(results["checkpoint"] + "/value/adapter_model.safetensors")
    assert value["score.weight"].shape == (1, loop.policy.config.hidden_size) and len(value) > 1
    lineage = json.loads((Path(results["run_dir"]) / "lineage.json").read_text())
    assert lineage["parent_checkpoint"] == str(adapter) and lineage["value_init"] == str(reward_checkpoint)
    assert lineage["results"]["after"]["greedy"]["reward_mean"] == results["after"]["greedy"]["reward_mean"]
    assert len((Path(results["run_dir"]) / "samples.jsonl").read_text().splitlines()) == 8


def test_value_model_starts_from_the_reward_model_only_when_it_is_the_whole_score():
    rm = RewardFunction(name="reward_model", weight=0.5)
    rule = RewardFunction(name="exact_match", args={"column": "answer"})
    specs = lambda *rewards: SimpleNamespace(checkpoints={0: Path("rm")}, cfg=SimpleNamespace(rewards=list(rewards)))  # noqa: E731
    shares = SimpleNamespace(peft_config={"default": None, "ref": None, "reward": None})
    own_base = SimpleNamespace(peft_config={"default": None, "ref": None})
    assert ppo.value_init("auto", specs(rm), shares) == (Path("rm"), 0.5)  # its head scaled by the weight
    assert ppo.value_init("auto", specs(rm, rule), shares) == (None, 0.0)  # a zero head on the policy's adapter
    assert ppo.value_init("auto", specs(rm), own_base) == (None, 0.0)
    assert ppo.value_init("reward", specs(rm, rule), shares) == (Path("rm"), 0.5)
    with pytest.raises(RecipeError, match=r"value_init=reward, but no reward_model reward runs on the policy's base"):
        ppo.value_init("reward", specs(rm), own_base)
    with pytest.raises(RecipeError, match=r"value_init=nowhere: not auto, reward, policy, or a reward stage"):
        ppo.value_init("nowhere", specs(rm), shares)


def test_a_reward_model_with_its_own_base_is_a_second_copy(write_recipe, sft_adapter, reward_checkpoint):
    """The storage count above is meaningful: a reward model that does not share the policy's base adds one."""
    rewards = [{"name": "reward_model", "args": {"checkpoint": str(reward_checkpoint), "share_base": False}}]
    recipe = load_recipe(write_recipe(sft={}, data=prompts_data(),
                                      ppo=ppo_section(rewards=rewards, max_steps=1, eval_generations=0)))
    _, loop = run_keeping_trainer(ppo, recipe)
    import bitsandbytes as bnb

    one_base = sum(isinstance(p, bnb.nn.Params4bit) for p in load_model(recipe.model).parameters())
    assert len(base_weight_storages(loop)) == 2 * one_base
    assert "reward" not in loop.policy.peft_config  # and the value model starts from the policy's adapter
    assert json.loads((Path(loop.run_dir.path) / "lineage.json").read_text())["value_init"] == "the policy's adapter"


@pytest.mark.slow
def test_score_rises_on_an_easy_task(write_recipe, sft_adapter):
    """Rewarded for reaching "The answer is" within 16 tokens (the format rule; working column by column, the base
    gets there on about a fifth of its answers), the policy learns to get to the point within a few steps. Passes on
    seeds 42, 1 and 2 (LEARNING_SEED; checked 2026-12-06)."""
    rewards = [{"name": "format", "args": {"pattern": "The answer is"}}]
    recipe = load_recipe(write_recipe(data=prompts_data(), run={"seed": LEARNING_SEED}, ppo=ppo_section(
        rewards=rewards, max_steps=8, learning_rate=3e-3, eval_generations=0, beta=0.01, init_from="base",
        per_device_train_batch_size=8)))  # rollouts of 16 prompts
    logs = metrics(ppo.run(recipe))
    first, last = logs[:2], logs[-2:]
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    assert mean(last, "score") > mean(first, "score") + 0.3


def test_resume_continues_at_the_same_step_with_the_same_state(write_recipe, sft_adapter, tmp_path):
    """A run resumed from its step-2 checkpoint computes steps 3 and 4 exactly as the uninterrupted run did."""
    section = ppo_section(max_steps=4, save_steps=2, kl_target=0.5, kl_horizon=20, eval_generations=0)
    recipe = load_recipe(write_recipe(sft={}, data=prompts_data(), ppo=section))
    whole = ppo.run(recipe)
    trainer_dir = Path(whole["run_dir"]) / "trainer"
    assert [p.name for p in trainer_dir.iterdir()] == ["checkpoint-2"]
    uninterrupted = metrics(whole)

    resumed = ppo.run(recipe, resume=True)
    assert resumed["resumed_from_step"] == 2 and resumed["steps"] == 4
    again = metrics(resumed)
    assert [m["step"] for m in again] == [1, 2, 3, 4]  # steps 1-2 kept from before the checkpoint
    assert uninterrupted[2]["beta"] < recipe.ppo.beta  # the controller moved beta: its state matters
    for before, after in zip(uninterrupted[2:], again[2:]):
        for key in ("beta", "kl", "score", "policy_loss", "value_loss", "completion_length"):
            assert after[key] == pytest.approx(before[key], rel=1e-4, abs=1e-6), key
    lineage = json.loads((Path(resumed["run_dir"]) / "lineage.json").read_text())
    assert lineage["resumed_from_step"] == 2


def test_settings_that_cannot_work_fail_before_loading(write_recipe, monkeypatch):
    monkeypatch.setattr(rl, "load_model", lambda *a, **k: pytest.fail("a model was loaded before the error"))

    def recipe(**section):
        return load_recipe(write_recipe(data=prompts_data(), ppo=ppo_section(**section)))

    with pytest.raises(RecipeError, match=r"the recipe has no ppo section"):
        ppo.run(load_recipe(write_recipe(data=prompts_data())))
    with pytest.raises(RecipeError, match=r"ppo.rewards is empty"):
        ppo.run(recipe(rewards=[]))
    with pytest.raises(RecipeError, match=r"ppo.kl_target=0"):
        ppo.run(recipe(kl_target=0))
    with pytest.raises(RecipeError, match=r"ppo.init_from=sft needs the sft stage's checkpoint, and the recipe has no "
                                          r"sft section \(there is no finished sft checkpoint"):
        ppo.run(recipe(init_from="sft"))
    with pytest.raises(RecipeError, match=r"reward 'reward_model' \(args.checkpoint=auto\) needs the reward stage's "
                                          r"checkpoint, and the recipe has no reward section \(there is no finished "
                                          r"reward checkpoint at .*reward/checkpoint\)"):
        ppo.run(recipe(rewards=[{"name": "reward_model"}], init_from="base"))


def test_too_few_prompts_and_value_init_without_a_reward_model(write_recipe, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(rl, "load_model", lambda *a, **k: pytest.fail("a model was loaded before the error"))
        with pytest.raises(RecipeError, match=r"2000 training prompts are fewer than one rollout: .* = 4000 per device"):
            ppo.run(load_recipe(write_recipe(data=prompts_data(), ppo=ppo_section(
                init_from="base", per_device_train_batch_size=1000, num_mini_batches=4))))
    with pytest.raises(RecipeError, match=r"ppo.value_init=reward, but no reward_model reward"):
        ppo.run(load_recipe(write_recipe(data=prompts_data(), ppo=ppo_section(init_from="base", value_init="reward"))))


def test_kl_ceiling_stops_the_run_without_a_checkpoint(write_recipe, sft_adapter):
    recipe = load_recipe(write_recipe(sft={}, data=prompts_data(), ppo=ppo_section(
        max_steps=4, learning_rate=5e-2, max_kl=1e-3, eval_generations=0)))
    with pytest.raises(rl.KLExceeded, match=r"above ppo.max_kl=0.001.*raise ppo.beta.*no checkpoint written"):
        ppo.run(recipe)
    assert not (Path(recipe.run.root) / "test" / "ppo" / "checkpoint").exists()
