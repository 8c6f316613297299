"""The Triton epilogues on a logit workspace a library GEMM wrote (``ops/library_gemm.py``; the engine,
``expo_kernels.engine``, through ``ops.epilogues``).

The GEMMs run in the vendor library (cuBLAS through ``torch.mm``); these two kernels do the memory-bound
work between them, on a workspace ``z [n, V]`` of *raw* logits (``h @ W^T``, float32 accumulated; 16-bit
only where the library cannot write float32):

* :func:`fold` — one read of each row: bias, logit transform, then the online softmax state of
  ``ops.state`` (``m, s, z_label`` and, with statistics, ``sz, s2, z_sum, max_before``), merged block
  by block with the same formulas as ``state.sum_fields``. Nothing is written back: the transform is
  cheap to redo in :func:`to_dz`, and a write would cost as much as the read.
* :func:`to_dz` — ``dz = g (onehot - p) dz/draw`` with ``p = exp(min(z - lse, 0))`` (as every
  backend's backward), written in the dtype of the following GEMMs (the head's dtype), in place when
  that is the workspace's own dtype.

Both take one program per (row, vocabulary block group); rows are independent, so there are no
atomics and the result does not depend on the launch order (deterministic).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple, TypeVar

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import state as online_state
from ..common import LogitTransform, interpreting
from .jit import apply_transform, safe_shift, transform_args

__all__ = ["fold", "to_dz", "FOLD_BLOCK_V", "DZ_BLOCK_V"]


class EpilogueConfig(NamedTuple):
    """Launch parameters of an epilogue kernel (shared with the compile gate, benchmarks/gpu/aot_check.py)."""

    block_v: int
    num_warps: int = 8
    num_stages: int = 3
    maxnreg: int | None = None


# One row of a 128k vocabulary is 512 KB of float32: the fold streams it in blocks of 2048 (8 KB,
# 8 floats per thread at 8 warps: two 16-byte loads each), the dz kernel in blocks of 4096 spread
# over a 2-D grid so that a chunk of ~1000 rows still fills every SM.
FOLD_CONFIG = EpilogueConfig(block_v=2048)
DZ_CONFIG = EpilogueConfig(block_v=4096)
FOLD_BLOCK_V, DZ_BLOCK_V = FOLD_CONFIG.block_v, DZ_CONFIG.block_v
# The interpreter runs one program at a time in numpy: small blocks keep the tests quick and still
# cross many block boundaries.
_INTERPRET_BLOCK_V = 64


@triton.jit
def _fold_rows_kernel(
    z_ptr,
    stride_z,
    b_ptr,
    y_ptr,
    out_ptr,
    n_rows,
    V,
    logit_scale,
    softcap,
    inv_temp,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    WITH_STATS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Grid (rows,): one program streams row ``row`` of the raw logits ``z`` into out[slot, row], its LogprobState."""
    row = tl.program_id(0)
    y = tl.load(y_ptr + row)
    z_row = z_ptr + row.to(tl.int64) * stride_z
    neg_inf = float("-inf")
    m = tl.full((), neg_inf, tl.float32)
    s = tl.zeros((), tl.float32)
    z_label = tl.zeros((), tl.float32)
    sz = tl.zeros((), tl.float32)
    s2 = tl.zeros((), tl.float32)
    z_sum = tl.zeros((), tl.float32)
    max_before = tl.full((), neg_inf, tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        valid = cols < V
        raw = tl.load(z_row + cols, mask=valid, other=0.0).to(tl.float32)
        if HAS_BIAS:
            raw += tl.load(b_ptr + cols, mask=valid, other=0.0).to(tl.float32)
        z, _ = apply_transform(raw, logit_scale, softcap, inv_temp, HAS_SOFTCAP)
        z = tl.where(valid, z, neg_inf)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        shift = safe_shift(m_new)
        w = tl.exp(m - shift)  # the old part moved to the new shift; 0 while nothing finite was seen
        e = tl.exp(z - shift)  # 0 at masked / padded entries
        z_label += tl.sum(tl.where((cols == y) & valid, z, 0.0), axis=0)
        if WITH_STATS:
            d = tl.where(e > 0.0, z - shift, 0.0)
            moved = tl.where(s > 0.0, m - shift, 0.0) * s
            sz = w * (sz + moved) + tl.sum(e * d, axis=0)
            s2 = w * w * s2 + tl.sum(e * e, axis=0)
            z_sum += tl.sum(tl.where(z > neg_inf, z, 0.0), axis=0)
            max_before = tl.maximum(max_before, tl.max(tl.where(cols < y, z, neg_inf), axis=0))
        s = w * s + tl.sum(e, axis=0)
        m = m_new
    tl.store(out_ptr + 0 * n_rows + row, m)
    tl.store(out_ptr + 1 * n_rows + row, s)
    tl.store(out_ptr + 2 * n_rows + row, z_label)
    if WITH_STATS:
        tl.store(out_ptr + 3 * n_rows + row, sz)
        tl.store(out_ptr + 4 * n_rows + row, s2)
        tl.store(out_ptr + 5 * n_rows + row, z_sum)
        tl.store(out_ptr + 6 * n_rows + row, max_before)


@triton.jit
def _dz_rows_kernel(
    z_ptr,
    stride_z,
    dz_ptr,
    stride_dz,
    b_ptr,
    y_ptr,
    lse_ptr,
    g_ptr,
    V,
    logit_scale,
    softcap,
    inv_temp,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Grid (rows, vocab blocks): one program writes dz[row, block] = g (onehot - p) dz/draw (may alias ``z``)."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    valid = cols < V
    y = tl.load(y_ptr + row)
    lse = tl.load(lse_ptr + row)
    g = tl.load(g_ptr + row)
    raw = tl.load(z_ptr + row.to(tl.int64) * stride_z + cols, mask=valid, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += tl.load(b_ptr + cols, mask=valid, other=0.0).to(tl.float32)
    z, deriv = apply_transform(raw, logit_scale, softcap, inv_temp, HAS_SOFTCAP)
    # clamped at 0: a recomputed logit may round above lse (docs/design.md, "Numerics")
    p = tl.exp(tl.minimum(z - lse, 0.0))
    dz = g * (tl.where(cols == y, 1.0, 0.0) - p) * deriv
    dz_row = dz_ptr + row.to(tl.int64) * stride_dz
    tl.store(dz_row + cols, dz.to(dz_ptr.dtype.element_ty), mask=valid)


def fold(
    z: Tensor, bias: Tensor | None, labels: Tensor, t: LogitTransform, with_stats: bool
) -> online_state.LogprobState:
    """Raw logits ``z [n, V]`` (unit column stride), ``bias [V] | None``, ``labels [n]`` int64 in
    ``[0, V)`` -> the rows' ``LogprobState`` (float32 ``[n]`` fields). ``z`` is left as it is."""
    n, vocab = z.shape
    slots = online_state.LOGPROB_STATS_SLOTS if with_stats else online_state.LOGPROB_SLOTS
    out = torch.empty(slots, n, dtype=torch.float32, device=z.device)
    if n == 0:
        return online_state.LogprobState(*out)
    block = _INTERPRET_BLOCK_V if interpreting() else FOLD_BLOCK_V
    _fold_rows_kernel[(n,)](
        z,
        z.stride(0),
        bias if bias is not None else z,
        labels,
        out,
        n,
        vocab,
        HAS_BIAS=bias is not None,
        WITH_STATS=with_stats,
        BLOCK_V=block,
        num_warps=FOLD_CONFIG.num_warps,
        **transform_args(t),
    )
    return online_state.LogprobState(*out)


def to_dz(
    z: Tensor, bias: Tensor | None, labels: Tensor, lse: Tensor, g: Tensor, t: LogitTransform, out: Tensor
) -> None:
    """``out [n, V] = g (onehot - p) dz/draw`` from the raw logits ``z [n, V]`` as :func:`fold` left them;
    ``out`` may be ``z`` itself (float32 heads) or a buffer in the head's 16-bit dtype."""
    n, vocab = z.shape
    if n == 0:
        return
    block = _INTERPRET_BLOCK_V if interpreting() else DZ_BLOCK_V
    _dz_rows_kernel[(n, triton.cdiv(vocab, block))](
        z,
        z.stride(0),
        out,
        out.stride(0),
        bias if bias is not None else z,
        labels,
        lse.to(torch.float32).contiguous(),
        g.to(torch.float32).contiguous(),
        vocab,
        HAS_BIAS=bias is not None,
        BLOCK_V=block,
        num_warps=DZ_CONFIG.num_warps,
        **transform_args(t),
    )


_Entry = TypeVar("_Entry")


def aot_entries(KernelEntry: Callable[..., _Entry]) -> list[_Entry]:
    """The two epilogues as entries of the ahead-of-time compile gate (benchmarks/gpu/aot_check.py):
    the workspace holds float32 logits (``*fp32``); dz is written in the head's dtype (``*T``)."""
    import itertools

    def flags(*names: str) -> Callable[[], Iterator[dict[str, bool]]]:
        def space() -> Iterator[dict[str, bool]]:
            for values in itertools.product((False, True), repeat=len(names)):
                yield dict(zip(names, values, strict=True))

        return space

    transform = {"logit_scale": "fp32", "softcap": "fp32", "inv_temp": "fp32"}
    fold_flags = flags("HAS_BIAS", "HAS_SOFTCAP", "WITH_STATS")
    dz_flags = flags("HAS_BIAS", "HAS_SOFTCAP")
    return [
        KernelEntry(
            name="engine_fold",
            fn=_fold_rows_kernel,
            args={
                "z_ptr": "*fp32:16",
                "stride_z": "i32:16",
                "b_ptr": "*fp32:16",
                "y_ptr": "*i64:16",
                "out_ptr": "*fp32:16",
                "n_rows": "i32",
                "V": "i32:16",
                **transform,
            },
            flag_space=fold_flags,
            config=lambda dtype, arch, f: FOLD_CONFIG,
            worst_case=dict(HAS_BIAS=True, HAS_SOFTCAP=True, WITH_STATS=True),
            uses_dot=False,
            block_constexprs=lambda cfg: dict(BLOCK_V=cfg.block_v),
        ),
        KernelEntry(
            name="engine_dz",
            fn=_dz_rows_kernel,
            args={
                "z_ptr": "*fp32:16",
                "stride_z": "i32:16",
                "dz_ptr": "*T:16",
                "stride_dz": "i32:16",
                "b_ptr": "*fp32:16",
                "y_ptr": "*i64:16",
                "lse_ptr": "*fp32:16",
                "g_ptr": "*fp32:16",
                "V": "i32:16",
                **transform,
            },
            flag_space=dz_flags,
            config=lambda dtype, arch, f: DZ_CONFIG,
            worst_case=dict(HAS_BIAS=True, HAS_SOFTCAP=True),
            uses_dot=False,
            block_constexprs=lambda cfg: dict(BLOCK_V=cfg.block_v),
        ),
    ]
