"""Run dirs are safe to share and to rerun: nothing read from a run dir runs code, nothing finished is lost to a
failed or concurrent run, and bad input gets a one-line error naming the file (issue 18, one test per item)."""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import QA_HELDOUT, QA_TRAIN, ROOT, TINY_BASE, finished, sft_section, write_rows

from align.cli import main
from align.data import qa
from align.data.files import DataError
from align.errors import AlignError
from align.recipe import RecipeError, load_recipe, to_yaml
from align.rundir import checkpoint_problem, complete_checkpoint, last_trainer_checkpoint

QA = {"columns": {"prompt": "question", "completion": "answer"}}


def sft_recipe(write_recipe, **sft):
    return write_recipe(data={"sft": {"train": str(QA_TRAIN), "eval": str(QA_HELDOUT)}, **QA},
                        sft=sft_section(**{"max_steps": 20, "save_steps": 10, "eval_generations": 4, **sft}))


def files_of(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def finished_sft(write_recipe):
    """A finished SFT stage of the tiny base (20 steps, trainer checkpoints at 10 and 20): (recipe path, stage dir)."""
    from align.stages import sft

    path = sft_recipe(write_recipe)
    results = sft.run(load_recipe(path))
    return path, Path(results["run_dir"])


# -- 1. Nothing read from a run dir runs code ----------------------------------------------------------------------


class Planted:
    """A pickle that runs a command when it is loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_planted_pickle_in_a_ppo_checkpoint_does_not_run(tmp_path):
    import torch

    from align.stages.ppo import read_state

    marker = tmp_path / "pwned"
    torch.save({"step": 1, "rng": Planted(marker)}, tmp_path / "state.pt")
    with pytest.raises(AlignError, match="refused to load: it holds more than tensors and numbers"):
        read_state(tmp_path / "state.pt")
    assert not marker.exists()


def test_a_ppo_checkpoint_as_align_writes_it_loads(tmp_path):
    """What the PPO loop saves (optimizer, scheduler, KL controller, python/numpy/torch random states) loads under
    weights_only, and gives back the same random states."""
    import random

    import numpy as np
    import torch

    from align.stages.ppo import _rng_state, read_state

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight])
    weight.sum().backward()
    optimizer.step()
    torch.save({"step": 3, "optimizer": optimizer.state_dict(), "kl_controller": {"value": 0.05, "target": None},
                "kl": (0.0, 0.1, 0.2), "rng": _rng_state()}, tmp_path / "state.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1))
    state = read_state(tmp_path / "state.pt")
    from align.stages.ppo import _set_rng_state

    _set_rng_state(state["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected
    assert state["step"] == 3 and state["optimizer"]["state"][0]["step"] == 1


def custom_code_stage(tmp_path: Path, marker: Path) -> Path:
    """A finished SFT stage dir whose config.yaml asks for model.trust_remote_code on a base model dir whose
    config names its own modeling code, which would create `marker` if it ever ran."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = tmp_path / "custom-base"
    shutil.copytree(TINY_BASE, base)
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (base / "config.json").write_text(json.dumps(config))
    (base / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")

    stage = tmp_path / "runs" / "shared" / "sft"
    recipe = load_recipe(None, [f"model.name_or_path={base}", "model.trust_remote_code=true", f"run.root={tmp_path / 'runs'}"])
    stage.mkdir(parents=True)
    (stage / "config.yaml").write_text(to_yaml(recipe))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(TINY_BASE)),
                           LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.save_pretrained(str(stage / "checkpoint"))
    finished(stage / "checkpoint", run="shared", stage="sft")
    return stage


def test_a_run_dirs_trust_remote_code_is_not_honoured(tmp_path, capsys):
    marker = tmp_path / "pwned"
    stage = custom_code_stage(tmp_path, marker)
    assert main(["export", str(stage), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "sets model.trust_remote_code=true, and align does not run a model's own code" in err
    assert "pass --trust-remote-code" in err
    eval_file = write_rows(tmp_path / "eval.jsonl", [{"question": "What is 1 + 1?", "answer": "2"}])
    assert main(["compare", str(stage), "--eval", str(eval_file), "--out", str(tmp_path / "cmp")]) == 2
    assert "pass --trust-remote-code" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists()


# -- 2. A recipe's environment variables never land in a run dir ---------------------------------------------------


def test_oc_env_is_refused_and_nothing_is_written(write_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_TEST_SECRET", "hf_secret_token")
    path = write_recipe(model={"revision": "${oc.env:ALIGN_TEST_SECRET}"}, sft=sft_section())
    with pytest.raises(RecipeError, match=r"model.revision: \$\{oc.env:...\} is not allowed"):
        load_recipe(path)
    assert main(["sft", str(path)]) == 2
    assert not (tmp_path / "runs").exists()


# -- 3. report.md shows model text as text -------------------------------------------------------------------------


def test_report_md_fences_prompts_answers_and_escapes_names(tmp_path, sft_adapter):
    prompt = "What is 1 + 1? <script>alert(1)</script> ```` | *not bold*"
    eval_file = write_rows(tmp_path / "eval.jsonl", [{"question": prompt, "answer": "2"}])
    out = tmp_path / "cmp"
    assert main(["compare", f"<img src=x onerror=alert(1)>={sft_adapter}", "--eval", str(eval_file), "--out",
                 str(out), "--max-new-tokens", "4", "--temperature", "0"]) == 0
    markdown = (out / "report.md").read_text()
    assert "<img" not in markdown and "&lt;img src=x onerror=alert\\(1\\)&gt;" in markdown
    assert f"`````text\n{prompt}\n`````" in markdown  # fenced with more backticks than the text has
    assert markdown.count("<script>") == 1  # only inside that fence


# -- 4. export does not delete what it did not write ---------------------------------------------------------------


def test_export_refuses_a_directory_that_is_not_an_earlier_export(tmp_path, sft_adapter, capsys):
    out = tmp_path / "important"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    assert main(["export", str(sft_adapter), "--out", str(out)]) == 2
    assert "it exists and is not an earlier export" in capsys.readouterr().err
    assert (out / "thesis.tex").read_text() == "years of work"

    fresh = tmp_path / "exported"
    assert main(["export", str(sft_adapter), "--out", str(fresh)]) == 0
    assert main(["export", str(sft_adapter), "--out", str(fresh)]) == 0  # an earlier export is replaced
    assert main(["export", str(sft_adapter), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "thesis.tex").exists() and (out / "config.json").is_file()


# -- 5, 7, 10, 14: a finished stage stays finished until a new run trains --------------------------------------------


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
    from align.pipeline import _decide
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
    assert _decide(recipe, "sft", stage, None)[0] == "resume"  # the interrupted re-run, not the stale result


def test_a_damaged_checkpoint_is_named_and_align_run_trains_the_stage_again(finished_sft, capsys):
    from align.pipeline import _decide

    path, stage = finished_sft
    adapter = stage / "checkpoint" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])
    action, reason = _decide(load_recipe(path), "sft", stage, None)
    assert action == "run" and "is damaged: adapter_model.safetensors is not the file the run wrote" in reason
    assert main(["export", str(stage), "--out", str(stage.parent / "out")]) == 2
    assert "adapter_model.safetensors is not the file the run wrote" in capsys.readouterr().err


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


# -- 6. One run per stage dir ---------------------------------------------------------------------------------------


def test_a_second_run_on_a_locked_stage_stops_at_once_naming_the_holder(write_recipe, tmp_path):
    path = sft_recipe(write_recipe)
    stage = tmp_path / "runs" / "test" / "sft"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\nfrom align.rundir import stage_lock\n"
         f"with stage_lock(Path({str(stage)!r})):\n    print('locked', flush=True)\n    time.sleep(120)\n"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        second = subprocess.run([sys.executable, "-m", "align", "sft", str(path)], cwd=ROOT, capture_output=True,
                                text=True, timeout=120)
        assert second.returncode == 2
        assert f"{stage} is being written by another run (pid {holder.pid} on " in second.stderr
        assert time.monotonic() - started < 60 and not (stage / "lineage.json").exists()
    finally:
        holder.kill()
        holder.wait()
    from align.rundir import stage_lock

    with stage_lock(stage):  # a killed holder's lock is free again
        pass


# -- 8. Runs stay under run.root ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../x", "/tmp/elsewhere", "a/b", ".."])
def test_a_run_name_that_leaves_run_root_is_refused(write_recipe, name):
    with pytest.raises(RecipeError, match="a run name is one directory name under run.root"):
        load_recipe(write_recipe(), [f"run.name={name}"])


# -- 9. Settings that cannot work fail before any model loads, with the key -----------------------------------------


@pytest.mark.parametrize("override, message", [
    ("sft.learning_rate=0", "sft.learning_rate=0.0: must be positive"),
    ("sft.per_device_train_batch_size=0", "sft.per_device_train_batch_size=0: must be at least 1"),
    ("lora.r=0", "lora.r=0: must be at least 1"),
    ("sft.max_steps=0", "sft.max_steps=0: must be at least 1, or -1"),
    ("grpo.learning_rate=-1e-5", "grpo.learning_rate=-1e-05: must be positive"),
    ("grpo.temperature=0", "grpo.temperature=0.0: must be positive"),
    ("grpo.num_generations=1", "grpo.num_generations=1: must be at least 2"),
])
def test_settings_that_cannot_work_name_their_key(override, message):
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace("+", r"\+")):
        load_recipe(ROOT / "recipes" / "quickstart.yaml", [override])


def test_a_value_of_the_wrong_type_is_one_line_naming_the_key():
    with pytest.raises(RecipeError) as raised:
        load_recipe(ROOT / "recipes" / "quickstart.yaml", ["sft.max_steps=abc"])
    assert str(raised.value) == ("override 'sft.max_steps=abc': sft.max_steps: Value 'abc' of type 'str' could not "
                                 "be converted to Integer")


def test_align_run_checks_every_stages_data_before_training(write_recipe, tmp_path, capsys):
    empty = tmp_path / "prompts.jsonl"
    empty.write_text("")
    path = write_recipe(data={"sft": {"train": str(QA_TRAIN)}, "prompts": {"train": str(empty)}, **QA},
                        sft=sft_section(), grpo={"max_length": 128, "max_completion_length": 32,
                                                 "rewards": [{"name": "exact_match", "args": {"column": "answer"}}]})
    assert main(["run", str(path)]) == 2
    assert f"{empty}: the file has no rows" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "test" / "sft").exists()


# -- 10. One-line errors -------------------------------------------------------------------------------------------


def test_non_utf8_data_names_the_file_and_line(tmp_path, tokenizer):
    from align.recipe import DataConfig

    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"question": "What is 1 + 1?", "answer": "2"}\n{"question": "Caf\xe9?", "answer": "3"}\n')
    with pytest.raises(DataError, match=r"latin1.jsonl:2: not UTF-8 text \(byte 0xe9 at column 18\)"):
        qa.load(str(path), DataConfig(), tokenizer, 128)


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


def test_recipe_files_that_are_not_recipes(tmp_path):
    for text, message in (("- sft\n- reward\n", "this file's top level is a list"),
                          ("sft:\n  learning_rate: ${nowhere.lr}\n", "sft.learning_rate: Interpolation key 'nowhere.lr' not found")):
        path = tmp_path / "r.yaml"
        path.write_text(text)
        with pytest.raises(RecipeError, match=message.replace("$", r"\$").replace(".", r"\.")):
            load_recipe(path, [f"model.name_or_path={TINY_BASE}"])


@pytest.mark.parametrize("sent, code, how", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_and_sigterm_are_one_line_that_says_how_to_resume(write_recipe, tmp_path, sent, code, how):
    path = sft_recipe(write_recipe, max_steps=2000)
    metrics = tmp_path / "runs" / "test" / "sft" / "metrics.jsonl"
    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr:  # a file, not a pipe: a full pipe would block the run's progress bars
        process = subprocess.Popen([sys.executable, "-m", "align", "sft", str(path)], cwd=ROOT,
                                   stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + 120
        while not (metrics.is_file() and metrics.read_text()):  # training has begun
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        process.send_signal(sent)
        process.wait(timeout=60)
    err = log.read_text()
    assert process.returncode == code and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(
        f"{how} during the sft stage; `align sft {path} --resume` (with the same overrides) resumes from the "
        f"last checkpoint in {tmp_path / 'runs' / 'test' / 'sft' / 'trainer'}")


def test_a_stop_signal_whose_exception_is_lost_still_ends_the_run_with_the_resume_line(monkeypatch, capsys):
    from align import cli

    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    monkeypatch.setattr(cli._StopOnSignal, "GRACE_S", 0.2)
    stop = cli._StopOnSignal(lambda how: f"{how} during the sft stage; resume with ...")
    try:
        stop(signal.SIGINT, None)
    except KeyboardInterrupt:
        pass  # lost, as a library that swallows it would
    time.sleep(1)
    assert exits == [130] and "interrupted during the sft stage; resume with ..." in capsys.readouterr().err


# -- 11. Model paths ------------------------------------------------------------------------------------------------


def test_a_local_model_path_that_does_not_exist_fails_at_once(tmp_path):
    from align.modeling import ModelLoadError, load_tokenizer
    from align.recipe import ModelConfig

    started = time.monotonic()
    with pytest.raises(ModelLoadError, match=r"no such directory .*tiny-basee\); model directories in .* with a "
                       r"similar name: tiny-base\.") as raised:
        load_tokenizer(ModelConfig(name_or_path=str(ROOT / "data" / "tiny-basee")))
    assert time.monotonic() - started < 5
    assert "arithmetic" not in str(raised.value)  # data/'s other entries are not listed


def test_the_base_model_path_is_recorded_absolute(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    recipe = load_recipe(None, ["model.name_or_path=data/tiny-base", f"run.root={tmp_path}"])
    assert recipe.model.name_or_path == str(TINY_BASE)
    assert yaml.safe_load(to_yaml(recipe))["model"]["name_or_path"] == str(TINY_BASE)


# -- 12. A huge row is rejected by its length in characters, before tokenising --------------------------------------


def test_a_huge_row_is_rejected_before_it_is_tokenised(tmp_path, tokenizer, monkeypatch):
    from align.recipe import DataConfig

    path = write_rows(tmp_path / "huge.jsonl", [{"question": "What is 1 + 1?", "answer": "2 " * 2_000_000}])

    def never(*args, **kwargs):
        raise AssertionError("tokenised")

    monkeypatch.setattr("align.data.qa.token_lengths", never)
    with pytest.raises(DataError, match=r"huge.jsonl:1: row is 4000014 characters, more than max_length=128 tokens "
                                        r"can hold \(at 100 characters a token\)"):
        qa.load(str(path), DataConfig(), tokenizer, 128)


# -- 13. Options and overrides in any order ------------------------------------------------------------------------


def test_options_and_overrides_in_any_order(write_recipe, capsys):
    path = sft_recipe(write_recipe)
    assert main(["run", str(path), "--only", "sft", "sft.max_steps=0"]) == 2  # parsed: the override is checked
    assert "sft.max_steps=0: must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", str(path), "--only", "sft", "--no-such-option"])
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


# -- 14. Nothing is written through a link in a run dir -------------------------------------------------------------


def _replace_with_link(entry: Path, outside: Path) -> Path:
    """Moves `entry` (a file or directory) to `outside` and leaves a symbolic link to it in its place."""
    shutil.move(entry, outside)
    entry.symlink_to(outside, target_is_directory=outside.is_dir())
    return outside


def test_no_file_or_directory_a_stage_wrote_is_written_through_a_link(finished_sft, tmp_path, capsys):
    """Each file and directory a finished stage left (listed, not named here), and the stage and run dirs
    themselves, in turn made a link to a copy elsewhere: the re-run stops before any work, naming the link and
    its target, and the copy elsewhere is byte for byte what it was."""
    path, stage = finished_sft
    written = sorted(stage.rglob("*"), key=lambda p: len(p.parts), reverse=True)
    assert {"config.yaml", "lineage.json", "metrics.jsonl", ".lock", "checkpoint", "trainer"} <= {p.name for p in written}
    for number, entry in enumerate([*written, stage, stage.parent]):
        outside = _replace_with_link(entry, tmp_path / f"elsewhere-{number}")
        before = files_of(outside) if outside.is_dir() else outside.read_bytes()
        assert main(["sft", str(path), "sft.max_steps=4", "sft.save_steps=2"]) == 2
        assert f"{entry} -> {outside}" in capsys.readouterr().err, entry
        assert (files_of(outside) if outside.is_dir() else outside.read_bytes()) == before, entry
        entry.unlink()
        shutil.move(outside, entry)
    assert complete_checkpoint(stage) == stage / "checkpoint"  # put back as it was


def test_align_run_does_not_append_to_a_linked_pipeline_journal(finished_sft, tmp_path, capsys):
    path, stage = finished_sft
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_text("mine\n")
    (stage.parent / "pipeline.jsonl").symlink_to(outside)
    assert main(["run", str(path)]) == 2
    assert f"{stage.parent / 'pipeline.jsonl'} -> {outside}" in capsys.readouterr().err
    assert outside.read_text() == "mine\n"


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


# -- 15. A reward function that hangs or raises stops the stage with one line -------------------------------------


@pytest.mark.parametrize("body, message", [
    ("time.sleep(600)", r"reward 'plug' \(.*my_plugin.py:4\) did not return within timeout_s=1 s"),
    ("return [1 / 0 for _ in completions]", r"reward 'plug' raised ZeroDivisionError: division by zero \(at "
                                            r".*my_plugin.py:5\)"),
])
def test_a_reward_plugin_that_hangs_or_raises_is_one_line_with_the_resume_hint(
        write_recipe, tmp_path, monkeypatch, capsys, body, message):
    (tmp_path / "my_plugin.py").write_text(f"import time\n\n\ndef plug(prompts, completions, **kwargs):\n    {body}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_plugin", raising=False)
    path = write_recipe(
        data={"prompts": {"train": str(QA_TRAIN), "eval": str(QA_HELDOUT)}, "columns": {"prompt": "question"}},
        grpo={"init_from": "base", "max_steps": 2, "per_device_train_batch_size": 8, "num_generations": 4,
              "max_completion_length": 8, "max_length": 64, "eval_generations": 4, "activation_checkpointing": False,
              "rewards": [{"name": "my_plugin:plug", "timeout_s": 1}]})
    assert main(["grpo", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    log_path = tmp_path / "runs" / "test" / "grpo" / "error.log"
    assert re.match(rf"error: {message}.*; the traceback is in {re.escape(str(log_path))}\. Once it is fixed, "
                    rf"`align grpo {re.escape(str(path))} --resume` \(with the same overrides\) resumes", err), err
    assert "my_plugin.py" in log_path.read_text()


# -- 16. Inputs that are not data files are refused by what they are, before they are read -------------------------


def _endless_or_huge(kind: str, tmp_path: Path) -> Path:
    path = tmp_path / "data.jsonl"
    if kind == "link to /dev/zero":
        path.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "2 GB sparse file":
        with path.open("wb") as f:
            f.truncate(2 << 30)
    elif kind == "JSON nested 100,000 deep":
        path.write_text('{"question": ' + "[" * 100_000 + "]" * 100_000 + ', "answer": "1"}\n')
    return path


@pytest.mark.parametrize("kind, message", [
    ("link to /dev/zero", "not a regular file"),
    ("fifo", "not a regular file"),
    ("2 GB sparse file", r"data.jsonl:1: not a text file \(a NUL byte at byte 0\)"),
    ("JSON nested 100,000 deep", r"data.jsonl:1: JSON nested too deep to read"),
])
def test_data_check_on_an_endless_or_huge_input_answers_at_once_in_little_memory(tmp_path, capsys, kind, message):
    import resource

    path = _endless_or_huge(kind, tmp_path)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    started = time.monotonic()
    assert main(["data", "check", str(path), "--kind", "qa", "--model", str(TINY_BASE)]) in (1, 2)
    assert time.monotonic() - started < 10
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < (1 << 20)  # under 1 GiB more
    out = capsys.readouterr()
    assert re.search(message, out.err + out.out), out
    assert "Traceback" not in out.err


# -- 17. A finished RL stage whose parent checkpoint changed is trained again ---------------------------------------


def test_align_run_trains_again_a_stage_whose_parent_changed_since(finished_sft):
    from align.pipeline import _decide
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
    assert _decide(recipe, "grpo", stage, None)[0] == "skip"
    weights = parent / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + bytes(8))
    action, reason = _decide(recipe, "grpo", stage, None)
    assert action == "run" and f"its parent checkpoint {parent} changed since the stage started from it" in reason


def test_a_chat_template_that_reaches_python_internals_is_one_line(write_recipe, tmp_path, capsys):
    path = sft_recipe(write_recipe)
    template = tmp_path / "template.jinja"
    template.write_text("{{ messages.__class__.__mro__ }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert main(["sft", str(path), f"model.chat_template={template}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model.chat_template: cannot render a conversation (SecurityError: ") and (
        "fix the template" in err) and len(err.splitlines()) == 1


def test_align_run_trains_again_a_stage_whose_base_weights_changed_since(finished_sft):
    from align.pipeline import _decide

    path, stage = finished_sft
    assert _decide(load_recipe(path), "sft", stage, None)[0] == "skip"
    lineage = json.loads((stage / "lineage.json").read_text())
    lineage["base_model"]["weights_sha256"] = "0" * 64  # what another model at the same path would show
    (stage / "lineage.json").write_text(json.dumps(lineage))
    action, reason = _decide(load_recipe(path), "sft", stage, None)
    assert action == "run" and "trained on a base whose weights had sha256 " + "0" * 64 in reason
