"""The fused log-prob kernels: LM head + log-softmax + gather, and its backward.

Forward: one program per (token block, vocab split). It streams the weight of its vocab split in
``BLOCK_V`` tiles, computes each ``[BLOCK_N, BLOCK_V]`` logit tile with ``tl.dot`` over ``BLOCK_H``
slices of the hidden size (float32 accumulator), and folds the tile into an online log-sum-exp per
token — the logits never leave registers. Each split writes its partial state (``ops.state``) per
token; the shared O(splits x N) merge combines them (splitting the vocabulary keeps the GPU busy
when there are few token blocks).

Top-k (``topk=k``): each forward program also keeps its split's k best logits in registers, merging
every tile into them with k max/min reductions (``_topk_merge_tile``) and skipping tiles none of whose
rows can enter; the splits' lists merge on the host (``state.select_topk``). Inside the forward kernel
rather than a second pass, which would recompute every logit (another ``2NHV``).

Backward: one program per (token block, vocab tile). It recomputes the logit tile, forms
``dz = g * (onehot - p) * dz/draw`` in registers and adds ``dz @ W_tile`` into ``d_hidden`` and
``dz^T @ h`` into ``d_weight`` with float32 atomics, slice by slice of H. Atomics make the result
order-dependent at the level of float32 rounding. Under ``torch.use_deterministic_algorithms(True)``
the backward runs the torch backend's chunked GEMMs instead: owning a ``[BLOCK_N, H]`` or
``[BLOCK_V, H]`` gradient tile in one program does not fit in registers for LM hidden sizes, and
recomputing logits per slice of H would multiply the backward's FLOPs. With
``kernel_options(grad_filter_eps=eps)`` a tile whose probabilities are all below ``eps`` and that
holds no label skips its accumulation (see ``ops.options``).

Under ``TRITON_INTERPRET=1`` (CPU tests) low-precision tiles are upcast to float32 before any
arithmetic, because the interpreter's bf16/fp16 arithmetic is wrong (docs/design.md, "Testing Triton
without a GPU").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import state as online_state
from .. import torch_backend
from ..common import LogitTransform
from ..torch_backend import cast_grads, grad_buffers
from .configs import TileConfig, filter_args, kernel_flags, launch_config, split_vocab
from .jit import (
    SLOT_M,
    SLOT_MAX_BEFORE,
    SLOT_S,
    SLOT_S2,
    SLOT_SZ,
    SLOT_ZLABEL,
    SLOT_ZSUM,
    TOPK_PAD,
    accumulate_grads,
    apply_transform,
    logit_tile,
    masked_row_products,
    safe_shift,
    transform_args,
)

__all__ = ["forward_partial", "backward"]


@triton.jit
def _topk_merge_tile(z, ids, top_v, top_i, slots, TOPK: tl.constexpr):
    """The ``TOPK`` best of a row's kept entries (``top_v``, ``top_i`` ``[BLOCK_N, KP]``, sorted) and of
    a logit tile (``z [BLOCK_N, BLOCK_V]``, column ids ``ids [BLOCK_V]``) by (value descending, id
    ascending), into slots ``[0, TOPK)`` (the rest empty: ``-inf``, ``TOPK_PAD``).

    Round ``r`` picks the best entry that comes after round ``r - 1``'s pick ``(pv, pid)`` in that
    order (``z < pv`` or ``z == pv`` and a larger id): two max/min reductions a round, and no sort,
    no removal mask and no index tensor beside the logit tile (registers are what the tile's
    online softmax already competes for)."""
    pv = tl.full((z.shape[0],), float("inf"), dtype=z.dtype)
    pid = tl.full((z.shape[0],), -1, dtype=tl.int64)
    new_v = tl.full(top_v.shape, float("-inf"), dtype=top_v.dtype)
    new_i = tl.full(top_i.shape, TOPK_PAD, dtype=tl.int64)
    for r in range(0, TOPK):
        after_t = (z < pv[:, None]) | ((z == pv[:, None]) & (ids[None, :] > pid[:, None]))
        after_b = (top_v < pv[:, None]) | ((top_v == pv[:, None]) & (top_i > pid[:, None]))
        best = tl.maximum(
            tl.max(tl.where(after_t, z, float("-inf")), axis=1),
            tl.max(tl.where(after_b, top_v, float("-inf")), axis=1),
        )
        id_t = tl.min(tl.where(after_t & (z == best[:, None]), ids[None, :], TOPK_PAD), axis=1)
        id_b = tl.min(tl.where(after_b & (top_v == best[:, None]), top_i, TOPK_PAD), axis=1)
        pv = best
        pid = tl.minimum(id_t, id_b)
        new_v = tl.where(slots[None, :] == r, pv[:, None], new_v)
        new_i = tl.where(slots[None, :] == r, pid[:, None], new_i)
    return new_v, new_i


@triton.jit
def _forward_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    part_ptr,
    top_v_ptr,
    top_i_ptr,
    N,
    V,
    H,
    stride_hn,
    stride_hh,
    stride_wv,
    stride_wh,
    vocab_per_split,
    n_splits,
    vocab_start,
    logit_scale,
    softcap,
    inv_temp,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    WITH_STATS: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    TOPK: tl.constexpr,  # 0: no top-k
    KP: tl.constexpr,  # a power of two >= TOPK (1 without top-k)
):
    """Grid (token blocks, vocab splits): one program folds a [BLOCK_N, V / splits] slab into its split's state."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    # labels are global ids; the weight's row v is id vocab_start + v
    y = tl.load(y_ptr + offs_n, mask=mask_n, other=-1) - vocab_start

    m = tl.full((BLOCK_N,), float("-inf"), dtype=ACC)  # running max
    s = tl.zeros((BLOCK_N,), dtype=ACC)  # sum e^(z - m)
    sz = tl.zeros((BLOCK_N,), dtype=ACC)  # sum e^(z - m) (z - m)  (entropy, shifted)
    s2 = tl.zeros((BLOCK_N,), dtype=ACC)  # sum e^(2(z - m))       (log sum p^2)
    z_sum = tl.zeros((BLOCK_N,), dtype=ACC)
    z_label = tl.zeros((BLOCK_N,), dtype=ACC)
    max_before = tl.full((BLOCK_N,), float("-inf"), dtype=ACC)  # max z_v over v < label
    if TOPK > 0:
        # running top-k of this split, sorted (value desc, id asc) in slots [0, TOPK) of KP = pow2 >= TOPK
        slots = tl.arange(0, KP)
        top_v = tl.full((BLOCK_N, KP), float("-inf"), dtype=ACC)
        top_i = tl.full((BLOCK_N, KP), TOPK_PAD, dtype=tl.int64)

    v_lo = pid_s * vocab_per_split
    v_hi = tl.minimum(v_lo + vocab_per_split, V)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < v_hi
        raw = logit_tile(
            h_ptr,
            w_ptr,
            b_ptr,
            offs_n,
            offs_v,
            mask_n,
            mask_v,
            H,
            stride_hn,
            stride_hh,
            stride_wv,
            stride_wh,
            HAS_BIAS,
            UPCAST,
            IEEE_FP32,
            ACC,
            BLOCK_N,
            BLOCK_V,
            BLOCK_H,
        )
        z, _ = apply_transform(raw, logit_scale, softcap, inv_temp, HAS_SOFTCAP)
        z = tl.where(mask_v[None, :], z, float("-inf"))  # columns past the split count as masked
        m_new = tl.maximum(m, tl.max(z, axis=1))
        shift = safe_shift(m_new)
        rescale = tl.exp(m - shift)
        e = tl.exp(z - shift[:, None])
        # a label on a later shard may fall on this tile's padding columns (past v_hi): mask them
        hit = (offs_v[None, :] == y[:, None]) & mask_v[None, :]
        z_label += tl.sum(tl.where(hit, z, 0.0), axis=1)
        if WITH_STATS:
            # sum e^(z - m_new)(z - m_new) = rescale * (sz + (m - m_new) s) + this tile's terms
            sz = rescale * (sz + tl.where(s > 0.0, m - shift, 0.0) * s) + masked_row_products(e, z - shift[:, None])
            s2 = s2 * rescale * rescale + tl.sum(e * e, axis=1)
            z_sum += tl.sum(tl.where(z > float("-inf"), z, 0.0), axis=1)
            before = offs_v[None, :] < y[:, None]
            max_before = tl.maximum(max_before, tl.max(tl.where(before, z, float("-inf")), axis=1))
        s = s * rescale + tl.sum(e, axis=1)
        m = m_new
        if TOPK > 0:
            # merge the tile into the running top-k only when some row has an entry that enters it:
            # above that row's k-th value, or while its slots are not all filled. Ids ascend along
            # the split, so an entry equal to the k-th ranks after it and need not enter.
            kth = tl.sum(tl.where(slots[None, :] == TOPK - 1, top_v, 0.0), axis=1)
            kth_id = tl.sum(tl.where(slots[None, :] == TOPK - 1, top_i, 0), axis=1)
            enters = (tl.max(z, axis=1) > kth) | (kth_id == TOPK_PAD)
            if tl.max(enters.to(tl.int32), axis=0) > 0:
                # columns past the split carry the pad id: never kept ahead of a real id
                ids = tl.where(mask_v, (offs_v + vocab_start).to(tl.int64), TOPK_PAD)
                top_v, top_i = _topk_merge_tile(z, ids, top_v, top_i, slots, TOPK)

    # this split's partial state (ops.state.LogprobState) into parts[slot, pid_s, offs_n]
    tl.store(part_ptr + (SLOT_M * n_splits + pid_s) * N + offs_n, m, mask=mask_n)
    tl.store(part_ptr + (SLOT_S * n_splits + pid_s) * N + offs_n, s, mask=mask_n)
    tl.store(part_ptr + (SLOT_ZLABEL * n_splits + pid_s) * N + offs_n, z_label, mask=mask_n)
    if WITH_STATS:
        tl.store(part_ptr + (SLOT_SZ * n_splits + pid_s) * N + offs_n, sz, mask=mask_n)
        tl.store(part_ptr + (SLOT_S2 * n_splits + pid_s) * N + offs_n, s2, mask=mask_n)
        tl.store(part_ptr + (SLOT_ZSUM * n_splits + pid_s) * N + offs_n, z_sum, mask=mask_n)
        tl.store(part_ptr + (SLOT_MAX_BEFORE * n_splits + pid_s) * N + offs_n, max_before, mask=mask_n)
    if TOPK > 0:
        # this split's top-k into top[pid_s, offs_n, :TOPK]
        top_offs = (pid_s * N + offs_n).to(tl.int64)[:, None] * TOPK + slots[None, :]
        top_mask = mask_n[:, None] & (slots[None, :] < TOPK)
        tl.store(top_v_ptr + top_offs, top_v, mask=top_mask)
        tl.store(top_i_ptr + top_offs, top_i, mask=top_mask)


@triton.jit
def _backward_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    lse_ptr,
    g_ptr,
    dh_ptr,
    dw_ptr,
    db_ptr,
    N,
    V,
    H,
    stride_hn,
    stride_hh,
    stride_wv,
    stride_wh,
    vocab_start,
    logit_scale,
    softcap,
    inv_temp,
    filter_eps,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    FILTER: tl.constexpr,
    NEED_DH: tl.constexpr,
    NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Grid (token blocks, vocab tiles): one program recomputes a logit tile and atomically adds its gradients."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_n = offs_n < N
    mask_v = offs_v < V
    y = tl.load(y_ptr + offs_n, mask=mask_n, other=-1) - vocab_start  # row index of the label, if here
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0).to(ACC)
    g = tl.load(g_ptr + offs_n, mask=mask_n, other=0.0).to(ACC)

    raw = logit_tile(
        h_ptr,
        w_ptr,
        b_ptr,
        offs_n,
        offs_v,
        mask_n,
        mask_v,
        H,
        stride_hn,
        stride_hh,
        stride_wv,
        stride_wh,
        HAS_BIAS,
        UPCAST,
        IEEE_FP32,
        ACC,
        BLOCK_N,
        BLOCK_V,
        BLOCK_H,
    )
    z, deriv = apply_transform(raw, logit_scale, softcap, inv_temp, HAS_SOFTCAP)
    p = tl.exp(tl.minimum(z - lse[:, None], 0.0))  # <= 1 even if the recomputed z rounds above lse
    hit = (offs_v[None, :] == y[:, None]) & mask_v[None, :]
    valid = mask_n[:, None] & mask_v[None, :]
    dz = g[:, None] * (tl.where(hit, 1.0, 0.0) - p) * deriv
    dz = tl.where(valid, dz, 0.0)
    # gradient filtering: a tile of negligible probabilities without a label adds nothing visible
    keep = True
    if FILTER:
        keep = (tl.max(tl.where(valid, p, 0.0)) >= filter_eps) | (tl.sum(tl.where(hit & valid, 1, 0)) > 0)
    if keep:
        accumulate_grads(
            dz,
            h_ptr,
            w_ptr,
            dh_ptr,
            dw_ptr,
            db_ptr,
            offs_n,
            offs_v,
            mask_n,
            mask_v,
            H,
            stride_hn,
            stride_hh,
            stride_wv,
            stride_wh,
            NEED_DH,
            NEED_DW,
            NEED_DB,
            UPCAST,
            IEEE_FP32,
            ACC,
            BLOCK_N,
            BLOCK_V,
            BLOCK_H,
        )


def forward_partial(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    transform: LogitTransform,
    with_stats: bool,
    vocab_start: int = 0,
    config: TileConfig | None = None,
    vocab_splits: int | None = None,
    topk: int = 0,
) -> online_state.LogprobState:
    """hidden [N, H], weight [V_s, H] (ids ``vocab_start + [0, V_s)``), bias [V_s] | None, labels [N]
    global ids -> the range's partial state: the vocab splits' states merged (``ops.state``).

    ``topk=k``: each program also keeps its split's k best logits, merging tile after tile inside the
    forward kernel (``_topk_merge_tile``; no second pass over the head, which would cost another
    ``2NHV``), and the splits' top-k merge with the rest of the state (``state.select_topk``)."""
    n_tokens, hid = hidden.shape
    vocab = weight.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    if n_tokens == 0 or vocab == 0:
        return online_state.empty_logprob_state(n_tokens, with_stats, acc, hidden.device, topk)
    labels, bias = labels.contiguous(), None if bias is None else bias.contiguous()
    cfg = config or launch_config("forward", hidden, topk=topk)
    n_blocks, splits, per_split = split_vocab(n_tokens, vocab, cfg, hidden.device, vocab_splits)
    parts = torch.empty((online_state.LOGPROB_STATS_SLOTS, splits, n_tokens), dtype=acc, device=hidden.device)
    top_v = torch.empty((splits, n_tokens, topk), dtype=acc, device=hidden.device)
    top_i = torch.empty((splits, n_tokens, topk), dtype=torch.int64, device=hidden.device)
    _forward_kernel[(n_blocks, splits)](
        hidden,
        weight,
        bias if bias is not None else hidden,
        labels,
        parts,
        top_v if topk > 0 else parts,
        top_i if topk > 0 else labels,
        n_tokens,
        vocab,
        hid,
        hidden.stride(0),
        hidden.stride(1),
        weight.stride(0),
        weight.stride(1),
        per_split,
        splits,
        int(vocab_start),
        HAS_BIAS=bias is not None,
        WITH_STATS=with_stats,
        BLOCK_N=cfg.block_n,
        BLOCK_V=cfg.block_v,
        BLOCK_H=cfg.block_h,
        TOPK=topk,
        KP=triton.next_power_of_2(max(topk, 1)),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        maxnreg=cfg.maxnreg,
        **transform_args(transform),
        **kernel_flags(hidden),
    )
    fields = online_state.LOGPROB_STATS_SLOTS if with_stats else online_state.LOGPROB_SLOTS  # m, s, z_label come first
    states = [online_state.LogprobState(*parts[:fields, k]) for k in range(splits)]
    if topk > 0:
        states = [st._replace(topk_values=top_v[k], topk_ids=top_i[k]) for k, st in enumerate(states)]
    return online_state.merge_logprob_states(states)


def backward(
    grad_logp: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    lse: torch.Tensor,
    transform: LogitTransform,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    vocab_start: int = 0,
    config: TileConfig | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``sum_n grad_logp[n] * logp[n]`` w.r.t. this vocabulary range's head (labels
    global ids, ``lse`` the global one), accumulated in float32 buffers."""
    if torch.are_deterministic_algorithms_enabled():
        return torch_backend.backward(
            grad_logp, hidden, weight, bias, labels, lse, transform, need_hidden, need_weight, need_bias, vocab_start
        )
    n_tokens, hid = hidden.shape
    vocab = weight.shape[0]
    d_hidden, d_weight, d_bias = grad_buffers(hidden, weight, need_hidden, need_weight, need_bias)
    if n_tokens > 0 and vocab > 0 and (need_hidden or need_weight or need_bias):
        grads = dict(need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias)
        cfg = config or launch_config("backward", hidden, **grads)
        grid = (triton.cdiv(n_tokens, cfg.block_n), triton.cdiv(vocab, cfg.block_v))
        dummy = lse  # stands in for pointers the constexpr flags switch off
        _backward_kernel[grid](
            hidden,
            weight,
            bias.contiguous() if bias is not None else dummy,
            labels.contiguous(),
            lse.contiguous(),
            grad_logp.contiguous(),
            d_hidden if need_hidden else dummy,
            d_weight if need_weight else dummy,
            d_bias if need_bias else dummy,
            n_tokens,
            vocab,
            hid,
            hidden.stride(0),
            hidden.stride(1),
            weight.stride(0),
            weight.stride(1),
            int(vocab_start),
            HAS_BIAS=bias is not None,
            NEED_DH=need_hidden,
            NEED_DW=need_weight,
            NEED_DB=need_bias,
            BLOCK_N=cfg.block_n,
            BLOCK_V=cfg.block_v,
            BLOCK_H=cfg.block_h,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
            maxnreg=cfg.maxnreg,
            **transform_args(transform),
            **kernel_flags(hidden),
            **filter_args(),
        )
    return cast_grads(d_hidden, d_weight, d_bias, hidden, weight, bias)
