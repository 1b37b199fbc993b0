"""The SFT stage on the shipped tiny base, 4-bit NF4 on CPU: real TRL trainer, real files, real checkpoint."""

import json

import pytest
import torch
from conftest import LEARNING_SEED, QA_HELDOUT, QA_TRAIN, TINY_BASE, few_rows, run_keeping_trainer, sft_section
from peft import PeftModel
from transformers import AutoModelForCausalLM

from align.modeling import (
    checkpointing, keep_4bit_on_the_autograd_path, load_model, load_tokenizer, prompt_ids, quantization_config,
)
from align.recipe import load_recipe
from align.rundir import RunDir
from align.stages import sft


def sft_data(tmp_path) -> dict:
    """The first 256 training rows (`few_rows`) and the whole held-out file."""
    return {"sft": {"train": str(few_rows(QA_TRAIN, tmp_path)), "eval": str(QA_HELDOUT)}}


def test_labels_cover_the_answer_only(write_recipe, tmp_path):
    recipe = load_recipe(write_recipe(data=sft_data(tmp_path), sft=sft_section()))
    tokenizer = load_tokenizer(recipe.model)
    train, held_out, _ = sft.load_data(recipe, tokenizer)
    trainer = sft.build_trainer(recipe, load_model(recipe.model), tokenizer, train, held_out, RunDir(recipe, "sft"))
    for i in range(4):
        row, example = trainer.train_dataset[i], None
        # The trainer shuffles; find the source row by its tokens.
        for candidate in train:
            ids = prompt_ids(tokenizer, candidate["prompt"])
            if row["input_ids"][: len(ids)] == ids:
                example = candidate
                break
        assert example is not None
        n_prompt = len(prompt_ids(tokenizer, example["prompt"]))
        assert all(label == -100 for label in row["labels"][:n_prompt])  # prompt and template tokens ignored
        assert row["labels"][n_prompt:] == row["input_ids"][n_prompt:]  # every answer token counts, EOS included
        assert row["labels"][-1] == tokenizer.eos_token_id
        assert tokenizer.decode(row["labels"][n_prompt:], skip_special_tokens=True).strip() == (
            example["completion"][0]["content"]
        )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()  # padding ignored too
    # TRL casts QLoRA adapters to bf16; on a CPU (fp32 compute) align keeps them in fp32.
    assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {torch.float32}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One SFT run of the quickstart data through `sft.run`, keeping the in-memory trainer for comparison."""
    tmp = tmp_path_factory.mktemp("sft")
    recipe_path = tmp / "r.yaml"
    data = {**sft_data(tmp), "answer_style": "align.arithmetic:answer_style"}
    # float32 as every test's (conftest.float32_on_every_cpu, which a module fixture does not see)
    recipe_path.write_text(json.dumps({"model": {"name_or_path": str(TINY_BASE), "compute_dtype": "float32"}, "data": data,
                                       "run": {"root": str(tmp / "runs"), "seed": LEARNING_SEED},
                                       "sft": sft_section(max_steps=30, logging_steps=5, eval_loss_rows=None)}))
    recipe = load_recipe(recipe_path)
    return (recipe, *run_keeping_trainer(sft, recipe))


@pytest.mark.slow
def test_sft_lowers_held_out_answer_loss(trained):
    """Passes on seeds 42, 1 and 2 (LEARNING_SEED; checked 2026-12-07 on the first 256 rows: after / before
    0.30-0.31 in 30 steps)."""
    _, results, _ = trained
    before, after = results["before"], results["after"]
    assert after["answer_loss"] < 0.6 * before["answer_loss"]
    assert 0 <= before["answer_accuracy"] <= after["answer_accuracy"] <= 1


@pytest.mark.slow
def test_each_answer_style_is_counted_with_its_accuracy(trained):
    """data.answer_style: the share of greedy answers of each style and their accuracy, consistent with the
    overall accuracy, and each sample's style is what the plug-in says of its answer."""
    from align.arithmetic import answer_style

    recipe, results, _ = trained
    for when in ("before", "after"):
        r = results[when]
        styles = [k.removesuffix("_fraction") for k in r if k.endswith("_fraction")]
        assert set(styles) <= {"worked", "direct"} and sum(r[f"{s}_fraction"] for s in styles) == pytest.approx(1)
        assert sum(r[f"{s}_fraction"] * r[f"{s}_accuracy"] for s in styles) == pytest.approx(r["answer_accuracy"])
    samples = [json.loads(line) for line in RunDir(recipe, "sft").samples_path.read_text().splitlines()]
    assert len(samples) == 16 and all(s["style_after"] == answer_style(s["after"]) for s in samples)
    worked = sum(s["style_after"] == "worked" for s in samples) / len(samples)
    assert worked == pytest.approx(results["after"].get("worked_fraction", 0.0))



@pytest.mark.slow
def test_the_printed_summary_says_right_or_wrong_before_each_sample_in_plain_words(trained):
    """Samples print as plain text (answers are data, not rich markup): the verdict is a word, not a style tag
    printed as it is."""
    from rich.console import Console

    from align.cli import print_summary

    _, results, _ = trained
    console = Console(width=300, record=True)
    print_summary(console, sft.summary(results))
    printed = console.export_text()
    samples = results["after"]["samples"]
    assert samples and all(f"{'right' if s['correct'] else 'wrong'} {s['prompt']} -> {s['answer'].strip()!r}"
                           in printed for s in samples)
    assert "[green]" not in printed and "[red]" not in printed

@pytest.mark.slow
def test_run_dir_has_config_lineage_metrics_and_checkpoint(trained):
    recipe, results, _ = trained
    run = RunDir(recipe, "sft")
    assert load_recipe(run.config_path).sft.max_steps == 30  # the resolved config reloads as a recipe
    lineage = json.loads(run.lineage_path.read_text())
    assert lineage["base_model"]["weights_sha256"] and lineage["parent_checkpoint"] is None
    assert [d["examples"] for d in lineage["data"]] == [256, 200]
    assert lineage["end_time"] and lineage["results"]["after"]["answer_loss"] == results["after"]["answer_loss"]
    metrics = [json.loads(line) for line in run.metrics_path.read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert all(m["step_seconds"] > 0 for m in metrics if "loss" in m)  # wall time per optimizer step
    assert [m["step"] for m in metrics if "eval_loss" in m] == [0, 30]  # before and after training
    saved = {p.name for p in run.checkpoint_path.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "chat_template.jinja"} <= saved
    assert len((run.path / "samples.jsonl").read_text().splitlines()) == 16


@pytest.mark.slow
def test_saved_adapter_reloads_with_stock_peft_and_gives_the_same_logits(trained):
    recipe, results, trainer = trained
    tokenizer = load_tokenizer(recipe.model)
    ids = torch.tensor([prompt_ids(tokenizer, [{"role": "user", "content": "What is 31 + 47?"}])])
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(input_ids=ids).logits
    base = AutoModelForCausalLM.from_pretrained(
        str(TINY_BASE), quantization_config=quantization_config(recipe.model), device_map="cpu"
    )
    # Like with like: align's layers stay on bitsandbytes' standard kernels; a stock reload on a CPU with AVX-512
    # BF16 would compute in bf16 through a fused inference kernel (README: "Loading a checkpoint without align").
    keep_4bit_on_the_autograd_path(base)
    reloaded = PeftModel.from_pretrained(base, results["checkpoint"]).eval()
    with torch.no_grad():
        actual = reloaded(input_ids=ids).logits
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    with torch.no_grad(), reloaded.disable_adapter():
        without_adapter = reloaded(input_ids=ids).logits
    assert (without_adapter - expected).abs().max() > 0.1  # the adapter is what makes the difference


def test_the_trainer_trains_on_the_tokens_the_loader_made(write_recipe, tmp_path):
    """The stage hands TRL the loader's input_ids and answer masks (qa.load tokenises as it checks): TRL keeps
    them as they are instead of tokenising the conversations its own way, in the training and the held-out set."""
    recipe = load_recipe(write_recipe(data=sft_data(tmp_path), sft=sft_section(eval_loss_rows=8)))
    tokenizer = load_tokenizer(recipe.model)
    train, held_out, _ = sft.load_data(recipe, tokenizer)
    trainer = sft.build_trainer(recipe, load_model(recipe.model), tokenizer, train, held_out, RunDir(recipe, "sft"))
    for loaded, prepared in ((train, trainer.train_dataset), (held_out.select(range(8)), trainer.eval_dataset)):
        expected = sorted((ids, tuple(t if m else -100 for t, m in zip(ids, mask)))
                          for ids, mask in zip(map(tuple, loaded["input_ids"]), loaded["completion_mask"]))
        assert sorted(zip(map(tuple, prepared["input_ids"]), map(tuple, prepared["labels"]))) == expected


def test_packing_keeps_the_answer_only_loss(write_recipe, tmp_path):
    recipe = load_recipe(write_recipe(data={"sft": {"train": str(few_rows(QA_TRAIN, tmp_path))}},
                                      sft=sft_section(packing=True, max_steps=3)))
    tokenizer = load_tokenizer(recipe.model)
    train, _, _ = sft.load_data(recipe, tokenizer)
    trainer = sft.build_trainer(recipe, load_model(recipe.model), tokenizer, train, None, RunDir(recipe, "sft"))
    row = trainer.train_dataset[0]
    assert len(row["seq_lengths"]) >= 2 and sum(row["seq_lengths"]) == len(row["input_ids"]) <= 128  # shared row
    # Each packed example's prompt is masked and its answer (with its end of turn) counted, as unpacked.
    masks = {tuple(ids): mask for ids, mask in zip(train["input_ids"], train["completion_mask"])}
    start, whole = 0, 0
    for length in row["seq_lengths"]:
        ids, labels = row["input_ids"][start:start + length], row["labels"][start:start + length]
        start += length
        if tuple(ids) in masks:  # a whole example (the row's last may be cut short)
            assert labels == [t if m else -100 for t, m in zip(ids, masks[tuple(ids)])]
            whole += 1
    assert whole >= 2
    assert trainer.train().training_loss > 0


@pytest.mark.slow
def test_the_progress_bar_shows_the_loss_and_prints_no_log_dicts(trained):
    from transformers.trainer_callback import ProgressCallback

    from align.callbacks import ProgressBar

    _, _, trainer = trained
    bars = [c for c in trainer.callback_handler.callbacks if isinstance(c, ProgressCallback)]
    assert len(bars) == 1 and isinstance(bars[0], ProgressBar)

    class Tqdm:  # what the bar is given while training
        postfix = None

        def set_postfix(self, values):
            self.postfix = values

        def write(self, text):
            raise AssertionError(f"printed {text!r}")

    bars[0].training_bar = Tqdm()
    bars[0].on_log(trainer.args, trainer.state, trainer.control, logs={"loss": 0.123456, "grad_norm": 1.0})
    assert bars[0].training_bar.postfix == {"loss": "0.1235"}
    bars[0].training_bar = None


def test_checkpointing_every_second_layer_recomputes_half_the_layers_and_trains_the_same(write_recipe, tmp_path):
    """activation_checkpointing_every_n_layers reaches the layers through the trainer, and checkpointing only
    trades memory for compute: the losses of the same steps are those of checkpointing every layer."""
    losses, flags = {}, {}
    for every in (1, 2):
        section = sft_section(max_steps=3, logging_steps=1, activation_checkpointing=True,
                              activation_checkpointing_every_n_layers=every, eval_generations=0)
        recipe = load_recipe(write_recipe(name=f"every{every}", data=sft_data(tmp_path), sft=section))
        tokenizer = load_tokenizer(recipe.model)
        train, held_out, _ = sft.load_data(recipe, tokenizer)
        model = load_model(recipe.model, activation_checkpointing=checkpointing(recipe.sft))
        trainer = sft.build_trainer(recipe, model, tokenizer, train, held_out, RunDir(recipe, "sft"))
        trainer.train()
        flags[every] = [layer.gradient_checkpointing for layer in model.model.layers]
        losses[every] = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert flags == {1: [True, True, True, True], 2: [True, False, True, False]}
    assert len(losses[1]) == 3 and losses[2] == pytest.approx(losses[1], rel=1e-5)
