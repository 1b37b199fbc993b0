"""The KTO stage on the tiny base, 4-bit NF4 on CPU: TRL's KTOTrainer on answers labelled good or bad, with the SFT
adapter as policy and a frozen copy of it as reference, through the CLI."""

import json
from pathlib import Path

import pytest
from conftest import (LEARNING_SEED, QA_HELDOUT, ROOT, assert_reference_is_the_sft_policy, first_rows,
                      run_keeping_trainer)

from align import pipeline
from align.cli import print_summary
from align.recipe import RecipeError, load_recipe
from align.stages import kto

FEEDBACK_TRAIN = ROOT / "data" / "arithmetic" / "feedback_train.jsonl"
FEEDBACK_HELDOUT = ROOT / "data" / "arithmetic" / "feedback_heldout.jsonl"


def kto_section(**overrides):
    """A few seconds of KTO: 32 labelled answers a step, greedy answers to 8 held-out prompts."""
    return {"learning_rate": 5e-4, "max_steps": 8, "warmup_steps": 0, "per_device_train_batch_size": 32,
            "max_length": 128, "max_completion_length": 32, "activation_checkpointing": False, "logging_steps": 1,
            "per_device_eval_batch_size": 32, "eval_generations": 8, "save_steps": 100,
            "rewards": [{"name": "exact_match", "args": {"column": "answer"}}], **overrides}


def data(tmp_path, held_out: int = 128):
    """The stage's data; `held_out` labelled answers, each scored before and after training."""
    return {"feedback": {"train": str(first_rows(FEEDBACK_TRAIN, 512, tmp_path / FEEDBACK_TRAIN.name)),
                         "eval": str(first_rows(FEEDBACK_HELDOUT, held_out, tmp_path / FEEDBACK_HELDOUT.name))},
            "prompts": {"eval": str(QA_HELDOUT)},
            "columns": {"prompt": "question", "completion": "answer"}}


@pytest.mark.slow
def test_first_rewards_and_kl_are_zero_the_reference_is_the_sft_policy_and_good_answers_rise(
        write_recipe, sft_adapter, tmp_path):
    """Passes on seeds 42, 1 and 2 (LEARNING_SEED; checked 2026-12-06)."""
    path = write_recipe(sft={}, data=data(tmp_path), run={"seed": LEARNING_SEED}, kto=kto_section())
    results, trainer = run_keeping_trainer(kto, load_recipe(path))

    logs = [json.loads(line) for line in (Path(results["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    train_logs = [m for m in logs if "rewards/margins" in m]
    assert [m["step"] for m in train_logs] == list(range(1, 9))
    # Before any update the policy is its reference: the implicit rewards and the KL estimate are exactly 0.
    assert train_logs[0]["rewards/chosen"] == train_logs[0]["rewards/rejected"] == train_logs[0]["kl"] == 0.0
    assert results["kl_first"] == 0.0 and results["kl_unit"].startswith("nats per answer")
    before, after = results["before"], results["after"]
    assert before["reward_good"] == before["reward_bad"] == before["margin_mean"] == 0.0
    assert after["answers"] == 128 and after["margin_mean"] > 0 and after["loss"] < before["loss"]
    assert after["reward_good"] > after["reward_bad"]  # held-out good answers rose above bad ones
    assert before["prompts"] == after["prompts"] == 8 and "rewards/exact_match" in after["greedy"]

    assert_reference_is_the_sft_policy(trainer.model, sft_adapter)
    lineage = json.loads((Path(results["run_dir"]) / "lineage.json").read_text())
    assert lineage["parent_checkpoint"] == str(sft_adapter)
    assert lineage["data"][0]["labels"] == {"good": 256, "bad": 256}

    from rich.console import Console

    console = Console(width=200, record=True)
    print_summary(console, kto.summary(results))  # what `align kto` prints at the end
    printed = console.export_text()
    assert "good answers (mean)" in printed and "KL to the reference (nats per answer" in printed


def test_align_run_with_kto_and_settings_that_cannot_work(write_recipe, tmp_path):
    rule = [{"name": "exact_match", "args": {"column": "answer"}}]
    recipe = load_recipe(write_recipe(sft={}, reward={}, kto={"rewards": rule}, data=data(tmp_path)))
    assert pipeline.stage_names(recipe) == ["sft", "kto"]  # no reward model unless a reward needs one
    with pytest.raises(RecipeError, match="kto.per_device_train_batch_size=1: KTO's KL reference point"):
        kto.run(load_recipe(write_recipe(data=data(tmp_path), kto=kto_section(per_device_train_batch_size=1))))
