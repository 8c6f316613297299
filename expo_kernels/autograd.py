"""Registered torch ops + autograd for the fused log-prob op; the backend is chosen here.

The op is registered with ``torch.library.custom_op`` so that ``torch.compile`` treats it as one
opaque node (with shape-only fake implementations), and its backward is another registered op
that recomputes logits tile by tile from the saved ``lse``.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import _validation as V
from .ops import LogitTransform, TokenOutputs
from .ops import torch_backend

BACKENDS = ("triton", "native", "torch")
BACKEND_ENV = "EXPO_KERNELS_BACKEND"


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _native_available(device: torch.device) -> bool:
    """The C++ CPU backend (csrc/): CPU tensors, built/loaded on first use, off with EXPO_KERNELS_NATIVE=0.

    A failed build warns once and leaves CPU tensors on the torch backend."""
    if device.type != "cpu":
        return False
    from . import _native_build

    return _native_build.ensure_loaded()


def available_backends(device="cpu") -> list:
    """Backends that can run on ``device``, fastest first."""
    device = torch.device(device)
    names = []
    if _native_available(device):
        names.append("native")
    if _triton_importable() and (device.type == "cuda" or _interpreting()):
        names.append("triton")
    names.append("torch")
    return names


def resolve_backend(requested: Optional[str], device: torch.device) -> str:
    """``backend=`` argument, else ``$EXPO_KERNELS_BACKEND``, else the fastest for the device."""
    name = requested if requested is not None else os.environ.get(BACKEND_ENV) or None
    source = "backend" if requested is not None else BACKEND_ENV
    if name is None:
        if device.type == "cuda" and _triton_importable():
            return "triton"
        return "native" if _native_available(device) else "torch"
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    if name not in available_backends(device):
        if name == "native":
            from . import _native_build

            why = _native_build.status()["reason"] if device.type == "cpu" else "it runs on CPU tensors only"
            raise ValueError(f"{source}='native' cannot run on {device.type} tensors: {why}")
        raise ValueError(
            f"{source}={name!r} cannot run on {device.type} tensors: the triton backend needs CUDA tensors "
            "(or TRITON_INTERPRET=1 set before importing expo_kernels, for CPU testing) and triton installed"
        )
    return name


def _backend_module(name: str):
    if name == "triton":
        from .ops import triton_backend

        return triton_backend
    if name == "native":
        from .ops import native_backend

        return native_backend
    return torch_backend


def _valid_rows(labels: Tensor, ignore_index: int, vocab: int) -> Optional[Tensor]:
    """Indices of the non-ignored tokens (None when all are valid); checks the label range."""
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}; found {first}")
    if bool(valid.all()):
        return None
    return valid.nonzero().squeeze(1)


def _counted_rows(labels: Tensor, ignore_index: int, vocab: int):
    """``(rows, pick)``: the indices of the counted tokens (None when all count; labels range-checked)
    and a function selecting those rows of any per-token tensor. Ignored tokens cost nothing: every
    op compacts them away before a kernel runs."""
    rows = _valid_rows(labels, ignore_index, vocab)
    return rows, ((lambda t: t) if rows is None else (lambda t: t.index_select(0, rows)))


def result_dtype(input_dtype: torch.dtype) -> torch.dtype:
    """Per-token results are float32, or float64 for float64 inputs (gradcheck, small studies)."""
    return torch.float64 if input_dtype == torch.float64 else torch.float32


def _scatter(values: Tensor, rows: Optional[Tensor], n: int) -> Tensor:
    if rows is None:
        return values
    out = values.new_zeros(n)
    return out.index_copy_(0, rows, values)


@torch.library.custom_op("expo_kernels::linear_logprobs", mutates_args=())
def _linear_logprobs_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    ignore_index: int,
    logit_scale: float,
    softcap: Optional[float],
    temperature: float,
    with_stats: bool,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """hidden [N, H], labels [N] -> (logp, lse, entropy, mean_logit, is_top1, log_sum_p2), each [N]
    (the four statistics are empty tensors when ``with_stats`` is False)."""
    n = labels.shape[0]
    rows, pick = _counted_rows(labels, ignore_index, weight.shape[0])
    h = pick(hidden)
    transform = LogitTransform(logit_scale, softcap, temperature)
    out: TokenOutputs = _backend_module(backend).forward(h.contiguous(), weight, bias, pick(labels).long(), transform,
                                                         with_stats)
    if not bool(torch.isfinite(out.lse).all()):
        V.raise_for_non_finite(hidden=h, weight=weight, bias=bias)
    if with_stats:
        stats = [_scatter(t, rows, n) for t in out[2:]]
    else:
        empty = hidden.new_empty(0, dtype=result_dtype(hidden.dtype))
        stats = [empty, empty.clone(), empty.bool(), empty.clone()]
    return (_scatter(out.logp, rows, n), _scatter(out.lse, rows, n), *stats)


@_linear_logprobs_op.register_fake
def _(hidden, weight, bias, labels, ignore_index, logit_scale, softcap, temperature, with_stats, backend):
    n = labels.shape[0]
    dtype = result_dtype(hidden.dtype)
    per_token = hidden.new_empty(n, dtype=dtype)
    k = n if with_stats else 0
    stat = hidden.new_empty(k, dtype=dtype)
    return per_token, per_token.clone(), stat, stat.clone(), hidden.new_empty(k, dtype=torch.bool), stat.clone()


@torch.library.custom_op("expo_kernels::linear_logprobs_backward", mutates_args=())
def _linear_logprobs_backward_op(
    grad_logp: Tensor,
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    lse: Tensor,
    ignore_index: int,
    logit_scale: float,
    softcap: Optional[float],
    temperature: float,
    backend: str,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(d_hidden [N, H], d_weight [V, H], d_bias [V]); an empty tensor for each gradient not needed."""
    rows, pick = _counted_rows(labels, ignore_index, weight.shape[0])
    d_h, d_w, d_b = _backend_module(backend).backward(
        pick(grad_logp).to(result_dtype(hidden.dtype)).contiguous(),
        pick(hidden).contiguous(),
        weight,
        bias,
        pick(labels).long(),
        pick(lse),
        LogitTransform(logit_scale, softcap, temperature),
        need_hidden,
        need_weight,
        need_bias and bias is not None,
    )
    return _pack_grads(d_h, d_w, d_b, hidden, rows)


def _pack_grads(d_h, d_w, d_b, hidden, rows):
    """Scatter d_hidden back to all rows; an empty tensor for each gradient not computed
    (registered ops cannot return None)."""
    empty = hidden.new_empty(0)
    if d_h is not None and rows is not None:
        d_h = hidden.new_zeros(hidden.shape).index_copy_(0, rows, d_h)
    return (
        d_h if d_h is not None else empty,
        d_w if d_w is not None else empty.clone(),
        d_b if d_b is not None else empty.clone(),
    )


def _fake_grads(hidden, weight, bias, need_hidden, need_weight, need_bias):
    return (
        hidden.new_empty(hidden.shape if need_hidden else (0,)),
        weight.new_empty(weight.shape if need_weight else (0,)),
        weight.new_empty(bias.shape if (need_bias and bias is not None) else (0,)),
    )


@_linear_logprobs_backward_op.register_fake
def _(grad_logp, hidden, weight, bias, labels, lse, ignore_index, logit_scale, softcap, temperature, backend,
      need_hidden, need_weight, need_bias):
    return _fake_grads(hidden, weight, bias, need_hidden, need_weight, need_bias)


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, ignore_index, logit_scale, softcap, temperature, _, backend = inputs
    ctx.save_for_backward(hidden, weight, bias, labels, output[1])
    ctx.params = (ignore_index, logit_scale, softcap, temperature, backend)


def _backward(ctx, grad_logp, *_stat_grads):
    hidden, weight, bias, labels, lse = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    if grad_logp is None or not (need_h or need_w or need_b):
        return (None,) * 10
    d_h, d_w, d_b = _linear_logprobs_backward_op(
        grad_logp, hidden, weight, bias, labels, lse, *ctx.params, need_h, need_w, need_b
    )
    return (d_h if need_h else None, d_w if need_w else None, d_b if need_b else None) + (None,) * 7


torch.library.register_autograd(
    "expo_kernels::linear_logprobs", _backward, setup_context=_setup_context
)


def _check_scalars(temperature, logit_scale, softcap, ignore_index) -> None:
    V.check_positive_finite("temperature", temperature)
    V.check_positive_finite("logit_scale", logit_scale, allow_none=True)
    V.check_positive_finite("softcap", softcap, allow_none=True)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")


def _scalar_args(ignore_index, logit_scale, softcap, temperature):
    """The registered ops' scalar arguments, in schema order (logit_scale None -> 1.0)."""
    return (
        int(ignore_index),
        float(logit_scale) if logit_scale is not None else 1.0,
        float(softcap) if softcap is not None else None,
        float(temperature),
    )


class TokenStats(NamedTuple):
    """Per-token statistics of the head's distribution, shaped like ``labels``, without gradient.

    Zero (False) at ignored positions.
    """

    lse: Tensor  # log sum_v exp(z_v)
    entropy: Tensor  # -sum_v p_v log p_v
    mean_logit: Tensor  # sum_v z_v / V
    is_top1: Tensor  # bool: label == argmax_v z_v (first maximum on ties)
    log_sum_p2: Tensor  # log sum_v p_v^2 (WPO weighting)


def _group_size(process_group) -> int:
    import torch.distributed as dist

    return dist.get_world_size(process_group)


def linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Optional[Tensor] = None,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    logit_scale: Optional[float] = None,
    softcap: Optional[float] = None,
    return_stats: bool = False,
    backend: Optional[str] = None,
    process_group=None,
):
    """Per-token ``log softmax(z)[label]`` of ``z = softcap(hidden @ weight.T + bias) ...`` without
    ever materializing ``[tokens, vocab]`` logits.

    Args:
        hidden: ``[..., H]`` float32/bfloat16/float16/float64, any strides.
        weight: ``[V, H]`` LM-head weight, same dtype and device as ``hidden``.
        labels: ``[...]`` integer (``hidden.shape[:-1]``), each in ``[0, V)`` or ``ignore_index``.
        bias: optional ``[V]``.
        temperature, logit_scale, softcap: the logit transform
            ``z = softcap * tanh(raw * logit_scale / softcap) / temperature`` (see ``LogitTransform``).
        return_stats: also return ``TokenStats`` (no gradient).
        backend: ``"triton"``, ``"native"`` or ``"torch"``; default from ``$EXPO_KERNELS_BACKEND`` or the
            device (Triton for CUDA tensors, the native C++ backend for CPU tensors when it builds).
        process_group: a ``torch.distributed`` group over which the head is sharded along the
            vocabulary: ``weight``/``bias`` are then this rank's ``torch.chunk(W, world_size)[rank]``
            rows, ``hidden``/``labels`` replicated, labels global ids (see
            :func:`expo_kernels.distributed.vocab_parallel_linear_logprobs`). Ignored when the group
            has one rank.

    Returns:
        ``logp`` shaped like ``labels``, float32 (float64 for float64 inputs), exactly 0 at ignored
        positions, differentiable
        w.r.t. ``hidden``, ``weight`` and ``bias``; with ``return_stats``, ``(logp, TokenStats)``.
    """
    if process_group is not None and _group_size(process_group) > 1:
        from .distributed import vocab_parallel_linear_logprobs

        return vocab_parallel_linear_logprobs(
            hidden, weight, labels, bias, process_group=process_group, ignore_index=ignore_index,
            temperature=temperature, logit_scale=logit_scale, softcap=softcap, return_stats=return_stats,
            backend=backend,
        )
    V.check_linear_head(hidden, weight, labels, bias)
    _check_scalars(temperature, logit_scale, softcap, ignore_index)
    out = _linear_logprobs_op(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        bias,
        labels.reshape(-1),
        *_scalar_args(ignore_index, logit_scale, softcap, temperature),
        bool(return_stats),
        resolve_backend(backend, hidden.device),
    )
    logp = out[0].view(labels.shape)
    if not return_stats:
        return logp
    return logp, TokenStats(*(t.detach().view(labels.shape) for t in (out[1],) + tuple(out[2:])))


# --------------------------------------------------------------------------------------------
# Two heads over the same tokens: per-token KL(pi_ref || pi_theta) over the full vocabulary.
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("expo_kernels::linear_token_kl", mutates_args=())
def _linear_token_kl_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    ref_hidden: Tensor,
    ref_weight: Tensor,
    ref_bias: Optional[Tensor],
    labels: Tensor,
    ignore_index: int,
    logit_scale: float,
    softcap: Optional[float],
    temperature: float,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    """hidden [N, H], ref_hidden [N, Hr], labels [N] (a mask) -> (kl, lse_policy, lse_ref), each [N]."""
    n = labels.shape[0]
    rows, pick = _counted_rows(labels, ignore_index, weight.shape[0])
    outs = _backend_module(backend).token_kl_forward(
        pick(hidden).contiguous(), weight, bias, pick(ref_hidden).contiguous(), ref_weight, ref_bias,
        LogitTransform(logit_scale, softcap, temperature),
    )
    if not bool(torch.isfinite(outs[0]).all()):
        V.raise_for_non_finite(hidden=pick(hidden), weight=weight, bias=bias, ref_hidden=pick(ref_hidden),
                               ref_weight=ref_weight, ref_bias=ref_bias)
    return tuple(_scatter(t, rows, n) for t in outs)


@_linear_token_kl_op.register_fake
def _(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, ignore_index, logit_scale, softcap,
      temperature, backend):
    out = hidden.new_empty(labels.shape[0], dtype=result_dtype(hidden.dtype))
    return out, out.clone(), out.clone()


@torch.library.custom_op("expo_kernels::linear_token_kl_backward", mutates_args=())
def _linear_token_kl_backward_op(
    grad_kl: Tensor,
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    ref_hidden: Tensor,
    ref_weight: Tensor,
    ref_bias: Optional[Tensor],
    labels: Tensor,
    lse_p: Tensor,
    lse_r: Tensor,
    ignore_index: int,
    logit_scale: float,
    softcap: Optional[float],
    temperature: float,
    backend: str,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Policy-head gradients (d_hidden, d_weight, d_bias); empty tensors where not needed."""
    rows, pick = _counted_rows(labels, ignore_index, weight.shape[0])
    d_h, d_w, d_b = _backend_module(backend).token_kl_backward(
        pick(grad_kl).to(result_dtype(hidden.dtype)).contiguous(), pick(hidden).contiguous(), weight, bias,
        pick(ref_hidden).contiguous(), ref_weight, ref_bias, pick(lse_p), pick(lse_r),
        LogitTransform(logit_scale, softcap, temperature), need_hidden, need_weight,
        need_bias and bias is not None,
    )
    return _pack_grads(d_h, d_w, d_b, hidden, rows)


@_linear_token_kl_backward_op.register_fake
def _(grad_kl, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lse_p, lse_r, ignore_index,
      logit_scale, softcap, temperature, backend, need_hidden, need_weight, need_bias):
    return _fake_grads(hidden, weight, bias, need_hidden, need_weight, need_bias)


def _setup_token_kl_context(ctx, inputs, output):
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels = inputs[:7]
    ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, output[1], output[2])
    ctx.params = tuple(inputs[7:])


def _token_kl_backward(ctx, grad_kl, *_lse_grads):
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lse_p, lse_r = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    if any(ctx.needs_input_grad[3:6]):
        raise RuntimeError("linear_token_kl: the reference head is frozen; detach ref_hidden / ref_weight / ref_bias")
    if grad_kl is None or not (need_h or need_w or need_b):
        return (None,) * 12
    d_h, d_w, d_b = _linear_token_kl_backward_op(
        grad_kl, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lse_p, lse_r, *ctx.params,
        need_h, need_w, need_b,
    )
    return (d_h if need_h else None, d_w if need_w else None, d_b if need_b else None) + (None,) * 9


torch.library.register_autograd(
    "expo_kernels::linear_token_kl", _token_kl_backward, setup_context=_setup_token_kl_context
)


def linear_token_kl(
    hidden: Tensor,
    weight: Tensor,
    ref_hidden: Tensor,
    ref_weight: Tensor,
    labels: Tensor,
    bias: Optional[Tensor] = None,
    ref_bias: Optional[Tensor] = None,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    logit_scale: Optional[float] = None,
    softcap: Optional[float] = None,
    backend: Optional[str] = None,
    process_group=None,
) -> Tensor:
    """Per-token ``KL(pi_ref || pi_theta)`` over the full vocabulary, without ``[tokens, vocab]`` logits.

    ``KL_n = sum_v q_v (zr_v - zp_v) - lse(zr) + lse(zp)`` with ``q = softmax(zr)``; EXPO's explicit
    regularizer (``kl_estimator="token"``) and the distillation loss use it.

    Args:
        hidden, weight, bias: the policy head (``[..., H]``, ``[V, H]``, ``[V]``); differentiable.
        ref_hidden, ref_weight, ref_bias: the frozen reference head over the same tokens
            (``[..., Hr]``, ``[V, Hr]``, ``[V]``); no gradient flows to them.
        labels: ``[...]``; only marks which tokens count (``ignore_index`` -> KL 0, no gradient).
        temperature, logit_scale, softcap: the logit transform, applied to both heads.
        process_group: vocab-parallel group: both heads are this rank's vocab shards (see
            :func:`expo_kernels.distributed.vocab_parallel_linear_token_kl`); ignored with one rank.

    Returns:
        ``[...]`` shaped like ``labels``, float32 (float64 for float64 inputs).
    """
    if process_group is not None and _group_size(process_group) > 1:
        from .distributed import vocab_parallel_linear_token_kl

        return vocab_parallel_linear_token_kl(
            hidden, weight, ref_hidden, ref_weight, labels, bias, ref_bias, process_group=process_group,
            ignore_index=ignore_index, temperature=temperature, logit_scale=logit_scale, softcap=softcap,
            backend=backend,
        )
    V.check_linear_head(hidden, weight, labels, bias)
    V.check_linear_head(ref_hidden, ref_weight, labels, ref_bias, prefix="ref_")
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"ref_weight must have the policy's vocabulary size V = {weight.shape[0]}, "
                         f"got {ref_weight.shape[0]}")
    if ref_hidden.dtype != hidden.dtype:
        raise TypeError(f"ref_hidden.dtype ({ref_hidden.dtype}) must match hidden.dtype ({hidden.dtype})")
    V.check_same_device(hidden=hidden, ref_hidden=ref_hidden)
    _check_scalars(temperature, logit_scale, softcap, ignore_index)
    kl, _, _ = _linear_token_kl_op(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias,
        ref_hidden.reshape(-1, ref_hidden.shape[-1]), ref_weight, ref_bias, labels.reshape(-1),
        *_scalar_args(ignore_index, logit_scale, softcap, temperature), resolve_backend(backend, hidden.device),
    )
    return kl.view(labels.shape)
