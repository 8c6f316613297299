"""Chunked pure-PyTorch backend: the readable specification of the fused op.

Runs on any device. Tokens are processed in blocks of ``TOKEN_CHUNK`` and the vocabulary in
tiles of ``VOCAB_CHUNK``; the largest temporary is one ``[TOKEN_CHUNK, VOCAB_CHUNK]`` float32
tile, never ``[N, V]``. Every other backend is tested against this file.

Forward (docs/design.md, "Forward"): each logit tile becomes a partial state (``ops.state``: max,
sum of exponentials, label logit, statistics' sums) and is merged into the running state with the
same ``merge`` that combines Triton's vocab splits and the vocab-parallel ranks; ``finalize`` gives
``lse = m + log s``, ``logp = z_label - lse`` and the statistics. Numerics every backend follows:

* entropy is ``log s - sum_v e^(z_v - m)(z_v - m) / s`` = ``sum_v p_v (lse - z_v)``: the logits are
  shifted by the max before the products, so the error does not grow with ``|z|`` (the unshifted
  ``lse - sum_v p_v z_v`` cancels catastrophically at ``|z| ~ 1e4`` in float32);
* a masked vocabulary entry (``z_v = -inf``, e.g. a ``-inf`` bias) has ``p_v = 0`` and adds 0 to
  every sum and statistic (``mean_logit`` is the sum of the finite logits divided by ``V``);
* the shift is 0 while a token has seen only masked entries, so no ``-inf - (-inf)`` appears.

Top-k (``topk=k``, ``ops.state``): each tile's k best entries (a stable descending sort of
the tile, whose columns ascend in id, so ties keep the lower id first) join the running k best, and
``state.select_topk`` keeps the k best of the union by (value descending, id ascending).

Labels are global ids and the weight may be a slice of the vocabulary starting at ``vocab_start``
(a rank's shard): a label outside the slice contributes no one-hot term, exactly as the full head
restricted to those rows.

Backward recomputes each tile: ``dz = g * (onehot(label) - p) * dz/draw``, then
``d_hidden += dz @ W_tile``, ``d_weight[tile] += dz^T @ h``, ``d_bias[tile] += sum_n dz``,
all accumulated in float32. ``p = exp(min(z - lse, 0))``: a probability is at most 1 even when the
recomputed logit rounds a hair above the saved ``lse`` (at ``|z| ~ 1e30`` that hair is ~1e23).
"""

from __future__ import annotations

import torch

from . import state as online_state
from .common import LogitTransform

# Tile of the recomputed logits: 1024 x 8192 float32 = 32 MiB. Large enough that the GEMMs run
# near peak on a CPU, small enough that the tile is noise next to the weight and its gradient.
TOKEN_CHUNK = 1024
VOCAB_CHUNK = 8192


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # float64 stays float64 (gradcheck); everything else accumulates in float32.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _raw_logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, acc: torch.dtype) -> torch.Tensor:
    """``h @ w.T + b`` for one tile, computed in ``acc`` precision (bf16 inputs upcast first)."""
    raw = h.to(acc) @ w.to(acc).T
    if b is not None:
        raw += b.to(acc)
    return raw


def masked_products(e: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Row sums of ``e * x`` where ``e > 0``: a masked entry (``e = 0``, ``x = -inf``) adds 0, not nan."""
    return (e * torch.where(e > 0, x, 0.0)).sum(dim=1)


def probabilities(z: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """``p = exp(z - lse)`` clamped to 1: the recomputed logit may round a hair above the saved lse."""
    return torch.exp(torch.clamp_max(z - lse, 0.0))


def grad_buffers(
    hidden: torch.Tensor, weight: torch.Tensor, need_hidden: bool, need_weight: bool, need_bias: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Zeroed accumulators (float32; float64 for float64 inputs) for the gradients asked for."""
    acc = _acc_dtype(hidden.dtype)
    return (
        torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_hidden else None,
        torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None,
        torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_bias else None,
    )


def cast_grads(
    d_hidden: torch.Tensor | None,
    d_weight: torch.Tensor | None,
    d_bias: torch.Tensor | None,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Accumulators back to the inputs' dtypes."""
    return (
        None if d_hidden is None else d_hidden.to(hidden.dtype),
        None if d_weight is None else d_weight.to(weight.dtype),
        None if d_bias is None or bias is None else d_bias.to(bias.dtype),  # no bias: no gradient
    )


def tile_topk(z: torch.Tensor, cols: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``min(k, v)`` best entries of a tile ``z [n, v]`` (columns: ascending global ids ``cols``)
    and their ids, value descending; stable, so equal values keep the lower id first."""
    best = z.argsort(dim=1, descending=True, stable=True)[:, :k]
    return z.gather(1, best), cols[best]


def tile_state(
    z: torch.Tensor, y: torch.Tensor, cols: torch.Tensor, with_stats: bool, topk: int = 0
) -> online_state.LogprobState:
    """The partial state of one logit tile ``z [n, v]`` whose columns are the global ids ``cols``."""
    state = _tile_state(z, y, cols, with_stats)
    if topk > 0:
        values, ids = tile_topk(z, cols, topk)
        state = state._replace(topk_values=values, topk_ids=ids)
    return state


def _tile_state(z: torch.Tensor, y: torch.Tensor, cols: torch.Tensor, with_stats: bool) -> online_state.LogprobState:
    m = z.amax(dim=1)
    shift = online_state.safe_shift(m)
    e = torch.exp(z - shift[:, None])
    hit = cols[None, :] == y[:, None]
    z_label = torch.where(hit, z, 0.0).sum(dim=1)
    if not with_stats:
        return online_state.LogprobState(m, e.sum(dim=1), z_label)
    return online_state.LogprobState(
        m,
        e.sum(dim=1),
        z_label,
        sz=masked_products(e, z - shift[:, None]),
        s2=(e * e).sum(dim=1),
        z_sum=torch.where(z > -float("inf"), z, 0.0).sum(dim=1),
        max_before=z.masked_fill(cols[None, :] >= y[:, None], -float("inf")).amax(dim=1),
    )


def forward_partial(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    transform: LogitTransform,
    with_stats: bool,
    vocab_start: int = 0,
    topk: int = 0,
) -> online_state.LogprobState:
    """hidden [N, H], weight [V_s, H] (vocabulary ids ``vocab_start + [0, V_s)``), bias [V_s] | None,
    labels [N] global ids -> the partial state of that vocabulary range ([N] tensors; with
    ``topk=k`` also the range's k best logits and ids, [N, k])."""
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    chunks = []
    for t0 in range(0, n_tokens, TOKEN_CHUNK):
        h = hidden[t0 : t0 + TOKEN_CHUNK]
        y = labels[t0 : t0 + TOKEN_CHUNK]
        run = online_state.empty_logprob_state(h.shape[0], with_stats, acc, h.device, topk)
        for v0 in range(0, vocab, VOCAB_CHUNK):
            w = weight[v0 : v0 + VOCAB_CHUNK]
            cols = torch.arange(vocab_start + v0, vocab_start + v0 + w.shape[0], device=h.device)
            z = transform.apply(_raw_logits(h, w, None if bias is None else bias[v0 : v0 + VOCAB_CHUNK], acc))
            run = online_state.merge_logprob_states([run, tile_state(z, y, cols, with_stats, topk)])
            del z
        chunks.append(run)
    if not chunks:
        return online_state.empty_logprob_state(0, with_stats, acc, hidden.device, topk)
    # field by field along the tokens; _make: the statistics fields are None in every chunk or in none
    return online_state.LogprobState._make(None if f[0] is None else torch.cat(f) for f in zip(*chunks, strict=False))


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
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``sum_n grad_logp[n] * logp[n]`` w.r.t. this vocabulary range's head (labels are
    global ids; ``lse`` the global one); float32 (float64 for float64 inputs) accumulators."""
    acc = _acc_dtype(hidden.dtype)
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    d_hidden, d_weight, d_bias = grad_buffers(hidden, weight, need_hidden, need_weight, need_bias)
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
            local = y - (vocab_start + v0)
            rows = torch.nonzero((local >= 0) & (local < w.shape[0])).squeeze(1)
            dz[rows, local[rows]] += g[rows]
            dz = dz * dz_draw
            if d_hidden is not None:
                d_hidden[t0 : t0 + TOKEN_CHUNK] += dz @ w.to(acc)
            if d_weight is not None:
                d_weight[v0 : v0 + VOCAB_CHUNK] += dz.T @ h_acc
            if d_bias is not None:
                d_bias[v0 : v0 + VOCAB_CHUNK] += dz.sum(dim=0)
            del raw, z, dz
    return cast_grads(d_hidden, d_weight, d_bias, hidden, weight, bias)


# --------------------------------------------------------------------------------------------
# Two heads over the same tokens: per-token KL(ref || policy) over the full vocabulary.
#   KL_n = sum_v q_v (zr_v - zp_v) - lse_r + lse_p,  q = softmax(zr)
# streamed with running (max, sum) for both heads and the running sum e^(zr - m_r)(zr - zp);
# the gradient w.r.t. the policy logits is p - q (docs/design.md, "Token KL").
# --------------------------------------------------------------------------------------------


def token_kl_tile_state(zp: torch.Tensor, zr: torch.Tensor) -> online_state.TokenKLState:
    """The token-KL partial state of one pair of logit tiles (policy ``zp``, reference ``zr``)."""
    m_p, m_r = zp.amax(dim=1), zr.amax(dim=1)
    shift_p, shift_r = online_state.safe_shift(m_p), online_state.safe_shift(m_r)
    er = torch.exp(zr - shift_r[:, None])
    # an entry masked in the reference (q = 0) adds 0 even where the policy is masked too
    cross = masked_products(er, (zr - shift_r[:, None]) - (zp - shift_p[:, None]))
    return online_state.TokenKLState(m_p, torch.exp(zp - shift_p[:, None]).sum(dim=1), m_r, er.sum(dim=1), cross)


def token_kl_forward_partial(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    ref_bias: torch.Tensor | None,
    transform: LogitTransform,
) -> online_state.TokenKLState:
    """Policy hidden [N, H] / weight [V_s, H], reference [N, Hr] / [V_s, Hr] -> the token-KL partial
    state of that vocabulary range ([N] tensors)."""
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    chunks = []
    for t0 in range(0, n_tokens, TOKEN_CHUNK):
        h, hr = hidden[t0 : t0 + TOKEN_CHUNK], ref_hidden[t0 : t0 + TOKEN_CHUNK]
        run = online_state.empty_token_kl_state(h.shape[0], acc, h.device)
        for v0 in range(0, vocab, VOCAB_CHUNK):
            sl = slice(v0, v0 + VOCAB_CHUNK)
            zp = transform.apply(_raw_logits(h, weight[sl], None if bias is None else bias[sl], acc))
            zr = transform.apply(_raw_logits(hr, ref_weight[sl], None if ref_bias is None else ref_bias[sl], acc))
            run = online_state.merge_token_kl_states([run, token_kl_tile_state(zp, zr)])
        chunks.append(run)
    if not chunks:
        return online_state.empty_token_kl_state(0, acc, hidden.device)
    return online_state.TokenKLState(*(torch.cat(f) for f in zip(*chunks, strict=False)))


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
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``sum_n grad_kl[n] * KL_n`` w.r.t. the policy head only: dz_p = g (p - q)."""
    acc = _acc_dtype(hidden.dtype)
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    d_hidden, d_weight, d_bias = grad_buffers(hidden, weight, need_hidden, need_weight, need_bias)
    for t0 in range(0, n_tokens, TOKEN_CHUNK):
        ts = slice(t0, t0 + TOKEN_CHUNK)
        h, hr, g = hidden[ts], ref_hidden[ts], grad_kl[ts].to(acc)
        for v0 in range(0, vocab, VOCAB_CHUNK):
            sl = slice(v0, v0 + VOCAB_CHUNK)
            zp, dzp_draw = transform.apply_with_derivative(
                _raw_logits(h, weight[sl], None if bias is None else bias[sl], acc)
            )
            zr = transform.apply(_raw_logits(hr, ref_weight[sl], None if ref_bias is None else ref_bias[sl], acc))
            p = probabilities(zp, lse_p[ts].to(acc)[:, None])
            q = probabilities(zr, lse_r[ts].to(acc)[:, None])
            dz = (p - q) * g[:, None] * dzp_draw
            if d_hidden is not None:
                d_hidden[ts] += dz @ weight[sl].to(acc)
            if d_weight is not None:
                d_weight[sl] += dz.T @ h.to(acc)
            if d_bias is not None:
                d_bias[sl] += dz.sum(dim=0)
    return cast_grads(d_hidden, d_weight, d_bias, hidden, weight, bias)
