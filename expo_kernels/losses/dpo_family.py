"""Reference-based pairwise losses: every ``loss_type`` of TRL 1.16's ``DPOTrainer`` plus ODPO and RPO.

Notation (per pair): ``c, r`` policy log-probs of chosen / rejected (summed over completion tokens),
``c_ref, r_ref`` the reference's, ``hc = c - c_ref``, ``hr = r - r_ref``. For the losses TRL allows
with an f-divergence, ``sc = f(hc)``, ``sr = f(hr)`` (identity for the default reverse KL) and
``d = sc - sr``. Formulas follow ``trl/trainer/dpo_trainer.py`` (``DPOTrainer._compute_loss``) of
TRL 1.16, with the exceptions noted on ``sigmoid`` (cDPO label smoothing) and ``bco_pair`` (optional
baseline ``delta``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._common import (
    BETA,
    F_ALPHA,
    F_DIV,
    LossTerms,
    PreferenceBatch,
    dpo_metrics,
    label_smoothing,
    logp_metrics,
    scores,
)
from .registry import HParam, positive, real, register_loss, unit_interval

_AOT_COUPLED = "it sorts the batch, so a position's loss is not tied to one pair"

_FDIV = (F_DIV, F_ALPHA)


def _exo_eps_check(value):
    inner = unit_interval(0.0, 0.5, low_open=True)(value)
    if inner is not None:
        return inner + " (EXO's eps: 0 makes log(eps) infinite; the EXO paper recommends 1e-3)"
    return None


def _smoothed_logsigmoid(z: torch.Tensor, eps: float) -> torch.Tensor:
    """``-(1-eps) log sigma(z) - eps log sigma(-z)`` (binary cross-entropy with soft label 1-eps)."""
    out = -F.logsigmoid(z)
    if eps != 0.0:
        out = out * (1 - eps) - eps * F.logsigmoid(-z)
    return out


@register_loss(
    "sigmoid",
    hparams=(
        BETA,
        label_smoothing(
            doc="cDPO label smoothing eps in [0, 0.5): the preference label is "
            "trusted with probability 1-eps (TRL 1.16's sigmoid ignores it)"
        ),
        *_FDIV,
    ),
    description="DPO: -log sigma(beta m); with label_smoothing eps, cDPO's -(1-eps)log sigma(beta m) - eps log sigma(-beta m)",
)
def _sigmoid(batch: PreferenceBatch, hp: dict, loss: str = "sigmoid") -> LossTerms:
    _, _, sc, sr = scores(batch, loss, hp)
    # cDPO (Mitchell 2023) as TRL <= 0.x implemented it; TRL 1.16 dropped label smoothing from
    # 'sigmoid' (eps = 0 here is exactly TRL 1.16).
    terms = _smoothed_logsigmoid(hp["beta"] * (sc - sr), hp["label_smoothing"])
    return LossTerms(terms, dpo_metrics(batch, hp["beta"]))


@register_loss(
    "hinge",
    hparams=(BETA, *_FDIV),
    description="SLiC hinge: max(0, 1 - beta m)",
)
def _hinge(batch: PreferenceBatch, hp: dict) -> LossTerms:
    _, _, sc, sr = scores(batch, "hinge", hp)
    return LossTerms(torch.relu(1 - hp["beta"] * (sc - sr)), dpo_metrics(batch, hp["beta"]))


@register_loss(
    "ipo",
    hparams=(BETA, *_FDIV),
    needs_lengths=True,
    description="IPO: (m' - 1/(2 beta))^2 with m' built from length-averaged log-ratios (as TRL)",
)
def _ipo(batch: PreferenceBatch, hp: dict) -> LossTerms:
    _, _, sc, sr = scores(batch, "ipo", hp)
    lc, lr = batch.lengths("ipo")
    # TRL divides the (f-mapped) summed log-ratios by the completion length (clamped to >= 1).
    delta = sc / lc - sr / lr
    return LossTerms((delta - 1 / (2 * hp["beta"])) ** 2, dpo_metrics(batch, hp["beta"]))


@register_loss(
    "exo_pair",
    hparams=(
        BETA,
        HParam(
            "label_smoothing",
            1e-3,
            "EXO's eps, the reward distribution's mass on the rejected response; in (0, 0.5) "
            "(EXO paper recommends 1e-3; TRL requires > 0)",
            _exo_eps_check,
        ),
        *_FDIV,
    ),
    description="EXO-pref (K=2): KL(softmax of beta*log-ratios || [1-eps, eps])",
)
def _exo_pair(batch: PreferenceBatch, hp: dict) -> LossTerms:
    eps = hp["label_smoothing"]
    _, _, sc, sr = scores(batch, "exo_pair", hp)
    z = hp["beta"] * (sc - sr)
    log_q, log_1mq = F.logsigmoid(z), F.logsigmoid(-z)
    terms = torch.sigmoid(z) * (log_q - math.log1p(-eps)) + torch.sigmoid(-z) * (log_1mq - math.log(eps))
    return LossTerms(terms, dpo_metrics(batch, hp["beta"]))


@register_loss(
    "nca_pair",
    hparams=(BETA,),
    description="NCA: -log sigma(beta hc) - 0.5 log sigma(-beta hc) - 0.5 log sigma(-beta hr)",
)
def _nca_pair(batch: PreferenceBatch, hp: dict) -> LossTerms:
    hc, hr = batch.logratios("nca_pair")
    b = hp["beta"]
    terms = -F.logsigmoid(b * hc) - 0.5 * F.logsigmoid(-b * hc) - 0.5 * F.logsigmoid(-b * hr)
    return LossTerms(terms, dpo_metrics(batch, b))


@register_loss(
    "robust",
    hparams=(BETA, label_smoothing(doc="probability eps in [0, 0.5) that a preference label is flipped"), *_FDIV),
    description="Robust DPO: [-(1-eps) log sigma(beta m) + eps log sigma(-beta m)] / (1 - 2 eps)",
)
def _robust(batch: PreferenceBatch, hp: dict) -> LossTerms:
    _, _, sc, sr = scores(batch, "robust", hp)
    z = hp["beta"] * (sc - sr)
    eps = hp["label_smoothing"]
    terms = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    return LossTerms(terms, dpo_metrics(batch, hp["beta"]))


@register_loss(
    "bco_pair",
    hparams=(
        BETA,
        HParam(
            "delta",
            0.0,
            "reward baseline delta (BCO's running mean of beta*log-ratios, maintained by the caller); TRL 1.16 "
            "uses none (0)",
            real,
        ),
    ),
    description="BCO (paired): -log sigma(beta hc - delta) - log sigma(-(beta hr - delta))",
)
def _bco_pair(batch: PreferenceBatch, hp: dict) -> LossTerms:
    hc, hr = batch.logratios("bco_pair")
    b, delta = hp["beta"], hp["delta"]
    terms = -F.logsigmoid(b * hc - delta) - F.logsigmoid(-(b * hr - delta))
    return LossTerms(terms, dpo_metrics(batch, b))


@register_loss(
    "sppo_hard",
    hparams=(BETA,),
    description="SPPO (hard labels): (hc - 1/(2 beta))^2 + (hr + 1/(2 beta))^2",
)
def _sppo_hard(batch: PreferenceBatch, hp: dict) -> LossTerms:
    hc, hr = batch.logratios("sppo_hard")
    half = 0.5 / hp["beta"]
    return LossTerms((hc - half) ** 2 + (hr + half) ** 2, dpo_metrics(batch, hp["beta"]))


@register_loss(
    "aot",
    hparams=(BETA, label_smoothing()),
    batch_coupled=True,
    description="AOT (paired): sort c-r and c_ref-r_ref over the batch, then smoothed -log sigma(beta * difference)",
)
def _aot(batch: PreferenceBatch, hp: dict) -> LossTerms:
    ref_c, ref_r = batch.require_reference("aot")
    c, r = batch.pair()
    pol, _ = torch.sort(c - r, dim=0)
    ref, _ = torch.sort(ref_c - ref_r, dim=0)
    terms = _smoothed_logsigmoid(hp["beta"] * (pol - ref), hp["label_smoothing"])
    return LossTerms(terms, dpo_metrics(batch, hp["beta"]), coupled=_AOT_COUPLED)


@register_loss(
    "aot_unpaired",
    hparams=(BETA, label_smoothing()),
    batch_coupled=True,
    description="AOT (unpaired): sort hc and hr separately over the batch, then smoothed -log sigma(beta * difference)",
)
def _aot_unpaired(batch: PreferenceBatch, hp: dict) -> LossTerms:
    hc, hr = batch.logratios("aot_unpaired")
    hc_s, _ = torch.sort(hc, dim=0)
    hr_s, _ = torch.sort(hr, dim=0)
    terms = _smoothed_logsigmoid(hp["beta"] * (hc_s - hr_s), hp["label_smoothing"])
    return LossTerms(terms, dpo_metrics(batch, hp["beta"]), coupled=_AOT_COUPLED)


@register_loss(
    "apo_zero",
    hparams=(BETA,),
    description="APO-zero: (1 - sigma(beta hc)) + sigma(beta hr)",
)
def _apo_zero(batch: PreferenceBatch, hp: dict) -> LossTerms:
    hc, hr = batch.logratios("apo_zero")
    b = hp["beta"]
    # sigma(-x) rather than 1 - sigma(x): the same value, without rounding to 0 (and a zero gradient) for large x
    return LossTerms(torch.sigmoid(-b * hc) + torch.sigmoid(b * hr), dpo_metrics(batch, b))


@register_loss(
    "apo_down",
    hparams=(BETA,),
    description="APO-down: sigma(beta hc) + (1 - sigma(beta (hc - hr)))",
)
def _apo_down(batch: PreferenceBatch, hp: dict) -> LossTerms:
    hc, hr = batch.logratios("apo_down")
    b = hp["beta"]
    return LossTerms(torch.sigmoid(b * hc) + torch.sigmoid(-b * (hc - hr)), dpo_metrics(batch, b))


@register_loss(
    "discopop",
    hparams=(
        BETA,
        HParam("discopop_tau", 0.05, "temperature of DiscoPOP's log-ratio modulation (paper default 0.05)", positive),
        *_FDIV,
    ),
    description="DiscoPOP: z = beta m, w = sigma(z/tau): (1-w)(-log sigma z) + w exp(-z)",
)
def _discopop(batch: PreferenceBatch, hp: dict) -> LossTerms:
    _, _, sc, sr = scores(batch, "discopop", hp)
    z = hp["beta"] * (sc - sr)
    zt = z / hp["discopop_tau"]
    # Written so nothing overflows: the plain w * exp(-z) is 0 * inf = NaN once exp(-z) overflows (z < -88
    # in float32) although w is then far smaller; exp(log w - z) is the same number without the inf.
    # 1 - w = sigma(-z/tau) keeps the small values that 1 - sigma(z/tau) rounds to 0.
    terms = -F.logsigmoid(z) * torch.sigmoid(-zt) + torch.exp(F.logsigmoid(zt) - z)
    return LossTerms(terms, dpo_metrics(batch, hp["beta"]))


@register_loss(
    "sft",
    # beta only scales the logged rewards; the f-divergence options are accepted (and unused) as in TRL
    hparams=(BETA, *_FDIV),
    reference="optional",  # not in the loss; when given, it feeds the logged rewards (as in TRL)
    needs_nll=True,
    description="SFT term: token-mean NLL of the chosen completions (TRL's 'sft' loss type; RPO's NLL term)",
)
def _sft(batch: PreferenceBatch, hp: dict, loss: str = "sft") -> LossTerms:
    nll, coupled = batch.nll(loss)
    n = batch.pair()[0].shape[0]
    # TRL expands the scalar batch NLL to one entry per pair; only its mean matters.
    terms = nll.expand(n) if nll.dim() == 0 else nll

    def metrics():
        out = dpo_metrics(batch, hp.get("beta", 0.1))() if batch.has_reference else logp_metrics(batch)
        with torch.no_grad():
            out["nll_loss"] = nll.detach().mean()
        return out

    return LossTerms(terms, metrics, coupled=coupled)


@register_loss(
    "sigmoid_norm",
    hparams=(BETA, *_FDIV),
    needs_lengths=True,
    description="DPO on length-averaged log-ratios: -log sigma(beta (sc/|y_c| - sr/|y_r|))",
)
def _sigmoid_norm(batch: PreferenceBatch, hp: dict) -> LossTerms:
    _, _, sc, sr = scores(batch, "sigmoid_norm", hp)
    lc, lr = batch.lengths("sigmoid_norm")
    return LossTerms(-F.logsigmoid(hp["beta"] * (sc / lc - sr / lr)), dpo_metrics(batch, hp["beta"]))


@register_loss(
    "rpo",
    hparams=(
        BETA,
        HParam("rpo_alpha", 1.0, "weight of the chosen NLL term (RPO paper: 1.0)", positive),
        label_smoothing(doc="cDPO label smoothing of the DPO term, in [0, 0.5)"),
        *_FDIV,
    ),
    needs_nll=True,
    description="RPO: DPO sigmoid + rpo_alpha * token-mean NLL of the chosen (TRL 1.16: loss_type=['sigmoid','sft'])",
)
def _rpo(batch: PreferenceBatch, hp: dict) -> LossTerms:
    dpo = _sigmoid(batch, hp, "rpo")
    sft = _sft(batch, hp, "rpo")
    terms = dpo.terms + hp["rpo_alpha"] * sft.terms

    def metrics():
        out = dpo.metrics()
        out["nll_loss"] = sft.metrics()["nll_loss"]
        return out

    return LossTerms(terms, metrics, coupled=sft.coupled)


@register_loss(
    "odpo",
    hparams=(BETA, HParam("alpha", 1.0, "scale of the per-pair offset (ODPO paper default 1.0)", real)),
    description="ODPO: -log sigma(beta m - alpha * offset), offset per pair (pass `offset=`)",
)
def _odpo(batch: PreferenceBatch, hp: dict) -> LossTerms:
    # Amini et al. 2024, "Direct Preference Optimization with an Offset": the chosen's implicit reward
    # must beat the rejected's by an offset (e.g. a scaled log reward gap) given per pair.
    if batch.offset is None:
        raise ValueError(
            "Loss 'odpo' needs `offset`: the per-pair margin (shape [B] or a scalar) the chosen's reward must "
            "exceed the rejected's by, e.g. log of the reward-model score difference."
        )
    hc, hr = batch.logratios("odpo")
    terms = -F.logsigmoid(hp["beta"] * (hc - hr) - hp["alpha"] * batch.offset)
    return LossTerms(terms, dpo_metrics(batch, hp["beta"]))
