"""Distributed heads: the vocabulary-parallel ops (``vocab_parallel``), FSDP2 heads (``fsdp``) and
DeepSpeed ZeRO-3 heads (``zero3``), and the collectives of context (sequence) parallelism
(``context_parallel``: the modules' ``sequence_group``)."""

from .context_parallel import (
    check_sequence_shards,
    masked_means_across_ranks,
    max_across_ranks,
    sum_across_ranks,
)
from .fsdp import fsdp_lm_head_call, is_fsdp2
from .vocab_parallel import (
    count_communication,
    vocab_parallel_linear_logprobs,
    vocab_parallel_linear_token_kl,
    vocab_shard_bounds,
)
from .zero3 import gathers_zero3_heads, is_zero3_param, release_zero3_heads, zero3_gathered

__all__ = [
    "vocab_parallel_linear_logprobs",
    "vocab_parallel_linear_token_kl",
    "vocab_shard_bounds",
    "count_communication",
    "fsdp_lm_head_call",
    "is_fsdp2",
    "zero3_gathered",
    "is_zero3_param",
    "gathers_zero3_heads",
    "release_zero3_heads",
    "check_sequence_shards",
    "sum_across_ranks",
    "masked_means_across_ranks",
    "max_across_ranks",
]
