"""Peak memory and speed of an align stage on a hub architecture, with random weights (no hub access needed).

    python bench/run.py grpo --arch qwen2.5-1.5b --steps 6
    python bench/run.py grpo --arch tiny --steps 2 --prompt-tokens 16 --completion-tokens 16   # the CPU path

The model is built from bench/archs/ARCH.json (a hub config.json) with random weights and a synthetic word-level
tokenizer of the same vocabulary size, saved to a work dir, and then trained by align's own stage code
(`align.stages.<stage>.run`), so it loads through `align/modeling.py` in 4-bit NF4 like any recipe. Memory and
speed do not depend on the weights' values; random weights never emit EOS, so every completion is exactly
--completion-tokens long. Writes one JSON record per run (appended to --out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ARCHS = Path(__file__).parent / "archs"
STAGES = ("grpo",)


def build_base(arch: str, out: Path) -> None:
    """Random-weight model of `arch` and a tokenizer of the same vocabulary size, saved to `out`. The tokenizer
    is byte-level BPE without merges (one token per byte of text), so a prompt's length in tokens is exact; the
    rest of its vocabulary is filler that decodes to bytes."""
    import itertools

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    spec = json.loads((ARCHS / f"{arch}.json").read_text())
    config = AutoConfig.for_model(**{k: v for k, v in spec.items() if not k.startswith("_")})
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    filler = ("".join(t) for n in itertools.count(2) for t in itertools.product(alphabet, repeat=n))
    vocab = {}
    for i in range(config.vocab_size):
        vocab["<|endoftext|>" if i == config.eos_token_id else alphabet[i] if i < len(alphabet) else next(filler)] = i
    tok = Tokenizer(models.BPE(vocab, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(out)
    where = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(where):  # initialising a billion weights on the GPU takes seconds, on the CPU minutes
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)


def write_prompts(path: Path, base: Path, n: int, tokens: int, seed: int) -> None:
    """`n` prompts of random letters, each exactly `tokens` long once rendered as align renders prompts."""
    from align.modeling import load_tokenizer, prompt_ids
    from align.recipe import ModelConfig

    overhead = len(prompt_ids(load_tokenizer(ModelConfig(name_or_path=str(base))), [{"role": "user", "content": ""}]))
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(tokens - overhead))
            f.write(json.dumps({"question": text}) + "\n")


def reward_checkpoint(base: Path, out: Path) -> Path:
    """An untrained reward checkpoint on `base`, shaped as the reward stage saves one (LoRA + score head)."""
    from peft import get_peft_model

    from align.modeling import load_model, load_tokenizer, lora_config
    from align.recipe import LoraConfig, ModelConfig

    cfg = ModelConfig(name_or_path=str(base))
    model = get_peft_model(load_model(cfg, head="score"), lora_config(LoraConfig(), task_type="SEQ_CLS"))
    model.save_pretrained(out)
    load_tokenizer(cfg).save_pretrained(out)
    return out


def grpo_overrides(args, work: Path) -> list[str]:
    per_step = args.prompts_per_step * args.num_generations
    # A rule reward: every completion has the same length, so advantages are 0, but generation, the policy
    # and reference forward passes and the backward pass all run as in any GRPO step.
    rewards = "{name: length, args: {max_tokens: 16}}"
    if args.reward_model != "none":
        share = str(args.reward_model == "shared").lower()
        rewards += f", {{name: reward_model, args: {{checkpoint: {work / 'reward'}, share_base: {share}}}}}"
    return [
        f"data.prompts.train={work / 'prompts.jsonl'}",
        f"grpo.rewards=[{rewards}]",
        "grpo.init_from=base",
        f"grpo.num_generations={args.num_generations}",
        f"grpo.per_device_train_batch_size={per_step}",
        f"grpo.max_completion_length={args.completion_tokens}",
        f"grpo.max_length={args.prompt_tokens + args.completion_tokens}",
        f"grpo.max_steps={args.steps}",
        f"grpo.activation_checkpointing={str(args.activation_checkpointing).lower()}",
        "grpo.logging_steps=1",
        f"grpo.save_steps={args.steps + 1}",
        "grpo.eval_generations=0",
        "grpo.max_kl=null",
    ]


def measure(args) -> dict:
    import torch

    from align.recipe import load_recipe
    from align.stages import grpo

    with tempfile.TemporaryDirectory(prefix="align-bench-") as tmp:
        work = Path(tmp)
        build_base(args.arch, work / "base")
        if args.reward_model != "none":
            reward_checkpoint(work / "base", work / "reward")
        prompts_per_run = args.steps * args.prompts_per_step
        write_prompts(work / "prompts.jsonl", work / "base", prompts_per_run, args.prompt_tokens, args.seed)
        recipe = load_recipe(None, [
            f"model.name_or_path={work / 'base'}",
            f"model.quantization={args.quantization}",
            f"run.root={work / 'runs'}",
            "run.name=bench",
            f"run.seed={args.seed}",
            f"grpo={{}}",
            *grpo_overrides(args, work),
            *args.overrides,
        ])
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        start = time.monotonic()
        results = grpo.run(recipe)
        wall = time.monotonic() - start
        rows = [json.loads(line) for line in (Path(results["run_dir"]) / "metrics.jsonl").open()]
    steps = [r for r in rows if "step_time" in r]
    timed = steps[1:] or steps  # the first step includes CUDA warm-up
    step_s = statistics.median(r["step_time"] for r in timed)
    completions = args.prompts_per_step * args.num_generations
    generated = statistics.fmean(r["completions/mean_length"] for r in timed) * completions
    trained = generated + completions * args.prompt_tokens
    return {
        "stage": "grpo",
        "arch": args.arch,
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "quantization": args.quantization,
        "prompt_tokens": args.prompt_tokens,
        "completion_tokens": args.completion_tokens,
        "num_generations": args.num_generations,
        "prompts_per_step": args.prompts_per_step,
        "activation_checkpointing": args.activation_checkpointing,
        "reward_model": args.reward_model,
        "steps": len(steps),
        "seconds_per_step": round(step_s, 3),
        "generated_tokens_per_s": round(generated / step_s, 1),
        "tokens_per_s": round((generated + trained) / step_s, 1),
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3) if cuda else None,
        "wall_seconds": round(wall, 1),
        "overrides": args.overrides,
        "versions": {m: __import__(m).__version__ for m in ("torch", "transformers", "trl", "peft", "bitsandbytes")},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--arch", required=True,
                        help=f"a config in bench/archs: {', '.join(sorted(p.stem for p in ARCHS.glob('*.json')))}")
    parser.add_argument("--steps", type=int, default=6, help="training steps; the first is not timed")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--completion-tokens", type=int, default=256)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--prompts-per-step", type=int, default=1)
    parser.add_argument("--quantization", default="nf4", choices=("nf4", "none"))
    parser.add_argument("--no-activation-checkpointing", dest="activation_checkpointing", action="store_false")
    parser.add_argument("--reward-model", default="none", choices=("none", "shared", "own"),
                        help="add a reward_model reward (an untrained checkpoint on the same base): on the policy's "
                        "base (shared) or on its own copy (own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="JSON-lines file the record is appended to")
    parser.add_argument("overrides", nargs="*", help="more recipe overrides, key=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not (ARCHS / f"{args.arch}.json").is_file():
        parser.error(f"no bench/archs/{args.arch}.json")
    record = measure(args)
    print(json.dumps(record, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
