"""`align run`: stages in order, finished ones skipped, changed ones re-run (and those after), interrupted ones
resumed after a kill -9, and the gates between stages."""

import json
import shutil
from pathlib import Path

import pytest
from conftest import PREF_HELDOUT, PREF_TRAIN, QA_HELDOUT, QA_TRAIN, finished, few_rows, first_rows, sft_section

from align import pipeline
from align.recipe import RecipeError, load_recipe, to_yaml

RL_SECTION = {"max_steps": 2, "per_device_train_batch_size": 8, "num_generations": 4, "max_completion_length": 8,
              "max_length": 64, "activation_checkpointing": False, "logging_steps": 1, "eval_generations": 4,
              "eval_samples": 0, "per_device_eval_batch_size": 8}


@pytest.fixture
def recipe_path(write_recipe, tmp_path):
    """SFT -> reward -> GRPO on the tiny base, a few steps each, small held-out files."""
    qa_heldout = first_rows(QA_HELDOUT, 8, tmp_path / "qa_heldout.jsonl")
    pref_heldout = first_rows(PREF_HELDOUT, 16, tmp_path / "pref_heldout.jsonl")
    qa = few_rows(QA_TRAIN, tmp_path)
    return write_recipe(
        data={"sft": {"train": str(qa), "eval": str(qa_heldout)},
              "preference": {"train": str(few_rows(PREF_TRAIN, tmp_path)), "eval": str(pref_heldout)},
              "prompts": {"train": str(qa), "eval": str(qa_heldout)},
              "columns": {"prompt": "question", "completion": "answer"}},
        sft=sft_section(max_steps=6, eval_generations=4),
        reward={"max_steps": 4, "max_length": 128, "activation_checkpointing": False, "logging_steps": 2},
        grpo={**RL_SECTION, "rewards": [{"name": "exact_match", "args": {"column": "answer"}},
                                        {"name": "reward_model", "weight": 0.1}]},
    )


def actions(outcomes):
    return [(o.stage, o.action) for o in outcomes]


@pytest.mark.slow
def test_finished_stages_are_skipped_and_a_changed_one_reruns_with_those_after(recipe_path, tmp_path):
    run = lambda *overrides, **kw: pipeline.run(load_recipe(recipe_path, ["rl.min_reward_accuracy=0", *overrides]), **kw)  # noqa: E731
    first = run()
    assert actions(first) == [("sft", "ran"), ("reward", "ran"), ("grpo", "ran")]
    assert first[2].results["kl_first"] == pytest.approx(0, abs=1e-4)
    lineage = lambda stage: json.loads((tmp_path / "runs" / "test" / stage / "lineage.json").read_text())  # noqa: E731
    started = {s: lineage(s)["start_time"] for s in ("sft", "reward", "grpo")}

    again = run()
    assert actions(again) == [("sft", "skipped"), ("reward", "skipped"), ("grpo", "skipped")]
    assert again[1].results == first[1].results | {"before": again[1].results["before"]}  # from lineage.json
    assert {s: lineage(s)["start_time"] for s in started} == started  # nothing ran

    changed = run("reward.max_steps=5")
    assert actions(changed) == [("sft", "skipped"), ("reward", "ran"), ("grpo", "ran")]
    assert "reward.max_steps: 4 -> 5" in changed[1].reason
    assert lineage("grpo")["inputs"]["reward stage"] == lineage("reward")["inputs_sha256"]

    assert actions(run("reward.max_steps=5", only="sft")) == [("sft", "skipped")]
    assert actions(run("reward.max_steps=5", start="rl")) == [("grpo", "ran")]
    events = [json.loads(line) for line in (tmp_path / "runs" / "test" / "pipeline.jsonl").read_text().splitlines()]
    assert any(e.get("stage") == "reward" and e.get("action") == "skip" for e in events)
    assert any(e.get("gate") == "prompt_rendering" and e["passed"] for e in events)


def test_stage_choice_errors(write_recipe):
    length = [{"name": "length", "args": {"max_tokens": 8}}]
    both = write_recipe(grpo={"rewards": length}, ppo={"rewards": length},
                        data={"prompts": {"train": str(QA_TRAIN)}})
    with pytest.raises(RecipeError, match="both a grpo and a ppo section; choose one .* rl.algorithm=grpo"):
        pipeline.run(load_recipe(both))
    assert pipeline.stage_names(load_recipe(both, ["rl.algorithm=ppo"])) == ["ppo"]
    with pytest.raises(RecipeError, match=r"--only reward: this recipe's stages are ppo"):
        pipeline.run(load_recipe(both, ["rl.algorithm=ppo"]), only="reward")
    with pytest.raises(RecipeError, match="rl.algorithm=grpo, but the recipe has no grpo section"):
        pipeline.stage_names(load_recipe(write_recipe(sft={}), ["rl.algorithm=grpo"]))


def fake_reward_stage(recipe, reward_checkpoint, accuracy):
    """A finished reward stage of `recipe`'s run whose lineage records held-out pair `accuracy` (None: no held-out)."""
    stage = Path(recipe.run.root) / recipe.run.name / "reward"
    shutil.copytree(reward_checkpoint, stage / "checkpoint")
    after = {"pair_accuracy": accuracy} if accuracy is not None else {}
    finished(stage / "checkpoint", results={"after": after})


@pytest.mark.parametrize("accuracy", [0.55, None])
def test_rl_does_not_start_on_a_weak_reward_model(write_recipe, reward_checkpoint, accuracy):
    recipe = load_recipe(write_recipe(grpo={"rewards": [{"name": "reward_model"}]}))
    fake_reward_stage(recipe, reward_checkpoint, accuracy)
    message = ("ranks 55.0% of held-out pairs correctly, below rl.min_reward_accuracy=0.6" if accuracy else
               "has no held-out accuracy to check against rl.min_reward_accuracy=0.6")
    with pytest.raises(pipeline.GateError, match=message):
        pipeline.check_reward_accuracy(recipe, "grpo")
    recipe.rl.min_reward_accuracy = 0.5 if accuracy else 0  # overridable
    pipeline.check_reward_accuracy(recipe, "grpo")


def write_stage_config(recipe, stage, **data):
    """config.yaml of a finished `stage` run with `recipe`'s settings but for `data` (e.g. another system prompt)."""
    other = load_recipe(None, [f"model.name_or_path={recipe.model.name_or_path}"] +
                        [f"data.{k}={v}" for k, v in data.items()])
    path = Path(recipe.run.root) / recipe.run.name / stage / "config.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(to_yaml(other))


def test_a_prompt_rendered_differently_from_the_sft_stage_stops_the_run_with_a_diff(write_recipe):
    path = write_recipe(sft={}, grpo={"rewards": [{"name": "length"}]})
    recipe = load_recipe(path)
    write_stage_config(recipe, "sft", system_prompt="Be brief.")
    sft_tokens = len(pipeline.rendered_prompt(load_recipe(path, ["data.system_prompt=Be brief."]), "sft")[0])
    grpo_tokens = len(pipeline.rendered_prompt(recipe, "grpo")[0])
    with pytest.raises(pipeline.GateError, match=r"grpo would see prompts rendered differently from the sft stage"
                                                 rf"(?s:.*)sft: {sft_tokens} tokens 'Be brief.\\n\\nUser: What is 2 \+ 3\?"
                                                 rf"\\nAssistant:'\n  grpo: {grpo_tokens} tokens 'User: (?s:.*)first "
                                                 r"difference at token 0: \['B"):
        pipeline.check_prompt_rendering(recipe, "grpo")
    recipe.data.system_prompt = "Be brief."
    pipeline.check_prompt_rendering(recipe, "grpo")


def test_a_template_whose_generation_prompt_is_not_what_sft_trains_on_is_caught(write_recipe):
    # The prompt alone ends in "<|assistant|>\n"; prompt + answer renders "<|assistant|>" then the answer.
    template = ("{% for m in messages %}{% if m.role == 'assistant' %}<|assistant|>{{ m.content }}{% else %}"
                "<|user|>\n{{ m.content }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>\n"
                "{% endif %}")
    recipe = load_recipe(write_recipe(sft={}, grpo={"rewards": [{"name": "length"}]}),
                         [f"model.chat_template={json.dumps(template)}"])
    path = Path(recipe.run.root) / recipe.run.name / "sft" / "config.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(to_yaml(recipe))
    with pytest.raises(pipeline.GateError, match="grpo would see prompts rendered differently from the sft stage"):
        pipeline.check_prompt_rendering(recipe, "grpo")


def test_what_a_finished_stage_left_in_malloc_is_released_before_the_next(recipe_path, tmp_path, monkeypatch):
    """align run hands a finished stage's kept heap back (align.memory.release_freed_memory) before the next stage's
    memory pre-flight reads the process's resident memory."""
    checkpoint = tmp_path / "runs" / "test" / "sft" / "checkpoint"
    released = []
    monkeypatch.setattr(pipeline, "release_freed_memory", lambda: released.append(checkpoint.is_dir()))
    outcomes = pipeline.run(load_recipe(recipe_path, ["sft.max_steps=2"]), only="sft")
    assert actions(outcomes) == [("sft", "ran")] and released == [True]
