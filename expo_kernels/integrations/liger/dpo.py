"""Liger's DPO (``LigerFusedLinearDPOLoss``) on expo_kernels: the preference term is the registry loss
named by ``loss_type``, plus ``alpha`` times the chosen NLL with ``compute_nll_loss``.

The fast path: with summed log-probs and no NLL term the loss is exactly
:class:`expo_kernels.FusedLinearPreferenceLoss` of the same registry loss, which on CPU float32/float64
runs the chunked engine (no logit recompute in the backward; ``docs/design.md``, "Engine") and
elsewhere the fused op. Reaching it through the module, rather than the op directly, is what makes the
Liger front end as fast as our own API.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ...losses import preference_loss
from ...modules import FusedLinearPreferenceLoss
from ._core import Batch, CallArgs, SequenceLogps, logit_means, paired_step
from .base import SPECS, LigerFunction, LigerLoss

__all__ = ["DPO_LOSS_TYPES", "LigerFusedLinearDPOFunction", "LigerFusedLinearDPOLoss"]

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


def _check(owner: str, a: CallArgs) -> None:
    loss_type, label_smoothing = a.loss_type, a.label_smoothing
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


def _step(owner: str, a: CallArgs, hp: dict[str, Any]) -> tuple[Tensor, tuple[Tensor, ...]]:
    beta, loss_type, batch = a.beta, a.loss_type, Batch.of(a)
    if not a.compute_nll_loss and not a.average_log_prob:
        fast = _engine_step(batch, a, hp)
        if fast is not None:
            loss, c, r, rc, rr = fast
            chosen_mean, rejected_mean = logit_means(batch.hidden, batch.weight, batch.bias)
            nll = torch.zeros((), device=batch.hidden.device)
            return loss, (c, r, chosen_mean, rejected_mean, nll, beta * (c - rc), beta * (r - rr))

    def preference(
        c: Tensor, r: Tensor, rc: Tensor, rr: Tensor, seq: SequenceLogps, nll: Tensor
    ) -> tuple[Tensor, tuple[Tensor, ...], bool]:
        loss = preference_loss(loss_type, c, r, rc.expand_as(c), rr.expand_as(r), **hp)
        return loss, (beta * (c - rc), beta * (r - rr)), False

    return paired_step(
        owner,
        batch,
        preference,
        ignore_index=a.ignore_index,
        alpha=a.alpha,
        compute_nll_loss=a.compute_nll_loss,
        average_log_prob=a.average_log_prob,
        use_ref_model=a.use_ref_model,
    )


# One module per (loss, hyperparameters, ignore_index): a plain dict, which torch.compile reads without a
# warning (it does not trace into functools.lru_cache). The key space is the options users pass: small.
_MODULES: dict[tuple[str, tuple[tuple[str, Any], ...], int], FusedLinearPreferenceLoss] = {}


def _module(loss_type: str, hp: tuple[tuple[str, Any], ...], ignore_index: int) -> FusedLinearPreferenceLoss:
    key = (loss_type, hp, ignore_index)
    module = _MODULES.get(key)
    if module is None:
        module = _MODULES[key] = FusedLinearPreferenceLoss(
            loss_type, ignore_index=ignore_index, compute_metrics=False, **dict(hp)
        )
    return module


def _engine_step(batch: Batch, a: CallArgs, hp: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor] | None:
    """``(loss, chosen, rejected, ref_chosen, ref_rejected)`` (the last four detached, ``[B]``), or None
    when the call is not one the module takes as is (odd row count, no reference input with
    ``use_ref_model``, non-tensor arguments): the general path then runs and reports."""
    _input, weight, target, bias, ref_input, ref_weight, ref_bias = batch
    if not all(isinstance(t, Tensor) for t in (_input, weight, target)) or _input.dim() != 3 or _input.shape[0] % 2:
        return None
    if tuple(target.shape) != tuple(_input.shape[:2]):
        return None
    if a.use_ref_model and (ref_input is None or tuple(ref_input.shape[:2]) != tuple(_input.shape[:2])):
        return None
    n = _input.shape[0] // 2
    module = _module(a.loss_type, tuple(sorted(hp.items())), int(a.ignore_index))
    if a.use_ref_model and ref_input is not None:  # (not None: returned above)
        out = module(
            weight,
            _input,
            target,
            bias=bias,
            ref_hidden=ref_input.detach(),
            ref_weight=None if ref_weight is None else ref_weight.detach(),
            ref_bias=None if ref_bias is None else ref_bias.detach(),
        )
        ref = out.ref_logps.detach()
        rc, rr = ref[:n], ref[n:]
    else:
        acc = torch.float64 if _input.dtype == torch.float64 else torch.float32
        zeros = torch.zeros(n, device=_input.device, dtype=acc)
        out = module(weight, _input, target, bias=bias, ref_chosen_logps=zeros, ref_rejected_logps=zeros)
        rc = rr = zeros
    pol = out.policy_logps.detach()
    return out.loss, pol[:n], pol[n:], rc, rr


class LigerFusedLinearDPOFunction(LigerFunction, spec=SPECS["DPO"], step=_step, check=_check):
    """Liger's ``LigerFusedLinearDPOFunction.apply(_input, weight, target, bias, ref_input, ref_weight,
    ref_bias, ignore_index, beta, compute_nll_loss, compiled, use_ref_model, average_log_prob, chunk_size,
    loss_type, label_smoothing, discopop_tau, alpha)``, as :class:`LigerFusedLinearDPOLoss`."""


class LigerFusedLinearDPOLoss(LigerLoss, function=LigerFusedLinearDPOFunction):
    """Liger's ``LigerFusedLinearDPOLoss``: ``forward(lin_weight [V, H], _input [2B, T, H], target [2B, T],
    bias [V], ref_input [2B, T, H], ref_weight [V, H], ref_bias [V])``, rows ``B`` chosen then ``B``
    rejected, -> ``(loss, (chosen_logps [B], rejected_logps [B], chosen_logits_mean, rejected_logits_mean,
    nll_loss, chosen_rewards [B], rejected_rewards [B]))``.

    ``loss_type`` is one of :data:`DPO_LOSS_TYPES`. Differs from Liger: ``use_ref_model`` without
    ``ref_weight`` scores the reference with the policy head (detached; Liger fails there);
    ``compiled`` and ``chunk_size`` are checked and unused (the op tiles the work itself).
    """
