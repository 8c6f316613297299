"""Builds and loads the native CPU backend (``csrc/expo_native.cpp``) as a torch C++ extension.

The extension is compiled on first use with ``torch.utils.cpp_extension.load`` (ninja) into a
per-machine cache directory and loaded from there afterwards:

* ``$EXPO_KERNELS_BUILD_DIR`` if set, else ``~/.cache/expo_kernels/native`` (``$XDG_CACHE_HOME`` is
  honoured), one subdirectory per (torch version, Python version, instruction-set flags, source
  hash), so a changed source, torch or CPU never reuses a stale binary;
* flags ``-O3 -fopenmp -fno-trapping-math -fno-math-errno -ffp-contract=off``, plus ``-mavx2 -mfma`` when this CPU has AVX2 and FMA;
* ``EXPO_KERNELS_NATIVE=0`` disables the backend (no build is attempted, no warning);
* if the build or the load fails (no compiler, no ninja, ...), the backend is reported missing
  with the error text (``python -m expo_kernels.info`` prints it), CPU tensors fall back to the
  torch backend and one ``RuntimeWarning`` is emitted;
* once loaded, every ``expo_native`` op gets a fake (meta) implementation
  (:func:`register_fakes`): ``torch.compile`` and ``FakeTensorMode`` then trace them by shape, and the
  two engine epilogues (``fold_logits_``, ``logits_to_dz_``) are seen as mutating their ``z`` (their
  schemas say ``Tensor(a!) z``).

The build happens at most once per process; concurrent processes are serialized by the lock
file ``torch.utils.cpp_extension`` keeps in the build directory.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, TypedDict

NATIVE_ENV = "EXPO_KERNELS_NATIVE"
BUILD_DIR_ENV = "EXPO_KERNELS_BUILD_DIR"
SOURCE_NAME = "expo_native.cpp"


class _BuildState(TypedDict):
    tried: bool
    ok: bool
    error: str | None
    warned: bool
    build_s: float | None
    build_dir: str | None


_lock = threading.Lock()
_state: _BuildState = {"tried": False, "ok": False, "error": None, "warned": False, "build_s": None, "build_dir": None}


def disabled_by_env() -> bool:
    return os.environ.get(NATIVE_ENV, "1").strip().lower() in ("0", "false", "no", "off")


def source_path() -> Path | None:
    """``csrc/expo_native.cpp``: next to the package (editable install / checkout) or shipped inside it."""
    pkg = Path(__file__).resolve().parent.parent  # expo_kernels/
    for cand in (pkg / "_csrc" / SOURCE_NAME, pkg.parent / "csrc" / SOURCE_NAME):
        if cand.is_file():
            return cand
    return None


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def isa_flags() -> list:
    import platform

    if platform.machine().lower() in ("x86_64", "amd64"):
        flags = _cpu_flags()
        if {"avx2", "fma"} <= flags:
            return ["-mavx2", "-mfma"]
    return []


def build_dir_for(src: Path, cflags: list) -> Path:
    import torch

    root = os.environ.get(BUILD_DIR_ENV)
    if not root:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(cache, "expo_kernels", "native")
    digest = hashlib.sha256(src.read_bytes() + " ".join(cflags).encode()).hexdigest()[:12]
    tag = f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-{digest}"
    return Path(root) / tag.replace("+", "_")


def _load() -> None:
    import time

    import torch
    from torch.utils import cpp_extension

    src = source_path()
    if src is None:
        raise RuntimeError(f"source {SOURCE_NAME} not found (it ships with the repository's csrc/ folder)")
    # -fno-trapping-math lets GCC if-convert (and so vectorize) the exp and max loops; torch itself
    # is built with it and -fno-math-errno. The code is C++17; the standard is left to torch.
    # -ffp-contract=off: the backward recomputes each logit and must round it exactly as the forward
    # did (z - lse decides p; with a tiny temperature a fused multiply-add there flips p between 0 and 1)
    cflags = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno", "-ffp-contract=off"] + isa_flags()
    build_dir = build_dir_for(src, cflags)
    build_dir.mkdir(parents=True, exist_ok=True)
    _state["build_dir"] = str(build_dir)
    t0 = time.perf_counter()
    built = build_dir / "expo_native.so"
    if built.is_file():
        # The directory is keyed by source, flags and torch version: a library there is current.
        # Loading it directly skips the ninja up-to-date check (about a second per process).
        try:
            torch.ops.load_library(str(built))
        except Exception:  # noqa: BLE001 - a broken leftover: rebuild below
            pass
        else:
            _state["build_s"] = 0.0
            if hasattr(torch.ops.expo_native, "logprobs_forward"):
                return
    cpp_extension.load(
        name="expo_native",
        sources=[str(src)],
        extra_cflags=cflags,
        extra_ldflags=["-fopenmp"],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )
    _state["build_s"] = time.perf_counter() - t0
    if not hasattr(torch.ops.expo_native, "logprobs_forward"):
        raise RuntimeError("the extension loaded but registered no expo_native ops")


_fakes_registered = False


def register_fakes() -> None:
    """Fake (meta) implementations of the ``expo_native`` ops, from their C++ shapes: results in the
    accumulation dtype (float64 for float64 inputs, else float32), gradients in the inputs' dtypes, an
    empty ``[0]`` tensor for a gradient not asked for. Registered once, right after the library loads."""
    global _fakes_registered
    if _fakes_registered:
        return
    import torch

    # (the C++ schemas' arguments, positionally: the tensors first, then scalars; see csrc/expo_native.cpp)
    def acc(t: Any) -> torch.dtype:
        return torch.float64 if t.dtype == torch.float64 else torch.float32

    def state(like: Any, n: int, dtype: torch.dtype, with_stats: bool) -> list:
        return [like.new_empty(n, dtype=dtype) for _ in range(7 if with_stats else 3)]

    def grads(hidden: Any, weight: Any, bias: Any, need: tuple) -> list:
        need_h, need_w, need_b = need
        need_b = need_b and bias is not None
        return [
            hidden.new_empty(hidden.shape if need_h else (0,)),
            weight.new_empty(weight.shape if need_w else (0,)),
            weight.new_empty((weight.shape[0],) if need_b else (0,), dtype=bias.dtype if need_b else weight.dtype),
        ]

    def logprobs_forward(hidden: Any, weight: Any, bias: Any, labels: Any, *args: Any) -> list:
        # args: scale, softcap, inv_temp, with_stats, vocab_start, token_block, vocab_tile[, topk]
        with_stats, topk = args[3], (args[7] if len(args) > 7 else 0)
        n, dtype = hidden.shape[0], acc(hidden)
        out = state(hidden, n, dtype, with_stats)
        if topk > 0:
            out += [hidden.new_empty((n, topk), dtype=dtype), hidden.new_empty((n, topk), dtype=torch.long)]
        return out

    def logprobs_backward(grad: Any, hidden: Any, weight: Any, bias: Any, *args: Any) -> list:
        # args: labels, lse, scale, softcap, inv_temp, need_hidden, need_weight, need_bias, ...
        return grads(hidden, weight, bias, tuple(args[5:8]))

    def token_kl_forward(hidden: Any, *_: Any) -> list:
        return [hidden.new_empty(hidden.shape[0], dtype=acc(hidden)) for _ in range(5)]

    def token_kl_backward(grad: Any, hidden: Any, weight: Any, bias: Any, *args: Any) -> list:
        # args: ref_hidden, ref_weight, ref_bias, lse_p, lse_r, scale, softcap, inv_temp, need_hidden, ...
        return grads(hidden, weight, bias, tuple(args[8:11]))

    def fold_logits_(z: Any, bias: Any, labels: Any, *args: Any) -> list:
        # args: vocab_start, scale, softcap, inv_temp, with_stats
        return state(z, z.shape[0], z.dtype, args[4])

    def logits_to_dz_(*_: Any) -> None:
        return None

    for name, fn in (
        ("logprobs_forward", logprobs_forward),
        ("logprobs_backward", logprobs_backward),
        ("token_kl_forward", token_kl_forward),
        ("token_kl_backward", token_kl_backward),
        ("fold_logits_", fold_logits_),
        ("logits_to_dz_", logits_to_dz_),
    ):
        torch.library.register_fake(f"expo_native::{name}", fn)
    _fakes_registered = True


def ensure_loaded(warn: bool = True) -> bool:
    """Builds/loads the extension once; True when ``torch.ops.expo_native`` is usable."""
    if disabled_by_env():
        return False
    # Fast path without the lock (also keeps torch.compile able to trace through backend choice).
    if _state["ok"]:
        return True
    if _state["tried"] and (_state["warned"] or not warn):
        return False
    return _load_once(warn)


def _load_once(warn: bool) -> bool:
    """The build/load itself, under the lock (once per process), and its one warning."""
    with _lock:
        if not _state["tried"]:
            _state["tried"] = True
            try:
                _load()
                register_fakes()
                _state["ok"] = True
            except Exception as exc:  # noqa: BLE001 - any build/load failure means "not available"
                text = f"{type(exc).__name__}: {exc}".strip()
                _state["error"] = text[-4000:]
        if not _state["ok"] and warn and not _state["warned"]:
            _state["warned"] = True
            first = (_state["error"] or "").strip().splitlines()
            warnings.warn(
                "expo_kernels: the native CPU backend could not be built or loaded; CPU tensors use the "
                f"torch backend. ({first[0][:300] if first else 'unknown error'}; full text: "
                f"python -m expo_kernels.info; set {NATIVE_ENV}=0 to silence)",
                RuntimeWarning,
                stacklevel=4,
            )
    return _state["ok"]


# A first use inside torch.compile: dynamo runs the build at trace time and takes its result as a constant
# (what torch._dynamo.assume_constant_result marks; set here without importing torch._dynamo), instead of
# tracing the lock -- a graph break, an error under fullgraph=True.
_load_once._dynamo_marked_constant = True  # type: ignore[attr-defined]


def status() -> dict:
    """``{"available": bool, "reason": str | None, "build_dir": ..., "build_s": ...}`` (builds if needed)."""
    if disabled_by_env():
        return {"available": False, "reason": f"disabled by {NATIVE_ENV}=0", "build_dir": None, "build_s": None}
    ok = ensure_loaded(warn=False)
    return {
        "available": ok,
        "reason": None if ok else _state["error"],
        "build_dir": _state["build_dir"],
        "build_s": _state["build_s"],
    }
