"""align: take an open base model through SFT, a reward model and RL (PPO/GRPO) with a KL penalty to the SFT
policy, with LoRA on a 4-bit base, under Accelerate."""

__version__ = "0.1.0"
