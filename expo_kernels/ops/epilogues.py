"""Epilogues on a tile of logits a library GEMM wrote: ``fold`` (the tile's log-softmax state) and
``to_dz`` (the logits' gradient in place), per provider -- the torch specification, the native C++ ops
(``csrc/expo_native.cpp``) and Triton (``ops/triton/epilogues.py``) -- and the op's path that keeps one
call's logits for its backward (``Path.KEPT_LOGITS``; ``_dispatch.plan`` decides when: docs/design.md,
"Execution paths").

A tile ``z [n, V]`` holds raw logits ``h W^T`` (contiguous rows, float32 for 16-bit heads).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from . import state as online_state
from .common import LogitTransform

__all__ = [
    "Epilogues",
    "epilogues",
    "torch_fold",
    "torch_to_dz",
    "native_fold",
    "native_to_dz",
    "transform_in_place",
]


def torch_fold(
    z: Tensor, bias: Tensor | None, labels: Tensor, t: LogitTransform, with_stats: bool
) -> online_state.LogprobState:
    """Bias and transform in place, then the tile's partial state (the specification of the C++ fold)."""
    from .torch_backend import tile_state

    transform_in_place(z, bias, t)
    return tile_state(z, labels, torch.arange(z.shape[1], device=z.device), with_stats)


def torch_to_dz(z: Tensor, labels: Tensor, lse: Tensor, g: Tensor, t: LogitTransform) -> None:
    """Transformed logits -> ``g (onehot - p) dz/draw`` in place (the specification of the C++ op)."""
    deriv: Tensor | float = t.logit_scale * t.inv_temperature
    if t.softcap is not None:
        # z = c tanh(u) / T, so tanh(u) = z T / c and dz/draw = s / T (1 - tanh(u)^2)
        tanh = z * (t.temperature / t.softcap)
        deriv = deriv * (1.0 - tanh * tanh)
    p = torch.exp(torch.clamp_max(z - lse[:, None], 0.0))
    onehot = torch.zeros_like(z).scatter_(1, labels[:, None], 1.0)
    z.copy_(g[:, None] * (onehot - p) * deriv)


def native_fold(
    z: Tensor, bias: Tensor | None, labels: Tensor, t: LogitTransform, with_stats: bool
) -> online_state.LogprobState:
    fields = torch.ops.expo_native.fold_logits_(
        z, bias, labels, 0, float(t.logit_scale), t.softcap, float(t.inv_temperature), bool(with_stats)
    )
    return online_state.LogprobState(*fields)


def native_to_dz(z: Tensor, labels: Tensor, lse: Tensor, g: Tensor, t: LogitTransform) -> None:
    torch.ops.expo_native.logits_to_dz_(z, labels, 0, lse, g, float(t.logit_scale), t.softcap, float(t.inv_temperature))


@dataclass(frozen=True)
class Epilogues:
    """The two epilogues of one provider.

    ``fold(z, bias, labels, transform, with_stats) -> LogprobState`` on raw logits (it may leave them
    transformed in place); ``to_dz(z, bias, labels, lse, g, transform, out)`` on what ``fold`` left,
    writing dz into ``out`` (``z`` itself, or a buffer in the head's 16-bit dtype)."""

    fold: Callable[..., online_state.LogprobState]
    to_dz: Callable[..., None]
    fold_transforms: bool  # fold leaves the logits transformed (bias added), which to_dz expects


def transform_in_place(z: Tensor, bias: Tensor | None, t: LogitTransform) -> None:
    """What a transforming fold does to raw logits, for a pass that needs dz but not the fold's state."""
    if bias is not None:
        z.add_(bias.to(z.dtype))
    z.copy_(t.apply(z))


def _in_place_to_dz(op: Callable[[Tensor, Tensor, Tensor, Tensor, LogitTransform], None]) -> Callable[..., None]:
    def to_dz(  # z is transformed, bias already added by the fold
        z: Tensor, bias: Tensor | None, labels: Tensor, lse: Tensor, g: Tensor, t: LogitTransform, out: Tensor
    ) -> None:
        op(z, labels, lse, g, t)
        if out is not z:
            out.copy_(z)

    return to_dz


def epilogues(backend: str) -> Epilogues:
    """C++ (``native``), the torch specification (``torch``) or Triton (``triton``: GPUs, interpreter)."""
    if backend == "native":
        return Epilogues(native_fold, _in_place_to_dz(native_to_dz), True)
    if backend == "triton":
        from .triton import epilogues as triton_epilogues

        return Epilogues(triton_epilogues.fold, triton_epilogues.to_dz, False)
    return Epilogues(torch_fold, _in_place_to_dz(torch_to_dz), True)
