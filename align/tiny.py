"""The built-in offline base model: a byte-level BPE tokenizer and a ~1M-parameter Llama, pretrained on
data/corpus.txt so that it continues text about sums. It is what the quickstart and the tests align, and it
loads like any hub model: `AutoModelForCausalLM.from_pretrained("data/tiny-base")`.

    align tiny pretrain                       # rewrites data/tiny-base/ (about 13 minutes on 2 CPU cores)
    align tiny pretrain --steps 20 --out /tmp/tb

Pretraining is plain causal language modelling with TRL's SFTTrainer (packed text), full fine-tuning of a
randomly initialised model; the same seed gives the same weights.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from align.modeling import DEFAULT_CHAT_TEMPLATE
from align.rundir import replace_dir

EOS, PAD = "<|endoftext|>", "<|pad|>"
VOCAB_SIZE = 512
CONTEXT = 256


def train_tokenizer(corpus: Path):
    """Byte-level BPE with digits split one per token, which small models need to learn carrying."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(corpus)], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    tokenizer.model_max_length = CONTEXT
    return tokenizer


def build_model(tokenizer, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=CONTEXT,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def pretrain(
    out: Path = Path("data/tiny-base"),
    corpus: Path = Path("data/corpus.txt"),
    steps: int = 2000,
    seed: int = 0,
) -> Path:
    """Train tokenizer and model from scratch and write a Hugging Face model dir to `out` (replacing it)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tokenizer = train_tokenizer(corpus)
    model = build_model(tokenizer, seed)
    texts = [line for line in corpus.read_text().splitlines() if line.strip()]
    work = out.with_name(out.name + ".work")
    args = SFTConfig(
        output_dir=str(work),
        max_steps=steps,
        per_device_train_batch_size=32,
        learning_rate=3e-3,
        lr_scheduler_type="cosine",
        warmup_steps=min(100, steps // 10),
        weight_decay=0.01,
        max_length=128,
        packing=True,
        packing_strategy="wrapped",  # pretraining: documents run into each other, separated by EOS
        activation_checkpointing=False,  # a 1M-parameter model fits anywhere; checkpointing only slows it
        bf16=False,
        use_cpu=True,  # the tiny model trains fastest on the CPU; results do not depend on a GPU being present
        logging_steps=50,
        save_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}), processing_class=tokenizer
    )
    trainer.train()
    # Written beside `out` and renamed into place, so a killed pretrain never leaves a half model in data/.
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    replace_dir(staging, out)
    shutil.rmtree(work, ignore_errors=True)
    return out
