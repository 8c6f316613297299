"""expo_kernels: fused LM-head kernels for DPO-style preference optimization and EXPO.

Layers (each imports only the ones above it):

* ``expo_kernels.ops``      — the kernels on plain tensors (Triton, chunked PyTorch).
* ``expo_kernels.autograd`` — registered torch ops + autograd, backend chosen from the device.
* ``expo_kernels.losses``   — per-sequence preference losses and their registry.
* ``expo_kernels.modules``  — ``FusedLinearPreferenceLoss``: hidden states + LM head -> loss.
"""
from ._dispatch import available_backends
from .functional import TokenStats, linear_logprobs, linear_token_kl
from .ops.options import kernel_options

__version__ = "0.1.0"

__all__ = [
    "linear_logprobs",
    "linear_token_kl",
    "TokenStats",
    "available_backends",
    "kernel_options",
    "__version__",
    "preference_loss",
    "preference_loss_and_metrics",
    "LOSSES",
    "FusedLinearPreferenceLoss",
    "PreferenceLossOutput",
    "FusedLinearDPOLoss",
    "FusedLinearEXPOLoss",
    "FusedLinearSimPOLoss",
    "FusedLinearORPOLoss",
    "FusedLinearKTOLoss",
]

from .losses import LOSSES, preference_loss, preference_loss_and_metrics  # noqa: E402
from .modules import (  # noqa: E402
    FusedLinearDPOLoss,
    FusedLinearEXPOLoss,
    FusedLinearKTOLoss,
    FusedLinearORPOLoss,
    FusedLinearPreferenceLoss,
    FusedLinearSimPOLoss,
    PreferenceLossOutput,
)
