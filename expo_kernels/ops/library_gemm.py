"""The op on library GEMMs + epilogues, both of its paths (``_dispatch.plan`` chooses them):

* ``Path.LIBRARY_GEMM`` -- :func:`forward_partial` / :func:`backward` (the signatures of the ``Backend``
  contract of ``ops``; the registered op calls them through ``_dispatch.library_gemm_module``);
* ``Path.KEPT_LOGITS`` -- :func:`forward_keeping_logits` / :func:`backward_from_logits`: one GEMM for the
  whole call, its logits kept for the backward (6 NHV instead of 8), with any backend's epilogues.

Built from library GEMMs (``ops.gemm``) and the fold/dz epilogues (``ops.epilogues``): the forward in token
chunks (GEMM, fold), the backward vocabulary-chunk-major (recompute ``Z = h W_c^T`` for all tokens, dz in
place, ``dW_c = dz^T h`` written once, ``dH += dz W_c`` in float32), so no atomics anywhere and two runs are
bit-identical.

The epilogues come from their provider, taken by name (``ops.epilogues.epilogues``): Triton's
(``ops/triton/epilogues.py``), imported when the first call runs them, so importing this module imports
no Triton.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import gemm
from . import state as online_state
from .common import LogitTransform
from .epilogues import epilogues
from .options import workspace_bytes

__all__ = ["forward_partial", "backward", "PROVIDER", "forward_keeping_logits", "backward_from_logits"]

#: The provider of the epilogues this op runs: Triton's, whose fold leaves the workspace's logits raw (the
#: backward's dz reads raw logits, recomputed chunk by chunk).
PROVIDER = "triton"


def forward_partial(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    transform: LogitTransform,
    with_stats: bool,
    vocab_start: int = 0,
) -> online_state.LogprobState:
    """hidden [N, H], weight [V_s, H] (ids ``vocab_start + [0, V_s)``), labels [N] global ids -> the
    range's partial state, through token chunks of the workspace: ``z = h W^T`` (cuBLAS), then the fold."""
    n, vocab = hidden.shape[0], weight.shape[0]
    ld = gemm.logits_dtype(hidden.dtype, hidden.device)
    if n == 0 or vocab == 0:
        return online_state.empty_logprob_state(n, with_stats, torch.float32, hidden.device)
    chunk = max(1, min(n, workspace_bytes(hidden.device) // (vocab * ld.itemsize)))
    workspace = torch.empty(chunk * vocab, dtype=ld, device=hidden.device)
    local = labels - vocab_start  # outside [0, V_s) for labels of other ranges: no hit, as the contract says
    b = None if bias is None else bias.contiguous()
    fold = epilogues(PROVIDER).fold
    parts = []
    for t0 in range(0, n, chunk):
        h = hidden[t0 : t0 + chunk]
        z = workspace[: h.shape[0] * vocab].view(h.shape[0], vocab)
        gemm.logits_into(z, h, weight)
        parts.append(fold(z, b, local[t0 : t0 + chunk], transform, with_stats))
    if len(parts) == 1:
        return parts[0]
    merged = [None if f[0] is None else torch.cat(f) for f in zip(*parts, strict=True)]
    return online_state.LogprobState(*merged)  # type: ignore[arg-type]


def backward(
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
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of ``sum_n grad_logp[n] logp[n]`` w.r.t. this vocabulary range's head, vocabulary-chunk
    by chunk: each ``dW_c`` (and ``db_c``) written once in the head's dtype; ``dH`` summed in float32."""
    n, h_size = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    d_hidden = torch.zeros(n, h_size, dtype=torch.float32, device=dev) if need_hidden else None
    d_weight = torch.zeros(weight.shape, dtype=weight.dtype, device=dev) if need_weight else None
    d_bias = torch.zeros(vocab, dtype=torch.float32, device=dev) if need_bias else None
    if n > 0 and vocab > 0 and (need_hidden or need_weight or need_bias):
        ld = gemm.logits_dtype(hidden.dtype, dev)
        # float32 logits, plus a 16-bit dz buffer when the head is 16-bit (the dW/dH GEMMs' operand)
        per_column = n * (ld.itemsize + (hidden.dtype.itemsize if ld != hidden.dtype else 0))
        cols = max(1, min(vocab, workspace_bytes(dev) // per_column))
        logits = torch.empty(n * cols, dtype=ld, device=dev)
        dz_buf = torch.empty(n * cols, dtype=hidden.dtype, device=dev) if ld != hidden.dtype else None
        to_dz = epilogues(PROVIDER).to_dz
        y, g, lse32 = labels - vocab_start, grad_logp.float().contiguous(), lse.float().contiguous()
        for v0 in range(0, vocab, cols):
            w = weight[v0 : v0 + cols]
            c = w.shape[0]
            b = None if bias is None else bias[v0 : v0 + c].contiguous()
            z = logits[: n * c].view(n, c)
            dz = z if dz_buf is None else dz_buf[: n * c].view(n, c)
            gemm.logits_into(z, hidden, w)
            to_dz(z, b, y - v0, lse32, g, transform, dz)
            if d_hidden is not None:
                if dz.dtype == torch.float32:
                    d_hidden.addmm_(dz, w)
                elif dz_buf is not None:  # the device's mm writes float32 for 16-bit operands
                    d_hidden.add_(torch.mm(dz, w, out_dtype=torch.float32))
                else:
                    d_hidden.add_(dz @ w)
            if d_weight is not None:
                torch.mm(dz.T, hidden, out=d_weight[v0 : v0 + c])
            if d_bias is not None:
                d_bias[v0 : v0 + c] = dz.sum(dim=0, dtype=torch.float32)
    return (
        None if d_hidden is None else d_hidden.to(hidden.dtype),
        d_weight,
        None if d_bias is None or bias is None else d_bias.to(bias.dtype),
    )


# ---------------------------------------------------------------------------------------------
# the op's logits kept for its backward (Path.KEPT_LOGITS: 6 NHV instead of 8 when they fit)
# ---------------------------------------------------------------------------------------------


def forward_keeping_logits(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    t: LogitTransform,
    with_stats: bool,
    backend: str,
) -> tuple[online_state.LogprobState, Tensor]:
    """hidden [n, H], weight [V, H], labels [n] in ``[0, V)`` -> (the rows' state, the logits ``[n, V]``
    as the fold left them: the input of :func:`backward_from_logits`). One GEMM for the whole call."""
    z = torch.empty(
        hidden.shape[0], weight.shape[0], dtype=gemm.logits_dtype(hidden.dtype, hidden.device), device=hidden.device
    )
    gemm.logits_into(z, hidden, weight)
    b = None if bias is None else bias.to(z.dtype).contiguous()
    return epilogues(backend).fold(z, b, labels, t, with_stats), z


def backward_from_logits(
    z: Tensor,
    grad_logp: Tensor,
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    lse: Tensor,
    t: LogitTransform,
    need: tuple[bool, bool, bool],
    backend: str,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The gradients of ``sum_n grad_logp[n] logp[n]`` from the kept logits ``z`` (overwritten by dz):
    ``dH = dz W``, ``dW = dz^T h``, ``db = sum dz`` -- no logit recomputed."""
    b = None if bias is None else bias.to(z.dtype).contiguous()
    dz = z if z.dtype == hidden.dtype else torch.empty(z.shape, dtype=hidden.dtype, device=z.device)
    epilogues(backend).to_dz(z, b, labels, lse.to(z.dtype), grad_logp.to(z.dtype), t, dz)
    need_h, need_w, need_b = need
    d_hidden = dz @ weight if need_h else None
    d_weight = dz.T @ hidden if need_w else None
    d_bias = dz.sum(dim=0, dtype=z.dtype).to(bias.dtype) if need_b and bias is not None else None
    return d_hidden, d_weight, d_bias
