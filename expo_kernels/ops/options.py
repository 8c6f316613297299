"""Process-wide switches of the kernels that trade exactness for speed, off by default.

>>> import expo_kernels as ek
>>> with ek.kernel_options(grad_filter_eps=2.0**-12):   # bf16 training: skip negligible vocab tiles
...     loss.backward()

Deterministic results: ``torch.use_deterministic_algorithms(True)`` makes the Triton backend run its
backward as bounded-chunk GEMMs (the torch backend's schedule) instead of float32 atomics, whose
summation order varies from run to run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator

__all__ = ["KernelOptions", "get_kernel_options", "kernel_options"]


@dataclasses.dataclass(frozen=True)
class KernelOptions:
    """grad_filter_eps: in the Triton backward, skip a (token block, vocab tile) whose softmax
    probabilities (both heads' for the token KL) are all below ``eps`` and that holds none of the
    block's labels: its gradient contribution is at most ``eps * |g|`` per logit, under the rounding of
    bf16 (2^-8 relative) for ``eps`` around 2^-12 (Cut Cross-Entropy's gradient filtering). ``None``
    (default) = exact: every tile is accumulated. The torch and native backends are always exact and
    warn once when the option is set."""

    grad_filter_eps: float | None = None


_current = KernelOptions()


def get_kernel_options() -> KernelOptions:
    return _current


@contextlib.contextmanager
def kernel_options(**changes) -> Iterator[KernelOptions]:
    """Set options for the duration of a ``with`` block (the backward pass must run inside it)."""
    global _current
    eps = changes.get("grad_filter_eps")
    if eps is not None and (
        isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1 or not math.isfinite(eps)
    ):
        raise ValueError(f"grad_filter_eps must be None (exact) or a number in (0, 1); got {eps!r}.")
    saved = _current
    _current = dataclasses.replace(_current, **changes)
    try:
        yield _current
    finally:
        _current = saved
