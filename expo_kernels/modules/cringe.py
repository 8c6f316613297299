"""``FusedLinearCRINGELoss``: binary and pairwise CRINGE from hidden states and the LM head.

Rows are TRL's paired layout (``R = 2B``: the B chosen sequences, then their B rejected ones). Two
passes of the fused op, never ``[tokens, vocab]`` logits:

* chosen rows: ``linear_logprobs`` (the NLL term);
* rejected rows: ``linear_logprobs(..., topk=k + 1, return_stats=True)``: the log-probs (the pairwise
  margin) and, from the same pass, the top k + 1 logits and ids the positives are sampled from
  (``TokenStats.topk_values`` is differentiable: the sparse update of the selected head rows);
  the negative token's logit ``s-`` is re-evaluated from its head row (``ops.common.topk_logits``,
  ``O(N H)``).

The formulas, the sampling and their sources: :mod:`expo_kernels.losses.cringe`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._validation import check_backend_name, check_bool, check_ignore_index, check_linear_head, check_positive_finite
from ..functional import head_autocast, linear_logprobs
from ..losses.aggregate import sum_dtype
from ..losses.cringe import check_real, cringe_loss
from ..ops.common import LogitTransform, topk_logits
from ._base import LogitTransformOptions, PreferenceLossOutput, masked_mean

__all__ = ["FusedLinearCRINGELoss"]


class FusedLinearCRINGELoss(nn.Module):
    """CRINGE (``pairwise=False``, Adolphs et al. 2022) or pairwise CRINGE (``pairwise=True``, Xu et al.
    2023) of a paired batch.

    Args:
        k: positives are sampled from the model's top ``k`` predictions with the negative token
            excluded (the op computes the top ``k + 1``; ``1 <= k <= 31``).
        alpha: weight of the CRINGE term.
        pairwise: gate each pair's CRINGE term by ``sigmoid((margin - M) / tau)``, ``M`` the chosen minus
            the rejected sequence log-likelihood (see the caution in :mod:`expo_kernels.losses.cringe`).
        margin, tau: the gate's ``b`` and ``tau``.
        ignore_index, temperature, logit_scale, softcap, backend: as :func:`~expo_kernels.linear_logprobs`.
    """

    def __init__(
        self,
        k: int = 5,
        alpha: float = 1.0,
        *,
        pairwise: bool = False,
        margin: float = 0.0,
        tau: float = 1.0,
        ignore_index: int = -100,
        temperature: float = 1.0,
        logit_scale: float | None = None,
        softcap: float | None = None,
        backend: str | None = None,
    ):
        super().__init__()
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 31:
            raise ValueError(f"k must be an int in [1, 31] (the op's topk = k + 1 <= 32), got {k!r}")
        check_bool("pairwise", pairwise)
        check_ignore_index(ignore_index)
        check_positive_finite("temperature", temperature)
        check_positive_finite("logit_scale", logit_scale, allow_none=True)
        check_positive_finite("softcap", softcap, allow_none=True)
        check_backend_name(backend)
        self.k, self.pairwise, self.ignore_index, self.backend = k, pairwise, ignore_index, backend
        self.alpha = check_real("alpha", alpha)
        self.margin = check_real("margin", margin)
        self.tau = check_real("tau", tau, positive=True)
        self.transform = LogitTransformOptions(temperature=temperature, logit_scale=logit_scale, softcap=softcap)

    def forward(
        self,
        lm_head_weight: Tensor,
        hidden: Tensor,
        labels: Tensor,
        *,
        bias: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> PreferenceLossOutput:
        """hidden ``[2B, T, H]`` (chosen rows, then rejected), labels ``[2B, T]`` (``ignore_index`` off the
        completion), weight ``[V, H]``, bias ``[V] | None``; ``generator`` drives the positives' sampling.
        Returns the loss (differentiable w.r.t. hidden, weight, bias), metrics and ``[2B]`` sequence log-probs.
        Inside ``torch.autocast`` the head's operands are cast to the region's dtype (docs/design.md,
        "Mixed precision").
        """
        ac = head_autocast(hidden)
        with ac.region():
            return self._forward(ac.cast(lm_head_weight), ac.cast(hidden), labels, ac.cast(bias), generator)

    def _forward(
        self,
        lm_head_weight: Tensor,
        hidden: Tensor,
        labels: Tensor,
        bias: Tensor | None,
        generator: torch.Generator | None,
    ) -> PreferenceLossOutput:
        check_linear_head(hidden, lm_head_weight, labels, bias)
        if hidden.dim() != 3 or hidden.shape[0] % 2 != 0:
            raise ValueError(f"hidden must be [2B, T, H] (B chosen rows, then B rejected); got {tuple(hidden.shape)}")
        b = hidden.shape[0] // 2
        ignore_index, backend = self.ignore_index, self.backend
        chosen_logp = linear_logprobs(
            hidden[:b], lm_head_weight, labels[:b], bias, ignore_index=ignore_index, backend=backend, **self.transform
        )
        rejected_logp, stats = linear_logprobs(
            hidden[b:],
            lm_head_weight,
            labels[b:],
            bias,
            return_stats=True,
            topk=self.k + 1,
            ignore_index=ignore_index,
            backend=backend,
            **self.transform,
        )
        assert stats.topk_values is not None and stats.topk_indices is not None
        rej_labels = labels[b:]
        rej_mask = rej_labels != self.ignore_index
        # s- = z at the rejected label, differentiable through that head row only (ids -1 where ignored)
        ids = torch.where(rej_mask, rej_labels.long(), -1).reshape(-1, 1)
        t = self.transform
        transform = LogitTransform(t["logit_scale"] or 1.0, t["softcap"], t["temperature"])
        s_minus = topk_logits(hidden[b:].reshape(-1, hidden.shape[-1]), lm_head_weight, bias, ids, transform)
        out = cringe_loss(
            chosen_logp,
            labels[:b] != self.ignore_index,
            rejected_logp,
            s_minus.view(rej_labels.shape),
            stats.topk_values,
            stats.topk_indices,
            rej_labels,
            alpha=self.alpha,
            pairwise=self.pairwise,
            margin=self.margin,
            tau=self.tau,
            ignore_index=self.ignore_index,
            generator=generator,
        )
        # the sequence sums in float64 (losses.aggregate), as the paired module's; the metrics in the per-token dtype
        wide, dt = sum_dtype(hidden.device), chosen_logp.dtype
        logps = torch.cat([chosen_logp.sum(1, dtype=wide), rejected_logp.sum(1, dtype=wide)])
        with torch.no_grad():
            metrics = {
                "nll": out.nll.mean(),
                "cringe": out.cringe.mean(),
                "logps/chosen": logps[:b].mean().to(dt),
                "logps/rejected": logps[b:].mean().to(dt),
                "entropy/rejected": masked_mean(stats.entropy, rej_mask),
            }
            if out.gate is not None:
                metrics["gate"] = out.gate.mean()
        return PreferenceLossOutput(loss=out.loss, metrics=metrics, policy_logps=logps)
