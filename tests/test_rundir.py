"""The run directory: resolved config, lineage, metrics, and a checkpoint that exists only when complete."""

import errno
import json
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from conftest import ROOT, TINY_BASE, files_of, finished, sft_recipe

from align.cli import main
from align.recipe import RecipeError, load_recipe, to_yaml
from align.rundir import RunDir, checkpoint_problem, complete_checkpoint, sha256_of


def test_a_checkpoint_killed_before_rename_is_not_complete(write_recipe):
    run = RunDir(load_recipe(write_recipe()), "sft")
    run.start(base_model={"name_or_path": "x"}, data=[])
    with pytest.raises(KeyboardInterrupt):
        with run.checkpoint() as staging:
            staging.mkdir()
            (staging / "adapter_model.safetensors").write_bytes(b"half")
            raise KeyboardInterrupt  # killed while saving
    assert complete_checkpoint(run.path) is None
    assert (run.path / "checkpoint.tmp" / "adapter_model.safetensors").exists()

    with run.checkpoint() as staging:  # the next run starts from a clean staging dir
        assert not staging.exists()
        staging.mkdir()
        (staging / "adapter_model.safetensors").write_bytes(b"whole")
    assert complete_checkpoint(run.path) is None  # in place, but the run has not finished (no end_time)
    run.finish({})
    assert complete_checkpoint(run.path) == run.checkpoint_path
    assert not (run.path / "checkpoint.tmp").exists()

    with pytest.raises(RuntimeError):  # a failed re-run leaves the finished checkpoint as it was
        with run.checkpoint() as staging:
            staging.mkdir()
            raise RuntimeError("disk full")
    assert (run.checkpoint_path / "adapter_model.safetensors").read_bytes() == b"whole"


def test_start_and_finish_write_config_and_lineage(write_recipe, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"a": 1}\n')
    recipe = load_recipe(write_recipe(), ["lora.r=4"])
    run = RunDir(recipe, "sft")
    run.start(base_model={"name_or_path": "m"}, data=[{"path": str(data)}])
    run.log_metrics({"step": 1, "loss": 2.0})
    run.finish({"loss": 1.0})
    assert yaml.safe_load(run.config_path.read_text())["lora"]["r"] == 4
    lineage = json.loads(run.lineage_path.read_text())
    assert lineage["data"][0]["sha256"] == sha256_of(data)
    assert lineage["packages"]["trl"] and lineage["seed"] == 42
    assert lineage["start_time"] <= lineage["end_time"] and lineage["results"] == {"loss": 1.0}
    assert [json.loads(line) for line in run.metrics_path.read_text().splitlines()] == [{"step": 1, "loss": 2.0}]


def test_a_new_run_starts_clean_but_keeps_the_finished_checkpoint_until_replaced(write_recipe):
    run = RunDir(load_recipe(write_recipe()), "sft")
    run.start(base_model={}, data=[])
    run.log_metrics({"step": 1})
    (run.trainer_dir / "checkpoint-5").mkdir(parents=True)
    with run.checkpoint() as staging:
        staging.mkdir()
    run.finish({})
    assert complete_checkpoint(run.path) == run.checkpoint_path
    run.start(base_model={}, data=[])
    assert run.metrics_path.read_text() == "" and not run.trainer_dir.exists()
    # the earlier run's checkpoint stays on disk until replaced, but is no longer taken for the stage's result
    assert run.checkpoint_path.is_dir() and complete_checkpoint(run.path) is None
    assert "is stale: an earlier run of the stage wrote it" in checkpoint_problem(run.path)


def test_directory_hash_covers_names_and_contents(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("1")
    first = sha256_of(tmp_path / "a")
    (tmp_path / "a" / "x").write_text("2")
    changed = sha256_of(tmp_path / "a")
    assert changed != first
    (tmp_path / "a" / "x").rename(tmp_path / "a" / "y")  # same contents under another name
    assert sha256_of(tmp_path / "a") != changed


def test_model_identity_hashes_local_weights_and_resolves_hub_ids_offline(tmp_path):
    from align.recipe import ModelConfig
    from align.rundir import model_identity

    (tmp_path / "model.safetensors").write_bytes(b"w1")
    first = model_identity(ModelConfig(name_or_path=str(tmp_path)))["weights_sha256"]
    (tmp_path / "model.safetensors").write_bytes(b"w2")
    assert model_identity(ModelConfig(name_or_path=str(tmp_path)))["weights_sha256"] != first
    # Offline and not in the cache: recorded as unknown rather than failing the run.
    assert model_identity(ModelConfig(name_or_path="Qwen/Qwen2.5-0.5B")) == {
        "name_or_path": "Qwen/Qwen2.5-0.5B", "revision": None, "commit": None}


def test_a_failed_start_leaves_the_finished_stage_as_it_was(finished_sft, capsys):
    path, stage = finished_sft
    before = files_of(stage)
    assert main(["sft", str(path), "sft.learning_rate=-1"]) == 2
    assert "sft.learning_rate=-1.0: must be positive" in capsys.readouterr().err
    # fails later, in TRL's config, after the model loaded: still nothing of the finished stage changes
    assert main(["sft", str(path), "sft.trainer_args={lr_scheduler_type: no_such_schedule}"]) == 2
    assert "sft: SFTConfig does not take these settings: no_such_schedule is not a valid" in capsys.readouterr().err
    assert files_of(stage) == before
    assert complete_checkpoint(stage) == stage / "checkpoint"


def test_a_stale_checkpoint_is_named_and_not_used(finished_sft, capsys):
    """A re-run with other settings that was killed after it started leaves the old checkpoint beside the new
    lineage: the reward stage, export and `align run` do not take it for the stage's result."""
    from align.pipeline import decide
    from align.rundir import RunDir

    path, stage = finished_sft
    recipe = load_recipe(path, ["sft.learning_rate=1e-3"])
    RunDir(recipe, "sft").start(base_model={}, data=[])  # then killed
    problem = checkpoint_problem(stage)
    assert "is stale: an earlier run of the stage wrote it" in problem and "unfinished" in problem
    assert main(["export", str(stage), "--out", str(stage.parent / "out")]) == 2
    assert "is stale" in capsys.readouterr().err
    with_reward = yaml.safe_load(path.read_text())
    with_reward["reward"] = {"max_steps": 2}
    path.write_text(yaml.safe_dump(with_reward))
    assert main(["reward", str(path)]) == 2
    assert "reward.init_from=auto: " in capsys.readouterr().err
    assert decide(recipe, "sft", stage, None)[0] == "resume"  # the interrupted re-run, not the stale result


def test_a_damaged_checkpoint_is_named_and_align_run_trains_the_stage_again(finished_sft, capsys):
    from align.pipeline import decide

    path, stage = finished_sft
    adapter = stage / "checkpoint" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])
    action, reason = decide(load_recipe(path), "sft", stage, None)
    assert action == "run" and "is damaged: adapter_model.safetensors is not the file the run wrote" in reason
    assert main(["export", str(stage), "--out", str(stage.parent / "out")]) == 2
    assert "adapter_model.safetensors is not the file the run wrote" in capsys.readouterr().err


def test_a_second_run_on_a_locked_stage_stops_at_once_naming_the_holder(write_recipe, tmp_path, capsys):
    path = sft_recipe(write_recipe)
    stage = tmp_path / "runs" / "test" / "sft"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\nfrom align.rundir import stage_lock\n"
         f"with stage_lock(Path({str(stage)!r})):\n    print('locked', flush=True)\n    time.sleep(120)\n"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        assert main(["sft", str(path)]) == 2  # the second run: in this process
        assert f"{stage} is being written by another run (pid {holder.pid} on " in capsys.readouterr().err
        assert time.monotonic() - started < 60 and not (stage / "lineage.json").exists()
    finally:
        holder.kill()
        holder.wait()
    from align.rundir import stage_lock

    with stage_lock(stage):  # a killed holder's lock is free again
        pass


@pytest.mark.parametrize("name", ["../../x", "/tmp/elsewhere", "a/b", ".."])
def test_a_run_name_that_leaves_run_root_is_refused(write_recipe, name):
    with pytest.raises(RecipeError, match="a run name is one directory name under run.root"):
        load_recipe(write_recipe(), [f"run.name={name}"])


def test_a_run_dir_that_cannot_be_written_is_one_line(write_recipe, monkeypatch, capsys):
    from align.rundir import RunDir

    def full(self, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path / "lineage.json"))

    monkeypatch.setattr(RunDir, "start", full)
    assert main(["sft", str(sft_recipe(write_recipe))]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the model's loading bar
    assert err.startswith("error: cannot write ") and "lineage.json: No space left on device" in err


def test_align_run_on_a_finished_run_writes_nothing_it_needs(finished_sft, caplog):
    """Every stage skipped: nothing in the run dir changes, and a pipeline.jsonl that cannot be written (here a
    directory in its place) is a warning, not a failure."""
    from align import pipeline

    path, stage = finished_sft
    (stage.parent / "pipeline.jsonl").mkdir()
    before = files_of(stage.parent)
    outcomes = pipeline.run(load_recipe(path))
    assert [o.action for o in outcomes] == ["skipped"] and files_of(stage.parent) == before
    assert "could not record" in caplog.text


def test_the_base_model_path_is_recorded_absolute(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    recipe = load_recipe(None, ["model.name_or_path=data/tiny-base", f"run.root={tmp_path}"])
    assert recipe.model.name_or_path == str(TINY_BASE)
    assert yaml.safe_load(to_yaml(recipe))["model"]["name_or_path"] == str(TINY_BASE)


def test_align_run_trains_again_a_stage_whose_parent_changed_since(finished_sft):
    from align.pipeline import decide
    from align.rundir import inputs_digest, sha256_of, stage_inputs

    path, sft_stage = finished_sft
    recipe_dict = yaml.safe_load(path.read_text())
    recipe_dict["grpo"] = {"max_steps": 2}
    recipe_dict["data"]["prompts"] = recipe_dict["data"]["sft"]
    path.write_text(yaml.safe_dump(recipe_dict))
    recipe = load_recipe(path)
    stage = sft_stage.parent / "grpo"
    shutil.copytree(sft_stage / "checkpoint", stage / "checkpoint")
    parent = sft_stage / "checkpoint"
    finished(stage / "checkpoint", run="test", stage="grpo", parent_checkpoint=str(parent),
             parent_sha256=sha256_of(parent), inputs_sha256=inputs_digest(stage_inputs(recipe, "grpo")))
    assert decide(recipe, "grpo", stage, None)[0] == "skip"
    weights = parent / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + bytes(8))
    action, reason = decide(recipe, "grpo", stage, None)
    assert action == "run" and f"its parent checkpoint {parent} changed since the stage started from it" in reason


def test_align_run_trains_again_a_stage_whose_base_weights_changed_since(finished_sft):
    from align.pipeline import decide

    path, stage = finished_sft
    assert decide(load_recipe(path), "sft", stage, None)[0] == "skip"
    lineage = json.loads((stage / "lineage.json").read_text())
    lineage["base_model"]["weights_sha256"] = "0" * 64  # what another model at the same path would show
    (stage / "lineage.json").write_text(json.dumps(lineage))
    action, reason = decide(load_recipe(path), "sft", stage, None)
    assert action == "run" and "trained on a base whose weights had sha256 " + "0" * 64 in reason
