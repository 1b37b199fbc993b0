"""Peak memory and speed of an align stage on a hub architecture, with random weights (no hub access needed).

    python bench/run.py sft --arch qwen2.5-7b --steps 6 --baseline
    python bench/run.py reward --arch qwen2.5-1.5b --steps 6
    python bench/run.py grpo --arch qwen2.5-1.5b --steps 4 --completion-tokens 64 --reward-model shared
    python bench/run.py grpo --arch tiny --device cpu --steps 2 --prompt-tokens 16 --completion-tokens 16

The model is built from bench/archs/ARCH.json (a hub config.json) with random weights and a synthetic byte-level
tokenizer of the same vocabulary size, saved to a work dir, and then trained by align's own stage code
(`align.stages.<stage>.run`), so it loads through `align/modeling.py` in 4-bit NF4 like any recipe. Memory and
speed do not depend on the weights' values; random weights never emit EOS, so every completion is exactly
--completion-tokens long. SFT trains on --prompt-tokens + --completion-tokens long conversations, the reward
stage on pairs of them. s/step is the median of align's step_seconds (wall time per optimizer step) over all
steps but the first. Writes one JSON record per run (appended to --out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARCHS = Path(__file__).parent / "archs"
STAGES = ("sft", "reward", "grpo", "ppo")
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def build_base(arch: str, out: Path) -> int:
    """Random-weight model of `arch` and a tokenizer of the same vocabulary size, saved to `out` (kept if `out`
    already holds one). The tokenizer is byte-level BPE without merges (one token per byte of text), so a
    prompt's length in tokens is exact; the rest of its vocabulary is filler that decodes to bytes. Returns the
    parameters every token's matmuls read (all but the input embeddings; a tied LM head counts)."""
    import itertools

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    from align.modeling import DEFAULT_CHAT_TEMPLATE

    spec = json.loads((ARCHS / f"{arch}.json").read_text())
    config = AutoConfig.for_model(**{k: v for k, v in spec.items() if not k.startswith("_")})
    embeddings = config.vocab_size * config.hidden_size
    if not (out / "config.json").is_file():
        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
        filler = ("".join(t) for n in itertools.count(2) for t in itertools.product(alphabet, repeat=n))
        vocab = {}
        for i in range(config.vocab_size):
            vocab["<|endoftext|>" if i == config.eos_token_id else alphabet[i] if i < len(alphabet) else next(filler)] = i
        tok = Tokenizer(models.BPE(vocab, []))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE  # so that the baseline renders exactly as align does
        tokenizer.save_pretrained(out)
        where = "cuda" if torch.cuda.is_available() else "cpu"
        with torch.device(where):  # initialising a billion weights on the GPU takes seconds, on the CPU minutes
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(out)
        del model
    with torch.device("meta"):
        total = AutoModelForCausalLM.from_config(config).num_parameters()
    return total - (0 if config.tie_word_embeddings else embeddings)


def write_data(path: Path, base: Path, n: int, prompt_tokens: int, completion_tokens: int, seed: int) -> int:
    """`n` rows of random letters: a question exactly `prompt_tokens` long once rendered as align renders
    prompts, and answer / chosen / rejected texts of `completion_tokens` letters (a letter is a token). Returns
    the length in tokens of a whole rendered conversation (template and EOS included)."""
    from align.modeling import conversation_ids, load_tokenizer, prompt_ids
    from align.recipe import ModelConfig

    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(base)))
    overhead = len(prompt_ids(tokenizer, [{"role": "user", "content": ""}]))
    rng = random.Random(seed)
    text = lambda k: "".join(rng.choice(LETTERS) for _ in range(k))  # noqa: E731
    rows = [{"question": text(prompt_tokens - overhead), "answer": text(completion_tokens),
             "chosen": text(completion_tokens), "rejected": text(completion_tokens)} for _ in range(n)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    conversation = [{"role": "user", "content": rows[0]["question"]}, {"role": "assistant", "content": rows[0]["answer"]}]
    return len(conversation_ids(tokenizer, [conversation])[0])


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


def stage_overrides(args, work: Path, length: int) -> list[str]:
    """The stage's recipe section: a fresh adapter, the stated lengths and batch (a --recipe's own batch and
    lengths), a log every step, no held-out evaluation, no checkpoint before the end. `length`: a rendered
    conversation's tokens."""
    common = [f"{args.stage}.max_steps={args.steps}", f"{args.stage}.logging_steps=1",
              f"{args.stage}.save_steps={args.steps + 1}",
              f"{args.stage}.activation_checkpointing={str(args.activation_checkpointing).lower()}"]
    if args.recipe:
        from align.registry import stage

        common.append(f"data.{stage(args.stage).data}.eval=null")
    sized = lambda *keys: [] if args.recipe else list(keys)  # noqa: E731  (a recipe keeps its own)
    if args.stage == "sft":
        return [f"data.sft.train={work / 'data.jsonl'}", "data.columns.prompt=question", "sft.eval_generations=0",
                *sized(f"sft.max_length={length}", f"sft.per_device_train_batch_size={args.batch_size}"), *common]
    if args.stage == "reward":
        return [f"data.preference.train={work / 'data.jsonl'}", "data.columns.prompt=question",
                "reward.init_from=base",
                *sized(f"reward.max_length={length}", f"reward.per_device_train_batch_size={args.batch_size}"),
                *common]
    # A rule reward: every completion has the same length, so GRPO's advantages are 0, but generation, the
    # policy and reference forward passes and the backward pass all run as in any RL step.
    rewards = "{name: length, args: {max_tokens: 16}}"
    if args.reward_model != "none":
        share = str(args.reward_model == "shared").lower()
        rewards += f", {{name: reward_model, args: {{checkpoint: {work / 'reward'}, share_base: {share}}}}}"
    rl = [f"data.prompts.train={work / 'data.jsonl'}", "data.columns.prompt=question",
          f"{args.stage}.rewards=[{rewards}]", f"{args.stage}.init_from=base", f"{args.stage}.eval_generations=0",
          f"{args.stage}.max_kl=null", *common,
          *sized(f"{args.stage}.max_completion_length={args.completion_tokens}",
                 f"{args.stage}.max_length={args.prompt_tokens + args.completion_tokens}")]
    if args.stage == "ppo":  # a rollout of prompts_per_step prompts, micro-batches of batch_size, one mini-batch
        return [*rl, *sized(f"ppo.per_device_train_batch_size={min(args.batch_size, args.prompts_per_step)}",
                            f"ppo.gradient_accumulation_steps={max(1, args.prompts_per_step // args.batch_size)}",
                            f"ppo.per_device_eval_batch_size={args.prompts_per_step}")]
    return [*rl, *sized(f"grpo.num_generations={args.num_generations}",
                        f"grpo.per_device_train_batch_size={args.prompts_per_step * args.num_generations}")]


def size_from_recipe(args) -> None:
    """Set the batch, lengths and checkpointing of `args` from the stage section of the recipe `args.recipe`:
    every sequence as long as the section's max_length allows (the worst case for memory), its batch and
    gradient accumulation per optimizer step."""
    from align.recipe import RecipeError, load_recipe

    section = getattr(load_recipe(args.recipe), args.stage)
    if section is None:
        raise RecipeError(f"{args.recipe} has no {args.stage} section")
    args.accumulation = section.gradient_accumulation_steps
    per_step = section.per_device_train_batch_size * args.accumulation
    args.activation_checkpointing = section.activation_checkpointing
    if args.stage in ("sft", "reward"):
        args.batch_size = per_step
        args.prompt_tokens = section.max_length // 2
        args.completion_tokens = section.max_length - args.prompt_tokens - 2  # end of turn and EOS: measured below
        return
    args.prompt_tokens = section.max_length - section.max_completion_length
    args.completion_tokens = section.max_completion_length
    if args.stage == "grpo":
        args.num_generations = section.num_generations
        args.prompts_per_step = per_step // section.num_generations
    else:
        args.batch_size, args.prompts_per_step = section.per_device_train_batch_size, per_step


def tokens_per_step(args, length: int, completion_length: float, recipe) -> tuple[float, float]:
    """(tokens through the model, of which generated) per optimizer step. `length`: a rendered conversation's
    tokens; `completion_length`: the mean generated completion (RL)."""
    if args.stage == "sft":
        return args.batch_size * length, 0.0
    if args.stage == "reward":
        return 2 * args.batch_size * length, 0.0
    if args.stage == "ppo":  # generated, read back by policy, reference and value, then the update's epochs
        generated = completion_length * args.prompts_per_step
        read = args.prompts_per_step * args.prompt_tokens + generated
        return generated + (3 + recipe.ppo.num_ppo_epochs) * read, generated
    completions = args.prompts_per_step * args.num_generations
    generated = completion_length * completions
    # the generated tokens, then prompt + completion read back by the policy (the reference's pass not counted)
    return generated + completions * args.prompt_tokens + generated, generated


def speed(args, step_s: float, length: int, completion_length: float, recipe, matmul_params: int,
          peak: float | None) -> dict:
    """tokens/s (and generated tokens/s for RL, model FLOPs utilisation for SFT and reward) at `step_s` s/step:
    one counting for align and the baseline."""
    tokens, generated = tokens_per_step(args, length, completion_length, recipe)
    out = {"seconds_per_step": round(step_s, 3), "tokens_per_s": round(tokens / step_s, 1)}
    if args.stage in ("grpo", "ppo"):
        out["generated_tokens_per_s"] = round(generated / step_s, 1)
    else:
        # 6 FLOPs per matmul parameter per token: forward 2, backward through the frozen base 2 (activation
        # gradients only), the checkpointed forward again 2; LoRA's own FLOPs and attention are left out.
        out["mfu"] = round(6 * matmul_params * tokens / step_s / peak, 4) if peak else None
    return out


# Dense bf16 peak of the GPUs this has run on (NVIDIA's data sheets, SXM parts), for model FLOPs utilisation.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}


def measure(args, work: Path) -> dict:
    import importlib

    import torch

    from align.memory import keep_freed_memory
    from align.recipe import load_recipe

    logging.info("memory: %s (as the align command does)", keep_freed_memory())
    stage = importlib.import_module(f"align.stages.{args.stage}")
    matmul_params = build_base(args.arch, work / "base")
    if args.stage in ("grpo", "ppo") and args.reward_model != "none" and not (work / "reward").is_dir():
        reward_checkpoint(work / "base", work / "reward")
    rows = args.steps * (args.prompts_per_step if args.stage in ("grpo", "ppo") else args.batch_size)
    length = write_data(work / "data.jsonl", work / "base", rows, args.prompt_tokens, args.completion_tokens,
                        args.seed)
    recipe = load_recipe(args.recipe, [
        f"model.name_or_path={work / 'base'}",
        f"model.quantization={args.quantization}",
        f"run.root={work / 'runs'}",
        f"run.name=bench-{args.stage}",
        f"run.seed={args.seed}",
        *([] if args.recipe else [f"{args.stage}={{}}"]),  # the schema's defaults, or the recipe's section
        *stage_overrides(args, work, length),
        *args.overrides,
    ])
    if args.stage in ("sft", "reward") and length > getattr(recipe, args.stage).max_length:
        raise SystemExit(f"a conversation is {length} tokens, over {args.stage}.max_length")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.monotonic()
    results = stage.run(recipe)
    wall = time.monotonic() - start
    metrics = [json.loads(line) for line in (Path(results["run_dir"]) / "metrics.jsonl").open()]
    steps = [m for m in metrics if "step_seconds" in m]
    timed = steps[1:] or steps  # the first step includes CUDA and allocator warm-up
    step_s = statistics.median(m["step_seconds"] for m in timed)
    lengths = [m[key] for m in timed for key in ("completions/mean_length", "completion_length") if key in m]
    device = torch.cuda.get_device_name() if cuda else "cpu"
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in device), None)
    count = dict(length=length, recipe=recipe, matmul_params=matmul_params, peak=peak)
    record = {
        "stage": args.stage,
        "arch": args.arch,
        "date": datetime.date.today().isoformat(),
        "device": device,
        "quantization": args.quantization,
        "prompt_tokens": args.prompt_tokens,
        "completion_tokens": args.completion_tokens,
        "sequence_tokens": length,
        "activation_checkpointing": args.activation_checkpointing,
        "recipe": str(args.recipe) if args.recipe else None,
        "steps": len(steps),
        **speed(args, step_s, completion_length=statistics.fmean(lengths) if lengths else 0.0, **count),
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3) if cuda else None,
        "wall_seconds": round(wall, 1),
        "overrides": args.overrides,
        "versions": {m: __import__(m).__version__ for m in ("torch", "transformers", "trl", "peft", "bitsandbytes")},
    }
    if args.stage in ("grpo", "ppo"):
        record.update(prompts_per_step=args.prompts_per_step, reward_model=args.reward_model)
        if args.stage == "grpo":
            record["num_generations"] = args.num_generations
        else:
            record["batch_size"] = args.batch_size
    else:
        record.update(batch_size=args.batch_size, matmul_params=matmul_params)
    if args.baseline:
        measured = baseline(args, work, length)
        timed_lengths = measured.pop("completion_lengths")[1:]
        measured.update(speed(args, measured["seconds_per_step"], **count,
                              completion_length=statistics.fmean(timed_lengths) if timed_lengths else 0.0))
        record["baseline_trl"] = measured
    return record


def baseline(args, work: Path, length: int) -> dict:
    """bench/baseline_trl.py on the same base and data, in its own process (its own peak memory)."""
    batch = args.prompts_per_step * args.num_generations if args.stage == "grpo" else args.batch_size
    command = [sys.executable, str(Path(__file__).with_name("baseline_trl.py")), args.stage,
               "--base", str(work / "base"), "--data", str(work / "data.jsonl"), "--length", str(length),
               "--batch-size", str(batch // args.accumulation), "--gradient-accumulation-steps",
               str(args.accumulation), *([] if args.activation_checkpointing else ["--no-gradient-checkpointing"]),
               "--steps", str(args.steps), "--num-generations", str(args.num_generations),
               "--prompt-tokens", str(args.prompt_tokens), "--completion-tokens", str(args.completion_tokens)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the baseline failed (exit {done.returncode}): {' '.join(command)}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--arch", required=True,
                        help=f"a config in bench/archs: {', '.join(sorted(p.stem for p in ARCHS.glob('*.json')))}")
    parser.add_argument("--steps", type=int, default=6, help="training steps; the first is not timed")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--completion-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8, help="sft: conversations, reward: pairs per step")
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--prompts-per-step", type=int, default=1)
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                        help="auto: the GPU if there is one; cpu: hide the GPUs (the CPU path, also for the baseline)")
    parser.add_argument("--quantization", default="nf4", choices=("nf4", "none"))
    parser.add_argument("--no-activation-checkpointing", dest="activation_checkpointing", action="store_false")
    parser.add_argument("--recipe", type=Path, default=None,
                        help="a recipe whose stage section (batch, gradient accumulation, lengths, checkpointing), "
                        "model and LoRA settings to run with, every sequence as long as its max_length allows; "
                        "replaces --batch-size, --prompt-tokens, --completion-tokens, --num-generations, "
                        "--prompts-per-step")
    parser.add_argument("--reward-model", default="none", choices=("none", "shared", "own"),
                        help="add a reward_model reward (an untrained checkpoint on the same base): on the policy's "
                        "base (shared) or on its own copy (own)")
    parser.add_argument("--baseline", action="store_true",
                        help="also run bench/baseline_trl.py (stock TRL + PEFT) on the same base and data (sft, "
                        "reward, grpo; TRL 1.16 has no PPOTrainer to compare PPO with)")
    parser.add_argument("--work", type=Path, default=None,
                        help="keep the built base (and runs) here and reuse it (default: a temporary dir)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="JSON-lines file the record is appended to")
    parser.add_argument("overrides", nargs="*", help="more recipe overrides, key=value")
    args = parser.parse_intermixed_args(argv)  # overrides may follow the options
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not (ARCHS / f"{args.arch}.json").is_file():
        parser.error(f"no bench/archs/{args.arch}.json")
    if args.device == "cpu":  # before CUDA is initialised; the baseline's process inherits it
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    elif args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is visible here")
    args.accumulation = 1
    if args.recipe:
        size_from_recipe(args)
    if args.baseline and args.stage == "ppo":
        parser.error("--baseline: TRL 1.16 has no PPOTrainer, so there is no stock PPO to compare with")
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
        record = measure(args, args.work)
    else:
        with tempfile.TemporaryDirectory(prefix="align-bench-") as tmp:
            record = measure(args, Path(tmp))
    print(json.dumps(record, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
