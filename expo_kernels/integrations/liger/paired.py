"""Liger's paired chunked preference losses (DPO, ORPO, CPO, SimPO) on expo_kernels.

Each ``LigerFusedLinear*Loss`` takes Liger's constructor and call arguments and returns what Liger
returns, ``(loss, (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss,
*extras))``; each ``LigerFusedLinear*Function.apply`` takes Liger's positional arguments. Rows are
Liger's layout: the ``B`` chosen sequences, then the ``B`` rejected ones. The log-probs come from
:func:`expo_kernels.linear_logprobs` (no ``[tokens, vocab]`` logits), the preference term from the
loss registry (:func:`expo_kernels.preference_loss`), the NLL term from the same fused pass.

The aux outputs carry no gradient (as in Liger); the loss back-propagates to ``_input``, the weight and
the bias, never to the reference tensors.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ...losses import preference_loss
from ._core import check_options, check_registry_hparams, chosen_nll, policy_and_reference, row_logit_sums
from ._fast import dpo_engine_step

__all__ = [
    "DPO_LOSS_TYPES",
    "LigerFusedLinearDPOFunction",
    "LigerFusedLinearDPOLoss",
    "LigerFusedLinearORPOFunction",
    "LigerFusedLinearORPOLoss",
    "LigerFusedLinearCPOFunction",
    "LigerFusedLinearCPOLoss",
    "LigerFusedLinearSimPOFunction",
    "LigerFusedLinearSimPOLoss",
]

#: Liger's DPO ``loss_type`` values; each is the registry loss of the same name (``bco_pair`` with
#: ``delta=0``, ``sigmoid`` without label smoothing, as Liger defines them).
DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "discopop",
)
# the label-smoothing-dependent ones; the others take no label_smoothing in Liger (it is ignored there)
_SMOOTHED = ("exo_pair", "robust")


def _logit_means(_input: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """Liger's ``chosen_logits_mean`` / ``rejected_logits_mean``: the sum of every logit of the chosen
    (rejected) rows, all positions, divided by ``B * T * V``."""
    n = _input.shape[0] // 2
    ones = torch.ones(n, device=_input.device)
    zeros = torch.zeros(_input.shape[0] - 2 * n, device=_input.device)  # an odd last row counts in neither
    denom = n * _input.shape[1] * weight.shape[0]
    chosen = row_logit_sums(_input, weight, bias, torch.cat([ones, 0 * ones, zeros])) / denom
    rejected = row_logit_sums(_input, weight, bias, torch.cat([0 * ones, ones, zeros])) / denom
    return chosen, rejected


def _paired(
    owner: str,
    _input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None,
    *,
    ignore_index: int,
    alpha: float,
    compute_nll_loss: bool,
    nll_target: Tensor | None,
    average_log_prob: bool,
    use_ref_model: bool = False,
    ref_input: Tensor | None = None,
    ref_weight: Tensor | None = None,
    ref_bias: Tensor | None = None,
    preference,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """The shared step: ``preference(chosen, rejected, ref_chosen, ref_rejected, seq, nll)`` returns
    ``(preference loss, extra aux outputs)``; the NLL is added with weight ``alpha`` unless the
    preference term already holds it (it returns ``nll_included=True`` then)."""
    seq = policy_and_reference(
        owner,
        _input,
        weight,
        target,
        bias,
        ignore_index=ignore_index,
        average_log_prob=average_log_prob,
        use_ref_model=use_ref_model,
        ref_input=ref_input,
        ref_weight=ref_weight,
        ref_bias=ref_bias,
    )
    n = target.shape[0] // 2
    if compute_nll_loss:
        nll = chosen_nll(owner, seq, _input, weight, target, bias, nll_target, ignore_index=ignore_index)
    else:
        nll = torch.zeros((), device=_input.device)
    c, r = seq.policy[:n], seq.policy[n : 2 * n]
    if seq.reference is None:
        rc = rr = torch.zeros((), device=c.device, dtype=c.dtype)
    else:
        rc, rr = seq.reference[:n], seq.reference[n : 2 * n]
    pref, extras, nll_included = preference(c, r, rc, rr, seq, nll)
    loss = pref if nll_included or not compute_nll_loss else alpha * nll + pref
    chosen_mean, rejected_mean = _logit_means(_input, weight, bias)
    aux = (c.detach(), r.detach(), chosen_mean, rejected_mean, nll.detach().float())
    return loss, aux + tuple(x.detach() for x in extras)


# -------------------------------------------------------------------------------------------------
# DPO
# -------------------------------------------------------------------------------------------------
def _check_dpo(owner: str, loss_type: Any, beta: Any, label_smoothing: Any, discopop_tau: Any) -> None:
    if loss_type not in DPO_LOSS_TYPES:
        if loss_type == "ipo":
            raise ValueError(
                f"{owner}: Unsupported loss_type 'ipo' (Liger refuses it too: its length normalisation needs "
                "per-sequence token counts). Use expo_kernels.FusedLinearPreferenceLoss('ipo', ...) instead."
            )
        raise ValueError(
            f"{owner}: Unsupported loss_type {loss_type!r}; the supported ones are {list(DPO_LOSS_TYPES)}."
        )
    if loss_type == "exo_pair" and not label_smoothing > 0.0:
        raise ValueError(
            f"{owner}: label_smoothing must be > 0 for loss_type='exo_pair' (it is EXO's eps, log(eps) enters "
            f"the loss; the EXO paper uses 1e-3); got {label_smoothing!r}."
        )
    if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(
            f"{owner}: label_smoothing must lie in [0.0, 0.5) for loss_type='robust' (the fraction of flipped "
            f"labels); got {label_smoothing!r}."
        )
    check_registry_hparams(owner, loss_type, **_dpo_hparams(loss_type, beta, label_smoothing, discopop_tau))


def _dpo_hparams(loss_type: str, beta: float, label_smoothing: float, discopop_tau: float) -> dict[str, Any]:
    hp: dict[str, Any] = {"beta": beta}
    if loss_type in _SMOOTHED:
        hp["label_smoothing"] = label_smoothing
    if loss_type == "discopop":
        hp["discopop_tau"] = discopop_tau
    return hp


def _dpo_apply(
    _input,
    weight,
    target,
    bias=None,
    ref_input=None,
    ref_weight=None,
    ref_bias=None,
    ignore_index=-100,
    beta=0.1,
    compute_nll_loss=False,
    compiled=True,
    use_ref_model=True,
    average_log_prob=False,
    chunk_size=1,
    loss_type="sigmoid",
    label_smoothing=0.0,
    discopop_tau=0.05,
    alpha=1.0,
):
    owner = "LigerFusedLinearDPOLoss"
    check_options(
        owner,
        ignore_index=ignore_index,
        chunk_size=chunk_size,
        bools=dict(
            compute_nll_loss=compute_nll_loss,
            compiled=compiled,
            use_ref_model=use_ref_model,
            average_log_prob=average_log_prob,
        ),
    )
    _check_dpo(owner, loss_type, beta, label_smoothing, discopop_tau)
    hp = _dpo_hparams(loss_type, beta, label_smoothing, discopop_tau)
    if not compute_nll_loss and not average_log_prob:
        fast = dpo_engine_step(
            loss_type,
            hp,
            _input,
            weight,
            target,
            bias,
            ignore_index=ignore_index,
            use_ref_model=use_ref_model,
            ref_input=ref_input,
            ref_weight=ref_weight,
            ref_bias=ref_bias,
        )
        if fast is not None:
            loss, c, r, rc, rr = fast
            chosen_mean, rejected_mean = _logit_means(_input, weight, bias)
            nll = torch.zeros((), device=_input.device)
            return loss, (c, r, chosen_mean, rejected_mean, nll, beta * (c - rc), beta * (r - rr))

    def preference(c, r, rc, rr, seq, nll):
        loss = preference_loss(loss_type, c, r, rc.expand_as(c), rr.expand_as(r), **hp)
        return loss, (beta * (c - rc), beta * (r - rr)), False

    return _paired(
        owner,
        _input,
        weight,
        target,
        bias,
        ignore_index=ignore_index,
        alpha=alpha,
        compute_nll_loss=compute_nll_loss,
        nll_target=None,
        average_log_prob=average_log_prob,
        use_ref_model=use_ref_model,
        ref_input=ref_input,
        ref_weight=ref_weight,
        ref_bias=ref_bias,
        preference=preference,
    )


class LigerFusedLinearDPOFunction:
    """``apply(_input, weight, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None,
    ignore_index=-100, beta=0.1, compute_nll_loss=False, compiled=True, use_ref_model=True,
    average_log_prob=False, chunk_size=1, loss_type="sigmoid", label_smoothing=0.0, discopop_tau=0.05,
    alpha=1.0)`` -> ``(loss, aux)``: Liger's positional contract, on expo_kernels."""

    apply = staticmethod(_dpo_apply)


class LigerFusedLinearDPOLoss(nn.Module):
    """Liger's ``LigerFusedLinearDPOLoss`` on expo_kernels (same arguments, same outputs).

    ``loss_type`` is one of :data:`DPO_LOSS_TYPES`; ``use_ref_model=False`` takes the reference
    log-probs as 0; ``average_log_prob`` averages the log-probs over each row's counted tokens;
    ``compute_nll_loss`` adds ``alpha`` times the chosen rows' token-mean NLL. ``compiled`` and
    ``chunk_size`` are accepted and unused (the op tiles the work itself).
    """

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        alpha: float = 1.0,
        compute_nll_loss: bool = False,
        compiled: bool = True,
        use_ref_model: bool = True,
        average_log_prob: bool = False,
        chunk_size: int = 1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        discopop_tau: float = 0.05,
    ):
        super().__init__()
        owner = type(self).__name__
        check_options(
            owner,
            ignore_index=ignore_index,
            chunk_size=chunk_size,
            bools=dict(
                compute_nll_loss=compute_nll_loss,
                compiled=compiled,
                use_ref_model=use_ref_model,
                average_log_prob=average_log_prob,
            ),
        )
        _check_dpo(owner, loss_type, beta, label_smoothing, discopop_tau)
        self.ignore_index = ignore_index
        self.beta = beta
        self.alpha = alpha
        self.compute_nll_loss = compute_nll_loss
        self.compiled = compiled
        self.use_ref_model = use_ref_model
        self.average_log_prob = average_log_prob
        self.chunk_size = chunk_size
        self.loss_type = loss_type
        self.label_smoothing = label_smoothing
        self.discopop_tau = discopop_tau

    def forward(self, lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None):
        return _dpo_apply(
            _input,
            lin_weight,
            target,
            bias,
            ref_input,
            ref_weight,
            ref_bias,
            self.ignore_index,
            self.beta,
            self.compute_nll_loss,
            self.compiled,
            self.use_ref_model,
            self.average_log_prob,
            self.chunk_size,
            self.loss_type,
            self.label_smoothing,
            self.discopop_tau,
            self.alpha,
        )


# -------------------------------------------------------------------------------------------------
# ORPO: averaged log-probs; NLL(chosen) - beta * mean log sigma(log-odds ratio)
# -------------------------------------------------------------------------------------------------
def _orpo_apply(
    _input,
    weight,
    target,
    bias=None,
    ignore_index=-100,
    beta=0.1,
    compute_nll_loss=True,
    nll_target=None,
    compiled=True,
    chunk_size=1,
):
    owner = "LigerFusedLinearORPOLoss"
    check_options(
        owner,
        ignore_index=ignore_index,
        chunk_size=chunk_size,
        bools=dict(compute_nll_loss=compute_nll_loss, compiled=compiled),
    )
    check_registry_hparams(owner, "orpo", beta=beta)

    def preference(c, r, rc, rr, seq, nll):
        n = c.shape[0]
        lc, lr = seq.lengths[:n], seq.lengths[n : 2 * n]
        sc, sr = seq.summed[:n], seq.summed[n : 2 * n]
        # the registry's ORPO: mean(nll - beta * log sigma(log-odds ratio)) of summed log-probs / lengths
        loss, metrics = _orpo_loss_and_metrics(sc, sr, lc, lr, nll, beta)
        return loss, (beta * c, beta * r, metrics["log_odds_ratio"], metrics["log_odds_chosen"]), True

    return _paired(
        owner,
        _input,
        weight,
        target,
        bias,
        ignore_index=ignore_index,
        alpha=1.0,
        compute_nll_loss=compute_nll_loss,
        nll_target=nll_target,
        average_log_prob=True,
        preference=preference,
    )


def _orpo_loss_and_metrics(sc, sr, lc, lr, nll, beta):
    from ...losses import preference_loss_and_metrics

    return preference_loss_and_metrics(
        "orpo", sc, sr, chosen_lengths=lc, rejected_lengths=lr, chosen_nll=nll, beta=beta
    )


class LigerFusedLinearORPOFunction:
    """``apply(_input, weight, target, bias=None, ignore_index=-100, beta=0.1, compute_nll_loss=True,
    nll_target=None, compiled=True, chunk_size=1)`` -> ``(loss, aux)``."""

    apply = staticmethod(_orpo_apply)


class LigerFusedLinearORPOLoss(nn.Module):
    """Liger's ``LigerFusedLinearORPOLoss`` on expo_kernels: log-probs averaged over each row's tokens,
    ``NLL(chosen) - beta * mean log sigma(log-odds ratio)``; aux adds ``chosen_rewards``,
    ``rejected_rewards`` (``beta *`` averaged log-probs), ``log_odds_ratio`` and ``log_odds_chosen``."""

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        compute_nll_loss: bool = True,
        compiled: bool = True,
        chunk_size: int = 1,
    ):
        super().__init__()
        owner = type(self).__name__
        check_options(
            owner,
            ignore_index=ignore_index,
            chunk_size=chunk_size,
            bools=dict(compute_nll_loss=compute_nll_loss, compiled=compiled),
        )
        check_registry_hparams(owner, "orpo", beta=beta)
        self.ignore_index = ignore_index
        self.beta = beta
        self.compute_nll_loss = compute_nll_loss
        self.compiled = compiled
        self.chunk_size = chunk_size

    def forward(self, lin_weight, _input, target, bias=None, nll_target=None):
        return _orpo_apply(
            _input,
            lin_weight,
            target,
            bias,
            self.ignore_index,
            self.beta,
            self.compute_nll_loss,
            nll_target,
            self.compiled,
            self.chunk_size,
        )


# -------------------------------------------------------------------------------------------------
# CPO and SimPO: reference-free sigmoid losses (+ alpha * NLL)
# -------------------------------------------------------------------------------------------------
def _cpo_apply(
    _input,
    weight,
    target,
    bias=None,
    ignore_index=-100,
    beta=0.1,
    alpha=1.0,
    label_smoothing=0.0,
    compute_nll_loss=True,
    compiled=True,
    average_log_prob=False,
    chunk_size=1,
):
    owner = "LigerFusedLinearCPOLoss"
    check_options(
        owner,
        ignore_index=ignore_index,
        chunk_size=chunk_size,
        bools=dict(compute_nll_loss=compute_nll_loss, compiled=compiled, average_log_prob=average_log_prob),
    )
    hp = dict(beta=beta, label_smoothing=label_smoothing, cpo_alpha=0.0, cpo_loss_type="sigmoid")
    check_registry_hparams(owner, "cpo", **hp)

    def preference(c, r, rc, rr, seq, nll):
        # the registry's CPO with its own NLL weight at 0: the NLL is added with Liger's `alpha`
        loss = preference_loss("cpo", c, r, chosen_nll=torch.zeros((), device=c.device), **hp)
        return loss, (beta * c, beta * r), False

    return _paired(
        owner,
        _input,
        weight,
        target,
        bias,
        ignore_index=ignore_index,
        alpha=alpha,
        compute_nll_loss=compute_nll_loss,
        nll_target=None,
        average_log_prob=average_log_prob,
        preference=preference,
    )


class LigerFusedLinearCPOFunction:
    """``apply(_input, weight, target, bias=None, ignore_index=-100, beta=0.1, alpha=1.0,
    label_smoothing=0.0, compute_nll_loss=True, compiled=True, average_log_prob=False, chunk_size=1)``
    -> ``(loss, aux)``."""

    apply = staticmethod(_cpo_apply)


class LigerFusedLinearCPOLoss(nn.Module):
    """Liger's ``LigerFusedLinearCPOLoss`` on expo_kernels: ``-(1-eps) log sigma(beta (c - r)) - eps log
    sigma(-beta (c - r))`` (+ ``alpha`` times the chosen NLL); aux adds ``beta * c`` and ``beta * r``."""

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        alpha: float = 1.0,
        label_smoothing: float = 0.0,
        compute_nll_loss: bool = True,
        compiled: bool = True,
        average_log_prob: bool = False,
        chunk_size: int = 1,
    ):
        super().__init__()
        owner = type(self).__name__
        check_options(
            owner,
            ignore_index=ignore_index,
            chunk_size=chunk_size,
            bools=dict(compute_nll_loss=compute_nll_loss, compiled=compiled, average_log_prob=average_log_prob),
        )
        check_registry_hparams(owner, "cpo", beta=beta, label_smoothing=label_smoothing)
        self.ignore_index = ignore_index
        self.beta = beta
        self.alpha = alpha
        self.label_smoothing = label_smoothing
        self.compute_nll_loss = compute_nll_loss
        self.compiled = compiled
        self.average_log_prob = average_log_prob
        self.chunk_size = chunk_size

    def forward(self, lin_weight, _input, target, bias=None):
        return _cpo_apply(
            _input,
            lin_weight,
            target,
            bias,
            self.ignore_index,
            self.beta,
            self.alpha,
            self.label_smoothing,
            self.compute_nll_loss,
            self.compiled,
            self.average_log_prob,
            self.chunk_size,
        )


def _simpo_apply(
    _input,
    weight,
    target,
    bias=None,
    ignore_index=-100,
    beta=0.1,
    alpha=1.0,
    label_smoothing=0.0,
    compute_nll_loss=False,
    compiled=True,
    gamma=0.5,
    chunk_size=1,
):
    owner = "LigerFusedLinearSimPOLoss"
    check_options(
        owner,
        ignore_index=ignore_index,
        chunk_size=chunk_size,
        bools=dict(compute_nll_loss=compute_nll_loss, compiled=compiled),
    )
    hp = dict(beta=beta, gamma=gamma, label_smoothing=label_smoothing)
    check_registry_hparams(owner, "simpo", **hp)

    def preference(c, r, rc, rr, seq, nll):
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

    return _paired(
        owner,
        _input,
        weight,
        target,
        bias,
        ignore_index=ignore_index,
        alpha=alpha,
        compute_nll_loss=compute_nll_loss,
        nll_target=None,
        average_log_prob=True,
        preference=preference,
    )


class LigerFusedLinearSimPOFunction:
    """``apply(_input, weight, target, bias=None, ignore_index=-100, beta=0.1, alpha=1.0,
    label_smoothing=0.0, compute_nll_loss=False, compiled=True, gamma=0.5, chunk_size=1)`` -> ``(loss, aux)``."""

    apply = staticmethod(_simpo_apply)


class LigerFusedLinearSimPOLoss(nn.Module):
    """Liger's ``LigerFusedLinearSimPOLoss`` on expo_kernels: log-probs averaged over each row's tokens,
    ``-(1-eps) log sigma(beta (c - r) - gamma) - eps log sigma(-(beta (c - r) - gamma))`` (+ ``alpha``
    times the chosen NLL); aux adds ``beta * c`` and ``beta * r``."""

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        alpha: float = 1.0,
        label_smoothing: float = 0.0,
        compute_nll_loss: bool = True,
        compiled: bool = True,
        gamma: float = 0.5,
        chunk_size: int = 1,
    ):
        super().__init__()
        owner = type(self).__name__
        check_options(
            owner,
            ignore_index=ignore_index,
            chunk_size=chunk_size,
            bools=dict(compute_nll_loss=compute_nll_loss, compiled=compiled),
        )
        check_registry_hparams(owner, "simpo", beta=beta, gamma=gamma, label_smoothing=label_smoothing)
        self.ignore_index = ignore_index
        self.beta = beta
        self.alpha = alpha
        self.label_smoothing = label_smoothing
        self.compute_nll_loss = compute_nll_loss
        self.compiled = compiled
        self.gamma = gamma
        self.chunk_size = chunk_size

    def forward(self, lin_weight, _input, target, bias=None):
        return _simpo_apply(
            _input,
            lin_weight,
            target,
            bias,
            self.ignore_index,
            self.beta,
            self.alpha,
            self.label_smoothing,
            self.compute_nll_loss,
            self.compiled,
            self.gamma,
            self.chunk_size,
        )
