"""The memory a stage will need, estimated from the model's config and the stage's batch before anything loads,
against what the machine has free (RAM on a CPU, the GPU's free memory on a GPU): a batch that cannot fit stops
in a second, naming the settings to lower, instead of swapping or being killed minutes in.

The estimate, in bytes (b = bytes per element of the compute dtype):
- weights: every linear layer of the transformer blocks in 4 bits (NF4, ~0.53 bytes a parameter with its
  quantisation constants) or in b bytes, plus the embeddings (and an untied LM head) in b bytes;
- LoRA: r x (in + out) per adapted linear layer, each trained adapter with its gradient and Adam's two moments
  (16 bytes a parameter);
- activations of one micro-batch: per token and layer, what backward keeps and the allocator holds at the peak,
  12 hidden + 4 key/value + 6 MLP-intermediate values (norm inputs and outputs, q/k/v before and after the
  rotary embedding, the attention output, the MLP's gate, up, activation and product; no attention matrix with
  SDPA; the counts were raised from the 10 + 2 + 4 tensors autograd saves to what a tiny-base SFT step measured),
  or one hidden state per layer with activation checkpointing; plus the LM head's logits over the vocabulary for
  the tokens whose loss counts (logits, log-softmax and their gradient: 3 copies);
- generation, for the stages that generate: a dense copy of the linear weights while generating on merged
  weights, and the KV cache of one generation batch.
On a CPU the process's own resident memory (Python, torch) is counted as already used. It is a bound-shaped
estimate, tested within 2x of the measured peak on the tiny base and on SmolLM2-135M.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from align.errors import AlignError

log = logging.getLogger(__name__)

GB = 1 << 30

class DoesNotFit(AlignError, MemoryError):
    """A stage's estimated memory is more than the machine has free."""


@dataclass
class Shape:
    """What the estimate reads from a transformers config."""

    hidden: int
    layers: int
    intermediate: int
    kv: int  # width of the keys (= of the values): kv heads x head dim
    vocab: int
    tied: bool

    @classmethod
    def of(cls, config) -> "Shape":
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        hidden = config.hidden_size
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        return cls(hidden=hidden, layers=config.num_hidden_layers,
                   intermediate=getattr(config, "intermediate_size", None) or 4 * hidden,
                   kv=(getattr(config, "num_key_value_heads", None) or heads) * head_dim, vocab=config.vocab_size,
                   tied=bool(getattr(config, "tie_word_embeddings", False)))

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of one block's linear layers: q, k, v, o, gate, up, down."""
        h, kv, i = self.hidden, self.kv, self.intermediate
        return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]


def estimate(shape: Shape, *, dtype_bytes: int, quantized: bool, lora_r: int, trained_adapters: int,
             adapters: int, micro_batch_tokens: int, loss_tokens: int, checkpointing: bool,
             generation_batch: int = 0, generation_tokens: int = 0, merged_generation: bool = False) -> dict[str, int]:
    """Bytes each part of a stage needs at its peak (see the module docstring)."""
    linear = shape.layers * sum(i * o for i, o in shape.linear_shapes())
    embeddings = shape.vocab * shape.hidden * (1 if shape.tied else 2)
    weights = int(linear * (0.53 if quantized else dtype_bytes)) + embeddings * dtype_bytes
    lora = shape.layers * sum(lora_r * (i + o) for i, o in shape.linear_shapes())
    adapters_bytes = lora * 4 * (adapters - trained_adapters) + lora * 16 * trained_adapters
    block = 12 * shape.hidden + 4 * shape.kv + 6 * shape.intermediate  # values a block keeps per token (measured)
    per_token_layer = shape.hidden if checkpointing else block
    activations = micro_batch_tokens * shape.layers * per_token_layer * dtype_bytes
    if checkpointing:  # one block's full activations are rebuilt at a time
        activations += micro_batch_tokens * block * dtype_bytes
    logits = loss_tokens * shape.vocab * 4 * 3
    parts = {"weights": weights, "adapters and optimizer": adapters_bytes, "activations": activations,
             "logits": logits}
    if generation_batch:
        kv_cache = generation_batch * generation_tokens * shape.layers * 2 * shape.kv * dtype_bytes
        dense = linear * dtype_bytes if merged_generation else 0
        generation_logits = generation_batch * shape.vocab * 4 * 2
        # Generation and the training step do not overlap: the larger of the two is the peak.
        extra = kv_cache + dense + generation_logits
        if extra > activations + logits:
            parts.update(activations=0, logits=0, generation=extra)
    return parts


def available() -> tuple[int, str]:
    """(bytes free for this process to grow into, what was measured)."""
    import torch

    from align.modeling import device

    where = device()
    if where.type == "cuda":
        free, _ = torch.cuda.mem_get_info(where)
        return free, f"free on {torch.cuda.get_device_name(where)}"
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info["MemAvailable"], "available RAM (MemAvailable)"


def resident() -> int:
    """This process's resident memory now, in bytes (what it has already: Python, torch, the tokenizer; in an
    `align run`, what malloc kept of the stages before is released first: `release_freed_memory`)."""
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def check(recipe, stage: str, train) -> dict[str, Any]:
    """Estimates `stage`'s peak memory for its batch, its sequences as long as the longest of its training data
    (`train`: the data.DataReport of the training file; a QA pair, a preference pair's longer side, or a prompt
    and max_completion_length), and stops with DoesNotFit, naming what to lower, when more than the machine has
    free would be needed. Logs the estimate; returns it ({} when the config cannot be read or lacks a field the
    estimate needs: loading the model then says what is wrong)."""
    import torch
    from transformers import AutoConfig

    from align.modeling import compute_dtype, device
    from align.registry import stage as registered

    spec = registered(stage)
    cfg = getattr(recipe, stage)
    try:
        config = AutoConfig.from_pretrained(recipe.model.name_or_path, revision=recipe.model.revision,
                                            trust_remote_code=recipe.model.trust_remote_code)
        shape = Shape.of(config)
    except (OSError, ValueError, AttributeError, TypeError) as e:  # loading the model says why, if it cannot load
        log.warning("%s: memory not estimated: %s's config does not say its shape (%s)", stage,
                    recipe.model.name_or_path, str(e).splitlines()[0] if str(e) else type(e).__name__)
        return {}

    dtype_bytes = torch.finfo(compute_dtype(recipe.model)).bits // 8
    batch = cfg.per_device_train_batch_size
    longest = max(train.lengths["total"])
    generates = spec.generates
    if generates:
        longest += cfg.max_completion_length
    sequences = batch * (2 if spec.data == "preference" else 1)  # a pair is two sequences
    # The LM head's logits where the loss reads them: none for a reward model (one score per sequence).
    loss_tokens = 0 if spec.head == "score" else sequences * (cfg.max_completion_length if generates else longest)
    on_cpu = device().type == "cpu"
    parts = estimate(
        shape, dtype_bytes=dtype_bytes, quantized=recipe.model.quantization.value == "nf4", lora_r=recipe.lora.r,
        trained_adapters=spec.trained_adapters, adapters=spec.adapters,
        # each trained adapter's forward keeps its activations (PPO: the policy's and the value model's)
        micro_batch_tokens=sequences * longest * spec.trained_adapters, loss_tokens=loss_tokens,
        checkpointing=bool(cfg.activation_checkpointing),
        generation_batch=getattr(cfg, spec.generation_batch) if generates else 0,
        generation_tokens=longest,
        merged_generation=bool(on_cpu if recipe.model.merged_generation is None else recipe.model.merged_generation))
    needed = sum(parts.values())
    free, measured = available()
    have = resident() if on_cpu else 0
    summary = ", ".join(f"{name} {value / GB:.2f}" for name, value in parts.items() if value)
    log.info("%s: estimated peak memory %.1f GB (%s GB%s), %.1f GB %s", stage, (needed + have) / GB, summary,
             f", and {have / GB:.1f} GB this process has already" if have else "", free / GB, measured)
    if needed > free:
        settings = "\n".join(f"  {stage}.{setting}" for setting in spec.memory_settings)
        raise DoesNotFit(
            f"the {stage} stage would need about {needed / GB:.1f} GB more memory ({summary} GB, for micro-batches "
            f"of {batch} x {longest} tokens), and {free / GB:.1f} GB is {measured}.\nLower, the biggest saving "
            f"first:\n{settings}")
    return {"estimated_peak_bytes": needed + have, "parts": parts, "free_bytes": free}


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def keep_freed_memory() -> str:
    """On a CPU, glibc's malloc keeps the memory tensors free for the next ones instead of handing it back to the
    kernel: no mmap for large blocks, no trimming of the heap. By default every block over 32 MB (a micro-batch's
    logits over a 49k vocabulary, its activations) is mmapped and unmapped when freed, and the heap's top is
    trimmed, so each step faults in and zeroes the same memory again: on SmolLM2's GRPO step about 200,000 page
    faults a second, a sixth of the CPU time in the kernel, and steps up to twice as slow once SFT and the reward
    stage had run in the same process (bench/README.md). The cost: the peak stays resident until the process ends.
    Left as it is on GPUs (their tensors are not malloc's), where the user chose (MALLOC_* variables, another
    allocator in LD_PRELOAD), and without glibc. Returns what was done, for the log."""
    import platform

    from align.modeling import device

    if device().type != "cpu":
        return "left as it is: tensors live on the GPU"
    chosen = sorted(k for k in os.environ if k.startswith("MALLOC_") or k == "LD_PRELOAD")
    if chosen:
        return f"left as set by {', '.join(chosen)}"
    if platform.libc_ver()[0] != "glibc":
        return "left as it is: not glibc"
    libc = ctypes.CDLL(None)
    if not (libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)):
        return "left as it is: mallopt refused the settings"
    return "glibc malloc keeps freed memory for reuse (no mmap for large blocks, no trimming)"


@contextmanager
def imports_left_out_of_garbage_collection():
    """For the imports a command needs before its first model: the cyclic garbage collector is off while they run,
    and every object alive at the end is collected once and then frozen out of its reach (`gc.freeze`). torch,
    transformers, TRL, PEFT and datasets are about half a million objects that live as long as the process:
    collecting while they are imported took 1.1 of the 6.3 s an align command took to start on a 2-core CPU, and
    every full collection after (Accelerate's at each `train()`, align's between stages, Python's own as training
    allocates) would scan them all again. Objects created later, models included, are collected as usual."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
        gc.collect()
        gc.freeze()
    finally:
        if enabled:
            gc.enable()


def release_freed_memory() -> int:
    """Hands what malloc holds free back to the kernel (glibc's malloc_trim, after a garbage collection frees the
    finished stage's models): between the stages of one `align run`, so that a process that kept SFT's freed
    memory (`keep_freed_memory`) does not carry it into the reward stage's peak. Returns the resident bytes
    released."""
    gc.collect()
    before = resident()
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)
    return max(0, before - resident())
