"""Where a stage's time goes, phase by phase, against this machine's own matmul peak.

    python bench/phases.py --recipe recipes/smollm2-135m.yaml --from runs/s42 \
        model.name_or_path=~/.cache/align/models/smollm2-135m-instruct
    python bench/phases.py --recipe recipes/smollm2-135m.yaml --from runs/s42 --stages grpo \
        --old-recipe /tmp/old-smollm2.yaml --old-set model.merged_generation=false

Runs align's own stage code (`align.stages.<stage>.run`, a few steps each, in a temporary run root) with timers
on the calls each phase is made of:
- generation: TRL's GRPO rollouts (GRPOTrainer._generate), PPO's (generation.generate_batch);
- log-probs: reference / old-policy log-probs and values without gradients;
- scoring: the reward functions;
- forward+backward: the loss's forward and backward passes (training_step, PPO's _losses);
- optimizer: the optimizer's step;
- evaluation: held-out generation and scoring before and after (rl.evaluate, generation.generate, the SFT
  and reward stages' evaluation passes), per stage;
- other: the rest of the training loop (data collation, logging, checkpoints).
A phase nested in another is counted once, in the inner one (evaluation keeps what runs inside it). Each
phase's FLOP/s counts 2 FLOPs per matmul parameter per token forward (generation, log-probs) and 4 for forward +
backward through the frozen base (activation gradients; 6 with activation checkpointing), LoRA and attention
left out, as bench/run.py counts; it is shown as a fraction of a large torch.matmul measured in the same run in
the compute dtype (float32 and bfloat16 both printed).

`--from RUN_DIR`: the RL stages start from that run's SFT checkpoint and use its reward checkpoint (rollouts as
long as the trained policy's, not a base model's rambling). `--old-recipe` / `--old-set`: each stage runs twice,
alternately, the old settings and the new, and the table gives old / new per phase (one process, one machine:
the ratio is what these shared machines measure reliably).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

STAGES = ("sft", "reward", "grpo", "ppo")
PHASES = ("generation", "log-probs", "scoring", "forward+backward", "optimizer", "evaluation", "other")


def matmul_peak(dtype, size: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a size x size torch.matmul in `dtype` on this process's threads (best of `repeats`)."""
    import torch

    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


class Phases:
    """Wall time and FLOPs per phase, from timers wrapped around functions and methods."""

    def __init__(self, matmul_params: int, backward_factor: int):
        self.n, self.backward_factor = matmul_params, backward_factor
        self.seconds: dict[str, float] = defaultdict(float)
        self.flops: dict[str, float] = defaultdict(float)
        self.tokens: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.stack: list[list] = []  # [phase, seconds of timed calls nested in it, absorbs nested calls]
        self.undo: list = []

    def wrap(self, owner, name: str, phase, tokens=None, absorb: bool = False) -> None:
        """Time calls of owner.name as `phase` (a name, or a function of the call's arguments that returns a
        name or None: not timed); `tokens(args, kwargs, out)` the tokens through the model, `(tokens, flops per
        parameter per token)`."""
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            which = phase(args, kwargs) if callable(phase) else phase
            if which is None or (self.stack and self.stack[-1][2]):
                return original(*args, **kwargs)
            self.stack.append([which, 0.0, absorb])
            start = time.perf_counter()
            try:
                out = original(*args, **kwargs)
            finally:
                total = time.perf_counter() - start
                _, nested, _ = self.stack.pop()
                self.seconds[which] += total - nested
                self.calls[which] += 1
                if self.stack:
                    self.stack[-1][1] += total
            if tokens is not None:
                count, per_token = tokens(args, kwargs, out)
                self.tokens[which] += count
                self.flops[which] += per_token * self.n * count
            return out

        setattr(owner, name, timed)
        self.undo.append((owner, name, original))

    def restore(self) -> None:
        for owner, name, original in reversed(self.undo):
            setattr(owner, name, original)


def instrument(phases: Phases) -> None:
    """Timers on the calls each phase is made of (module docstring)."""
    import torch
    import transformers
    from trl import GRPOTrainer

    import align.rl
    import align.stages.ppo as ppo
    import align.stages.reward as reward
    import align.stages.sft as sft

    fwd_bwd = phases.backward_factor
    no_grad = lambda phase: lambda a, k: None if torch.is_grad_enabled() else phase  # noqa: E731
    ids_tokens = lambda i, key: lambda a, k, out: ((a[i] if len(a) > i else k[key]).numel(), 2)  # noqa: E731

    def generated(a, k, out):  # generate_batch: (prompts, mask, generated) repeated per_prompt times
        return out[0].numel() + out[2].numel(), 2

    def trl_generated(a, k, out):  # GRPOTrainer._generate: padded prompts + completions run to the longest
        prompts, completions = out[0], out[1]
        return len(prompts) * (max(map(len, prompts)) + max(map(len, completions))), 2

    def loss_tokens(a, k, out):  # Trainer.training_step(model, inputs, ...)
        inputs = a[2]
        if not isinstance(inputs, dict):  # GRPO's step gets rows: its _compute_loss counts the tokens
            return 0, fwd_bwd
        keys = [key for key in inputs if key.endswith("input_ids") or key in ("prompt_ids", "completion_ids")]
        return sum(inputs[key].numel() for key in keys), fwd_bwd

    def loss_tokens_grpo(a, k, out):  # GRPOTrainer._compute_loss(model, inputs)
        return a[2]["prompt_ids"].numel() + a[2]["completion_ids"].numel(), fwd_bwd

    def ppo_update_tokens(a, k, out):  # PPOLoop._losses(rollout, idx, ...): policy and value passes
        return 2 * a[1].query_responses[a[2]].numel(), fwd_bwd

    phases.wrap(align.rl, "evaluate", "evaluation", absorb=True)
    phases.wrap(sft, "generate", "evaluation", absorb=True)
    phases.wrap(reward, "pair_scores", "evaluation", absorb=True)
    phases.wrap(transformers.Trainer, "evaluate", "evaluation", absorb=True)
    phases.wrap(GRPOTrainer, "_generate", "generation", tokens=trl_generated)
    phases.wrap(ppo, "generate_batch", "generation", tokens=generated)
    phases.wrap(GRPOTrainer, "_get_per_token_logps_and_entropies", no_grad("log-probs"), tokens=ids_tokens(2, "input_ids"))
    phases.wrap(ppo.PPOLoop, "_logprobs", no_grad("log-probs"), tokens=ids_tokens(1, "query_responses"))
    phases.wrap(ppo.PPOLoop, "_values", no_grad("log-probs"), tokens=ids_tokens(1, "query_responses"))
    phases.wrap(GRPOTrainer, "_calculate_rewards", "scoring")
    phases.wrap(align.rl, "score_completions", "scoring")
    phases.wrap(transformers.Trainer, "training_step", "forward+backward", tokens=loss_tokens)
    phases.wrap(GRPOTrainer, "_compute_loss", "forward+backward", tokens=loss_tokens_grpo)
    phases.wrap(ppo.PPOLoop, "_losses", "forward+backward", tokens=ppo_update_tokens)
    phases.wrap(torch.optim.AdamW, "step", "optimizer")
    phases.wrap(transformers.Trainer, "train", "other")
    phases.wrap(ppo.PPOLoop, "train", "other")


def matmul_params(model_path: str) -> int:
    """Parameters every token's matmuls read: all but the input embeddings (a tied LM head counts)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import torch

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        total = AutoModelForCausalLM.from_config(config).num_parameters()
    return total - (0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size)


def stage_overrides(stage: str, steps: int, prompts: int, source: Path | None, recipe) -> list[str]:
    """A short run of `stage`: `steps` steps, `prompts` held-out prompts evaluated, no checkpoint before the end;
    RL from `source`'s SFT checkpoint with its reward checkpoint."""
    overrides = [f"{stage}.max_steps={steps}", f"{stage}.logging_steps=1", f"{stage}.save_steps={steps + 1}"]
    section = getattr(recipe, stage)
    if hasattr(section, "eval_generations"):
        overrides.append(f"{stage}.eval_generations={prompts}")
    if stage == "sft":
        overrides.append(f"sft.eval_loss_rows={prompts}")
    if stage in ("grpo", "ppo"):
        if source is None:  # a fresh adapter, and the rule rewards alone (no reward checkpoint to score with)
            rules = [{"name": r.name, "weight": r.weight, "args": dict(r.args)} for r in section.rewards
                     if r.name != "reward_model"]
            overrides += [f"{stage}.init_from=base", f"{stage}.rewards={json.dumps(rules)}"]
        else:
            overrides.append(f"{stage}.init_from={source / 'sft' / 'checkpoint'}")
            for i, spec in enumerate(section.rewards):
                if spec.name == "reward_model":
                    overrides.append(f"{stage}.rewards.{i}.args.checkpoint={source / 'reward' / 'checkpoint'}")
        overrides.append(f"{stage}.max_kl=null")
    if stage == "reward":
        overrides.append(f"reward.init_from={source / 'sft' / 'checkpoint' if source else 'base'}")
    return overrides


def run_stage(stage: str, recipe_path: Path, overrides: list[str], root: Path, name: str, args, n: int) -> dict:
    """One short run of `stage` with timers; its phases per step."""
    import importlib

    from align.modeling import compute_dtype
    from align.recipe import load_recipe

    base = load_recipe(recipe_path, overrides)
    recipe = load_recipe(recipe_path, [*overrides, f"run.root={root}", f"run.name={name}",
                                       *stage_overrides(stage, args.steps, args.eval_prompts, args.source, base)])
    section = getattr(recipe, stage)
    phases = Phases(n, 6 if section.activation_checkpointing else 4)
    instrument(phases)
    start = time.perf_counter()
    try:
        results = importlib.import_module(f"align.stages.{stage}").run(recipe)
    finally:
        phases.restore()
    wall = time.perf_counter() - start
    steps = results.get("steps") or phases.calls["optimizer"]  # PPO: several optimizer steps per step
    in_loop = {p: phases.seconds[p] for p in PHASES if p != "evaluation"}
    return {"stage": stage, "steps": steps, "wall_seconds": wall, "dtype": str(compute_dtype(recipe.model)),
            "seconds_per_step": {p: s / steps for p, s in in_loop.items()},
            "step_seconds": sum(in_loop.values()) / steps,
            "evaluation_seconds": phases.seconds["evaluation"], "evaluated_prompts": args.eval_prompts,
            "flops_per_s": {p: phases.flops[p] / phases.seconds[p] for p in PHASES if phases.seconds[p] and phases.flops[p]},
            "tokens_per_s": {p: phases.tokens[p] / phases.seconds[p] for p in PHASES if phases.seconds[p] and phases.tokens[p]}}


def table(record: dict, peak: float, old: dict | None) -> str:
    lines = [f"{record['stage']}: {record['steps']} steps, {record['step_seconds']:.2f} s/step in the training loop"
             + (f" (old {old['step_seconds']:.2f}, old/new {old['step_seconds'] / record['step_seconds']:.2f}x)"
                if old else "") + f"; evaluation {record['evaluation_seconds']:.1f} s for "
             f"{record['evaluated_prompts']} prompts" + (f" (old/new {old['evaluation_seconds'] / record['evaluation_seconds']:.2f}x)"
                                                         if old and record["evaluation_seconds"] else ""),
             f"  {'phase':18} {'s/step':>8} {'tokens/s':>10} {'GFLOP/s':>9} {'of peak':>8}" + ("   old s/step  old/new" if old else "")]
    for phase in PHASES:
        seconds = record["seconds_per_step"].get(phase, 0.0)
        if phase == "evaluation" or not seconds:
            continue
        flops = record["flops_per_s"].get(phase)
        tokens = record["tokens_per_s"].get(phase)
        line = (f"  {phase:18} {seconds:8.2f} {tokens or 0:10.0f} {(flops or 0) / 1e9:9.1f} "
                f"{(flops or 0) / peak:8.1%}")
        if old:
            was = old["seconds_per_step"].get(phase, 0.0)
            line += f"   {was:10.2f}  {was / seconds:6.2f}x"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, required=True)
    parser.add_argument("--stages", default="sft,reward,grpo,ppo", help="comma-separated, in this order")
    parser.add_argument("--steps", type=int, default=3, help="training steps per stage")
    parser.add_argument("--eval-prompts", type=int, default=32, help="held-out prompts in each evaluation")
    parser.add_argument("--from", dest="source", type=Path, default=None,
                        help="a finished run dir: RL starts from its sft checkpoint, with its reward checkpoint")
    parser.add_argument("--old-recipe", type=Path, default=None, help="the recipe to compare with (default: --recipe)")
    parser.add_argument("--old-set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override of the old run (repeatable), e.g. model.merged_generation=false")
    parser.add_argument("--out", type=Path, default=None, help="JSON-lines file the records are appended to")
    parser.add_argument("overrides", nargs="*", help="recipe overrides for both runs, key=value")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import platform

    import torch

    from align.memory import keep_freed_memory
    from align.recipe import load_recipe

    print(f"memory: {keep_freed_memory()} (as the align command does)")
    stages = args.stages.split(",")
    if unknown := [s for s in stages if s not in STAGES]:
        parser.error(f"--stages: {', '.join(unknown)} not among {', '.join(STAGES)}")
    comparing = args.old_recipe is not None or bool(args.old_set)
    peaks = {"float32": matmul_peak(torch.float32), "bfloat16": matmul_peak(torch.bfloat16)}
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else platform.processor()
    print(f"{cpu}, {torch.get_num_threads()} threads: 2048x2048 matmul {peaks['float32'] / 1e9:.0f} GFLOP/s float32, "
          f"{peaks['bfloat16'] / 1e9:.0f} GFLOP/s bfloat16")
    n = matmul_params(str(Path(load_recipe(args.recipe, args.overrides).model.name_or_path).expanduser()))
    records = []
    with tempfile.TemporaryDirectory(prefix="align-phases-") as tmp:
        for stage in stages:
            old = None
            if comparing:
                old = run_stage(stage, args.old_recipe or args.recipe, [*args.overrides, *args.old_set], Path(tmp),
                                f"old-{stage}", args, n)
            new = run_stage(stage, args.recipe, args.overrides, Path(tmp), f"new-{stage}", args, n)
            peak = peaks["bfloat16" if "bfloat16" in new["dtype"] else "float32"]
            print(table(new, peak, old), flush=True)
            records.append({"cpu": cpu, "threads": torch.get_num_threads(), "peak_flops": peaks, "matmul_params": n,
                            "new": new, "old": old, "recipe": str(args.recipe), "overrides": args.overrides,
                            "old_recipe": str(args.old_recipe or args.recipe) if comparing else None,
                            "old_set": args.old_set})
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
