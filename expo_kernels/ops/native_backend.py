"""Native CPU backend: thin wrappers over the C++17 (ATen + OpenMP) kernels of ``csrc/expo_native.cpp``.

Same functions and semantics as ``torch_backend`` (the specification; the contract is
``expo_kernels.ops.Backend``): ``forward_partial``, ``backward``, ``token_kl_forward_partial``,
``token_kl_backward``, for CPU tensors in float32 / bfloat16 / float16
(float32 accumulation; gradients returned in the input dtypes) and float64 (float64 throughout).

Work is tiled as ``TOKEN_BLOCK`` tokens x ``VOCAB_TILE`` vocabulary entries: the largest temporary
is one float32 ``[TOKEN_BLOCK, VOCAB_TILE]`` logit tile (two for the token KL), plus, for bf16/fp16
weights, one float32 weight tile and one float32 ``d_weight`` tile. Never ``[N, V]``.

Build and control (see ``expo_kernels.ops._native_build``):

* compiled on first use into ``$EXPO_KERNELS_BUILD_DIR`` (default ``~/.cache/expo_kernels/native``)
  with ``torch.utils.cpp_extension.load``; needs a C++17 compiler and ninja;
* ``EXPO_KERNELS_NATIVE=0`` disables it: CPU tensors then use the torch backend;
* if the build fails, ``available()`` is False, CPU tensors use the torch backend and one
  ``RuntimeWarning`` says why (``python -m expo_kernels.info`` prints the whole error);
* threads: ATen's intra-op thread pool (``torch.set_num_threads`` / ``OMP_NUM_THREADS``).
  Results do not depend on how rows are split across threads.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import _native_build
from . import state as online_state
from .common import LogitTransform

# 1024 x 8192 float32 = 32 MiB: GEMMs of this size run near the CPU's peak.
TOKEN_BLOCK = 1024
VOCAB_TILE = 8192
# For bf16/fp16 weights the float32 copy of one weight tile is bounded by this many bytes.
WEIGHT_TILE_BYTES = 64 << 20


def available(warn: bool = True) -> bool:
    """True when the extension is built and loaded (builds it on the first call)."""
    return _native_build.ensure_loaded(warn=warn)


def _ops() -> Any:
    """``torch.ops.expo_native`` (the C++ ops), building or loading the extension first."""
    if not _native_build.ensure_loaded():
        raise RuntimeError("expo_kernels native backend is not available: " + str(_native_build.status()["reason"]))
    return torch.ops.expo_native


def _vocab_tile(weight: torch.Tensor) -> int:
    tile = VOCAB_TILE
    if weight.dtype not in (torch.float32, torch.float64):
        tile = min(tile, max(64, WEIGHT_TILE_BYTES // (4 * max(1, weight.shape[1]))))
    return int(tile)


def _transform_scalars(transform: LogitTransform) -> tuple[float, float | None, float]:
    """The transform as the C++ ops take it: (logit_scale, softcap or None, 1 / temperature)."""
    return float(transform.logit_scale), transform.softcap, float(transform.inv_temperature)


@torch.no_grad()  # the C++ ops are plain kernels; autograd lives in expo_kernels.autograd
def forward_partial(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    transform: LogitTransform,
    with_stats: bool,
    vocab_start: int = 0,
    topk: int = 0,
) -> online_state.LogprobState:
    """As ``torch_backend.forward_partial``. With ``topk=k`` each row of a logit tile, once folded, is
    scanned in id order into the token's running k best (an insertion into a sorted [k] list, entered
    only above the k-th value): no sort, the tie order (lower id first) by construction."""
    out = _ops().logprobs_forward(
        hidden,
        weight,
        bias,
        labels,
        *_transform_scalars(transform),
        bool(with_stats),
        int(vocab_start),
        TOKEN_BLOCK,
        _vocab_tile(weight),
        int(topk),
    )
    if topk <= 0:
        return online_state.LogprobState(*out)
    # the state's fields, then the [N, k] values and ids
    return online_state.LogprobState(*out[:-2])._replace(topk_values=out[-2], topk_ids=out[-1])


def _wanted_grad(t: torch.Tensor, wanted: bool) -> torch.Tensor | None:
    """A gradient the C++ op returns (an empty tensor when not computed) as the backend contract wants it:
    None when it was not asked for."""
    return t if wanted else None


@torch.no_grad()  # the C++ ops are plain kernels; autograd lives in expo_kernels.autograd
def backward(
    grad_logp: Tensor,
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    lse: Tensor,
    transform: LogitTransform,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    vocab_start: int = 0,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    need_bias = bool(need_bias and bias is not None)
    d_h, d_w, d_b = _ops().logprobs_backward(
        grad_logp,
        hidden,
        weight,
        bias,
        labels,
        lse,
        *_transform_scalars(transform),
        bool(need_hidden),
        bool(need_weight),
        need_bias,
        int(vocab_start),
        TOKEN_BLOCK,
        _vocab_tile(weight),
    )
    return _wanted_grad(d_h, need_hidden), _wanted_grad(d_w, need_weight), _wanted_grad(d_b, need_bias)


@torch.no_grad()  # the C++ ops are plain kernels; autograd lives in expo_kernels.autograd
def token_kl_forward_partial(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    ref_hidden: Tensor,
    ref_weight: Tensor,
    ref_bias: Tensor | None,
    transform: LogitTransform,
) -> online_state.TokenKLState:
    return online_state.TokenKLState(
        *_ops().token_kl_forward(
            hidden,
            weight,
            bias,
            ref_hidden,
            ref_weight,
            ref_bias,
            *_transform_scalars(transform),
            TOKEN_BLOCK,
            min(_vocab_tile(weight), _vocab_tile(ref_weight)),
        )
    )


@torch.no_grad()  # the C++ ops are plain kernels; autograd lives in expo_kernels.autograd
def token_kl_backward(
    grad_kl: Tensor,
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    ref_hidden: Tensor,
    ref_weight: Tensor,
    ref_bias: Tensor | None,
    lse_p: Tensor,
    lse_r: Tensor,
    transform: LogitTransform,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    need_bias = bool(need_bias and bias is not None)
    d_h, d_w, d_b = _ops().token_kl_backward(
        grad_kl,
        hidden,
        weight,
        bias,
        ref_hidden,
        ref_weight,
        ref_bias,
        lse_p,
        lse_r,
        *_transform_scalars(transform),
        bool(need_hidden),
        bool(need_weight),
        need_bias,
        TOKEN_BLOCK,
        min(_vocab_tile(weight), _vocab_tile(ref_weight)),
    )
    return _wanted_grad(d_h, need_hidden), _wanted_grad(d_w, need_weight), _wanted_grad(d_b, need_bias)
