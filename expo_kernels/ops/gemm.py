"""The GEMM provider of the chunked paths: ``torch.mm`` (MKL/oneDNN on the CPU, cuBLAS on CUDA).

Logits go into a float32 workspace (float64 for float64 heads): 16-bit operands are multiplied with
float32 accumulation by the library anyway, and ``out_dtype=torch.float32`` keeps the result
unrounded, so the fold sees the same logits the fused kernels would. Where a device's ``torch.mm``
cannot write float32 for 16-bit operands (the CPU), the workspace takes the head's dtype.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

__all__ = ["logits_dtype", "logits_into"]


@functools.cache
def _mm_writes_float32(device_type: str, dtype: torch.dtype) -> bool:
    try:
        a = torch.ones(2, 2, dtype=dtype, device=device_type)
        out = torch.empty(2, 2, dtype=torch.float32, device=device_type)
        torch.mm(a, a, out_dtype=torch.float32, out=out)  # the exact call of logits_into
        return bool((out == 2).all())
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def logits_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The workspace dtype for a ``dtype`` head on ``device``."""
    if dtype == torch.float64:
        return dtype
    if dtype.itemsize >= 4 or _mm_writes_float32(device.type, dtype):
        return torch.float32
    return dtype


def logits_into(z: Tensor, h: Tensor, w: Tensor) -> None:
    """``z [n, V] = h [n, H] @ w [V, H]^T`` (``w`` any strides) in ``z``'s dtype."""
    if h.dtype == z.dtype:
        torch.mm(h, w.T, out=z)
    else:
        torch.mm(h, w.T, out_dtype=z.dtype, out=z)
