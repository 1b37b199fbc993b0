"""Data-parallel training with 2 real processes on the CPU (gloo), as multi-GPU runs take the same code paths:
every stage and `align run` train data-parallel, ranks end with identical weights, one process writes the run dir."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PREF_HELDOUT, PREF_TRAIN, QA_HELDOUT, QA_TRAIN, ROOT, few_rows, first_rows, recipe_writer, sft_section

from align.recipe import load_recipe

pytestmark = pytest.mark.slow  # `pytest -m "not slow"` leaves this file out

QA = {"columns": {"prompt": "question", "completion": "answer"}}
RL = {"learning_rate": 3e-4, "num_generations": 4, "per_device_train_batch_size": 8, "max_completion_length": 24,
      "max_length": 96, "max_steps": 2, "activation_checkpointing": False, "logging_steps": 1,
      "eval_generations": 4, "eval_samples": 1, "per_device_eval_batch_size": 4,
      "rewards": [{"name": "exact_match", "args": {"column": "answer"}}, {"name": "reward_model", "weight": 0.02}]}


def launch(*commands, processes=2):
    """Each of `commands` ("run R", "ppo R") as `align COMMAND` under `ACCELERATE_USE_CPU=1 torchrun
    --nproc_per_node PROCESSES`, one after another in the same processes (tests/align_commands.py)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_port", str(port), str(ROOT / "tests" / "align_commands.py"), *commands]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def stage_results(stage_dir: Path) -> dict:
    return json.loads((stage_dir / "lineage.json").read_text())["results"]


def started_from(stage_dir: Path) -> str:
    return json.loads((stage_dir / "lineage.json").read_text())["parent_checkpoint"]


def logged_steps(stage_dir: Path, key: str) -> list[int]:
    return [r["step"] for r in map(json.loads, (stage_dir / "metrics.jsonl").read_text().splitlines()) if key in r]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """On 2 processes, one launch: `align run` (sft -> reward -> grpo), then `align ppo`, `align dpo` and
    `align kto`, each starting from the run's SFT checkpoint: (recipe path, run dir)."""
    from test_dpo import dpo_section
    from test_kto import data as kto_data
    from test_kto import kto_section

    tmp = tmp_path_factory.mktemp("two_processes")
    pairs = first_rows(PREF_HELDOUT, 16, tmp / "pairs.jsonl")  # scored before and after the reward stage
    ppo = {**{k: v for k, v in RL.items() if k not in ("num_generations",)}, "per_device_train_batch_size": 4,
           "rewards": [{"name": "exact_match", "args": {"column": "answer"}}], "num_ppo_epochs": 1,
           "learning_rate": 1e-3}
    offline = {"max_steps": 2, "eval_generations": 4, "per_device_train_batch_size": 8}
    recipe = recipe_writer(tmp)(
        lora={"dropout": 0.0},  # nothing random in a step: 1 x 16 can be compared with 2 x 8 loss for loss
        data={"sft": {"train": str(few_rows(QA_TRAIN, tmp)), "eval": str(QA_HELDOUT)},
              "preference": {"train": str(few_rows(PREF_TRAIN, tmp)), "eval": str(pairs)},
              "feedback": kto_data(tmp, held_out=16)["feedback"],
              "prompts": {"train": str(few_rows(QA_TRAIN, tmp)), "eval": str(QA_HELDOUT)}, **QA},
        sft=sft_section(max_steps=4, per_device_train_batch_size=8, logging_steps=1, eval_generations=4),
        reward={"max_steps": 3, "per_device_train_batch_size": 4, "max_length": 128, "logging_steps": 1,
                "activation_checkpointing": False, "learning_rate": 1e-3},
        grpo=RL, ppo=ppo, dpo=dpo_section(**offline), kto=kto_section(**offline),
        rl={"min_reward_accuracy": 0, "algorithm": "grpo"})
    # ppo before dpo and kto: the stages after it in the same processes still have their process group
    launch(f"run {recipe}", f"ppo {recipe}", f"dpo {recipe}", f"kto {recipe}")
    return recipe, tmp / "runs" / "test"


def test_align_run_on_two_processes_trains_every_stage_data_parallel(two_process_run):
    _, run_dir = two_process_run
    for stage in ("sft", "reward", "grpo"):
        results = stage_results(run_dir / stage)
        checksums = results["rank_checksums"]
        assert len(checksums) == 2 and checksums[0] == checksums[1], (stage, checksums)
        assert results["processes"] == 2
        steps = logged_steps(run_dir / stage, "loss")
        assert steps == sorted(set(steps)) and steps, (stage, steps)  # each step written once
        assert (run_dir / stage / "checkpoint" / "adapter_model.safetensors").is_file()
    assert started_from(run_dir / "grpo") == str(run_dir / "sft" / "checkpoint")
    assert stage_results(run_dir / "sft")["effective_batch"] == 16
    decisions = [json.loads(line) for line in (run_dir / "pipeline.jsonl").read_text().splitlines()]
    assert [d["stage"] for d in decisions if d.get("action") == "run"] == ["sft", "reward", "grpo"]  # once each


def test_sft_two_processes_of_8_follow_one_process_of_16(two_process_run):
    """Data parallelism changes who computes, not what: the per-step losses of 2 x 8 are those of 1 x 16 (here in
    the test's own process)."""
    from align.stages import sft

    recipe, run_dir = two_process_run
    one = sft.run(load_recipe(recipe, ["run.name=one", "sft.per_device_train_batch_size=16"]))
    curves = {processes: [r["loss"] for r in map(json.loads, (stage / "metrics.jsonl").read_text().splitlines())
                          if "loss" in r and "train_loss" not in r]
              for processes, stage in ((1, Path(one["run_dir"])), (2, run_dir / "sft"))}
    assert len(curves[1]) == len(curves[2]) == 4
    assert curves[2] == pytest.approx(curves[1], rel=1e-3), curves  # equal as logged (TRL: loss over all ranks' tokens)


def test_ppo_on_two_processes_saves_once_with_identical_ranks(two_process_run):
    _, run_dir = two_process_run
    results = stage_results(run_dir / "ppo")
    assert results["processes"] == 2 and results["effective_batch"] == 8
    assert len(results["rank_checksums"]) == 2 and len(set(results["rank_checksums"])) == 1
    assert logged_steps(run_dir / "ppo", "kl") == [1, 2]
    assert started_from(run_dir / "ppo") == str(run_dir / "sft" / "checkpoint")


@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_offline_preference_stages_on_two_processes_keep_ranks_identical(two_process_run, stage):
    _, run_dir = two_process_run
    results = stage_results(run_dir / stage)
    assert results["processes"] == 2 and results["effective_batch"] == 16
    assert len(results["rank_checksums"]) == 2 and len(set(results["rank_checksums"])) == 1
    assert logged_steps(run_dir / stage, "loss") == [1, 2]  # each step written once, by one process
    assert (run_dir / stage / "checkpoint" / "adapter_model.safetensors").is_file()
    assert started_from(run_dir / stage) == str(run_dir / "sft" / "checkpoint")
