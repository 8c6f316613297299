"""Vocab-parallel fused log-probs and token KL over ``torch.distributed``.

Vocab (tensor) parallelism
==========================

The LM-head weight ``W [V, H]`` is split along the vocabulary over the ranks of a process group:
rank ``r`` holds ``torch.chunk(W, world_size, dim=0)[r]`` (contiguous shards, sizes may differ; a
rank beyond the chunks ``torch.chunk`` returns holds an empty ``[0, H]`` shard). Hidden states and
labels are replicated (every rank sees the same tokens); labels are global ids. Every rank runs the
ordinary single-process backend (``expo_kernels.ops``) on its shard and the per-token results are
combined with all-reduces of ``O(N)`` numbers: no ``[N, V]`` logits and no weight ever cross the wire.

Combining the ranks (docs/design.md, "Partial states"): each rank's backend folds its shard (global
label ids, ``vocab_start`` = the shard's first id) into the raw partial state of ``ops.state``: max
``m``, ``s = sum e^(z - m)``, the label logit where the label is on the shard (0 elsewhere), and with
statistics the shifted entropy sum, ``sum e^(2(z - m))``, the sum of finite logits and the max logit
before the label. The ranks merge exactly as Triton's vocab splits do, with the same functions:

* a MAX all-reduce of ``m`` (and ``max_before``): ``N`` floats (``2N`` with statistics);
* each rank moves its sums to the common max (``ops.state.sum_fields``) and a SUM all-reduce adds
  them: ``2N`` floats (``5N`` with statistics);
* ``finalize`` gives ``lse``, ``logp``, entropy, mean logit, ``is_top1`` (first maximum on ties) and
  ``log sum p^2``, identical on every rank.

Plus a ``world_size``-int all-gather of the shard sizes. Backward (``dL/dlogp = g``): each rank runs
the backend's ``backward`` on its shard with the GLOBAL ``lse`` and ``vocab_start``; a token whose
label lies on another shard gets no one-hot term here, exactly the single-process gradient
restricted to the shard's rows. ``d_weight`` / ``d_bias`` stay local; ``d_hidden`` of the valid
tokens is SUM all-reduced (``N H`` numbers, in float32 for 16-bit inputs) — the all-reduce every
tensor-parallel head needs anyway.

The two-head token KL merges its partial states (``m_p, s_p, m_r, s_r`` and the doubly shifted
``cross``) the same way: a MAX all-reduce of ``2N`` and a SUM all-reduce of ``3N`` floats; its
backward needs no correction (``dz = g (p - q)`` with the global ``lse_p``, ``lse_r``).

These functions are ``torch.autograd.Function`` s with collectives inside, not registered custom ops;
``torch.compile`` runs them eagerly (graph break). Every rank must call them with the same tokens
(same ``hidden`` shape, same ``labels``) and options — the caller's contract, not checked. Errors in
the replicated arguments (labels outside ``[0, V)``, options) are raised on every rank alike; a shard
that is malformed on one rank only raises there, and the other ranks wait in the next collective
until the group's timeout. Any contiguous split of the vocabulary in rank order works (offsets come
from one all-gather of the shard sizes); ``torch.chunk`` is the convention.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _dispatch as dispatch
from .. import _validation as checks
from ..ops import LogitTransform
from ..ops import state as online_state
from ..ops.common import TokenStats

__all__ = [
    "vocab_parallel_linear_logprobs",
    "vocab_parallel_linear_token_kl",
    "vocab_shard_bounds",
    "count_communication",
]


def _disable_compile(fn):
    """``torch.compiler.disable(fn)``, built on the first call: wrapping at import time would import
    torch._dynamo -- about 1.5 s and 160 MB of resident memory -- for every user of the package."""
    disabled = []

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if not disabled:
            disabled.append(torch.compiler.disable(fn))
        return disabled[0](*args, **kwargs)

    return call


# ---------------------------------------------------------------------------------------------
# collectives (all traffic goes through these two functions, so it can be counted)
# ---------------------------------------------------------------------------------------------

_COUNTERS: list[dict[str, int]] = []


@contextlib.contextmanager
def count_communication():
    """Count the collectives issued by this module on this rank: yields a dict with
    ``all_reduce_calls``, ``all_reduce_bytes``, ``all_gather_calls``, ``all_gather_bytes``
    (bytes of the local input tensor of each call)."""
    counter = {"all_reduce_calls": 0, "all_reduce_bytes": 0, "all_gather_calls": 0, "all_gather_bytes": 0}
    _COUNTERS.append(counter)
    try:
        yield counter
    finally:
        _COUNTERS.remove(counter)


def _count(kind: str, t: Tensor) -> None:
    for c in _COUNTERS:
        c[f"{kind}_calls"] += 1
        c[f"{kind}_bytes"] += t.numel() * t.element_size()


def _all_reduce(t: Tensor, op, group) -> Tensor:
    _count("all_reduce", t)
    dist.all_reduce(t, op=op, group=group)
    return t


def _all_gather_sizes(n: int, device, group) -> list[int]:
    world = dist.get_world_size(group)
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    out = [torch.empty_like(mine) for _ in range(world)]
    _count("all_gather", mine)
    dist.all_gather(out, mine, group=group)
    return [int(t.item()) for t in out]


def _group(process_group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("vocab-parallel expo_kernels ops need torch.distributed initialized (init_process_group)")
    return process_group if process_group is not None else dist.group.WORLD


def _comm_device(t: Tensor, group) -> torch.device:
    """Where the group's backend takes small bookkeeping tensors: CUDA for NCCL, else the CPU (gloo)."""
    if dist.get_backend(group) == "nccl":
        return t.device if t.device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def vocab_shard_bounds(vocab_size: int, world_size: int, rank: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s rows in ``torch.chunk(W, world_size, dim=0)`` (empty past
    the last chunk)."""
    step = -(-vocab_size // world_size)
    start = min(rank * step, vocab_size)
    return start, min(start + step, vocab_size)


def _layout(weight_shard: Tensor, group, vocab_size: int | None) -> tuple[int, int, list[int]]:
    """(offset of this rank's shard, global V, all shard sizes) from one all-gather of sizes."""
    sizes = _all_gather_sizes(weight_shard.shape[0], _comm_device(weight_shard, group), group)
    rank = dist.get_rank(group)
    total = sum(sizes)
    if vocab_size is not None and total != vocab_size:
        raise ValueError(f"the weight shards' sizes {sizes} add up to {total}, not vocab_size={vocab_size}")
    if total == 0:
        raise ValueError("weight_shard: the shards hold no vocabulary rows at all (V = 0)")
    return sum(sizes[:rank]), total, sizes


def _check_head(hidden, weight, labels, bias, prefix=""):
    if weight.dim() == 2 and weight.shape[0] == 0:  # an empty shard: check the rest
        checks.check_tensor(f"{prefix}weight_shard", weight, floating=True)
        if weight.shape[1] != hidden.shape[-1]:
            raise ValueError(
                f"{prefix}weight_shard must have shape [V_shard, H] with H = {hidden.shape[-1]}, "
                f"got {tuple(weight.shape)}"
            )
        if weight.dtype != hidden.dtype:
            raise TypeError(f"{prefix}weight_shard.dtype ({weight.dtype}) must match hidden.dtype ({hidden.dtype})")
        return
    checks.check_linear_head(hidden, weight, labels, bias, prefix=prefix)


# ---------------------------------------------------------------------------------------------
# log-probs
# ---------------------------------------------------------------------------------------------


def _vp_forward(h, w, b, y, transform, with_stats, offset, vocab, group, mod):
    """Compacted tokens h [n, H], global labels y [n] -> TokenOutputs over the whole vocabulary: this
    shard's partial state, merged with the other ranks' by a MAX and a SUM all-reduce (``ops.state``)."""
    acc = dispatch.result_dtype(h.dtype)
    if h.shape[0] == 0:  # every token ignored (the same on every rank): nothing to combine
        return online_state.finalize_logprobs(online_state.empty_logprob_state(0, with_stats, acc, h.device), vocab)
    state = mod.forward_partial(h, w, b, y, transform, with_stats, vocab_start=offset)
    state = online_state.LogprobState(*(None if t is None else t.to(acc) for t in state))
    maxes = _all_reduce(online_state.reduce_max_fields(state), dist.ReduceOp.MAX, group)
    sums = _all_reduce(online_state.sum_fields(state, maxes[0]), dist.ReduceOp.SUM, group)
    return online_state.finalize_logprobs(online_state.from_reduced(maxes, sums), vocab)


class _VocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, transform, with_stats, backend, group, offset, vocab):
        n = labels.shape[0]
        rows, y, pick = dispatch.counted_rows(labels, ignore_index, vocab)
        h = pick(hidden).contiguous()
        mod = dispatch.recompute_module(backend, hidden.device, hidden.dtype, weight.shape[0])
        out = _vp_forward(h, weight, bias, y, transform, with_stats, offset, vocab, group, mod)
        finite_results = (out.lse,) + ((out.entropy, out.mean_logit, out.log_sum_p2) if with_stats else ())
        dispatch.check_finite(
            {"hidden": h, "weight_shard": weight}, {"bias_shard": bias}, finite_results, dataclasses.asdict(transform)
        )
        dtype = dispatch.result_dtype(hidden.dtype)

        def scatter(t, fill_dtype=dtype):
            return hidden.new_empty(0, dtype=fill_dtype) if t is None else dispatch.scatter(t, rows, n)

        logp, lse = scatter(out.logp), scatter(out.lse)
        stats = [
            scatter(out.entropy),
            scatter(out.mean_logit),
            scatter(out.is_top1, torch.bool),
            scatter(out.log_sum_p2),
        ]
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.params = (ignore_index, transform, backend, group, offset, vocab)
        ctx.mark_non_differentiable(lse, *stats)
        return (logp, lse, *stats)

    @staticmethod
    def backward(ctx, grad_logp, *_):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        ignore_index, transform, backend, group, offset, vocab = ctx.params
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and bias is not None
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        rows, y, pick = dispatch.counted_rows(labels, ignore_index, vocab)
        acc = dispatch.result_dtype(hidden.dtype)
        # the single-process backward restricted to this shard's rows: labels elsewhere add no one-hot term
        d_h, d_w, d_b = dispatch.recompute_module(backend, hidden.device, hidden.dtype, weight.shape[0]).backward(
            pick(grad_logp).to(acc).contiguous(),
            pick(hidden).contiguous(),
            weight,
            bias,
            y,
            pick(lse).to(acc).contiguous(),
            transform,
            need_h,
            need_w,
            need_b,
            vocab_start=offset,
        )
        if need_h:
            d_h = d_h.to(acc)  # summed over the ranks in float32 for 16-bit inputs
            if d_h.shape[0] > 0:  # only the valid tokens' rows travel; all ignored (on every rank): none
                d_h = _all_reduce(d_h, dist.ReduceOp.SUM, group)
            if rows is not None:
                d_h = torch.zeros(hidden.shape, dtype=d_h.dtype, device=d_h.device).index_copy_(0, rows, d_h)
            d_h = d_h.to(hidden.dtype)
        return (
            d_h,
            None if d_w is None else d_w.to(weight.dtype),
            None if d_b is None else d_b.to(bias.dtype),
            *([None] * 8),
        )


@_disable_compile
def vocab_parallel_linear_logprobs(
    hidden: Tensor,
    weight_shard: Tensor,
    labels: Tensor,
    bias_shard: Tensor | None = None,
    *,
    process_group=None,
    vocab_size: int | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    logit_scale: float | None = None,
    softcap: float | None = None,
    return_stats: bool = False,
    backend: str | None = None,
):
    """:func:`expo_kernels.linear_logprobs` with the LM head sharded along the vocabulary.

    Args:
        hidden: ``[..., H]``, identical on every rank of ``process_group`` (replicated, as in tensor
            parallelism); its gradient is summed over the ranks in backward.
        weight_shard: ``[V_r, H]`` this rank's rows, ``torch.chunk(W, world_size, dim=0)[rank]``
            (contiguous, in rank order; sizes may differ; may be empty). Its gradient stays local.
        labels: ``[...]`` GLOBAL token ids in ``[0, V)`` or ``ignore_index``, identical on every rank.
        bias_shard: optional ``[V_r]`` matching ``weight_shard``.
        process_group: the vocab-parallel group (default: the world group).
        vocab_size: optional global ``V``, checked against the shards' total.
        ignore_index, temperature, logit_scale, softcap, return_stats, backend: as in
            :func:`~expo_kernels.linear_logprobs` (statistics are global, over the full vocabulary;
            asking for them costs one extra matmul pass over the shard, for ``is_top1``).

    Returns:
        ``logp`` shaped like ``labels`` (the same on every rank), or ``(logp, TokenStats)``.
    """
    group = _group(process_group)
    checks.check_tensor("hidden", hidden, floating=True)
    checks.check_tensor("weight_shard", weight_shard, floating=True)
    checks.check_tensor("labels", labels, integer=True)
    if weight_shard.dim() != 2:
        raise ValueError(f"weight_shard must have shape [V_shard, H], got shape {tuple(weight_shard.shape)}")
    _check_head(hidden, weight_shard, labels, bias_shard)
    dispatch.check_scalars(temperature, logit_scale, softcap, ignore_index)
    offset, vocab, _ = _layout(weight_shard, group, vocab_size)
    transform = LogitTransform(
        float(logit_scale) if logit_scale is not None else 1.0,
        float(softcap) if softcap is not None else None,
        float(temperature),
    )
    out = _VocabParallelLogprobs.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        weight_shard,
        bias_shard,
        labels.reshape(-1),
        int(ignore_index),
        transform,
        bool(return_stats),
        dispatch.resolve_backend(backend, hidden.device, hidden.dtype),
        group,
        offset,
        vocab,
    )
    logp = out[0].view(labels.shape)
    if not return_stats:
        return logp
    return logp, TokenStats(*(t.detach().view(labels.shape) for t in (out[1],) + tuple(out[2:])))


# ---------------------------------------------------------------------------------------------
# two-head token KL
# ---------------------------------------------------------------------------------------------


class _VocabParallelTokenKL(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        bias,
        ref_hidden,
        ref_weight,
        ref_bias,
        labels,
        ignore_index,
        transform,
        backend,
        group,
        vocab,
    ):
        n = labels.shape[0]
        rows, _, pick = dispatch.counted_rows(labels, ignore_index, vocab)
        h, hr = pick(hidden).contiguous(), pick(ref_hidden).contiguous()
        acc = dispatch.result_dtype(hidden.dtype)
        if h.shape[0] == 0:  # every token ignored, on every rank
            state = online_state.empty_token_kl_state(0, acc, h.device)
        else:
            state = dispatch.backend_module(backend).token_kl_forward_partial(
                h, weight, bias, hr, ref_weight, ref_bias, transform
            )
            state = online_state.TokenKLState(*(t.to(acc) for t in state))
            maxes = _all_reduce(torch.stack([state.m_p, state.m_r]), dist.ReduceOp.MAX, group)
            sums = _all_reduce(online_state.token_kl_sum_fields(state, maxes[0], maxes[1]), dist.ReduceOp.SUM, group)
            state = online_state.TokenKLState(maxes[0], sums[0], maxes[1], sums[1], sums[2])
        kl, lse_p, lse_r = online_state.finalize_token_kl(state)
        dispatch.check_finite(
            {"hidden": h, "weight_shard": weight, "ref_hidden": hr, "ref_weight_shard": ref_weight},
            {"bias_shard": bias, "ref_bias_shard": ref_bias},
            (lse_p, lse_r),
            dataclasses.asdict(transform),
        )
        kl, lse_p, lse_r = (dispatch.scatter(t, rows, n) for t in (kl, lse_p, lse_r))
        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lse_p, lse_r)
        ctx.params = (ignore_index, transform, backend, group, vocab)
        ctx.mark_non_differentiable(lse_p, lse_r)
        return kl, lse_p, lse_r

    @staticmethod
    def backward(ctx, grad_kl, *_):
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lse_p, lse_r = ctx.saved_tensors
        ignore_index, transform, backend, group, vocab = ctx.params
        if any(ctx.needs_input_grad[3:6]):
            raise RuntimeError(
                "linear_token_kl: the reference head is frozen; detach ref_hidden / ref_weight / ref_bias"
            )
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and bias is not None
        acc = dispatch.result_dtype(hidden.dtype)
        rows, _, pick = dispatch.counted_rows(labels, ignore_index, vocab)
        h = pick(hidden).contiguous()
        d_h = d_w = d_b = None
        if weight.shape[0] > 0 and h.shape[0] > 0:
            d_h, d_w, d_b = dispatch.backend_module(backend).token_kl_backward(
                pick(grad_kl).to(acc).contiguous(),
                h,
                weight,
                bias,
                pick(ref_hidden).contiguous(),
                ref_weight,
                ref_bias,
                pick(lse_p),
                pick(lse_r),
                transform,
                need_h,
                need_w,
                need_b,
            )
        if need_h:
            part = d_h.to(acc) if d_h is not None else torch.zeros(h.shape, dtype=acc, device=h.device)
            if part.shape[0] > 0:  # only the valid tokens' rows travel
                part = _all_reduce(part, dist.ReduceOp.SUM, group)
            if rows is not None:
                part = torch.zeros(hidden.shape, dtype=acc, device=hidden.device).index_copy_(0, rows, part)
            d_h = part.to(hidden.dtype)
        if need_w and d_w is None:
            d_w = torch.zeros_like(weight)
        if need_b and d_b is None:
            d_b = torch.zeros_like(bias)
        return (d_h, d_w if need_w else None, d_b if need_b else None, *([None] * 9))


@_disable_compile
def vocab_parallel_linear_token_kl(
    hidden: Tensor,
    weight_shard: Tensor,
    ref_hidden: Tensor,
    ref_weight_shard: Tensor,
    labels: Tensor,
    bias_shard: Tensor | None = None,
    ref_bias_shard: Tensor | None = None,
    *,
    process_group=None,
    vocab_size: int | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    logit_scale: float | None = None,
    softcap: float | None = None,
    backend: str | None = None,
) -> Tensor:
    """:func:`expo_kernels.linear_token_kl` with both heads sharded along the vocabulary the same way
    (``ref_weight_shard`` holds the same rows of the reference head as ``weight_shard`` of the policy's).
    Returns the global per-token ``KL(pi_ref || pi_theta)`` shaped like ``labels``; gradient to the
    policy head only (``d_hidden`` summed over the ranks, shard gradients local)."""
    group = _group(process_group)
    for name, t in (
        ("hidden", hidden),
        ("weight_shard", weight_shard),
        ("ref_hidden", ref_hidden),
        ("ref_weight_shard", ref_weight_shard),
    ):
        checks.check_tensor(name, t, floating=True)
    checks.check_tensor("labels", labels, integer=True)
    if weight_shard.dim() != 2 or ref_weight_shard.dim() != 2:
        raise ValueError("weight_shard and ref_weight_shard must have shape [V_shard, H] / [V_shard, Hr]")
    _check_head(hidden, weight_shard, labels, bias_shard)
    _check_head(ref_hidden, ref_weight_shard, labels, ref_bias_shard, prefix="ref_")
    if ref_weight_shard.shape[0] != weight_shard.shape[0]:
        raise ValueError(
            f"ref_weight_shard must hold the same vocab rows as weight_shard: {weight_shard.shape[0]} "
            f"rows, got {ref_weight_shard.shape[0]}"
        )
    if ref_hidden.dtype != hidden.dtype:
        raise TypeError(f"ref_hidden.dtype ({ref_hidden.dtype}) must match hidden.dtype ({hidden.dtype})")
    dispatch.check_scalars(temperature, logit_scale, softcap, ignore_index)
    _, vocab, _ = _layout(weight_shard, group, vocab_size)
    transform = LogitTransform(
        float(logit_scale) if logit_scale is not None else 1.0,
        float(softcap) if softcap is not None else None,
        float(temperature),
    )
    kl, _, _ = _VocabParallelTokenKL.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        weight_shard,
        bias_shard,
        ref_hidden.reshape(-1, ref_hidden.shape[-1]),
        ref_weight_shard,
        ref_bias_shard,
        labels.reshape(-1),
        int(ignore_index),
        transform,
        dispatch.resolve_backend(backend, hidden.device, hidden.dtype),
        group,
        vocab,
    )
    return kl.view(labels.shape)
