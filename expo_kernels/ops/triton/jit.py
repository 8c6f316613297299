"""The ``@triton.jit`` helpers every fused kernel shares, the state buffers' slot layout, and the one builder
of the logit transform's launch arguments.

The log-prob kernels (``logprobs.py``), the two-head KL kernels (``token_kl.py``) and the epilogues on
library GEMMs (``epilogues.py``) all import from here, so no kernel module imports another's names.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .. import state as online_state
from ..common import LogitTransform

__all__ = [
    "safe_shift",
    "apply_transform",
    "transform_args",
    "offsets_2d",
    "logit_tile",
    "masked_row_products",
    "accumulate_grads",
]

# Slots of the partial-state buffers [slots, splits, N]: the field order of ops.state.LogprobState
# and TokenKLState, so a split's slots are its state (the slot counts: ops.state.LOGPROB_SLOTS, ...).
SLOT_M, SLOT_S, SLOT_ZLABEL, SLOT_SZ, SLOT_S2, SLOT_ZSUM, SLOT_MAX_BEFORE = (
    tl.constexpr(online_state.LogprobState._fields.index(f))
    for f in ("m", "s", "z_label", "sz", "s2", "z_sum", "max_before")
)
# The id of an empty top-k slot (ops.state.TOPK_PAD_ID): after every real id among -inf values.
TOPK_PAD = tl.constexpr(online_state.TOPK_PAD_ID)
SLOT_MP, SLOT_SP, SLOT_MR, SLOT_SR, SLOT_CROSS = (
    tl.constexpr(online_state.TokenKLState._fields.index(f)) for f in ("m_p", "s_p", "m_r", "s_r", "cross")
)


@triton.jit
def safe_shift(m):
    """The running max as a shift: 0 while only masked (-inf) logits were seen (see torch_backend)."""
    return tl.where(m > float("-inf"), m, 0.0)


@triton.jit
def apply_transform(raw, logit_scale, softcap, inv_temp, HAS_SOFTCAP: tl.constexpr):
    """z = softcap(raw * scale) / T and dz/draw (see LogitTransform)."""
    x = raw * logit_scale
    deriv = logit_scale * inv_temp
    if HAS_SOFTCAP:
        # tanh(u) = 2 sigmoid(2u) - 1: tl has no portable tanh across Triton 3.x versions.
        t = 2.0 * tl.sigmoid(2.0 * x / softcap) - 1.0
        x = softcap * t
        deriv = deriv * (1.0 - t * t)
    return x * inv_temp, deriv


def transform_args(transform: LogitTransform) -> dict:
    """The arguments :func:`apply_transform` takes, as a kernel launch passes them (softcap 1.0 when off)."""
    return dict(
        logit_scale=float(transform.logit_scale),
        softcap=float(transform.softcap) if transform.softcap is not None else 1.0,
        inv_temp=float(transform.inv_temperature),
        HAS_SOFTCAP=transform.softcap is not None,
    )


@triton.jit
def offsets_2d(rows, cols, stride_r, stride_c):
    """Element offsets of a [rows x cols] block, in int64: V*H or N*H may exceed 2^31."""
    return rows.to(tl.int64)[:, None] * stride_r + cols.to(tl.int64)[None, :] * stride_c


@triton.jit
def logit_tile(
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
def masked_row_products(e, x):
    """Row sums of e * x where e > 0: a masked entry (e = 0, x = -inf) adds 0, not nan."""
    return tl.sum(e * tl.where(e > 0.0, x, 0.0), axis=1)


@triton.jit
def accumulate_grads(
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
