"""Chunked pure-PyTorch backend: the readable specification of the fused op.

Runs on any device. Tokens are processed in blocks of ``TOKEN_CHUNK`` and the vocabulary in
tiles of ``VOCAB_CHUNK``; the largest temporary is one ``[TOKEN_CHUNK, VOCAB_CHUNK]`` float32
tile, never ``[N, V]``. Every other backend is tested against this file.

Forward (DESIGN.md section 2), one pass over vocab tiles with an online log-sum-exp per token:
    m  <- max(m, max_v z_v)                 running maximum
    s  <- s * e^(m_old - m) + sum_v e^(z_v - m)
    lse = m + log s,   logp = z_label - lse
Statistics ride along in the same pass: ``sum_v e^(z_v - m) (z_v - m)`` for the entropy,
``sum_v e^(2(z_v - m))`` for ``log sum p^2``, ``sum_v z_v`` for the mean logit.

Numerics (the rules every backend follows):
* entropy is ``log s - sum_v e^(z_v - m)(z_v - m) / s`` = ``sum_v p_v (lse - z_v)``: the logits are
  shifted by the running max before the products, so the error does not grow with ``|z|`` (the
  unshifted ``lse - sum_v p_v z_v`` cancels catastrophically at ``|z| ~ 1e4`` in float32);
* a masked vocabulary entry (``z_v = -inf``, e.g. a ``-inf`` bias) has ``p_v = 0`` and adds 0 to
  every sum and statistic (``mean_logit`` is the sum of the finite logits divided by ``V``);
* the shift is 0 while a token has seen only masked entries, so no ``-inf - (-inf)`` appears.

Backward recomputes each tile: ``dz = g * (onehot(label) - p) * dz/draw``, then
``d_hidden += dz @ W_tile``, ``d_weight[tile] += dz^T @ h``, ``d_bias[tile] += sum_n dz``,
all accumulated in float32. ``p = exp(min(z - lse, 0))``: a probability is at most 1 even when the
recomputed logit rounds a hair above the saved ``lse`` (at ``|z| ~ 1e30`` that hair is ~1e23).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .common import LogitTransform, TokenOutputs

# Tile of the recomputed logits: 1024 x 8192 float32 = 32 MiB. Large enough that the GEMMs run
# near peak on a CPU, small enough that the tile is noise next to the weight and its gradient.
TOKEN_CHUNK = 1024
VOCAB_CHUNK = 8192


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # float64 stays float64 (gradcheck); everything else accumulates in float32.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _raw_logits(h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], acc: torch.dtype) -> torch.Tensor:
    """``h @ w.T + b`` for one tile, computed in ``acc`` precision (bf16 inputs upcast first)."""
    raw = h.to(acc) @ w.to(acc).T
    if b is not None:
        raw += b.to(acc)
    return raw


def safe_shift(m: torch.Tensor) -> torch.Tensor:
    """The running max as a shift for ``exp(z - shift)``: 0 where no finite logit was seen yet, so
    masked entries (``-inf``) give ``exp(-inf) = 0`` instead of ``exp(-inf - (-inf)) = nan``."""
    return torch.where(m > -math.inf, m, torch.zeros_like(m))


def masked_products(e: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Row sums of ``e * x`` where ``e > 0``: a masked entry (``e = 0``, ``x = -inf``) adds 0, not nan."""
    return (e * torch.where(e > 0, x, 0.0)).sum(dim=1)


def probabilities(z: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """``p = exp(z - lse)`` clamped to 1: the recomputed logit may round a hair above the saved lse."""
    return torch.exp(torch.clamp_max(z - lse, 0.0))


def empty_outputs(hidden: torch.Tensor, with_stats: bool) -> TokenOutputs:
    """The forward's result for N = 0: distinct empty tensors (registered ops may not alias outputs)."""
    acc = _acc_dtype(hidden.dtype)

    def empty(dtype=acc):
        return hidden.new_zeros(0, dtype=dtype)

    stats = (empty(), empty(), empty(torch.bool), empty()) if with_stats else (None,) * 4
    return TokenOutputs(empty(), empty(), *stats)


def _grad_buffers(hidden, weight, need_hidden, need_weight, need_bias):
    """Zeroed accumulators (float32; float64 for float64 inputs) for the gradients asked for."""
    acc = _acc_dtype(hidden.dtype)
    return (
        torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_hidden else None,
        torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None,
        torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_bias else None,
    )


def _cast_grads(d_hidden, d_weight, d_bias, hidden, weight, bias):
    """Accumulators back to the inputs' dtypes."""
    return (
        None if d_hidden is None else d_hidden.to(hidden.dtype),
        None if d_weight is None else d_weight.to(weight.dtype),
        None if d_bias is None else d_bias.to(bias.dtype),
    )


def forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    transform: LogitTransform,
    with_stats: bool,
) -> TokenOutputs:
    """hidden [N, H], weight [V, H], bias [V] | None, labels [N] in [0, V) -> TokenOutputs ([N] each)."""
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    if n_tokens == 0:
        return empty_outputs(hidden, with_stats)
    out = {k: [] for k in TokenOutputs._fields}
    for t0 in range(0, n_tokens, TOKEN_CHUNK):
        h = hidden[t0 : t0 + TOKEN_CHUNK]
        y = labels[t0 : t0 + TOKEN_CHUNK]
        n = h.shape[0]
        m = torch.full((n,), -math.inf, dtype=acc, device=h.device)
        s = torch.zeros(n, dtype=acc, device=h.device)
        sz = torch.zeros_like(s)  # sum e^(z-m) (z-m)  -> entropy (shifted: see the module docstring)
        s2 = torch.zeros_like(s)  # sum e^(2(z-m))     -> log sum p^2
        z_sum = torch.zeros_like(s)
        z_label = torch.zeros_like(s)
        max_before_label = torch.full_like(s, -math.inf)  # for first-argmax tie-breaking
        for v0 in range(0, vocab, VOCAB_CHUNK):
            w = weight[v0 : v0 + VOCAB_CHUNK]
            cols = torch.arange(v0, v0 + w.shape[0], device=h.device)
            z = transform.apply(_raw_logits(h, w, None if bias is None else bias[v0 : v0 + VOCAB_CHUNK], acc))
            m_new = torch.maximum(m, z.amax(dim=1))
            shift = safe_shift(m_new)
            rescale = torch.exp(m - shift)  # 0 while m = -inf
            e = torch.exp(z - shift[:, None])
            in_tile = (y >= v0) & (y < v0 + w.shape[0])
            z_label = torch.where(in_tile, z.gather(1, (y - v0).clamp(0, w.shape[0] - 1)[:, None])[:, 0], z_label)
            if with_stats:
                # sum e^(z - m_new)(z - m_new) = rescale * (sz + (m - m_new) s) + this tile's terms
                sz = rescale * (sz + torch.where(s > 0, m - shift, 0.0) * s) + masked_products(e, z - shift[:, None])
                s2 = s2 * rescale * rescale + (e * e).sum(dim=1)
                z_sum += torch.where(z > -math.inf, z, 0.0).sum(dim=1)
                before = cols[None, :] < y[:, None]
                max_before_label = torch.maximum(max_before_label, z.masked_fill(~before, -math.inf).amax(dim=1))
            s = s * rescale + e.sum(dim=1)
            m = m_new
            del z, e
        lse = m + torch.log(s)
        out["logp"].append(z_label - lse)
        out["lse"].append(lse)
        if with_stats:
            out["entropy"].append(torch.log(s) - sz / s)
            out["mean_logit"].append(z_sum / vocab)
            # label is the (first) argmax: it reaches the maximum and nothing before it does.
            out["is_top1"].append((z_label >= m) & (max_before_label < z_label))
            out["log_sum_p2"].append(torch.log(s2) - 2.0 * torch.log(s))

    def cat(parts):
        return torch.cat(parts) if parts else None

    return TokenOutputs(
        logp=cat(out["logp"]),
        lse=cat(out["lse"]),
        entropy=cat(out["entropy"]),
        mean_logit=cat(out["mean_logit"]),
        is_top1=cat(out["is_top1"]),
        log_sum_p2=cat(out["log_sum_p2"]),
    )


def backward(
    grad_logp: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    lse: torch.Tensor,
    transform: LogitTransform,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of ``sum_n grad_logp[n] * logp[n]``; float32 (float64 for float64 inputs) accumulators."""
    acc = _acc_dtype(hidden.dtype)
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    d_hidden, d_weight, d_bias = _grad_buffers(hidden, weight, need_hidden, need_weight, need_bias)
    for t0 in range(0, n_tokens, TOKEN_CHUNK):
        h = hidden[t0 : t0 + TOKEN_CHUNK]
        y = labels[t0 : t0 + TOKEN_CHUNK]
        g = grad_logp[t0 : t0 + TOKEN_CHUNK].to(acc)
        lse_t = lse[t0 : t0 + TOKEN_CHUNK].to(acc)
        h_acc = h.to(acc)
        for v0 in range(0, vocab, VOCAB_CHUNK):
            w = weight[v0 : v0 + VOCAB_CHUNK]
            raw = _raw_logits(h, w, None if bias is None else bias[v0 : v0 + VOCAB_CHUNK], acc)
            z, dz_draw = transform.apply_with_derivative(raw)
            # dlogp/dz_v = 1[v = label] - p_v; scale by the upstream gradient and the transform.
            dz = probabilities(z, lse_t[:, None]).mul_(-g[:, None])
            in_tile = (y >= v0) & (y < v0 + w.shape[0])
            rows = torch.nonzero(in_tile).squeeze(1)
            dz[rows, y[rows] - v0] += g[rows]
            dz = dz * dz_draw
            if need_hidden:
                d_hidden[t0 : t0 + TOKEN_CHUNK] += dz @ w.to(acc)
            if need_weight:
                d_weight[v0 : v0 + VOCAB_CHUNK] += dz.T @ h_acc
            if need_bias:
                d_bias[v0 : v0 + VOCAB_CHUNK] += dz.sum(dim=0)
            del raw, z, dz
    return _cast_grads(d_hidden, d_weight, d_bias, hidden, weight, bias)


# --------------------------------------------------------------------------------------------
# Two heads over the same tokens: per-token KL(ref || policy) over the full vocabulary.
#   KL_n = sum_v q_v (zr_v - zp_v) - lse_r + lse_p,  q = softmax(zr)
# streamed with running (max, sum) for both heads and the running sum e^(zr - m_r)(zr - zp);
# the gradient w.r.t. the policy logits is p - q (DESIGN.md section 2).
# --------------------------------------------------------------------------------------------


def token_kl_forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, transform: LogitTransform):
    """Policy hidden [N, H] / weight [V, H], reference [N, Hr] / [V, Hr] -> (kl, lse_p, lse_r), each [N]."""
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    results = []
    for t0 in range(0, n_tokens, TOKEN_CHUNK):
        h, hr = hidden[t0 : t0 + TOKEN_CHUNK], ref_hidden[t0 : t0 + TOKEN_CHUNK]
        n = h.shape[0]
        m_p = torch.full((n,), -math.inf, dtype=acc, device=h.device)
        m_r = torch.full_like(m_p, -math.inf)
        s_p, s_r, cross = torch.zeros_like(m_p), torch.zeros_like(m_p), torch.zeros_like(m_p)
        for v0 in range(0, vocab, VOCAB_CHUNK):
            sl = slice(v0, v0 + VOCAB_CHUNK)
            zp = transform.apply(_raw_logits(h, weight[sl], None if bias is None else bias[sl], acc))
            zr = transform.apply(_raw_logits(hr, ref_weight[sl], None if ref_bias is None else ref_bias[sl], acc))
            mp_new = torch.maximum(m_p, zp.amax(dim=1))
            mr_new = torch.maximum(m_r, zr.amax(dim=1))
            shift_p, shift_r = safe_shift(mp_new), safe_shift(mr_new)
            s_p = s_p * torch.exp(m_p - shift_p) + torch.exp(zp - shift_p[:, None]).sum(dim=1)
            er = torch.exp(zr - shift_r[:, None])
            rescale_r = torch.exp(m_r - shift_r)
            s_r = s_r * rescale_r + er.sum(dim=1)
            # an entry masked in the reference (q = 0) adds 0 even where the policy is masked too
            cross = cross * rescale_r + masked_products(er, zr - zp)
            m_p, m_r = mp_new, mr_new
        lse_p, lse_r = m_p + torch.log(s_p), m_r + torch.log(s_r)
        results.append(torch.stack([cross / s_r - lse_r + lse_p, lse_p, lse_r]))
    if not results:
        return tuple(hidden.new_zeros(0, dtype=acc) for _ in range(3))
    # three separate tensors: registered ops may not return views of one another
    kl, lse_p, lse_r = (t.clone() for t in torch.cat(results, dim=1))
    return kl, lse_p, lse_r


def token_kl_backward(grad_kl, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, lse_p, lse_r,
                      transform: LogitTransform, need_hidden: bool, need_weight: bool, need_bias: bool):
    """Gradients of ``sum_n grad_kl[n] * KL_n`` w.r.t. the policy head only: dz_p = g (p - q)."""
    acc = _acc_dtype(hidden.dtype)
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    d_hidden, d_weight, d_bias = _grad_buffers(hidden, weight, need_hidden, need_weight, need_bias)
    for t0 in range(0, n_tokens, TOKEN_CHUNK):
        ts = slice(t0, t0 + TOKEN_CHUNK)
        h, hr, g = hidden[ts], ref_hidden[ts], grad_kl[ts].to(acc)
        for v0 in range(0, vocab, VOCAB_CHUNK):
            sl = slice(v0, v0 + VOCAB_CHUNK)
            zp, dzp_draw = transform.apply_with_derivative(
                _raw_logits(h, weight[sl], None if bias is None else bias[sl], acc))
            zr = transform.apply(_raw_logits(hr, ref_weight[sl], None if ref_bias is None else ref_bias[sl], acc))
            p = probabilities(zp, lse_p[ts].to(acc)[:, None])
            q = probabilities(zr, lse_r[ts].to(acc)[:, None])
            dz = (p - q) * g[:, None] * dzp_draw
            if need_hidden:
                d_hidden[ts] += dz @ weight[sl].to(acc)
            if need_weight:
                d_weight[sl] += dz.T @ h.to(acc)
            if need_bias:
                d_bias[sl] += dz.sum(dim=0)
    return _cast_grads(d_hidden, d_weight, d_bias, hidden, weight, bias)
