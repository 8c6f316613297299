"""expo_kernels: fused LM-head kernels for DPO-style preference optimization and EXPO.

Layers, each importing only the ones before it (docs/design.md, "Backends and dispatch"):

* ``expo_kernels.ops``          — the kernels on plain tensors (torch spec, native C++, Triton) and the
  shared partial state of the online softmax (``ops.state``).
* ``expo_kernels._dispatch``    — the plan (backend + execution ``Path``), argument checks, token compaction.
* ``expo_kernels.autograd``     — the registered torch ops and their autograd formulas.
* ``expo_kernels.functional``   — the public ops ``linear_logprobs`` and ``linear_token_kl``.
* ``expo_kernels.distributed``  — vocabulary-parallel ops and FSDP2 heads.
* ``expo_kernels.losses``       — per-sequence preference losses and their registry.
* ``expo_kernels.modules``      — ``FusedLinearPreferenceLoss`` & co.: hidden states + LM head -> loss.
* ``expo_kernels.integrations`` — Hugging Face models and TRL trainers.
"""

from ._dispatch import Path, Plan, available_backends, plan
from ._version import __version__
from .functional import TokenStats, linear_logprobs, linear_token_kl
from .losses import LOSSES, preference_loss, preference_loss_and_metrics, ranking_loss
from .losses.cringe import cringe_loss
from .modules import (
    FusedLinearDPOLoss,
    FusedLinearEXPOLoss,
    FusedLinearKTOLoss,
    FusedLinearORPOLoss,
    FusedLinearPreferenceLoss,
    FusedLinearRankingLoss,
    FusedLinearSimPOLoss,
    FusedLinearUnpairedLoss,
    PreferenceLossOutput,
)
from .modules.cringe import FusedLinearCRINGELoss
from .ops.options import kernel_options

__all__ = [
    "linear_logprobs",
    "linear_token_kl",
    "TokenStats",
    "available_backends",
    "kernel_options",
    "Path",
    "Plan",
    "plan",
    "__version__",
    "preference_loss",
    "preference_loss_and_metrics",
    "LOSSES",
    "FusedLinearPreferenceLoss",
    "FusedLinearUnpairedLoss",
    "PreferenceLossOutput",
    "FusedLinearDPOLoss",
    "FusedLinearEXPOLoss",
    "FusedLinearSimPOLoss",
    "FusedLinearORPOLoss",
    "FusedLinearKTOLoss",
    "ranking_loss",
    "FusedLinearRankingLoss",
    "cringe_loss",
    "FusedLinearCRINGELoss",
]
