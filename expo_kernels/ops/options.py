"""Process-wide switches of the kernels: speed/exactness trades (off by default), the engine's
workspace, and an explicit execution path.

>>> import expo_kernels as ek
>>> with ek.kernel_options(grad_filter_eps=2.0**-12):   # bf16 training: skip negligible vocab tiles
...     loss.backward()
>>> with ek.kernel_options(workspace_bytes=64 << 20):   # a smaller logit workspace for the engine
...     out = loss_fn(weight, hidden, labels, ref_hidden=ref_hidden)
>>> with ek.kernel_options(path="fused"):               # force one execution path (``Path``)
...     loss.backward()

Deterministic results: ``torch.use_deterministic_algorithms(True)`` makes the Triton backend run its
backward as bounded-chunk GEMMs (the torch backend's schedule) instead of float32 atomics, whose
summation order varies from run to run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for the annotations only: the options need no torch at run time
    import torch

__all__ = [
    "DEFAULT_WORKSPACE_BYTES",
    "KernelOptions",
    "PATH_NAMES",
    "Path",
    "as_path",
    "get_kernel_options",
    "kernel_options",
    "workspace_bytes",
]


class Path(StrEnum):
    """The execution paths of a call (docs/design.md, "Execution paths"); ``_dispatch.plan`` picks one.

    Defined here, with the option that can force one, because ``ops`` sits below ``_dispatch``; the
    dispatch layer re-exports it (``expo_kernels.Path``)."""

    #: the backend's fused streaming kernels (native C++, Triton, or the torch chunked specification):
    #: logits recomputed tile by tile in the backward
    FUSED = "fused"
    #: library GEMMs (cuBLAS) into a bounded workspace + the Triton fold/dz epilogues, the backward
    #: vocabulary-chunk-major with the logits recomputed (``ops.library_gemm``; deterministic)
    LIBRARY_GEMM = "library_gemm"
    #: one GEMM for the call, its folded logits kept for the backward (``ops.epilogues``)
    KEPT_LOGITS = "kept_logits"
    #: the preference modules' chunked pair step (``expo_kernels.engine``): chunks of whole pairs, the
    #: gradient formed while a chunk's logits are in the workspace
    PAIR_ENGINE = "pair_engine"
    #: the pair step's two passes over token chunks, for a pair longer than the workspace
    LONG_PAIR_CHUNKS = "long_pair_chunks"

    def __str__(self) -> str:
        return self.value


PATH_NAMES = tuple(p.value for p in Path)


def as_path(value: object, name: str = "path") -> Path | None:
    """``value`` (a :class:`Path`, its string name, or None) as a Path; a clear error for anything else."""
    if value is None or isinstance(value, Path):
        return value
    if isinstance(value, str):
        key = value.strip().lower()
        for p in Path:
            if key in (p.value, p.name.lower()):
                return p
    raise ValueError(f"{name} must be None or one of {list(PATH_NAMES)} (or an expo_kernels.Path); got {value!r}")


@dataclasses.dataclass(frozen=True)
class KernelOptions:
    """grad_filter_eps: in the Triton backward, skip a (token block, vocab tile) whose softmax
    probabilities (both heads' for the token KL) are all below ``eps`` and that holds none of the
    block's labels: its gradient contribution is at most ``eps * |g|`` per logit, under the rounding of
    bf16 (2^-8 relative) for ``eps`` around 2^-12 (Cut Cross-Entropy's gradient filtering). ``None``
    (default) = exact: every tile is accumulated. The torch and native backends are always exact and
    warn once when the option is set.

    engine: let ``_dispatch.plan`` choose the engine's paths where they apply (``Path.PAIR_ENGINE`` /
    ``LONG_PAIR_CHUNKS`` for the fused preference-loss modules, ``KEPT_LOGITS`` and, on CUDA,
    ``LIBRARY_GEMM`` for ``linear_logprobs``); False = ``Path.FUSED`` everywhere: the backends' fused
    recompute kernels (an alias of ``path="fused"``).

    workspace_bytes: the cap on the logit workspace of the chunked paths (``None`` = the device's
    ``DEFAULT_WORKSPACE_BYTES``: 512 MiB on the CPU, 1 GiB on CUDA): the engine's chunk of whole pairs
    grows to ``engine.CHUNK_TOKENS`` tokens but never past ``workspace_bytes / (bytes per logit * V)``
    (float32 logits, plus the 16-bit dz of a 16-bit head); a pair beyond the cap is processed in token
    chunks with the logits recomputed. On CUDA the op's forward and backward run through the same
    workspace (library GEMMs + Triton epilogues).

    path: force one execution path (a :class:`Path` or its name; ``None`` = let ``_dispatch.plan``
    choose). A path the call cannot take (library GEMMs on the CPU without the Triton interpreter, kept
    logits with a top-k, a pair path for ``linear_logprobs``, ...) raises instead of running another one.
    ``engine=False`` is the alias of "the fused kernels wherever a choice exists" (``path="fused"``)."""

    grad_filter_eps: float | None = None
    engine: bool = True
    workspace_bytes: int | None = None
    path: Path | None = None


_current = KernelOptions()

#: The default cap on the logit workspace per device type. CPU: 512 MiB = 4096 tokens x 32000 vocabulary
#: (1046 x 128256) in float32. CUDA: 1 GiB, so that one pair of ~1400 counted tokens at V = 128256
#: (float32 logits + 16-bit dz: 6 bytes a logit) fits whole and the GEMMs keep >= 1000 rows.
DEFAULT_WORKSPACE_BYTES = {"cpu": 512 << 20, "cuda": 1 << 30}


def workspace_bytes(device: torch.device, options: KernelOptions | None = None) -> int:
    """The workspace cap in force on ``device`` (a ``torch.device``), under ``options`` (default: the
    options in force)."""
    chosen = (options or _current).workspace_bytes
    return int(chosen) if chosen else DEFAULT_WORKSPACE_BYTES.get(device.type, DEFAULT_WORKSPACE_BYTES["cuda"])


def _names() -> list[str]:
    return [f.name for f in dataclasses.fields(KernelOptions)]


def get_kernel_options() -> KernelOptions:
    return _current


@contextlib.contextmanager
def kernel_options(**changes: Any) -> Iterator[KernelOptions]:
    """Set options for the duration of a ``with`` block (the backward pass must run inside it)."""
    global _current
    eps = changes.get("grad_filter_eps")
    if eps is not None and (
        isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1 or not math.isfinite(eps)
    ):
        raise ValueError(f"grad_filter_eps must be None (exact) or a number in (0, 1); got {eps!r}.")
    unknown = set(changes) - {f.name for f in dataclasses.fields(KernelOptions)}
    if unknown:
        raise TypeError(f"unknown kernel option(s) {sorted(unknown)}; the options are {_names()}")
    if "engine" in changes and not isinstance(changes["engine"], bool):
        raise TypeError(f"engine must be a bool, got {type(changes['engine']).__name__} {changes['engine']!r}")
    ws = changes.get("workspace_bytes")
    if ws is not None and (isinstance(ws, bool) or not isinstance(ws, int) or ws < 1):
        raise ValueError(f"workspace_bytes must be None (the default) or a positive int; got {ws!r}.")
    if "path" in changes:
        changes["path"] = as_path(changes["path"])
    new = dataclasses.replace(_current, **changes)
    if not new.engine and new.path not in (None, Path.FUSED):
        raise ValueError(
            f"kernel_options(engine=False) means the fused kernels; it contradicts path={new.path.value!r} "
            "(drop engine=False, or use path='fused')"
        )
    saved = _current
    _current = new
    try:
        yield _current
    finally:
        _current = saved
