"""Argument checks shared by the public ops. Errors name the argument and what was expected."""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
BACKENDS = ("triton", "native", "torch")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def check_bool(name: str, value) -> None:
    """A real ``bool`` (``"no"`` or ``0`` are refused: a truthy string would silently mean True)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__} {value!r}")


def check_backend_name(value, name: str = "backend") -> None:
    """None (choose from the device) or one of ``BACKENDS``; whether it runs on a device is checked
    when the tensors are known."""
    if value is None:
        return
    if not isinstance(value, str):
        raise TypeError(f"{name} must be None or one of {BACKENDS}, got {type(value).__name__} {value!r}")
    if value not in BACKENDS:
        raise ValueError(f"{name} must be one of {BACKENDS}, got {value!r}")


# The largest top-k: the Triton forward keeps a [BLOCK_N, 32] running top-k per program in registers.
MAX_TOPK = 32


def check_topk(topk, vocab: int, return_stats: bool) -> None:
    """``topk``: None, or an int in ``[1, min(MAX_TOPK, V)]`` with ``return_stats=True`` (its results are
    ``TokenStats`` fields). ``topk > V`` raises rather than clamping: a shorter ``[..., V]`` result
    would break code that indexes ``[..., k - 1]``."""
    if topk is None:
        return
    if isinstance(topk, bool) or not isinstance(topk, int):
        raise TypeError(f"topk must be None or an int, got {type(topk).__name__} {topk!r}")
    if not 1 <= topk <= MAX_TOPK:
        raise ValueError(f"topk must be in [1, {MAX_TOPK}], got {topk}")
    if topk > vocab:
        raise ValueError(f"topk must be at most the vocabulary size V = {vocab}, got {topk}")
    if not return_stats:
        raise ValueError("topk requires return_stats=True (the top-k are TokenStats fields)")


def check_ignore_index(value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"ignore_index must be an int, got {type(value).__name__}")
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"ignore_index must fit in int64 ([-2**63, 2**63 - 1]), got {value}")


def check_tensor(name: str, value, *, floating: bool = False, integer: bool = False) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {value.dtype}")
    if integer and value.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be an integer tensor (e.g. torch.long), got {value.dtype}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    named = [(k, v) for k, v in tensors.items() if v is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; move them to one device")


def check_positive_finite(name: str, value, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_linear_head(hidden, weight, labels, bias, prefix: str = "") -> None:
    """hidden [..., H] float, weight [V, H] same dtype, labels [...] integer, bias [V] | None.

    ``prefix`` names a second head's arguments in the messages (``ref_`` -> ``ref_hidden``, ...).
    """
    h_name, w_name, b_name = f"{prefix}hidden", f"{prefix}weight", f"{prefix}bias"
    check_tensor(h_name, hidden, floating=True)
    check_tensor(w_name, weight, floating=True)
    check_tensor("labels", labels, integer=True)
    if bias is not None:
        check_tensor(b_name, bias, floating=True)
    if hidden.dim() < 1:
        raise ValueError(f"{h_name} must have shape [..., H] (at least 1 dimension), got a scalar")
    if hidden.shape[-1] == 0:
        raise ValueError(
            f"{h_name} must have a hidden size H = {h_name}.shape[-1] >= 1, got shape {tuple(hidden.shape)}"
        )
    if weight.dim() != 2:
        raise ValueError(f"{w_name} must have shape [V, H] (2 dimensions), got shape {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{w_name} must have at least one row (vocabulary size V >= 1)")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{w_name} must have shape [V, H] with H = {h_name}.shape[-1] = {hidden.shape[-1]}, "
            f"got {tuple(weight.shape)}"
        )
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels must have shape {h_name}.shape[:-1] = {tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{w_name}.dtype ({weight.dtype}) must match {h_name}.dtype ({hidden.dtype})")
    if bias is not None:
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{b_name} must have shape [V] = ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"{b_name}.dtype ({bias.dtype}) must match {h_name}.dtype ({hidden.dtype})")
    check_same_device(**{h_name: hidden, w_name: weight, "labels": labels, b_name: bias})


def raise_for_non_finite(**tensors: torch.Tensor | None) -> None:
    """Called once a result came out non-finite: name the input that caused it."""
    for name, t in tensors.items():
        if t is not None and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or inf values")
    raise ValueError("the logits overflowed to inf; check the scale of hidden, weight and logit_scale")
