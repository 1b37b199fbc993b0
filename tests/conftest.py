import collections
import csv
import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from align.recipe import load_recipe

# Tests never reach the Hugging Face Hub: every model and tokenizer is local.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

ROOT = Path(__file__).resolve().parents[1]
TINY_BASE = ROOT / "data" / "tiny-base"
QA_TRAIN = ROOT / "data" / "arithmetic" / "sft_train.jsonl"
QA_HELDOUT = ROOT / "data" / "arithmetic" / "sft_heldout.jsonl"
PREF_TRAIN = ROOT / "data" / "arithmetic" / "preference_train.jsonl"
PREF_HELDOUT = ROOT / "data" / "arithmetic" / "preference_heldout.jsonl"
# The seed of the tests whose pass depends on learning (a loss falls, a reward rises, accuracy passes a bar), set
# in their recipes. Each names the seeds it was checked on; ALIGN_LEARNING_SEED=1 pytest ... checks another.
LEARNING_SEED = int(os.environ.get("ALIGN_LEARNING_SEED", "42"))


def pytest_configure(config):
    """The test process runs stages in-process as the align command runs them: with glibc keeping freed memory
    (`align.memory.keep_freed_memory`, which the command calls first). Under pytest-xdist (`-n N`, as .ci/run
    runs the suite) each worker gets its share of the cores, for its own torch ops and the align processes its
    tests start: N workers each spinning up every core would fight over them. Most tests train a 1M-parameter
    model, where a second thread gains little and a second worker doubles the work done."""
    from align.memory import keep_freed_memory

    keep_freed_memory()
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers:
        import torch

        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


@pytest.hookimpl(wrapper=True)
def pytest_collection(session):
    """The test modules import torch, transformers, TRL and PEFT as they are collected: with the garbage collector
    off, then frozen, as the align command imports them (`pytest --collect-only`: 8.6-8.7 s -> 5.6-6.3 s)."""
    from align.memory import imports_left_out_of_garbage_collection

    with imports_left_out_of_garbage_collection():
        return (yield)


def pytest_collection_modifyitems(config, items):
    """Files marked slow as a whole (the real model, two-process runs) run first, then files with some slow tests,
    then the rest, each group's files with the most tests first: under pytest-xdist each file goes to one worker
    (`--dist loadfile`: its module fixtures are trained once), and the longest first keeps one worker from finishing
    minutes after the other. (xdist orders files by their number of tests alone unless told
    `--no-loadscope-reorder`, as .ci/run tells it.)"""
    def whole_file_slow(item) -> bool:
        marks = getattr(item.module, "pytestmark", [])
        return any(mark.name == "slow" for mark in (marks if isinstance(marks, list) else [marks]))

    with_slow_tests = {item.path for item in items if item.get_closest_marker("slow")}
    tests_in = collections.Counter(item.path for item in items)
    items.sort(key=lambda item: (not whole_file_slow(item), item.path not in with_slow_tests, -tests_in[item.path]))


@pytest.fixture(scope="session", autouse=True)
def imports_frozen_before_the_first_test():
    """What the stages import is moved out of the garbage collector's reach before the first test, as the align
    command does before its first model: a test process runs hundreds of stages, and test_pipeline's
    skipped-and-rerun test alone took 20.5 s without this and 15.3 s with it."""
    from align.memory import imports_left_out_of_garbage_collection
    from align.registry import STAGES

    with imports_left_out_of_garbage_collection():
        for stage in STAGES:
            stage.module  # imports it


@pytest.fixture(autouse=True)
def float32_on_every_cpu(monkeypatch):
    """model.compute_dtype auto is bfloat16 on CPUs with AMX and float32 on others: the tests' figures must not
    depend on which CPU runs them, so in-process they see a CPU without AMX (and write_recipe's recipes, which
    subprocesses read, say float32). The bfloat16 path is tested by name (tests/test_precision.py)."""
    import align.modeling

    monkeypatch.setattr(align.modeling, "cpu_has_amx_bf16", lambda: False)


@pytest.fixture
def write_recipe(tmp_path):
    """Writes a recipe YAML under tmp_path (runs go to tmp_path/runs) and returns its path."""
    return recipe_writer(tmp_path)


def recipe_writer(directory: Path):
    """`write_recipe` for `directory` (a wider-scoped fixture's own)."""

    def write(name: str = "test", **sections) -> Path:
        recipe = {"model": {"name_or_path": str(TINY_BASE), "compute_dtype": "float32"},
                  "run": {"root": str(directory / "runs")}}
        for key, value in sections.items():
            recipe[key] = {**recipe.get(key, {}), **value}
        path = directory / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        return path

    return write


def sft_section(**overrides):
    """A few seconds of SFT on the tiny base; held-out answer loss on the first 32 rows of the eval file."""
    return {
        "learning_rate": 3e-3,
        "max_steps": 40,
        "per_device_train_batch_size": 16,
        "per_device_eval_batch_size": 64,
        "max_length": 128,
        "activation_checkpointing": False,
        "logging_steps": 10,
        "eval_generations": 16,
        "eval_loss_rows": 32,
        "max_new_tokens": 24,
        **overrides,
    }


@pytest.fixture(scope="session")
def tokenizer():
    from align.modeling import load_tokenizer
    from align.recipe import ModelConfig

    return load_tokenizer(ModelConfig(name_or_path=str(TINY_BASE)))


def first_rows(source: Path, n: int, out: Path) -> Path:
    """The first `n` rows of the .jsonl file `source`, written to `out` (a test that only needs a held-out set to
    exist, or a small one, would otherwise spend most of its time evaluating all of them). Returns `out`."""
    out.write_text("".join(source.read_text().splitlines(keepends=True)[:n]))
    return out


def few_rows(source: Path, tmp: Path) -> Path:
    """The first 256 rows of `source`, written in `tmp`, for a test's training file: checking and tokenising all
    2,000-3,000 rows of an arithmetic file took longer than the few steps most tests train (a learning test that
    reads them states the seeds its bar was re-checked on)."""
    return first_rows(source, 256, tmp / f"first_rows_of_{source.name}")


def write_rows(path: Path, rows: list[dict]) -> Path:
    """`rows` as a data file in the format of path's suffix (no suffix: a save_to_disk directory)."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        from datasets import Dataset

        Dataset.from_list(rows).save_to_disk(str(path))
    return path


def run_keeping_trainer(stage, recipe):
    """`stage.run(recipe)` as a user runs it, also returning the in-memory trainer it built."""
    captured = {}
    build = stage.build_trainer

    def keep(*args, **kwargs):
        captured["trainer"] = build(*args, **kwargs)
        return captured["trainer"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stage, "build_trainer", keep)
        results = stage.run(recipe)
    return results, captured["trainer"]


@pytest.fixture
def sft_adapter(tmp_path):
    """A saved causal-LM LoRA adapter with non-zero weights, standing in for the SFT stage's checkpoint."""
    return make_sft_adapter(tmp_path / "runs" / "test" / "sft" / "checkpoint")


def make_sft_adapter(path: Path) -> Path:
    """`sft_adapter` at `path` (a module-scoped fixture's own)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(TINY_BASE)),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.1)
    model.save_pretrained(str(path))
    return finished(path)


def finished(checkpoint: Path, **lineage) -> Path:
    """Makes `checkpoint` its stage's finished result, as the stage leaves it: a lineage.json beside it with a
    run_id and an end_time, and the manifest that names that run. Returns `checkpoint`."""
    from align.rundir import write_manifest

    stage_dir = checkpoint.parent
    record = {"stage": stage_dir.name, "run": stage_dir.parent.name, "run_id": "fixture", "start_time": "2026-01-01",
              "end_time": "2026-01-01", "results": {}, **lineage}
    (stage_dir / "lineage.json").write_text(json.dumps(record))
    write_manifest(checkpoint, run_id=record["run_id"])
    return checkpoint


@pytest.fixture(scope="module")
def reward_checkpoint(tmp_path_factory):
    """A saved reward model (LoRA + score head, non-zero weights) on the tiny base, as the reward stage saves it."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    from align.modeling import load_tokenizer, lora_config
    from align.recipe import LoraConfig as AlignLora, ModelConfig

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(str(TINY_BASE), num_labels=1)
    model = get_peft_model(base, lora_config(AlignLora(r=4, alpha=8), task_type="SEQ_CLS"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.2)
    path = tmp_path_factory.mktemp("reward") / "checkpoint"
    model.save_pretrained(str(path))
    load_tokenizer(ModelConfig(name_or_path=str(TINY_BASE))).save_pretrained(str(path))
    return path


def peak_memory(command: list[str], **kwargs) -> tuple[int, str]:
    """Runs `command` in a fresh process and returns (its peak resident memory in bytes, its stderr). Measured
    from a wrapper of its own, so that no earlier child of the test process is counted."""
    import subprocess
    import sys

    wrapper = ("import resource, subprocess, sys\n"
               "done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)\n"
               "sys.stderr.write(done.stderr)\n"
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)\n")
    done = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True, text=True, **kwargs)
    return int(done.stdout.split()[-1]), done.stderr


def estimated_peak(stderr: str) -> float:
    """Bytes of the estimate align.memory logged ("estimated peak memory X GB")."""
    import re

    return float(re.search(r"estimated peak memory ([\d.]+) GB", stderr).group(1)) * (1 << 30)


def assert_reference_is_the_sft_policy(policy, sft_adapter: Path) -> None:
    """After training: the policy's frozen "ref" adapter (TRL's copy) still computes the saved SFT checkpoint's
    logits, and the trained adapter moved away from them."""
    import torch
    from peft import PeftModel
    from trl.trainer.utils import use_adapter

    from align.modeling import load_model
    from align.recipe import ModelConfig

    policy.eval()
    sft = PeftModel.from_pretrained(load_model(ModelConfig(name_or_path=str(TINY_BASE))), str(sft_adapter)).eval()
    ids = torch.tensor([[3, 17, 42, 8, 99, 5, 61]])
    with torch.no_grad():
        with use_adapter(policy, "ref"):
            reference = policy(input_ids=ids).logits
        moved, expected = policy(input_ids=ids).logits, sft(input_ids=ids).logits
    torch.testing.assert_close(reference, expected, rtol=1e-5, atol=1e-5)
    assert (moved - expected).abs().max() > 1e-3


QA = {"columns": {"prompt": "question", "completion": "answer"}}


def sft_recipe(write_recipe, **sft):
    return write_recipe(data={"sft": {"train": str(QA_TRAIN), "eval": str(QA_HELDOUT)}, **QA},
                        sft=sft_section(**{"max_steps": 20, "save_steps": 10, "eval_generations": 4, **sft}))


def files_of(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def sft_trained_once(tmp_path_factory) -> Path:
    """The directory of one finished SFT stage (its recipe test.yaml and runs/), trained once per test process for
    `finished_sft` to copy: most tests that need a finished stage damage or change it."""
    from align.stages import sft

    tmp = tmp_path_factory.mktemp("finished_sft")
    sft.run(load_recipe(sft_recipe(recipe_writer(tmp))))
    return tmp


@pytest.fixture
def finished_sft(sft_trained_once, tmp_path):
    """A finished SFT stage of the tiny base (20 steps, trainer checkpoints at 10 and 20) in tmp_path: (recipe path,
    stage dir). A copy of `sft_trained_once` with every path it recorded in text (today the recipe, config.yaml and
    lineage.json) moved to tmp_path, so the run dir is the one an SFT run in tmp_path leaves; the trainer's pickled
    training_args.bin keeps the old output_dir, which nothing reads back."""
    shutil.copytree(sft_trained_once, tmp_path, dirs_exist_ok=True)
    old, new = str(sft_trained_once).encode(), str(tmp_path).encode()
    for file in (p for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".yaml", ".json", ".jsonl", ".md")):
        if old in (content := file.read_bytes()):  # a checkpoint's file moved here would fail its manifest: loud
            file.write_bytes(content.replace(old, new))
    return tmp_path / "test.yaml", tmp_path / "runs" / "test" / "sft"


# SmolLM2-135M-Instruct, the real pretrained model of tests/test_real_model.py and the memory test on it
SMOLLM2_TRAIN_ROWS, SMOLLM2_HELD_OUT_ROWS = 96, 4


def smollm2_dir() -> Path:
    """The model directory: $ALIGN_SMOLLM2, or the script's cached build (made now if missing)."""
    if os.environ.get("ALIGN_SMOLLM2"):
        return Path(os.environ["ALIGN_SMOLLM2"])
    spec = importlib.util.spec_from_file_location("smollm2_from_wheel", ROOT / "scripts" / "smollm2_from_wheel.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script.build(script.DEFAULT_OUT, script.DEFAULT_CACHE)


def short_recipe(model_dir: Path, tmp: Path) -> Path:
    """recipes/smollm2-135m.yaml on a few rows, a few steps per stage."""
    first_rows(QA_TRAIN, SMOLLM2_TRAIN_ROWS, tmp / "qa_train.jsonl")
    first_rows(QA_HELDOUT, SMOLLM2_HELD_OUT_ROWS, tmp / "qa_heldout.jsonl")
    first_rows(PREF_TRAIN, 32, tmp / "pref_train.jsonl")
    pairs = PREF_TRAIN.read_text().splitlines(keepends=True)
    (tmp / "pref_heldout.jsonl").write_text("".join(pairs[-SMOLLM2_HELD_OUT_ROWS:]))
    recipe = yaml.safe_load((ROOT / "recipes" / "smollm2-135m.yaml").read_text())
    recipe["model"]["name_or_path"] = str(model_dir)
    # float32 on every CPU, as conftest.float32_on_every_cpu does for the other tests (a module fixture does not see
    # it): the figures asserted here must not depend on whether the CPU has AMX
    recipe["model"]["compute_dtype"] = "float32"
    recipe["run"] = {"root": str(tmp / "runs"), "name": "smollm2", "seed": 0}
    recipe["data"].update({"sft": {"train": str(tmp / "qa_train.jsonl"), "eval": str(tmp / "qa_heldout.jsonl")},
                           "preference": {"train": str(tmp / "pref_train.jsonl"), "eval": str(tmp / "pref_heldout.jsonl")},
                           "prompts": {"train": str(tmp / "qa_train.jsonl"), "eval": str(tmp / "qa_heldout.jsonl")}})
    recipe["rl"]["min_reward_accuracy"] = 0
    short = {"max_steps": 2, "warmup_steps": 0, "logging_steps": 1, "save_steps": 10,
             "per_device_eval_batch_size": SMOLLM2_HELD_OUT_ROWS}
    # enough SFT for short answers that end at <|im_end|> (the instruct model's own run past 48 tokens)
    recipe["sft"].update(short, max_steps=12, learning_rate=1e-3, eval_generations=4, eval_loss_rows=None,
                         max_new_tokens=32)
    recipe["reward"].update(short, per_device_train_batch_size=4)
    # temperature 1: two steps of 2 prompts x 4 answers, varied enough that a group's rewards differ and the one
    # update moves the policy (at the recipe's 0.7 both groups were once all right or all wrong: no update)
    rl = {**short, "eval_generations": 4, "eval_samples": 0, "max_completion_length": 48, "temperature": 1.0}
    recipe["grpo"].update(rl, num_generations=4, per_device_train_batch_size=8, gradient_accumulation_steps=1)
    recipe["ppo"].update(rl, max_steps=1, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                         num_ppo_epochs=1)
    path = tmp / "smollm2.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path
