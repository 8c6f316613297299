"""Triton backend: the fused LM head + log-softmax + gather, and its backward.

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

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import state as S
from . import torch_backend
from .common import LogitTransform, interpreting
from .options import get_kernel_options
from .torch_backend import cast_grads, grad_buffers
from .triton_jit import apply_transform, safe_shift, transform_args


class TileConfig(NamedTuple):
    """Block sizes: powers of two >= 16 (``tl.dot``'s minimum on GPUs); launch options."""

    block_n: int
    block_v: int
    block_h: int
    num_warps: int = 4
    # Software-pipelining depth of the H loops: each stage keeps one [BLOCK_N, BLOCK_H] and one
    # [BLOCK_H, BLOCK_V] operand tile in shared memory (Triton's default is 3).
    num_stages: int = 3
    # Register cap per thread handed to ptxas (None: its own heuristic, which may settle on 128 and
    # spill a kernel that fits in 255).
    maxnreg: int | None = None


# 64 x 128 float32 accumulator = 32 KiB of registers across 8 warps, the usual sweet spot for
# a GEMM-like tile that also carries per-row online-softmax state.
GPU_CONFIG = TileConfig(block_n=64, block_v=128, block_h=64, num_warps=8)
# float32 without TF32 (see select_config).
IEEE_FP32_CONFIG = TileConfig(block_n=32, block_v=64, block_h=16, num_warps=4, maxnreg=255)
# Small but still compilable on a GPU, so interpreter tests exercise a real configuration.
SMALL_CONFIG = TileConfig(block_n=16, block_v=32, block_h=16, num_warps=4)

# Slots of the partial-state buffers [slots, splits, N]: the field order of ops.state.LogprobState
# and TokenKLState, so a split's slots are its state.
SLOT_M, SLOT_S, SLOT_ZLABEL, SLOT_SZ, SLOT_S2, SLOT_ZSUM, SLOT_MAX_BEFORE = (
    tl.constexpr(S.LogprobState._fields.index(f)) for f in ("m", "s", "z_label", "sz", "s2", "z_sum", "max_before")
)
N_SLOTS = 7  # the [N] fields of a LogprobState; its optional top-k fields have buffers of their own
assert S.LogprobState._fields[N_SLOTS:] == ("topk_values", "topk_ids")
# The id of an empty top-k slot (ops.state.TOPK_PAD_ID): after every real id among -inf values.
TOPK_PAD = tl.constexpr(S.TOPK_PAD_ID)
SLOT_MP, SLOT_SP, SLOT_MR, SLOT_SR, SLOT_CROSS = (
    tl.constexpr(S.TokenKLState._fields.index(f)) for f in ("m_p", "s_p", "m_r", "s_r", "cross")
)
N_KL_SLOTS = len(S.TokenKLState._fields)


def default_config(device: torch.device) -> TileConfig:
    return SMALL_CONFIG if interpreting() or device.type != "cuda" else GPU_CONFIG


KERNELS = ("forward", "backward", "token_kl_forward", "token_kl_backward")


def select_config(
    kernel: str,
    dtype: torch.dtype,
    arch: int | None,
    *,
    ieee_fp32: bool = False,
    need_hidden: bool = True,
    need_weight: bool = True,
    need_bias: bool = False,
    topk: int = 0,
) -> TileConfig:
    """The tile config the launcher of ``kernel`` (one of ``KERNELS``) uses: the single source of
    truth, shared with the ahead-of-time compile gate (``benchmarks/gpu/aot_check.py``).

    ``arch`` is the compute capability as ``10 * major + minor`` (80, 90, 100), ``None`` under the
    interpreter or off CUDA; ``ieee_fp32`` is float32 input without TF32.
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown Triton kernel {kernel!r}; expected one of {KERNELS}")
    if arch is None:
        return SMALL_CONFIG
    if kernel == "forward" and topk > 0 and dtype != torch.float32 and arch < 100:
        # 16-bit on sm_80/sm_90: the running top-k next to a 64 x 128 logit tile, bias or softcap and
        # statistics spills (sm_90 under Triton 3.6, sm_80 under 3.9: 6-13 spill instructions); 64-wide
        # vocabulary tiles fit and keep the 64-row tiles sm_90's wgmma needs.
        return GPU_CONFIG._replace(block_v=64)
    if kernel == "forward" and topk > 0 and (dtype == torch.float32 or arch >= 100):
        # The running top-k ([BLOCK_N, KP] values and int64 ids, twice while a tile merges) next to the
        # logit tile and the statistics spills at k = 32 with float32 tiles (sm_90) and with 16-bit
        # tiles on sm_100 (526 spill instructions); half the rows fit (benchmarks/gpu/aot_check.py).
        if ieee_fp32:
            base = IEEE_FP32_CONFIG
        elif dtype == torch.float32:
            base = GPU_CONFIG._replace(block_h=32)
        else:
            base = GPU_CONFIG
        return base._replace(block_n=base.block_n // 2)
    if ieee_fp32:
        # IEEE float32 dots run on CUDA cores (FMA): both operand tiles live in registers next to
        # the accumulator, so 64 x 128 x 64 spills (255 registers). 32 x 64 tiles with 16-wide H
        # slices at 4 warps fit every kernel on sm_80/90/100 (~130-250 registers). maxnreg=255:
        # left to its heuristic, ptxas caps some variants at 128 registers and spills; 32-wide
        # slices still spill in the forward on sm_80/sm_100 with either setting.
        return IEEE_FP32_CONFIG
    if kernel.endswith("backward"):
        tf32 = dtype == torch.float32
        if arch < 90 or (tf32 and arch < 100 and need_hidden and need_weight):
            # sm_80 (mma.sync, accumulators in registers): the 64 x 128 logit tile plus a 64 x 64
            # gradient slice spill; 32-wide slices do not. sm_90 TF32 with both gradients: 3 stages
            # of 4-byte [64 x 64] + [64 x 128] operands for the logits and both gradient GEMMs take
            # 241 KiB > 227 KiB; 32-wide slices take 153 KiB. On sm_80 Triton 3.6's ptxas caps some
            # variants at 128 registers and spills 2-6 instructions: they fit under 255.
            if kernel == "token_kl_backward" and tf32 and arch < 90:
                # two heads' 4-byte tiles with softcap and bias: 32-wide slices still spill at 255
                return GPU_CONFIG._replace(block_h=16, maxnreg=255)
            return GPU_CONFIG._replace(block_h=32, maxnreg=255 if arch < 90 else None)
        if arch >= 100:
            # sm_100 (tcgen05, accumulators in tensor memory): ptxas's heuristic caps some variants (bias
            # gradient with the filter) at 128 registers and spills; they fit under 255.
            return GPU_CONFIG._replace(maxnreg=255)
    elif dtype == torch.float32 and arch < 90:
        # sm_80 TF32 forward with statistics: the 4-byte operand slices of a 64-wide H step next to the
        # logit tile and seven per-row running sums reach 255 registers and spill; 32-wide slices fit.
        return GPU_CONFIG._replace(block_h=32)
    elif kernel == "token_kl_forward" and arch >= 100:
        # sm_100, two heads' logit tiles: Triton 3.6's ptxas caps some variants (16-bit with a softcap)
        # at 128 registers and spills; they fit under 255. Float32 (TF32) 4-byte operand slices of a
        # 64-wide H step also spill under Triton 3.9; 32-wide slices fit.
        block_h = 32 if dtype == torch.float32 else GPU_CONFIG.block_h
        return GPU_CONFIG._replace(block_h=block_h, maxnreg=255)
    return GPU_CONFIG


def _device_arch(device: torch.device) -> int | None:
    if interpreting() or device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _launch_config(kernel: str, hidden: torch.Tensor, **options) -> TileConfig:
    ieee = bool(_kernel_flags(hidden)["IEEE_FP32"])
    return select_config(kernel, hidden.dtype, _device_arch(hidden.device), ieee_fp32=ieee, **options)


@triton.jit
def offsets_2d(rows, cols, stride_r, stride_c):
    """Element offsets of a [rows x cols] block, in int64: V*H or N*H may exceed 2^31."""
    return rows.to(tl.int64)[:, None] * stride_r + cols.to(tl.int64)[None, :] * stride_c


@triton.jit
def _logit_tile(
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
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """raw[BLOCK_N, BLOCK_V] = h[offs_n] @ W[offs_v]^T (+ b), accumulated in ACC."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=ACC)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        a = tl.load(
            h_ptr + offsets_2d(offs_n, offs_h, stride_hn, stride_hh), mask=mask_n[:, None] & mask_h[None, :], other=0.0
        )
        # W^T tile loaded directly as [BLOCK_H, BLOCK_V].
        b = tl.load(
            w_ptr + offsets_2d(offs_h, offs_v, stride_wh, stride_wv), mask=mask_h[:, None] & mask_v[None, :], other=0.0
        )
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE_FP32:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=mask_v, other=0.0).to(ACC)[None, :]
    return acc


@triton.jit
def _masked_row_products(e, x):
    """Row sums of e * x where e > 0: a masked entry (e = 0, x = -inf) adds 0, not nan."""
    return tl.sum(e * tl.where(e > 0.0, x, 0.0), axis=1)


@triton.jit
def _accumulate_grads(
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
    """d_hidden[offs_n] += dz @ W[offs_v];  d_weight[offs_v] += dz^T @ h[offs_n];  d_bias += sum_n dz.

    float32 atomics into global buffers, one BLOCK_H slice of the hidden size at a time. The atomics
    are relaxed: the adds commute and nothing in the kernel reads the buffers back, so no ordering is
    needed; the default (acq_rel) fences every add with MEMBAR.ALL.GPU + CCTL.IVALL.
    """
    if UPCAST:
        dz_op = dz
    else:
        # Tensor-core operands in the input precision; the products still accumulate in fp32.
        dz_op = dz.to(h_ptr.dtype.element_ty)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        if NEED_DH:
            w = tl.load(
                w_ptr + offsets_2d(offs_v, offs_h, stride_wv, stride_wh),
                mask=mask_v[:, None] & mask_h[None, :],
                other=0.0,
            )
            if UPCAST:
                w = w.to(tl.float32)
            part = tl.zeros((BLOCK_N, BLOCK_H), dtype=ACC)
            if IEEE_FP32:
                part = tl.dot(dz_op, w, part, input_precision="ieee")
            else:
                part = tl.dot(dz_op, w, part)
            tl.atomic_add(
                dh_ptr + offsets_2d(offs_n, offs_h, H, 1), part, mask=mask_n[:, None] & mask_h[None, :], sem="relaxed"
            )
        if NEED_DW:
            hb = tl.load(
                h_ptr + offsets_2d(offs_n, offs_h, stride_hn, stride_hh),
                mask=mask_n[:, None] & mask_h[None, :],
                other=0.0,
            )
            if UPCAST:
                hb = hb.to(tl.float32)
            part = tl.zeros((BLOCK_V, BLOCK_H), dtype=ACC)
            if IEEE_FP32:
                part = tl.dot(tl.trans(dz_op), hb, part, input_precision="ieee")
            else:
                part = tl.dot(tl.trans(dz_op), hb, part)
            tl.atomic_add(
                dw_ptr + offsets_2d(offs_v, offs_h, H, 1), part, mask=mask_v[:, None] & mask_h[None, :], sem="relaxed"
            )
    if NEED_DB:
        tl.atomic_add(db_ptr + offs_v, tl.sum(dz, axis=0), mask=mask_v, sem="relaxed")


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
        raw = _logit_tile(
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
            sz = rescale * (sz + tl.where(s > 0.0, m - shift, 0.0) * s) + _masked_row_products(e, z - shift[:, None])
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
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_n = offs_n < N
    mask_v = offs_v < V
    y = tl.load(y_ptr + offs_n, mask=mask_n, other=-1) - vocab_start  # row index of the label, if here
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0).to(ACC)
    g = tl.load(g_ptr + offs_n, mask=mask_n, other=0.0).to(ACC)

    raw = _logit_tile(
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
        _accumulate_grads(
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


def _kernel_flags(hidden: torch.Tensor) -> dict:
    fp64 = hidden.dtype == torch.float64
    low_precision = hidden.dtype in (torch.bfloat16, torch.float16)
    return dict(
        UPCAST=interpreting() and low_precision,
        # float32 inputs: exact fp32 products unless the user opted into TF32 for matmuls.
        IEEE_FP32=hidden.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32,
        ACC=tl.float64 if fp64 else tl.float32,
    )


def _filter_args() -> dict:
    eps = get_kernel_options().grad_filter_eps
    return dict(filter_eps=float(eps or 0.0), FILTER=eps is not None)


def _choose_splits(n_token_blocks: int, vocab_tiles: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    # Aim for a few waves of programs; each extra split only costs O(N) partials.
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(vocab_tiles, triton.cdiv(target, n_token_blocks)))


def _split_vocab(n_tokens, vocab, cfg: TileConfig, device, vocab_splits):
    """(token blocks, vocab splits, vocab columns per split), with no empty split."""
    n_blocks = triton.cdiv(n_tokens, cfg.block_n)
    vocab_tiles = triton.cdiv(vocab, cfg.block_v)
    splits = min(vocab_splits or _choose_splits(n_blocks, vocab_tiles, device), vocab_tiles)
    per_split = triton.cdiv(vocab_tiles, splits) * cfg.block_v
    return n_blocks, triton.cdiv(vocab, per_split), per_split


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
) -> S.LogprobState:
    """hidden [N, H], weight [V_s, H] (ids ``vocab_start + [0, V_s)``), bias [V_s] | None, labels [N]
    global ids -> the range's partial state: the vocab splits' states merged (``ops.state``).

    ``topk=k``: each program also keeps its split's k best logits, merging tile after tile inside the
    forward kernel (``_topk_merge_tile``; no second pass over the head, which would cost another
    ``2NHV``), and the splits' top-k merge with the rest of the state (``state.select_topk``)."""
    n_tokens, hid = hidden.shape
    vocab = weight.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    if n_tokens == 0 or vocab == 0:
        return S.empty_logprob_state(n_tokens, with_stats, acc, hidden.device, topk)
    labels, bias = labels.contiguous(), None if bias is None else bias.contiguous()
    cfg = config or _launch_config("forward", hidden, topk=topk)
    n_blocks, splits, per_split = _split_vocab(n_tokens, vocab, cfg, hidden.device, vocab_splits)
    parts = torch.empty((N_SLOTS, splits, n_tokens), dtype=acc, device=hidden.device)
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
        **_kernel_flags(hidden),
    )
    fields = N_SLOTS if with_stats else 3  # m, s, z_label come first
    states = [S.LogprobState(*parts[:fields, k]) for k in range(splits)]
    if topk > 0:
        states = [st._replace(topk_values=top_v[k], topk_ids=top_i[k]) for k, st in enumerate(states)]
    return S.merge_logprob_states(states)


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
        cfg = config or _launch_config("backward", hidden, **grads)
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
            **_kernel_flags(hidden),
            **_filter_args(),
        )
    return cast_grads(d_hidden, d_weight, d_bias, hidden, weight, bias)


# --------------------------------------------------------------------------------------------
# Two heads over the same tokens: per-token KL(ref || policy) (see torch_backend for the math).
# Same schedule as the log-prob kernels; each program computes both heads' logit tiles.
# --------------------------------------------------------------------------------------------


@triton.jit
def _two_head_logits(
    h_ptr,
    w_ptr,
    b_ptr,
    hr_ptr,
    wr_ptr,
    br_ptr,
    offs_n,
    offs_v,
    mask_n,
    mask_v,
    H,
    HR,
    stride_hn,
    stride_hh,
    stride_wv,
    stride_wh,
    stride_hrn,
    stride_hrh,
    stride_wrv,
    stride_wrh,
    logit_scale,
    softcap,
    inv_temp,
    HAS_BIAS: tl.constexpr,
    HAS_REF_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Transformed policy and reference logit tiles over the same tokens and vocab columns:
    ``(zp, dzp/draw, zr)``."""
    zp, deriv = apply_transform(
        _logit_tile(
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
        ),
        logit_scale,
        softcap,
        inv_temp,
        HAS_SOFTCAP,
    )
    zr, _ = apply_transform(
        _logit_tile(
            hr_ptr,
            wr_ptr,
            br_ptr,
            offs_n,
            offs_v,
            mask_n,
            mask_v,
            HR,
            stride_hrn,
            stride_hrh,
            stride_wrv,
            stride_wrh,
            HAS_REF_BIAS,
            UPCAST,
            IEEE_FP32,
            ACC,
            BLOCK_N,
            BLOCK_V,
            BLOCK_H,
        ),
        logit_scale,
        softcap,
        inv_temp,
        HAS_SOFTCAP,
    )
    return zp, deriv, zr


@triton.jit
def _token_kl_forward_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    hr_ptr,
    wr_ptr,
    br_ptr,
    part_ptr,
    N,
    V,
    H,
    HR,
    stride_hn,
    stride_hh,
    stride_wv,
    stride_wh,
    stride_hrn,
    stride_hrh,
    stride_wrv,
    stride_wrh,
    vocab_per_split,
    n_splits,
    logit_scale,
    softcap,
    inv_temp,
    HAS_BIAS: tl.constexpr,
    HAS_REF_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    m_p = tl.full((BLOCK_N,), float("-inf"), dtype=ACC)
    m_r = tl.full((BLOCK_N,), float("-inf"), dtype=ACC)
    s_p = tl.zeros((BLOCK_N,), dtype=ACC)
    s_r = tl.zeros((BLOCK_N,), dtype=ACC)
    cross = tl.zeros((BLOCK_N,), dtype=ACC)  # sum e^(zr - m_r) ((zr - m_r) - (zp - m_p))
    v_lo = pid_s * vocab_per_split
    v_hi = tl.minimum(v_lo + vocab_per_split, V)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < v_hi
        zp, _, zr = _two_head_logits(
            h_ptr,
            w_ptr,
            b_ptr,
            hr_ptr,
            wr_ptr,
            br_ptr,
            offs_n,
            offs_v,
            mask_n,
            mask_v,
            H,
            HR,
            stride_hn,
            stride_hh,
            stride_wv,
            stride_wh,
            stride_hrn,
            stride_hrh,
            stride_wrv,
            stride_wrh,
            logit_scale,
            softcap,
            inv_temp,
            HAS_BIAS,
            HAS_REF_BIAS,
            HAS_SOFTCAP,
            UPCAST,
            IEEE_FP32,
            ACC,
            BLOCK_N,
            BLOCK_V,
            BLOCK_H,
        )
        zp = tl.where(mask_v[None, :], zp, float("-inf"))
        zr = tl.where(mask_v[None, :], zr, float("-inf"))
        mp_new = tl.maximum(m_p, tl.max(zp, axis=1))
        mr_new = tl.maximum(m_r, tl.max(zr, axis=1))
        shift_p = safe_shift(mp_new)
        shift_r = safe_shift(mr_new)
        er = tl.exp(zr - shift_r[:, None])
        rescale_r = tl.exp(m_r - shift_r)
        # sum e^(zr - m_r)((zr - m_r) - (zp - m_p)) moved to the new maxima (see ops.state), with the
        # old sums: cross + ((m_r - M_r) - (m_p - M_p)) s_r, each term 0 where its sum is still 0
        moved = (tl.where(s_r > 0.0, m_r - shift_r, 0.0) - tl.where(s_p > 0.0, m_p - shift_p, 0.0)) * s_r
        cross = rescale_r * (cross + moved) + _masked_row_products(
            er, (zr - shift_r[:, None]) - (zp - shift_p[:, None])
        )
        s_p = s_p * tl.exp(m_p - shift_p) + tl.sum(tl.exp(zp - shift_p[:, None]), axis=1)
        s_r = s_r * rescale_r + tl.sum(er, axis=1)
        m_p = mp_new
        m_r = mr_new
    tl.store(part_ptr + (SLOT_MP * n_splits + pid_s) * N + offs_n, m_p, mask=mask_n)
    tl.store(part_ptr + (SLOT_SP * n_splits + pid_s) * N + offs_n, s_p, mask=mask_n)
    tl.store(part_ptr + (SLOT_MR * n_splits + pid_s) * N + offs_n, m_r, mask=mask_n)
    tl.store(part_ptr + (SLOT_SR * n_splits + pid_s) * N + offs_n, s_r, mask=mask_n)
    tl.store(part_ptr + (SLOT_CROSS * n_splits + pid_s) * N + offs_n, cross, mask=mask_n)


@triton.jit
def _token_kl_backward_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    hr_ptr,
    wr_ptr,
    br_ptr,
    lse_p_ptr,
    lse_r_ptr,
    g_ptr,
    dh_ptr,
    dw_ptr,
    db_ptr,
    N,
    V,
    H,
    HR,
    stride_hn,
    stride_hh,
    stride_wv,
    stride_wh,
    stride_hrn,
    stride_hrh,
    stride_wrv,
    stride_wrh,
    logit_scale,
    softcap,
    inv_temp,
    filter_eps,
    HAS_BIAS: tl.constexpr,
    HAS_REF_BIAS: tl.constexpr,
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
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_n = offs_n < N
    mask_v = offs_v < V
    lse_p = tl.load(lse_p_ptr + offs_n, mask=mask_n, other=0.0).to(ACC)
    lse_r = tl.load(lse_r_ptr + offs_n, mask=mask_n, other=0.0).to(ACC)
    g = tl.load(g_ptr + offs_n, mask=mask_n, other=0.0).to(ACC)
    zp, deriv, zr = _two_head_logits(
        h_ptr,
        w_ptr,
        b_ptr,
        hr_ptr,
        wr_ptr,
        br_ptr,
        offs_n,
        offs_v,
        mask_n,
        mask_v,
        H,
        HR,
        stride_hn,
        stride_hh,
        stride_wv,
        stride_wh,
        stride_hrn,
        stride_hrh,
        stride_wrv,
        stride_wrh,
        logit_scale,
        softcap,
        inv_temp,
        HAS_BIAS,
        HAS_REF_BIAS,
        HAS_SOFTCAP,
        UPCAST,
        IEEE_FP32,
        ACC,
        BLOCK_N,
        BLOCK_V,
        BLOCK_H,
    )
    p = tl.exp(tl.minimum(zp - lse_p[:, None], 0.0))
    q = tl.exp(tl.minimum(zr - lse_r[:, None], 0.0))
    valid = mask_n[:, None] & mask_v[None, :]
    dz = tl.where(valid, g[:, None] * (p - q) * deriv, 0.0)
    keep = True
    if FILTER:
        keep = tl.max(tl.where(valid, tl.maximum(p, q), 0.0)) >= filter_eps
    if keep:
        _accumulate_grads(
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


def token_kl_forward_partial(
    hidden,
    weight,
    bias,
    ref_hidden,
    ref_weight,
    ref_bias,
    transform: LogitTransform,
    config: TileConfig | None = None,
    vocab_splits: int | None = None,
) -> S.TokenKLState:
    """Policy hidden [N, H] / weight [V_s, H], reference [N, Hr] / [V_s, Hr] -> the range's token-KL
    partial state (the vocab splits' states merged)."""
    n_tokens, hid = hidden.shape
    vocab = weight.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    if n_tokens == 0 or vocab == 0:
        return S.empty_token_kl_state(n_tokens, acc, hidden.device)
    bias, ref_bias = (None if b is None else b.contiguous() for b in (bias, ref_bias))
    cfg = config or _launch_config("token_kl_forward", hidden)
    n_blocks, splits, per_split = _split_vocab(n_tokens, vocab, cfg, hidden.device, vocab_splits)
    parts = torch.empty((N_KL_SLOTS, splits, n_tokens), dtype=acc, device=hidden.device)
    _token_kl_forward_kernel[(n_blocks, splits)](
        hidden,
        weight,
        bias if bias is not None else hidden,
        ref_hidden,
        ref_weight,
        ref_bias if ref_bias is not None else hidden,
        parts,
        n_tokens,
        vocab,
        hid,
        ref_hidden.shape[1],
        *hidden.stride(),
        *weight.stride(),
        *ref_hidden.stride(),
        *ref_weight.stride(),
        per_split,
        splits,
        HAS_BIAS=bias is not None,
        HAS_REF_BIAS=ref_bias is not None,
        BLOCK_N=cfg.block_n,
        BLOCK_V=cfg.block_v,
        BLOCK_H=cfg.block_h,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        maxnreg=cfg.maxnreg,
        **transform_args(transform),
        **_kernel_flags(hidden),
    )
    return S.merge_token_kl_states([S.TokenKLState(*parts[:, k]) for k in range(splits)])


def token_kl_backward(
    grad_kl,
    hidden,
    weight,
    bias,
    ref_hidden,
    ref_weight,
    ref_bias,
    lse_p,
    lse_r,
    transform: LogitTransform,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    config: TileConfig | None = None,
):
    """Gradients of ``sum_n grad_kl[n] * KL_n`` w.r.t. the policy head only: dz_p = g (p - q)."""
    if torch.are_deterministic_algorithms_enabled():
        return torch_backend.token_kl_backward(
            grad_kl,
            hidden,
            weight,
            bias,
            ref_hidden,
            ref_weight,
            ref_bias,
            lse_p,
            lse_r,
            transform,
            need_hidden,
            need_weight,
            need_bias,
        )
    n_tokens, hid = hidden.shape
    vocab = weight.shape[0]
    d_hidden, d_weight, d_bias = grad_buffers(hidden, weight, need_hidden, need_weight, need_bias)
    if n_tokens > 0 and vocab > 0 and (need_hidden or need_weight or need_bias):
        grads = dict(need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias)
        cfg = config or _launch_config("token_kl_backward", hidden, **grads)
        grid = (triton.cdiv(n_tokens, cfg.block_n), triton.cdiv(vocab, cfg.block_v))
        dummy = lse_p
        _token_kl_backward_kernel[grid](
            hidden,
            weight,
            bias.contiguous() if bias is not None else dummy,
            ref_hidden,
            ref_weight,
            ref_bias.contiguous() if ref_bias is not None else dummy,
            lse_p.contiguous(),
            lse_r.contiguous(),
            grad_kl.contiguous(),
            d_hidden if need_hidden else dummy,
            d_weight if need_weight else dummy,
            d_bias if need_bias else dummy,
            n_tokens,
            vocab,
            hid,
            ref_hidden.shape[1],
            *hidden.stride(),
            *weight.stride(),
            *ref_hidden.stride(),
            *ref_weight.stride(),
            HAS_BIAS=bias is not None,
            HAS_REF_BIAS=ref_bias is not None,
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
            **_kernel_flags(hidden),
            **_filter_args(),
        )
    return cast_grads(d_hidden, d_weight, d_bias, hidden, weight, bias)
