"""The DPO fast path: Liger's DPO losses with summed log-probs and no NLL term are exactly
:class:`expo_kernels.FusedLinearPreferenceLoss` of the same registry loss, which on CPU float32/float64
runs the chunked engine (no logit recompute in the backward; ``docs/design.md``, "Engine") and
elsewhere the fused op. Reaching it through the module, rather than the op directly, is what makes
the Liger front end as fast as our own API.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from ...modules import FusedLinearPreferenceLoss

__all__ = ["dpo_engine_step"]


@lru_cache(maxsize=64)
def _module(loss_type: str, hp: tuple[tuple[str, Any], ...], ignore_index: int) -> FusedLinearPreferenceLoss:
    return FusedLinearPreferenceLoss(loss_type, ignore_index=ignore_index, compute_metrics=False, **dict(hp))


def dpo_engine_step(
    loss_type: str,
    hp: dict[str, Any],
    _input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None,
    *,
    ignore_index: int,
    use_ref_model: bool,
    ref_input: Tensor | None,
    ref_weight: Tensor | None,
    ref_bias: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor] | None:
    """``(loss, chosen, rejected, ref_chosen, ref_rejected)`` (the last four detached, ``[B]``), or None
    when the call is not one the module takes as is (odd row count, no reference input with
    ``use_ref_model``, non-tensor arguments): the caller's general path then runs and reports."""
    tensors = (_input, weight, target)
    if not all(isinstance(t, Tensor) for t in tensors) or _input.dim() != 3 or _input.shape[0] % 2:
        return None
    if tuple(target.shape) != tuple(_input.shape[:2]):
        return None
    if use_ref_model and (ref_input is None or tuple(ref_input.shape[:2]) != tuple(_input.shape[:2])):
        return None
    n = _input.shape[0] // 2
    module = _module(loss_type, tuple(sorted(hp.items())), int(ignore_index))
    if use_ref_model:
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
