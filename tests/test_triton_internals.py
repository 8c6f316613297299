"""Triton-specific pieces: 64-bit index math and the vocab-split merge."""

import pytest
import torch
from conftest import triton_available
from helpers import device_for
from reference import reference_stats

if not triton_available():
    pytest.skip("triton backend not available", allow_module_level=True)

DEVICE = device_for("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from expo_kernels.ops import LogitTransform, triton_backend  # noqa: E402
from expo_kernels.ops.state import finalize_logprobs  # noqa: E402
from expo_kernels.ops.triton import jit as triton_jit  # noqa: E402


@triton.jit
def _offsets_probe(out_ptr, row0, stride_r, BLOCK: tl.constexpr):
    rows = row0 + tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK)
    offs = triton_jit.offsets_2d(rows, cols, stride_r, 1)
    tl.store(out_ptr + tl.arange(0, BLOCK)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :], offs)


def test_offsets_do_not_overflow_int32():
    # A weight row index near V = 600k with H = 4096 gives offsets ~2.5e9 > 2^31: the kernels'
    # offset helper must compute them in int64 (an int32 product would wrap negative).
    row0, stride = 600_000, 4096
    out = torch.empty(16, 16, dtype=torch.int64, device=DEVICE)
    _offsets_probe[(1,)](out, row0, stride, BLOCK=16)
    rows = torch.arange(row0, row0 + 16, dtype=torch.int64, device=DEVICE)
    want = rows[:, None] * stride + torch.arange(16, device=DEVICE)[None, :]
    assert want.max() > 2**31
    assert torch.equal(out, want)


@pytest.mark.parametrize("splits", [1, 2, 3, 64])
def test_vocab_splits_merge_to_the_same_result(splits):
    n, h, v = 40, 16, 200
    hidden = torch.randn(n, h, device=DEVICE)
    weight = torch.randn(v, h, device=DEVICE) * 0.5
    labels = torch.randint(0, v, (n,), device=DEVICE)
    transform = LogitTransform(1.5, 6.0, 0.8)
    out = finalize_logprobs(
        triton_backend.forward_partial(hidden, weight, None, labels, transform, True, vocab_splits=splits), v
    )
    ref = reference_stats(hidden, weight, labels, logit_scale=1.5, softcap=6.0, temperature=0.8)
    for name in ("lse", "entropy", "mean_logit", "log_sum_p2"):
        torch.testing.assert_close(getattr(out, name).double(), ref[name], rtol=2e-5, atol=2e-5, msg=name)
    assert torch.equal(out.is_top1, ref["is_top1"])
