"""What align reads from a run dir, a recipe or a model is untrusted: nothing read runs code (pickles,
remote code, templates, environment interpolation), model text is escaped in reports, and nothing a stage writes
goes through a link."""

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import TINY_BASE, files_of, finished, sft_recipe, sft_section, write_rows

from align.cli import main
from align.errors import AlignError
from align.recipe import RecipeError, load_recipe, to_yaml
from align.rundir import complete_checkpoint


class Planted:
    """A pickle that runs a command when it is loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_planted_pickle_in_a_ppo_checkpoint_does_not_run(tmp_path):
    import torch

    from align.stages.ppo import read_state

    marker = tmp_path / "pwned"
    torch.save({"step": 1, "rng": Planted(marker)}, tmp_path / "state.pt")
    with pytest.raises(AlignError, match="refused to load: it holds more than tensors and numbers"):
        read_state(tmp_path / "state.pt")
    assert not marker.exists()


def test_a_ppo_checkpoint_as_align_writes_it_loads(tmp_path):
    """What the PPO loop saves (optimizer, scheduler, KL controller, python/numpy/torch random states) loads under
    weights_only, and gives back the same random states."""
    import random

    import numpy as np
    import torch

    from align.stages.ppo import read_state, restore_rng_state, rng_state

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight])
    weight.sum().backward()
    optimizer.step()
    torch.save({"step": 3, "optimizer": optimizer.state_dict(), "kl_controller": {"value": 0.05, "target": None},
                "kl": (0.0, 0.1, 0.2), "rng": rng_state()}, tmp_path / "state.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1))
    state = read_state(tmp_path / "state.pt")
    restore_rng_state(state["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected
    assert state["step"] == 3 and state["optimizer"]["state"][0]["step"] == 1


def custom_code_stage(tmp_path: Path, marker: Path) -> Path:
    """A finished SFT stage dir whose config.yaml asks for model.trust_remote_code on a base model dir whose
    config names its own modeling code, which would create `marker` if it ever ran."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = tmp_path / "custom-base"
    shutil.copytree(TINY_BASE, base)
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (base / "config.json").write_text(json.dumps(config))
    (base / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")

    stage = tmp_path / "runs" / "shared" / "sft"
    recipe = load_recipe(None, [f"model.name_or_path={base}", "model.trust_remote_code=true", f"run.root={tmp_path / 'runs'}"])
    stage.mkdir(parents=True)
    (stage / "config.yaml").write_text(to_yaml(recipe))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(TINY_BASE)),
                           LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.save_pretrained(str(stage / "checkpoint"))
    finished(stage / "checkpoint", run="shared", stage="sft")
    return stage


def test_a_run_dirs_trust_remote_code_is_not_honoured(tmp_path, capsys):
    marker = tmp_path / "pwned"
    stage = custom_code_stage(tmp_path, marker)
    assert main(["export", str(stage), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "sets model.trust_remote_code=true, and align does not run a model's own code" in err
    assert "pass --trust-remote-code" in err
    eval_file = write_rows(tmp_path / "eval.jsonl", [{"question": "What is 1 + 1?", "answer": "2"}])
    assert main(["compare", str(stage), "--eval", str(eval_file), "--out", str(tmp_path / "cmp")]) == 2
    assert "pass --trust-remote-code" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_oc_env_is_refused_and_nothing_is_written(write_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_TEST_SECRET", "hf_secret_token")
    path = write_recipe(model={"revision": "${oc.env:ALIGN_TEST_SECRET}"}, sft=sft_section())
    with pytest.raises(RecipeError, match=r"model.revision: \$\{oc.env:...\} is not allowed"):
        load_recipe(path)
    assert main(["sft", str(path)]) == 2
    assert not (tmp_path / "runs").exists()


def test_report_md_fences_prompts_answers_and_escapes_names(tmp_path, sft_adapter):
    prompt = "What is 1 + 1? <script>alert(1)</script> ```` | *not bold*"
    eval_file = write_rows(tmp_path / "eval.jsonl", [{"question": prompt, "answer": "2"}])
    out = tmp_path / "cmp"
    assert main(["compare", f"<img src=x onerror=alert(1)>={sft_adapter}", "--eval", str(eval_file), "--out",
                 str(out), "--max-new-tokens", "4", "--temperature", "0"]) == 0
    markdown = (out / "report.md").read_text()
    assert "<img" not in markdown and "&lt;img src=x onerror=alert\\(1\\)&gt;" in markdown
    assert f"`````text\n{prompt}\n`````" in markdown  # fenced with more backticks than the text has
    assert markdown.count("<script>") == 1  # only inside that fence


def test_export_refuses_a_directory_that_is_not_an_earlier_export(tmp_path, sft_adapter, capsys):
    out = tmp_path / "important"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    assert main(["export", str(sft_adapter), "--out", str(out)]) == 2
    assert "it exists and is not an earlier export" in capsys.readouterr().err
    assert (out / "thesis.tex").read_text() == "years of work"

    fresh = tmp_path / "exported"
    assert main(["export", str(sft_adapter), "--out", str(fresh)]) == 0
    assert main(["export", str(sft_adapter), "--out", str(fresh)]) == 0  # an earlier export is replaced
    assert main(["export", str(sft_adapter), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "thesis.tex").exists() and (out / "config.json").is_file()


def test_a_chat_template_that_reaches_python_internals_is_one_line(write_recipe, tmp_path, capsys):
    path = sft_recipe(write_recipe)
    template = tmp_path / "template.jinja"
    template.write_text("{{ messages.__class__.__mro__ }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert main(["sft", str(path), f"model.chat_template={template}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model.chat_template: cannot render a conversation (SecurityError: ") and (
        "fix the template" in err) and len(err.splitlines()) == 1


def _replace_with_link(entry: Path, outside: Path) -> Path:
    """Moves `entry` (a file or directory) to `outside` and leaves a symbolic link to it in its place."""
    shutil.move(entry, outside)
    entry.symlink_to(outside, target_is_directory=outside.is_dir())
    return outside


def test_no_file_or_directory_a_stage_wrote_is_written_through_a_link(finished_sft, tmp_path, capsys):
    """Each file and directory a finished stage left (listed, not named here), and the stage and run dirs
    themselves, in turn made a link to a copy elsewhere: the re-run stops before any work, naming the link and
    its target, and the copy elsewhere is byte for byte what it was."""
    path, stage = finished_sft
    written = sorted(stage.rglob("*"), key=lambda p: len(p.parts), reverse=True)
    assert {"config.yaml", "lineage.json", "metrics.jsonl", ".lock", "checkpoint", "trainer"} <= {p.name for p in written}
    for number, entry in enumerate([*written, stage, stage.parent]):
        outside = _replace_with_link(entry, tmp_path / f"elsewhere-{number}")
        before = files_of(outside) if outside.is_dir() else outside.read_bytes()
        assert main(["sft", str(path), "sft.max_steps=4", "sft.save_steps=2"]) == 2
        assert f"{entry} -> {outside}" in capsys.readouterr().err, entry
        assert (files_of(outside) if outside.is_dir() else outside.read_bytes()) == before, entry
        entry.unlink()
        shutil.move(outside, entry)
    assert complete_checkpoint(stage) == stage / "checkpoint"  # put back as it was


def test_align_run_does_not_append_to_a_linked_pipeline_journal(finished_sft, tmp_path, capsys):
    path, stage = finished_sft
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_text("mine\n")
    (stage.parent / "pipeline.jsonl").symlink_to(outside)
    assert main(["run", str(path)]) == 2
    assert f"{stage.parent / 'pipeline.jsonl'} -> {outside}" in capsys.readouterr().err
    assert outside.read_text() == "mine\n"
