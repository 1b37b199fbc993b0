"""What resuming a stage from its last trainer checkpoint guarantees: the run carries on at that step with the
optimizer, scheduler, random states and data order it had, so the steps after it are the steps an uninterrupted
run takes."""

import json
import shutil
from pathlib import Path

import pytest
from test_dpo import data as dpo_data
from test_dpo import dpo_section
from test_kto import data as kto_data
from test_kto import kto_section

from align.recipe import load_recipe
from align.stages import dpo, kto

OFFLINE = {"dpo": (dpo, dpo_section, dpo_data), "kto": (kto, kto_section, kto_data)}


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r and "train_loss" not in r}


@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_an_offline_preference_stage_resumed_at_step_2_takes_the_steps_an_uninterrupted_run_takes(
        write_recipe, sft_adapter, tmp_path, stage):
    module, section, data = OFFLINE[stage]
    recipe = load_recipe(write_recipe(sft={}, data=data(tmp_path), **{stage: section(
        max_steps=4, save_steps=2, eval_generations=0, per_device_train_batch_size=8)}))
    uninterrupted = module.run(recipe)
    run_dir = Path(uninterrupted["run_dir"])
    expected = losses(run_dir)
    assert sorted(expected) == [1, 2, 3, 4]

    # As if killed between steps 2 and 4: the later trainer checkpoint and the finished one never written.
    shutil.rmtree(run_dir / "trainer" / "checkpoint-4")
    shutil.rmtree(run_dir / "checkpoint")
    resumed = module.run(recipe, resume=True)

    assert resumed["resumed_from_step"] == 2 and resumed["steps"] == 4
    assert losses(run_dir) == pytest.approx(expected, rel=1e-5)  # steps 1-2 kept, 3-4 trained again alike
    assert resumed["before"] == uninterrupted["before"]  # the evaluation before training is the interrupted run's
    assert (run_dir / "checkpoint" / "adapter_model.safetensors").is_file()
