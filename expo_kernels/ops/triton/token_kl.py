"""The fused two-head kernels: per-token KL(ref || policy) over the same tokens (see torch_backend for the
math), and its backward w.r.t. the policy head.

The same schedule as the log-prob kernels (``logprobs.py``); each program computes both heads' logit tiles.
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
    SLOT_CROSS,
    SLOT_MP,
    SLOT_MR,
    SLOT_SP,
    SLOT_SR,
    accumulate_grads,
    apply_transform,
    logit_tile,
    masked_row_products,
    safe_shift,
    transform_args,
)

__all__ = ["token_kl_forward_partial", "token_kl_backward"]


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
        logit_tile(
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
        logit_tile(
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
    """Grid (token blocks, vocab splits): one program folds both heads' [BLOCK_N, V / splits] slabs into a KL state."""
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
        cross = rescale_r * (cross + moved) + masked_row_products(er, (zr - shift_r[:, None]) - (zp - shift_p[:, None]))
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
    """Grid (token blocks, vocab tiles): one program recomputes both heads' tiles and adds the policy's gradients."""
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


def token_kl_forward_partial(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    ref_bias: torch.Tensor | None,
    transform: LogitTransform,
    config: TileConfig | None = None,
    vocab_splits: int | None = None,
) -> online_state.TokenKLState:
    """Policy hidden [N, H] / weight [V_s, H], reference [N, Hr] / [V_s, Hr] -> the range's token-KL
    partial state (the vocab splits' states merged)."""
    n_tokens, hid = hidden.shape
    vocab = weight.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    if n_tokens == 0 or vocab == 0:
        return online_state.empty_token_kl_state(n_tokens, acc, hidden.device)
    bias, ref_bias = (None if b is None else b.contiguous() for b in (bias, ref_bias))
    cfg = config or launch_config("token_kl_forward", hidden)
    n_blocks, splits, per_split = split_vocab(n_tokens, vocab, cfg, hidden.device, vocab_splits)
    parts = torch.empty((online_state.TOKEN_KL_SLOTS, splits, n_tokens), dtype=acc, device=hidden.device)
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
        **kernel_flags(hidden),
    )
    return online_state.merge_token_kl_states([online_state.TokenKLState(*parts[:, k]) for k in range(splits)])


def token_kl_backward(
    grad_kl: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    ref_bias: torch.Tensor | None,
    lse_p: torch.Tensor,
    lse_r: torch.Tensor,
    transform: LogitTransform,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    config: TileConfig | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
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
        cfg = config or launch_config("token_kl_backward", hidden, **grads)
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
            **kernel_flags(hidden),
            **filter_args(),
        )
    return cast_grads(d_hidden, d_weight, d_bias, hidden, weight, bias)
