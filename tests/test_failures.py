"""Failing well: a NaN in training stops the stage with a message naming the step and the likely causes, writes no
final checkpoint and keeps the last good resumable one."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
import torch
from transformers import TrainerCallback

from conftest import QA, QA_HELDOUT, QA_TRAIN, ROOT, few_rows, sft_section

from align.callbacks import NonFinite
from align.cli import main
from align.recipe import load_recipe
from align.stages import ppo, sft


class PoisonAt(TrainerCallback):
    """Sets one LoRA weight to NaN at the end of optimizer step `step`: what an fp16 overflow does."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            next(p for n, p in model.named_parameters() if "lora_B" in n).data.fill_(float("nan"))


def test_a_nan_in_sft_stops_at_its_step_and_keeps_the_last_good_checkpoint(write_recipe, tmp_path, monkeypatch):
    build = sft.build_trainer

    def poisoned(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.add_callback(PoisonAt(3))
        return trainer

    monkeypatch.setattr(sft, "build_trainer", poisoned)
    recipe = load_recipe(write_recipe(data={"sft": {"train": str(few_rows(QA_TRAIN, tmp_path))}},
                                      sft=sft_section(max_steps=8, save_steps=2, logging_steps=1)))
    with pytest.raises(NonFinite, match=r"sft: the trainable weight .* is not finite at step 4; training stopped "
                                        r"without saving.*fp16.*bfloat16.*sft.learning_rate.*reward plug-in"):
        sft.run(recipe)
    stage = Path(recipe.run.root) / "test" / "sft"
    assert not (stage / "checkpoint").exists()  # no final checkpoint
    assert sorted(p.name for p in (stage / "trainer").glob("checkpoint-*")) == ["checkpoint-2"]  # the last good one
    weights = load_file(str(stage / "trainer" / "checkpoint-2" / "adapter_model.safetensors"))
    assert all(w.isfinite().all() for w in weights.values())


def test_a_nan_in_ppo_stops_with_the_step_logged(write_recipe, sft_adapter, tmp_path, monkeypatch):
    real = ppo.value_loss
    monkeypatch.setattr(ppo, "value_loss", lambda *a, **k: (real(*a, **k)[0] * float("nan"), real(*a, **k)[1]))
    prompts = few_rows(QA_TRAIN, tmp_path)
    recipe = load_recipe(write_recipe(sft={}, data={"prompts": {"train": str(prompts), "eval": str(QA_HELDOUT)},
                                                    "columns": {"prompt": "question"}},
                                      ppo={"max_steps": 3, "per_device_train_batch_size": 4, "max_length": 64,
                                           "max_completion_length": 8, "activation_checkpointing": False,
                                           "eval_generations": 0, "logging_steps": 1,
                                           "rewards": [{"name": "length", "args": {"max_tokens": 4}}]}))
    # The value loss's NaN reaches the policy's weights too (one gradient-norm clip over both): either loss names it.
    with pytest.raises(NonFinite, match=r"ppo: the (policy|value)_loss is nan at step 1; training stopped without saving"):
        ppo.run(recipe)
    stage = Path(recipe.run.root) / "test" / "ppo"
    logged = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["step"] == 1 and logged[-1]["score"] == pytest.approx(logged[-1]["score"])  # score finite
    assert not (stage / "checkpoint").exists()
    assert torch.isnan(torch.tensor(logged[-1]["value_loss"]))


@pytest.mark.parametrize("command", ["sft", "run"])
def test_out_of_gpu_memory_is_answered_with_the_settings_to_lower(write_recipe, monkeypatch, capsys, command):
    from align.cli import main

    def out_of_memory(recipe, resume):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total)")

    monkeypatch.setattr(sft, "run", out_of_memory)
    recipe = write_recipe(sft={"max_length": 128}, data={"sft": {"train": str(QA_TRAIN)}})
    assert main([command, str(recipe), "model.quantization=none"]) == 3
    err = capsys.readouterr().err
    assert "the sft stage ran out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB" in err
    assert "sft.per_device_train_batch_size (raise gradient_accumulation_steps" in err and "sft.max_length" in err
    assert "model.quantization=nf4" in err and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.parametrize("sent, code, how", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_and_sigterm_are_one_line_that_says_how_to_resume(write_recipe, tmp_path, sent, code, how):
    path = write_recipe(data={"sft": {"train": str(few_rows(QA_TRAIN, tmp_path))}, **QA},
                        sft=sft_section(max_steps=2000, logging_steps=1, eval_generations=0))
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


@pytest.mark.parametrize("stopped_by, code, first_words", [
    (KeyboardInterrupt, 130, "interrupted during the sft stage; `align sft "),
    (torch.OutOfMemoryError, 3, "error: the sft stage ran out of GPU memory"),
])
@pytest.mark.parametrize("left", ["an open bar", "a bar being closed"])
def test_the_failure_line_starts_a_line_of_its_own_after_a_progress_bar(
        write_recipe, monkeypatch, capsys, stopped_by, code, first_words, left):
    """The trainer's progress bar is left open when training stops by an exception, the cursor at its end; or the
    signal came while a bar was being closed, after tqdm let go of it and before it ended its line."""
    from tqdm.auto import tqdm

    def stopped_mid_training(recipe, resume):
        bar = tqdm(total=10)
        bar.update(3)
        if left == "a bar being closed":
            bar.disable = True
            tqdm._decr_instances(bar)  # what tqdm.close does first
        raise stopped_by()

    monkeypatch.setattr(sft, "run", stopped_mid_training)
    assert main(["sft", str(write_recipe(sft={}))]) == code
    line = next(line for line in capsys.readouterr().err.splitlines() if first_words in line)
    assert line.startswith(first_words), line


def test_a_stop_signal_whose_exception_is_lost_still_ends_the_run_with_the_resume_line(monkeypatch, capsys):
    from align import cli

    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    monkeypatch.setattr(cli.StopOnSignal, "GRACE_S", 0.2)
    stop = cli.StopOnSignal(lambda how: f"{how} during the sft stage; resume with ...")
    try:
        stop(signal.SIGINT, None)
    except KeyboardInterrupt:
        pass  # lost, as a library that swallows it would
    time.sleep(1)
    assert exits == [130] and "interrupted during the sft stage; resume with ..." in capsys.readouterr().err


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
        data={"prompts": {"train": str(few_rows(QA_TRAIN, tmp_path)), "eval": str(QA_HELDOUT)},
              "columns": {"prompt": "question"}},
        grpo={"init_from": "base", "max_steps": 2, "per_device_train_batch_size": 8, "num_generations": 4,
              "max_completion_length": 8, "max_length": 64, "eval_generations": 4, "activation_checkpointing": False,
              "rewards": [{"name": "my_plugin:plug", "timeout_s": 1}]})
    assert main(["grpo", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    log_path = tmp_path / "runs" / "test" / "grpo" / "error.log"
    assert re.match(rf"error: {message}.*; the traceback is in {re.escape(str(log_path))}\. Once it is fixed, "
                    rf"`align grpo {re.escape(str(path))} --resume` \(with the same overrides\) resumes", err), err
    assert "my_plugin.py" in log_path.read_text()
