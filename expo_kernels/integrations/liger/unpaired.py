"""Liger's unpaired chunked preference loss (KTO) on expo_kernels.

``LigerFusedLinearKTOLoss`` / ``LigerFusedLinearKTOFunction.apply`` take Liger's arguments (note
KTO's call order: ``_input`` first, then the weight) and return ``(loss, (chosen_logps_sum,
rejected_logps_sum, chosen_logits_sum, rejected_logits_sum, chosen_rewards_sum,
rejected_rewards_sum))``. The loss is the registry's ``"kto"`` with both weights 1 and Liger's
baseline ``kl`` (0 when not given): ``mean_i (1 - sigma(beta (h_i - kl)))`` for desirable rows,
``(1 - sigma(beta (kl - h_i)))`` for undesirable ones, ``h`` the log-ratio to the reference (the
policy log-prob itself without a reference model).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...losses import preference_loss
from ._core import check_options, check_registry_hparams, policy_and_reference, row_logit_sums

__all__ = ["LigerFusedLinearKTOFunction", "LigerFusedLinearKTOLoss"]

_OWNER = "LigerFusedLinearKTOLoss"


def _labels(preference_labels, n: int, device) -> Tensor:
    if preference_labels is None:
        raise ValueError(f"{_OWNER}: `preference_labels` is required ([batch] bool, True = chosen/desirable).")
    if not isinstance(preference_labels, Tensor) or preference_labels.dtype != torch.bool:
        raise TypeError(f"{_OWNER}: `preference_labels` must be a bool tensor (True = chosen/desirable).")
    if tuple(preference_labels.shape) != (n,):
        raise ValueError(f"{_OWNER}: `preference_labels` must have shape ({n},); got {tuple(preference_labels.shape)}.")
    return preference_labels.to(device)


def _baseline(kl, device) -> Tensor | float:
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


def _kto_apply(
    _input,
    weight,
    target,
    preference_labels,
    bias=None,
    ref_input=None,
    ref_weight=None,
    ref_bias=None,
    kl=None,
    ignore_index=-100,
    beta=0.1,
    compiled=True,
    use_ref_model=True,
    average_log_prob=False,
    chunk_size=1,
):
    check_options(
        _OWNER,
        ignore_index=ignore_index,
        chunk_size=chunk_size,
        bools=dict(compiled=compiled, use_ref_model=use_ref_model, average_log_prob=average_log_prob),
    )
    check_registry_hparams(_OWNER, "kto", beta=beta)
    seq = policy_and_reference(
        _OWNER,
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
    labels = _labels(preference_labels, target.shape[0], seq.policy.device)
    ref = torch.zeros_like(seq.policy) if seq.reference is None else seq.reference
    loss = preference_loss(
        "kto",
        policy_logps=seq.policy,
        ref_logps=ref,
        is_desirable=labels,
        kl=_baseline(kl, seq.policy.device),
        beta=beta,
    )
    with torch.no_grad():
        pol = seq.policy.detach()
        rewards = beta * (pol - ref)
        lab = labels.to(pol.dtype)
        aux = (
            (pol * lab).sum(),
            (pol * (1 - lab)).sum(),
            row_logit_sums(_input, weight, bias, lab),
            row_logit_sums(_input, weight, bias, 1 - lab),
            (rewards * lab).sum(),
            (rewards * (1 - lab)).sum(),
        )
    return loss, aux


class LigerFusedLinearKTOFunction:
    """``apply(_input, weight, target, preference_labels, bias=None, ref_input=None, ref_weight=None,
    ref_bias=None, kl=None, ignore_index=-100, beta=0.1, compiled=True, use_ref_model=True,
    average_log_prob=False, chunk_size=1)`` -> ``(loss, aux)``: Liger's positional contract."""

    apply = staticmethod(_kto_apply)


class LigerFusedLinearKTOLoss(nn.Module):
    """Liger's ``LigerFusedLinearKTOLoss`` on expo_kernels (same arguments, same outputs).

    ``use_ref_model=False`` (Liger's default for this class) takes the reference log-probs as 0;
    ``average_log_prob`` averages each row's log-probs over its counted tokens; ``compiled`` and
    ``chunk_size`` are accepted and unused.
    """

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        compiled: bool = True,
        use_ref_model: bool = False,
        average_log_prob: bool = False,
        chunk_size: int = 1,
    ):
        super().__init__()
        owner = type(self).__name__
        check_options(
            owner,
            ignore_index=ignore_index,
            chunk_size=chunk_size,
            bools=dict(compiled=compiled, use_ref_model=use_ref_model, average_log_prob=average_log_prob),
        )
        check_registry_hparams(owner, "kto", beta=beta)
        self.ignore_index = ignore_index
        self.beta = beta
        self.compiled = compiled
        self.use_ref_model = use_ref_model
        self.average_log_prob = average_log_prob
        self.chunk_size = chunk_size

    def forward(
        self,
        _input,
        lin_weight,
        target,
        bias=None,
        preference_labels=None,
        ref_input=None,
        ref_weight=None,
        ref_bias=None,
        kl=None,
    ):
        return _kto_apply(
            _input,
            lin_weight,
            target,
            preference_labels,
            bias,
            ref_input,
            ref_weight,
            ref_bias,
            kl,
            self.ignore_index,
            self.beta,
            self.compiled,
            self.use_ref_model,
            self.average_log_prob,
            self.chunk_size,
        )
