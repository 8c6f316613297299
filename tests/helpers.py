"""Shared test helpers: the backend names and the device each one's tensors live on, logit transforms,
error metrics and an allocation probe.

Test modules import from here (and from ``reference.py``, the independent float64 reference), never
from one another.
"""

import contextlib
import math
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


def as_is_and_under_a_meta_default(fn):
    """``(fn(), fn() with "meta" as torch's default device)``: how a call behaves when a trainer has set another
    default device (``torch.set_default_device``). A tensor it makes without its inputs' device lands on meta
    there: it fails to mix with the inputs, or comes back on meta, so the two results differ."""
    as_is = fn()
    with torch.device("meta"):
        return as_is, fn()


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


# ----------------------------------------------------------------------------------------------------
# Tolerances: the one rule every accuracy test against the float64 reference uses.
# ----------------------------------------------------------------------------------------------------
#: log-probs and statistics (float32 outputs) of the CPU backends for 16-bit inputs: they upcast the
#: rounded inputs and compute in float32, measured <= 3e-7 against float64 of the same rounded inputs.
_CPU_16BIT_VALUES = 1e-5
_QUANTITIES = ("logprobs", "stats", "grad")


def tolerance(dtype: torch.dtype, backend: str, quantity: str, *, naive_error: float | None = None) -> float:
    """Relative tolerance of ``quantity`` ("logprobs", "stats" or "grad"; gradients normwise) of ``backend``
    on ``dtype`` inputs, against float64 computed from the *same* (rounded) inputs.

    The rule, stated once:

    * float64 (torch, native): 1e-10 — float64 throughout.
    * float32: 2e-5 — float32 accumulation over the hidden size and the vocabulary.
    * bf16/fp16 on the torch and native backends: values 1e-5 (they are float32 arithmetic on the
      upcast inputs, measured <= 3e-7), gradients ``finfo(dtype).eps`` normwise (2^-7 for bf16, 2^-10
      for fp16): the gradient is returned in the input dtype, one rounding of unit roundoff eps/2 on top
      of float32 arithmetic (measured <= 4e-5 before that rounding).
    * bf16/fp16 on Triton (a GPU: the interpreter's 16-bit arithmetic is wrong, ``unsupported_reason``):
      no worse than the naive computation in that dtype (logits materialized in ``dtype``, then
      log-softmax; ``reference.naive_logprobs``), whose error against the same float64 reference the
      caller measures and passes as ``naive_error``; never tighter than the CPU backends' bound.
    """
    if quantity not in _QUANTITIES:
        raise ValueError(f"quantity must be one of {_QUANTITIES}; got {quantity!r}")
    if dtype == torch.float64:
        return 1e-10
    if dtype == torch.float32:
        return 2e-5
    if dtype not in _LOW_PRECISION:
        raise ValueError(f"no tolerance for {dtype}")
    cpu = torch.finfo(dtype).eps if quantity == "grad" else _CPU_16BIT_VALUES
    if backend == "triton":
        if naive_error is None:
            raise ValueError("Triton's 16-bit tolerance is relative to the naive same-dtype error: pass naive_error")
        return max(cpu, naive_error)
    return cpu


# ----------------------------------------------------------------------------------------------------
# Conformance: one input builder, one comparison against float64, and the execution paths a backend can be
# forced onto (tests/test_conformance.py, tests/test_fuzz.py, tests/test_linear_logprobs.py).
# ----------------------------------------------------------------------------------------------------


def make_logprob_inputs(
    n: int,
    h: int,
    v: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    *,
    seed: int = 0,
    ignore_frac: float = 0.25,
    bias: bool = False,
    strided: bool = False,
    scale: float = 1.0,
    lead: tuple = (),
    ignore_index: int = -100,
    requires_grad: bool = True,
):
    """``(hidden [*lead, n, h], weight [v, h], labels [*lead, n], bias [v] | None)`` of one ``linear_logprobs``
    call, as leaves that require grad (``requires_grad``).

    Values are drawn in float64 on the CPU from a generator seeded ``seed``, then rounded to ``dtype`` and
    moved to ``device``: the same inputs (up to rounding) for every backend, device and dtype. ``hidden``
    has standard normal entries times ``scale``; ``weight`` ``N(0, 4 / h)`` (logits of spread ~2); ``bias``
    ``N(0, 0.25)``. About ``ignore_frac`` of the labels are ``ignore_index``. ``strided``: ``hidden`` is a
    non-contiguous view (every second column of a ``[..., 2h]`` tensor)."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(lead) + (n,)
    hidden = torch.randn(shape + (2 * h if strided else h,), generator=g, dtype=torch.float64) * scale
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5 * 2
    b = torch.randn(v, generator=g, dtype=torch.float64) * 0.5 if bias else None
    labels = torch.randint(0, v, shape, generator=g) if v > 0 else torch.zeros(shape, dtype=torch.long)
    labels[torch.rand(shape, generator=g) < ignore_frac] = ignore_index
    hidden = hidden.to(device, dtype)
    if strided:
        hidden = hidden[..., ::2]  # a view of a tensor that requires no grad: itself a leaf
    leaves = [hidden, weight.to(device, dtype), None if b is None else b.to(device, dtype)]
    if requires_grad:
        leaves = [None if t is None else t.requires_grad_() for t in leaves]
    return leaves[0], leaves[1], labels.to(device), leaves[2]


def _worst_elements(got: torch.Tensor, want: torch.Tensor, count: int) -> str:
    """The ``count`` elements of largest absolute error, one line each: index, got, want, abs and rel error."""
    err = (got - want).abs()
    err = torch.where(torch.isnan(err), torch.full_like(err, math.inf), err)
    flat = err.reshape(-1)
    k = min(count, flat.numel())
    lines = []
    for i in flat.topk(k).indices.tolist():
        index = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), err.shape)) if err.dim() else ()
        a, b = got.reshape(-1)[i].item(), want.reshape(-1)[i].item()
        rel = abs(a - b) / max(abs(b), 1e-30)
        lines.append(f"    at {index}: got {a:.10g}, want {b:.10g}, abs err {abs(a - b):.3e}, rel err {rel:.3e}")
    return "\n".join(lines)


def assert_close_to_reference(
    got: torch.Tensor,
    want: torch.Tensor,
    dtype: torch.dtype,
    backend: str,
    quantity: str,
    *,
    name: str = "",
    naive_error: float | None = None,
    worst: int = 5,
) -> None:
    """``got`` (any dtype and device) against the float64 reference ``want`` within
    ``tolerance(dtype, backend, quantity)``: elementwise ``|got - want| <= tol (1 + |want|)`` for "logprobs"
    and "stats", normwise ``|got - want| <= tol |want|`` for "grad" (the rule's gradients are normwise).
    Non-finite reference entries (a masked label's ``-inf``) must be matched exactly; a bool quantity
    (``is_top1``) exactly everywhere.

    On failure the message names the quantity and lists the ``worst`` elements (index, got, want, absolute
    and relative error), not just a norm."""
    label = f"{name or quantity} ({backend}, {str(dtype).replace('torch.', '')})"
    got = got.detach().cpu()
    want = want.detach().cpu()
    assert got.shape == want.shape, f"{label}: shape {tuple(got.shape)} != reference {tuple(want.shape)}"
    if want.dtype == torch.bool or got.dtype == torch.bool:
        wrong = got.bool() != want.bool()
        if bool(wrong.any()):
            where = [tuple(i) for i in wrong.nonzero().tolist()[:worst]]
            raise AssertionError(f"{label}: {int(wrong.sum())} of {wrong.numel()} entries differ, first at {where}")
        return
    got, want = got.double(), want.double()
    tol = tolerance(dtype, backend, quantity, naive_error=naive_error)
    finite = torch.isfinite(want)
    if not torch.equal(got[~finite], want[~finite]):
        raise AssertionError(
            f"{label}: entries where the reference is not finite differ\n{_worst_elements(got, want, worst)}"
        )
    g, w = got[finite], want[finite]
    if quantity == "grad":
        err, ref = (g - w).norm().item(), w.norm().item()
        ok = math.isfinite(err) and err <= tol * max(ref, 1e-30)
        summary = f"normwise relative error {err / max(ref, 1e-30):.3e} > tol {tol:g}"
    else:
        excess = (g - w).abs() - tol * (1 + w.abs())
        ok = bool((excess <= 0).all()) and bool(torch.isfinite(g).all())
        bad = int((~(excess <= 0)).sum())
        summary = f"{bad} of {g.numel()} entries exceed tol {tol:g} * (1 + |want|)"
    if not ok:
        shown = torch.where(finite, got, torch.zeros_like(got)), torch.where(finite, want, torch.zeros_like(want))
        raise AssertionError(f"{label}: {summary}; worst elements:\n{_worst_elements(*shown, worst)}")


@contextlib.contextmanager
def _backend_taken_by_name():
    """``_dispatch.resolve_backend`` returning the requested name: the plan's rules without building the
    native extension or asking which backends this machine has (conftest skips what cannot run)."""
    from unittest import mock

    from expo_kernels import _dispatch

    with mock.patch.object(_dispatch, "resolve_backend", lambda name, device, dtype=None: name):
        yield _dispatch


def forced_path_refusal(
    backend: str,
    path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
    *,
    tokens: int = 16,
    vocab: int = 64,
) -> str | None:
    """Why ``_dispatch`` refuses ``kernel_options(path=path)`` for a call of ``backend`` on ``dtype`` tensors
    on ``device`` (``device_for(backend)`` by default; on the CPU under the Triton interpreter conftest.py
    sets up), or None when it takes it. An op path (``_dispatch.OP_PATHS``) is asked of ``plan`` for
    ``linear_logprobs`` with a gradient; a pair path of ``plan_pair_step`` for a pair-separable loss with a
    gradient. The backend is taken by name: whether this machine runs it is conftest's business."""
    from expo_kernels.ops.options import KernelOptions, as_path

    path = as_path(path)
    device = device_for(backend) if device is None else torch.device(device)
    if backend == "triton" and dtype == torch.float64:
        return "Triton refuses float64 (resolve_backend)"
    options = KernelOptions(path=path)
    shape = dict(tokens=tokens, vocab=vocab, needs_grad=True, backend=backend, options=options)
    with _backend_taken_by_name() as D:
        try:
            if path in D.PAIR_PATHS:
                got = D.plan_pair_step(device, dtype, max_pair_tokens=tokens, **shape)
            else:
                got = D.plan(device, dtype, **shape)
        except ValueError as e:
            return str(e)
    if got.path is not path:  # a forced path the plan does not take, nor refuses
        return f"the plan took {got.path.value}: {got.reason}"
    return None


def accepted_op_paths(backend: str, dtype: torch.dtype, device: torch.device | None = None, **shape) -> list:
    """The op paths (``_dispatch.OP_PATHS``, as names) ``kernel_options(path=...)`` can force for this call."""
    from expo_kernels import _dispatch

    return [p.value for p in _dispatch.OP_PATHS if forced_path_refusal(backend, p, dtype, device, **shape) is None]


# ----------------------------------------------------------------------------------------------------
# TRL end-to-end fixtures, shared by test_integration_trl.py and test_deepspeed.py (test modules never
# import one another). Built lazily: importing helpers must not need trl / transformers / datasets.
# ----------------------------------------------------------------------------------------------------
TRL_RTOL = 2e-5  # logged values (fp32 model; the two heads tile the vocabulary differently)
TRL_PARAM_TOL = 1e-5  # max |difference| of any parameter after the steps
TRL_SKIP_LOG = frozenset(
    {
        "train_runtime",
        "train_samples_per_second",
        "train_steps_per_second",
        "total_flos",
        "epoch",
        "step",
        "learning_rate",
    }
)
# What every TRL trainer of the tests shares: 3 SGD steps on the CPU, fp32, logging each step, no saving.
# No output_dir: each caller passes one under its tmp_path (trainer_output_dir).
TRL_TRAINER_ARGS = dict(
    per_device_train_batch_size=4,
    max_steps=3,
    learning_rate=0.1,
    optim="sgd",
    logging_steps=1,
    report_to=[],
    seed=0,
    save_strategy="no",
    use_cpu=True,
    bf16=False,
    disable_tqdm=True,
    gradient_checkpointing=False,
)


def trl_tokenizer():
    """A character-level tokenizer: one token per character, no download."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list("abcdefghijklmnopqrstuvwxyz .?!:")
    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def trl_datasets():
    """``(pairs, unpaired)``: the tiny preference data sets of the TRL tests."""
    from datasets import Dataset

    prompts = ["what is up?", "say hi.", "count: ", "name a color.", "sky?", "ok?", "go.", "why?"]
    pairs = Dataset.from_dict(
        {
            "prompt": prompts,
            "chosen": [" all good", " hi there", " one two", " blue", " up", " yes", " going", " because"],
            "rejected": [" no", " go away", " zero", " the sky is a color", " down", " no way", " stop", " dunno"],
        }
    )
    unpaired = Dataset.from_dict(
        {
            "prompt": prompts,
            "completion": [" all good", " go away", " one two", " the sky", " up", " no way", " going", " dunno"],
            "label": [True, False, True, False, True, False, True, False],
        }
    )
    return pairs, unpaired


def tiny_llama(vocab_size):
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    return transformers.LlamaForCausalLM(cfg)


def plain_logits_expo_trainer_class():
    """A ``trl.DPOTrainer`` whose loss is EXPO on materialized logits (exact token KL) with the hand formula
    of ``reference.loss_expo``: the reference of the fused EXPO trainer (TRL has no EXPO)."""
    from reference import loss_expo
    from trl import DPOTrainer

    class PlainLogitsEXPOTrainer(DPOTrainer):
        lam = 0.5

        def _compute_loss(self, model, inputs, return_outputs):
            mask = inputs["completion_mask"][:, 1:].bool()
            kwargs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
            labels = inputs["input_ids"][:, 1:]
            logp_all = model(**kwargs).logits[:, :-1].float().log_softmax(-1)
            with torch.no_grad():
                ref_all = self.ref_model(**kwargs).logits[:, :-1].float().log_softmax(-1)
            tok = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
            seq = torch.where(mask, tok, torch.zeros_like(tok)).sum(1)
            kl = (ref_all.exp() * (ref_all - logp_all)).sum(-1)
            kl = torch.where(mask, kl, torch.zeros_like(kl)).sum(1)
            c, r = seq.chunk(2)
            return loss_expo(dict(c=c, r=r, token_kl=kl), self.lam, "token").mean()

    return PlainLogitsEXPOTrainer


def missing_external_input(reason: str):
    """A test whose external input (a download, an optional package) is missing: skipped with ``reason``
    on a developer machine, failed under CI (``CI=true``), where a skip would hide that it never ran."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and this test cannot run: {reason}")
    pytest.skip(reason)


def run_rank_jobs(jobs, rank: int, out_dir: str) -> None:
    """The body of a rank spawned by ``torch.multiprocessing``, once its process group is up: run each
    ``(name, fn)`` of ``jobs`` (``fn()`` returns the case's ``{check: (error, tolerance)}``; an exception
    is recorded as ``{"error": traceback}`` for the parent to assert), save the results and the seconds
    per case to ``out_dir/rank<rank>.pt``, then barrier, destroy the group and ``os._exit(0)``.

    Why not a normal return: ``destroy_process_group`` leaves gloo's threads (``gloo_tcp_loop``,
    ``pt_gloo_runloop``) running in torch 2.13, and the interpreter's teardown then races them: about 1
    exit in 20 aborts with "terminate called without an active exception" (a joinable ``std::thread``
    destroyed), after every check has finished. Leaving through ``os._exit`` skips that teardown; the
    results are saved before the barrier, so nothing is lost, and a failure before this point still
    surfaces as the rank's exception."""
    import sys
    import time
    import traceback

    import torch.distributed as dist

    results, times = {}, {}
    for name, fn in jobs:
        t0 = time.perf_counter()
        try:
            results[name] = fn()
        except Exception:  # recorded, asserted in the parent
            results[name] = {"error": traceback.format_exc()}
        times[name] = time.perf_counter() - t0
    results["__seconds__"] = times
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
