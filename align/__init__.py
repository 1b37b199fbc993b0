"""align: take an open base model through SFT, a reward model and RL (PPO/GRPO) with a KL penalty to the SFT
policy, with LoRA on a 4-bit base, under Accelerate."""

import logging
import warnings

__version__ = "0.1.0"

# Known-harmless notices of the dependencies, silenced here because this module is imported before any of them.
# - bitsandbytes (0.50) on a CPU with AVX-512 BF16 logs at import that the optional `kernels` package for its fused
#   bf16 inference kernel is missing; align never takes that path (modeling.keep_4bit_on_the_autograd_path).
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "kernels-community" not in record.getMessage())
# - PEFT (0.21) and TRL (1.16) read the `is_gradient_checkpointing` alias that transformers 5.2x deprecates; the
#   call is theirs, the value is right.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
