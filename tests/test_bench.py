"""The benchmark script's CPU path: two GRPO steps on the tiny architecture, a record with every field."""

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


def test_grpo_record(bench, tmp_path):
    out = tmp_path / "results.jsonl"
    assert bench.main(["grpo", "--arch", "tiny", "--steps", "2", "--prompt-tokens", "24", "--completion-tokens", "8",
                       "--num-generations", "4", "--reward-model", "shared", "--out", str(out)]) == 0
    (record,) = [json.loads(line) for line in out.open()]
    assert record["stage"] == "grpo" and record["arch"] == "tiny" and record["steps"] == 2
    assert record["prompt_tokens"] == 24 and record["completion_tokens"] == 8 and record["reward_model"] == "shared"
    assert record["seconds_per_step"] > 0 and record["tokens_per_s"] > record["generated_tokens_per_s"] > 0
    assert record["device"] == "cpu" and record["peak_allocated_gib"] is None  # no CUDA here
    assert set(record["versions"]) == {"torch", "transformers", "trl", "peft", "bitsandbytes"}


def test_prompts_have_the_stated_length(bench, tmp_path):
    from align.modeling import load_tokenizer, prompt_ids
    from align.recipe import ModelConfig

    bench.build_base("tiny", tmp_path / "base")
    bench.write_prompts(tmp_path / "p.jsonl", tmp_path / "base", 3, 40, seed=0)
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(tmp_path / "base")))
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").open()]
    assert [len(prompt_ids(tokenizer, [{"role": "user", "content": r["question"]}])) for r in rows] == [40, 40, 40]
