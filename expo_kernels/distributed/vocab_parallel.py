"""Vocab-parallel fused log-probs and token KL over ``torch.distributed``.

Vocab (tensor) parallelism
==========================

The LM-head weight ``W [V, H]`` is split along the vocabulary over the ranks of a process group:
rank ``r`` holds ``torch.chunk(W, world_size, dim=0)[r]`` (contiguous shards, sizes may differ; a
rank beyond the chunks ``torch.chunk`` returns holds an empty ``[0, H]`` shard). Hidden states and
labels are replicated (every rank sees the same tokens); labels are global ids. Every rank runs the
ordinary single-process backend (``expo_kernels.ops``) on its shard and the per-token results are
combined with all-reduces of ``O(N)`` numbers: no ``[N, V]`` logits and no weight ever cross the wire.

Combine formulas (shard ``s`` covers the vocab rows ``V_s``; ``lse_s``, ``H_s``, ``mean_s``,
``lsp2_s`` are the backend's per-shard ``lse``, entropy, mean logit, ``log sum p^2`` of the
shard-local softmax; ``M = max_s lse_s``, ``w_s = exp(lse_s - M)``):

* ``lse  = M + log S``, ``S = sum_s w_s``                               (MAX, then SUM all-reduce)
* ``logp = z_y - lse``; ``z_y = logp_s + lse_s`` on the rank owning the label (others add 0).
  Tokens whose label is outside the shard are run with the dummy local label 0 and discarded.
* ``entropy = sum_s pi_s (H_s - log pi_s)`` with ``pi_s = w_s / S`` (the chain rule of entropy over
  the shards) ``= (sum_s w_s (H_s - (lse_s - M))) / S + log S``: no ``lse - sum p z`` cancellation
* ``mean_logit = (sum_s |V_s| mean_s) / V``
* ``sum_{v in s} exp(2 (z_v - M)) = w_s^2 exp(lsp2_s)``   ->  ``log_sum_p2 = log(sum_s w_s^2 e^{lsp2_s}) - 2 log S``
* ``is_top1`` needs the global maximum logit, which no backend returns. When statistics are asked
  for, every rank runs one extra chunked max pass over its shard (``2 N H V_s`` FLOPs, i.e. the
  forward's cost again) giving ``max_{v in s} z_v``, ``max_{v in s, v < y} z_v`` and ``z_y``; then
  ``is_top1 = z_y >= max_all & max_before < z_y`` (first maximum on ties, as the single-process op).
  Without ``return_stats`` the pass does not run.

Forward traffic: one MAX all-reduce of ``N`` floats (``3N`` with statistics) and one SUM all-reduce of
``2N`` floats (``6N`` with statistics), plus a ``world_size``-int all-gather of the shard sizes.

Backward (``dL/dlogp = g``), each rank on its shard with the GLOBAL ``lse``:

* tokens whose label is in the shard: the backend's ``backward`` with the local label, exactly the
  single-process computation restricted to the shard's vocab rows;
* the other tokens need ``dz_v = -g p_v s'(raw_v)`` without the one-hot term. Rather than subtract a
  dummy label's one-hot afterwards (cancellation, and the cast of the accumulators to the input
  dtype happens inside the backend), they go through the backend's ``token_kl_backward``, whose
  ``dz = g (p - q) s'`` gives exactly that with ``g -> -g`` and a reference head ``q == 0``: an
  all-zero ``[V_s, 16]`` reference weight (logits 0) with ``lse_ref = 1e4`` (``exp(-1e4) == 0`` in
  float32 and float64). The zero head costs ``16 V_s`` numbers and ``2 * 16 N V_s`` FLOPs.
* ``d_weight`` / ``d_bias`` stay local; ``d_hidden`` of the valid tokens is SUM all-reduced (``N H``
  numbers, in float32 for 16-bit inputs) — the all-reduce every tensor-parallel head needs anyway.

The two-head token KL combines ``KL = sum_v q_v (zr_v - zp_v) - lse_r + lse_p`` the same way:
``A_s = kl_s + lse_r_s - lse_p_s = sum_{v in s} exp(zr_v - lse_r_s)(zr_v - zp_v)`` and
``KL = (sum_s exp(lse_r_s - M_r) A_s) / S_r - lse_r + lse_p``; its backward needs no correction.

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
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _validation as V
from .. import _dispatch as D
from ..ops.common import TokenStats
from ..ops import LogitTransform
from ..ops import torch_backend

__all__ = [
    "vocab_parallel_linear_logprobs",
    "vocab_parallel_linear_token_kl",
    "vocab_shard_bounds",
    "count_communication",
]

#: width of the all-zero reference head used to drop the one-hot term in backward (>= 16 so the
#: Triton kernels' tile constraints hold on a GPU).
_ZERO_REF_WIDTH = 16
#: lse of the all-zero reference head: q = exp(0 - 1e4) == 0 exactly in float32 and float64.
_ZERO_REF_LSE = 1.0e4

_disable_compile = getattr(getattr(torch, "compiler", None), "disable", lambda f: f)

# ---------------------------------------------------------------------------------------------
# collectives (all traffic goes through these two functions, so it can be counted)
# ---------------------------------------------------------------------------------------------

_COUNTERS: List[Dict[str, int]] = []


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


def _all_gather_sizes(n: int, device, group) -> List[int]:
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
    """Small bookkeeping tensors live on the shard's device (CPU for gloo, CUDA for NCCL)."""
    return t.device


def vocab_shard_bounds(vocab_size: int, world_size: int, rank: int) -> Tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s rows in ``torch.chunk(W, world_size, dim=0)`` (empty past
    the last chunk)."""
    step = -(-vocab_size // world_size)
    start = min(rank * step, vocab_size)
    return start, min(start + step, vocab_size)


def _layout(weight_shard: Tensor, group, vocab_size: Optional[int]) -> Tuple[int, int, List[int]]:
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
        V.check_tensor(f"{prefix}weight_shard", weight, floating=True)
        if weight.shape[1] != hidden.shape[-1]:
            raise ValueError(f"{prefix}weight_shard must have shape [V_shard, H] with H = {hidden.shape[-1]}, "
                             f"got {tuple(weight.shape)}")
        if weight.dtype != hidden.dtype:
            raise TypeError(f"{prefix}weight_shard.dtype ({weight.dtype}) must match hidden.dtype ({hidden.dtype})")
        return
    V.check_linear_head(hidden, weight, labels, bias, prefix=prefix)


# ---------------------------------------------------------------------------------------------
# log-probs
# ---------------------------------------------------------------------------------------------


def _shard_max_pass(h: Tensor, w: Tensor, b: Optional[Tensor], y: Tensor, offset: int, transform: LogitTransform,
                    acc: torch.dtype):
    """Per token over this shard: (max_v z_v, max_{v < y} z_v, z_y if y in the shard else 0), chunked
    like the torch backend (largest temporary one TOKEN_CHUNK x VOCAB_CHUNK tile)."""
    n, vs = h.shape[0], w.shape[0]
    m = torch.full((n,), -math.inf, dtype=acc, device=h.device)
    before = torch.full_like(m, -math.inf)
    zy = torch.zeros_like(m)
    tc, vc = torch_backend.TOKEN_CHUNK, torch_backend.VOCAB_CHUNK
    for t0 in range(0, n, tc):
        ts = slice(t0, t0 + tc)
        hh, yy = h[ts].to(acc), y[ts]
        for v0 in range(0, vs, vc):
            ww = w[v0 : v0 + vc]
            raw = hh @ ww.to(acc).T
            if b is not None:
                raw += b[v0 : v0 + vc].to(acc)
            z = transform.apply(raw)
            cols = torch.arange(offset + v0, offset + v0 + ww.shape[0], device=h.device)
            m[ts] = torch.maximum(m[ts], z.amax(dim=1))
            before[ts] = torch.maximum(before[ts], z.masked_fill(cols[None, :] >= yy[:, None], -math.inf).amax(dim=1))
            local = yy - (offset + v0)
            hit = (local >= 0) & (local < ww.shape[0])
            zy[ts] = torch.where(hit, z.gather(1, local.clamp(0, ww.shape[0] - 1)[:, None])[:, 0], zy[ts])
    return m, before, zy


def _vp_forward(h, w, b, y, transform, with_stats, offset, vocab, group, mod):
    """Compacted tokens h [n, H], global labels y [n] -> TokenOutputs-like tuple of [n] tensors."""
    n, vs = h.shape[0], w.shape[0]
    acc = D.result_dtype(h.dtype)
    if n == 0:  # every token ignored (the same on every rank): nothing to combine
        empty = h.new_zeros(0, dtype=acc)
        return (empty, empty) + ((empty, empty, empty.bool(), empty) if with_stats else (None,) * 4)
    owned = (y >= offset) & (y < offset + vs)
    neg_inf = torch.full((n,), -math.inf, dtype=acc, device=h.device)
    zeros = torch.zeros(n, dtype=acc, device=h.device)
    if vs > 0 and n > 0:
        out = mod.forward(h, w, b, torch.where(owned, y - offset, torch.zeros_like(y)), transform, with_stats)
        lse_s = out.lse.to(acc)
        zy = torch.where(owned, out.logp.to(acc) + lse_s, zeros)
    else:
        out, lse_s, zy = None, neg_inf, zeros
    maxes = [lse_s]
    if with_stats:
        if vs > 0 and n > 0:
            m_s, before_s, zy_exact = _shard_max_pass(h, w, b, y, offset, transform, acc)
        else:
            m_s, before_s, zy_exact = neg_inf, neg_inf, zeros
        maxes += [m_s, before_s]
    maxes = _all_reduce(torch.stack(maxes), dist.ReduceOp.MAX, group)
    big_m = maxes[0]
    has = torch.isfinite(lse_s)  # False on an empty shard
    big_m_safe = torch.where(torch.isfinite(big_m), big_m, zeros)
    w_s = torch.where(has, torch.exp(lse_s - big_m_safe), zeros)
    sums = [w_s, zy]
    if with_stats:
        ent = out.entropy.to(acc) if out is not None else zeros
        mean = out.mean_logit.to(acc) if out is not None else zeros
        lsp2 = out.log_sum_p2.to(acc) if out is not None else zeros
        sums += [
            # entropy by the chain rule over shards (pi_s = w_s / S): sum_s pi_s (H_s - log pi_s), which
            # has no lse - sum p z cancellation at large |z|
            torch.where(has, w_s * (ent - (lse_s - big_m_safe)), zeros),
            mean * vs,
            torch.where(has, torch.exp(lsp2 + 2.0 * (lse_s - big_m_safe)), zeros),
            torch.where(owned, zy_exact, zeros),
        ]
    sums = _all_reduce(torch.stack(sums), dist.ReduceOp.SUM, group)
    s = sums[0]
    lse = big_m + torch.log(s)
    logp = sums[1] - lse
    if not with_stats:
        return logp, lse, None, None, None, None
    entropy = sums[2] / s + torch.log(s)
    mean_logit = sums[3] / vocab
    log_sum_p2 = torch.log(sums[4]) - 2.0 * torch.log(s)
    z_label = sums[5]
    is_top1 = (z_label >= maxes[1]) & (maxes[2] < z_label)
    return logp, lse, entropy, mean_logit, is_top1, log_sum_p2


def _zero_ref_head(w: Tensor, n: int, h: Tensor):
    ref_w = w.new_zeros(w.shape[0], _ZERO_REF_WIDTH)
    ref_h = h.new_zeros(n, _ZERO_REF_WIDTH)
    return ref_h, ref_w


def _add(total: Optional[Tensor], part: Tensor) -> Tensor:
    """Sum of the two calls' shard gradients without a third full-size buffer (16-bit: summed in float32)."""
    if total is None:
        return part
    if total.dtype in (torch.float32, torch.float64):
        return total.add_(part)
    return total.float().add_(part.float()).to(total.dtype)


def _vp_backward(g, h, w, b, y, lse, transform, offset, mod, need_h, need_w, need_b):
    """Shard gradients of sum_n g_n logp_n given the GLOBAL lse (compacted tokens): d_hidden [n, H] in
    float32/float64, local (not yet all-reduced); d_weight / d_bias in the shard's dtype."""
    vs = w.shape[0]
    acc = D.result_dtype(h.dtype)
    d_h = torch.zeros(h.shape, dtype=acc, device=h.device) if need_h else None
    d_w = d_b = None
    owned = (y >= offset) & (y < offset + vs)
    mine = owned.nonzero().squeeze(1)
    other = (~owned).nonzero().squeeze(1)
    g = g.to(acc)
    lse = lse.to(acc)
    parts = []
    if vs > 0 and mine.numel():
        parts.append((mine, mod.backward(
            g[mine].contiguous(), h[mine].contiguous(), w, b, (y[mine] - offset).long(), lse[mine].contiguous(),
            transform, need_h, need_w, need_b)))
    if vs > 0 and other.numel():
        ref_h, ref_w = _zero_ref_head(w, other.numel(), h)
        lse_r = torch.full((other.numel(),), _ZERO_REF_LSE, dtype=acc, device=h.device)
        parts.append((other, mod.token_kl_backward(
            (-g[other]).contiguous(), h[other].contiguous(), w, b, ref_h, ref_w, None, lse[other].contiguous(), lse_r,
            transform, need_h, need_w, need_b)))
    for rows, (dh, dw, db) in parts:
        if need_h:
            d_h.index_copy_(0, rows, dh.to(acc))
        if need_w:
            d_w = _add(d_w, dw)
        if need_b:
            d_b = _add(d_b, db)
    if need_w and d_w is None:  # empty shard or no tokens
        d_w = torch.zeros_like(w)
    if need_b and d_b is None:
        d_b = torch.zeros_like(b)
    return d_h, d_w, d_b


class _VocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, transform, with_stats, backend, group, offset, vocab):
        n = labels.shape[0]
        rows, y, pick = D.counted_rows(labels, ignore_index, vocab)
        h = pick(hidden).contiguous()
        mod = D.backend_module(backend)
        outs = _vp_forward(h, weight, bias, y, transform, with_stats, offset, vocab, group, mod)
        finite_results = (outs[1],) + ((outs[2], outs[3], outs[5]) if with_stats else ())
        D.check_finite({"hidden": h, "weight_shard": weight}, {"bias_shard": bias}, finite_results,
                       dataclasses.asdict(transform))
        dtype = D.result_dtype(hidden.dtype)

        def scatter(t, fill_dtype=dtype):
            return hidden.new_empty(0, dtype=fill_dtype) if t is None else D.scatter(t, rows, n)

        logp, lse = scatter(outs[0]), scatter(outs[1])
        stats = [scatter(outs[2]), scatter(outs[3]), scatter(outs[4], torch.bool), scatter(outs[5])]
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
        rows, y, pick = D.counted_rows(labels, ignore_index, vocab)
        d_h, d_w, d_b = _vp_backward(pick(grad_logp), pick(hidden).contiguous(), weight, bias, y,
                                     pick(lse), transform, offset, D.backend_module(backend), need_h, need_w, need_b)
        if need_h:
            if d_h.shape[0] > 0:  # only the valid tokens' rows travel; all ignored (on every rank): none
                d_h = _all_reduce(d_h, dist.ReduceOp.SUM, group)
            if rows is not None:
                d_h = torch.zeros(hidden.shape, dtype=d_h.dtype, device=d_h.device).index_copy_(0, rows, d_h)
            d_h = d_h.to(hidden.dtype)
        return (d_h, None if d_w is None else d_w.to(weight.dtype), None if d_b is None else d_b.to(bias.dtype),
                *([None] * 8))


@_disable_compile
def vocab_parallel_linear_logprobs(
    hidden: Tensor,
    weight_shard: Tensor,
    labels: Tensor,
    bias_shard: Optional[Tensor] = None,
    *,
    process_group=None,
    vocab_size: Optional[int] = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    logit_scale: Optional[float] = None,
    softcap: Optional[float] = None,
    return_stats: bool = False,
    backend: Optional[str] = None,
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
    V.check_tensor("hidden", hidden, floating=True)
    V.check_tensor("weight_shard", weight_shard, floating=True)
    V.check_tensor("labels", labels, integer=True)
    if weight_shard.dim() != 2:
        raise ValueError(f"weight_shard must have shape [V_shard, H], got shape {tuple(weight_shard.shape)}")
    _check_head(hidden, weight_shard, labels, bias_shard)
    D.check_scalars(temperature, logit_scale, softcap, ignore_index)
    offset, vocab, _ = _layout(weight_shard, group, vocab_size)
    transform = LogitTransform(float(logit_scale) if logit_scale is not None else 1.0,
                               float(softcap) if softcap is not None else None, float(temperature))
    out = _VocabParallelLogprobs.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight_shard, bias_shard, labels.reshape(-1), int(ignore_index),
        transform, bool(return_stats), D.resolve_backend(backend, hidden.device, hidden.dtype), group, offset, vocab,
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
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, ignore_index, transform, backend,
                group, vocab):
        n = labels.shape[0]
        rows, _, pick = D.counted_rows(labels, ignore_index, vocab)
        h, hr = pick(hidden).contiguous(), pick(ref_hidden).contiguous()
        acc = D.result_dtype(hidden.dtype)
        k = h.shape[0]
        zeros = torch.zeros(k, dtype=acc, device=h.device)
        if k == 0:  # every token ignored, on every rank
            out = torch.zeros(n, dtype=acc, device=h.device)
            ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, out, out)
            ctx.params = (ignore_index, transform, backend, group, vocab)
            lse_p, lse_r = out.clone(), out.clone()
            ctx.mark_non_differentiable(lse_p, lse_r)
            return out.clone(), lse_p, lse_r
        if weight.shape[0] > 0 and k > 0:
            kl_s, lse_p_s, lse_r_s = (t.to(acc) for t in D.backend_module(backend).token_kl_forward(
                h, weight, bias, hr, ref_weight, ref_bias, transform))
            a_s = kl_s + lse_r_s - lse_p_s
        else:
            lse_p_s = lse_r_s = torch.full((k,), -math.inf, dtype=acc, device=h.device)
            a_s = zeros
        has = torch.isfinite(lse_p_s)
        maxes = _all_reduce(torch.stack([lse_p_s, lse_r_s]), dist.ReduceOp.MAX, group)
        safe = torch.where(torch.isfinite(maxes), maxes, torch.zeros_like(maxes))
        w_p = torch.where(has, torch.exp(lse_p_s - safe[0]), zeros)
        w_r = torch.where(has, torch.exp(lse_r_s - safe[1]), zeros)
        sums = _all_reduce(torch.stack([w_p, w_r, w_r * a_s]), dist.ReduceOp.SUM, group)
        lse_p = maxes[0] + torch.log(sums[0])
        lse_r = maxes[1] + torch.log(sums[1])
        kl = sums[2] / sums[1] - lse_r + lse_p
        D.check_finite({"hidden": h, "weight_shard": weight, "ref_hidden": hr, "ref_weight_shard": ref_weight},
                       {"bias_shard": bias, "ref_bias_shard": ref_bias}, (lse_p, lse_r),
                       dataclasses.asdict(transform))
        kl, lse_p, lse_r = (D.scatter(t, rows, n) for t in (kl, lse_p, lse_r))
        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lse_p, lse_r)
        ctx.params = (ignore_index, transform, backend, group, vocab)
        ctx.mark_non_differentiable(lse_p, lse_r)
        return kl, lse_p, lse_r

    @staticmethod
    def backward(ctx, grad_kl, *_):
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lse_p, lse_r = ctx.saved_tensors
        ignore_index, transform, backend, group, vocab = ctx.params
        if any(ctx.needs_input_grad[3:6]):
            raise RuntimeError("linear_token_kl: the reference head is frozen; detach ref_hidden / ref_weight / ref_bias")
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and bias is not None
        acc = D.result_dtype(hidden.dtype)
        rows, _, pick = D.counted_rows(labels, ignore_index, vocab)
        h = pick(hidden).contiguous()
        d_h = d_w = d_b = None
        if weight.shape[0] > 0 and h.shape[0] > 0:
            d_h, d_w, d_b = D.backend_module(backend).token_kl_backward(
                pick(grad_kl).to(acc).contiguous(), h, weight, bias, pick(ref_hidden).contiguous(), ref_weight,
                ref_bias, pick(lse_p), pick(lse_r), transform, need_h, need_w, need_b)
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
    bias_shard: Optional[Tensor] = None,
    ref_bias_shard: Optional[Tensor] = None,
    *,
    process_group=None,
    vocab_size: Optional[int] = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    logit_scale: Optional[float] = None,
    softcap: Optional[float] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """:func:`expo_kernels.linear_token_kl` with both heads sharded along the vocabulary the same way
    (``ref_weight_shard`` holds the same rows of the reference head as ``weight_shard`` of the policy's).
    Returns the global per-token ``KL(pi_ref || pi_theta)`` shaped like ``labels``; gradient to the
    policy head only (``d_hidden`` summed over the ranks, shard gradients local)."""
    group = _group(process_group)
    for name, t in (("hidden", hidden), ("weight_shard", weight_shard), ("ref_hidden", ref_hidden),
                    ("ref_weight_shard", ref_weight_shard)):
        V.check_tensor(name, t, floating=True)
    V.check_tensor("labels", labels, integer=True)
    if weight_shard.dim() != 2 or ref_weight_shard.dim() != 2:
        raise ValueError("weight_shard and ref_weight_shard must have shape [V_shard, H] / [V_shard, Hr]")
    _check_head(hidden, weight_shard, labels, bias_shard)
    _check_head(ref_hidden, ref_weight_shard, labels, ref_bias_shard, prefix="ref_")
    if ref_weight_shard.shape[0] != weight_shard.shape[0]:
        raise ValueError(f"ref_weight_shard must hold the same vocab rows as weight_shard: {weight_shard.shape[0]} "
                         f"rows, got {ref_weight_shard.shape[0]}")
    if ref_hidden.dtype != hidden.dtype:
        raise TypeError(f"ref_hidden.dtype ({ref_hidden.dtype}) must match hidden.dtype ({hidden.dtype})")
    D.check_scalars(temperature, logit_scale, softcap, ignore_index)
    _, vocab, _ = _layout(weight_shard, group, vocab_size)
    transform = LogitTransform(float(logit_scale) if logit_scale is not None else 1.0,
                               float(softcap) if softcap is not None else None, float(temperature))
    kl, _, _ = _VocabParallelTokenKL.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight_shard, bias_shard, ref_hidden.reshape(-1, ref_hidden.shape[-1]),
        ref_weight_shard, ref_bias_shard, labels.reshape(-1), int(ignore_index), transform,
        D.resolve_backend(backend, hidden.device, hidden.dtype), group, vocab,
    )
    return kl.view(labels.shape)
