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
``CHUNK_TOKENS`` tokens, capped by ``workspace_bytes``; see the defaults below) and the gradients;
never ``[N, V]``.

A pair longer than the workspace cannot be folded whole: the step then runs two passes over token
chunks of the workspace's size (forward: the per-token results; the loss's ``g`` for every token;
backward: the logits recomputed, dz, dH, dW) -- 10NHV, still no atomics and deterministic.

GEMMs: ``torch.mm`` (MKL/oneDNN on the CPU, cuBLAS on CUDA; 16-bit heads write float32 logits through
``out_dtype``, and dz goes back to the head's dtype for the dH/dW GEMMs). Epilogues (fold, dz): C++ on
the CPU (``csrc/expo_native.cpp``), Triton on CUDA (``ops/triton_engine.py``), torch ops as the
specification (``torch_fold``, ``torch_to_dz``). Calls the engine does not serve take the op's path
(:func:`expo_kernels.linear_logprobs`): batch-coupled losses, EXPO's token KL, 16-bit heads on the
CPU, no gradient, or ``kernel_options(engine=False)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from . import _dispatch as D
from .ops import gemm as G
from .ops import state as S
from .ops.common import LogitTransform, TokenOutputs
from .ops.epilogues import (  # noqa: F401  (re-exported: the engine's epilogue providers)
    Epilogues,
    epilogues,
    native_fold,
    native_to_dz,
    torch_fold,
    torch_to_dz,
    transform_in_place,
)
from .ops.options import DEFAULT_WORKSPACE_BYTES, workspace_bytes

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

#: A chunk grows pair by pair until it holds this many tokens (or the cap). CPU: GEMMs with >= 512 rows
#: run near peak and a small chunk keeps the workspace small (684 tokens x 32000 = 88 MB). CUDA: cuBLAS
#: wants >= 1024 rows to fill 132 SMs with 128-row tiles.
CHUNK_TOKENS = {"cpu": 512, "cuda": 1024}

# A per-token log-prob placeholder for tokens outside the chunk (a valid log-probability: its value
# does not reach the chunk's gradients for a separable loss, but must keep every term finite).
_PLACEHOLDER = -1.0


def chunk_tokens(device: torch.device) -> int:
    return CHUNK_TOKENS.get(device.type, CHUNK_TOKENS["cuda"])


@dataclass
class _Workspace:
    """The logits ``[n, V]`` of one chunk and, for 16-bit heads, a dz buffer in the head's dtype."""

    logits: Tensor
    dz: Tensor | None

    @staticmethod
    def bytes_per_token(
        vocab: int, dtype: torch.dtype, device: torch.device, backward: bool, stacked: bool = False
    ) -> int:
        """Bytes per counted token: its logits (twice when the reference's rows share the GEMM) and, for a
        16-bit head with a backward pass, its dz."""
        ld = G.logits_dtype(dtype, device)
        return vocab * ((2 if stacked else 1) * ld.itemsize + (dtype.itemsize if backward and ld != dtype else 0))

    @staticmethod
    def make(
        tokens: int, vocab: int, dtype: torch.dtype, device: torch.device, backward: bool, stacked: bool = False
    ) -> _Workspace:
        ld = G.logits_dtype(dtype, device)
        dz = torch.empty(tokens * vocab, dtype=dtype, device=device) if backward and ld != dtype else None
        return _Workspace(torch.empty((2 if stacked else 1) * tokens * vocab, dtype=ld, device=device), dz)

    def views(self, n: int, vocab: int, ref_rows: int = 0) -> tuple[Tensor, Tensor]:
        """The logits ``[ref_rows + n, V]`` (reference rows first) and the policy rows' dz ``[n, V]``."""
        z = self.logits[: (ref_rows + n) * vocab].view(ref_rows + n, vocab)
        return z, z[ref_rows:] if self.dz is None else self.dz[: n * vocab].view(n, vocab)


# ---------------------------------------------------------------------------------------------
# the step
# ---------------------------------------------------------------------------------------------


def pair_chunks(pair_tokens: Tensor, budget_tokens: int, target_tokens: int = CHUNK_TOKENS["cpu"]):
    """Consecutive ranges of pairs ``[p0, p1)``: each grows until it holds ``target_tokens`` counted
    tokens, never past ``budget_tokens``; None when a single pair does not fit the budget (then the step
    recomputes the logits in token chunks)."""
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


@dataclass
class PairPlan:
    """How a paired batch ``labels [R, T]`` is cut: the counted tokens (flat positions, int64 labels),
    each one's pair, the pairs' token counts, and the chunks of whole pairs (None when a pair is longer
    than the workspace: the step then recomputes the logits in token chunks)."""

    token_ids: Tensor
    labels: Tensor
    pair_of_token: Tensor
    pair_tokens: Tensor
    chunks: list | None
    budget_tokens: int
    stacked: bool = False


def plan_pairs(
    labels: Tensor, ignore_index: int, vocab: int, dtype: torch.dtype, stacked: bool = False
) -> PairPlan | None:
    """The :class:`PairPlan` of ``labels [R, T]`` for a ``dtype`` head, or None without a pair (the op's
    path gives its clear error). Checks the label range. ``stacked``: the reference's rows share each
    chunk's GEMM (a shared head), so a token takes twice the logits."""
    rows, steps = labels.shape
    b = rows // 2
    if b == 0:
        return None
    counted, y_all, _ = D.counted_rows(labels.reshape(-1), ignore_index, vocab)
    token_ids = counted if counted is not None else torch.arange(rows * steps, device=labels.device)
    pair_of_token = torch.div(token_ids, steps, rounding_mode="floor") % b
    pair_tokens = torch.bincount(pair_of_token, minlength=b)
    per_token = _Workspace.bytes_per_token(vocab, dtype, labels.device, backward=True, stacked=stacked)
    budget = max(1, workspace_bytes(labels.device) // per_token)
    chunks = pair_chunks(pair_tokens, budget, chunk_tokens(labels.device))
    return PairPlan(token_ids, y_all, pair_of_token, pair_tokens, chunks, budget, stacked)


@dataclass
class PairStep:
    """What a step returns: per-token results over the whole ``[R, T]`` batch (detached) and the
    gradients of the loss (None where not asked for)."""

    logp: Tensor
    outputs: TokenOutputs  # [R, T] each (statistics when asked for)
    ref_logp: Tensor | None  # [R, T], when the reference's rows shared the chunks' GEMMs
    d_hidden: Tensor | None
    d_weight: Tensor | None
    d_bias: Tensor | None


LossOfTokens = Callable[[Tensor, Tensor | None, Tensor | None], Tensor]


class _Head:
    """One head's chunk operations over the workspace: logits + fold, and dz + the gradient GEMMs."""

    def __init__(self, hidden, weight, bias, transform, with_stats, backend, need, workspace_tokens, ref_hidden=None):
        rows, steps, h_size = hidden.shape
        self.flat_h = hidden.detach().reshape(-1, h_size)
        # a reference through this same head: its rows go first in each chunk's GEMM
        self.ref_h = None if ref_hidden is None else ref_hidden.detach().reshape(-1, h_size)
        self.w = weight.detach()
        self.vocab = weight.shape[0]
        self.acc = D.result_dtype(hidden.dtype)
        self.bias = None if bias is None else bias.detach().to(self.acc)
        self.transform, self.with_stats = transform, with_stats
        self.epi = epilogues(backend)
        self.transform_args = dataclasses.asdict(transform)  # named in the overflow message
        need_h, need_w, need_b = need
        dev = hidden.device
        # d_hidden in the input dtype (written once per token), d_weight in the head's dtype: a 16-bit head
        # accumulates its chunks in place through cuBLAS (float32 inside each GEMM, one rounding a chunk)
        self.d_hidden = torch.zeros(rows * steps, h_size, dtype=hidden.dtype, device=dev) if need_h else None
        self.d_weight = torch.zeros(weight.shape, dtype=weight.dtype, device=dev) if need_w else None
        self.d_bias = torch.zeros(self.vocab, dtype=self.acc, device=dev) if need_b else None
        self.ws = _Workspace.make(
            workspace_tokens, self.vocab, hidden.dtype, dev, backward=any(need), stacked=ref_hidden is not None
        )

    def forward(self, idx: Tensor, y: Tensor) -> tuple[TokenOutputs, Tensor, Tensor, Tensor, Tensor | None]:
        """Logits of the tokens ``idx`` into the workspace and their per-token results: ``(outputs, h, z,
        dz, reference log-probs | None)``; ``z``/``dz`` are the policy rows' logits and dz buffer."""
        h = self.flat_h.index_select(0, idx)
        n = idx.numel()
        ref_rows = 0 if self.ref_h is None else n
        z_all, dz = self.ws.views(n, self.vocab, ref_rows)
        # one GEMM for both models' rows: the head is read once and the GEMM is twice as tall
        G.logits_into(z_all, h if self.ref_h is None else torch.cat([self.ref_h.index_select(0, idx), h]), self.w)
        ref_logp = None
        if self.ref_h is not None:
            ref = S.finalize_logprobs(self.epi.fold(z_all[:n], self.bias, y, self.transform, False), self.vocab)
            D.check_finite({}, {}, (ref.lse,), self.transform_args)
            ref_logp = ref.logp
        z = z_all[ref_rows:]
        out = S.finalize_logprobs(self.epi.fold(z, self.bias, y, self.transform, self.with_stats), self.vocab)
        results = (out.lse,) + ((out.entropy, out.mean_logit, out.log_sum_p2) if self.with_stats else ())
        D.check_finite({}, {}, results, self.transform_args)
        return out, h, z, dz, ref_logp

    def backward(self, idx: Tensor, y: Tensor, h: Tensor, z: Tensor, dz: Tensor, lse: Tensor, g: Tensor) -> None:
        """dz from the logits the fold left, then ``dH[idx] = dz W``, ``dW += dz^T h``, ``db += sum dz``."""
        self.epi.to_dz(z, self.bias, y, lse, g, self.transform, dz)
        if self.d_hidden is not None:
            self.d_hidden.index_copy_(0, idx, dz @ self.w.to(dz.dtype))
        if self.d_weight is not None:
            self.d_weight.addmm_(dz.T, h.to(dz.dtype))
        if self.d_bias is not None:
            self.d_bias.add_(dz.sum(dim=0, dtype=self.acc))


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
    plan: PairPlan | None = None,
    ref_hidden: Tensor | None = None,
) -> PairStep | None:
    """One paired step's policy pass and its gradients, chunk by chunk (see the module docstring).

    ``hidden [R, T, H]``, ``labels [R, T]`` (B chosen rows, then B rejected), ``weight [V, H]``.
    ``loss_of_tokens(logp [R, T], log_sum_p2 [R, T] | None, ref_logp [R, T] | None)`` is the batch loss
    of per-token log-probs; it must be separable over pairs. ``need``: gradients of (hidden, weight,
    bias). ``backend``: the epilogues' provider (:func:`epilogues`). ``plan``: :func:`plan_pairs` of
    these labels, when the caller has it. ``ref_hidden [R, T, H]``: the reference's hidden states through
    this same head (detached): each chunk's reference rows join its policy rows in one GEMM and the loss
    gets their log-probs as ``ref_logp`` (the plan must be ``stacked`` and fit). Returns None only
    without a pair.
    """
    rows, steps, _ = hidden.shape
    stacked = ref_hidden is not None
    if plan is None:
        plan = plan_pairs(labels, ignore_index, weight.shape[0], hidden.dtype, stacked=stacked)
    if plan is None:
        return None
    if plan.stacked != stacked or (stacked and plan.chunks is None):
        raise ValueError("a reference through the shared head needs a stacked plan whose pairs fit the workspace")
    if plan.chunks is not None:
        sizes = [int(plan.pair_tokens[p0:p1].sum()) for p0, p1 in plan.chunks]
    else:  # a pair longer than the workspace: token chunks, logits recomputed in the backward pass
        # (the chunk need not hold whole pairs here: the GEMM-friendly size, not the whole budget)
        sizes = [max(1, min(plan.budget_tokens, chunk_tokens(hidden.device), plan.token_ids.numel()))]
    head = _Head(hidden, weight, bias, transform, with_stats, backend, need, max(sizes, default=0), ref_hidden)
    acc = head.acc
    fields = ("logp", "lse") + (("entropy", "mean_logit", "is_top1", "log_sum_p2") if with_stats else ())
    per_token = {
        f: torch.zeros(rows * steps, dtype=torch.bool if f == "is_top1" else acc, device=hidden.device) for f in fields
    }
    ref_logp = torch.zeros(rows * steps, dtype=acc, device=hidden.device) if stacked else None
    # inputs once per step (one read of the weight); each chunk's results in _Head.forward
    D.check_finite(
        {"hidden": head.flat_h.index_select(0, plan.token_ids), "weight": head.w}
        | ({} if head.ref_h is None else {"ref_hidden": head.ref_h.index_select(0, plan.token_ids)}),
        {"bias": bias},
        (),
        head.transform_args,
    )
    if plan.chunks is not None:
        for p0, p1 in plan.chunks:
            sel = ((plan.pair_of_token >= p0) & (plan.pair_of_token < p1)).nonzero().squeeze(1)
            idx = plan.token_ids.index_select(0, sel)  # flat [R * T] positions of the chunk's counted tokens
            y = plan.labels.index_select(0, sel)
            out, h, z, dz, ref_chunk = head.forward(idx, y)
            for f in fields:
                per_token[f].index_copy_(0, idx, getattr(out, f))
            if ref_logp is not None:
                ref_logp.index_copy_(0, idx, ref_chunk)
            if any(need):
                g = _token_grads(loss_of_tokens, out, idx, rows, steps, acc, hidden.device, ref_chunk)
                head.backward(idx, y, h, z, dz, out.lse, g)
    else:
        chunk = sizes[0]
        for t0 in range(0, plan.token_ids.numel(), chunk):
            idx, y = plan.token_ids[t0 : t0 + chunk], plan.labels[t0 : t0 + chunk]
            out = head.forward(idx, y)[0]
            for f in fields:
                per_token[f].index_copy_(0, idx, getattr(out, f))
        if any(need):
            all_out = TokenOutputs(**{f: per_token[f].index_select(0, plan.token_ids) for f in fields})
            g_all = _token_grads(loss_of_tokens, all_out, plan.token_ids, rows, steps, acc, hidden.device)
            lse_all = all_out.lse
            for t0 in range(0, plan.token_ids.numel(), chunk):
                idx, y = plan.token_ids[t0 : t0 + chunk], plan.labels[t0 : t0 + chunk]
                h = head.flat_h.index_select(0, idx)
                z, dz = head.ws.views(idx.numel(), head.vocab)
                G.logits_into(z, h, head.w)
                if head.epi.fold_transforms:
                    transform_in_place(z, head.bias, transform)
                head.backward(idx, y, h, z, dz, lse_all[t0 : t0 + chunk], g_all[t0 : t0 + chunk])
    shaped = {f: t.view(rows, steps) for f, t in per_token.items()}
    return PairStep(
        logp=shaped["logp"],
        outputs=TokenOutputs(**shaped),
        ref_logp=None if ref_logp is None else ref_logp.view(rows, steps),
        d_hidden=None if head.d_hidden is None else head.d_hidden.view(hidden.shape),
        d_weight=head.d_weight,
        d_bias=None if head.d_bias is None or bias is None else head.d_bias.to(bias.dtype),
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
    into a workspace of at most ``chunk_tokens`` tokens (the reference pass of a step)."""
    rows, steps, h_size = hidden.shape
    vocab = weight.shape[0]
    counted, y_all, _ = D.counted_rows(labels.reshape(-1), ignore_index, vocab)
    token_ids = counted if counted is not None else torch.arange(rows * steps, device=hidden.device)
    per_token = _Workspace.bytes_per_token(vocab, hidden.dtype, hidden.device, backward=False)
    chunk = max(1, min(chunk_tokens(hidden.device), workspace_bytes(hidden.device) // per_token))
    head = _Head(hidden, weight, bias, transform, False, backend, (False, False, False), min(chunk, token_ids.numel()))
    D.check_finite(
        {"ref_hidden": head.flat_h.index_select(0, token_ids), "ref_weight": head.w},
        {"ref_bias": bias},
        (),
        head.transform_args,
    )
    logp = torch.zeros(rows * steps, dtype=head.acc, device=hidden.device)
    for t0 in range(0, token_ids.numel(), chunk):
        idx = token_ids[t0 : t0 + chunk]
        out = head.forward(idx, y_all[t0 : t0 + chunk])[0]
        logp.index_copy_(0, idx, out.logp)
    return logp.view(rows, steps)


def _token_grads(
    loss_of_tokens: LossOfTokens,
    out: TokenOutputs,
    idx: Tensor,
    rows: int,
    steps: int,
    acc,
    device,
    ref_chunk: Tensor | None = None,
):
    """``dL/dlogp`` of the chunk's tokens: the loss on [R, T] log-probs that are real on the chunk only."""

    def on_chunk(values: Tensor | None) -> Tensor | None:
        if values is None:
            return None
        full = torch.full((rows * steps,), _PLACEHOLDER, dtype=acc, device=device)
        return full.index_copy(0, idx, values.to(acc)).view(rows, steps)

    logp = on_chunk(out.logp).requires_grad_()  # type: ignore[union-attr]
    with torch.enable_grad():
        loss = loss_of_tokens(logp, on_chunk(out.log_sum_p2), on_chunk(ref_chunk))
        (grad,) = torch.autograd.grad(loss, logp)
    return grad.reshape(-1).index_select(0, idx).contiguous()


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
