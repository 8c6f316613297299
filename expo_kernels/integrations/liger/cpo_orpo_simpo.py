"""Liger's reference-free paired losses (ORPO, CPO, SimPO) on expo_kernels: the preference term from
the registry loss of the same name, the chosen NLL from the same fused pass. Rows are Liger's layout,
``B`` chosen then ``B`` rejected; the aux outputs are Liger's five paired ones, then the extras below.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ...losses import preference_loss, preference_loss_and_metrics
from ._core import Batch, CallArgs, Preference, SequenceLogps, paired_step
from .base import SPECS, LigerFunction, LigerLoss

__all__ = [
    "LigerFusedLinearORPOFunction",
    "LigerFusedLinearORPOLoss",
    "LigerFusedLinearCPOFunction",
    "LigerFusedLinearCPOLoss",
    "LigerFusedLinearSimPOFunction",
    "LigerFusedLinearSimPOLoss",
]

_Out = tuple[Tensor, tuple[Tensor, ...], bool]


def _reference_free(
    owner: str, a: CallArgs, preference: Preference, *, alpha: float, average_log_prob: bool, nll_target=None
) -> tuple[Tensor, tuple[Tensor, ...]]:
    return paired_step(
        owner,
        Batch.of(a),
        preference,
        ignore_index=a.ignore_index,
        alpha=alpha,
        compute_nll_loss=a.compute_nll_loss,
        average_log_prob=average_log_prob,
        nll_target=nll_target,
    )


def _orpo_step(owner: str, a: CallArgs, hp: dict[str, Any]) -> tuple[Tensor, tuple[Tensor, ...]]:
    beta = a.beta

    def preference(c: Tensor, r: Tensor, rc: Tensor, rr: Tensor, seq: SequenceLogps, nll: Tensor) -> _Out:
        n = c.shape[0]
        # the registry's ORPO: mean(nll - beta * log sigma(log-odds ratio)) of summed log-probs / lengths
        loss, metrics = preference_loss_and_metrics(
            "orpo",
            seq.summed[:n],
            seq.summed[n : 2 * n],
            chosen_lengths=seq.lengths[:n],
            rejected_lengths=seq.lengths[n : 2 * n],
            chosen_nll=nll,
            beta=beta,
        )
        return loss, (beta * c, beta * r, metrics["log_odds_ratio"], metrics["log_odds_chosen"]), True

    return _reference_free(owner, a, preference, alpha=1.0, average_log_prob=True, nll_target=a.nll_target)


def _cpo_step(owner: str, a: CallArgs, hp: dict[str, Any]) -> tuple[Tensor, tuple[Tensor, ...]]:
    beta = a.beta

    def preference(c: Tensor, r: Tensor, rc: Tensor, rr: Tensor, seq: SequenceLogps, nll: Tensor) -> _Out:
        # the registry's CPO with its own NLL weight at 0: the NLL is added with Liger's `alpha`
        loss = preference_loss("cpo", c, r, chosen_nll=torch.zeros((), device=c.device), **hp)
        return loss, (beta * c, beta * r), False

    return _reference_free(owner, a, preference, alpha=a.alpha, average_log_prob=a.average_log_prob)


def _simpo_step(owner: str, a: CallArgs, hp: dict[str, Any]) -> tuple[Tensor, tuple[Tensor, ...]]:
    beta = a.beta

    def preference(c: Tensor, r: Tensor, rc: Tensor, rr: Tensor, seq: SequenceLogps, nll: Tensor) -> _Out:
        n = c.shape[0]
        # the registry's SimPO averages summed log-probs by the lengths itself
        loss = preference_loss(
            "simpo",
            seq.summed[:n],
            seq.summed[n : 2 * n],
            chosen_lengths=seq.lengths[:n],
            rejected_lengths=seq.lengths[n : 2 * n],
            **hp,
        )
        return loss, (beta * c, beta * r), False

    return _reference_free(owner, a, preference, alpha=a.alpha, average_log_prob=True)


class LigerFusedLinearORPOFunction(LigerFunction, spec=SPECS["ORPO"], step=_orpo_step):
    """Liger's ``LigerFusedLinearORPOFunction.apply(_input, weight, target, bias, ignore_index, beta,
    compute_nll_loss, nll_target, compiled, chunk_size)``, as :class:`LigerFusedLinearORPOLoss`."""


class LigerFusedLinearORPOLoss(LigerLoss, function=LigerFusedLinearORPOFunction):
    """Liger's ``LigerFusedLinearORPOLoss``: ``forward(lin_weight [V, H], _input [2B, T, H], target [2B, T],
    bias [V], nll_target [2B, T])``: log-probs averaged over each row's tokens, ``NLL(chosen) - beta *
    mean log sigma(log-odds ratio)``; aux adds ``chosen_rewards``, ``rejected_rewards`` (``beta *`` the
    averaged log-probs, ``[B]``), ``log_odds_ratio`` and ``log_odds_chosen``. As Liger, but
    ``compiled`` and ``chunk_size`` are checked and unused."""


class LigerFusedLinearCPOFunction(LigerFunction, spec=SPECS["CPO"], step=_cpo_step):
    """Liger's ``LigerFusedLinearCPOFunction.apply(_input, weight, target, bias, ignore_index, beta, alpha,
    label_smoothing, compute_nll_loss, compiled, average_log_prob, chunk_size)``, as
    :class:`LigerFusedLinearCPOLoss`."""


class LigerFusedLinearCPOLoss(LigerLoss, function=LigerFusedLinearCPOFunction):
    """Liger's ``LigerFusedLinearCPOLoss``: ``forward(lin_weight [V, H], _input [2B, T, H], target [2B, T],
    bias [V])``: ``-(1-eps) log sigma(beta (c - r)) - eps log sigma(-beta (c - r))`` (+ ``alpha`` times
    the chosen NLL); aux adds ``beta * c`` and ``beta * r`` (``[B]``). As Liger, but ``compiled`` and
    ``chunk_size`` are checked and unused."""


class LigerFusedLinearSimPOFunction(LigerFunction, spec=SPECS["SimPO"], step=_simpo_step):
    """Liger's ``LigerFusedLinearSimPOFunction.apply(_input, weight, target, bias, ignore_index, beta,
    alpha, label_smoothing, compute_nll_loss, compiled, gamma, chunk_size)`` (``compute_nll_loss``
    defaults to False here, True in the module, as in Liger), as :class:`LigerFusedLinearSimPOLoss`."""


class LigerFusedLinearSimPOLoss(LigerLoss, function=LigerFusedLinearSimPOFunction):
    """Liger's ``LigerFusedLinearSimPOLoss``: ``forward(lin_weight [V, H], _input [2B, T, H], target
    [2B, T], bias [V])``: log-probs averaged over each row's tokens, ``-(1-eps) log sigma(beta (c - r) -
    gamma) - eps log sigma(-(beta (c - r) - gamma))`` (+ ``alpha`` times the chosen NLL); aux adds
    ``beta * c`` and ``beta * r`` (``[B]``). As Liger, but ``compiled`` and ``chunk_size`` are checked
    and unused."""
