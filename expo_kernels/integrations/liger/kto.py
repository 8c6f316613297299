"""Liger's unpaired loss (KTO) on expo_kernels: the registry's ``"kto"`` with both weights 1 and Liger's
baseline ``kl`` (0 when not given): ``mean_i (1 - sigma(beta (h_i - kl)))`` for desirable rows,
``(1 - sigma(beta (kl - h_i)))`` for undesirable ones, ``h`` the log-ratio to the reference (the policy
log-prob itself without a reference model).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ...losses import preference_loss
from ._core import Batch, CallArgs, policy_and_reference, row_logit_sums
from .base import SPECS, LigerFunction, LigerLoss

__all__ = ["LigerFusedLinearKTOFunction", "LigerFusedLinearKTOLoss"]

_OWNER = SPECS["KTO"].loss_class


def _labels(preference_labels: Any, n: int, device: torch.device) -> Tensor:
    if preference_labels is None:
        raise ValueError(f"{_OWNER}: `preference_labels` is required ([batch] bool, True = chosen/desirable).")
    if not isinstance(preference_labels, Tensor) or preference_labels.dtype != torch.bool:
        raise TypeError(f"{_OWNER}: `preference_labels` must be a bool tensor (True = chosen/desirable).")
    if tuple(preference_labels.shape) != (n,):
        raise ValueError(f"{_OWNER}: `preference_labels` must have shape ({n},); got {tuple(preference_labels.shape)}.")
    return preference_labels.to(device)


def _baseline(kl: Any, device: torch.device) -> Tensor | float:
    """Liger's ``kl`` is one number broadcast over the batch (TRL passes the batch's KL estimate)."""
    if kl is None:
        return 0.0
    if isinstance(kl, Tensor):
        if kl.numel() != 1:
            raise ValueError(
                f"{_OWNER}: `kl` must hold one number (the batch's KL baseline); got shape {tuple(kl.shape)}. "
                "Liger's result for a per-example `kl` depends on its chunk_size, so it is refused here."
            )
        return kl.detach().reshape(()).to(device=device, dtype=torch.float32)
    return float(kl)


def _step(owner: str, a: CallArgs, hp: dict[str, Any]) -> tuple[Tensor, tuple[Tensor, ...]]:
    batch = Batch.of(a)
    seq = policy_and_reference(
        owner,
        batch,
        ignore_index=a.ignore_index,
        average_log_prob=a.average_log_prob,
        use_ref_model=a.use_ref_model,
        wide=True,  # float64 sums: the log-ratios are exact; the loss and aux come back in `dt`
    )
    dt = seq.token_logps.dtype
    labels = _labels(a.preference_labels, a.target.shape[0], seq.policy.device)
    ref = torch.zeros_like(seq.policy) if seq.reference is None else seq.reference
    loss = preference_loss(
        "kto", policy_logps=seq.policy, ref_logps=ref, is_desirable=labels, kl=_baseline(a.kl, seq.policy.device), **hp
    )
    with torch.no_grad():
        pol = seq.policy.detach()
        rewards = a.beta * (pol - ref)
        lab = labels.to(pol.dtype)
        aux = (
            (pol * lab).sum(),
            (pol * (1 - lab)).sum(),
            row_logit_sums(batch.hidden, batch.weight, batch.bias, lab),
            row_logit_sums(batch.hidden, batch.weight, batch.bias, 1 - lab),
            (rewards * lab).sum(),
            (rewards * (1 - lab)).sum(),
        )
    # the float64 sums back to the token dtype; the logit sums stay float32, as before
    return loss.to(dt), tuple(x.to(dt) if x.dtype == torch.float64 else x for x in aux)


class LigerFusedLinearKTOFunction(LigerFunction, spec=SPECS["KTO"], step=_step):
    """Liger's ``LigerFusedLinearKTOFunction.apply(_input, weight, target, preference_labels, bias,
    ref_input, ref_weight, ref_bias, kl, ignore_index, beta, compiled, use_ref_model, average_log_prob,
    chunk_size)`` (``use_ref_model`` defaults to True here, False in the module, as in Liger), as
    :class:`LigerFusedLinearKTOLoss`."""


class LigerFusedLinearKTOLoss(LigerLoss, function=LigerFusedLinearKTOFunction):
    """Liger's ``LigerFusedLinearKTOLoss``: ``forward(_input [N, T, H], lin_weight [V, H], target [N, T],
    bias [V], preference_labels [N] bool, ref_input [N, T, H], ref_weight [V, H], ref_bias [V], kl)`` (note
    the order: ``_input`` first), any ``N`` rows, -> ``(loss, (chosen_logps_sum, rejected_logps_sum,
    chosen_logits_sum, rejected_logits_sum, chosen_rewards_sum, rejected_rewards_sum))``, all scalars.

    Differs from Liger: ``kl`` must be one number (Liger's result for a per-example ``kl`` depends on
    its ``chunk_size``); ``use_ref_model`` without ``ref_weight`` scores the reference with the policy
    head (detached); ``compiled`` and ``chunk_size`` are checked and unused.
    """
