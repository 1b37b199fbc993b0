"""One module per stage (its protocol and the registry of stages: align/registry.py), and what they share: the
stage lock, the TRL config every stage builds, and where a stage starts from."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable


def exclusive(stage: str) -> Callable:
    """Decorates a stage's `run(recipe, *, resume)`: the stage dir's lock (`rundir.stage_lock`) is held throughout,
    so two runs never write one stage dir."""
    def decorate(run: Callable) -> Callable:
        @functools.wraps(run)
        def locked(recipe, *, resume: bool = False):
            from align.rundir import stage_lock

            with stage_lock(Path(recipe.run.root) / recipe.run.name / stage):
                return run(recipe, resume=resume)
        return locked
    return decorate


def trl_config(config_cls: type, stage: Any, recipe, run_dir, *, has_eval: bool, defaults: dict[str, Any] = {},
               **fixed: Any):
    """The stage's TRL config (SFTConfig, RewardConfig, ...): its recipe section, plus what align sets in every
    stage: where the trainer writes, the seed, precision from the model's compute dtype (TRL defaults to bf16
    even on CPUs), non-reentrant checkpointing, the recipe's trackers (run.report_to). `defaults` may be overridden by the
    stage's trainer_args; `fixed` may not."""
    import torch

    from align.modeling import checkpointing, precision_args
    from align.recipe import RecipeError, section_name, trainer_kwargs

    kwargs = trainer_kwargs(
        stage,
        config_cls,
        defaults={"dataloader_pin_memory": torch.cuda.is_available(), **defaults},
        output_dir=str(run_dir.trainer_dir),
        seed=recipe.run.seed,
        data_seed=recipe.run.seed,
        eval_strategy="steps" if has_eval and stage.eval_steps else "no",
        save_strategy="steps",
        activation_checkpointing_kwargs=checkpointing(stage) or {"use_reentrant": False},
        report_to=recipe.run.report_to or "none",
        **precision_args(recipe.model),
        **fixed,
    )
    try:
        return config_cls(**kwargs)
    except (ValueError, TypeError) as e:  # e.g. a trainer_args value the config rejects
        raise RecipeError(f"{section_name(stage)}: {config_cls.__name__} does not take these settings: "
                          f"{str(e).splitlines()[0]}") from None


def init_adapter(recipe, section: str, upcoming: tuple[str, ...] = ()) -> Path | None:
    """The LoRA adapter the stage `section` starts from, per its `init_from`: auto (the SFT stage's checkpoint
    when the recipe has an sft section), sft, base (None: a fresh adapter) or an adapter directory. `upcoming`:
    stages `align run` trains before this one, whose checkpoints count as there."""
    choice = getattr(recipe, section).init_from
    setting = f"{section}.init_from={choice}"
    if choice == "base" or (choice == "auto" and recipe.sft is None):
        return None
    if choice in ("auto", "sft"):
        return finished_checkpoint(recipe, "sft", setting, f"or set {section}.init_from=base", upcoming)
    return adapter_dir(choice, setting, "not auto, sft, base, or a LoRA adapter directory")


def finished_checkpoint(recipe, stage: str, setting: str, alternative: str, upcoming: tuple[str, ...] = ()) -> Path:
    """This recipe's finished checkpoint of `stage` (or where it will be, if `stage` is in `upcoming`); `setting`
    (the recipe value that asked for it) and `alternative` (another way out) go into the error when there is none."""
    from align.recipe import RecipeError
    from align.rundir import checkpoint_problem

    stage_dir = Path(recipe.run.root) / recipe.run.name / stage
    if stage in upcoming:
        return stage_dir / "checkpoint"
    problem = checkpoint_problem(stage_dir)
    if problem and getattr(recipe, stage) is None:
        raise RecipeError(f"{setting} needs the {stage} stage's checkpoint, and the recipe has no {stage} section "
                          f"({problem}); add one, {alternative}")
    if problem:
        raise RecipeError(f"{setting}: {problem}; run `align {stage}` with this recipe first, {alternative}")
    return stage_dir / "checkpoint"


def adapter_dir(path: str, setting: str, what: str) -> Path:
    """`path` if it holds a PEFT adapter (adapter_config.json), else an error saying what it should be."""
    from align.recipe import RecipeError

    if not (Path(path) / "adapter_config.json").is_file():
        raise RecipeError(f"{setting}: {what} (no adapter_config.json there)")
    return Path(path)


def batch(trainer) -> dict[str, int]:
    """The batch a trainer's optimizer steps see: per device x processes x accumulation (GRPO: completions)."""
    args = trainer.args
    return {"processes": args.world_size, "effective_batch": args.per_device_train_batch_size * args.world_size
            * args.gradient_accumulation_steps}
