"""The same workload as bench/run.py, written the way a user would with stock TRL + PEFT + bitsandbytes (no align
code): 4-bit NF4 base, LoRA r=16 / alpha 32 / dropout 0.05 on all linear layers, gradient checkpointing, bf16. bench/run.py
calls it in its own process on the same saved base and data (`--baseline`); it can also run alone:

    python bench/baseline_trl.py sft --base DIR --data data.jsonl --length 514 --batch-size 8 --steps 8
    python bench/baseline_trl.py reward --base DIR --data data.jsonl --length 514 --batch-size 8 --steps 8

Prints one JSON record: seconds per step (median over all steps but the first), peak CUDA memory, and for GRPO
the mean completion length TRL logged at each step (bench/run.py counts tokens from it as it does for align).
There is no PPO baseline: TRL 1.16 has no PPOTrainer.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


class StepTimer:
    """Wall time of every optimizer step (generation included for GRPO), and the completion lengths TRL logs."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer.started = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                timer.seconds.append(time.perf_counter() - timer.started)

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "completions/mean_length" in logs:
                    timer.completion_lengths.append(logs["completions/mean_length"])

        self.seconds: list[float] = []
        self.completion_lengths: list[float] = []
        self.callback = Callback()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=("sft", "reward", "grpo"))
    parser.add_argument("--base", required=True, help="model + tokenizer dir (bench/run.py writes one)")
    parser.add_argument("--data", required=True, help="bench/run.py's data.jsonl (question, answer columns)")
    parser.add_argument("--length", type=int, required=True, help="sft, reward: tokens of a whole conversation")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="per micro-batch: sft: conversations; reward: pairs; grpo: completions")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1, help="micro-batches per step")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--completion-tokens", type=int, default=256)
    args = parser.parse_args(argv)

    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32  # the CPU path (its test) runs in float32
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    reward = args.stage == "reward"
    model = (AutoModelForSequenceClassification if reward else AutoModelForCausalLM).from_pretrained(
        args.base, dtype=dtype, device_map={"": 0 if cuda else "cpu"}, **({"num_labels": 1} if reward else {}),
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype))
    # align's default LoRA (recipe.LoraConfig), the common QLoRA settings; a reward model's score head is trained
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                             task_type="SEQ_CLS" if reward else "CAUSAL_LM")
    rows = load_dataset("json", data_files=args.data, split="train")
    common = dict(output_dir="/tmp/baseline-trl", max_steps=args.steps, logging_steps=1, save_strategy="no",
                  report_to="none", bf16=cuda, gradient_accumulation_steps=args.gradient_accumulation_steps,
                  gradient_checkpointing=args.gradient_checkpointing, learning_rate=1e-5)
    timer = StepTimer()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    prompt = lambda r: [{"role": "user", "content": r["question"]}]  # noqa: E731
    if args.stage in ("sft", "reward"):
        from trl import RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

        config_cls, trainer_cls = (RewardConfig, RewardTrainer) if reward else (SFTConfig, SFTTrainer)
        answers = {"chosen": "chosen", "rejected": "rejected"} if reward else {"completion": "answer"}
        if reward:
            model.config.pad_token_id = tokenizer.pad_token_id
        data = rows.map(lambda r: {"prompt": prompt(r), **{key: [{"role": "assistant", "content": r[column]}]
                                                           for key, column in answers.items()}},
                        remove_columns=rows.column_names)
        trainer = trainer_cls(model=model, args=config_cls(per_device_train_batch_size=args.batch_size,
                                                           max_length=args.length, **common),
                              train_dataset=data, processing_class=tokenizer, peft_config=peft_config,
                              callbacks=[timer.callback])
    else:
        from trl import GRPOConfig, GRPOTrainer

        def length(completions, **kwargs):  # the same rule as bench/run.py: a constant for equal lengths
            return [0.0 for _ in completions]

        data = rows.map(lambda r: {"prompt": prompt(r)}, remove_columns=rows.column_names)
        trainer = GRPOTrainer(model=model, reward_funcs=[length], train_dataset=data, processing_class=tokenizer,
                              peft_config=peft_config, callbacks=[timer.callback],
                              args=GRPOConfig(per_device_train_batch_size=args.batch_size,
                                              num_generations=args.num_generations,
                                              max_completion_length=args.completion_tokens,
                                              beta=0.04,  # align's default: the reference pass is part of the work
                                              **common))
    if not cuda:  # the CPU path only: TRL keeps a 4-bit model's trainable weights in bf16, the compute is float32
        for param in trainer.model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    trainer.train()
    timed = timer.seconds[1:] or timer.seconds
    print(json.dumps({"steps": len(timer.seconds), "seconds_per_step": round(statistics.median(timed), 3),
                      "completion_lengths": timer.completion_lengths,
                      "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
                      "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3) if cuda else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
