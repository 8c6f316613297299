"""Kernels on plain tensors: compacted tokens in, per-token partial states and gradients out.

Every backend module (``torch_backend``, the readable specification; ``native_backend``;
``triton_backend``) implements :class:`Backend`. Tokens arrive compacted (no ``ignore_index`` rows),
contiguous, with int64 labels that are global vocabulary ids; the weight may be any strided
``[V_s, H]`` slice of the vocabulary starting at id ``vocab_start``. The forward returns the raw
partial state of the online softmax (``ops.state``); ``forward`` and ``token_kl_forward`` below
finalize it, and the vocab-parallel path merges the ranks' states first.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from .common import LogitTransform, TokenOutputs, TokenStats
from .state import LogprobState, TokenKLState, finalize_logprobs, finalize_token_kl

__all__ = ["Backend", "LogitTransform", "TokenOutputs", "TokenStats", "forward", "token_kl_forward"]

Grads = tuple[Tensor | None, Tensor | None, Tensor | None]


class Backend(Protocol):
    """The contract every backend module implements (shapes per call; N = counted tokens).

    Inputs: ``hidden [N, H]`` and ``ref_hidden [N, Hr]`` contiguous; ``weight [V_s, H]``,
    ``ref_weight [V_s, Hr]`` any strides, the same dtype (float32, bfloat16, float16; float64 on
    the torch and native backends); ``bias``/``ref_bias [V_s]`` or None; ``labels [N]`` int64
    global ids; ``lse``/``lse_p``/``lse_r``/``grad [N]`` float32 (float64 for float64 inputs).
    Partial states and accumulators are float32 (float64 for float64 inputs); gradients come back in
    the dtype of the tensor they belong to, None where not asked for.

    ``topk=k`` (keyword; 0 for none): the forward's state also carries each token's k largest
    transformed logits of the range and their global ids (``LogprobState.topk_values``/``topk_ids``).
    A backend module may take further keyword options of its own after these (the Triton backend's
    ``config``, ``vocab_splits``); ``_dispatch.backend_module`` returns a module typed as this
    Protocol, so mypy checks each module against it.
    """

    def forward_partial(
        self,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        labels: Tensor,
        transform: LogitTransform,
        with_stats: bool,
        vocab_start: int = 0,
        *,
        topk: int = 0,
    ) -> LogprobState: ...

    def backward(
        self,
        grad_logp: Tensor,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        labels: Tensor,
        lse: Tensor,
        transform: LogitTransform,
        need_hidden: bool,
        need_weight: bool,
        need_bias: bool,
        vocab_start: int = 0,
    ) -> Grads: ...

    def token_kl_forward_partial(
        self,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        ref_hidden: Tensor,
        ref_weight: Tensor,
        ref_bias: Tensor | None,
        transform: LogitTransform,
    ) -> TokenKLState: ...

    def token_kl_backward(
        self,
        grad_kl: Tensor,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        ref_hidden: Tensor,
        ref_weight: Tensor,
        ref_bias: Tensor | None,
        lse_p: Tensor,
        lse_r: Tensor,
        transform: LogitTransform,
        need_hidden: bool,
        need_weight: bool,
        need_bias: bool,
    ) -> Grads: ...


def forward(
    backend: Backend,
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    transform: LogitTransform,
    with_stats: bool,
) -> TokenOutputs:
    """Per-token results of the whole head on one backend: ``finalize(backend.forward_partial(...))``."""
    return finalize_logprobs(
        backend.forward_partial(hidden, weight, bias, labels, transform, with_stats), weight.shape[0]
    )


def token_kl_forward(
    backend: Backend,
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    ref_hidden: Tensor,
    ref_weight: Tensor,
    ref_bias: Tensor | None,
    transform: LogitTransform,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(kl, lse_p, lse_r)`` of the whole heads on one backend."""
    return finalize_token_kl(
        backend.token_kl_forward_partial(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, transform)
    )
