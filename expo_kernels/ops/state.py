"""The partial state of the online softmax: what every backend returns, and the one merge and finalize.

A backend folds a range of the vocabulary (``[vocab_start, vocab_start + V_shard)``: the whole head,
a Triton vocab split, or one rank's shard) into a per-token partial state; states over disjoint
ranges merge exactly, in any order, and ``finalize`` turns the merged state into per-token results.
The torch backend's own tile loop is this merge applied tile by tile, the Triton backend merges its
vocab splits with it, and the vocab-parallel path merges the ranks' states through two all-reduces
(``reduce_max_fields`` by MAX, then ``sum_fields`` by SUM). See docs/design.md, "Partial states".

Log-prob state (``[N]`` each, float32; float64 for float64 inputs), ``shift = m`` where finite, else 0:

* ``m``          max_v z_v over the range (``-inf`` if every entry is masked or the range is empty)
* ``s``          sum_v e^(z_v - shift)
* ``z_label``    z at the label when the label (a global id) lies in the range, else 0
* ``sz``         sum_v e^(z_v - shift) (z_v - shift)    shifted, for the entropy (no cancellation)
* ``s2``         sum_v e^(2 (z_v - shift))               for log sum p^2
* ``z_sum``      sum of the finite z_v                    for the mean logit (masked entries add 0)
* ``max_before`` max z_v over the range's ids < label    for the first-argmax rule of ``is_top1``

The last four are None without statistics. With a top-k (``topk=k``) two more fields, ``[N, k]``:

* ``topk_values`` the k largest z_v over the range, value descending, the lower id first on ties
* ``topk_ids``    their global ids (int64); a slot the range cannot fill (fewer than k ids) holds
  ``-inf`` and ``TOPK_PAD_ID``, which ranks after every real id

merged by ``select_topk`` over the parts' candidates (exact, any order). Token-KL state:
``m_p, s_p, m_r, s_r`` as above for the policy and the reference head, and ``cross = sum_v e^(zr_v - shift_r) ((zr_v - shift_r) - (zp_v - shift_p))``
(shifted by both maxima: no cancellation when the heads' logits are large or offset by a constant).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .common import TokenOutputs

__all__ = [
    "LogprobState",
    "StateStats",
    "TokenKLState",
    "safe_shift",
    "select_topk",
    "TOPK_PAD_ID",
    "merge_logprob_states",
    "merge_token_kl_states",
    "finalize_logprobs",
    "finalize_token_kl",
    "empty_logprob_state",
    "empty_token_kl_state",
]


class StateStats(NamedTuple):
    """The statistics fields of a ``LogprobState`` that has them."""

    sz: Tensor
    s2: Tensor
    z_sum: Tensor
    max_before: Tensor


class LogprobState(NamedTuple):
    m: Tensor
    s: Tensor
    z_label: Tensor
    sz: Tensor | None = None
    s2: Tensor | None = None
    z_sum: Tensor | None = None
    max_before: Tensor | None = None
    topk_values: Tensor | None = None
    topk_ids: Tensor | None = None

    @property
    def with_stats(self) -> bool:
        return self.sz is not None

    def stats(self) -> StateStats | None:
        """The four statistics fields, or None without statistics."""
        if self.sz is None:
            return None
        # every constructor passes all four or none of them (torch/native/Triton backends, from_reduced)
        assert self.s2 is not None and self.z_sum is not None and self.max_before is not None
        return StateStats(self.sz, self.s2, self.z_sum, self.max_before)


class TokenKLState(NamedTuple):
    m_p: Tensor
    s_p: Tensor
    m_r: Tensor
    s_r: Tensor
    cross: Tensor


# The slot counts of a kernel's ``[slots, ..., N]`` state buffer, whose slot order is the field order: the
# ``[N]`` fields of a LogprobState without statistics (m, s, z_label) and with them (the top-k fields
# have buffers of their own), and of a TokenKLState.
LOGPROB_SLOTS = LogprobState._fields.index("sz")
LOGPROB_STATS_SLOTS = LogprobState._fields.index("topk_values")
TOKEN_KL_SLOTS = len(TokenKLState._fields)


def safe_shift(m: Tensor) -> Tensor:
    """The max as a shift for ``exp(z - shift)``: 0 where no finite logit was seen, so masked entries
    (``-inf``) give ``exp(-inf) = 0`` instead of ``exp(-inf - (-inf)) = nan``."""
    return torch.where(m > -math.inf, m, torch.zeros_like(m))


def _moved(m: Tensor, shift: Tensor, s: Tensor) -> Tensor:
    """``(m - shift) * s``, 0 where ``s = 0`` (an empty or fully masked part: ``-inf * 0`` is nan)."""
    return torch.where(s > 0, m - shift, torch.zeros_like(m)) * s


def empty_logprob_state(
    n: int, with_stats: bool, dtype: torch.dtype, device: torch.device, topk: int = 0
) -> LogprobState:
    """The state of an empty vocabulary range (the identity of the merge)."""
    neg = torch.full((n,), -math.inf, dtype=dtype, device=device)
    zero = torch.zeros(n, dtype=dtype, device=device)
    if not with_stats:
        state = LogprobState(neg, zero, zero.clone())
    else:
        state = LogprobState(neg, zero, zero.clone(), zero.clone(), zero.clone(), zero.clone(), neg.clone())
    if topk > 0:
        state = state._replace(
            topk_values=torch.full((n, topk), -math.inf, dtype=dtype, device=device),
            topk_ids=torch.full((n, topk), TOPK_PAD_ID, dtype=torch.int64, device=device),
        )
    return state


def empty_token_kl_state(n: int, dtype: torch.dtype, device: torch.device) -> TokenKLState:
    neg = torch.full((n,), -math.inf, dtype=dtype, device=device)
    zero = torch.zeros(n, dtype=dtype, device=device)
    return TokenKLState(neg, zero, neg.clone(), zero.clone(), zero.clone())


# ---------------------------------------------------------------------------------------------
# top-k: the order is (value descending, id ascending), so ties resolve to the lower id on every
# backend (torch.topk leaves the order of ties unspecified)
# ---------------------------------------------------------------------------------------------

# The id of an empty top-k slot (a range with fewer than k ids): after every real id among -inf values.
TOPK_PAD_ID = torch.iinfo(torch.int64).max


def select_topk(values: Tensor, ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` best of candidates ``values, ids [N, c]`` (distinct ids per row) by value descending,
    then id ascending: two stable sorts, by id and then by value. ``c < k`` pads with empty slots."""
    if values.shape[1] < k:
        pad = k - values.shape[1]
        values = torch.cat([values, values.new_full((values.shape[0], pad), -math.inf)], dim=1)
        ids = torch.cat([ids, ids.new_full((ids.shape[0], pad), TOPK_PAD_ID)], dim=1)
    by_id = ids.argsort(dim=1, stable=True)
    values, ids = values.gather(1, by_id), ids.gather(1, by_id)
    best = values.argsort(dim=1, descending=True, stable=True)[:, :k]
    return values.gather(1, best), ids.gather(1, best)


def _merge_topk(states: Sequence[LogprobState], merged: LogprobState) -> LogprobState:
    first = states[0].topk_values
    if first is None:
        return merged
    values = torch.cat([st.topk_values for st in states if st.topk_values is not None], dim=1)
    ids = torch.cat([st.topk_ids for st in states if st.topk_ids is not None], dim=1)
    top_values, top_ids = select_topk(values, ids, first.shape[1])
    return merged._replace(topk_values=top_values, topk_ids=top_ids)


# ---------------------------------------------------------------------------------------------
# merge: MAX of the maxima, then a SUM of the parts moved to the common shift
# ---------------------------------------------------------------------------------------------


def reduce_max_fields(state: LogprobState) -> Tensor:
    """The fields combined by MAX, stacked ``[k, N]``: ``m`` (and ``max_before`` with statistics)."""
    st = state.stats()
    return torch.stack([state.m] + ([st.max_before] if st is not None else []))


def sum_fields(state: LogprobState, m_all: Tensor) -> Tensor:
    """The fields combined by SUM once every part is moved to the common max ``m_all``, stacked ``[k, N]``."""
    shift = safe_shift(m_all)
    w = torch.exp(state.m - shift)  # 0 for a part without finite logits
    fields = [w * state.s, state.z_label]  # only the range holding the label has a non-zero z_label
    st = state.stats()
    if st is not None:
        # sum e^(z - M)(z - M) = w (sz_k + (m_k - M) s_k); sum e^(2(z - M)) = w^2 s2_k
        fields += [w * (st.sz + _moved(state.m, shift, state.s)), w * w * st.s2, st.z_sum]
    return torch.stack(fields)


def from_reduced(maxes: Tensor, sums: Tensor) -> LogprobState:
    """The merged state from the reduced fields (``maxes`` as ``reduce_max_fields``, ``sums`` as ``sum_fields``)."""
    if maxes.shape[0] == 1:
        return LogprobState(maxes[0], sums[0], sums[1])
    return LogprobState(maxes[0], sums[0], sums[1], sums[2], sums[3], sums[4], maxes[1])


def merge_logprob_states(states: Sequence[LogprobState]) -> LogprobState:
    """Exact merge of states over disjoint vocabulary ranges (the same arithmetic as the all-reduces)."""
    if len(states) == 1:
        return states[0]
    maxes = torch.stack([reduce_max_fields(st) for st in states]).amax(dim=0)
    sums = torch.stack([sum_fields(st, maxes[0]) for st in states]).sum(dim=0)
    return _merge_topk(states, from_reduced(maxes, sums))


def token_kl_sum_fields(state: TokenKLState, mp_all: Tensor, mr_all: Tensor) -> Tensor:
    """Token-KL fields combined by SUM once moved to the common maxima (MAX-reduce ``m_p``, ``m_r`` first)."""
    shift_p, shift_r = safe_shift(mp_all), safe_shift(mr_all)
    w_p = torch.exp(state.m_p - shift_p)
    w_r = torch.exp(state.m_r - shift_r)
    # (zr - M_r) - (zp - M_p) = [(zr - m_r) - (zp - m_p)] + [(m_r - M_r) - (m_p - M_p)], weighted by s_r
    moved_r = _moved(state.m_r, shift_r, state.s_r)
    moved_p = torch.where(state.s_p > 0, state.m_p - shift_p, torch.zeros_like(state.m_p)) * state.s_r
    return torch.stack([w_p * state.s_p, w_r * state.s_r, w_r * (state.cross + moved_r - moved_p)])


def merge_token_kl_states(states: Sequence[TokenKLState]) -> TokenKLState:
    if len(states) == 1:
        return states[0]
    mp = torch.stack([st.m_p for st in states]).amax(dim=0)
    mr = torch.stack([st.m_r for st in states]).amax(dim=0)
    sums = torch.stack([token_kl_sum_fields(st, mp, mr) for st in states]).sum(dim=0)
    return TokenKLState(mp, sums[0], mr, sums[1], sums[2])


# ---------------------------------------------------------------------------------------------
# finalize
# ---------------------------------------------------------------------------------------------


def finalize_logprobs(state: LogprobState, vocab: int) -> TokenOutputs:
    """Per-token results of a state over the whole vocabulary of size ``vocab``."""
    log_s = torch.log(state.s)
    lse = state.m + log_s
    logp = state.z_label - lse
    st = state.stats()
    topk = dict(topk_values=state.topk_values, topk_indices=state.topk_ids)
    if st is None:
        return TokenOutputs(logp, lse, **topk)
    return TokenOutputs(
        logp=logp,
        lse=lse,
        entropy=log_s - st.sz / state.s,  # sum_v p_v (lse - z_v), from shifted terms
        mean_logit=st.z_sum / vocab,
        # the label is the first argmax: it reaches the maximum and no earlier id does
        is_top1=(state.z_label >= state.m) & (st.max_before < state.z_label),
        log_sum_p2=torch.log(st.s2) - 2.0 * log_s,
        **topk,
    )


def finalize_token_kl(state: TokenKLState) -> tuple[Tensor, Tensor, Tensor]:
    """``(kl, lse_p, lse_r)``: ``KL = sum_v q_v (log q_v - log p_v) = cross / s_r - log s_r + log s_p``."""
    log_sp, log_sr = torch.log(state.s_p), torch.log(state.s_r)
    kl = state.cross / state.s_r - log_sr + log_sp
    return kl, state.m_p + log_sp, state.m_r + log_sr
