"""The ``@triton.jit`` helpers both Triton kernel families share, and their launch arguments.

The fused kernels (``ops/triton_backend.py``) and the epilogues on library GEMMs
(``ops/triton_engine.py``) both import from here, so neither imports the other's private names.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import LogitTransform

__all__ = ["safe_shift", "apply_transform", "transform_args"]


@triton.jit
def safe_shift(m):
    """The running max as a shift: 0 while only masked (-inf) logits were seen (see torch_backend)."""
    return tl.where(m > float("-inf"), m, 0.0)


@triton.jit
def apply_transform(raw, logit_scale, softcap, inv_temp, HAS_SOFTCAP: tl.constexpr):
    """z = softcap(raw * scale) / T and dz/draw (see LogitTransform)."""
    x = raw * logit_scale
    deriv = logit_scale * inv_temp
    if HAS_SOFTCAP:
        # tanh(u) = 2 sigmoid(2u) - 1: tl has no portable tanh across Triton 3.x versions.
        t = 2.0 * tl.sigmoid(2.0 * x / softcap) - 1.0
        x = softcap * t
        deriv = deriv * (1.0 - t * t)
    return x * inv_temp, deriv


def transform_args(transform: LogitTransform) -> dict:
    """The arguments :func:`apply_transform` takes, as a kernel launch passes them (softcap 1.0 when off)."""
    return dict(
        logit_scale=float(transform.logit_scale),
        softcap=float(transform.softcap) if transform.softcap is not None else 1.0,
        inv_temp=float(transform.inv_temperature),
        HAS_SOFTCAP=transform.softcap is not None,
    )
