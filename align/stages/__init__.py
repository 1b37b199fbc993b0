"""One module per stage; each exposes `run(recipe) -> results`."""

from __future__ import annotations

from typing import Any


def trl_config(config_cls: type, stage: Any, recipe, run_dir, *, has_eval: bool, **fixed: Any):
    """The stage's TRL config (SFTConfig, RewardConfig, ...): its recipe section, plus what align sets in every
    stage: where the trainer writes, the seed, precision from the model's compute dtype (TRL defaults to bf16
    even on CPUs), non-reentrant checkpointing, no external loggers."""
    import torch

    from align.modeling import precision_args
    from align.recipe import trainer_kwargs

    return config_cls(**trainer_kwargs(
        stage,
        config_cls,
        defaults={"dataloader_pin_memory": torch.cuda.is_available()},
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
