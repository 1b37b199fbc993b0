"""What resuming a stage from its last trainer checkpoint guarantees: the run carries on at that step with the
optimizer, scheduler, random states and data order it had, so the steps after it are the steps an uninterrupted
run takes."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import QA_TRAIN, ROOT, few_rows, sft_section
from test_dpo import data as dpo_data
from test_dpo import dpo_section
from test_kto import data as kto_data
from test_kto import kto_section
from test_pipeline import RL_SECTION

from align.cli import main
from align.recipe import load_recipe
from align.rundir import last_trainer_checkpoint, write_manifest
from align.stages import dpo, kto

OFFLINE = {"dpo": (dpo, dpo_section, dpo_data), "kto": (kto, kto_section, kto_data)}


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r and "train_loss" not in r}


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_an_offline_preference_stage_resumed_at_step_2_takes_the_steps_an_uninterrupted_run_takes(
        write_recipe, sft_adapter, tmp_path, stage):
    module, section, data = OFFLINE[stage]
    recipe = load_recipe(write_recipe(sft={}, data=data(tmp_path, held_out=16), **{stage: section(
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


def test_a_truncated_optimizer_file_falls_back_to_the_checkpoint_before(finished_sft, caplog):
    _, stage = finished_sft
    trainer = stage / "trainer"
    assert last_trainer_checkpoint(trainer) == trainer / "checkpoint-20"
    optimizer = trainer / "checkpoint-20" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:64])
    assert last_trainer_checkpoint(trainer) == trainer / "checkpoint-10"
    assert "checkpoint-20 cannot be resumed from (optimizer.pt is not the file the run wrote" in caplog.text


def test_resuming_a_run_that_has_all_its_steps_adds_none(finished_sft):
    from align.stages import sft

    path, stage = finished_sft
    first = json.loads((stage / "lineage.json").read_text())["results"]
    again = sft.run(load_recipe(path), resume=True)
    assert abs(again["train_loss"] - first["train_loss"]) < 1e-3  # the mean of the same 20 steps' logged losses
    assert again["after"]["answer_loss"] == pytest.approx(first["after"]["answer_loss"], abs=1e-6)
    steps = [json.loads(line).get("step") for line in (stage / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 20


def test_a_torn_last_line_in_metrics_is_dropped_with_a_warning_and_resume_continues(finished_sft, caplog):
    from align.stages import sft

    path, stage = finished_sft
    metrics = stage / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write('{"step": 20, "loss": 0.')  # what a kill -9 in the middle of a write leaves
    sft.run(load_recipe(path), resume=True)
    assert json.loads((stage / "lineage.json").read_text())["resumed_from_step"] == 20
    assert f"{metrics}:" in caplog.text and "the last line is cut short" in caplog.text
    records = [json.loads(line) for line in metrics.read_text().splitlines()]  # every line whole again
    assert max(r.get("step", 0) for r in records) == 20


def test_an_incomplete_trainer_checkpoint_is_never_resumed_from(tmp_path):
    for step, complete in ((2, True), (4, True), (6, False)):
        checkpoint = tmp_path / f"checkpoint-{step}"
        checkpoint.mkdir()
        (checkpoint / "adapter_model.safetensors").write_bytes(b"weights")
        (checkpoint / "optimizer.pt").write_bytes(b"state" * 100)
        if complete:  # the manifest is written last
            write_manifest(checkpoint)
    (tmp_path / "checkpoint-4" / "optimizer.pt").write_bytes(b"state")  # cut short (a full disk)
    assert last_trainer_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]


def kill_9_mid_run(recipe_path, launcher, kill_when: Path) -> None:
    """`align run` in a subprocess (its own process group), killed with SIGKILL once `kill_when` exists."""
    command = [*launcher, "run", str(recipe_path), "rl.min_reward_accuracy=0"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.monotonic() + 300
    while not kill_when.exists():
        assert process.poll() is None, f"finished before {kill_when} appeared: {process.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()


def complete_checkpoints(run_dir):
    return sorted(p.parent.name for p in run_dir.glob("*/checkpoint") if (p / "adapter_model.safetensors").exists())


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_kill_9_mid_stage_then_run_again_resumes_and_ends_with_every_checkpoint(write_recipe, tmp_path, stage, capfd,
                                                                               caplog, monkeypatch):
    """Killed mid-SFT or mid-GRPO (under accelerate launch), `align run` again (here in the test's process) resumes
    that stage from its last complete trainer checkpoint and ends with the checkpoints an uninterrupted run leaves."""
    rewards = [{"name": "exact_match", "args": {"column": "answer"}}]
    qa = few_rows(QA_TRAIN, tmp_path)
    recipe = write_recipe(
        data={"sft": {"train": str(qa)}, "prompts": {"train": str(qa)},
              "columns": {"prompt": "question", "completion": "answer"}},
        # the killed stage runs well past the checkpoint it is killed at, so the kill lands mid-stage
        sft=sft_section(max_steps=20 if stage == "sft" else 4, save_steps=5, eval_generations=0),
        grpo={**RL_SECTION, "max_steps": 8 if stage == "grpo" else 2, "save_steps": 2, "eval_generations": 0,
              "rewards": rewards})
    run_dir = tmp_path / "runs" / "test"
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(ROOT / "accelerate_config.yaml"), "-m", "align") if stage == "grpo" else (sys.executable, "-m", "align")
    kill_at = "checkpoint-10" if stage == "sft" else "checkpoint-4"
    kill_9_mid_run(recipe, launcher, run_dir / stage / "trainer" / kill_at)
    assert not (run_dir / stage / "checkpoint").exists() and not (run_dir / "grpo" / "checkpoint").exists()
    resumable = last_trainer_checkpoint(run_dir / stage / "trainer")
    assert resumable is not None
    step = int(resumable.name.split("-")[1])

    monkeypatch.setenv("COLUMNS", "200")  # rich wraps at 80 columns when not on a terminal
    caplog.set_level(logging.INFO)
    assert main(["run", str(recipe), "rl.min_reward_accuracy=0"]) == 0
    out = capfd.readouterr().out
    assert f"{stage}: resuming from {resumable}" in caplog.text
    lineage = json.loads((run_dir / stage / "lineage.json").read_text())
    assert lineage["resumed_from_step"] == step and lineage["end_time"]
    if stage == "grpo":  # the KL before the first update, logged by the interrupted run, is still the first
        assert lineage["results"]["kl_first"] == pytest.approx(0, abs=1e-4)
    assert complete_checkpoints(run_dir) == ["grpo", "sft"]
    assert not list(run_dir.rglob("*.tmp"))
    steps = [json.loads(line)["step"] for line in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # the metrics of the interrupted run up to its checkpoint, then the resumed run's
    assert "resumed" in out and "align run test" in out
