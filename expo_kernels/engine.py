"""The chunked engine: library GEMMs into a bounded logit workspace, one fold, and the gradient formed
while the logits are still in memory (docs/design.md, "Engine").

For a pair-separable loss (every registered paired loss that is not batch-coupled: the DPO family,
SimPO, CPO, ORPO, RPO's NLL term, EXPO's sequence/pair KL, ...), a DPO step needs per-token gradients
``g = dL/dlogp`` that depend only on each pair's own numbers and on batch constants (the batch size,
the token counts). So, per chunk of whole pairs whose counted tokens fit the workspace:

    Z   = h_chunk @ W^T (+ b)       one GEMM into the workspace [n, V]
    fold                            transform in place; per token: lse, logp, statistics (ops.state)
    g   = dL/dlogp for the chunk     autograd through the loss on [R, T] log-probs in which only the
                                     chunk's tokens are real (the others a placeholder: with a separable
                                     loss, the chunk's gradients do not depend on them)
    Z  <- g (onehot - p) dz/draw     in place
    dH[chunk] = Z @ W,  dW += Z^T @ h_chunk,  db += sum Z

and the returned loss carries these gradients (its backward scales them by the incoming gradient).
Policy forward 2NHV + dH 2NHV + dW 2NHV, plus the forward-only reference pass 2NHV: 8NHV, where
recomputing the logits in backward costs 10NHV. Memory: the workspace (one chunk: whole pairs up to
``CHUNK_TOKENS`` tokens, capped by ``workspace_bytes``, default 512 MiB) and the gradients; never
``[N, V]``.

The epilogues (fold, in-place dz) run in C++ on the CPU (``csrc/expo_native.cpp``) and as torch ops
elsewhere (the specification, ``torch_epilogue``). Calls the engine does not serve take the op's
recompute path (:func:`expo_kernels.linear_logprobs`): batch-coupled losses, EXPO's token KL, 16-bit
heads, non-CPU devices for now, the Triton backend, a pair longer than the workspace, or
``kernel_options(engine=False)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from . import _dispatch as D
from .ops import state as S
from .ops.common import LogitTransform, TokenOutputs
from .ops.options import get_kernel_options

__all__ = [
    "DEFAULT_WORKSPACE_BYTES",
    "CHUNK_TOKENS",
    "PairStep",
    "pair_chunks",
    "plan_pairs",
    "run_pair_step",
    "forward_logps",
    "attach_gradients",
]

#: Default cap on the logit workspace: 512 MiB = 4096 tokens x 32000 vocabulary (1046 x 128256) in
#: float32. The workspace actually allocated is one chunk: whole pairs until CHUNK_TOKENS tokens.
DEFAULT_WORKSPACE_BYTES = 512 << 20
#: A chunk grows pair by pair until it holds this many tokens (or the cap): GEMMs with >= 512 rows run
#: near the CPU's peak, and a smaller chunk keeps the workspace small (684 tokens x 32000 = 88 MB).
CHUNK_TOKENS = 512

# A per-token log-prob placeholder for tokens outside the chunk (a valid log-probability: its value
# does not reach the chunk's gradients for a separable loss, but must keep every term finite).
_PLACEHOLDER = -1.0


def workspace_bytes() -> int:
    return int(get_kernel_options().workspace_bytes or DEFAULT_WORKSPACE_BYTES)


# ---------------------------------------------------------------------------------------------
# epilogues on a workspace tile z [n, V] of raw logits (float32 / float64, contiguous)
# ---------------------------------------------------------------------------------------------


def torch_fold(z: Tensor, bias: Tensor | None, labels: Tensor, t: LogitTransform, with_stats: bool) -> S.LogprobState:
    """Bias and transform in place, then the tile's partial state (the specification of the C++ fold)."""
    from .ops.torch_backend import tile_state

    if bias is not None:
        z.add_(bias.to(z.dtype))
    z.copy_(t.apply(z))
    return tile_state(z, labels, torch.arange(z.shape[1], device=z.device), with_stats)


def torch_to_dz(z: Tensor, labels: Tensor, lse: Tensor, g: Tensor, t: LogitTransform) -> None:
    """Transformed logits -> ``g (onehot - p) dz/draw`` in place (the specification of the C++ op)."""
    deriv: Tensor | float = t.logit_scale * t.inv_temperature
    if t.softcap is not None:
        # z = c tanh(u) / T, so tanh(u) = z T / c and dz/draw = s / T (1 - tanh(u)^2)
        tanh = z * (t.temperature / t.softcap)
        deriv = deriv * (1.0 - tanh * tanh)
    p = torch.exp(torch.clamp_max(z - lse[:, None], 0.0))
    onehot = torch.zeros_like(z).scatter_(1, labels[:, None], 1.0)
    z.copy_(g[:, None] * (onehot - p) * deriv)


def native_fold(z: Tensor, bias: Tensor | None, labels: Tensor, t: LogitTransform, with_stats: bool) -> S.LogprobState:
    fields = torch.ops.expo_native.fold_logits_(
        z, bias, labels, 0, float(t.logit_scale), t.softcap, float(t.inv_temperature), bool(with_stats)
    )
    return S.LogprobState(*fields)


def native_to_dz(z: Tensor, labels: Tensor, lse: Tensor, g: Tensor, t: LogitTransform) -> None:
    torch.ops.expo_native.logits_to_dz_(z, labels, 0, lse, g, float(t.logit_scale), t.softcap, float(t.inv_temperature))


# ---------------------------------------------------------------------------------------------
# the step
# ---------------------------------------------------------------------------------------------


def pair_chunks(pair_tokens: Tensor, budget_tokens: int, target_tokens: int = CHUNK_TOKENS):
    """Consecutive ranges of pairs ``[p0, p1)``: each grows until it holds ``target_tokens`` counted
    tokens, never past ``budget_tokens``; None when a single pair does not fit the budget (then the step
    takes the recompute path)."""
    counts = pair_tokens.tolist()
    if counts and max(counts) > budget_tokens:
        return None
    chunks, start, used = [], 0, 0
    for i, c in enumerate(counts):
        if i > start and (used >= target_tokens or used + c > budget_tokens):
            chunks.append((start, i))
            start, used = i, 0
        used += c
    if start < len(counts):
        chunks.append((start, len(counts)))
    return chunks


def plan_pairs(labels: Tensor, ignore_index: int, vocab: int, acc: torch.dtype):
    """How a paired batch ``labels [R, T]`` splits into chunks: ``(token_ids, labels64, pair_of_token,
    pair_tokens, chunks)`` over the counted tokens, or None when the engine cannot take it (no pair, or a
    pair beyond the workspace cap). Checks the label range."""
    rows, steps = labels.shape
    b = rows // 2
    if b == 0:
        return None  # an empty batch: the op's path gives its clear error
    counted, y_all, _ = D.counted_rows(labels.reshape(-1), ignore_index, vocab)
    token_ids = counted if counted is not None else torch.arange(rows * steps, device=labels.device)
    pair_of_token = torch.div(token_ids, steps, rounding_mode="floor") % b
    pair_tokens = torch.bincount(pair_of_token, minlength=b)
    chunks = pair_chunks(pair_tokens, workspace_bytes() // (vocab * acc.itemsize))
    if chunks is None:
        return None
    return token_ids, y_all, pair_of_token, pair_tokens, chunks


@dataclass
class PairStep:
    """What a step returns: per-token results over the whole ``[R, T]`` batch (detached) and the
    gradients of the loss (None where not asked for)."""

    logp: Tensor
    outputs: TokenOutputs  # [R, T] each (statistics when asked for)
    d_hidden: Tensor | None
    d_weight: Tensor | None
    d_bias: Tensor | None


LossOfTokens = Callable[[Tensor, Tensor | None], Tensor]


def run_pair_step(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    *,
    ignore_index: int,
    transform: LogitTransform,
    with_stats: bool,
    loss_of_tokens: LossOfTokens,
    backend: str,
    need: tuple[bool, bool, bool],
    plan: tuple | None = None,
) -> PairStep | None:
    """One paired step's policy pass and its gradients, chunk by chunk (see the module docstring).

    ``hidden [R, T, H]``, ``labels [R, T]`` (B chosen rows, then B rejected), ``weight [V, H]``.
    ``loss_of_tokens(logp [R, T], log_sum_p2 [R, T] | None)`` is the batch loss of per-token log-probs;
    it must be separable over pairs. ``need``: gradients of (hidden, weight, bias). Returns None when
    a pair does not fit the workspace. ``plan``: :func:`plan_pairs` of these labels, when the caller has it.
    """
    rows, steps, h_size = hidden.shape
    vocab = weight.shape[0]
    acc = D.result_dtype(hidden.dtype)
    plan = plan if plan is not None else plan_pairs(labels, ignore_index, vocab, acc)
    if plan is None:
        return None
    token_ids, y_all, pair_of_token, pair_tokens, chunks = plan
    flat_h = hidden.reshape(-1, h_size)
    native = backend == "native"
    fold, to_dz = (native_fold, native_to_dz) if native else (torch_fold, torch_to_dz)
    w = weight.detach()
    bias_d = None if bias is None else bias.detach().to(acc)
    need_h, need_w, need_b = need
    d_hidden = torch.zeros(rows * steps, h_size, dtype=acc, device=hidden.device) if need_h else None
    d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    d_bias = torch.zeros(vocab, dtype=acc, device=weight.device) if need_b else None
    n_max = max((int(pair_tokens[p0:p1].sum()) for p0, p1 in chunks), default=0)
    workspace = torch.empty(n_max * vocab, dtype=acc, device=hidden.device)
    fields = ("logp", "lse") + (("entropy", "mean_logit", "is_top1", "log_sum_p2") if with_stats else ())
    per_token = {
        f: torch.zeros(rows * steps, dtype=torch.bool if f == "is_top1" else acc, device=hidden.device) for f in fields
    }
    transform_args = dataclasses.asdict(transform)  # named in the overflow message
    # inputs once per step (one read of the weight); each chunk's results below
    D.check_finite({"hidden": flat_h.index_select(0, token_ids), "weight": w}, {"bias": bias}, (), transform_args)
    for p0, p1 in chunks:
        sel = ((pair_of_token >= p0) & (pair_of_token < p1)).nonzero().squeeze(1)
        idx = token_ids.index_select(0, sel)  # flat [R * T] positions of the chunk's counted tokens
        y = y_all.index_select(0, sel)
        h = flat_h.index_select(0, idx).detach().to(acc)
        z = workspace[: idx.numel() * vocab].view(idx.numel(), vocab)
        torch.mm(h, w.T, out=z)
        out = S.finalize_logprobs(fold(z, bias_d, y, transform, with_stats), vocab)
        results = (out.lse,) + ((out.entropy, out.mean_logit, out.log_sum_p2) if with_stats else ())
        D.check_finite({}, {}, results, transform_args)
        for f in fields:
            per_token[f].index_copy_(0, idx, getattr(out, f))
        if not any(need):
            continue
        g = _token_grads(loss_of_tokens, out, idx, rows, steps, acc, hidden.device)
        to_dz(z, y, out.lse, g, transform)
        if need_h:
            d_hidden.index_copy_(0, idx, z @ w.to(acc))
        if need_w:
            d_weight.addmm_(z.T, h)
        if need_b:
            d_bias.add_(z.sum(dim=0))
    shaped = {f: t.view(rows, steps) for f, t in per_token.items()}
    return PairStep(
        logp=shaped["logp"],
        outputs=TokenOutputs(**shaped),
        d_hidden=None if d_hidden is None else d_hidden.view(hidden.shape).to(hidden.dtype),
        d_weight=None if d_weight is None else d_weight.to(weight.dtype),
        d_bias=None if d_bias is None else d_bias.to(bias.dtype),
    )


def forward_logps(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    *,
    ignore_index: int,
    transform: LogitTransform,
    backend: str,
) -> Tensor:
    """Per-token log-probs ``[R, T]`` (0 at ignored tokens) without gradient, through the same large GEMMs
    into a workspace of at most ``CHUNK_TOKENS`` tokens (the reference pass of a step)."""
    rows, steps, h_size = hidden.shape
    vocab = weight.shape[0]
    acc = D.result_dtype(hidden.dtype)
    flat_h = hidden.detach().reshape(-1, h_size)
    counted, y_all, _ = D.counted_rows(labels.reshape(-1), ignore_index, vocab)
    token_ids = counted if counted is not None else torch.arange(rows * steps, device=hidden.device)
    w = weight.detach()
    bias_d = None if bias is None else bias.detach().to(acc)
    transform_args = dataclasses.asdict(transform)  # named in the overflow message
    D.check_finite(
        {"ref_hidden": flat_h.index_select(0, token_ids), "ref_weight": w}, {"ref_bias": bias}, (), transform_args
    )
    fold = native_fold if backend == "native" else torch_fold
    chunk = max(1, min(CHUNK_TOKENS, workspace_bytes() // (vocab * acc.itemsize)))
    workspace = torch.empty(min(chunk, token_ids.numel()) * vocab, dtype=acc, device=hidden.device)
    logp = torch.zeros(rows * steps, dtype=acc, device=hidden.device)
    for t0 in range(0, token_ids.numel(), chunk):
        idx = token_ids[t0 : t0 + chunk]
        z = workspace[: idx.numel() * vocab].view(idx.numel(), vocab)
        torch.mm(flat_h.index_select(0, idx).to(acc), w.T, out=z)
        out = S.finalize_logprobs(fold(z, bias_d, y_all[t0 : t0 + chunk], transform, False), vocab)
        D.check_finite({}, {}, (out.lse,), transform_args)
        logp.index_copy_(0, idx, out.logp)
    return logp.view(rows, steps)


def _token_grads(loss_of_tokens: LossOfTokens, out: TokenOutputs, idx: Tensor, rows: int, steps: int, acc, device):
    """``dL/dlogp`` of the chunk's tokens: the loss on [R, T] log-probs that are real on the chunk only."""
    logp = torch.full((rows * steps,), _PLACEHOLDER, dtype=acc, device=device)
    logp = logp.index_copy(0, idx, out.logp).requires_grad_()
    lsp2 = None
    if out.log_sum_p2 is not None:
        lsp2 = torch.full((rows * steps,), _PLACEHOLDER, dtype=acc, device=device).index_copy(0, idx, out.log_sum_p2)
        lsp2 = lsp2.view(rows, steps)
    with torch.enable_grad():
        loss = loss_of_tokens(logp.view(rows, steps), lsp2)
        (grad,) = torch.autograd.grad(loss, logp)
    return grad.index_select(0, idx).contiguous()


class _LossWithGradients(torch.autograd.Function):
    """A loss value whose gradients w.r.t. (hidden, weight, bias) were computed in the forward pass."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, bias, d_hidden, d_weight, d_bias):
        ctx.grads = (d_hidden, d_weight, d_bias)
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.grads is None:
            raise RuntimeError(
                "the fused loss's gradients were computed in its forward pass and are handed out once: a second "
                "backward through it (retain_graph=True) is not supported"
            )
        grads, ctx.grads = ctx.grads, None
        # scaled in place: the buffers are this step's own, and a [V, H] copy would double d_weight's memory
        scaled = [None if d is None else d.mul_(grad_out.to(d.dtype)) for d in grads]
        return (None, *scaled, None, None, None)


def attach_gradients(loss: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None, step: PairStep) -> Tensor:
    """``loss`` (detached) as a differentiable function of ``hidden``, ``weight``, ``bias`` with the step's
    gradients."""
    return _LossWithGradients.apply(loss, hidden, weight, bias, step.d_hidden, step.d_weight, step.d_bias)
