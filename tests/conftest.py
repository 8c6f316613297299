"""Test set-up: without a GPU the Triton kernels run in Triton's CPU interpreter.

TRITON_INTERPRET must be set before ``triton.jit`` decorates our kernels, i.e. before
``expo_kernels.ops.triton_backend`` is first imported (expo_kernels imports it lazily).

Backends are resolved lazily: tests are parametrized over every backend *name*
(``helpers.BACKEND_NAMES``) and one whose backend cannot run here is skipped when it is set up, so
collecting the suite never compiles the native extension.
"""

import functools
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.cache
def available(device: str = DEVICE.type) -> tuple:
    """The backends that run on ``device`` (the first call builds or loads the native extension)."""
    import expo_kernels as ek

    return tuple(ek.available_backends(device))


def triton_available() -> bool:
    """Triton can run here (a CUDA device, or its CPU interpreter), decided without the native build."""
    from expo_kernels import _dispatch

    return _dispatch.triton_importable() and (DEVICE.type == "cuda" or _dispatch.interpreting())


def require_backend(name: str, device: str = DEVICE.type) -> None:
    """Skip the running test unless backend ``name`` runs on ``device``."""
    if name not in available(device):
        pytest.skip(f"backend {name!r} does not run on {device} here (python -m expo_kernels.info says why)")


@pytest.fixture(autouse=True)
def _skip_unavailable_backend(request):
    callspec = getattr(request.node, "callspec", None)
    name = callspec.params.get("backend") if callspec is not None else None
    if isinstance(name, str):
        require_backend(name)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
