"""A run's report.html: `align run` writes it at its end (a failed run too, saying why), `align report` on demand;
one section per stage with its curves, results, gates, samples and what ran; model text escaped; and it renders in
a real headless browser (Chromium: .ci/run installs it, ALIGN_REQUIRE_BROWSER=1 turns the skip into a failure)."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import PREF_TRAIN, QA_HELDOUT, QA_TRAIN, ROOT, few_rows, first_rows, sft_section

from align.cli import main
from align.registry import BY_NAME

PLANTED = "<script>document.title='PWNED'</script>"
BROWSER = shutil.which("chromium")
needs_browser = pytest.mark.skipif(BROWSER is None and not os.environ.get("ALIGN_REQUIRE_BROWSER"),
                                   reason="headless Chromium is not installed (.ci/run installs it)")


def chromium(*args, timeout=120):
    assert BROWSER, "ALIGN_REQUIRE_BROWSER is set and chromium is not on PATH"
    return subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """`align run` of sft -> reward -> grpo on the tiny base (a few steps each), then a `<script>` planted in a
    held-out answer of samples.jsonl, as a model could write one, and `align report` again."""
    tmp = tmp_path_factory.mktemp("report")
    held_out = first_rows(QA_HELDOUT, 8, tmp / "qa_heldout.jsonl")
    qa, recipe = few_rows(QA_TRAIN, tmp), tmp / "r.yaml"
    recipe.write_text(json.dumps({
        "model": {"name_or_path": str(ROOT / "data" / "tiny-base"), "compute_dtype": "float32"},
        "run": {"root": str(tmp / "runs"), "name": "shown"}, "rl": {"min_reward_accuracy": 0},
        "data": {"sft": {"train": str(qa), "eval": str(held_out)},
                 "preference": {"train": str(few_rows(PREF_TRAIN, tmp))},
                 "prompts": {"train": str(qa), "eval": str(held_out)},
                 "columns": {"prompt": "question", "completion": "answer"}},
        "sft": sft_section(max_steps=4, eval_generations=4, logging_steps=1),
        "reward": {"max_steps": 3, "max_length": 128, "activation_checkpointing": False, "logging_steps": 1},
        "grpo": {"max_steps": 3, "per_device_train_batch_size": 8, "num_generations": 4, "max_completion_length": 8,
                 "max_length": 64, "activation_checkpointing": False, "logging_steps": 1, "eval_generations": 4,
                 "per_device_eval_batch_size": 8, "rewards": [{"name": "exact_match", "args": {"column": "answer"}}]}}))
    assert main(["run", str(recipe)]) == 0
    run_dir = tmp / "runs" / "shown"
    written_by_run = (run_dir / "report.html").read_text()
    samples = run_dir / "grpo" / "samples.jsonl"
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    rows[0]["after"] = f"The answer is {PLANTED}"
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["report", str(run_dir)]) == 0
    return run_dir, written_by_run


def sections(page: str) -> dict[str, str]:
    return dict(re.findall(r"<section id='(\w+)'>(.*?)</section>", page, re.S))


@pytest.mark.slow
def test_align_run_writes_the_report_with_a_section_per_stage_in_run_order(finished_run):
    run_dir, written_by_run = finished_run
    assert list(sections(written_by_run)) == ["sft", "reward", "grpo"]
    page = (run_dir / "report.html").read_text()
    assert "http://" not in page and "https://" not in page and "<script" not in page.replace(
        "&lt;script", "")  # self-contained, and no script of any kind
    for name, section in sections(page).items():
        assert "Before -&gt; after (held-out)" in section and "What ran" in section, name
        assert "preference_train.jsonl" in section or name != "reward"  # its data file, rows and columns


@pytest.mark.slow
def test_every_curve_with_data_is_drawn(finished_run):
    run_dir, _ = finished_run
    page = sections((run_dir / "report.html").read_text())
    for name in ("sft", "reward", "grpo"):
        logged = {k for line in (run_dir / name / "metrics.jsonl").read_text().splitlines()
                  for k in json.loads(line)}
        import fnmatch
        expected = sum(any(fnmatch.filter(logged, p) for p in keys) for _, keys in BY_NAME[name].curves)
        expected += any(k in logged for k in BY_NAME[name].held_out)
        assert page[name].count("data:image/png;base64,") == expected, name
    # the RL section has the curves a user looks at first
    assert all(f'alt="{title}"' in page["grpo"] for title in (
        "mean reward per function", "KL to the reference (nats per token)", "completion length (tokens)"))


@pytest.mark.slow
def test_gates_and_decisions_come_from_the_journal(finished_run):
    run_dir, _ = finished_run
    page = (run_dir / "report.html").read_text()
    assert "Decisions (pipeline.jsonl)" in page and "gate prompt_rendering: passed" in page
    assert "<h3>Gates</h3>" in sections(page)["grpo"]


@pytest.mark.slow
def test_a_planted_script_in_an_answer_is_shown_as_text(finished_run):
    run_dir, _ = finished_run
    page = (run_dir / "report.html").read_text()
    assert PLANTED not in page and "&lt;script&gt;document.title=&#x27;PWNED&#x27;&lt;/script&gt;" in page


def test_a_failed_run_still_writes_its_report_saying_why(write_recipe, tmp_path, monkeypatch, capsys):
    (tmp_path / "broken_reward.py").write_text("def plug(prompts, completions, **kwargs):\n    return [1 / 0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "broken_reward", raising=False)
    qa = few_rows(QA_TRAIN, tmp_path)
    path = write_recipe(
        data={"sft": {"train": str(qa)}, "prompts": {"train": str(qa)},
              "columns": {"prompt": "question", "completion": "answer"}},
        sft=sft_section(max_steps=2, eval_generations=0),
        grpo={"max_steps": 2, "per_device_train_batch_size": 8, "num_generations": 4, "max_completion_length": 8,
              "max_length": 64, "eval_generations": 0, "activation_checkpointing": False,
              "rewards": [{"name": "broken_reward:plug"}]})
    assert main(["run", str(path)]) == 2
    page = (tmp_path / "runs" / "test" / "report.html").read_text()
    assert "The run stopped: " in page and "ZeroDivisionError" in page
    assert list(sections(page)) == ["sft", "grpo"] and "Not finished" in sections(page)["grpo"]


def test_a_run_whose_stages_cannot_be_chosen_records_why_in_its_report(write_recipe, tmp_path, capsys):
    """A recipe error in `align run`'s choice of stages (a grpo and a ppo section under rl.algorithm auto) is the
    run's failure: the report of the run dir already there says so."""
    (tmp_path / "runs" / "test").mkdir(parents=True)
    qa = str(QA_TRAIN)
    path = write_recipe(data={"sft": {"train": qa}, "prompts": {"train": qa},
                              "columns": {"prompt": "question", "completion": "answer"}},
                        sft={"max_length": 128}, grpo={"max_length": 128}, ppo={"max_length": 128})
    assert main(["run", str(path)]) == 2
    assert "the recipe has both a grpo and a ppo section" in capsys.readouterr().err
    page = (tmp_path / "runs" / "test" / "report.html").read_text()
    assert "The run stopped: " in page and "RecipeError: the recipe has both a grpo and a ppo section" in page


@pytest.mark.slow
@needs_browser
def test_the_run_report_renders_in_headless_chromium(finished_run, tmp_path):
    run_dir, _ = finished_run
    url = f"file://{run_dir / 'report.html'}"
    shot = tmp_path / "run_report.png"
    result = chromium(f"--screenshot={shot}", "--window-size=1280,6000", url)
    assert result.returncode == 0, result.stderr[-2000:]
    assert shot.stat().st_size > 50_000  # plots and tables, not a blank page
    dom = chromium("--dump-dom", url).stdout
    assert "<title>align run shown</title>" in dom  # the planted script did not run
    assert "<script" not in dom.replace("&lt;script", "")
    images = dom.count("data:image/png;base64,")
    assert images == (run_dir / "report.html").read_text().count("data:image/png;base64,") and images >= 15
    assert all(f"<section id=\"{name}\">" in dom for name in ("sft", "reward", "grpo"))
