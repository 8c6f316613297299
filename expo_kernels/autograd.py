"""Registered torch ops + autograd for the fused ops: only the registrations live here.

Each op is registered with ``torch.library.custom_op`` so that ``torch.compile`` treats it as one
opaque node (with shape-only fake implementations); its backward is another registered op that
recomputes logits tile by tile from the saved ``lse``. ``linear_logprobs`` runs the execution path it is
handed (``_dispatch.plan`` chose it; ``Path`` values as strings): the backend's fused kernels, library
GEMMs + Triton epilogues, or one GEMM whose logits are kept for the backward (both in
``ops.library_gemm``). Backend and path choice and the checks around a backend call are in
``expo_kernels._dispatch``; the public functions in ``expo_kernels.functional``.
"""

from __future__ import annotations

# typing.Optional / Tuple on purpose: torch.library infers the op schemas from these annotations, and
# every torch >= 2.4 understands the typing forms (ruff UP rules are off for this file).
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _dispatch as dispatch
from . import ops
from .ops import LogitTransform, TokenOutputs, library_gemm
from .ops.options import Path
from .ops.state import finalize_logprobs

_FUSED, _LIBRARY_GEMM, _KEPT_LOGITS = Path.FUSED.value, Path.LIBRARY_GEMM.value, Path.KEPT_LOGITS.value


def _no_double_backward(op_name: str):
    """Autograd formula of a backward op: its inputs' gradients (grad of grad) are not implemented."""

    def backward(ctx, *grads):
        raise NotImplementedError(
            f"expo_kernels::{op_name} has no double backward (gradient of a gradient, "
            "e.g. create_graph=True followed by another backward); it is not supported"
        )

    return backward


#: The device types whose autocast the ops step out of (``_autocast_transparent``).
AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")
_AUTOCAST_LIB = torch.library.Library("expo_kernels", "IMPL")


def _autocast_transparent(op) -> None:
    """Run ``op`` inside a ``torch.autocast`` region as outside one: in its inputs' dtypes, with autocast
    off for its implementation (docs/design.md, "Mixed precision").

    The kernel ``torch.library.register_autocast`` installs, minus its cast: that rule casts every
    floating input to one fixed dtype per device type (not the region's, which may be bfloat16 or float16),
    float32 ``lse``/``grad_logp`` of the backward ops and float64 inputs included, and after the backend
    and path were planned for the uncast dtype. The public functions cast the GEMM operands themselves,
    before planning (``functional.head_autocast``); this kernel keeps autocast from recasting the float32
    accumulation inside the op (its torch GEMMs would run in bfloat16), in a forward, in a backward run
    inside the region, and in a compiled graph alike (the dispatcher, not the Python entry, applies it)."""
    for device_type in AUTOCAST_DEVICE_TYPES:
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(_keyset, *args, _excluded=excluded):
            with torch._C._ExcludeDispatchKeyGuard(_excluded):
                return op._opoverload(*args)

        _AUTOCAST_LIB.impl(op._name, kernel, key, with_keyset=True)


def _transform_args(logit_scale, softcap, temperature) -> dict:
    return {"temperature": temperature, "logit_scale": logit_scale, "softcap": softcap}


@torch.library.custom_op("expo_kernels::linear_logprobs", mutates_args=())
def linear_logprobs_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    ignore_index: int,
    logit_scale: float,
    softcap: Optional[float],
    temperature: float,
    with_stats: bool,
    topk: int,
    backend: str,
    path: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """hidden [N, H], labels [N] -> (logp, lse, entropy, mean_logit, is_top1, log_sum_p2), each [N]
    (the four statistics are empty tensors when ``with_stats`` is False), and ``topk_indices [N, topk]``
    int64 (-1 at ignored tokens; ``[N, 0]`` for ``topk = 0``). The top-k values are re-evaluated
    differentiably from the ids outside the op (``ops.common.topk_logits``). ``path`` (a ``Path`` value,
    checked by ``_dispatch.plan``): ``"fused"`` the backend's kernels; ``"library_gemm"`` library GEMMs +
    Triton epilogues; ``"kept_logits"`` one GEMM for the call, and the counted tokens' logits
    ``[N_counted, V]`` returned last for the backward (``ops.library_gemm``), else an empty tensor."""
    n = labels.shape[0]
    rows, y, pick = dispatch.counted_rows(labels, ignore_index, weight.shape[0])
    h = pick(hidden).contiguous()
    transform = LogitTransform(logit_scale, softcap, temperature)
    kept = hidden.new_empty(0, dtype=dispatch.result_dtype(hidden.dtype))
    if path == _KEPT_LOGITS and h.shape[0] > 0:  # (no counted token: nothing to keep, any path returns empty)
        state, kept = library_gemm.forward_keeping_logits(h, weight, bias, y, transform, with_stats, backend)
    elif path == _LIBRARY_GEMM:
        state = dispatch.library_gemm_module().forward_partial(h, weight, bias, y, transform, with_stats)
    else:
        state = dispatch.backend_module(backend).forward_partial(h, weight, bias, y, transform, with_stats, topk=topk)
    out: TokenOutputs = finalize_logprobs(state, weight.shape[0])
    computed = out.stats() if with_stats else None  # (entropy, mean_logit, is_top1, log_sum_p2)
    # logp may be -inf (a masked label); lse and the statistics are finite for finite inputs
    finite_results = (out.lse,) + ((computed[0], computed[1], computed[3]) if computed is not None else ())
    dispatch.check_finite(
        {"hidden": h, "weight": weight},
        {"bias": bias},
        finite_results,
        _transform_args(logit_scale, softcap, temperature),
    )
    if computed is not None:
        stats = [dispatch.scatter(t, rows, n) for t in computed]
    else:
        empty = hidden.new_empty(0, dtype=dispatch.result_dtype(hidden.dtype))
        stats = [empty, empty.clone(), empty.bool(), empty.clone()]
    ids = out.topk_indices if out.topk_indices is not None else labels.new_empty((h.shape[0], 0), dtype=torch.long)
    return dispatch.unaliased(
        (
            dispatch.scatter(out.logp, rows, n),
            dispatch.scatter(out.lse, rows, n),
            *stats,
            dispatch.scatter_rows(ids, rows, n, -1),
            kept,
        ),
        (hidden, weight, bias, labels),
    )


@linear_logprobs_op.register_fake
def _(
    hidden,
    weight,
    bias,
    labels,
    ignore_index,
    logit_scale,
    softcap,
    temperature,
    with_stats,
    topk,
    backend,
    path,
):
    n = labels.shape[0]
    dtype = dispatch.result_dtype(hidden.dtype)
    per_token = hidden.new_empty(n, dtype=dtype)
    k = n if with_stats else 0
    stat = hidden.new_empty(k, dtype=dtype)
    return (
        per_token,
        per_token.clone(),
        stat,
        stat.clone(),
        hidden.new_empty(k, dtype=torch.bool),
        stat.clone(),
        hidden.new_empty((n, topk), dtype=torch.long),
        # the counted tokens' logits: a data-dependent row count (the caller keeps none under torch.compile)
        hidden.new_empty(
            (torch.library.get_ctx().new_dynamic_size(), weight.shape[0]) if path == _KEPT_LOGITS else (0,)
        ),
    )


@torch.library.custom_op("expo_kernels::linear_logprobs_backward", mutates_args=())
def linear_logprobs_backward_op(
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
    path: str,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(d_hidden [N, H], d_weight [V, H], d_bias [V]); an empty tensor for each gradient not needed.
    Recomputes the logits: on library GEMMs for ``path="library_gemm"``, else with the backend's fused
    kernels (also after ``"kept_logits"``: a second backward, or ``create_graph=True``)."""
    rows, y, pick = dispatch.counted_rows(labels, ignore_index, weight.shape[0])
    module = dispatch.library_gemm_module() if path == _LIBRARY_GEMM else dispatch.backward_module(backend)
    d_h, d_w, d_b = module.backward(
        pick(grad_logp).to(dispatch.result_dtype(hidden.dtype)).contiguous(),
        pick(hidden).contiguous(),
        weight,
        bias,
        y,
        pick(lse).contiguous(),
        LogitTransform(logit_scale, softcap, temperature),
        need_hidden,
        need_weight,
        need_bias and bias is not None,
    )
    return dispatch.unaliased(_pack_grads(d_h, d_w, d_b, hidden, rows), (grad_logp, hidden, weight, bias, labels, lse))


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


@linear_logprobs_backward_op.register_fake
def _(
    grad_logp,
    hidden,
    weight,
    bias,
    labels,
    lse,
    ignore_index,
    logit_scale,
    softcap,
    temperature,
    backend,
    path,
    need_hidden,
    need_weight,
    need_bias,
):
    return _fake_grads(hidden, weight, bias, need_hidden, need_weight, need_bias)


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, ignore_index, logit_scale, softcap, temperature, _, _topk, backend, path = inputs
    ctx.save_for_backward(hidden, weight, bias, labels, output[1])
    ctx.params = (ignore_index, logit_scale, softcap, temperature, backend, path)
    # Not a saved tensor: the first backward overwrites it with dz and drops it, and any later backward
    # (retain_graph=True) recomputes the logits. Detached, so that ctx does not hold its own output's graph.
    ctx.kept_logits = output[7].detach() if output[7].numel() > 0 else None
    # no zero-filled gradients for the outputs nobody differentiates (the kept logits are [N, V])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_logp, *_stat_grads):
    hidden, weight, bias, labels, lse = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    if grad_logp is None or not (need_h or need_w or need_b):
        return (None,) * 12
    kept, ctx.kept_logits = ctx.kept_logits, None
    if ctx.params[5] == _KEPT_LOGITS and not torch.is_grad_enabled():
        d_h, d_w, d_b = _backward_from_kept_logits(kept, grad_logp, hidden, weight, bias, labels, lse, ctx.params, ctx)
    else:  # recompute (create_graph=True too: the op refuses a double backward)
        d_h, d_w, d_b = linear_logprobs_backward_op(
            grad_logp, hidden, weight, bias, labels, lse, *ctx.params, need_h, need_w, need_b
        )
    return (d_h if need_h else None, d_w if need_w else None, d_b if need_b else None) + (None,) * 9


def _backward_from_kept_logits(kept, grad_logp, hidden, weight, bias, labels, lse, params, ctx):
    """The backward from the forward's logits (overwritten by dz): plain eager code in the autograd
    formula, as the logits are kept only outside ``torch.compile``.

    ``kept`` is None on a second backward of the same graph (``retain_graph=True``, ``gradcheck``'s
    reentrancy check): the logits are then formed again by the forward's own single GEMM, so that every
    backward of one graph gives the same bits (a recompute by the fused kernels would sum in another
    order and differ in the last bits)."""
    ignore_index, logit_scale, softcap, temperature, backend, _path = params
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    rows, y, pick = dispatch.counted_rows(labels, ignore_index, weight.shape[0])
    h = pick(hidden).contiguous()
    transform = LogitTransform(logit_scale, softcap, temperature)
    if kept is None:
        if h.shape[0] == 0:  # no counted token: nothing was kept, and every gradient is zero
            return linear_logprobs_backward_op(
                grad_logp, hidden, weight, bias, labels, lse, *params[:5], _FUSED, need_h, need_w, need_b
            )
        _, kept = library_gemm.forward_keeping_logits(h, weight, bias, y, transform, False, backend)
    d_h, d_w, d_b = library_gemm.backward_from_logits(
        kept,
        pick(grad_logp).contiguous(),
        h,
        weight,
        bias,
        y,
        pick(lse).contiguous(),
        transform,
        (need_h, need_w, need_b and bias is not None),
        backend,
    )
    if d_h is not None and rows is not None:
        d_h = hidden.new_zeros(hidden.shape).index_copy_(0, rows, d_h)
    return d_h, d_w, d_b


torch.library.register_autograd("expo_kernels::linear_logprobs", _backward, setup_context=_setup_context)
torch.library.register_autograd("expo_kernels::linear_logprobs_backward", _no_double_backward("linear_logprobs"))
_autocast_transparent(linear_logprobs_op)
_autocast_transparent(linear_logprobs_backward_op)


@torch.library.custom_op("expo_kernels::linear_token_kl", mutates_args=())
def linear_token_kl_op(
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
    rows, _, pick = dispatch.counted_rows(labels, ignore_index, weight.shape[0])
    h, hr = pick(hidden).contiguous(), pick(ref_hidden).contiguous()
    kl, lse_p, lse_r = ops.token_kl_forward(
        dispatch.backend_module(backend),
        h,
        weight,
        bias,
        hr,
        ref_weight,
        ref_bias,
        LogitTransform(logit_scale, softcap, temperature),
    )
    # the KL itself may be +inf (the policy masks an entry the reference does not); both lse are finite
    dispatch.check_finite(
        {"hidden": h, "weight": weight, "ref_hidden": hr, "ref_weight": ref_weight},
        {"bias": bias, "ref_bias": ref_bias},
        (lse_p, lse_r),
        _transform_args(logit_scale, softcap, temperature),
    )
    return dispatch.unaliased(
        tuple(dispatch.scatter(t, rows, n) for t in (kl, lse_p, lse_r)),
        (hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels),
    )


@linear_token_kl_op.register_fake
def _(
    hidden,
    weight,
    bias,
    ref_hidden,
    ref_weight,
    ref_bias,
    labels,
    ignore_index,
    logit_scale,
    softcap,
    temperature,
    backend,
):
    out = hidden.new_empty(labels.shape[0], dtype=dispatch.result_dtype(hidden.dtype))
    return out, out.clone(), out.clone()


@torch.library.custom_op("expo_kernels::linear_token_kl_backward", mutates_args=())
def linear_token_kl_backward_op(
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
    rows, _, pick = dispatch.counted_rows(labels, ignore_index, weight.shape[0])
    d_h, d_w, d_b = dispatch.backward_module(backend).token_kl_backward(
        pick(grad_kl).to(dispatch.result_dtype(hidden.dtype)).contiguous(),
        pick(hidden).contiguous(),
        weight,
        bias,
        pick(ref_hidden).contiguous(),
        ref_weight,
        ref_bias,
        pick(lse_p).contiguous(),
        pick(lse_r).contiguous(),
        LogitTransform(logit_scale, softcap, temperature),
        need_hidden,
        need_weight,
        need_bias and bias is not None,
    )
    return dispatch.unaliased(
        _pack_grads(d_h, d_w, d_b, hidden, rows),
        (grad_kl, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lse_p, lse_r),
    )


@linear_token_kl_backward_op.register_fake
def _(
    grad_kl,
    hidden,
    weight,
    bias,
    ref_hidden,
    ref_weight,
    ref_bias,
    labels,
    lse_p,
    lse_r,
    ignore_index,
    logit_scale,
    softcap,
    temperature,
    backend,
    need_hidden,
    need_weight,
    need_bias,
):
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
    d_h, d_w, d_b = linear_token_kl_backward_op(
        grad_kl,
        hidden,
        weight,
        bias,
        ref_hidden,
        ref_weight,
        ref_bias,
        labels,
        lse_p,
        lse_r,
        *ctx.params,
        need_h,
        need_w,
        need_b,
    )
    return (d_h if need_h else None, d_w if need_w else None, d_b if need_b else None) + (None,) * 9


torch.library.register_autograd(
    "expo_kernels::linear_token_kl", _token_kl_backward, setup_context=_setup_token_kl_context
)
torch.library.register_autograd("expo_kernels::linear_token_kl_backward", _no_double_backward("linear_token_kl"))
_autocast_transparent(linear_token_kl_op)
_autocast_transparent(linear_token_kl_backward_op)
