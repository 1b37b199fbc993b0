"""The `align` command as a user runs it: help, the SFT stage, data check, errors, and accelerate launch."""

import json
import logging
import os
import subprocess
import sys

import pytest
from conftest import PREF_HELDOUT, PREF_TRAIN, QA_HELDOUT, QA_TRAIN, ROOT, few_rows, first_rows, sft_section

from align.cli import main


def accelerate_launch(*args):
    """`accelerate launch --config_file accelerate_config.yaml -m align ARGS`, as the README shows it."""
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--config_file", ROOT / "accelerate_config.yaml",
                "-m", "align")
    env = {**os.environ, "COLUMNS": "250"}  # as `wide_terminal` below
    return subprocess.run([*launcher, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.parametrize("command", [[], ["run"], ["sft"], ["reward"], ["grpo"], ["data"], ["data", "check"], ["tiny"], ["tiny", "pretrain"],
                                     ["tiny", "data"], ["ppo"], ["export"], ["compare"], ["report"]])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    assert "usage: align" in capsys.readouterr().out


def test_sft_help_explains_the_recipe_keys(capsys):
    with pytest.raises(SystemExit):
        main(["sft", "--help"])
    out = capsys.readouterr().out
    assert "sft.learning_rate = 0.0002" in out and "model.quantization = 'nf4'" in out and "data.skip_invalid" in out


@pytest.mark.slow
def test_sft_command_under_accelerate_launch_full_precision_prints_before_and_after(write_recipe, tmp_path):
    """`accelerate launch --config_file accelerate_config.yaml -m align sft` as the README shows it, on a
    full-precision base (the NF4 one under accelerate launch: the PPO test below)."""
    held_out = first_rows(QA_HELDOUT, 16, tmp_path / "held_out.jsonl")
    recipe = write_recipe(data={"sft": {"train": str(few_rows(QA_TRAIN, tmp_path)), "eval": str(held_out)}},
                          sft=sft_section(max_steps=5, eval_generations=4))
    result = accelerate_launch("sft", recipe, "model.quantization=none", "run.name=cli")
    assert result.returncode == 0, result.stderr
    assert "answer loss" in result.stdout and "answer accuracy" in result.stdout
    assert f"run dir: {tmp_path / 'runs' / 'cli' / 'sft'}" in result.stdout
    assert (tmp_path / "runs" / "cli" / "sft" / "checkpoint" / "adapter_model.safetensors").exists()
    lineage = json.loads((tmp_path / "runs" / "cli" / "sft" / "lineage.json").read_text())
    assert "model.quantization=none" in lineage["command"]


@pytest.mark.slow
def test_reward_command_prints_held_out_pair_metrics(write_recipe, tmp_path, capfd, wide_terminal):
    held_out = first_rows(PREF_HELDOUT, 16, tmp_path / "held_out.jsonl")
    recipe = write_recipe(data={"preference": {"train": str(few_rows(PREF_TRAIN, tmp_path)), "eval": str(held_out)}},
                          reward={"max_steps": 3, "max_length": 128, "activation_checkpointing": False})
    assert main(["reward", str(recipe), "run.name=cli"]) == 0
    out = capfd.readouterr().out
    assert "reward model on 16 held-out pairs" in out and "pairwise accuracy" in out
    assert "fresh (reward.init_from=base)" in out  # the recipe has no sft section
    assert (tmp_path / "runs" / "cli" / "reward" / "checkpoint" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_ppo_under_accelerate_launch_then_resume(write_recipe, tmp_path, caplog):
    """`accelerate launch ... -m align ppo` writes a resumable checkpoint; `align ppo --resume` (here in the
    test's process) continues from it."""
    section = {"max_steps": 2, "save_steps": 1, "per_device_train_batch_size": 4, "max_completion_length": 8,
               "max_length": 64, "activation_checkpointing": False, "eval_generations": 0, "init_from": "base",
               "rewards": [{"name": "length", "args": {"max_tokens": 4}}]}
    prompts = few_rows(QA_TRAIN, tmp_path)
    recipe = write_recipe(data={"prompts": {"train": str(prompts)}, "columns": {"prompt": "question"}}, ppo=section)
    result = accelerate_launch("ppo", recipe, "run.name=launched")
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "launched" / "ppo"
    assert "KL to the reference (nats per completion): first step 0.0000" in result.stdout
    assert (run_dir / "checkpoint" / "value" / "adapter_model.safetensors").exists()
    assert [p.name for p in (run_dir / "trainer").iterdir()] == ["checkpoint-1"]  # the last step is the checkpoint

    caplog.set_level(logging.INFO)
    assert main(["ppo", str(recipe), "run.name=launched", "--resume"]) == 0
    assert "resumed from" in caplog.text and "at step 1" in caplog.text
    assert json.loads((run_dir / "lineage.json").read_text())["results"]["resumed_from_step"] == 1


def test_bad_override_is_a_one_line_error(write_recipe, capsys):
    assert main(["sft", str(write_recipe(sft={})), "sft.lerning_rate=1"]) == 2
    err = capsys.readouterr().err
    assert err.strip().endswith("did you mean 'sft.learning_rate'?") and "Traceback" not in err


@pytest.fixture
def wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # rich wraps at 80 columns when not on a terminal


def test_data_check_on_the_quickstart_recipe(capfd, caplog, monkeypatch, wide_terminal):
    monkeypatch.chdir(ROOT)
    assert main(["data", "check", "recipes/quickstart.yaml"]) == 0
    out, err = capfd.readouterr()  # the file descriptors: what any library's logger writes is seen too
    blocks = {lines[0]: lines[1:] for lines in (block.splitlines() for block in out.split("\n\n")[1:])}
    for file, kind, rows, what in (("sft_train", "qa", 2000, "examples"), ("preference_train", "preference", 3000, "pairs"),
                                   ("preference_heldout", "preference", 200, "pairs"), ("rl_prompts", "prompts", 2000, "examples"),
                                   ("feedback_train", "feedback", 6000, "examples")):
        block = blocks[f"data/arithmetic/{file}.jsonl"]  # paths relative to the working directory, each on its own line
        assert block[0].startswith(f"  {kind} (max_length ") and f": {rows} rows, {rows} {what}, skipped: none" in block[0]
    assert "  ignored: kind" in blocks["data/arithmetic/preference_train.jsonl"]  # informational, not warned about
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]  # align's log, in-process
    assert "WARNING" not in err and "Token indices" not in err  # and what any library writes itself
    monkeypatch.setenv("COLUMNS", "80")  # readable in an 80-column terminal: nothing cut short
    assert main(["data", "check", "recipes/quickstart.yaml"]) == 0
    narrow = capfd.readouterr().out
    assert "…" not in narrow and max(map(len, narrow.splitlines())) <= 80


def test_data_check_on_a_bad_file_reports_and_fails(tmp_path, capsys, wide_terminal):
    path = tmp_path / "qa.csv"
    path.write_text('q,a\n"What is 1 + 1?","2"\n"What is 2 + 2?",""\n')
    assert main(["data", "check", str(path), "data.columns.prompt=q", "data.columns.completion=a"]) == 1
    out = capsys.readouterr().out
    assert "empty=1" in out and f"{path}:3: field 'a' is empty" in out


def test_data_check_on_renamed_preference_columns_with_bad_rows(tmp_path, capsys, wide_terminal):
    path = tmp_path / "prefs.csv"
    path.write_text("q,better_answer,worse_answer\n"
                    "What is 1 + 1?,1 + 1 = 2.,1 + 1 = 3.\n"
                    "What is 2 + 2?,,2 + 2 = 5.\n"
                    "What is 3 + 3?,3 + 3 = 6.,3 + 3 = 6.\n")
    mapping = ["data.columns.prompt=q", "data.columns.chosen=better_answer", "data.columns.rejected=worse_answer"]
    assert main(["data", "check", str(path), *mapping]) == 1
    out = capsys.readouterr().out
    assert "preference" in out and "empty=1, identical=1" in out
    assert f"{path}:3: field 'better_answer' is empty" in out
    assert f"{path}:4: fields 'better_answer' and 'worse_answer' hold the same answer" in out


def test_grpo_help_explains_the_kl_and_the_rewards(capsys):
    with pytest.raises(SystemExit):
        main(["grpo", "--help"])
    out = capsys.readouterr().out
    assert "grpo.beta = 0.04" in out and "TRL's default is 0" in out
    assert "grpo.max_kl = 1.0" in out and "grpo.rewards = []" in out and "package.module:function" in out


def test_model_text_and_paths_print_as_they_are_never_as_rich_markup():
    from rich.console import Console

    from align.cli import print_summary
    from align.summary import Summary

    answer = "[bold]7[/bold] is in [1, 2, 7]"
    console = Console(width=200, record=True)
    print_summary(console, Summary(notes=[f"note {answer}"], tables=[("t", [(answer, "[red]a", "b")])],
                                   samples=[f"sample {answer}"]))
    printed = console.export_text()
    assert printed.count(answer) == 3 and "[red]a" in printed
