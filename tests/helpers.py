"""Shared test helpers: the backend names, logit transforms, error metrics and an allocation probe.

Test modules import from here (and from ``reference.py``, the independent float64 reference), never
from one another.
"""

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# Every backend by name. A test parametrized over these runs where the backend is available and is
# skipped (at run time, by conftest.py) elsewhere: collection never builds the native extension.
BACKEND_NAMES = ("native", "triton", "torch")
# float64 runs on the torch and native backends only (Triton refuses it).
FP64_BACKEND_NAMES = ("native", "torch")

TRANSFORMS = {
    "plain": {},
    "temperature": {"temperature": 0.7},
    "logit_scale": {"logit_scale": 0.25},
    "softcap": {"softcap": 3.0},
    "all": {"temperature": 1.3, "logit_scale": 2.0, "softcap": 5.0},
}


def rel_err(a, b):
    """Normwise relative error ``|a - b| / |b|`` in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


class LargestTensor(TorchDispatchMode):
    """Records the size in bytes of the largest tensor any aten op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.op = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            # Bytes, not elements: Triton's CPU interpreter re-views arguments as uint8.
            if isinstance(t, torch.Tensor) and t.numel() * t.element_size() > self.largest:
                self.largest, self.op = t.numel() * t.element_size(), str(func)
        return out


def shrink_native_tiles(monkeypatch, token_block, vocab_tile):
    """The native backend's tiles, like the torch backend's, shrunk below [N, V] of the test shapes.

    The native kernels allocate through ATen (at::empty, at::mm_out, ...), and their ops are
    registered as composite kernels, so a TorchDispatchMode sees those allocations too. It cannot see
    memory C++ obtains otherwise (none in csrc/expo_native.cpp; MKL's GEMM workspaces are
    O(block size)); tests/test_native_backend.py also bounds the peak RSS of a large native call.
    """
    from expo_kernels.ops import native_backend

    monkeypatch.setattr(native_backend, "TOKEN_BLOCK", token_block)
    monkeypatch.setattr(native_backend, "VOCAB_TILE", vocab_tile)
