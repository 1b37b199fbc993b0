"""One module per stage; each exposes `run(recipe) -> results`."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def trl_config(config_cls: type, stage: Any, recipe, run_dir, *, has_eval: bool, defaults: dict[str, Any] = {},
               **fixed: Any):
    """The stage's TRL config (SFTConfig, RewardConfig, ...): its recipe section, plus what align sets in every
    stage: where the trainer writes, the seed, precision from the model's compute dtype (TRL defaults to bf16
    even on CPUs), non-reentrant checkpointing, no external loggers. `defaults` may be overridden by the
    stage's trainer_args; `fixed` may not."""
    import torch

    from align.modeling import precision_args
    from align.recipe import trainer_kwargs

    return config_cls(**trainer_kwargs(
        stage,
        config_cls,
        defaults={"dataloader_pin_memory": torch.cuda.is_available(), **defaults},
        output_dir=str(run_dir.trainer_dir),
        seed=recipe.run.seed,
        data_seed=recipe.run.seed,
        eval_strategy="steps" if has_eval and stage.eval_steps else "no",
        save_strategy="steps",
        activation_checkpointing_kwargs={"use_reentrant": False},
        report_to="none",
        **precision_args(recipe.model),
        **fixed,
    ))


def init_adapter(recipe, section: str) -> Path | None:
    """The LoRA adapter the stage `section` starts from, per its `init_from`: auto (the SFT stage's checkpoint
    when the recipe has an sft section), sft, base (None: a fresh adapter) or an adapter directory."""
    from align.recipe import RecipeError
    from align.rundir import complete_checkpoint

    choice = getattr(recipe, section).init_from
    sft_dir = Path(recipe.run.root) / recipe.run.name / "sft"
    if choice == "base" or (choice == "auto" and recipe.sft is None):
        return None
    if choice in ("auto", "sft"):
        checkpoint = complete_checkpoint(sft_dir)
        if checkpoint is None:
            raise RecipeError(f"{section}.init_from={choice}: there is no finished SFT checkpoint at "
                              f"{sft_dir}/checkpoint; run `align sft` with this recipe first, or set "
                              f"{section}.init_from=base")
        return checkpoint
    path = Path(choice)
    if not (path / "adapter_config.json").is_file():
        raise RecipeError(f"{section}.init_from={choice}: not auto, sft, base, or a LoRA adapter directory "
                          "(no adapter_config.json there)")
    return path
