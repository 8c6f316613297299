"""Test set-up: without a GPU the Triton kernels run in Triton's CPU interpreter.

TRITON_INTERPRET must be set before ``triton.jit`` decorates our kernels, i.e. before
``expo_kernels.ops.triton_backend`` is first imported (expo_kernels imports it lazily).

Backends are resolved lazily: tests are parametrized over every backend *name*
(``helpers.BACKEND_NAMES``) and one whose backend cannot run here is skipped when it is set up, so
collecting the suite never compiles the native extension. Where a backend runs is decided in one place,
``helpers.device_for`` (native: CPU; triton: CUDA when present, else the CPU interpreter; torch:
``DEVICE``); a test parametrized over ``backend`` (and ``dtype``) is skipped here, with the reason, when
that backend cannot take that dtype on that device.
"""

import functools
import json
import math
import os
from pathlib import Path

import pytest
import torch
from helpers import device_for, unsupported_reason

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # Deterministic cuBLAS needs a fixed workspace configuration, read when the first cuBLAS handle is
    # made: set before any test touches CUDA (the GPU session exports the same value).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.cache
def available(device: str = DEVICE.type) -> tuple:
    """The backends that run on ``device`` (the first call builds or loads the native extension)."""
    import expo_kernels as ek

    return tuple(ek.available_backends(device))


def triton_available() -> bool:
    """Triton runs on ``device_for("triton")`` (a CUDA device, or the CPU interpreter), decided without the
    native build."""
    from expo_kernels import _dispatch

    return _dispatch.triton_importable() and (device_for("triton").type == "cuda" or _dispatch.interpreting())


def require_backend(name: str, device: str = DEVICE.type) -> None:
    """Skip the running test unless backend ``name`` runs on ``device``."""
    if name not in available(device):
        pytest.skip(f"backend {name!r} does not run on {device} here (python -m expo_kernels.info says why)")


@pytest.fixture(autouse=True)
def _skip_unavailable_backend(request):
    callspec = getattr(request.node, "callspec", None)
    params = callspec.params if callspec is not None else {}
    name = params.get("backend")
    if isinstance(name, str):
        require_backend(name, device_for(name).type)
        dtype = params.get("dtype")
        reason = unsupported_reason(name, dtype) if isinstance(dtype, torch.dtype) else None
        if reason is not None:
            pytest.skip(reason)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    """Under mutmut, run the fastest tests first.

    mutmut names the mutant in ``MUTANT_UNDER_TEST``, runs from its ``mutants/`` copy (where it keeps each
    test's measured duration) and stops at the first failure (``-x``): a mutant that one quick test kills
    should not wait for a slow one. Outside mutmut the order is left alone.
    """
    if not os.environ.get("MUTANT_UNDER_TEST"):
        return
    try:
        durations = json.loads(Path("mutmut-stats.json").read_text())["duration_by_test"]
    except (OSError, ValueError, KeyError):
        return
    items.sort(key=lambda item: durations.get(item.nodeid, math.inf))
