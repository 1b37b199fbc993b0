"""The memory pre-flight (align.memory): a stage estimates its peak memory from the model's config and its batch
before any model loads, refuses a batch that cannot fit with the settings to lower, and the estimate is within 2x
of what a run measures."""

import sys
import time

from conftest import ROOT, estimated_peak, peak_memory

from align.cli import main


def test_a_batch_that_cannot_fit_stops_before_a_model_loads_naming_what_to_lower(capsys, tmp_path, monkeypatch):
    from align.stages import sft

    monkeypatch.setattr(sft, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    started = time.monotonic()
    assert main(["sft", str(ROOT / "recipes" / "quickstart.yaml"), "sft.per_device_train_batch_size=100000",
                 f"run.root={tmp_path}"]) == 2
    assert time.monotonic() - started < 10
    err = capsys.readouterr().err
    assert "error: the sft stage would need about " in err and " GB more memory (" in err
    assert "Lower, the biggest saving first:\n  sft.per_device_train_batch_size (raise gradient_accumulation_steps" in err
    assert not (tmp_path / "quickstart" / "sft" / "checkpoint").exists()


def test_the_estimate_is_within_2x_of_the_measured_peak_on_the_tiny_base(tmp_path):
    """A batch big enough that its activations, not the Python process, make most of the peak."""
    peak, err = peak_memory([sys.executable, "-m", "align", "sft", str(ROOT / "recipes" / "quickstart.yaml"),
                             "sft.per_device_train_batch_size=256", "sft.max_steps=1", "sft.eval_generations=8",
                             "sft.eval_loss_rows=8", f"run.root={tmp_path}"], cwd=ROOT)
    estimate = estimated_peak(err)
    assert 0.5 <= peak / estimate <= 2, (peak, estimate)
