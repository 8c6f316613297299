"""Shared test helpers: the backend names and the device each one's tensors live on, logit transforms,
error metrics and an allocation probe.

Test modules import from here (and from ``reference.py``, the independent float64 reference), never
from one another.
"""

import contextlib
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# Every backend by name. A test parametrized over these runs where the backend is available and is
# skipped (at run time, by conftest.py) elsewhere: collection never builds the native extension.
BACKEND_NAMES = ("native", "triton", "torch")
# float64 runs on the torch and native backends only (Triton refuses it).
FP64_BACKEND_NAMES = ("native", "torch")

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def device_for(backend: str) -> torch.device:
    """The device a test's tensors for ``backend`` are made on: the one place tests decide it.

    native: CPU tensors only (the C++ backend). triton: CUDA where there is a GPU (without
    ``TRITON_INTERPRET`` a CPU tensor is refused there), else the CPU, where conftest.py turned the
    interpreter on. torch: conftest's ``DEVICE`` (CUDA when present), so the GPU session also checks the
    specification backend on the GPU. Asking ``torch.cuda.is_available()`` at every call (not once at
    import) lets tests/test_device_placement.py check the CUDA mapping on a machine without one."""
    if backend not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKEND_NAMES}")
    if backend == "native" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def unsupported_reason(backend: str, dtype: torch.dtype, device: torch.device | None = None) -> str | None:
    """Why ``backend`` cannot take ``dtype`` tensors on ``device`` (``device_for(backend)`` by default),
    or None when it can.

    Triton never takes float64 (``resolve_backend`` refuses it): such a case must not be parametrized at
    all. bf16/fp16 Triton arithmetic is wrong in the CPU interpreter (docs: DESIGN.md section 6): the case
    runs on a GPU and is skipped, with this reason, on the CPU."""
    device = device_for(backend) if device is None else device
    if backend == "triton" and dtype == torch.float64:
        return "Triton refuses float64 (its scalars and GPU accumulators are float32)"
    if backend == "triton" and dtype in _LOW_PRECISION and device.type != "cuda":
        return "bf16/fp16 Triton arithmetic is wrong in the CPU interpreter: this case runs on a GPU"
    if backend == "native" and device.type != "cpu":
        return "the native backend runs on CPU tensors only"
    return None


def backend_dtype_cases(dtypes, backends=BACKEND_NAMES) -> list:
    """``(backend, dtype)`` pairs for ``@pytest.mark.parametrize("backend,dtype", ...)``: every pair some
    machine can run (Triton's float64 never is one). A pair this machine cannot run is skipped at set-up
    with :func:`unsupported_reason` (conftest.py)."""
    return [(b, d) for b in backends for d in dtypes if not (b == "triton" and d == torch.float64)]


TRANSFORMS = {
    "plain": {},
    "temperature": {"temperature": 0.7},
    "logit_scale": {"logit_scale": 0.25},
    "softcap": {"softcap": 3.0},
    "all": {"temperature": 1.3, "logit_scale": 2.0, "softcap": 5.0},
}


#: The values of ``CUBLAS_WORKSPACE_CONFIG`` under which cuBLAS is deterministic (CUDA docs, "Results
#: reproducibility"); torch.use_deterministic_algorithms(True) raises on a cuBLAS GEMM without one.
DETERMINISTIC_CUBLAS = (":4096:8", ":16:8")


@contextlib.contextmanager
def deterministic_algorithms():
    """``torch.use_deterministic_algorithms(True)`` for the block, restored after it. On CUDA it needs
    ``CUBLAS_WORKSPACE_CONFIG`` (conftest.py sets it before CUDA starts; the GPU session exports it):
    without it the test is skipped with that reason instead of failing inside cuBLAS."""
    if torch.cuda.is_available() and os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in DETERMINISTIC_CUBLAS:
        pytest.skip(f"deterministic cuBLAS needs CUBLAS_WORKSPACE_CONFIG in {DETERMINISTIC_CUBLAS}")
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)


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
