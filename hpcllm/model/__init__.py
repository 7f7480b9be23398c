"""The GPT model (plain PyTorch, knows nothing about ranks)."""
from hpcllm.model.gpt import (GPT, PRESETS, Block, GPTConfig, flops_per_token, init_parameters, lm_loss,
                              param_count, preset)

__all__ = ["GPT", "GPTConfig", "Block", "PRESETS", "preset", "param_count", "flops_per_token",
           "init_parameters", "lm_loss"]
