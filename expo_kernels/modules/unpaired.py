"""Unpaired (KTO-style) preference losses: :class:`FusedLinearUnpairedLoss` and the KTO preset.

One row per example, labelled by ``is_desirable``; KTO's KL baseline comes from mismatched
(prompt, completion) rows of the same batch or is given as a number.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..distributed.context_parallel import sum_across_ranks
from ..losses import sequence_logps
from ._base import FusedLinearLossBase, PreferenceLossOutput, TokenPasses, require_rows

__all__ = ["FusedLinearUnpairedLoss", "FusedLinearKTOLoss"]


class FusedLinearUnpairedLoss(FusedLinearLossBase):
    """An unpaired registered loss (``"kto"``, ``"apo_zero_unpaired"``) computed from hidden states and
    the LM head; the constructor is :class:`~expo_kernels.FusedLinearPreferenceLoss`'s (``ld_alpha``
    and ``use_weighting`` are refused), ``loss`` defaults to ``"kto"``.
    ``FusedLinearPreferenceLoss("kto", ...)`` returns one of these."""

    default_loss = "kto"
    paired = False
    precomputed_ref_inputs = "`ref_logps`"
    gemm_inputs = (*FusedLinearLossBase.gemm_inputs, "kl_hidden", "ref_kl_hidden")

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
        ref_logps: Tensor | None = None,
        is_desirable: Tensor | None = None,
        kl_hidden: Tensor | None = None,
        kl_labels: Tensor | None = None,
        ref_kl_hidden: Tensor | None = None,
        kl: Tensor | float | None = None,
    ) -> PreferenceLossOutput:
        """One step's loss.

        Args:
            lm_head_weight: ``[V, H]`` policy LM head (trainable or frozen).
            hidden: ``[R, T, H]`` policy final hidden states (after the final norm), one row per example.
            labels: ``[R, T]`` next-token ids aligned with ``hidden``; ``ignore_index`` off the completion.
            bias: optional ``[V]`` policy head bias.
            ref_hidden: ``[R, T, Hr]`` reference model's hidden states over the same tokens.
            ref_weight, ref_bias: reference head ``[V, Hr]`` / ``[V]``; when ``ref_weight`` is None the
                reference shares the policy head (weight and bias, detached): LoRA with a frozen head.
            ref_logps: ``[R]`` precomputed reference sequence log-probs, instead of ``ref_hidden``.
            is_desirable: ``[R]`` bool, KTO's labels.
            kl_hidden, kl_labels, ref_kl_hidden: KTO's mismatched (prompt, completion) rows
                ``[K, T', H]`` / ``[K, T']`` / ``[K, T', Hr]`` for its detached KL baseline (forward only);
                or ``kl``: a precomputed baseline (0 turns it off).
        """
        self._check_sequence_shards(hidden, labels)  # context parallelism: the shards line up on every rank
        passes = self._token_passes(
            lm_head_weight,
            hidden,
            labels,
            bias=bias,
            ref_hidden=ref_hidden,
            ref_weight=ref_weight,
            ref_bias=ref_bias,
            has_ref_numbers=ref_logps is not None,
        )
        rows = labels.shape[0]
        if is_desirable is None:
            raise ValueError(f"Loss {self.loss!r} needs `is_desirable`: [R] bool, True for desirable examples.")
        is_desirable = require_rows("is_desirable", torch.as_tensor(is_desirable, device=labels.device), rows, 1)
        pol, _ = sequence_logps(passes.logp, passes.mask)
        if passes.ref_tok is not None:
            ref, _ = sequence_logps(passes.ref_tok, passes.mask)
        else:
            ref = require_rows("ref_logps", ref_logps, rows, 1)
        kl_logps = ref_kl_logps = None
        if kl_hidden is not None:
            if kl is not None:
                raise ValueError("Pass either `kl` or `kl_hidden`/`kl_labels`, not both.")
            kl_logps, ref_kl_logps = self._kl_rows_logps(
                passes, lm_head_weight, bias, kl_hidden=kl_hidden, kl_labels=kl_labels, ref_kl_hidden=ref_kl_hidden
            )
        if self.sequence_group is not None:
            # context parallelism: the rank's partial sums summed over the group (identity backward)
            own_ref = passes.ref_tok is not None
            pol_sum, ref_sum, kl_logps, ref_kl_logps = sum_across_ranks(
                [pol, ref if own_ref else None, kl_logps, ref_kl_logps], self.sequence_group
            )
            assert pol_sum is not None
            pol = pol_sum
            if own_ref:
                assert ref_sum is not None
                ref = ref_sum
        loss, metrics = self._loss_and_metrics(
            policy_logps=pol,
            ref_logps=ref,
            is_desirable=is_desirable,
            kl_logps=kl_logps,
            ref_kl_logps=ref_kl_logps,
            kl=kl,
        )
        # the sums are float64 (losses.aggregate: exact at any length) and stay so; the loss and metrics
        # keep the per-token dtype, as in the paired module
        dt = passes.logp.dtype
        loss, metrics = loss.to(dt), {k: v.to(dt) if v.is_floating_point() else v for k, v in metrics.items()}
        if self.compute_metrics:
            assert passes.stats is not None  # the policy pass returns its statistics with compute_metrics
            metrics.update(self._token_metrics(passes.stats, passes.mask))
        return PreferenceLossOutput(loss, metrics, pol, ref)

    def _kl_rows_logps(
        self,
        passes: TokenPasses,
        weight: Tensor,
        bias: Tensor | None,
        *,
        kl_hidden: Tensor,
        kl_labels: Tensor | None,
        ref_kl_hidden: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """``[K]`` policy and reference sequence log-probs of the mismatched rows, forward only, through
        the call's heads (the policy's for the reference when no reference head was given)."""
        if kl_labels is None:
            raise ValueError("`kl_hidden` needs `kl_labels` ([K, T'], the mismatched completions' labels).")
        if ref_kl_hidden is None:
            raise ValueError("`kl_hidden` needs `ref_kl_hidden`: the reference model's hidden states of the same rows.")
        if passes.ref_weight is not None:
            ref_weight, ref_bias = passes.ref_weight, passes.ref_bias
        else:
            ref_weight, ref_bias = weight, bias
        kmask = kl_labels != self.ignore_index
        with torch.no_grad():  # z0 is a detached baseline: no graph for the mismatched rows
            kl_tok = self._logps(
                kl_hidden.detach(), weight.detach(), None if bias is None else bias.detach(), kl_labels, False
            )
            ref_kl_tok = self._reference_logps(ref_kl_hidden, ref_weight, ref_bias, kl_labels)
        return sequence_logps(kl_tok, kmask)[0], sequence_logps(ref_kl_tok, kmask)[0]


class FusedLinearKTOLoss(FusedLinearUnpairedLoss):
    """KTO, unpaired: one row per example with ``is_desirable``; takes ``beta`` and the class weights."""

    preset_loss = "kto"
