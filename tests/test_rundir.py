"""The run directory: resolved config, lineage, metrics, and a checkpoint that exists only when complete."""

import json

import pytest
import yaml

from align.recipe import load_recipe
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
