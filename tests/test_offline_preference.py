"""DPO and KTO as `align run` ends them, through the CLI: no reward model trained, then `align compare` measures
the policy against the reference its lineage names (the SFT policy) and `align export` takes it as the run's
policy."""

import json
from pathlib import Path

import pytest
from conftest import QA_HELDOUT, QA_TRAIN, few_rows, first_rows, sft_section
from test_dpo import data as dpo_data
from test_dpo import dpo_section
from test_kto import data as kto_data
from test_kto import kto_section

from align.cli import main

pytestmark = pytest.mark.slow  # `pytest -m "not slow"` leaves this file out

STAGES = {"dpo": (dpo_section, dpo_data, "pair accuracy (implicit reward) 0.0% ->"),
          "kto": (kto_section, kto_data, "good - bad implicit reward 0.000")}


@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_align_run_then_compare_and_export_its_checkpoint(write_recipe, tmp_path, capsys, stage):
    """A short run: what is checked is where each checkpoint comes from, not how much it learned."""
    section, data, printed_result = STAGES[stage]
    prompts = first_rows(QA_HELDOUT, 16, tmp_path / "prompts.jsonl")
    path = write_recipe(data={**data(tmp_path, held_out=16),
                              "sft": {"train": str(few_rows(QA_TRAIN, tmp_path)), "eval": str(prompts)}},
                        sft=sft_section(max_steps=2, eval_generations=0), rl={"algorithm": stage},
                        **{stage: section(max_steps=2)})
    assert main(["run", str(path), "run.name=cli"]) == 0
    assert printed_result in capsys.readouterr().out
    run = tmp_path / "runs" / "cli"
    events = [json.loads(line) for line in (run / "pipeline.jsonl").read_text().splitlines()]
    assert [e["stage"] for e in events if e.get("action") == "finished"] == ["sft", stage]  # no reward model

    out = tmp_path / "cmp"
    assert main(["compare", f"sft={run / 'sft'}", f"{stage}={run / stage}", "--eval", str(prompts),
                 "--max-new-tokens", "8", "--out", str(out), "--temperature", "0"]) == 0
    checkpoints = json.loads((out / "results.json").read_text())["checkpoints"]
    assert Path(checkpoints[stage]["reference"]) == run / "sft" / "checkpoint"
    assert checkpoints["sft"]["reference"] is None
    assert checkpoints[stage]["metrics"]["kl"]["mean"] > 0  # it moved away from the SFT policy

    assert main(["export", str(run), "--out", str(tmp_path / "exported")]) == 0
    assert str(run / stage / "checkpoint") in capsys.readouterr().out  # the run's policy is its final stage's
