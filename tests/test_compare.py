"""`align compare`: metrics on hand-made cases, a checkpoint against itself, the report files, clear errors before
any generation, and the HTML in headless Chromium when it is installed."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import QA_HELDOUT, ROOT, TINY_BASE, finished, first_rows

from align import compare as compare_module
from align.compare import (
    Checkpoint, CompareError, bootstrap, common_system_prompt, compare, paired_differences, resolve, summarise, win_rate,
)
from align.data.files import DataError
from align.rundir import sha256_of


def test_win_rate_counts_ties_as_half_and_apart():
    assert win_rate(np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.0, 2.0, 5.0, 4.0])) == {
        "win_rate": 0.5, "wins": 0.25, "ties": 0.5, "losses": 0.25}
    same = np.array([0.3, -1.0, 2.0])
    assert win_rate(same, same) == {"win_rate": 0.5, "wins": 0.0, "ties": 1.0, "losses": 0.0}


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_more_prompts():
    rng = np.random.default_rng(0)
    small, large = rng.normal(1.0, 1.0, 50), rng.normal(1.0, 1.0, 2000)
    lo_s, hi_s = bootstrap(small, np.mean)
    lo_l, hi_l = bootstrap(large, np.mean)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 3  # ~ 1/sqrt(n)
    constant = np.full(20, 0.25)
    assert bootstrap(constant, np.mean) == (0.25, 0.25)


def test_summary_of_a_checkpoint_against_itself():
    rewards, tokens = np.array([[0.1], [0.5], [-0.2]]), np.array([[3.0], [5.0], [4.0]])
    result = summarise(rewards, rewards, np.zeros((3, 1)), np.array([[1.0], [0.0], [1.0]]), tokens, tokens * 4, seed=0)
    assert result["win_rate"]["win_rate"] == 0.5 and result["win_rate"]["ties"] == 1.0
    assert result["win_rate"]["ci95"] == (0.5, 0.5)
    assert result["kl"]["mean"] == 0.0 and result["accuracy"]["mean"] == pytest.approx(2 / 3)
    assert result["length_tokens"] == 4.0 and result["length_chars"] == 16.0


def test_a_paired_interval_finds_a_gain_that_separate_intervals_hide():
    """200 prompts, a checkpoint right on the same 40% as another plus 10% more: the two accuracies' own intervals
    (about +-7 points each) overlap, the paired difference's interval is above zero."""
    rng = np.random.default_rng(42)
    earlier = (rng.random((200, 1)) < 0.4).astype(float)
    later = earlier.copy()
    later[np.flatnonzero(earlier[:, 0] == 0)[:20]] = 1.0  # 20 more prompts right, none lost
    (pair,) = paired_differences({"sft": earlier, "grpo": later}, seed=0)
    assert pair["checkpoint"] == "grpo" and pair["minus"] == "sft" and pair["difference"] == pytest.approx(0.1)
    low, high = pair["ci95"]
    assert 0 < low < 0.1 < high
    assert bootstrap(later, np.mean)[0] < bootstrap(earlier, np.mean)[1]  # the separate intervals overlap


def test_paired_differences_cover_every_earlier_checkpoint_with_the_sign_of_later_minus_earlier():
    ones, zeros = np.ones((10, 2)), np.zeros((10, 2))
    pairs = paired_differences({"base": zeros, "sft": ones, "grpo": ones}, seed=0)
    assert [(p["checkpoint"], p["minus"], p["difference"]) for p in pairs] == [
        ("sft", "base", 1.0), ("grpo", "base", 1.0), ("grpo", "sft", 0.0)]
    assert pairs[2]["ci95"] == (0.0, 0.0)


@pytest.mark.parametrize("positions", ["rotary", "learned absolute"])
def test_answer_log_probabilities_are_the_sums_over_each_answer_s_own_tokens(positions):
    """Prompts and answers of different lengths in one batch (left-padded prompts, right-padded answers): each
    answer's log-probability is the sum, over its tokens only, of log-softmax of the logits at the position before
    each token, as one unpadded sequence alone computes it at temperature 1 and 0.7. Each real token keeps the
    position it has alone (and in generation), which a model with learned absolute positions (GPT-2's) shows."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from align.compare import answer_logprobs
    from align.modeling import load_model, load_tokenizer, prompt_ids
    from align.recipe import ModelConfig, Quantization

    cfg = ModelConfig(name_or_path=str(TINY_BASE), quantization=Quantization.none)
    tokenizer = load_tokenizer(cfg)
    if positions == "rotary":
        model = load_model(cfg)
    else:
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2))
    model.eval()
    prompts = [[{"role": "user", "content": q}] for q in ("What is 2 + 2?", "Compute 118 + 300, please.", "1 + 1?")]
    answers = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in ("4", "118 + 300 = 418.", "2. The answer")]
    for temperature in (1.0, 0.7):
        batched = answer_logprobs(model, tokenizer, prompts, answers, batch_size=3, temperature=temperature)
        alone = []
        for prompt, answer in zip(prompts, answers):
            ids = torch.tensor([prompt_ids(tokenizer, prompt) + answer])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float() / temperature, -1)
            start = ids.shape[1] - len(answer)
            alone.append(sum(logprobs[start - 1 + i, token].item() for i, token in enumerate(answer)))
        assert batched == pytest.approx(alone, abs=1e-4) and len({round(x, 3) for x in alone}) == 3


def test_checkpoints_answer_under_the_system_prompt_their_run_trained_with(sft_adapter):
    from align.recipe import ModelConfig, load_recipe, to_yaml

    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", ["data.system_prompt=Answer with the sum."])
    (sft_adapter.parent / "config.yaml").write_text(to_yaml(recipe))
    trained = resolve(f"sft={sft_adapter}")
    base = resolve(f"base={TINY_BASE}")
    assert trained.system_prompt == "Answer with the sum." and not base.from_run
    assert common_system_prompt(None, [base, trained]) == "Answer with the sum."
    assert common_system_prompt("", [base, trained]) is None  # '' : the template's own, whatever the runs used
    other = Checkpoint("other", "x", ModelConfig(name_or_path="x"), system_prompt=None, from_run=True)
    with pytest.raises(CompareError, match="different system prompts.*--system-prompt"):
        common_system_prompt(None, [trained, other])
    assert common_system_prompt("Be brief.", [trained, other]) == "Be brief."


@pytest.fixture
def eval_file(tmp_path):
    return first_rows(QA_HELDOUT, 12, tmp_path / "eval.jsonl")


def test_a_checkpoint_against_itself_wins_half_by_ties_with_zero_kl(sft_adapter, reward_checkpoint, eval_file,
                                                                    tmp_path):
    out = tmp_path / "report"
    results = compare([f"a={sft_adapter}", f"b={sft_adapter}", f"base={TINY_BASE}"], str(eval_file), out=out,
                      reward=str(reward_checkpoint), reference=str(sft_adapter), max_new_tokens=12, batch_size=8,
                      samples=3, answers_per_prompt=2)
    a, b, base = (results["checkpoints"][n]["metrics"] for n in ("a", "b", "base"))
    assert a["win_rate"]["win_rate"] == 0.5 and a["win_rate"]["ties"] == 1.0  # a is the baseline
    assert b["win_rate"] == a["win_rate"] and b["reward"] == a["reward"]  # same seed, same answers
    assert a["kl"]["mean"] == pytest.approx(0.0, abs=1e-5) and b["kl"]["mean"] == pytest.approx(0.0, abs=1e-5)
    assert base["kl"]["mean"] > 0.01  # the base samples answers the SFT adapter (the reference) finds unlikely
    saved = json.loads((out / "results.json").read_text())
    # the base's wins and ties are its answers' rewards against the baseline's, answer by answer
    base_rewards, a_rewards = (np.array(saved["checkpoints"][n]["rewards"]) for n in ("base", "a"))
    assert base["win_rate"]["wins"] == pytest.approx(np.mean(base_rewards > a_rewards))
    assert base["win_rate"]["ties"] == pytest.approx(np.mean(base_rewards == a_rewards))
    for metrics in (a, base):
        assert metrics["reward"]["ci95"][0] <= metrics["reward"]["mean"] <= metrics["reward"]["ci95"][1]
        assert "accuracy" in metrics and 0 < metrics["length_tokens"] <= 12

    assert saved["eval"]["prompts"] == 12 and len(saved["eval"]["sha256"]) == 64
    assert saved["settings"]["baseline"] == "a" and saved["settings"]["accuracy"] == "exact_match"
    assert set(saved["checkpoints"]) == {"a", "b", "base"}
    assert saved["checkpoints"]["a"]["adapter"] == str(sft_adapter)
    assert len(saved["checkpoints"]["base"]["rewards"]) == 24 and len(saved["samples"]) == 3  # 12 prompts x 2
    assert set(saved["samples"][0]["answers"]) == {"a", "b", "base"} and "reference" in saved["samples"][0]

    page = (out / "report.html").read_text()
    assert all(f"<td>{name}</td>" in page for name in ("a", "b", "base"))
    assert len(re.findall(r'<img alt="[a-z_]+" src="data:image/png;base64,', page)) == 4
    assert not re.search(r"https?://", page) and "<script" not in page and "<link" not in page
    markdown = (out / "report.md").read_text()
    assert "| checkpoint | reward | win rate vs baseline |" in markdown and "![reward_vs_kl](reward_vs_kl.png)" in markdown


@pytest.mark.parametrize("merged", [True, False])
def test_adapters_of_one_base_load_it_once_and_answer_as_each_loaded_alone(sft_adapter, eval_file, tmp_path,
                                                                            monkeypatch, merged):
    """Two adapters of the tiny base, the base itself and their reference (one of the two) share one loaded copy
    of the base: one load_model call, and each checkpoint's greedy answers are those it gives on a copy of its own
    (so the active adapter is the checkpoint's, and none for the base), with merged generation (a CPU's default)
    and without it (a GPU's: the LoRA layers run token by token)."""
    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    import align.generation
    import align.modeling
    from align.data import prompts as prompt_data
    from align.generation import generate
    from align.modeling import load_tokenizer

    use_merged = align.generation.use_merged_generation
    monkeypatch.setattr(align.generation, "use_merged_generation", lambda model, setting: use_merged(model, merged))

    other = tmp_path / "other"  # the SFT adapter with its LoRA updates negated: other weights, same base
    shutil.copytree(sft_adapter, other)
    weights = load_file(other / "adapter_model.safetensors")
    save_file({k: -v if "lora_B" in k else v for k, v in weights.items()}, other / "adapter_model.safetensors")
    loads = []
    load_model = align.modeling.load_model
    monkeypatch.setattr(align.modeling, "load_model", lambda cfg, **kw: loads.append(cfg) or load_model(cfg, **kw))
    specs = [f"sft={sft_adapter}", f"other={other}", f"base={TINY_BASE}"]
    results = compare(specs, str(eval_file), out=tmp_path / "out", reference=str(sft_adapter), temperature=0,
                      max_new_tokens=12, batch_size=8, samples=12)
    assert len(loads) == 1
    kl = {name: results["checkpoints"][name]["metrics"]["kl"]["mean"] for name in ("sft", "other", "base")}
    assert kl["sft"] == pytest.approx(0.0, abs=1e-5) and kl["other"] > 0.01 and kl["base"] > 0.01

    cfg = resolve(specs[0]).model
    tokenizer = load_tokenizer(cfg)
    prompts = prompt_data.load(str(eval_file), compare_module.DataConfig(), tokenizer, max_length=1 << 30)[0]["prompt"]
    alone = {"base": load_model(cfg)}
    alone.update({name: PeftModel.from_pretrained(load_model(cfg), str(path))
                  for name, path in (("sft", sft_adapter), ("other", other))})
    for name, model in alone.items():
        answers = [sample["answers"][name] for sample in results["samples"]]
        assert len(answers) == 12 and answers == generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=8)
    assert len({tuple(s["answers"][n] for s in results["samples"]) for n in alone}) == 3  # three different policies


def rl_stage(tmp_path, parent: Path, **lineage) -> Path:
    """A finished GRPO stage (its checkpoint a copy of `parent`) that started from `parent`, as RunDir records it."""
    stage = tmp_path / "runs" / "x" / "grpo"
    shutil.copytree(parent, stage / "checkpoint")
    finished(stage / "checkpoint", run="x", stage="grpo", parent_checkpoint=str(parent),
             parent_sha256=sha256_of(parent), **lineage)
    return stage


def test_an_rl_checkpoint_is_measured_against_the_policy_it_started_from(tmp_path, sft_adapter):
    stage = rl_stage(tmp_path, sft_adapter)
    checkpoint = resolve(str(tmp_path / "runs" / "x"))
    assert checkpoint.name == "x/grpo" and checkpoint.adapter == stage / "checkpoint"
    assert checkpoint.reference.adapter == sft_adapter
    assert resolve(f"sft={sft_adapter}").reference is None  # no reference implied for SFT


def test_a_reference_that_changed_since_or_cannot_be_checked_stops_compare(tmp_path, sft_adapter, eval_file):
    stage = rl_stage(tmp_path, sft_adapter)
    recorded = sha256_of(sft_adapter)
    weights = sft_adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + bytes(8))  # the SFT stage trained again, or edited
    with pytest.raises(CompareError, match=rf"x/grpo: its parent checkpoint {sft_adapter} changed since the stage "
                       rf"started from it \(sha256 {recorded[:12]} then, {sha256_of(sft_adapter)[:12]} now"):
        resolve(str(stage))
    assert resolve(str(stage), with_reference=False).reference is None  # what --reference does first
    lineage = json.loads((stage / "lineage.json").read_text())
    (stage / "lineage.json").write_text(json.dumps({**lineage, "parent_checkpoint": "runs/x/sft/checkpoint",
                                                    "parent_sha256": None}))  # as run dirs before the digest
    with pytest.raises(CompareError, match=r"recorded as runs/x/sft/checkpoint without a digest .* Pass --reference"):
        compare([str(stage)], str(eval_file), out=tmp_path / "out")


def test_a_run_dir_whose_base_is_not_the_one_it_trained_on_is_refused(tmp_path, sft_adapter, capsys):
    from align.cli import main

    stage = rl_stage(tmp_path, sft_adapter, base_model={"weights_sha256": "0" * 64})
    (stage / "config.yaml").write_text(f"model:\n  name_or_path: {TINY_BASE}\n")
    with pytest.raises(CompareError, match=r"trained on a base whose weights had sha256 0{64}, and .*tiny-base .* "
                                           r"now has [0-9a-f]{64}: another model"):
        resolve(str(stage))
    assert main(["export", str(stage), "--out", str(tmp_path / "exported")]) == 2
    assert "trained on a base whose weights had sha256 0000" in capsys.readouterr().err
    assert not (tmp_path / "exported").exists()


def test_bad_inputs_fail_before_any_generation(tmp_path, sft_adapter, eval_file, monkeypatch):
    import align.modeling

    monkeypatch.setattr(align.modeling, "load_model", lambda *a: pytest.fail("a model was loaded"))
    with pytest.raises(CompareError, match=r"nowhere/run: no such run dir, checkpoint or model directory"):
        compare([str(sft_adapter), "nowhere/run"], str(eval_file), out=tmp_path / "out")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(CompareError, match=r"empty_run: .*no LoRA checkpoint here"):
        compare([str(tmp_path / "empty_run")], str(eval_file), out=tmp_path / "out")
    no_prompts = tmp_path / "no_prompts.jsonl"
    no_prompts.write_text('{"question": "What is 1 + 2?", "answer": "3"}\n{"question": "", "answer": "4"}\n')
    with pytest.raises(DataError, match=r"no_prompts.jsonl:2: field 'question' is empty"):
        compare([str(sft_adapter)], str(no_prompts), out=tmp_path / "out")
    with pytest.raises(CompareError, match="same name"):
        compare([f"x={sft_adapter}", f"x={TINY_BASE}"], str(eval_file), out=tmp_path / "out")
    with pytest.raises(CompareError, match="--baseline nope: not one of the checkpoints"):
        compare([str(sft_adapter)], str(eval_file), out=tmp_path / "out", baseline="nope")
    with pytest.raises(CompareError, match="--answers-per-prompt 4: .* 1 with greedy decoding"):
        compare([str(sft_adapter)], str(eval_file), out=tmp_path / "out", answers_per_prompt=4, temperature=0)
    with pytest.raises(CompareError, match="--answer-column ref: the eval file has no such column"):
        compare([str(sft_adapter)], str(eval_file), out=tmp_path / "out", answer_column="ref")


@pytest.mark.skipif(shutil.which("chromium") is None and not os.environ.get("ALIGN_REQUIRE_BROWSER"),
                    reason="headless Chromium is not installed (.ci/run installs it)")
def test_report_renders_in_headless_chromium(sft_adapter, reward_checkpoint, eval_file, tmp_path):
    out = tmp_path / "report"
    compare([f"a={sft_adapter}", f"base={TINY_BASE}"], str(eval_file), out=out, reward=str(reward_checkpoint),
            reference=str(sft_adapter), max_new_tokens=8, batch_size=12, samples=2)
    shot = tmp_path / "shot.png"
    result = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                             f"--screenshot={shot}", "--window-size=1200,2400", f"file://{out / 'report.html'}"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert shot.stat().st_size > 20_000  # a page with a table and four plots, not a blank one
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                          "--dump-dom", f"file://{out / 'report.html'}"], capture_output=True, text=True, timeout=120)
    assert dom.stdout.count("data:image/png;base64,") == 4 and "<td>base</td>" in dom.stdout


def test_compare_command_prints_the_table_and_writes_the_report(sft_adapter, reward_checkpoint, eval_file, tmp_path,
                                                                capsys):
    from align.cli import main

    out = tmp_path / "cmp"
    assert main(["compare", f"sft={sft_adapter}", f"base={TINY_BASE}", "--eval", str(eval_file), "--reward",
                 str(reward_checkpoint), "--max-new-tokens", "8", "--out", str(out), "--temperature", "0"]) == 0
    printed = capsys.readouterr().out
    assert "12 prompts from" in printed and "sft" in printed and "base" in printed and "report.html" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["temperature"] == 0 and results["settings"]["baseline"] == "sft"
    (pair,) = results["paired_accuracy"]
    assert (pair["checkpoint"], pair["minus"]) == ("base", "sft")
    assert "accuracy differences on the same prompts" in printed
    assert "95% interval (paired)" in (out / "report.md").read_text() and "(paired)" in (out / "report.html").read_text()


def test_each_answer_style_has_its_share_and_accuracy(sft_adapter, eval_file, tmp_path, monkeypatch):
    """--answer-style: answers with a 9 are one style, the others another; with accuracy 'has a 9', the styles'
    accuracies are 100% and 0% and their shares those of the answers."""
    (tmp_path / "my_checks.py").write_text(
        "def has_nine(prompts, completions, **columns):\n"
        "    return [1.0 if '9' in c[0]['content'] else 0.0 for c in completions]\n"
        "def nines(text):\n"
        "    return 'nine' if '9' in text else 'other'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    results = compare([f"sft={sft_adapter}"], str(eval_file), out=tmp_path / "out", accuracy="my_checks:has_nine",
                      answer_style="my_checks:nines", max_new_tokens=6, temperature=0, samples=12)
    answers = [s["answers"]["sft"] for s in results["samples"]]
    share = sum("9" in a for a in answers) / len(answers)
    assert 0 < share < 1
    styles = results["checkpoints"]["sft"]["metrics"]["styles"]
    assert styles["nine"]["fraction"]["mean"] == pytest.approx(share) and styles["nine"]["accuracy"] == 1.0
    assert styles["other"]["fraction"]["mean"] == pytest.approx(1 - share) and styles["other"]["accuracy"] == 0.0
    header = next(line for line in (tmp_path / "out" / "report.md").read_text().splitlines() if "checkpoint" in line)
    assert header.endswith("| nine share | nine accuracy | other share | other accuracy |")
    with pytest.raises(Exception, match="--answer-style=my_checks:nothing: module 'my_checks'.*has no 'nothing'"):
        compare([f"sft={sft_adapter}"], str(eval_file), out=tmp_path / "out2", answer_style="my_checks:nothing")


def test_a_plugin_check_gives_the_accuracy(sft_adapter, eval_file, tmp_path, monkeypatch):
    (tmp_path / "my_checks.py").write_text(
        "def has_nine(prompts, completions, **columns):\n"
        "    return [1.0 if '9' in c[0]['content'] else 0.0 for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    results = compare([f"sft={sft_adapter}"], str(eval_file), out=tmp_path / "out", accuracy="my_checks:has_nine",
                      max_new_tokens=6, temperature=0, samples=12)
    answers = [s["answers"]["sft"] for s in results["samples"]]  # all 12: greedy, one answer each
    expected = sum("9" in a for a in answers) / len(answers)
    assert 0 < expected < 1  # a check that tells answers apart
    assert results["checkpoints"]["sft"]["metrics"]["accuracy"]["mean"] == pytest.approx(expected)
    assert "has_nine" in results["settings"]["accuracy"]
