"""Dispatch: which backend runs a call, and the checks and token bookkeeping around every backend call.

Everything between the public functions (``expo_kernels.functional``) and the kernels
(``expo_kernels.ops``) that is not autograd lives here: backend choice, scalar checks, compaction of
the counted tokens, and the guards on what a backend returns (finite, not aliased). The registered
ops (``expo_kernels.autograd``) and the vocab-parallel path (``expo_kernels.distributed``) both use it.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from . import _validation as V
from .ops import Backend, torch_backend
from .ops.common import interpreting

BACKENDS = V.BACKENDS
BACKEND_ENV = "EXPO_KERNELS_BACKEND"


def triton_importable() -> bool:
    """Whether ``import triton`` works (it imports Triton: ask only where a Triton backend could run)."""
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


def native_available(device: torch.device) -> bool:
    """The C++ CPU backend (csrc/): CPU tensors, built/loaded on first use, off with EXPO_KERNELS_NATIVE=0.

    A failed build warns once and leaves CPU tensors on the torch backend."""
    if device.type != "cpu":
        return False
    from .ops import _native_build

    return _native_build.ensure_loaded()


def available_backends(device="cpu") -> list:
    """Backends that can run on ``device``, fastest first."""
    device = torch.device(device)
    names = []
    if native_available(device):
        names.append("native")
    if (device.type == "cuda" or interpreting()) and triton_importable():  # no Triton import off CUDA
        names.append("triton")
    names.append("torch")
    return names


def resolve_backend(requested: str | None, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """``backend=`` argument, else ``$EXPO_KERNELS_BACKEND``, else the fastest for the device and dtype.

    float64 never goes to Triton (Triton 3.6, on our GPU machines, does not compile these kernels in
    float64, and the interpreter rounds scalars to float32): by default it runs on the torch backend;
    asking for ``"triton"`` explicitly raises."""
    V.check_backend_name(requested)
    name = requested if requested is not None else os.environ.get(BACKEND_ENV) or None
    source = "backend" if requested is not None else BACKEND_ENV
    fp64 = dtype == torch.float64
    if name is None:
        if device.type == "cuda" and triton_importable() and not fp64:
            return "triton"
        return "native" if native_available(device) else "torch"
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    if name == "triton" and fp64:
        raise ValueError(
            f"{source}='triton' does not support float64 inputs (the kernels accumulate in float32 on "
            "GPUs); use backend='torch' (any device) or 'native' (CPU) for float64"
        )
    if name not in available_backends(device):
        if name == "native":
            from .ops import _native_build

            why = _native_build.status()["reason"] if device.type == "cpu" else "it runs on CPU tensors only"
            raise ValueError(f"{source}='native' cannot run on {device.type} tensors: {why}")
        raise ValueError(
            f"{source}={name!r} cannot run on {device.type} tensors: the triton backend needs CUDA tensors "
            "(or TRITON_INTERPRET=1 set before importing expo_kernels, for CPU testing) and triton installed"
        )
    return name


def backend_module(name: str) -> Backend:
    """The module implementing backend ``name`` (the contract: ``expo_kernels.ops``)."""
    if name == "triton":
        from .ops import triton_backend

        return triton_backend
    if name == "native":
        from .ops import native_backend

        return native_backend
    return torch_backend


_WARNED_FILTER: set = set()


def backward_module(name: str) -> Backend:
    """``backend_module`` for a backward pass; warns once per backend that ignores gradient filtering.

    ``kernel_options(grad_filter_eps=...)`` is a Triton option: the torch and native backends compute
    every tile exactly (they run GEMMs over whole vocabulary tiles, where skipping rarely pays)."""
    from .ops.options import get_kernel_options

    if name != "triton" and get_kernel_options().grad_filter_eps is not None and name not in _WARNED_FILTER:
        _WARNED_FILTER.add(name)
        warnings.warn(
            f"kernel_options(grad_filter_eps=...) applies to the triton backend only; the {name} backend "
            "computes exact gradients",
            RuntimeWarning,
            stacklevel=3,
        )
    return backend_module(name)


def result_dtype(input_dtype: torch.dtype) -> torch.dtype:
    """Per-token results are float32, or float64 for float64 inputs (gradcheck, small studies)."""
    return torch.float64 if input_dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# scalar arguments
# ---------------------------------------------------------------------------------------------


def check_scalars(temperature, logit_scale, softcap, ignore_index) -> None:
    V.check_positive_finite("temperature", temperature)
    V.check_positive_finite("logit_scale", logit_scale, allow_none=True)
    V.check_positive_finite("softcap", softcap, allow_none=True)
    V.check_ignore_index(ignore_index)


def scalar_args(ignore_index, logit_scale, softcap, temperature):
    """The registered ops' scalar arguments, in schema order (logit_scale None -> 1.0)."""
    return (
        int(ignore_index),
        float(logit_scale) if logit_scale is not None else 1.0,
        float(softcap) if softcap is not None else None,
        float(temperature),
    )


def group_size(process_group) -> int:
    """World size of a ``torch.distributed`` group; a clear error for anything else."""
    import torch.distributed as dist

    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            f"process_group must be None or a torch.distributed.ProcessGroup, "
            f"got {type(process_group).__name__} {process_group!r}"
        )
    return dist.get_world_size(process_group)


# ---------------------------------------------------------------------------------------------
# counted tokens: ignored rows are compacted away before any kernel runs
# ---------------------------------------------------------------------------------------------


def counted_rows(labels: Tensor, ignore_index: int, vocab: int) -> tuple[Tensor | None, Tensor, Callable]:
    """``(rows, labels64, pick)`` for labels ``[N]`` of any integer dtype.

    The comparisons run in int64: in the label dtype, ``-100`` wraps to 156 in uint8 and ``V = 300``
    to 44 in int8. ``rows`` are the indices of the counted tokens (None when all count), ``labels64``
    the counted labels as a contiguous int64 ``[N_valid]``, and ``pick`` selects those rows of any
    per-token tensor. Labels outside ``[0, V)`` raise."""
    labels = labels.long()
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}; found {first}")
    if bool(valid.all()):
        return None, labels.contiguous(), lambda t: t
    rows = valid.nonzero().squeeze(1)
    return rows, labels.index_select(0, rows), lambda t: t.index_select(0, rows)


def scatter(values: Tensor, rows: Tensor | None, n: int) -> Tensor:
    """Per-counted-token values back to all ``n`` tokens (0 at ignored ones)."""
    if rows is None:
        return values
    out = values.new_zeros(n)
    return out.index_copy_(0, rows, values)


def scatter_rows(values: Tensor, rows: Tensor | None, n: int, fill) -> Tensor:
    """Per-counted-token rows ``[N_valid, k]`` back to all ``n`` tokens (``fill`` at ignored ones)."""
    if rows is None:
        return values
    out = values.new_full((n, values.shape[1]), fill)
    return out.index_copy_(0, rows, values)


def unaliased(outputs, inputs) -> tuple:
    """The outputs, each cloned where it shares storage with an input or an earlier output.

    A registered op may not return a view of its input or two views of one tensor (torch checks,
    and a backend may legitimately return e.g. one empty tensor twice for N = 0)."""
    seen = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, Tensor) and t.numel() > 0}
    out = []
    for t in outputs:
        if t.numel() == 0 or t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out.append(t)
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# finiteness: inputs must be finite (a -inf bias entry masks a vocabulary id); results then are
# ---------------------------------------------------------------------------------------------


def _all_finite(t: Tensor) -> Tensor:
    """0-dim bool: every entry finite. One reduction and no temporary of ``t``'s size (``isfinite(t)``
    would allocate ``|t|`` and a bool tensor: 0.6 GB for a float32 128256 x 1024 head); min and max
    propagate NaN."""
    if t.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=t.device)
    lo, hi = torch.aminmax(t)
    return torch.isfinite(lo) & torch.isfinite(hi)


def _bad_bias(b: Tensor) -> Tensor:
    """0-dim bool: NaN or +inf somewhere (-inf masks a vocabulary entry, p = 0)."""
    if b.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=b.device)
    hi = b.max()  # NaN propagates
    return torch.isnan(hi) | torch.isposinf(hi)


def check_finite(inputs: dict, biases: dict, results: tuple[Tensor, ...], transform_args: dict) -> None:
    """One host sync: raise ``ValueError`` naming the culprit if an input is non-finite (``hidden`` and
    ``weight`` NaN/inf, a bias NaN/+inf) or a result that should be finite is not.

    Inputs are checked even when the results look fine: a softcap maps ``inf`` to a finite logit and
    hides it from the forward, but not from the gradients (``d_weight`` gets ``inf * 0``).
    Non-finite results from finite inputs mean the transformed logits overflow (tiny temperature, huge
    scale) or every vocabulary entry of a token is masked."""
    flags = [~_all_finite(t) for t in inputs.values()]
    flags += [_bad_bias(b) for b in biases.values() if b is not None]
    flags += [~_all_finite(r) for r in results]
    if not flags or not bool(torch.stack(flags).any()):
        return
    for name, t in inputs.items():
        if not bool(_all_finite(t)):
            raise ValueError(f"{name} contains NaN or inf values (the counted tokens' rows must be finite)")
    for name, b in biases.items():
        if b is not None and bool(_bad_bias(b)):
            raise ValueError(f"{name} contains NaN or +inf values (-inf is allowed: it masks a vocabulary entry)")
    lse_like = results[0]
    if bool((lse_like == -math.inf).any()):
        raise ValueError(
            "every vocabulary entry is masked (-inf bias) for at least one counted token: its log-softmax is undefined"
        )
    shown = ", ".join(f"{k}={v}" for k, v in transform_args.items())
    raise ValueError(
        f"the transformed logits overflow the accumulation precision ({shown}): a temperature this "
        "small or a scale this large leaves no finite log-sum-exp; rescale the head or the transform"
    )
