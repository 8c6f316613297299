"""ROPO's noise-tolerant loss, and the sample-selection step of its training loop.

ROPO (Liang, Chen, Qiu, Wang, Wu, Fu, Chen, Wu, Ye, "ROPO: Robust Preference Optimization for Large
Language Models", ICML 2025, arXiv 2404.04102). Per pair, with ``m = (c - c_ref) - (r - r_ref)``::

    l_dpo = -log sigma(beta m)                      (DPO)
    l_na  = sigma(-beta m)                          (the "noise-aware" term)
    l_ropo = 4 alpha / (1 + alpha)^2 * l_dpo + 4 alpha^2 / (1 + alpha)^2 * l_na

Why this shape: the gradient weight of ``l_dpo`` w.r.t. ``beta m`` is ``sigma(-beta m)``, largest for
pairs the model already ranks the other way (likely flipped labels); ``l_na``'s is
``sigma(beta m) sigma(-beta m)``, which vanishes there. The factor ``4 alpha / (1 + alpha)^2`` scales
the mixture so that its largest gradient weight is 1, as DPO's (for ``alpha >= 1``).

Source of the formula: the ICML 2025 version's ``l_ropo`` (Eq. (6) there, the number as cited by an
independent implementation; the paper body was not readable from here). The reviews on OpenReview
describe ``l_ropo`` as ``l_na`` and ``l_dpo`` combined with the trade-off ``alpha``; the two weights
above are those of the public implementation in the SymPO repository (Nishimori et al. 2025), which
agrees with a second, independent one. ``alpha = 14`` is the setting those implementations use.

The trainer-side loop (sample filtering, robustness-guided rejection sampling) is outside the loss:
:func:`ropo_sample_weights` is its weight step; the rest is documented there.

SPO (Stable Preference Optimization, Jian et al. 2025, arXiv 2507.07723) is *not* here: its penalty
formula could not be found in any readable source (only the abstracts), so none is implemented.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._common import BETA, LossTerms, PreferenceBatch, dpo_metrics
from .registry import HParam, as_real, checks_values, positive, register_loss

__all__ = ["ropo_sample_weights"]


@register_loss(
    "ropo",
    hparams=(
        BETA,
        HParam(
            "alpha",
            14.0,
            "ROPO's trade-off between the noise-aware term sigma(-beta m) and DPO's -log sigma(beta m) (> 0; "
            "14 in the public implementations)",
            positive,
        ),
    ),
    description="ROPO: 4a/(1+a)^2 (-log sigma(beta m)) + 4a^2/(1+a)^2 sigma(-beta m), a = alpha",
)
def _ropo(batch: PreferenceBatch, hp: dict) -> LossTerms:
    hc, hr = batch.logratios("ropo")
    z = hp["beta"] * (hc - hr)
    a = hp["alpha"]
    scale = 4.0 * a / (1.0 + a) ** 2  # largest gradient weight of the mixture = 1 (alpha >= 1)
    # -log sigma(z) as softplus-style logsigmoid: exact for large |z|; sigma(-z) needs no care
    terms = scale * (-F.logsigmoid(z) + a * torch.sigmoid(-z))
    return LossTerms(terms, dpo_metrics(batch, hp["beta"]))


def ropo_sample_weights(pair_losses: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """ROPO's weight step: keep the ``ceil(keep_ratio * N)`` pairs of lowest loss, drop the rest.

    ROPO trains on ``min_{theta, w} sum_i w_i l_i(theta)`` with ``w_i in {0, 1}`` and ``sum_i w_i`` fixed
    to the number of pairs to keep; for fixed ``theta`` the minimizing ``w`` keeps the pairs with the
    smallest losses. The trainer alternates: train a while with ``weights=w`` (the per-pair weights of
    :func:`~expo_kernels.preference_loss` / ``FusedLinearPreferenceLoss``), recompute ``pair_losses`` on
    the whole data set (``reduction="none"``, no gradient), call this again.

    Not provided, because we could not read them from the paper: how often the weights are refreshed,
    which loss ranks the pairs (ROPO's own or its noise-aware term), and the robustness-guided
    rejection sampling that regenerates responses for the prompts of dropped pairs (it needs
    generation and a trainer).

    Args:
        pair_losses: ``[N]`` float per-pair losses (detached; NaN is refused).
        keep_ratio: fraction of pairs kept, in (0, 1].

    Returns:
        ``[N]`` 0/1 weights in ``pair_losses.dtype``; ties are broken by position (stable).
    """
    v = as_real(keep_ratio)
    if v is None or not (0.0 < v <= 1.0):
        raise ValueError(f"`keep_ratio` must be a number in (0, 1]; got {keep_ratio!r}.")
    if not isinstance(pair_losses, torch.Tensor) or pair_losses.dim() != 1 or not pair_losses.is_floating_point():
        raise ValueError("`pair_losses` must be a 1-D floating-point tensor (one loss per pair).")
    if checks_values() and bool(torch.isnan(pair_losses).any()):
        raise ValueError("`pair_losses` contains NaN: a pair's rank is undefined.")
    n = pair_losses.shape[0]
    k = min(n, math.ceil(v * n - 1e-9))  # the tolerance keeps 0.3 * 10 at 3, not 4
    order = torch.argsort(pair_losses.detach(), stable=True)
    weights = torch.zeros_like(pair_losses)
    weights[order[:k]] = 1.0
    return weights
