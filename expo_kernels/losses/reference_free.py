"""Reference-free pairwise losses: CPO (and its SimPO / AlphaPO special cases) and ORPO.

Formulas follow TRL 1.16's experimental trainers, ``trl/experimental/cpo/cpo_trainer.py``
(``CPOTrainer.cpo_loss`` and ``get_batch_loss_metrics``) and ``trl/experimental/orpo/orpo_trainer.py``
(``ORPOTrainer.odds_ratio_loss``). Inputs are always *summed* completion log-probs; the losses that
TRL feeds with per-token averages (CPO's ipo/simpo variants, ORPO) divide by ``chosen_lengths`` /
``rejected_lengths`` here.

The NLL term (CPO's ``cpo_alpha``, ORPO's first term) defaults to the token mean over all chosen
completion tokens of the batch, ``-sum(c) / sum(|y_c|)``, which is what TRL's CPO computes with
``nn.CrossEntropyLoss`` on the chosen completion labels. TRL's ORPO instead averages over prompt *and*
completion tokens of the chosen sequences; pass that number as ``chosen_nll`` to reproduce it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._common import BETA, LossTerms, PreferenceBatch, exp_limit, label_smoothing, reward_metrics
from .registry import HParam, non_negative, one_of, positive, real, register_loss

_GAMMA = HParam("gamma", 0.5, "SimPO target reward margin (TRL's `simpo_gamma`, default 0.5)", real)
_ALPHAPO = HParam(
    "alpha",
    0.0,
    "AlphaPO reward shape: reward (1 - p^(-alpha)) / alpha of the (length-averaged) probability p; "
    "0 = log-prob reward (TRL's CPOConfig.alpha)",
    real,
)
_CPO_VARIANTS = ("sigmoid", "hinge", "ipo", "simpo")


def _cpo_core(batch: PreferenceBatch, hp: dict, loss: str, variant: str, cpo_alpha: float, alpha: float) -> LossTerms:
    beta = hp["beta"]
    eps = hp["label_smoothing"]
    if variant in ("hinge", "ipo") and eps != 0.0:
        raise ValueError(f"Loss {loss!r}: `label_smoothing` is not used by the {variant!r} variant; set it to 0.")
    # TRL averages the log-probs over completion tokens for the ipo and simpo variants.
    if variant in ("ipo", "simpo"):
        pc, pr = batch.averages(loss)
    else:
        pc, pr = batch.pair()
    if alpha != 0.0:
        # AlphaPO (Gupta et al. 2025, arXiv 2501.03884) as TRL's CPOTrainer implements it:
        # r = (1 - p^(-alpha)) / alpha with p = exp(logp). Written as -expm1(-alpha*logp)/alpha, the same
        # number without forming p (which underflows for long sequences). The exponent is clamped where
        # exp overflows (alpha > 0 and summed log-probs below -88/alpha in float32): two rewards of -inf
        # would make a NaN margin where float64 gives a finite one.
        lim = exp_limit(pc.dtype)
        rc = -torch.expm1(torch.clamp(-alpha * pc, max=lim)) / alpha
        rr = -torch.expm1(torch.clamp(-alpha * pr, max=lim)) / alpha
    else:
        rc, rr = pc, pr
    logits = rc - rr
    if variant == "simpo":
        logits = logits - hp["gamma"] / beta
    if variant in ("sigmoid", "simpo"):
        terms = -F.logsigmoid(beta * logits)
        if eps != 0.0:
            terms = terms * (1 - eps) - eps * F.logsigmoid(-beta * logits)
    elif variant == "hinge":
        terms = torch.relu(1 - beta * logits)
    else:  # ipo
        terms = (logits - 1 / (2 * beta)) ** 2

    coupled = None
    nll = None
    if cpo_alpha != 0.0:
        nll, coupled = batch.nll(loss)
        terms = terms + cpo_alpha * nll

    def metrics():
        out = reward_metrics(beta * rc, beta * rr, pc, pr)
        with torch.no_grad():
            out["nll_loss"] = (
                nll.detach().mean() if nll is not None else torch.zeros((), dtype=pc.dtype, device=pc.device)
            )
        return out

    return LossTerms(terms, metrics, coupled=coupled)


@register_loss(
    "cpo",
    hparams=(
        BETA,
        label_smoothing(doc="conservative label smoothing of the sigmoid/simpo variants, in [0, 0.5)"),
        HParam("cpo_alpha", 1.0, "weight of the chosen NLL (behaviour-cloning) term (TRL default 1.0)", non_negative),
        HParam(
            "cpo_loss_type",
            "sigmoid",
            "preference term: sigmoid (CPO), hinge, ipo or simpo (TRL's loss_type)",
            one_of(*_CPO_VARIANTS),
        ),
        _GAMMA,
        _ALPHAPO,
    ),
    reference="none",
    needs_nll=True,
    description="CPO: -log sigma(beta (c - r)) + cpo_alpha * NLL(chosen), no reference",
    aliases={"simpo_gamma": "gamma"},
)
def _cpo(batch: PreferenceBatch, hp: dict) -> LossTerms:
    return _cpo_core(batch, hp, "cpo", hp["cpo_loss_type"], hp["cpo_alpha"], hp["alpha"])


@register_loss(
    "simpo",
    hparams=(BETA, _GAMMA, label_smoothing()),
    reference="none",
    needs_lengths=True,
    description="SimPO: -log sigma(beta (c/|y_c| - r/|y_r|) - gamma), no reference",
    aliases={"simpo_gamma": "gamma"},
)
def _simpo(batch: PreferenceBatch, hp: dict) -> LossTerms:
    # TRL: CPOTrainer with loss_type="simpo", cpo_alpha=0.
    return _cpo_core(batch, hp, "simpo", "simpo", 0.0, 0.0)


@register_loss(
    "alphapo",
    hparams=(BETA, _GAMMA, _ALPHAPO, label_smoothing()),
    reference="none",
    needs_lengths=True,
    description="AlphaPO: SimPO with reward (1 - exp(-alpha * avg_logp)) / alpha",
    aliases={"simpo_gamma": "gamma"},
)
def _alphapo(batch: PreferenceBatch, hp: dict) -> LossTerms:
    # TRL: CPOConfig(loss_type="alphapo") = loss_type "simpo", cpo_alpha 0, with `alpha` shaping the reward.
    return _cpo_core(batch, hp, "alphapo", "simpo", 0.0, hp["alpha"])


_LN_HALF = -math.log(2.0)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, switching formula at ``-log 2`` for accuracy.

    torch.where back-propagates 0 * (the unused branch's gradient), which is NaN where that branch is
    infinite: log1p(-exp(x)) at x -> 0, so its input is clamped to ``x <= -log 2``, where it is used
    (log(-expm1(x)) is finite, with a finite gradient, for every x < 0, -inf included). ``x`` is also
    kept below ``-tiny``: at ``x = 0`` (a probability of exactly 1, which float32 log-probs do reach)
    the value would be -inf; it saturates at ``log(tiny)`` instead (about -87 in float32) with a zero
    gradient there.
    """
    tiny = torch.finfo(x.dtype).tiny
    lo = torch.clamp(x, max=_LN_HALF)
    hi = torch.clamp(x, max=-tiny)
    return torch.where(x < _LN_HALF, torch.log1p(-torch.exp(lo)), torch.log(-torch.expm1(hi)))


@register_loss(
    "orpo",
    hparams=(HParam("beta", 0.1, "lambda, weight of the odds-ratio term (TRL's ORPO `beta`, default 0.1)", positive),),
    reference="none",
    needs_lengths=True,
    needs_nll=True,
    description="ORPO: NLL(chosen) - beta * log sigma(logodds(c/|y_c|) - logodds(r/|y_r|)), no reference",
)
def _orpo(batch: PreferenceBatch, hp: dict) -> LossTerms:
    beta = hp["beta"]
    pc, pr = batch.averages("orpo")
    log_odds = (pc - pr) - (log1mexp(pc) - log1mexp(pr))
    ratio = F.logsigmoid(log_odds)
    nll, coupled = batch.nll("orpo")
    terms = nll - beta * ratio

    def metrics():
        out = reward_metrics(beta * pc, beta * pr, pc, pr)
        with torch.no_grad():
            out["nll_loss"] = nll.detach().mean()
            out["log_odds_ratio"] = ratio.detach().mean()
            out["log_odds_chosen"] = log_odds.detach().mean()
        return out

    return LossTerms(terms, metrics, coupled=coupled)
