"""Distributed heads: the vocabulary-parallel ops (``vocab_parallel``) and FSDP2 heads (``fsdp``)."""

from .fsdp import fsdp_lm_head_call, is_fsdp2
from .vocab_parallel import (
    count_communication,
    vocab_parallel_linear_logprobs,
    vocab_parallel_linear_token_kl,
    vocab_shard_bounds,
)

__all__ = [
    "vocab_parallel_linear_logprobs",
    "vocab_parallel_linear_token_kl",
    "vocab_shard_bounds",
    "count_communication",
    "fsdp_lm_head_call",
    "is_fsdp2",
]
