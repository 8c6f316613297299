"""Dispatch: which backend and which execution path run a call, and the checks and token bookkeeping
around every backend call.

Everything between the public functions (``expo_kernels.functional``) and the kernels
(``expo_kernels.ops``) that is not autograd lives here: the plan (backend + :class:`Path` + why:
:func:`plan` and :func:`plan_pair_step`, the only place that chooses a path), backend choice, scalar
checks, compaction of the counted tokens, and the guards on what a backend returns (finite, not
aliased). The registered ops (``expo_kernels.autograd``) and the vocab-parallel path
(``expo_kernels.distributed``) both use it.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

from . import _validation as checks
from .ops import Backend, gemm, torch_backend
from .ops.common import interpreting
from .ops.options import KernelOptions, Path, get_kernel_options, workspace_bytes

BACKENDS = checks.BACKENDS
BACKEND_ENV = "EXPO_KERNELS_BACKEND"


def triton_importable() -> bool:
    """Whether ``import triton`` works (it imports Triton: ask only where a Triton backend could run)."""
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


def native_available(device: torch.device) -> bool:
    """The C++ CPU backend (csrc/): CPU tensors, built/loaded on first use, off with EXPO_KERNELS_NATIVE=0.

    A failed build warns once and leaves CPU tensors on the torch backend."""
    if device.type != "cpu":
        return False
    from .ops import _native_build

    return _native_build.ensure_loaded()


def available_backends(device="cpu") -> list:
    """Backends that can run on ``device``, fastest first."""
    device = torch.device(device)
    names = []
    if native_available(device):
        names.append("native")
    if (device.type == "cuda" or interpreting()) and triton_importable():  # no Triton import off CUDA
        names.append("triton")
    names.append("torch")
    return names


def resolve_backend(requested: str | None, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """``backend=`` argument, else ``$EXPO_KERNELS_BACKEND``, else the fastest for the device and dtype.

    float64 never goes to Triton (Triton 3.6, on our GPU machines, does not compile these kernels in
    float64, and the interpreter rounds scalars to float32): by default it runs on the torch backend;
    asking for ``"triton"`` explicitly raises."""
    checks.check_backend_name(requested)
    name = requested if requested is not None else os.environ.get(BACKEND_ENV) or None
    source = "backend" if requested is not None else BACKEND_ENV
    fp64 = dtype == torch.float64
    if name is None:
        if device.type == "cuda" and triton_importable() and not fp64:
            return "triton"
        return "native" if native_available(device) else "torch"
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    if name == "triton" and fp64:
        raise ValueError(
            f"{source}='triton' does not support float64 inputs (the kernels accumulate in float32 on "
            "GPUs); use backend='torch' (any device) or 'native' (CPU) for float64"
        )
    if name not in available_backends(device):
        if name == "native":
            from .ops import _native_build

            why = _native_build.status()["reason"] if device.type == "cpu" else "it runs on CPU tensors only"
            raise ValueError(f"{source}='native' cannot run on {device.type} tensors: {why}")
        raise ValueError(
            f"{source}={name!r} cannot run on {device.type} tensors: the triton backend needs CUDA tensors "
            "(or TRITON_INTERPRET=1 set before importing expo_kernels, for CPU testing) and triton installed"
        )
    return name


def backend_module(name: str) -> Backend:
    """The module implementing backend ``name`` (the contract: ``expo_kernels.ops``)."""
    if name == "triton":
        from .ops import triton_backend

        return triton_backend
    if name == "native":
        from .ops import native_backend

        return native_backend
    return torch_backend


_WARNED_FILTER: set = set()


def backward_module(name: str) -> Backend:
    """``backend_module`` for a backward pass; warns once per backend that ignores gradient filtering.

    ``kernel_options(grad_filter_eps=...)`` is a Triton option: the torch and native backends compute
    every tile exactly (they run GEMMs over whole vocabulary tiles, where skipping rarely pays)."""
    from .ops.options import get_kernel_options

    if name != "triton" and get_kernel_options().grad_filter_eps is not None and name not in _WARNED_FILTER:
        _WARNED_FILTER.add(name)
        warnings.warn(
            f"kernel_options(grad_filter_eps=...) applies to the triton backend only; the {name} backend "
            "computes exact gradients",
            RuntimeWarning,
            stacklevel=3,
        )
    return backend_module(name)


def library_gemm_module() -> ModuleType:
    """``ops.library_gemm``: the op on library GEMMs + Triton epilogues (``Path.LIBRARY_GEMM``), imported
    when first taken (its epilogues import Triton when they first run)."""
    from .ops import library_gemm

    return library_gemm


def recompute_module(backend: str, device: torch.device, dtype: torch.dtype, vocab: int) -> ModuleType | Backend:
    """The module whose ``forward_partial`` / ``backward`` run a pass that recomputes its logits (the
    vocab-parallel op keeps none): the library-GEMM path where :func:`plan` takes it for such a call,
    else the backend's fused kernels."""
    chosen = plan(device, dtype, tokens=0, vocab=vocab, needs_grad=False, backend=backend)
    return library_gemm_module() if chosen.path is Path.LIBRARY_GEMM else backend_module(chosen.backend)


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The dtype ``F.linear``'s operands take inside a ``torch.autocast`` region of ``device``'s type
    (``torch.get_autocast_dtype``), None outside one (or for a device type without autocast).

    Read per call, like autocast itself: a region is for one device type (``"cuda"`` or ``"cpu"``), and
    a CUDA region leaves CPU tensors alone. Traceable by ``torch.compile`` (dynamo evaluates both
    queries at trace time and guards on the autocast state)."""
    device_type = torch.device(device).type
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def cast_dtype(t: Tensor) -> torch.dtype:
    """``t``'s dtype after autocast's cast (the GEMM operands' dtype a call computes in): the autocast
    dtype for a floating tensor inside a region of its device type, except float64 (autocast leaves it,
    as it does for ``F.linear``); else ``t.dtype``."""
    if not t.is_floating_point() or t.dtype == torch.float64:
        return t.dtype
    return autocast_dtype(t.device) or t.dtype


def result_dtype(input_dtype: torch.dtype) -> torch.dtype:
    """Per-token results are float32, or float64 for float64 inputs (gradcheck, small studies)."""
    return torch.float64 if input_dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# scalar arguments
# ---------------------------------------------------------------------------------------------


def check_scalars(temperature, logit_scale, softcap, ignore_index) -> None:
    checks.check_positive_finite("temperature", temperature)
    checks.check_positive_finite("logit_scale", logit_scale, allow_none=True)
    checks.check_positive_finite("softcap", softcap, allow_none=True)
    checks.check_ignore_index(ignore_index)


def scalar_args(ignore_index, logit_scale, softcap, temperature):
    """The registered ops' scalar arguments, in schema order (logit_scale None -> 1.0)."""
    return (
        int(ignore_index),
        float(logit_scale) if logit_scale is not None else 1.0,
        float(softcap) if softcap is not None else None,
        float(temperature),
    )


def group_size(process_group) -> int:
    """World size of a ``torch.distributed`` group; a clear error for anything else."""
    import torch.distributed as dist

    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            f"process_group must be None or a torch.distributed.ProcessGroup, "
            f"got {type(process_group).__name__} {process_group!r}"
        )
    return dist.get_world_size(process_group)


# ---------------------------------------------------------------------------------------------
# counted tokens: ignored rows are compacted away before any kernel runs
# ---------------------------------------------------------------------------------------------


def counted_rows(labels: Tensor, ignore_index: int, vocab: int) -> tuple[Tensor | None, Tensor, Callable]:
    """``(rows, labels64, pick)`` for labels ``[N]`` of any integer dtype.

    The comparisons run in int64: in the label dtype, ``-100`` wraps to 156 in uint8 and ``V = 300``
    to 44 in int8. ``rows`` are the indices of the counted tokens (None when all count), ``labels64``
    the counted labels as a contiguous int64 ``[N_valid]``, and ``pick`` selects those rows of any
    per-token tensor. Labels outside ``[0, V)`` raise."""
    labels = labels.long()
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}; found {first}")
    if bool(valid.all()):
        return None, labels.contiguous(), lambda t: t
    rows = valid.nonzero().squeeze(1)
    return rows, labels.index_select(0, rows), lambda t: t.index_select(0, rows)


def scatter(values: Tensor, rows: Tensor | None, n: int) -> Tensor:
    """Per-counted-token values back to all ``n`` tokens (0 at ignored ones)."""
    if rows is None:
        return values
    out = values.new_zeros(n)
    return out.index_copy_(0, rows, values)


def scatter_rows(values: Tensor, rows: Tensor | None, n: int, fill) -> Tensor:
    """Per-counted-token rows ``[N_valid, k]`` back to all ``n`` tokens (``fill`` at ignored ones)."""
    if rows is None:
        return values
    out = values.new_full((n, values.shape[1]), fill)
    return out.index_copy_(0, rows, values)


def unaliased(outputs, inputs) -> tuple:
    """The outputs, each cloned where it shares storage with an input or an earlier output.

    A registered op may not return a view of its input or two views of one tensor (torch checks,
    and a backend may legitimately return e.g. one empty tensor twice for N = 0)."""
    seen = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, Tensor) and t.numel() > 0}
    out = []
    for t in outputs:
        if t.numel() == 0 or t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out.append(t)
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# finiteness: inputs must be finite (a -inf bias entry masks a vocabulary id); results then are
# ---------------------------------------------------------------------------------------------


def _all_finite(t: Tensor) -> Tensor:
    """0-dim bool: every entry finite. One reduction and no temporary of ``t``'s size (``isfinite(t)``
    would allocate ``|t|`` and a bool tensor: 0.6 GB for a float32 128256 x 1024 head); min and max
    propagate NaN."""
    if t.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=t.device)
    lo, hi = torch.aminmax(t)
    return torch.isfinite(lo) & torch.isfinite(hi)


def _bad_bias(b: Tensor) -> Tensor:
    """0-dim bool: NaN or +inf somewhere (-inf masks a vocabulary entry, p = 0)."""
    if b.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=b.device)
    hi = b.max()  # NaN propagates
    return torch.isnan(hi) | torch.isposinf(hi)


def check_finite(inputs: dict, biases: dict, results: tuple[Tensor, ...], transform_args: dict) -> None:
    """One host sync: raise ``ValueError`` naming the culprit if an input is non-finite (``hidden`` and
    ``weight`` NaN/inf, a bias NaN/+inf) or a result that should be finite is not.

    Inputs are checked even when the results look fine: a softcap maps ``inf`` to a finite logit and
    hides it from the forward, but not from the gradients (``d_weight`` gets ``inf * 0``).
    Non-finite results from finite inputs mean the transformed logits overflow (tiny temperature, huge
    scale) or every vocabulary entry of a token is masked."""
    flags = [~_all_finite(t) for t in inputs.values()]
    flags += [_bad_bias(b) for b in biases.values() if b is not None]
    flags += [~_all_finite(r) for r in results]
    if not flags or not bool(torch.stack(flags).any()):
        return
    for name, t in inputs.items():
        if not bool(_all_finite(t)):
            raise ValueError(f"{name} contains NaN or inf values (the counted tokens' rows must be finite)")
    for name, b in biases.items():
        if b is not None and bool(_bad_bias(b)):
            raise ValueError(f"{name} contains NaN or +inf values (-inf is allowed: it masks a vocabulary entry)")
    lse_like = results[0]
    if bool((lse_like == -math.inf).any()):
        raise ValueError(
            "every vocabulary entry is masked (-inf bias) for at least one counted token: its log-softmax is undefined"
        )
    shown = ", ".join(f"{k}={v}" for k, v in transform_args.items())
    raise ValueError(
        f"the transformed logits overflow the accumulation precision ({shown}): a temperature this "
        "small or a scale this large leaves no finite log-sum-exp; rescale the head or the transform"
    )


# ---------------------------------------------------------------------------------------------
# the plan: which backend and which execution path run a call (docs/design.md, "Execution paths").
# The only place that chooses a path: the registered ops run the path they are handed, the modules
# ask plan_pair_step, and kernel_options(path=...) forces one (checked here).
# ---------------------------------------------------------------------------------------------

#: The paths of one ``linear_logprobs`` call, and those of a paired preference module's step.
OP_PATHS = (Path.FUSED, Path.LIBRARY_GEMM, Path.KEPT_LOGITS)
PAIR_PATHS = (Path.PAIR_ENGINE, Path.LONG_PAIR_CHUNKS)
#: The backends whose fold/dz epilogues run on a device type (kept logits, the pair engine); Triton's
#: also on the CPU under the interpreter.
EPILOGUE_BACKENDS = {"cpu": ("native", "torch"), "cuda": ("triton", "torch")}
#: The head dtypes of the library-GEMM path (float64: Triton refuses it).
LIBRARY_GEMM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Plan:
    """What runs a call: the backend, the execution :class:`Path`, and why (one sentence)."""

    backend: str
    path: Path
    reason: str

    def __str__(self) -> str:
        return f"backend={self.backend} path={self.path.value}: {self.reason}"


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def logits_bytes_per_token(
    vocab: int, dtype: torch.dtype, device: torch.device, backward: bool = True, stacked: bool = False
) -> int:
    """Workspace bytes per token: its logits (float32; float64 for a float64 head; twice when a reference's
    rows share the GEMM) and, for a 16-bit head with a backward pass, its dz in the head's dtype.

    Decided without a GPU: on a machine with none, a 16-bit CUDA head counts float32 logits (what
    cuBLAS writes through ``out_dtype``); with one, ``ops.gemm.logits_dtype`` asks the device."""
    if device.type == "cuda" and dtype.itemsize < 4 and not torch.cuda.is_available():
        ld = torch.float32
    else:
        ld = gemm.logits_dtype(dtype, device)
    return vocab * ((2 if stacked else 1) * ld.itemsize + (dtype.itemsize if backward and ld != dtype else 0))


def pair_budget_tokens(
    vocab: int, dtype: torch.dtype, device: torch.device, options: KernelOptions | None = None, stacked: bool = False
) -> int:
    """The counted tokens of one pair-engine chunk the workspace holds (at least 1)."""
    per_token = logits_bytes_per_token(vocab, dtype, device, backward=True, stacked=stacked)
    return max(1, workspace_bytes(device, options) // per_token)


def _has_epilogues(backend: str, device: torch.device) -> bool:
    return backend in EPILOGUE_BACKENDS.get(device.type, ()) or (backend == "triton" and interpreting())


def _why_not(
    path: Path,
    backend: str,
    device: torch.device,
    dtype: torch.dtype,
    tokens: int,
    vocab: int,
    topk: int,
    compiling: bool,
    options: KernelOptions,
) -> str | None:
    """Why an op path cannot run this call (None: it can). Shared by the default choice and the check
    of a forced path."""
    if path is Path.FUSED:
        return None
    if topk:
        return "a top-k is asked for (it lives in the fused forward kernels only)"
    if options.grad_filter_eps is not None:
        return "kernel_options(grad_filter_eps=...) is set (the filter belongs to the fused Triton backward)"
    if path is Path.LIBRARY_GEMM:
        if backend != "triton":
            return f"library GEMMs run with the Triton epilogues: the backend is {backend!r}, not 'triton'"
        if device.type != "cuda" and not interpreting():
            return "CPU tensors without the Triton interpreter (TRITON_INTERPRET=1)"
        if dtype not in LIBRARY_GEMM_DTYPES:
            return f"a {dtype} head (library GEMMs take float32/bfloat16/float16)"
        return None
    # Path.KEPT_LOGITS
    if compiling:
        return "torch.compile is tracing the call (the kept logits have a data-dependent shape)"
    if not _has_epilogues(backend, device):
        return f"the {backend} backend has no fold/dz epilogues for {device.type} tensors"
    if device.type == "cpu" and dtype not in (torch.float32, torch.float64):
        return f"a {dtype} head on the CPU (no float32-output 16-bit GEMM there)"
    need, ws = tokens * logits_bytes_per_token(vocab, dtype, device), workspace_bytes(device, options)
    if need > ws:
        return (
            f"the [{tokens}, {vocab}] logits ({_mib(need)}) exceed the workspace ({_mib(ws)}, "
            "kernel_options(workspace_bytes=...))"
        )
    return None


def _forced_error(path: Path, what: str, why: str) -> ValueError:
    return ValueError(f"kernel_options(path={path.value!r}) cannot run {what}: {why}")


def plan(
    device: torch.device | str,
    dtype: torch.dtype,
    *,
    tokens: int,
    vocab: int,
    needs_grad: bool,
    topk: int = 0,
    compiling: bool = False,
    backend: str | None = None,
    options: KernelOptions | None = None,
) -> Plan:
    """The backend and execution path of one ``linear_logprobs`` call: ``tokens`` rows (all of them,
    ignored ones included, so that no device sync decides) of a ``[vocab, H]`` ``dtype`` head on
    ``device``. ``needs_grad``: a backward follows (grad mode on and an input requires grad);
    ``compiling``: ``torch.compile`` traces the call; ``backend``: the requested name (None:
    ``$EXPO_KERNELS_BACKEND``, else the device's default); ``options``: the ``kernel_options`` (default:
    those in force).

    Rules, first match: ``kernel_options(path=...)`` (raises when the call cannot take it);
    ``engine=False`` -> FUSED; a gradient follows and the logits fit the workspace (and no top-k, no
    gradient filter, not compiling, the backend has epilogues for the device, not a 16-bit CPU head) ->
    KEPT_LOGITS; Triton on CUDA (not the interpreter), 16/32-bit, no top-k, no gradient filter ->
    LIBRARY_GEMM; else FUSED. Needs no GPU: ``torch.device("cuda")`` decides as on a GPU machine."""
    device = torch.device(device)
    options = options or get_kernel_options()
    name = resolve_backend(backend, device, dtype)
    forced = options.path
    if forced is not None:
        if forced in PAIR_PATHS:
            raise _forced_error(
                forced,
                "linear_logprobs",
                "it is a path of the paired preference modules' step (FusedLinearPreferenceLoss); the op takes "
                f"one of {[p.value for p in OP_PATHS]}",
            )
        why = _why_not(forced, name, device, dtype, tokens, vocab, topk, compiling, options)
        if why is not None:
            raise _forced_error(forced, f"this linear_logprobs call ({name} backend, {device.type}, {dtype})", why)
        return Plan(name, forced, f"kernel_options(path={forced.value!r})")
    if not options.engine:
        return Plan(name, Path.FUSED, f"kernel_options(engine=False): the {name} backend's fused kernels")
    if not needs_grad:
        not_kept: str | None = "no gradient follows"
    elif tokens == 0:
        not_kept = "no tokens"
    else:
        not_kept = _why_not(Path.KEPT_LOGITS, name, device, dtype, tokens, vocab, topk, compiling, options)
    if not_kept is None:
        need, ws = tokens * logits_bytes_per_token(vocab, dtype, device), workspace_bytes(device, options)
        return Plan(
            name,
            Path.KEPT_LOGITS,
            f"a gradient follows and the [{tokens}, {vocab}] logits ({_mib(need)}) fit the workspace ({_mib(ws)}): "
            "one GEMM, the logits kept for the backward (6NHV instead of 8NHV)",
        )
    if device.type != "cuda":
        not_gemm: str | None = f"{device.type} tensors (library GEMMs + Triton epilogues run on CUDA)"
    elif interpreting():
        not_gemm = "the Triton interpreter runs the fused kernels"
    else:
        not_gemm = _why_not(Path.LIBRARY_GEMM, name, device, dtype, tokens, vocab, topk, compiling, options)
    if not_gemm is None:
        return Plan(
            name,
            Path.LIBRARY_GEMM,
            f"Triton on CUDA: cuBLAS GEMMs into the workspace + Triton fold/dz epilogues, logits recomputed "
            f"vocabulary-chunk-major in the backward (no atomics); not kept: {not_kept}",
        )
    return Plan(
        name,
        Path.FUSED,
        f"the {name} backend's fused kernels; not kept logits: {not_kept}; not library GEMMs: {not_gemm}",
    )


def plan_linear_logprobs(
    hidden: Tensor, weight: Tensor, bias: Tensor | None = None, *, topk: int | None = None, backend: str | None = None
) -> Plan:
    """:func:`plan` of ``linear_logprobs(hidden, weight, labels, bias, topk=..., backend=...)`` from its
    tensors, in the current grad mode, ``kernel_options`` and autocast state."""
    return plan(
        hidden.device,
        cast_dtype(hidden),  # the dtype the call computes in: the autocast dtype inside a region
        tokens=math.prod(hidden.shape[:-1]),
        vocab=weight.shape[0],
        needs_grad=torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias)),
        topk=topk or 0,
        compiling=torch.compiler.is_compiling(),
        backend=backend,
    )


def pair_path(max_pair_tokens: int, budget_tokens: int, options: KernelOptions | None = None) -> Path:
    """The pair step's path for a batch whose longest pair counts ``max_pair_tokens`` tokens, with
    ``budget_tokens`` (:func:`pair_budget_tokens`) per chunk: PAIR_ENGINE when every pair fits, else
    LONG_PAIR_CHUNKS; a forced ``kernel_options(path=...)`` wins (a forced PAIR_ENGINE whose longest pair
    does not fit raises). A pure function of its arguments: ``engine.pair_chunks`` cuts exactly then."""
    forced = (options or get_kernel_options()).path
    fits = max_pair_tokens <= budget_tokens
    if forced is Path.LONG_PAIR_CHUNKS:
        return forced
    if forced is Path.PAIR_ENGINE and not fits:
        raise _forced_error(
            forced,
            "this batch",
            f"a pair of {max_pair_tokens} counted tokens exceeds the workspace's {budget_tokens} tokens "
            "(kernel_options(workspace_bytes=...), or path='long_pair_chunks')",
        )
    return Path.PAIR_ENGINE if fits else Path.LONG_PAIR_CHUNKS


@dataclass(frozen=True)
class LongPairGrads:
    """What decides how a pair longer than the workspace is done (``Path.LONG_PAIR_CHUNKS``): the head's
    hidden size, the pairs of the batch, which head gradients are asked for, and whether the loss's
    per-token gradient is one number per sequence (``row_constant``: losses of per-sequence sums or means,
    the DPO family, SimPO, CPO, ORPO, ...; not LD-DPO's ``ld_alpha``, whose tail tokens count less)."""

    hidden_size: int
    pairs: int
    need_weight: bool
    need_bias: bool
    row_constant: bool


def long_pair_partials(
    vocab: int,
    dtype: torch.dtype,
    device: torch.device | str,
    grads: LongPairGrads,
    options: KernelOptions | None = None,
) -> tuple[int, str | None]:
    """``(bytes, why not)`` of the one-pass long-pair step: the per-sequence gradient partials it holds
    (an unscaled ``[V, H]`` d_weight and ``[V]`` d_bias per sequence of the pair in flight: one pair's
    chosen row accumulates straight into d_weight when the batch has one pair), and why it cannot run
    (None: it can; the step then runs in one pass, 8NHV, instead of two, 10NHV). It runs when the loss's
    per-token gradient is constant along each sequence and the partials take at most half the workspace
    (the logits' chunk gets the rest); for a frozen head (no d_weight, no d_bias) always: dH's rows are
    scaled token by token."""
    device = torch.device(device)
    acc = 8 if dtype == torch.float64 else 4
    buffers = 1 if grads.pairs == 1 else 2
    partial = buffers * acc * vocab * (grads.hidden_size * grads.need_weight + grads.need_bias)
    if not partial:  # a frozen head: only dH, whose rows scale token by token
        return 0, None
    if not grads.row_constant:
        return partial, (
            "the loss's per-token gradient is not one number per sequence (ld_alpha): the logits are "
            "recomputed once the loss's gradient is known"
        )
    ws = workspace_bytes(device, options)
    if 2 * partial > ws:
        return partial, (
            f"its per-sequence d_weight partials ({_mib(partial)}) exceed half the workspace ({_mib(ws)}, "
            "kernel_options(workspace_bytes=...))"
        )
    return partial, None


def plan_pair_step(
    device: torch.device | str,
    dtype: torch.dtype,
    *,
    tokens: int,
    vocab: int,
    needs_grad: bool,
    backend: str | None = None,
    not_separable: str | None = None,
    max_pair_tokens: int | None = None,
    options: KernelOptions | None = None,
    long_pair: LongPairGrads | None = None,
) -> Plan:
    """The plan of a paired preference module's step (``FusedLinearPreferenceLoss``): the pair engine
    (PAIR_ENGINE; LONG_PAIR_CHUNKS when the longest pair, ``max_pair_tokens`` counted tokens, exceeds the
    workspace; None = not known yet), or, where the engine does not serve the call, the op's plan
    (:func:`plan`) of its policy pass over ``tokens`` rows. ``not_separable``: why the loss is not
    pair-separable (batch-coupled, EXPO's token KL), None when it is. ``long_pair``: what decides whether
    LONG_PAIR_CHUNKS runs in one pass (per-sequence gradient partials, scaled once the loss's gradient is
    known: 8NHV) or two (the logits recomputed: 10NHV), :func:`long_pair_partials`; the reason says which.

    The engine serves: a separable loss, a gradient to compute, a float head on CPU or CUDA (32/64-bit on
    the CPU: no float32-output 16-bit GEMM there), a backend with epilogues for the device, and
    ``engine=True``. A forced pair path the call cannot take raises; a forced op path runs the op."""
    device = torch.device(device)
    options = options or get_kernel_options()
    name = resolve_backend(backend, device, dtype)
    forced = options.path
    why: str | None = None
    if not_separable is not None:
        why = not_separable
    elif not needs_grad:
        why = "no gradient follows (one forward pass is all there is)"
    elif device.type not in EPILOGUE_BACKENDS or not dtype.is_floating_point:
        why = f"{device.type} tensors of {dtype}"
    elif device.type == "cpu" and dtype not in (torch.float32, torch.float64):
        why = f"a {dtype} head on the CPU (no float32-output 16-bit GEMM there)"
    elif not _has_epilogues(name, device):
        why = f"the {name} backend has no fold/dz epilogues for {device.type} tensors"
    if forced in PAIR_PATHS and why is not None:
        raise _forced_error(forced, f"this step ({name} backend, {device.type}, {dtype})", why)
    if why is None and (forced in PAIR_PATHS or (forced is None and options.engine)):
        budget = pair_budget_tokens(vocab, dtype, device, options)
        if max_pair_tokens is None:
            path = forced if forced is not None else Path.PAIR_ENGINE
            size = "" if forced is not None else f"; a pair over {budget} counted tokens takes long_pair_chunks"
        else:
            path = pair_path(max_pair_tokens, budget, options)
            size = f"; longest pair {max_pair_tokens} counted tokens, workspace {budget} tokens"
        lead = f"kernel_options(path={forced.value!r})" if forced is not None else "a separable loss with a gradient"
        if path is Path.LONG_PAIR_CHUNKS:
            size += "; " + _long_pair_passes(vocab, dtype, device, long_pair, options)
        return Plan(name, path, f"{lead}: the {name} epilogues on library GEMMs, chunks of whole pairs{size}")
    op = plan(device, dtype, tokens=tokens, vocab=vocab, needs_grad=needs_grad, backend=backend, options=options)
    if forced is not None:
        lead = f"kernel_options(path={forced.value!r})"
    elif not options.engine:
        lead = "kernel_options(engine=False)"
    else:
        lead = f"no pair engine: {why}"
    return Plan(op.backend, op.path, f"the op's path ({lead}); {op.reason}")


def _long_pair_passes(
    vocab: int, dtype: torch.dtype, device: torch.device, grads: LongPairGrads | None, options: KernelOptions
) -> str:
    """How LONG_PAIR_CHUNKS runs, in words (:func:`long_pair_partials`)."""
    if grads is None:
        return (
            "token chunks in one pass (per-sequence gradient partials) where the loss's gradient is constant "
            "along each sequence and the partials fit half the workspace, else two passes (logits recomputed)"
        )
    partial, why = long_pair_partials(vocab, dtype, device, grads, options)
    if why is None:
        return (
            f"token chunks in one pass: the loss's gradient is constant along each sequence, so dz is formed "
            f"unscaled and its per-sequence partials ({_mib(partial)}) are scaled once the loss is known (8NHV)"
        )
    return f"token chunks in two passes, the logits recomputed (10NHV): {why}"
