"""Paired preference losses (DPO and its family, EXPO, SimPO, ORPO, ...): :class:`FusedLinearPreferenceLoss`
and its presets.

A paired batch has ``R = 2B`` rows, the ``B`` chosen sequences first, then the ``B`` rejected ones in
the same order (TRL's layout).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..functional import TokenStats
from ..losses import aggregate_pair_logps
from ._base import FusedLinearLossBase, PreferenceLossOutput, is_unpaired_loss, masked_mean
from .unpaired import FusedLinearUnpairedLoss

__all__ = [
    "FusedLinearPreferenceLoss",
    "FusedLinearDPOLoss",
    "FusedLinearEXPOLoss",
    "FusedLinearSimPOLoss",
    "FusedLinearORPOLoss",
]


class FusedLinearPreferenceLoss(FusedLinearLossBase):
    """A registered preference loss computed from hidden states and the LM head.

    ``FusedLinearPreferenceLoss("kto", ...)`` (any unpaired loss) constructs and returns a
    :class:`~expo_kernels.modules.FusedLinearUnpairedLoss`, whose ``forward`` takes the unpaired inputs.

    Args:
        loss: a name of :data:`expo_kernels.LOSSES` (``"sigmoid"`` = DPO, ``"ipo"``, ``"expo"``,
            ``"simpo"``, ``"kto"``, ...) or a list of names mixed with ``loss_weights`` (MPO).
        ignore_index: label value of positions that do not count (prompt, padding).
        temperature, logit_scale, softcap: the logit transform of both heads (see
            :func:`~expo_kernels.linear_logprobs`); ``softcap`` is Gemma 2's ``final_logit_softcapping``.
        ld_alpha: LD-DPO's weight in [0, 1] of the tokens past the shorter completion of each pair.
        use_weighting: WPO pair weights from the policy's ``log sum_v p_v^2`` (detached).
        loss_weights: one weight per loss when ``loss`` is a list.
        compute_metrics: compute the metrics dict (costs the statistics of the policy pass); when
            False, ``metrics`` is empty.
        backend: kernel backend (``"triton"``, ``"native"``, ``"torch"``); default from the device.
        **hparams: the loss's hyperparameters (``beta``, ``label_smoothing``, ``lam``, ``kl_estimator``,
            ``gamma``, ...), validated here so a bad value fails at construction.
    """

    def __new__(cls, loss=None, *args, **kwargs):
        if cls is FusedLinearPreferenceLoss and is_unpaired_loss(loss):
            return FusedLinearUnpairedLoss(loss, *args, **kwargs)  # not an instance of cls: no second __init__
        return super().__new__(cls)

    def forward(
        self,
        lm_head_weight: Tensor,
        hidden: Tensor,
        labels: Tensor,
        *,
        bias: Tensor | None = None,
        ref_hidden: Tensor | None = None,
        ref_weight: Tensor | None = None,
        ref_bias: Tensor | None = None,
        ref_chosen_logps: Tensor | None = None,
        ref_rejected_logps: Tensor | None = None,
        offset: Tensor | float | None = None,
    ) -> PreferenceLossOutput:
        """One step's loss.

        Args:
            lm_head_weight: ``[V, H]`` policy LM head (trainable or frozen).
            hidden: ``[R, T, H]`` policy final hidden states (after the final norm), R = 2B rows,
                chosen then rejected.
            labels: ``[R, T]`` next-token ids aligned with ``hidden``; ``ignore_index`` off the completion.
            bias: optional ``[V]`` policy head bias.
            ref_hidden: ``[R, T, Hr]`` reference model's hidden states over the same tokens.
            ref_weight, ref_bias: reference head ``[V, Hr]`` / ``[V]``; when ``ref_weight`` is None the
                reference shares the policy head (weight and bias, detached): LoRA with a frozen head.
            ref_chosen_logps, ref_rejected_logps: ``[B]`` precomputed reference sequence log-probs,
                instead of ``ref_hidden``.
            offset: ODPO's per-pair offset, ``[B]`` or scalar.
        """
        passes = self._token_passes(
            lm_head_weight,
            hidden,
            labels,
            bias=bias,
            ref_hidden=ref_hidden,
            ref_weight=ref_weight,
            ref_bias=ref_bias,
            has_ref_numbers=ref_chosen_logps is not None or ref_rejected_logps is not None,
        )
        stats, mask = passes.stats, passes.mask
        pol = aggregate_pair_logps(
            passes.logp, mask, ld_alpha=self.ld_alpha, log_sum_p2=stats.log_sum_p2 if self.use_weighting else None
        )
        ref_c = ref_r = ref_rows = None
        if passes.ref_tok is not None:
            ref = aggregate_pair_logps(passes.ref_tok, mask, ld_alpha=self.ld_alpha)
            ref_c, ref_r = ref.chosen_logps, ref.rejected_logps
            ref_rows = torch.cat([ref_c, ref_r])
        elif ref_chosen_logps is not None or ref_rejected_logps is not None:
            ref_c, ref_r = ref_chosen_logps, ref_rejected_logps
        loss, metrics = self._loss_and_metrics(
            pol.chosen_logps,
            pol.rejected_logps,
            ref_c,
            ref_r,
            chosen_lengths=pol.chosen_lengths,
            rejected_lengths=pol.rejected_lengths,
            chosen_nll=pol.chosen_nll if any(s.needs_nll for s in self.specs) else None,
            weights=pol.weights,
            token_kl=passes.token_kl_rows,
            offset=offset,
            loss_weights=self.loss_weights,
        )
        if self.compute_metrics:
            metrics.update(self._token_metrics(stats, mask))
        return PreferenceLossOutput(
            loss, metrics, torch.cat([pol.chosen_logps, pol.rejected_logps]), ref_rows, passes.token_kl_rows
        )

    def _token_metrics(self, stats: TokenStats, mask: Tensor) -> dict[str, Tensor]:
        """``entropy``, plus the paired metrics: ``logits/chosen`` and ``logits/rejected`` (token means
        of the per-token mean logit), ``mean_token_accuracy`` (argmax hits on the chosen completions)."""
        out = super()._token_metrics(stats, mask)
        with torch.no_grad():
            mc, mr = mask.chunk(2, dim=0)
            lc, lr = stats.mean_logit.chunk(2, dim=0)
            out["logits/chosen"] = masked_mean(lc, mc)
            out["logits/rejected"] = masked_mean(lr, mr)
            out["mean_token_accuracy"] = masked_mean(stats.is_top1.chunk(2, dim=0)[0].to(lc.dtype), mc)
        return out


# -------------------------------------------------------------------------------------------------
# Presets: the same module with the loss fixed.
# -------------------------------------------------------------------------------------------------
class FusedLinearDPOLoss(FusedLinearPreferenceLoss):
    """DPO (``loss="sigmoid"``): ``-log sigma(beta m)``; takes ``beta``, ``label_smoothing``, ..."""

    preset_loss = "sigmoid"


class FusedLinearEXPOLoss(FusedLinearPreferenceLoss):
    """EXPO: ``softplus(-(c - r)) + lam * KL(pi_ref || pi_theta)``; takes ``lam``, ``kl_estimator``."""

    preset_loss = "expo"


class FusedLinearSimPOLoss(FusedLinearPreferenceLoss):
    """SimPO, reference-free: ``-log sigma(beta (c/|y_c| - r/|y_r|) - gamma)``; takes ``beta``, ``gamma``."""

    preset_loss = "simpo"


class FusedLinearORPOLoss(FusedLinearPreferenceLoss):
    """ORPO, reference-free: ``NLL(chosen) - beta log sigma(log-odds ratio)``; takes ``beta``."""

    preset_loss = "orpo"
