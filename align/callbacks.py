"""What align adds to the trainers (transformers' Trainer and the TRL trainers built on it): metrics.jsonl, a
progress bar with the latest loss, a checksum manifest in every resumable checkpoint, and a guard that stops a run
at the first NaN or infinity."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from align.errors import AlignError
from align.processes import is_main_process
from align.rundir import RunDir, step_of, write_manifest

log = logging.getLogger(__name__)


def eos_fraction(logs: dict) -> float | None:
    """The fraction of a log's rollouts that ended at EOS: TRL's GRPO logs the complement, the fraction cut at
    max_completion_length (completions/clipped_ratio); align's PPO logs eos_fraction itself."""
    if "eos_fraction" in logs:
        return logs["eos_fraction"]
    clipped = logs.get("completions/clipped_ratio")
    return None if clipped is None else 1.0 - clipped


class MetricsCallback(TrainerCallback):
    """Appends every trainer log (loss, learning rate, eval metrics) to metrics.jsonl with its step; a training
    log also gets step_seconds, the mean wall time of the optimizer steps since the previous one (generation
    included, for the RL stages), and an RL log eos_fraction (`eos_fraction`)."""

    def __init__(self, run: RunDir):
        self.run = run
        self._step_started: float | None = None
        self._step_times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._step_started is not None:
            self._step_times.append(time.perf_counter() - self._step_started)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        if "loss" in logs and self._step_times:
            logs = {**logs, "step_seconds": sum(self._step_times) / len(self._step_times)}
            self._step_times = []
        if eos_fraction(logs) is not None:
            logs = {**logs, "eos_fraction": eos_fraction(logs)}
        self.run.log_metrics({"step": state.global_step, "epoch": state.epoch, **logs})  # main process only


class ProgressBar(ProgressCallback):
    """The trainer's progress bar with the latest values of `keys` beside it, instead of every log printed
    below it as a dict (every value is in metrics.jsonl)."""

    def __init__(self, *keys: str):
        super().__init__()
        self.keys = keys

    def attach(self, trainer):
        """Replace `trainer`'s own progress callback with this bar; returns the bar."""
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(self)
        return self

    def on_log(self, args, state, control, logs=None, **kwargs):
        shown = {k: f"{logs[k]:.4g}" for k in self.keys if isinstance((logs or {}).get(k), (int, float))}
        if shown and self.training_bar is not None:
            self.training_bar.set_postfix(shown)


class NonFinite(AlignError, RuntimeError):
    """A loss, gradient norm, reward, KL or trainable weight became NaN or infinite; training stopped."""


def non_finite_message(stage: str, what: str, value: Any, step: int) -> str:
    return (f"{stage}: {what} is {value} at step {step}; training stopped without saving, and the last good "
            f"resumable checkpoint (if any) is kept in the stage's trainer/ directory. Likely causes: fp16 on a GPU "
            f"without bf16 (set model.compute_dtype=bfloat16, or float32); a learning rate too high "
            f"({stage}.learning_rate); a reward plug-in returning NaN or huge values")


class NonFiniteGuard(TrainerCallback):
    """Stops a trainer at the first non-finite logged value, and before a save that would write non-finite
    weights (a NaN between two logs must not become a checkpoint)."""

    KEYS = ("loss", "grad_norm", "reward", "kl", "eval_loss")

    def __init__(self, stage: str):
        self.stage = stage
        self.problem: str | None = None

    def _stop(self, control, what: str, value: Any, step: int):
        self.problem = self.problem or non_finite_message(self.stage, what, value, step)
        control.should_training_stop, control.should_save = True, False

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if control.should_save and model is not None:
            bad = next((n for n, p in model.named_parameters() if p.requires_grad and not p.isfinite().all()), None)
            if bad:
                self._stop(control, f"the trainable weight {bad}", "not finite", state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in self.KEYS:
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                self._stop(control, f"the logged {key}", value, state.global_step)


def guarded_train(trainer, stage: str, **kwargs):
    """trainer.train(**kwargs) under a NonFiniteGuard, every checkpoint with its manifest; raises NonFinite if the
    guard stopped the run. A run resumed from a checkpoint that already has all max_steps is not trained further
    (transformers would add a step): its weights and state are loaded as they are."""
    resume_from = kwargs.get("resume_from_checkpoint")
    if resume_from and 0 < trainer.args.max_steps <= step_of(Path(resume_from)):
        return _finished_at(trainer, Path(resume_from), stage)
    _unmark_prepared(trainer)
    guard = NonFiniteGuard(stage)
    trainer.add_callback(guard)
    trainer.add_callback(ManifestCallback())
    output = trainer.train(**kwargs)
    if guard.problem:
        raise NonFinite(guard.problem)
    return output


class ManifestCallback(TrainerCallback):
    """Writes the checksum manifest into each checkpoint-<step> the trainer saves (after its last file): a
    checkpoint without one, or whose files no longer match it (an optimizer file cut short by a full disk), is
    not resumed from (`rundir.last_trainer_checkpoint`)."""

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if is_main_process() and checkpoint.is_dir():
            write_manifest(checkpoint)


def _finished_at(trainer, checkpoint: Path, stage: str):
    """The TrainOutput of a run whose checkpoint already holds every step: its weights loaded into the model, its
    trainer state restored, and its training loss the mean of the losses it logged (each over its window)."""
    from transformers import TrainerState
    from transformers.trainer_utils import TrainOutput

    log.info("%s: %s already has all %d steps; loading it instead of training further", stage, checkpoint,
             trainer.args.max_steps)
    trainer._load_from_checkpoint(str(checkpoint))
    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    losses = [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
    windows = [step - previous for (step, _), previous in zip(losses, [0] + [s for s, _ in losses])]
    loss = sum(w * value for w, (_, value) in zip(windows, losses)) / sum(windows) if losses else float("nan")
    return TrainOutput(trainer.state.global_step, loss, {})


def _unmark_prepared(trainer) -> None:
    """A held-out evaluation before training (trainer.evaluate()) prepares the model for evaluation: accelerate
    marks it prepared without wrapping it in DDP, and train() would then leave it unwrapped, so that under several
    processes each rank trains alone. Undone here, so that train() prepares (and wraps) it."""
    model = trainer.model
    if trainer.model_wrapped is not model or not getattr(model, "_is_accelerate_prepared", False):
        return
    del model._is_accelerate_prepared
    if model in trainer.accelerator._models:
        trainer.accelerator._models.remove(model)
    if hasattr(model, "_original_forward"):  # the mixed-precision wrapper the evaluation prepare put on forward
        model.forward = model._original_forward
        del model._original_forward
