"""CRINGE (binary) and pairwise CRINGE on per-token quantities.

Binary CRINGE (Adolphs et al., 2022, "The CRINGE Loss: Learning what language not to model",
arXiv 2211.05826, Sec. 2 and Fig. 1; the authors' reference implementation is ParlAI's
``projects/cringe/cringe_loss.py``, ``ContrastiveCrossEntropyLoss``): likelihood training on the
positive (chosen) sequence, and for every token ``y`` of the negative (rejected) sequence a
two-way softmax that prefers a *positive* token sampled from the model's own top-k predictions over
the negative token::

    L_CE  = -log p(y_t | y_<t)                                       chosen tokens
    L_Cr  = -log( exp(s+) / (exp(s+) + exp(s-)) ) = softplus(s- - s+) rejected tokens
    s-    = z_y, the negative token's logit
    s+    = z_j, j ~ softmax over the top-k logits with the negative token excluded
    L     = L_CE + alpha * L_Cr

"Top-k with the negative excluded" is taken as the authors' code does it: the top ``k + 1`` logits, the
negative token removed when it is among them, else the ``(k + 1)``-th, so exactly ``k`` candidates.
The loss is normalized as there too: the sum over every counted token (chosen and rejected) divided by
their number.

Pairwise CRINGE (Xu et al., 2023, "Some things are more CRINGE than others: Iterative Preference
Optimization with the Pairwise Cringe Loss", arXiv 2312.16682, Sec. 3): the binary loss on the pair,
its CRINGE term gated by a sigmoid of the sequence log-likelihood margin::

    M     = log p(y_w | x) - log p(y_l | x)
    g     = sigmoid((b - M) / tau)
    L     = L_CE(y_w) + alpha * g * L_Cr(y_l)

CAUTION (for review): the binary equations above match the authors' code read here; the gate ``g``
(its sign convention, ``b`` and ``tau``, summed rather than averaged log-likelihoods, gradient
through ``g``) is written from memory of 2312.16682 — the search tools of this environment returned
only that paper's abstract, not its Sec. 3. Check it against the paper before relying on it.

Sampling is deterministic given ``generator``: one ``torch.rand([B, T], dtype=float64)`` draw from it
on the CPU per call (the global CPU generator when None), one uniform per rejected position, mapped
through the inverse CDF of the candidates' softmax (computed in float64 from the detached values).
Gradients reach ``s+`` and ``s-`` (and through ``g`` the sequence log-probs); the sampled index has
none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .aggregate import sum_dtype

__all__ = ["CringeLossOutput", "check_real", "cringe_loss", "sample_positive"]


@dataclass
class CringeLossOutput:
    """loss: scalar; nll: ``[B]`` summed chosen NLL per pair; cringe: ``[B]`` summed rejected-token
    CRINGE terms per pair; gate: ``[B]`` the pairwise gate (None for the binary loss); positive_ids:
    ``[B, T]`` the sampled positive token of each rejected position (-1 where not counted)."""

    loss: Tensor
    nll: Tensor
    cringe: Tensor
    gate: Tensor | None
    positive_ids: Tensor


def check_real(name: str, value, *, positive: bool = False) -> float:
    """``value`` as a finite float (> 0 when ``positive``): not a real number -> TypeError, a non-finite
    or non-positive value -> ValueError, both naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v) or (positive and v <= 0):
        raise ValueError(f"{name} must be finite{' and > 0' if positive else ''}, got {value!r}")
    return v


def sample_positive(
    topk_values: Tensor,
    topk_indices: Tensor,
    negatives: Tensor,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Sample one positive per position from the top-k with the negative excluded.

    topk_values, topk_indices: ``[..., k + 1]`` the k + 1 largest logits (value descending) and their
    ids; negatives: ``[...]`` the negative token ids. Returns ``(s_plus [...], ids [...])``: the sampled
    candidate's value (differentiable through ``topk_values``) and id. Candidates: the k + 1 minus the
    negative when it is among them, else minus the last one.
    """
    is_neg = topk_indices == negatives.unsqueeze(-1)
    drop = is_neg.clone()
    drop[..., -1] |= ~is_neg.any(dim=-1)
    logits = topk_values.detach().double().masked_fill(drop, -math.inf)
    cdf = torch.softmax(logits, dim=-1).cumsum(dim=-1)
    # drawn on the CPU (the module docstring), whatever the default device: reproducible across devices
    u = torch.rand(negatives.shape, generator=generator, dtype=torch.float64, device="cpu").to(cdf.device)
    # inverse CDF: the first candidate whose cumulative probability exceeds u (dropped ones have p = 0)
    pick = (cdf <= u.unsqueeze(-1)).sum(dim=-1, keepdim=True)
    pick = torch.minimum(pick, (~drop).long().cumsum(-1).argmax(dim=-1, keepdim=True))  # rounding at u ~ 1
    return topk_values.gather(-1, pick).squeeze(-1), topk_indices.gather(-1, pick).squeeze(-1)


def cringe_loss(
    chosen_logps: Tensor,
    chosen_mask: Tensor,
    rejected_logps: Tensor,
    rejected_logits: Tensor,
    topk_values: Tensor,
    topk_indices: Tensor,
    rejected_labels: Tensor,
    *,
    alpha: float = 1.0,
    pairwise: bool = False,
    margin: float = 0.0,
    tau: float = 1.0,
    ignore_index: int = -100,
    generator: torch.Generator | None = None,
) -> CringeLossOutput:
    """Binary or pairwise CRINGE of ``B`` pairs from per-token quantities (see the module docstring).

    Args:
        chosen_logps: ``[B, Tc]`` log p of the chosen labels (any value where ``chosen_mask`` is False).
        chosen_mask: ``[B, Tc]`` bool, the counted chosen tokens.
        rejected_logps: ``[B, Tr]`` log p of the rejected labels (the pairwise margin only).
        rejected_logits: ``[B, Tr]`` ``s-``, the rejected labels' (transformed) logits.
        topk_values, topk_indices: ``[B, Tr, k + 1]`` the model's top k + 1 logits and ids at the
            rejected positions (``linear_logprobs(..., topk=k + 1, return_stats=True)``).
        rejected_labels: ``[B, Tr]`` ids, ``ignore_index`` where not counted.
        alpha: weight of the CRINGE term. pairwise, margin, tau: the gated pairwise form (``b``, ``tau``).
        generator: the source of the positives' sampling (see the module docstring).

    Returns:
        :class:`CringeLossOutput`; the loss is float32 (float64 for float64 inputs).
    """
    alpha = check_real("alpha", alpha)
    margin = check_real("margin", margin)
    tau = check_real("tau", tau, positive=True)
    if not isinstance(pairwise, bool):
        raise TypeError(f"pairwise must be a bool, got {type(pairwise).__name__} {pairwise!r}")
    if topk_values.shape != topk_indices.shape or topk_values.shape[:-1] != rejected_labels.shape:
        raise ValueError(
            "topk_values and topk_indices must be [B, Tr, k + 1] over rejected_labels [B, Tr]; got "
            f"{tuple(topk_values.shape)}, {tuple(topk_indices.shape)}, {tuple(rejected_labels.shape)}"
        )
    if topk_values.shape[-1] < 2:
        raise ValueError(f"CRINGE needs top-(k + 1) with k >= 1 candidates; got {topk_values.shape[-1]} columns")
    rej_mask = rejected_labels != ignore_index
    s_plus, pos_ids = sample_positive(topk_values, topk_indices, rejected_labels, generator)
    # -log(e^{s+} / (e^{s+} + e^{s-})) = softplus(s- - s+)
    cr_tok = torch.where(rej_mask, F.softplus(rejected_logits - s_plus), 0.0)
    nll_tok = torch.where(chosen_mask, -chosen_logps, 0.0)
    # per-sequence sums in float64 (losses.aggregate: a long sequence's log-prob sum is large, its float32
    # spacing coarse, and the gate takes the difference of two); the outputs keep the per-token dtypes
    wide = sum_dtype(chosen_logps.device)
    nll, cringe = nll_tok.sum(dim=1, dtype=wide), cr_tok.sum(dim=1, dtype=wide)
    dt = torch.promote_types(nll_tok.dtype, cr_tok.dtype)
    gate = None
    if pairwise:
        seq_margin = torch.where(chosen_mask, chosen_logps, 0.0).sum(1, dtype=wide) - torch.where(
            rej_mask, rejected_logps, 0.0
        ).sum(1, dtype=wide)
        gate = torch.sigmoid((margin - seq_margin) / tau)
        cringe_weighted = gate * cringe
        gate_dt = torch.promote_types(chosen_logps.dtype, rejected_logps.dtype)
        dt = torch.promote_types(dt, gate_dt)
        gate = gate.to(gate_dt)
    else:
        cringe_weighted = cringe
    # the authors' normalization: the sum over every counted token divided by their number
    n_tokens = (chosen_mask.sum() + rej_mask.sum()).clamp(min=1)
    loss = (nll.sum() + alpha * cringe_weighted.sum()) / n_tokens
    return CringeLossOutput(
        loss.to(dt), nll.to(nll_tok.dtype), cringe.to(cr_tok.dtype), gate, torch.where(rej_mask, pos_ids, -1)
    )
