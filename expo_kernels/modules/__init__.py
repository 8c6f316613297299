"""``nn.Module`` front end: hidden states + LM head + labels -> preference loss, never forming logits.

:class:`FusedLinearPreferenceLoss` ties the layers together for one training step:

1. policy pass: :func:`~expo_kernels.linear_logprobs` over all rows (with the per-token statistics
   the metrics and WPO need), differentiable w.r.t. hidden, weight and bias;
2. reference pass: the same op under ``torch.no_grad`` (nothing saved for backward), or the
   caller's precomputed reference log-probs; for EXPO's ``kl_estimator="token"`` instead the fused
   two-head :func:`~expo_kernels.linear_token_kl` (policy and reference head over the same tokens);
3. per-token -> per-sequence (:func:`~expo_kernels.losses.aggregate_pair_logps`: sums, lengths,
   LD-DPO's ``ld_alpha``, the chosen NLL, WPO weights);
4. the registered loss (:func:`~expo_kernels.losses.preference_loss_and_metrics`).

Row layout is TRL's: a paired batch has ``R = 2B`` rows, the ``B`` chosen sequences first, then the
``B`` rejected ones in the same order. ``labels[r, t]`` is the token predicted from ``hidden[r, t]``
(already shifted) and ``ignore_index`` on prompt and padding positions, so only completion tokens
count. Unpaired losses (KTO) take one row per example and ``is_desirable``.

* :mod:`._base`: construction-time checks, the passes, token metrics, :class:`PreferenceLossOutput`;
* :mod:`.paired`: :class:`FusedLinearPreferenceLoss` (paired losses) and its presets;
* :mod:`.unpaired`: :class:`FusedLinearUnpairedLoss` (KTO-style) and :class:`FusedLinearKTOLoss`;
  ``FusedLinearPreferenceLoss("kto", ...)`` returns a :class:`FusedLinearUnpairedLoss`.
"""

from ._base import PreferenceLossOutput
from .paired import (
    FusedLinearDPOLoss,
    FusedLinearEXPOLoss,
    FusedLinearORPOLoss,
    FusedLinearPreferenceLoss,
    FusedLinearSimPOLoss,
)
from .ranking import FusedLinearRankingLoss, RankingLossOutput
from .unpaired import FusedLinearKTOLoss, FusedLinearUnpairedLoss

__all__ = [
    "PreferenceLossOutput",
    "FusedLinearPreferenceLoss",
    "FusedLinearDPOLoss",
    "FusedLinearEXPOLoss",
    "FusedLinearSimPOLoss",
    "FusedLinearORPOLoss",
    "FusedLinearKTOLoss",
    "FusedLinearUnpairedLoss",
    "FusedLinearRankingLoss",
    "RankingLossOutput",
]
