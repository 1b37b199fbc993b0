"""The benchmark scripts' CPU path: two steps of each stage on the tiny architecture, with the stock-TRL
baseline where there is one, and a record with every field; a recipe's sizes; the results table."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).parent.parent / "bench"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return load("run")


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "reward", "grpo", "ppo"])
def test_two_steps_of_each_stage_give_a_full_record(bench, tmp_path, monkeypatch, stage):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # --device cpu sets it: undone after the test
    out = tmp_path / "results.jsonl"
    extra = ["--baseline"] if stage != "ppo" else []  # TRL has no PPOTrainer
    extra += ["--reward-model", "shared"] if stage in ("grpo", "ppo") else []
    extra += ["--prompts-per-step", "4"] if stage == "ppo" else []
    assert bench.main([stage, "--arch", "tiny", "--device", "cpu", "--steps", "2", "--prompt-tokens", "24",
                       "--completion-tokens", "8", "--num-generations", "4", "--batch-size", "4", "--out", str(out),
                       *extra]) == 0
    (record,) = [json.loads(line) for line in out.open()]
    assert record["stage"] == stage and record["arch"] == "tiny" and record["steps"] == 2
    assert record["prompt_tokens"] == 24 and record["completion_tokens"] == 8
    assert record["seconds_per_step"] > 0 and record["tokens_per_s"] > 0
    assert record["device"] == "cpu" and record["peak_allocated_gib"] is None  # no CUDA here
    assert set(record["versions"]) == {"torch", "transformers", "trl", "peft", "bitsandbytes"}
    if stage in ("grpo", "ppo"):
        assert record["reward_model"] == "shared" and record["tokens_per_s"] > record["generated_tokens_per_s"] > 0
    else:
        assert record["matmul_params"] > 0 and record["mfu"] is None  # no known peak FLOP/s for a CPU
    if stage != "ppo":
        baseline = record["baseline_trl"]
        assert baseline["steps"] == 2 and baseline["seconds_per_step"] > 0 and baseline["tokens_per_s"] > 0
        if stage == "grpo":  # generated tokens per step, from the lengths TRL logged: 4 completions of <= 8 tokens
            for run in (record, baseline):
                assert 0 < run["generated_tokens_per_s"] * run["seconds_per_step"] <= 4 * 8 * 1.01
        else:
            assert set(baseline) >= {"mfu", "peak_allocated_gib"}


def test_a_recipe_sizes_the_run(bench, tmp_path):
    """--recipe: the stage section's batch and max_length, every conversation as long as it allows."""
    out, quickstart = tmp_path / "results.jsonl", BENCH.parent / "recipes" / "quickstart.yaml"
    assert bench.main(["sft", "--arch", "tiny", "--recipe", str(quickstart), "--steps", "2", "--out", str(out)]) == 0
    (record,) = [json.loads(line) for line in out.open()]
    assert record["recipe"] == str(quickstart)
    assert record["sequence_tokens"] == 128 and record["batch_size"] == 16  # quickstart's sft section
    assert record["activation_checkpointing"] is False


def test_ppo_has_no_baseline_to_compare_with(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["ppo", "--arch", "tiny", "--baseline"])
    assert "no PPOTrainer" in capsys.readouterr().err


def test_the_table_puts_align_beside_the_baseline(tmp_path, capsys):
    record = {"arch": "qwen2.5-1.5b", "stage": "sft", "device": "NVIDIA H100 80GB HBM3", "seconds_per_step": 0.5,
              "tokens_per_s": 8000.0, "mfu": 0.077, "peak_allocated_gib": 2.0, "overrides": ["sft.x=1"],
              "baseline_trl": {"seconds_per_step": 0.4, "tokens_per_s": 10000.0, "mfu": 0.096,
                               "peak_allocated_gib": 2.5}}
    ppo = {"arch": "tiny", "stage": "ppo", "device": "cpu", "seconds_per_step": 1.0, "tokens_per_s": 900.0,
           "peak_allocated_gib": None, "overrides": [], "recipe": "recipes/quickstart.yaml",
           "activation_checkpointing": False}
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps(record) + "\n" + json.dumps(ppo) + "\n")
    assert load("table").main([str(results)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "2 runs on NVIDIA H100 80GB HBM3, cpu" in lines[0]
    sft_row, ppo_row = (line.split(" | ") for line in lines[-2:])
    assert sft_row[2:12] == ["2.00", "0.500", "8,000", "7.7%", "2.50", "0.400", "10,000", "9.6%", "0.80x", "0.80x"]
    assert sft_row[12] == "`sft.x=1` |"
    assert ppo_row[2:12] == ["-", "1.000", "900", "-", "-", "-", "-", "-", "-", "-"]
    assert ppo_row[12] == "sized by recipes/quickstart.yaml, no activation checkpointing |"


def test_prompts_have_the_stated_length(bench, tmp_path):
    from align.modeling import load_tokenizer, prompt_ids
    from align.recipe import ModelConfig

    bench.build_base("tiny", tmp_path / "base")
    bench.write_data(tmp_path / "p.jsonl", tmp_path / "base", 3, 40, 5, seed=0)
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(tmp_path / "base")))
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").open()]
    assert [len(prompt_ids(tokenizer, [{"role": "user", "content": r["question"]}])) for r in rows] == [40, 40, 40]


@pytest.mark.slow
def test_phases_of_a_grpo_step_old_and_new_add_up_to_the_step(tmp_path, capsys):
    """bench/phases.py on the tiny quickstart model: every phase a GRPO step is made of is timed, the FLOP/s of
    the phases with model tokens are a fraction of the measured matmul peak, and old and new are both recorded."""
    phases = load("phases")
    out = tmp_path / "phases.jsonl"
    recipe = Path(__file__).parent.parent / "recipes" / "quickstart.yaml"
    assert phases.main(["--recipe", str(recipe), "--stages", "grpo", "--steps", "2", "--eval-prompts", "2",
                        "--old-set", "model.merged_generation=true", "--out", str(out),
                        "grpo.per_device_train_batch_size=8", "grpo.num_generations=4"]) == 0
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["peak_flops"]["float32"] > 0 and record["matmul_params"] > 0
    for run in (record["new"], record["old"]):
        seconds = run["seconds_per_step"]
        assert run["steps"] == 2 and {"generation", "log-probs", "forward+backward", "optimizer"} <= {
            p for p, s in seconds.items() if s > 0}
        assert sum(seconds.values()) == pytest.approx(run["step_seconds"])
        assert run["evaluation_seconds"] > 0 and run["evaluated_prompts"] == 2
        for phase in ("generation", "log-probs", "forward+backward"):
            assert 0 < run["flops_per_s"][phase] < 2 * record["peak_flops"]["float32"]
    assert "grpo: 2 steps" in capsys.readouterr().out
