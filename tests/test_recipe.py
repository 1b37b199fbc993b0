"""The recipe schema: typed YAML, key=value overrides, and errors that say where and what to fix."""

import time

import pytest
from trl import SFTConfig

from conftest import ROOT, TINY_BASE, sft_recipe

from align.cli import main
from align.recipe import Quantization, RecipeError, SFTStage, load_recipe, trainer_kwargs


def test_every_shipped_recipe_validates_offline():
    """Schema, stage settings, reward functions, data files (hub ids by their form): nothing is downloaded."""
    from align.pipeline import validate

    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    assert len(recipes) >= 6, "the quickstart and the real-model recipes"
    for path in recipes:
        recipe = load_recipe(path)
        assert recipe.run.name == path.stem
        stages = validate(recipe)
        assert stages[0] == "sft" and stages[-1] == recipe.rl.algorithm.value, (path, stages)
        assert all(getattr(recipe, stage) is not None for stage in stages), path  # each stage has its section
        if path.stem != "quickstart":  # a real model: LoRA on its 4-bit base, as the project is for
            assert recipe.model.quantization is Quantization.nf4, path


def test_validation_refuses_what_a_later_stage_would(write_recipe):
    from align.pipeline import validate

    with pytest.raises(RecipeError, match="data.prompts.train=prompts.jsonl: no such file"):
        validate(load_recipe(write_recipe(grpo={"rewards": [{"name": "length"}]}), ["data.prompts.train=prompts.jsonl"]))
    with pytest.raises(RecipeError, match="reward 'reward_model' .* needs the reward stage's checkpoint, and the recipe has no reward section"):
        validate(load_recipe(write_recipe(grpo={"rewards": [{"name": "reward_model"}]}),
                             ["data.prompts.train=owner/prompts"]))
    with pytest.raises(Exception, match="unknown_pkg"):
        validate(load_recipe(write_recipe(ppo={"rewards": [{"name": "unknown_pkg.mod:fn"}]}),
                             ["data.prompts.train=owner/prompts"]))
    # offloading activations to the CPU needs a GPU to offload from (transformers' pinned copies fail on a CPU)
    with pytest.raises(RecipeError, match="grpo.activation_checkpointing_offload=true: .* runs on the cpu; set it false"):
        validate(load_recipe(write_recipe(sft={}, grpo={"rewards": [{"name": "length"}]}),
                             ["data.prompts.train=owner/prompts", "data.sft.train=owner/qa",
                              "grpo.activation_checkpointing_offload=true"]))


def test_overrides_reach_nested_keys_with_their_types(write_recipe):
    path = write_recipe(sft={"learning_rate": 1e-3})
    recipe = load_recipe(path, ["sft.learning_rate=1e-4", "lora.r=4", "data.columns.prompt=question",
                                "model.quantization=none", "data.sft.train=x.jsonl"])
    assert recipe.sft.learning_rate == pytest.approx(1e-4)
    assert recipe.lora.r == 4 and isinstance(recipe.lora.r, int)
    assert recipe.data.columns.prompt == "question"
    assert recipe.model.quantization is Quantization.none
    assert recipe.data.sft.train == "x.jsonl"


def test_unknown_key_in_file_names_file_and_suggests(write_recipe):
    path = write_recipe(sft={"lerning_rate": 1e-3})
    with pytest.raises(RecipeError, match=rf"{path}: unknown key 'sft.lerning_rate'; did you mean 'sft.learning_rate'"):
        load_recipe(path)


def test_unknown_override_suggests_closest_key(write_recipe):
    with pytest.raises(RecipeError, match=r"override 'lora.rank=8': unknown key 'lora.rank'; did you mean 'lora.r'"):
        load_recipe(write_recipe(), ["lora.rank=8"])


def test_wrong_type_names_key(write_recipe):
    with pytest.raises(RecipeError, match=r"sft.max_steps: Value 'many'.*could not be converted to Integer"):
        load_recipe(write_recipe(sft={}), ["sft.max_steps=many"])


def test_invalid_choice_lists_the_valid_ones(write_recipe):
    with pytest.raises(RecipeError, match=r"model.quantization: Invalid value 'int8', expected one of \[nf4, none\]"):
        load_recipe(write_recipe(), ["model.quantization=int8"])


def test_missing_required_value_names_key_and_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("sft: {max_steps: 3}\n")
    with pytest.raises(RecipeError, match=rf"{path}: required value model.name_or_path is not set"):
        load_recipe(path)


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  name_or_path: x\nsft: {max_steps: 3\n")
    with pytest.raises(RecipeError, match=rf"^{path}:4: not valid YAML"):
        load_recipe(path)


def test_override_without_equals_is_an_error(write_recipe):
    with pytest.raises(RecipeError, match="not key=value"):
        load_recipe(write_recipe(), ["sft.max_steps"])


def test_stage_fields_pass_through_to_trl_config():
    stage = SFTStage(learning_rate=5e-4, trainer_args={"weight_decay": 0.1, "neftune_noise_alpha": 5.0})
    kwargs = trainer_kwargs(stage, SFTConfig, output_dir="out", bf16=False)
    assert kwargs["learning_rate"] == 5e-4 and kwargs["neftune_noise_alpha"] == 5.0
    assert "eval_generations" not in kwargs  # align-only fields stay in align
    config = SFTConfig(**kwargs)
    assert config.weight_decay == 0.1 and config.output_dir == "out"


def test_trainer_args_are_checked_against_trl():
    with pytest.raises(RecipeError, match=r"^sft.trainer_args.neftune_alpha: not a field of SFTConfig; did you mean 'neftune_noise_alpha'"):
        trainer_kwargs(SFTStage(trainer_args={"neftune_alpha": 5}), SFTConfig)
    with pytest.raises(RecipeError, match="align sets this itself"):
        trainer_kwargs(SFTStage(trainer_args={"output_dir": "x"}), SFTConfig, output_dir="runs/x")


def test_report_to_passes_through_to_the_trl_config(write_recipe, tmp_path):
    from trl import GRPOConfig

    from align.rundir import RunDir
    from align.stages import trl_config

    recipe = load_recipe(write_recipe(sft={}, grpo={"rewards": [{"name": "length"}]}), ["run.report_to=[tensorboard]"])
    assert trl_config(SFTConfig, recipe.sft, recipe, RunDir(recipe, "sft"), has_eval=False).report_to == ["tensorboard"]
    recipe = load_recipe(write_recipe(grpo={"rewards": [{"name": "length"}]}))
    assert trl_config(GRPOConfig, recipe.grpo, recipe, RunDir(recipe, "grpo"), has_eval=False).report_to == []


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


def test_recipe_files_that_are_not_recipes(tmp_path):
    for text, message in (("- sft\n- reward\n", "this file's top level is a list"),
                          ("sft:\n  learning_rate: ${nowhere.lr}\n", "sft.learning_rate: Interpolation key 'nowhere.lr' not found")):
        path = tmp_path / "r.yaml"
        path.write_text(text)
        with pytest.raises(RecipeError, match=message.replace("$", r"\$").replace(".", r"\.")):
            load_recipe(path, [f"model.name_or_path={TINY_BASE}"])


def test_options_and_overrides_in_any_order(write_recipe, capsys):
    path = sft_recipe(write_recipe)
    assert main(["run", str(path), "--only", "sft", "sft.max_steps=0"]) == 2  # parsed: the override is checked
    assert "sft.max_steps=0: must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", str(path), "--only", "sft", "--no-such-option"])
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def test_a_local_model_path_that_does_not_exist_fails_at_once(tmp_path):
    from align.modeling import ModelLoadError, load_tokenizer
    from align.recipe import ModelConfig

    started = time.monotonic()
    with pytest.raises(ModelLoadError, match=r"no such directory .*tiny-basee\); model directories in .* with a "
                       r"similar name: tiny-base\.") as raised:
        load_tokenizer(ModelConfig(name_or_path=str(ROOT / "data" / "tiny-basee")))
    assert time.monotonic() - started < 5
    assert "arithmetic" not in str(raised.value)  # data/'s other entries are not listed
