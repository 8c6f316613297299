"""The public fused ops: ``linear_logprobs`` and ``linear_token_kl``.

Each checks its arguments (errors name the argument), asks ``expo_kernels._dispatch.plan`` for the
backend and execution path and calls the registered op (``expo_kernels.autograd``), or the vocab-parallel path when the head is
sharded over a process group (``expo_kernels.distributed``).
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Literal, TypeVar, cast, overload

import torch
from torch import Tensor

from . import _dispatch as dispatch
from . import _validation as checks
from .autograd import linear_logprobs_op, linear_token_kl_op
from .distributed.zero3 import gathers_zero3_heads
from .ops.common import LogitTransform, TokenStats, topk_logits

__all__ = ["linear_logprobs", "linear_token_kl", "TokenStats"]

_T = TypeVar("_T")


class HeadAutocast:
    """``torch.autocast`` for one call over an LM head, as ``F.linear`` has it (docs/design.md, "Mixed
    precision"): inside a region of the device type of the call's first tensor, :meth:`cast` casts a GEMM
    operand (hidden states, weight, bias, the reference head) to the region's dtype, and :meth:`region`
    runs the call with autocast off, so that nothing recasts the float32 accumulation after it. Outside
    a region both do nothing (mixed dtypes then raise the op's ``TypeError``).

    Made by :func:`head_autocast`; used by every entry point (the public functions and the loss modules),
    before anything is planned or checked, so that the plan sees the dtype the call computes in."""

    def __init__(self, like: object) -> None:
        device = like.device if isinstance(like, Tensor) else None
        self.device_type = device.type if device is not None else None
        self.dtype = dispatch.autocast_dtype(device) if device is not None else None
        self._done: list[tuple[Tensor, Tensor]] = []

    def cast(self, t: _T) -> _T:
        """``t`` in the autocast dtype: a floating tensor other than float64 (left alone, as autocast
        does); anything else unchanged. The cast is differentiable: a float32 master weight gets its
        gradient in float32. A tensor cast twice in one call is cast once (a head shared by the policy
        and the reference is read from one copy)."""
        if self.dtype is None or not isinstance(t, Tensor):
            return t
        if not t.is_floating_point() or t.dtype in (torch.float64, self.dtype):
            return t
        for src, out in self._done:
            if src is t:
                return cast(_T, out)
        out = t.to(self.dtype)
        self._done.append((t, out))
        return cast(_T, out)

    def region(self) -> AbstractContextManager:
        """The context the call runs in: autocast off for its device type inside a region, else nothing."""
        if self.dtype is None or self.device_type is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, enabled=False)


def head_autocast(like: object) -> HeadAutocast:
    """The :class:`HeadAutocast` of a call whose tensors live on ``like``'s device (its hidden states);
    a no-op one for anything that is not a tensor (the call's checks then report it)."""
    return HeadAutocast(like)


def _sharded(process_group) -> bool:
    return process_group is not None and dispatch.group_size(process_group) > 1


@overload
def linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None = None,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    logit_scale: float | None = None,
    softcap: float | None = None,
    return_stats: Literal[False] = False,
    topk: None = None,
    backend: str | None = None,
    process_group=None,
) -> Tensor: ...


@overload
def linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None = None,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    logit_scale: float | None = None,
    softcap: float | None = None,
    return_stats: Literal[True],
    topk: int | None = None,
    backend: str | None = None,
    process_group=None,
) -> tuple[Tensor, TokenStats]: ...


@overload
def linear_logprobs(  # return_stats known only at run time
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None = None,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    logit_scale: float | None = None,
    softcap: float | None = None,
    return_stats: bool,
    topk: int | None = None,
    backend: str | None = None,
    process_group=None,
) -> Tensor | tuple[Tensor, TokenStats]: ...


@gathers_zero3_heads("weight", "bias")  # a ZeRO-3 head: gathered for this call (distributed.zero3)
def linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None = None,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    logit_scale: float | None = None,
    softcap: float | None = None,
    return_stats: bool = False,
    topk: int | None = None,
    backend: str | None = None,
    process_group=None,
) -> Tensor | tuple[Tensor, TokenStats]:
    """Per-token ``log softmax(z)[label]`` of ``z = softcap(hidden @ weight.T + bias) ...`` without
    ever materializing ``[tokens, vocab]`` logits.

    Args:
        hidden: ``[..., H]`` float32/bfloat16/float16/float64, any strides.
        weight: ``[V, H]`` LM-head weight, same dtype and device as ``hidden``.
        labels: ``[...]`` integer (``hidden.shape[:-1]``), each in ``[0, V)`` or ``ignore_index``.
        bias: optional ``[V]``.
        temperature, logit_scale, softcap: the logit transform
            ``z = softcap * tanh(raw * logit_scale / softcap) / temperature`` (see ``LogitTransform``).
        return_stats: also return ``TokenStats`` (no gradient, except ``topk_values``).
        topk: with ``return_stats=True``, also the ``k`` largest transformed logits per token from the
            same pass (``TokenStats.topk_values [..., k]`` float32, differentiable: a loss on them reaches
            ``hidden`` and only the selected rows of ``weight``/``bias``) and their vocabulary ids
            (``TokenStats.topk_indices [..., k]`` int64); value descending, the lower id first on ties;
            values 0 and ids -1 at ignored tokens. ``1 <= k <= min(32, V)`` (``k > V`` raises). Not
            with a vocab-parallel ``process_group``.
        backend: ``"triton"``, ``"native"`` or ``"torch"``; default from ``$EXPO_KERNELS_BACKEND`` or the
            device (Triton for CUDA tensors, the native C++ backend for CPU tensors when it builds).
            The execution path (fused kernels, library GEMMs, kept logits) is ``expo_kernels.plan``'s
            choice (``kernel_options(path=...)`` forces one; docs/design.md, "Execution paths").
        process_group: a ``torch.distributed`` group over which the head is sharded along the
            vocabulary: ``weight``/``bias`` are then this rank's ``torch.chunk(W, world_size)[rank]``
            rows, ``hidden``/``labels`` replicated, labels global ids (see
            :func:`expo_kernels.distributed.vocab_parallel_linear_logprobs`). Ignored when the group
            has one rank.

    Returns:
        ``logp`` shaped like ``labels``, float32 (float64 for float64 inputs), exactly 0 at ignored
        positions, differentiable
        w.r.t. ``hidden``, ``weight`` and ``bias``; with ``return_stats``, ``(logp, TokenStats)``.

    Inside ``torch.autocast``, ``hidden``, ``weight`` and ``bias`` are cast to the region's dtype first,
    as ``F.linear``'s operands are (float64 ones are left alone); accumulation stays float32 and the
    gradients reach the uncast tensors in their own dtype (docs/design.md, "Mixed precision").
    """
    ac = head_autocast(hidden)
    hidden, weight, bias = ac.cast(hidden), ac.cast(weight), ac.cast(bias)
    with ac.region():
        return _linear_logprobs(
            hidden,
            weight,
            labels,
            bias,
            ignore_index=ignore_index,
            temperature=temperature,
            logit_scale=logit_scale,
            softcap=softcap,
            return_stats=return_stats,
            topk=topk,
            backend=backend,
            process_group=process_group,
        )


def _linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None,
    *,
    ignore_index: int,
    temperature: float,
    logit_scale: float | None,
    softcap: float | None,
    return_stats: bool,
    topk: int | None,
    backend: str | None,
    process_group,
) -> Tensor | tuple[Tensor, TokenStats]:
    """:func:`linear_logprobs` on the operands it computes with (autocast applied)."""
    checks.check_bool("return_stats", return_stats)
    checks.check_backend_name(backend)
    if topk is not None and _sharded(process_group):
        raise NotImplementedError(
            "topk is not supported with a vocab-parallel process_group (merging the ranks' top-k is not "
            "implemented); gather the head or call without topk"
        )
    if _sharded(process_group):
        from .distributed import vocab_parallel_linear_logprobs

        return vocab_parallel_linear_logprobs(
            hidden,
            weight,
            labels,
            bias,
            process_group=process_group,
            ignore_index=ignore_index,
            temperature=temperature,
            logit_scale=logit_scale,
            softcap=softcap,
            return_stats=return_stats,
            backend=backend,
        )
    checks.check_linear_head(hidden, weight, labels, bias)
    checks.check_topk(topk, weight.shape[0], return_stats)
    dispatch.check_scalars(temperature, logit_scale, softcap, ignore_index)
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])
    plan = dispatch.plan_linear_logprobs(hidden_2d, weight, bias, topk=topk, backend=backend)
    out = linear_logprobs_op(
        hidden_2d,
        weight,
        bias,
        labels.reshape(-1),
        *dispatch.scalar_args(ignore_index, logit_scale, softcap, temperature),
        return_stats,
        topk or 0,
        plan.backend,
        plan.path.value,
    )
    logp = out[0].view(labels.shape)
    if not return_stats:
        return logp
    stats = TokenStats(*(t.detach().view(labels.shape) for t in (out[1],) + tuple(out[2:6])))
    if topk is None:
        return logp, stats
    ids = out[6]
    # the kernel chose the ids in one pass over the vocabulary; the values are recomputed from the k
    # selected weight rows so that autograd gives the sparse update (O(N k H), no [N, V] anywhere)
    transform = LogitTransform(*dispatch.scalar_args(ignore_index, logit_scale, softcap, temperature)[1:])
    values = topk_logits(hidden_2d, weight, bias, ids, transform)
    shape = (*labels.shape, topk)
    return logp, stats._replace(topk_values=values.view(shape), topk_indices=ids.view(shape))


@gathers_zero3_heads("weight", "bias", "ref_weight", "ref_bias")
def linear_token_kl(
    hidden: Tensor,
    weight: Tensor,
    ref_hidden: Tensor,
    ref_weight: Tensor,
    labels: Tensor,
    bias: Tensor | None = None,
    ref_bias: Tensor | None = None,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    logit_scale: float | None = None,
    softcap: float | None = None,
    backend: str | None = None,
    process_group=None,
) -> Tensor:
    """Per-token ``KL(pi_ref || pi_theta)`` over the full vocabulary, without ``[tokens, vocab]`` logits.

    ``KL_n = sum_v q_v (zr_v - zp_v) - lse(zr) + lse(zp)`` with ``q = softmax(zr)``; EXPO's explicit
    regularizer (``kl_estimator="token"``) and the distillation loss use it.

    Args:
        hidden, weight, bias: the policy head (``[..., H]``, ``[V, H]``, ``[V]``); differentiable.
        ref_hidden, ref_weight, ref_bias: the frozen reference head over the same tokens
            (``[..., Hr]``, ``[V, Hr]``, ``[V]``); no gradient flows to them.
        labels: ``[...]``; only marks which tokens count (``ignore_index`` -> KL 0, no gradient).
        temperature, logit_scale, softcap: the logit transform, applied to both heads.
        process_group: vocab-parallel group: both heads are this rank's vocab shards (see
            :func:`expo_kernels.distributed.vocab_parallel_linear_token_kl`); ignored with one rank.

    Returns:
        ``[...]`` shaped like ``labels``, float32 (float64 for float64 inputs).

    Inside ``torch.autocast`` both heads' operands are cast to the region's dtype first, as in
    :func:`linear_logprobs`.
    """
    ac = head_autocast(hidden)
    hidden, weight, bias = ac.cast(hidden), ac.cast(weight), ac.cast(bias)
    ref_hidden, ref_weight, ref_bias = ac.cast(ref_hidden), ac.cast(ref_weight), ac.cast(ref_bias)
    with ac.region():
        return _linear_token_kl(
            hidden,
            weight,
            ref_hidden,
            ref_weight,
            labels,
            bias,
            ref_bias,
            ignore_index=ignore_index,
            temperature=temperature,
            logit_scale=logit_scale,
            softcap=softcap,
            backend=backend,
            process_group=process_group,
        )


def _linear_token_kl(
    hidden: Tensor,
    weight: Tensor,
    ref_hidden: Tensor,
    ref_weight: Tensor,
    labels: Tensor,
    bias: Tensor | None,
    ref_bias: Tensor | None,
    *,
    ignore_index: int,
    temperature: float,
    logit_scale: float | None,
    softcap: float | None,
    backend: str | None,
    process_group,
) -> Tensor:
    """:func:`linear_token_kl` on the operands it computes with (autocast applied)."""
    checks.check_backend_name(backend)
    if _sharded(process_group):
        from .distributed import vocab_parallel_linear_token_kl

        return vocab_parallel_linear_token_kl(
            hidden,
            weight,
            ref_hidden,
            ref_weight,
            labels,
            bias,
            ref_bias,
            process_group=process_group,
            ignore_index=ignore_index,
            temperature=temperature,
            logit_scale=logit_scale,
            softcap=softcap,
            backend=backend,
        )
    checks.check_linear_head(hidden, weight, labels, bias)
    checks.check_linear_head(ref_hidden, ref_weight, labels, ref_bias, prefix="ref_")
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(
            f"ref_weight must have the policy's vocabulary size V = {weight.shape[0]}, got {ref_weight.shape[0]}"
        )
    if ref_hidden.dtype != hidden.dtype:
        raise TypeError(f"ref_hidden.dtype ({ref_hidden.dtype}) must match hidden.dtype ({hidden.dtype})")
    checks.check_same_device(hidden=hidden, ref_hidden=ref_hidden)
    dispatch.check_scalars(temperature, logit_scale, softcap, ignore_index)
    kl, _, _ = linear_token_kl_op(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        bias,
        ref_hidden.reshape(-1, ref_hidden.shape[-1]),
        ref_weight,
        ref_bias,
        labels.reshape(-1),
        *dispatch.scalar_args(ignore_index, logit_scale, softcap, temperature),
        dispatch.resolve_backend(backend, hidden.device, hidden.dtype),
    )
    return kl.view(labels.shape)
