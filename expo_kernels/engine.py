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
never ``[N, V]``. ``dW`` accumulates in float32 for a 16-bit head (a [V, H] buffer of 2x the weight,
as in every peer) and is rounded to the head's dtype once, at the end of the step.

A pair longer than the workspace cannot be folded whole. Where the loss's per-token gradient is one
number per sequence (sums or means: every engine loss but ``ld_alpha``) and the per-sequence d_weight
partials fit half the workspace (:func:`_dispatch.long_pair_partials`), it still runs in one pass, 8NHV
(:func:`_long_pairs_one_pass`): token chunks, dz with ``g = 1``, unscaled dH rows and per-row
``dW_s += dz_s^T h_s``, then, once the pair's ``g_s`` are known, ``dH *= g``, ``dW += sum_s g_s dW_s``.
Otherwise two passes over token chunks (forward: the per-token results; the loss's ``g`` for every
token; backward: the logits recomputed, dz, dH, dW) -- 10NHV. Both without atomics, deterministic.

GEMMs: ``torch.mm`` (MKL/oneDNN on the CPU, cuBLAS on CUDA; 16-bit heads write float32 logits through
``out_dtype``, and dz goes back to the head's dtype for the dH/dW GEMMs). Epilogues (fold, dz): C++ on
the CPU (``csrc/expo_native.cpp``), Triton on CUDA (``ops/triton_engine.py``), torch ops as the
specification (``torch_fold``, ``torch_to_dz``). Calls the engine does not serve take the op's path
(:func:`expo_kernels.linear_logprobs`): batch-coupled losses, EXPO's token KL, 16-bit heads on the
CPU, no gradient, or ``kernel_options(engine=False)``.

Host syncs of a step (each a device round trip on CUDA; none decides anything that shapes could):

* planning: **1** -- the counted tokens per row and the number of out-of-range labels, read together
  (:func:`_counted`). They size the chunks and say whether the pairs fit the workspace, stacked with a
  shared head's reference rows or not: that choice is arithmetic on these host counts, and the second
  plan (the unstacked one, when the stacked one does not fit: ``plan_pairs(counts_of=...)``) and the
  reference pass (``forward_logps(plan=...)``) are handed them.
  The token positions come from a stable sort, the chunks' token ranges from host offsets.
* the inputs' finiteness: **1** per pass (hidden, weight, bias; the reference pass has its own).
* the results' finiteness: **1** per chunk (lse and statistics; with a shared head, both models'
  rows in the same check), so that an overflowing transform or a fully masked vocabulary is named
  before its NaNs reach the loss.
* outside the engine: whatever the loss callback syncs per chunk (``losses.api`` checks that the loss
  is finite).

torch.compile: a step is host-driven (the chunks come from host counts, each chunk checks its
results), so it is not traced. The modules call it through :func:`eager_region`
(``torch.compiler.disable``): in the default mode the compiled graph breaks once around the step,
which runs eagerly as here (the loss it returns carries the step's gradients into the compiled
backward). Under ``fullgraph=True`` (:func:`tracing_fullgraph`) no break is possible, and the modules
take the op's path instead (``linear_logprobs``: a registered custom op, traced by shape).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import _dispatch as dispatch
from .ops import gemm
from .ops import state as online_state
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
    "eager_region",
    "tracing_fullgraph",
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
        16-bit head with a backward pass, its dz (the planner's formula, :func:`_dispatch.logits_bytes_per_token`)."""
        return dispatch.logits_bytes_per_token(vocab, dtype, device, backward=backward, stacked=stacked)

    @staticmethod
    def make(
        tokens: int, vocab: int, dtype: torch.dtype, device: torch.device, backward: bool, stacked: bool
    ) -> _Workspace:
        ld = gemm.logits_dtype(dtype, device)
        dz = torch.empty(tokens * vocab, dtype=dtype, device=device) if backward and ld != dtype else None
        return _Workspace(torch.empty((2 if stacked else 1) * tokens * vocab, dtype=ld, device=device), dz)

    def views(self, n: int, vocab: int, ref_rows: int = 0) -> tuple[Tensor, Tensor]:
        """The logits ``[ref_rows + n, V]`` (reference rows first) and the policy rows' dz ``[n, V]``."""
        z = self.logits[: (ref_rows + n) * vocab].view(ref_rows + n, vocab)
        return z, z[ref_rows:] if self.dz is None else self.dz[: n * vocab].view(n, vocab)


# ---------------------------------------------------------------------------------------------
# torch.compile: the step runs as one eager region
# ---------------------------------------------------------------------------------------------

_EAGER_REASON = (
    "expo_kernels' pair engine (FusedLinearPreferenceLoss) is host-driven: its chunk plan reads the label "
    "counts on the host, so the step runs eagerly, as one region the compiled graph breaks around. Under "
    "fullgraph=True the module takes the op's path (linear_logprobs) instead; if this region is reached "
    "there, kernel_options(path=...) forced the pair engine: use kernel_options(engine=False) for a "
    "fullgraph compile, or compile without fullgraph=True"
)


def eager_region(fn: Callable) -> Callable:
    """``fn`` as one eager region under ``torch.compile``: ``torch.compiler.disable(fn)`` (with the reason
    it gives a ``fullgraph=True`` error), built when first traced; wrapping at import time would import
    ``torch._dynamo`` (about 1 s) for every user of the package. Outside ``torch.compile`` it costs one
    call."""
    disabled: list[Callable] = []

    def build() -> bool:
        if not disabled:
            disabled.append(torch.compiler.disable(fn, reason=_EAGER_REASON))
        return True

    # dynamo runs a function so marked while tracing (as torch._dynamo.assume_constant_result does):
    # the disabled function exists before the trace reads ``disabled``, and calling it is the only break
    build._dynamo_marked_constant = True  # type: ignore[attr-defined]

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if not torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        build()
        return disabled[0](*args, **kwargs)

    return call


def _fullgraph_probe() -> bool:
    """Whether the frame dynamo is tracing now may not break its graph (``fullgraph=True``, or
    ``torch._dynamo.error_on_graph_break(True)``). Run by dynamo at trace time (below), on its tracer's
    state: torch has no public query for it. False when that state cannot be read (the engine's region
    then reports itself through ``torch.compiler.disable``'s reason)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        return bool(getattr(tx, "one_graph", False) or getattr(tx, "error_on_graph_break", False))
    except Exception:  # noqa: BLE001 - a torch without this state: assume a break is allowed
        return False


# What torch._dynamo.assume_constant_result(_fullgraph_probe) does, without importing torch._dynamo here:
# dynamo calls the function while tracing and takes its result as a constant of the graph.
_fullgraph_probe._dynamo_marked_constant = True  # type: ignore[attr-defined]


def tracing_fullgraph() -> bool:
    """True while ``torch.compile`` traces with ``fullgraph=True`` (where :func:`eager_region` cannot
    break the graph); False in eager mode and in the default compile mode."""
    return torch.compiler.is_compiling() and _fullgraph_probe()


# ---------------------------------------------------------------------------------------------
# the step
# ---------------------------------------------------------------------------------------------


def pair_chunks(pair_tokens: Tensor | list[int], budget_tokens: int, target_tokens: int = CHUNK_TOKENS["cpu"]):
    """Consecutive ranges of pairs ``[p0, p1)``: each grows until it holds ``target_tokens`` counted
    tokens, never past ``budget_tokens``; None when a single pair does not fit the budget (then the step
    recomputes the logits in token chunks). ``pair_tokens``: host ints (a tensor is read once)."""
    counts = pair_tokens.tolist() if isinstance(pair_tokens, Tensor) else list(pair_tokens)
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


@dataclass(frozen=True)
class _Counted:
    """The counted tokens of ``labels [R, T]``: flat positions (ascending), their int64 labels, and each
    row's count as host ints (the one host sync of the bookkeeping)."""

    token_ids: Tensor
    labels: Tensor
    row_tokens: tuple[int, ...]


def _counted(labels: Tensor, ignore_index: int, vocab: int) -> _Counted:
    """:class:`_Counted` of ``labels [R, T]`` in one host sync (the per-row counts and the number of
    out-of-range labels read together); out-of-range labels raise :func:`_dispatch.counted_rows`'s error.
    The positions come from a stable sort, not ``nonzero`` (whose output size costs a sync of its own)."""
    rows, steps = labels.shape
    flat = labels.reshape(-1).long()
    valid = flat != ignore_index
    bad = valid & ((flat < 0) | (flat >= vocab))
    stats = torch.cat([bad.sum().view(1), valid.view(rows, steps).sum(dim=1)]).tolist()
    if stats[0]:
        dispatch.counted_rows(flat, ignore_index, vocab)  # raises, naming the first bad label
    row_tokens = tuple(int(c) for c in stats[1:])
    total = sum(row_tokens)
    if total == rows * steps:
        token_ids = torch.arange(rows * steps, device=labels.device)
    else:  # counted positions first, each group in its original order
        token_ids = torch.sort((~valid).to(torch.uint8), stable=True).indices[:total]
    return _Counted(token_ids, flat.index_select(0, token_ids), row_tokens)


@dataclass
class PairPlan:
    """How a paired batch ``labels [R, T]`` is cut: the counted tokens (flat positions, int64 labels),
    the pairs' token counts, and the chunks of whole pairs (None when a pair is longer
    than the workspace: the step then recomputes the logits in token chunks). ``pair_tokens`` is a CPU
    tensor and ``row_tokens`` host ints: the chunks' sizes and token ranges are read without a sync."""

    token_ids: Tensor
    labels: Tensor
    pair_tokens: Tensor
    chunks: list | None
    budget_tokens: int
    stacked: bool = False
    row_tokens: tuple[int, ...] = field(default=())

    def counted(self) -> _Counted:
        """The counted tokens this plan was made from (for another plan or pass over the same labels)."""
        return _Counted(self.token_ids, self.labels, self.row_tokens)


def plan_pairs(
    labels: Tensor,
    ignore_index: int,
    vocab: int,
    dtype: torch.dtype,
    stacked: bool = False,
    *,
    counts_of: PairPlan | None = None,
) -> PairPlan | None:
    """The :class:`PairPlan` of ``labels [R, T]`` for a ``dtype`` head, or None without a pair (the op's
    path gives its clear error). Checks the label range. ``stacked``: the reference's rows share each
    chunk's GEMM (a shared head), so a token takes twice the logits.

    Whether the pairs fit (stacked or not) is arithmetic on the per-row counts (:func:`_counted`, one host
    sync). ``counts_of``: an earlier plan of the same ``labels``, whose counts are reused (no sync): a
    stacked step that does not fit is planned again unstacked for free."""
    b = labels.shape[0] // 2
    if b == 0:
        return None
    counted = _counted(labels, ignore_index, vocab) if counts_of is None else counts_of.counted()
    per_pair = _per_pair(counted.row_tokens, b)
    # the planner's budget: _dispatch.pair_path takes the same numbers to tell PAIR_ENGINE from
    # LONG_PAIR_CHUNKS, and pair_chunks returns None exactly where it says LONG_PAIR_CHUNKS
    budget = dispatch.pair_budget_tokens(vocab, dtype, labels.device, stacked=stacked)
    chunks = pair_chunks(per_pair, budget, chunk_tokens(labels.device))
    pair_tokens = torch.tensor(per_pair, dtype=torch.long)
    return PairPlan(counted.token_ids, counted.labels, pair_tokens, chunks, budget, stacked, counted.row_tokens)


def _per_pair(row_tokens: tuple[int, ...], pairs: int) -> list[int]:
    """Each pair's counted tokens from the host row counts (row ``r`` belongs to pair ``r % pairs``)."""
    per_pair = [0] * pairs
    for r, c in enumerate(row_tokens):
        per_pair[r % pairs] += c
    return per_pair


def _pair_counts(plan: PairPlan) -> list[int]:
    """Each pair's counted tokens, from the plan's host row counts."""
    return _per_pair(plan.row_tokens, len(plan.pair_tokens))


def _chunk_positions(plan: PairPlan, p0: int, p1: int) -> tuple[Tensor, Tensor]:
    """The flat positions and labels of the counted tokens of pairs ``[p0, p1)``, ascending, as slices
    of the plan's tokens: a pair's tokens are whole rows (``r % B``), whose offsets are host sums."""
    b = len(plan.pair_tokens)
    segments: list[list[int]] = []
    start = 0
    for r, c in enumerate(plan.row_tokens):
        if c and p0 <= r % b < p1:
            if segments and segments[-1][1] == start:
                segments[-1][1] = start + c
            else:
                segments.append([start, start + c])
        start += c
    if not segments:  # pairs without a counted token
        return plan.token_ids[:0], plan.labels[:0]
    if len(segments) == 1:
        ((s0, s1),) = segments
        return plan.token_ids[s0:s1], plan.labels[s0:s1]
    return (
        torch.cat([plan.token_ids[s0:s1] for s0, s1 in segments]),
        torch.cat([plan.labels[s0:s1] for s0, s1 in segments]),
    )


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
        self.acc = dispatch.result_dtype(hidden.dtype)
        self.bias = None if bias is None else bias.detach().to(self.acc)
        self.transform, self.with_stats = transform, with_stats
        self.epi = epilogues(backend)
        self.transform_args = dataclasses.asdict(transform)  # named in the overflow message
        need_h, need_w, need_b = need
        dev = hidden.device
        # d_hidden in the input dtype: each token's row is written once. d_weight sums every chunk, so it
        # accumulates in float32 (float64 for a float64 head) and is rounded to the head's dtype once, at
        # the end: a 16-bit accumulator would round the running sum once per chunk (43 times on a 43-chunk
        # step, ~1e-2 relative where one rounding is ~2e-3). The cost, as in every peer: a 16-bit head's
        # float32 [V, H] buffer is 2x the weight, plus the 1x result cast from it at the end of the step.
        self.d_hidden = torch.zeros(rows * steps, h_size, dtype=hidden.dtype, device=dev) if need_h else None
        self.d_weight = torch.zeros(weight.shape, dtype=self.acc, device=dev) if need_w else None
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
        gemm.logits_into(z_all, h if self.ref_h is None else torch.cat([self.ref_h.index_select(0, idx), h]), self.w)
        ref_logp = ref_lse = None
        if self.ref_h is not None:
            ref = online_state.finalize_logprobs(
                self.epi.fold(z_all[:n], self.bias, y, self.transform, False), self.vocab
            )
            ref_logp, ref_lse = ref.logp, ref.lse
        z = z_all[ref_rows:]
        out = online_state.finalize_logprobs(
            self.epi.fold(z, self.bias, y, self.transform, self.with_stats), self.vocab
        )
        # one sync for both models' rows: the lse of both first (a -inf one names the masked vocabulary)
        lse = out.lse if ref_lse is None else torch.cat([ref_lse, out.lse])
        results: tuple[Tensor, ...] = (lse,)
        if self.with_stats:
            # the fold ran with statistics (with_stats), so finalize_logprobs filled them
            assert out.entropy is not None and out.mean_logit is not None and out.log_sum_p2 is not None
            results += (out.entropy, out.mean_logit, out.log_sum_p2)
        dispatch.check_finite({}, {}, results, self.transform_args)
        return out, h, z, dz, ref_logp

    def backward(self, idx: Tensor, y: Tensor, h: Tensor, z: Tensor, dz: Tensor, lse: Tensor, g: Tensor) -> None:
        """dz from the logits the fold left, then ``dH[idx] = dz W``, ``dW += dz^T h``, ``db += sum dz``."""
        self.epi.to_dz(z, self.bias, y, lse, g, self.transform, dz)
        if self.d_hidden is not None:
            self.d_hidden.index_copy_(0, idx, dz @ self.w.to(dz.dtype))
        if self.d_weight is not None:
            _accumulate_d_weight(self.d_weight, dz, h.to(dz.dtype), z)
        if self.d_bias is not None:
            self.d_bias.add_(dz.sum(dim=0, dtype=self.acc))

    def backward_unscaled(
        self, idx: Tensor, y: Tensor, h: Tensor, z: Tensor, dz: Tensor, lse: Tensor, split: int, parts
    ):
        """dz with ``g = 1`` (``onehot - p``, times the transform's derivative), ``dH[idx] = dz W``
        unscaled, and the per-row partials: the chunk's first ``split`` tokens are the pair's chosen row,
        the rest its rejected row (:class:`_RowPartials`)."""
        n = idx.numel()
        self.epi.to_dz(z, self.bias, y, lse, torch.ones(n, dtype=self.acc, device=z.device), self.transform, dz)
        if self.d_hidden is not None:
            self.d_hidden.index_copy_(0, idx, dz @ self.w.to(dz.dtype))
        hd = h.to(dz.dtype) if parts.weight else h
        for k, (lo, hi) in enumerate(((0, split), (split, n))):
            if hi <= lo:
                continue
            if parts.weight:
                _accumulate_d_weight(parts.weight[k], dz[lo:hi], hd[lo:hi], z[lo:hi])
            if parts.bias:
                parts.bias[k].add_(dz[lo:hi].sum(dim=0, dtype=self.acc))


class _RowPartials:
    """The unscaled d_weight / d_bias partials of the two rows (chosen, rejected) of the long pair in
    flight. With one pair in the batch the chosen row's go straight into the head's (still zero)
    gradients: one extra ``[V, H]`` buffer instead of two."""

    def __init__(self, head: _Head, shared: bool):
        self.shared = shared

        def targets(grad: Tensor | None) -> list[Tensor]:
            if grad is None:
                return []
            return [grad if shared else torch.zeros_like(grad), torch.zeros_like(grad)]

        self.weight, self.bias = targets(head.d_weight), targets(head.d_bias)

    def finish(self, head: _Head, idx: Tensor, g: Tensor, n_chosen: int, chunk: int) -> None:
        """Scale the pair's gradients by the loss's ``g`` (per token, ``[n]`` for the pair's tokens
        ``idx``, the chosen row's ``n_chosen`` first): ``dH[idx] *= g``, ``dW += g_c W_c + g_r W_r``
        (the same for the bias); the partials are zeroed for the next pair."""
        n = idx.numel()
        if head.d_hidden is not None:
            for t0 in range(0, n, chunk):
                rows_t = idx[t0 : t0 + chunk]
                scaled = head.d_hidden.index_select(0, rows_t).to(head.acc) * g[t0 : t0 + chunk, None]
                head.d_hidden.index_copy_(0, rows_t, scaled.to(head.d_hidden.dtype))
        if not (self.weight or self.bias):
            return
        segments = [(lo, hi) for lo, hi in ((0, n_chosen), (n_chosen, n)) if hi > lo]
        # one number per row, by the caller's word (row_constant): checked, one sync per long pair
        if segments and bool(torch.stack([(g[lo:hi] != g[lo]).any() for lo, hi in segments]).any()):
            raise RuntimeError(
                "the pair engine's one-pass long-pair step needs a loss whose per-token gradient is one number per "
                "sequence (row_constant=True), and this loss's gradient varies along a row: pass row_constant=False"
            )
        for grad, parts in ((head.d_weight, self.weight), (head.d_bias, self.bias)):
            if grad is None:
                continue
            for k, (lo, hi) in enumerate(((0, n_chosen), (n_chosen, n))):
                if hi <= lo:
                    continue
                g_row = g[lo].to(grad.dtype)
                if parts[k] is grad:  # the chosen row's partial is the gradient itself (zero before it)
                    grad.mul_(g_row)
                else:
                    grad.addcmul_(parts[k], g_row)
                    parts[k].zero_()


def _one_pass_tokens(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, need: tuple[bool, bool, bool], row_constant: bool, plan
) -> int:
    """The token chunk of a one-pass long-pair step, 0 where it takes two passes
    (:func:`_dispatch.long_pair_partials`): the workspace less the partials, at most ``chunk_tokens``."""
    if not any(need):
        return 0
    dev, vocab = hidden.device, weight.shape[0]
    grads = dispatch.LongPairGrads(
        weight.shape[1], len(plan.pair_tokens), need[1], need[2] and bias is not None, row_constant
    )
    partial, why = dispatch.long_pair_partials(vocab, hidden.dtype, dev, grads)
    if why is not None:
        return 0
    per_token = _Workspace.bytes_per_token(vocab, hidden.dtype, dev, backward=True)
    return max(1, min(chunk_tokens(dev), (workspace_bytes(dev) - partial) // per_token))


def _long_pairs_one_pass(head: _Head, plan: PairPlan, chunk: int, fields, per_token, loss_of_tokens, rows, steps):
    """A step with pairs longer than the workspace, in one pass (8NHV): each such pair in token chunks of
    ``chunk`` -- logits, fold, dz with ``g = 1``, ``dH`` rows and per-row d_weight partials -- then the
    loss's ``g`` (one number per row), which scales them (:class:`_RowPartials`); the other pairs in
    chunks of whole pairs, as in a step whose pairs fit. A forced LONG_PAIR_CHUNKS whose pairs all fit
    runs every pair the long way."""
    per_pair = _pair_counts(plan)
    b, dev, acc = len(per_pair), head.flat_h.device, head.acc
    long = [p for p, c in enumerate(per_pair) if c > chunk] or [p for p, c in enumerate(per_pair) if c]
    parts = _RowPartials(head, shared=b == 1)
    for p in long:  # first: with one pair, its chosen row's partials are the (zero) gradients themselves
        idx_all, y_all = _chunk_positions(plan, p, p + 1)  # the chosen row's tokens, then the rejected row's
        n_chosen = plan.row_tokens[p]
        for t0 in range(0, idx_all.numel(), chunk):
            idx, y = idx_all[t0 : t0 + chunk], y_all[t0 : t0 + chunk]
            out, h, z, dz, _ = head.forward(idx, y)
            for f in fields:
                per_token[f].index_copy_(0, idx, getattr(out, f))
            head.backward_unscaled(idx, y, h, z, dz, out.lse, max(0, min(n_chosen - t0, idx.numel())), parts)
        pair_out = TokenOutputs(**{f: per_token[f].index_select(0, idx_all) for f in fields})
        g = _token_grads(loss_of_tokens, pair_out, idx_all, rows, steps, acc, dev)
        parts.finish(head, idx_all, g, n_chosen, chunk)
    taken = set(long)
    short = [p for p in range(b) if p not in taken]
    runs: list[list[int]] = []
    for p in short:  # consecutive pairs: chunk ranges are pair ranges
        if runs and runs[-1][1] == p:
            runs[-1][1] = p + 1
        else:
            runs.append([p, p + 1])
    for r0, r1 in runs:
        for q0, q1 in pair_chunks(per_pair[r0:r1], chunk, chunk_tokens(dev)) or []:
            idx, y = _chunk_positions(plan, r0 + q0, r0 + q1)
            out, h, z, dz, _ = head.forward(idx, y)
            for f in fields:
                per_token[f].index_copy_(0, idx, getattr(out, f))
            head.backward(idx, y, h, z, dz, out.lse, _token_grads(loss_of_tokens, out, idx, rows, steps, acc, dev))


@functools.cache
def _addmm_writes_float32(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch.addmm(acc, a, b, out_dtype=float32, out=acc)`` accumulates 16-bit operands into a
    float32 ``acc`` on this device (cuBLAS does; the CPU has no such kernel). Probed once, on values
    whose float32 and 16-bit results differ."""
    try:
        a = torch.ones(2, 2, dtype=dtype, device=device_type)
        acc = torch.full((2, 2), 1.0 + 2.0**-12, dtype=torch.float32, device=device_type)
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        return bool((acc == 3.0 + 2.0**-12).all())
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _accumulate_d_weight(d_weight: Tensor, dz: Tensor, h: Tensor, z: Tensor) -> None:
    """``d_weight += dz^T h`` with ``d_weight`` in float32 (or the operands' own 32/64-bit dtype).

    16-bit ``dz``/``h``: straight into float32 where the library can (``addmm`` with ``out_dtype``);
    elsewhere through the chunk's float32 logits ``z``, dead once dz is formed, as an exact upcast of dz
    (no new ``[n, V]`` buffer; bf16 x bf16 products are exact in float32), else an upcast copy."""
    if dz.dtype == d_weight.dtype:
        d_weight.addmm_(dz.T, h)
    elif _addmm_writes_float32(dz.device.type, dz.dtype):
        torch.addmm(d_weight, dz.T, h, out_dtype=d_weight.dtype, out=d_weight)
    elif z.dtype == d_weight.dtype and z.shape == dz.shape and z.data_ptr() != dz.data_ptr():
        d_weight.addmm_(z.copy_(dz).T, h.to(d_weight.dtype))
    else:
        d_weight.addmm_(dz.T.to(d_weight.dtype), h.to(d_weight.dtype))


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
    row_constant: bool = False,
) -> PairStep | None:
    """One paired step's policy pass and its gradients, chunk by chunk (see the module docstring).

    ``hidden [R, T, H]``, ``labels [R, T]`` (B chosen rows, then B rejected), ``weight [V, H]``.
    ``loss_of_tokens(logp [R, T], log_sum_p2 [R, T] | None, ref_logp [R, T] | None)`` is the batch loss
    of per-token log-probs; it must be separable over pairs. ``need``: gradients of (hidden, weight,
    bias). ``backend``: the epilogues' provider (:func:`epilogues`). ``plan``: :func:`plan_pairs` of
    these labels, when the caller has it. ``ref_hidden [R, T, H]``: the reference's hidden states through
    this same head (detached): each chunk's reference rows join its policy rows in one GEMM and the loss
    gets their log-probs as ``ref_logp`` (the plan must be ``stacked`` and fit). ``row_constant``: the
    loss's per-token gradient is one number per row (sum- or mean-aggregated losses; not ``ld_alpha``):
    a pair longer than the workspace then runs in one pass where its gradient partials fit
    (:func:`_dispatch.long_pair_partials`; checked: a row whose gradient varies raises). Returns None only
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
    one_pass = 0  # the token chunk of a one-pass long-pair step (0: not one)
    if plan.chunks is not None:
        per_pair = _pair_counts(plan)
        sizes = [sum(per_pair[p0:p1]) for p0, p1 in plan.chunks]
    else:  # a pair longer than the workspace: token chunks, in one pass or two (the logits recomputed)
        # (the chunk need not hold whole pairs here: the GEMM-friendly size, not the whole budget)
        sizes = [max(1, min(plan.budget_tokens, chunk_tokens(hidden.device), plan.token_ids.numel()))]
        one_pass = _one_pass_tokens(hidden, weight, bias, need, row_constant, plan)
        if one_pass:
            sizes = [min(one_pass, max(1, plan.token_ids.numel()))]
    head = _Head(hidden, weight, bias, transform, with_stats, backend, need, max(sizes, default=0), ref_hidden)
    acc = head.acc
    fields = ("logp", "lse") + (("entropy", "mean_logit", "is_top1", "log_sum_p2") if with_stats else ())
    per_token = {
        f: torch.zeros(rows * steps, dtype=torch.bool if f == "is_top1" else acc, device=hidden.device) for f in fields
    }
    ref_logp = torch.zeros(rows * steps, dtype=acc, device=hidden.device) if stacked else None
    # inputs once per step (one read of the weight); each chunk's results in _Head.forward
    dispatch.check_finite(
        {"hidden": head.flat_h.index_select(0, plan.token_ids), "weight": head.w}
        | ({} if head.ref_h is None else {"ref_hidden": head.ref_h.index_select(0, plan.token_ids)}),
        {"bias": bias},
        (),
        head.transform_args,
    )
    if plan.chunks is not None:
        for p0, p1 in plan.chunks:
            idx, y = _chunk_positions(plan, p0, p1)  # flat [R * T] positions of the chunk's tokens
            out, h, z, dz, ref_chunk = head.forward(idx, y)
            for f in fields:
                per_token[f].index_copy_(0, idx, getattr(out, f))
            if ref_logp is not None:
                assert ref_chunk is not None  # stacked: the head holds the reference rows, forward returns theirs
                ref_logp.index_copy_(0, idx, ref_chunk)
            if any(need):
                g = _token_grads(loss_of_tokens, out, idx, rows, steps, acc, hidden.device, ref_chunk)
                head.backward(idx, y, h, z, dz, out.lse, g)
    elif one_pass:
        _long_pairs_one_pass(head, plan, sizes[0], fields, per_token, loss_of_tokens, rows, steps)
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
                gemm.logits_into(z, h, head.w)
                if head.epi.fold_transforms:
                    transform_in_place(z, head.bias, transform)
                head.backward(idx, y, h, z, dz, lse_all[t0 : t0 + chunk], g_all[t0 : t0 + chunk])
    shaped = {f: t.view(rows, steps) for f, t in per_token.items()}
    return PairStep(
        logp=shaped["logp"],
        outputs=TokenOutputs(**shaped),
        ref_logp=None if ref_logp is None else ref_logp.view(rows, steps),
        d_hidden=None if head.d_hidden is None else head.d_hidden.view(hidden.shape),
        d_weight=None if head.d_weight is None else head.d_weight.to(weight.dtype),
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
    plan: PairPlan | None = None,
) -> Tensor:
    """Per-token log-probs ``[R, T]`` (0 at ignored tokens) without gradient, through the same large GEMMs
    into a workspace of at most ``chunk_tokens`` tokens (the reference pass of a step). ``plan``: the step's
    plan of the same ``labels``, whose counted tokens are reused (no sync); without, they are counted."""
    rows, steps, h_size = hidden.shape
    vocab = weight.shape[0]
    counted = _counted(labels, ignore_index, vocab) if plan is None else plan.counted()
    token_ids, y_all = counted.token_ids, counted.labels
    per_token = _Workspace.bytes_per_token(vocab, hidden.dtype, hidden.device, backward=False)
    chunk = max(1, min(chunk_tokens(hidden.device), workspace_bytes(hidden.device) // per_token))
    head = _Head(hidden, weight, bias, transform, False, backend, (False, False, False), min(chunk, token_ids.numel()))
    dispatch.check_finite(
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
        scaled = [None if d is None else d.mul_(grad_out) for d in grads]
        return (None, *scaled, None, None, None)


def attach_gradients(loss: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None, step: PairStep) -> Tensor:
    """``loss`` (detached) as a differentiable function of ``hidden``, ``weight``, ``bias`` with the step's
    gradients."""
    return _LossWithGradients.apply(loss, hidden, weight, bias, step.d_hidden, step.d_weight, step.d_bias)
