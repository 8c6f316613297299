"""Liger-Kernel's chunked preference losses, on expo_kernels.

Pipelines written against Liger-Kernel's ``LigerFusedLinear{DPO,ORPO,CPO,SimPO,KTO}Loss`` (and their
``*Function.apply`` forms) switch by changing one import::

    from expo_kernels.integrations.liger import LigerFusedLinearDPOLoss  # was: from liger_kernel.chunked_loss import ...

or, without touching the code that imports Liger, by calling :func:`patch` first (needs
``liger_kernel``: ``pip install expo_kernels[liger]``); :func:`unpatch` restores Liger's classes.

Same constructor and call signatures, same ``(loss, aux_outputs)`` as Liger-Kernel 0.8, aux outputs in
Liger's order; the log-probs come from :func:`expo_kernels.linear_logprobs` and the losses from the
registry (:data:`expo_kernels.LOSSES`). Modules, one job each:

* :mod:`.base`: the table of Liger's losses (:data:`~.base.SPECS`: names, arguments, defaults, the
  registry hyperparameters they map onto, outputs) and the two bases every class is built from.
* :mod:`._core`: option checks, the policy/reference passes, aggregation, NLL, logit statistics, the
  paired step.
* :mod:`.dpo`: DPO (with its fast path through :class:`expo_kernels.FusedLinearPreferenceLoss`).
  :mod:`.cpo_orpo_simpo`: ORPO, CPO, SimPO.  :mod:`.kto`: KTO.  :mod:`.patch`: ``patch``/``unpatch``.

The supported options and the differences from Liger: README, "Liger users".
"""

from .cpo_orpo_simpo import (
    LigerFusedLinearCPOFunction,
    LigerFusedLinearCPOLoss,
    LigerFusedLinearORPOFunction,
    LigerFusedLinearORPOLoss,
    LigerFusedLinearSimPOFunction,
    LigerFusedLinearSimPOLoss,
)
from .dpo import DPO_LOSS_TYPES, LigerFusedLinearDPOFunction, LigerFusedLinearDPOLoss
from .kto import LigerFusedLinearKTOFunction, LigerFusedLinearKTOLoss
from .patch import is_patched, patch, unpatch

__all__ = [
    "DPO_LOSS_TYPES",
    "LigerFusedLinearDPOLoss",
    "LigerFusedLinearDPOFunction",
    "LigerFusedLinearORPOLoss",
    "LigerFusedLinearORPOFunction",
    "LigerFusedLinearCPOLoss",
    "LigerFusedLinearCPOFunction",
    "LigerFusedLinearSimPOLoss",
    "LigerFusedLinearSimPOFunction",
    "LigerFusedLinearKTOLoss",
    "LigerFusedLinearKTOFunction",
    "patch",
    "unpatch",
    "is_patched",
]
