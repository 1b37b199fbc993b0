"""`align run`: a recipe's stages in order (sft -> reward -> grpo|ppo|dpo|kto, those the recipe has and the last
one needs), each starting from the checkpoints of the ones before it, with the gates between them.

    align run recipes/quickstart.yaml
    align run recipes/quickstart.yaml --from reward       # re-run reward and RL, keep SFT
    align run recipes/quickstart.yaml --only sft sft.max_steps=100
    accelerate launch --config_file accelerate_config.yaml -m align run recipes/quickstart.yaml

Each stage, unless `--fresh` or `--from` forces it to run from step 0:
- finished (complete checkpoint/, lineage end_time) with the same inputs as now: skipped;
- interrupted with the same inputs: resumed from its last complete trainer checkpoint (HF Trainer's
  resume_from_checkpoint, or the PPO loop's own), or run from step 0 if it had saved none;
- never run, or its inputs changed (recipe keys, data files, an earlier stage: `rundir.stage_inputs`): run, saying
  which inputs changed. Once a stage runs, every stage after it runs too: its parent checkpoint is new.
Gates, before a stage starts: the prompt it renders has the token ids the finished stages rendered
(`rl.check_prompt_rendering`), and RL waits for a reward model good enough to be optimised against
(`rl.min_reward_accuracy`). Every decision is logged and appended to runs/<run>/pipeline.jsonl.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from align import registry
from align.errors import AlignError
from align.memory import release_freed_memory
from align.registry import BY_NAME, FINAL, STAGES
from align.recipe import Recipe, RecipeError, RLAlgorithm, load_recipe
from align.processes import is_main_process, wait_for_everyone
from align.rundir import (base_problem, checkpoint_problem, inputs_digest, parent_problem,
                          stage_inputs, utc_now, write_file)

log = logging.getLogger(__name__)

PROBE = [{"role": "user", "content": "What is 2 + 3?"}]  # any text: templates and system prompts do not read it
PROBE_ANSWER = [{"role": "assistant", "content": "2 + 3 = 5."}]


class GateError(AlignError, RuntimeError):
    """A gate between stages did not pass; the message says what was measured and how to go on."""


@dataclass
class Outcome:
    stage: str
    action: str  # skipped, resumed, ran
    reason: str
    results: dict[str, Any] = field(default_factory=dict)


def stage_names(recipe: Recipe) -> list[str]:
    """The recipe's stages in the registry's order (align/registry.py), ending at most one final stage
    (rl.algorithm)."""
    final = final_stage(recipe)
    needed = _needed(recipe, final) if final else None
    return [s.name for s in STAGES if getattr(recipe, s.name) is not None
            and (s.name == final if s.final else needed is None or s.name in needed)]


def _needed(recipe: Recipe, final: str) -> set[str]:
    """The stages the final one starts from or is scored by: its upstream stages, and the reward stage when one of
    its rewards is this recipe's reward model (DPO needs none otherwise)."""
    rewards = getattr(getattr(recipe, final), "rewards", [])
    own_reward_model = any(r.name == "reward_model" and r.args.get("checkpoint", "auto") == "auto" for r in rewards)
    return set(registry.stage(final).upstream) | ({"reward"} | set(registry.stage("reward").upstream)
                                                  if own_reward_model else set())


def final_stage(recipe: Recipe) -> str | None:
    """The stage that ends `align run` (registry.FINAL): rl.algorithm, or auto: the one the recipe has a section for."""
    choice = recipe.rl.algorithm
    present = [name for name in FINAL if getattr(recipe, name) is not None]
    if choice == RLAlgorithm.auto:
        if len(present) > 1:
            raise RecipeError(f"the recipe has both a {' and a '.join(present)} section; choose one for `align run` with "
                              + " or ".join(f"rl.algorithm={name}" for name in present))
        return present[0] if present else None
    if getattr(recipe, choice.value) is None:
        raise RecipeError(f"rl.algorithm={choice.value}, but the recipe has no {choice.value} section")
    return choice.value


def validate(recipe: Recipe) -> list[str]:
    """The recipe's stages, after refusing what any of them would refuse once the earlier ones have trained for
    hours: missing data files (hub ids are taken on trust: no network needed), and whatever each stage's
    `check` refuses (settings, unknown reward functions, a starting point that no stage provides), with the
    stages before it counted as trained. Nothing is downloaded or loaded."""
    from align.data.files import HUB_ID, SUFFIXES

    names = stage_names(recipe)
    for i, name in enumerate(names):
        data = registry.stage(name).data
        files = getattr(recipe.data, data)
        if files.train is None:
            raise RecipeError(f"data.{data}.train is not set, and the {name} stage needs it")
        for split, path in (("train", files.train), ("eval", files.eval)):
            if path and not Path(path).exists() and (not HUB_ID.match(path) or path.endswith(SUFFIXES)):
                raise RecipeError(f"data.{data}.{split}={path}: no such file or directory (nor a hub dataset id "
                                  "such as owner/name:split)")
        registry.stage(name).module.check(recipe, upcoming=tuple(names[:i]))
    return names


def check_data(recipe: Recipe, names: list[str]) -> None:
    """The data files of the stages `names`, read and validated as each stage will (an empty prompts file must
    stop the run before SFT trains, not after). Only the tokenizer is loaded (from the hub, for a hub model)."""
    from align.modeling import load_tokenizer

    tokenizer = load_tokenizer(recipe.model)
    for name in names:
        registry.stage(name).module.load_data(recipe, tokenizer)


def run(recipe: Recipe, *, start: str | None = None, only: str | None = None, fresh: bool = False,
        on_stage: Callable[[str], None] = lambda name: None) -> list[Outcome]:
    """Run (or skip, or resume) the recipe's stages; `start`: re-run from this stage on; `only`: just this one.
    Stage names: sft, reward, rl (or grpo/ppo). `on_stage(name)` is called as each stage begins."""
    names = validate(recipe)
    if not names:
        raise RecipeError(f"the recipe has no stage sections ({', '.join(BY_NAME)}); add one (see "
                          "recipes/quickstart.yaml)")
    selected = names
    for option, wanted in (("--from", start), ("--only", only)):
        if wanted is None:
            continue
        name = final_stage(recipe) if wanted == "rl" or wanted in FINAL else wanted
        if wanted in FINAL and name != wanted or name not in names:
            raise RecipeError(f"{option} {wanted}: this recipe's stages are {', '.join(names)}")
        selected = names[names.index(name):] if option == "--from" else [name]
    check_data(recipe, selected)
    forced = "--fresh" if fresh else f"--from {start}" if start else None
    outcomes = []
    for name in selected:
        on_stage(name)
        outcome = _run_stage(recipe, name, forced)
        if outcome.action != "skipped" and not forced:  # what follows starts from a new checkpoint
            forced = f"the {name} stage before it ran"
        outcomes.append(outcome)
    return outcomes


def _run_stage(recipe: Recipe, name: str, forced: str | None) -> Outcome:
    stage_dir = Path(recipe.run.root) / recipe.run.name / name
    action, reason = decide(recipe, name, stage_dir, forced)
    wait_for_everyone()  # every rank has read the run dir before the main process writes to it
    _record(recipe, {"stage": name, "action": action, "reason": reason})
    log.info("%s: %s (%s)", name, action, reason)
    if action == "skip":
        lineage = json.loads((stage_dir / "lineage.json").read_text())
        return Outcome(name, "skipped", reason, lineage["results"])
    if recipe.rl.check_prompt_rendering:
        check_prompt_rendering(recipe, name)
    if hasattr(getattr(recipe, name), "rewards"):
        check_reward_accuracy(recipe, name)
    results = registry.stage(name).module.run(recipe, resume=action == "resume")
    release_freed_memory()  # the next stage's peak, not this one's kept heap on top of it
    _record(recipe, {"stage": name, "action": "finished", "checkpoint": results["checkpoint"]})
    return Outcome(name, "resumed" if action == "resume" else "ran", reason, results)


def decide(recipe: Recipe, name: str, stage_dir: Path, forced: str | None) -> tuple[str, str]:
    """What `align run` does with stage `name` of this run dir: ("skip" | "resume" | "run", why). `forced`: why it
    must run from step 0, if it must."""
    if forced:
        return "run", forced
    lineage_path = stage_dir / "lineage.json"
    if not lineage_path.is_file():
        return "run", "not run before"
    lineage = json.loads(lineage_path.read_text())
    now = stage_inputs(recipe, name)
    if lineage.get("inputs_sha256") != inputs_digest(now):
        return "run", "its inputs changed since it ran: " + _changes(lineage.get("inputs") or {}, now)
    problem = checkpoint_problem(stage_dir)
    parent = parent_problem(lineage) if lineage.get("parent_sha256") else None  # one recorded without a digest
    changed = parent or base_problem(stage_dir, recipe.model)                    # cannot be checked: kept
    if problem is None and changed:
        return "run", changed
    if problem is None:
        return "skip", f"finished at {lineage['end_time']} with the same inputs; checkpoint {stage_dir / 'checkpoint'}"
    if lineage.get("end_time"):  # it finished, but its checkpoint is gone or damaged: its result is lost
        return "run", problem
    return "resume", "interrupted; resuming from its last complete trainer checkpoint, if any"


def _changes(before: dict[str, Any], now: dict[str, Any], shown: int = 5) -> str:
    changed = [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in sorted(before.keys() | now.keys())
               if before.get(k) != now.get(k)]
    more = f" (and {len(changed) - shown} more)" if len(changed) > shown else ""
    return "; ".join(changed[:shown]) + more


def _record(recipe: Recipe, event: dict[str, Any]) -> None:
    """Appends `event` to pipeline.jsonl. A run dir that cannot be written (read-only, full) gets a warning here:
    a run whose stages are all finished reads it without writing; a stage that trains stops at its own writes."""
    if is_main_process():
        path = Path(recipe.run.root) / recipe.run.name / "pipeline.jsonl"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_file(path, json.dumps({"time": utc_now(), **event}) + "\n", append=True)
        except OSError as e:
            log.warning("could not record %s in %s (%s)", event, path, e.strerror or e)


def check_reward_accuracy(recipe: Recipe, rl: str) -> None:
    """The gate before RL: each reward model it is scored by had at least `rl.min_reward_accuracy` held-out
    pairwise accuracy when its stage finished."""
    from align.rl import RewardSpecs

    threshold = recipe.rl.min_reward_accuracy
    checkpoints = RewardSpecs(recipe, getattr(recipe, rl)).checkpoints.values()
    if not checkpoints or threshold <= 0:
        why = "no reward_model reward" if not checkpoints else "rl.min_reward_accuracy=0"
        _record(recipe, {"gate": "min_reward_accuracy", "passed": True, "skipped": why})
        return
    for checkpoint in checkpoints:
        lineage_path = Path(checkpoint).parent / "lineage.json"
        after = json.loads(lineage_path.read_text()).get("results", {}).get("after") if lineage_path.is_file() else None
        if not after:
            raise GateError(f"{rl}: the reward model {checkpoint} has no held-out accuracy to check against "
                            f"rl.min_reward_accuracy={threshold:g} (its stage ran without data.preference.eval, or "
                            "outside align). Add held-out pairs and re-run the reward stage, or set "
                            "rl.min_reward_accuracy=0 to skip this gate")
        accuracy = after["pair_accuracy"]
        passed = accuracy >= threshold
        _record(recipe, {"gate": "min_reward_accuracy", "checkpoint": str(checkpoint), "accuracy": accuracy,
                         "threshold": threshold, "passed": passed})
        if not passed:
            raise GateError(f"{rl} not started: the reward model {checkpoint} ranks {accuracy:.1%} of held-out pairs "
                            f"correctly, below rl.min_reward_accuracy={threshold:g}. Optimising against a weak reward "
                            "model mostly finds its mistakes (reward up, quality down, KL running away). Improve it "
                            "(more or cleaner preference data, more reward.max_steps) and re-run with --from reward, "
                            f"or lower the gate with rl.min_reward_accuracy={accuracy:.2f}")
        log.info("gate passed: reward model held-out accuracy %.1f%% >= %.1f%%", 100 * accuracy, 100 * threshold)


def check_prompt_rendering(recipe: Recipe, stage: str) -> None:
    """The gate before every stage: the probe prompt's token ids as this stage will see them equal those every
    finished earlier stage (its config.yaml) saw. A stage sees the prompt as: SFT and the reward model, the start
    of the rendered prompt + answer they train on (`modeling.sft_tokens` starts the completion where the two
    renderings diverge); RL, the prompt with the generation prompt, which it generates from."""
    mine = rendered_prompt(recipe, stage)
    for earlier in registry.stage(stage).upstream:
        config = Path(recipe.run.root) / recipe.run.name / earlier / "config.yaml"
        if getattr(recipe, earlier) is None or not config.is_file():
            continue
        earlier_recipe = load_recipe(config)
        earlier_recipe.model.trust_remote_code = recipe.model.trust_remote_code  # the user's choice, not the run dir's
        theirs = rendered_prompt(earlier_recipe, earlier)
        if theirs[0] != mine[0]:
            _record(recipe, {"gate": "prompt_rendering", "stage": stage, "against": earlier, "passed": False})
            first = next((i for i, (a, b) in enumerate(zip(theirs[0], mine[0])) if a != b),
                         min(len(theirs[0]), len(mine[0])))
            raise GateError(f"{stage} would see prompts rendered differently from the {earlier} stage ({config}); "
                            "the policy would be trained or scored on text it was not taught to answer.\n"
                            f"  {earlier}: {len(theirs[0])} tokens {theirs[1]!r}\n  {stage}: {len(mine[0])} tokens "
                            f"{mine[1]!r}\n  first difference at token {first}: {theirs[2][first:first + 3]} vs "
                            f"{mine[2][first:first + 3]}\nUse the same model.name_or_path, model.chat_template and "
                            "data.system_prompt for every stage (or re-run the earlier stages with this recipe: "
                            "--from), or set rl.check_prompt_rendering=false if this is intended")
    _record(recipe, {"gate": "prompt_rendering", "stage": stage, "passed": True})


def rendered_prompt(recipe: Recipe, stage: str) -> tuple[list[int], str, list[str]]:
    """The probe prompt's token ids as `stage` of `recipe` sees them (see check_prompt_rendering), their text, and
    each token's text."""
    from align.data.fields import with_system_prompt
    from align.modeling import conversation_ids, load_tokenizer, prompt_ids

    tokenizer = load_tokenizer(recipe.model)
    prompt = with_system_prompt(PROBE, recipe.data.system_prompt)
    ids = prompt_ids(tokenizer, prompt)
    if not registry.stage(stage).generates:
        ids = conversation_ids(tokenizer, [prompt + PROBE_ANSWER])[0][:len(ids)]
    return ids, tokenizer.decode(ids), [tokenizer.decode([i]) for i in ids]
