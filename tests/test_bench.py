"""The benchmark scripts' CPU path: two steps of each stage on the tiny architecture, with the stock-TRL
baseline where there is one, and a record with every field."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).parent.parent / "bench" / "run.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_run", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("stage", ["sft", "reward", "grpo", "ppo"])
def test_two_steps_of_each_stage_give_a_full_record(bench, tmp_path, stage):
    out = tmp_path / "results.jsonl"
    extra = ["--baseline"] if stage in ("sft", "grpo") else []
    extra += ["--reward-model", "shared"] if stage in ("grpo", "ppo") else []
    extra += ["--prompts-per-step", "4"] if stage == "ppo" else []
    assert bench.main([stage, "--arch", "tiny", "--steps", "2", "--prompt-tokens", "24", "--completion-tokens", "8",
                       "--num-generations", "4", "--batch-size", "4", "--out", str(out), *extra]) == 0
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
    if extra and extra[0] == "--baseline":
        assert record["baseline_trl"]["steps"] == 2 and record["baseline_trl"]["seconds_per_step"] > 0


def test_prompts_have_the_stated_length(bench, tmp_path):
    from align.modeling import load_tokenizer, prompt_ids
    from align.recipe import ModelConfig

    bench.build_base("tiny", tmp_path / "base")
    bench.write_data(tmp_path / "p.jsonl", tmp_path / "base", 3, 40, 5, seed=0)
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(tmp_path / "base")))
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").open()]
    assert [len(prompt_ids(tokenizer, [{"role": "user", "content": r["question"]}])) for r in rows] == [40, 40, 40]
