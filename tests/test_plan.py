"""The execution plan (``expo_kernels._dispatch.plan`` / ``plan_pair_step``): which backend and which
``Path`` a call takes, pinned as a table for CPU and CUDA (the CUDA rows are decided from a
``torch.device("cuda")`` and need no GPU); every path forced with ``kernel_options(path=...)`` really runs
(a spy on the function that path calls) and matches float64 materialized logits (``reference.py``); a
path the call cannot take raises instead of running another one.
"""

import math

import pytest
import torch
from conftest import require_backend, triton_available
from helpers import BACKEND_NAMES, device_for, rel_err
from reference import reference_logprobs

import expo_kernels as ek
from expo_kernels import _dispatch as D
from expo_kernels.ops import library_gemm
from expo_kernels.ops.options import KernelOptions

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
FUSED, GEMM, KEPT = ek.Path.FUSED, ek.Path.LIBRARY_GEMM, ek.Path.KEPT_LOGITS
ENGINE, LONG = ek.Path.PAIR_ENGINE, ek.Path.LONG_PAIR_CHUNKS
SMALL = dict(tokens=512, vocab=1000)  # 2 MB of float32 logits: fits every default workspace
HUGE = dict(tokens=8192, vocab=128256)  # 4 GB of float32 logits: fits none


def _env(monkeypatch, *, interpreter: bool, triton: bool = True):
    """Plan as on a machine with (or without) the Triton interpreter and an importable Triton."""
    monkeypatch.setenv("TRITON_INTERPRET", "1" if interpreter else "0")
    monkeypatch.setattr(D, "triton_importable", lambda: triton)
    monkeypatch.delenv(D.BACKEND_ENV, raising=False)


# (device, dtype, shape, needs_grad, topk, compiling, backend, options) -> (backend, path)
OP_ROWS = [
    # --- CPU (torch backend: the decision does not depend on the native build) ---
    ("cpu", F32, SMALL, True, 0, False, "torch", {}, "torch", KEPT),
    ("cpu", F64, SMALL, True, 0, False, "torch", {}, "torch", KEPT),
    ("cpu", F32, SMALL, False, 0, False, "torch", {}, "torch", FUSED),  # no backward: nothing to keep for
    ("cpu", BF16, SMALL, True, 0, False, "torch", {}, "torch", FUSED),  # no float32-output 16-bit CPU GEMM
    ("cpu", F32, HUGE, True, 0, False, "torch", {}, "torch", FUSED),  # logits beyond the workspace
    ("cpu", F32, SMALL, True, 0, False, "torch", {"workspace_bytes": 1 << 20}, "torch", FUSED),
    ("cpu", F32, SMALL, True, 2, False, "torch", {}, "torch", FUSED),  # top-k: the fused forward
    ("cpu", F32, SMALL, True, 0, True, "torch", {}, "torch", FUSED),  # torch.compile: no data-dependent shape
    ("cpu", F32, SMALL, True, 0, False, "torch", {"engine": False}, "torch", FUSED),
    ("cpu", F32, SMALL, True, 0, False, "torch", {"grad_filter_eps": 1e-3}, "torch", FUSED),
    ("cpu", F32, dict(tokens=0, vocab=1000), True, 0, False, "torch", {}, "torch", FUSED),
    ("cpu", F32, SMALL, True, 0, False, "torch", {"path": "fused"}, "torch", FUSED),
    # --- CUDA ---
    ("cuda", BF16, SMALL, True, 0, False, None, {}, "triton", KEPT),
    ("cuda", BF16, HUGE, True, 0, False, None, {}, "triton", GEMM),
    ("cuda", F32, SMALL, False, 0, False, None, {}, "triton", GEMM),  # forward only: library GEMMs
    ("cuda", F16, HUGE, True, 0, False, None, {}, "triton", GEMM),
    ("cuda", F32, SMALL, True, 0, True, None, {}, "triton", GEMM),  # compiling: not kept, GEMMs still
    ("cuda", F16, HUGE, True, 4, False, None, {}, "triton", FUSED),  # top-k
    ("cuda", BF16, HUGE, True, 0, False, None, {"grad_filter_eps": 2.0**-12}, "triton", FUSED),
    ("cuda", BF16, HUGE, True, 0, False, None, {"engine": False}, "triton", FUSED),
    ("cuda", BF16, SMALL, True, 0, False, None, {"engine": False}, "triton", FUSED),
    ("cuda", F64, SMALL, True, 0, False, None, {}, "torch", KEPT),  # float64 never goes to Triton
    ("cuda", F64, SMALL, False, 0, False, None, {}, "torch", FUSED),
    ("cuda", BF16, HUGE, True, 0, False, "torch", {}, "torch", FUSED),  # library GEMMs: Triton epilogues
    ("cuda", BF16, SMALL, True, 0, False, "torch", {}, "torch", KEPT),
    ("cuda", BF16, SMALL, True, 0, False, None, {"path": "library_gemm"}, "triton", GEMM),
]


@pytest.mark.parametrize(
    "device,dtype,shape,grad,topk,compiling,backend,options,want_backend,want_path",
    OP_ROWS,
    ids=[
        f"{r[0]}-{str(r[1])[6:]}-{r[2]['tokens']}x{r[2]['vocab']}-grad{int(r[3])}-k{r[4]}-c{int(r[5])}-{r[6]}-{r[7]}"
        for r in OP_ROWS
    ],
)
def test_op_plan_table(
    device, dtype, shape, grad, topk, compiling, backend, options, want_backend, want_path, monkeypatch
):
    _env(monkeypatch, interpreter=False)
    with ek.kernel_options(**options):
        got = D.plan(
            torch.device(device),
            dtype,
            needs_grad=grad,
            topk=topk,
            compiling=compiling,
            backend=backend,
            **shape,
        )
    assert (got.backend, got.path) == (want_backend, want_path), got.reason
    assert got.reason and isinstance(got, ek.Plan)


@pytest.mark.parametrize(
    "device,dtype,grad,backend,want_backend,want_path",
    [
        ("cpu", F32, True, "triton", "triton", KEPT),  # the interpreter has the Triton epilogues
        ("cpu", F32, False, "triton", "triton", FUSED),  # library GEMMs: CUDA only by default
        ("cuda", F32, False, None, "triton", FUSED),  # the interpreter tests the fused kernels
        ("cuda", F32, True, None, "triton", KEPT),
    ],
)
def test_op_plan_under_the_interpreter(device, dtype, grad, backend, want_backend, want_path, monkeypatch):
    _env(monkeypatch, interpreter=True)
    got = D.plan(torch.device(device), dtype, needs_grad=grad, backend=backend, **SMALL)
    assert (got.backend, got.path) == (want_backend, want_path), got.reason


def test_cuda_without_triton_plans_the_torch_backend(monkeypatch):
    _env(monkeypatch, interpreter=False, triton=False)
    got = D.plan("cuda", BF16, needs_grad=True, **HUGE)
    assert (got.backend, got.path) == ("torch", FUSED)
    got = D.plan("cuda", BF16, needs_grad=True, **SMALL)
    assert (got.backend, got.path) == ("torch", KEPT)


def test_cpu_default_backend(monkeypatch):
    monkeypatch.delenv(D.BACKEND_ENV, raising=False)
    got = D.plan("cpu", F32, needs_grad=True, **SMALL)
    assert got.backend == ("native" if "native" in ek.available_backends("cpu") else "torch")
    assert got.path is KEPT


# (device, dtype, grad, separable, max_pair_tokens, backend, options) -> (backend, path)
PAIR_ROWS = [
    ("cpu", F64, True, None, None, "torch", {}, "torch", ENGINE),
    ("cpu", F32, True, None, 100, "torch", {}, "torch", ENGINE),
    ("cpu", F32, True, None, 10**6, "torch", {}, "torch", LONG),  # a pair longer than the workspace
    ("cpu", F32, True, None, 100, "torch", {"workspace_bytes": 4 * 1000 * 99}, "torch", LONG),
    ("cpu", F32, True, None, 100, "torch", {"workspace_bytes": 4 * 1000 * 100}, "torch", ENGINE),
    ("cpu", BF16, True, None, None, "torch", {}, "torch", FUSED),  # 16-bit CPU head: the op's path
    ("cpu", F32, True, "batch-coupled loss ['aot']", None, "torch", {}, "torch", KEPT),  # the op's path
    ("cpu", F32, False, None, None, "torch", {}, "torch", FUSED),  # no gradient: one forward
    ("cpu", F32, True, None, None, "torch", {"engine": False}, "torch", FUSED),
    ("cpu", F32, True, None, 100, "torch", {"path": "long_pair_chunks"}, "torch", LONG),
    ("cpu", F32, True, None, None, "torch", {"path": "kept_logits"}, "torch", KEPT),
    ("cuda", BF16, True, None, 1000, None, {}, "triton", ENGINE),
    ("cuda", BF16, True, None, 2000, None, {}, "triton", LONG),  # 1 GiB / (6 B x 128256) = 1395 tokens
    ("cuda", F64, True, None, None, None, {}, "torch", ENGINE),
    ("cuda", BF16, True, "EXPO's token KL", None, None, {}, "triton", GEMM),
    ("cuda", BF16, False, None, None, None, {}, "triton", GEMM),
]


@pytest.mark.parametrize(
    "device,dtype,grad,not_separable,longest,backend,options,want_backend,want_path",
    PAIR_ROWS,
    ids=[f"{r[0]}-{str(r[1])[6:]}-grad{int(r[2])}-sep{int(r[3] is None)}-{r[4]}-{r[5]}-{r[6]}" for r in PAIR_ROWS],
)
def test_pair_step_plan_table(
    device, dtype, grad, not_separable, longest, backend, options, want_backend, want_path, monkeypatch
):
    _env(monkeypatch, interpreter=False)
    vocab = 128256 if device == "cuda" else 1000
    with ek.kernel_options(**options):
        got = D.plan_pair_step(
            torch.device(device),
            dtype,
            tokens=4096,
            vocab=vocab,
            needs_grad=grad,
            backend=backend,
            not_separable=not_separable,
            max_pair_tokens=longest,
        )
    assert (got.backend, got.path) == (want_backend, want_path), got.reason


def test_pair_path_is_a_pure_function_of_the_longest_pair():
    assert D.pair_path(10, 10) is ENGINE and D.pair_path(11, 10) is LONG
    forced = KernelOptions(path=ek.Path.LONG_PAIR_CHUNKS)
    assert D.pair_path(1, 10, forced) is LONG
    with pytest.raises(ValueError, match="exceeds the workspace"):
        D.pair_path(11, 10, KernelOptions(path=ENGINE))
    # the engine's workspace arithmetic: CPU float32 logits, CUDA float32 logits + bf16 dz
    assert D.pair_budget_tokens(32000, F32, torch.device("cpu"), KernelOptions()) == (512 << 20) // (4 * 32000)
    assert D.pair_budget_tokens(128256, BF16, torch.device("cuda"), KernelOptions()) == (1 << 30) // (6 * 128256)


def test_module_plan_for():
    torch.manual_seed(0)
    w = torch.randn(40, 8, dtype=F64, requires_grad=True)
    h = torch.randn(4, 6, 8, dtype=F64, requires_grad=True)
    labels = torch.randint(0, 40, (4, 6))
    dpo = ek.FusedLinearDPOLoss(backend="torch")
    assert dpo.plan_for(w, h, labels=labels).path is ENGINE
    assert dpo.plan_for(w, h, labels=labels).backend == "torch"
    with ek.kernel_options(workspace_bytes=8 * 40 * 5):  # 5 tokens; a pair counts 12
        assert dpo.plan_for(w, h, labels=labels).path is LONG
    with torch.no_grad():
        assert dpo.plan_for(w, h).path is FUSED
    aot = ek.FusedLinearPreferenceLoss("aot", backend="torch")
    got = aot.plan_for(w, h, labels=labels)
    assert got.path is KEPT and "batch-coupled" in got.reason
    kto = ek.FusedLinearPreferenceLoss("kto", backend="torch")
    assert kto.plan_for(w, h).path is KEPT  # the unpaired modules: the op's plan of the policy pass


# ---------------------------------------------------------------------------------------------
# kernel_options(path=...): validation, and what cannot run raises
# ---------------------------------------------------------------------------------------------


def test_path_option_is_validated():
    with pytest.raises(ValueError, match=r"path must be None or one of \['fused', 'library_gemm', 'kept_logits'"):
        with ek.kernel_options(path="fastest"):
            pass
    with pytest.raises(ValueError, match="path must be"):
        with ek.kernel_options(path=3):
            pass
    with pytest.raises(ValueError, match="engine=False.*contradicts path='kept_logits'"):
        with ek.kernel_options(engine=False, path="kept_logits"):
            pass
    for spelled in (ek.Path.KEPT_LOGITS, "kept_logits", "KEPT_LOGITS"):
        with ek.kernel_options(path=spelled) as opts:
            assert opts.path is KEPT
    with ek.kernel_options(engine=False, path="fused") as opts:
        assert opts.path is FUSED
    assert D.get_kernel_options().path is None  # restored after each block


@pytest.mark.parametrize(
    "path,call,match",
    [
        ("library_gemm", dict(device="cpu", backend=None), "library GEMMs run with the Triton epilogues"),
        ("library_gemm", dict(device="cpu", backend="torch"), "not 'triton'"),
        ("kept_logits", dict(device="cpu", topk=3), "top-k"),
        ("kept_logits", dict(device="cpu", compiling=True), "torch.compile"),
        ("kept_logits", dict(device="cpu", dtype=BF16), "on the CPU"),
        ("kept_logits", dict(device="cpu", tokens=10**7), "exceed the workspace"),
        ("kept_logits", dict(device="cuda", grad_filter=True), "grad_filter_eps"),
        ("library_gemm", dict(device="cuda", topk=2), "top-k"),
        ("pair_engine", dict(device="cpu"), "paired preference modules"),
        ("long_pair_chunks", dict(device="cuda"), "paired preference modules"),
    ],
)
def test_impossible_forced_op_paths_raise(path, call, match, monkeypatch):
    _env(monkeypatch, interpreter=False)
    options = dict(path=path)
    if call.pop("grad_filter", False):
        options["grad_filter_eps"] = 1e-3
    device = torch.device(call.pop("device"))
    args = dict(dtype=F32, tokens=64, vocab=100, needs_grad=True, backend="torch" if device.type == "cpu" else None)
    args.update(call)
    with ek.kernel_options(**options), pytest.raises(ValueError, match=f"path='{path}'.*{match}"):
        D.plan(device, **args)


def test_impossible_forced_pair_paths_raise(monkeypatch):
    _env(monkeypatch, interpreter=False)
    with ek.kernel_options(path="pair_engine"), pytest.raises(ValueError, match="batch-coupled"):
        D.plan_pair_step(
            "cpu", F32, tokens=8, vocab=10, needs_grad=True, backend="torch", not_separable="batch-coupled"
        )
    with ek.kernel_options(path="long_pair_chunks"), pytest.raises(ValueError, match="no gradient"):
        D.plan_pair_step("cpu", F32, tokens=8, vocab=10, needs_grad=False, backend="torch")
    with ek.kernel_options(path="pair_engine"), pytest.raises(ValueError, match="on the CPU"):
        D.plan_pair_step("cpu", BF16, tokens=8, vocab=10, needs_grad=True, backend="torch")


def test_a_forced_path_the_public_call_cannot_take_raises():
    h = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(30, 8, requires_grad=True)
    y = torch.randint(0, 30, (5,))
    with ek.kernel_options(path="kept_logits"), pytest.raises(ValueError, match="top-k"):
        ek.linear_logprobs(h, w, y, return_stats=True, topk=2, backend="torch")
    with ek.kernel_options(path="library_gemm"), pytest.raises(ValueError, match="library_gemm"):
        ek.linear_logprobs(h, w, y, backend="torch")
    with ek.kernel_options(path="pair_engine"), pytest.raises(ValueError, match="pair_engine"):
        ek.linear_logprobs(h, w, y, backend="torch")
    loss = ek.FusedLinearPreferenceLoss("aot", backend="torch")
    with ek.kernel_options(path="pair_engine"), pytest.raises(ValueError, match="batch-coupled"):
        loss(w, torch.randn(2, 3, 8), torch.randint(0, 30, (2, 3)), ref_hidden=torch.randn(2, 3, 8))


# ---------------------------------------------------------------------------------------------
# a forced path runs that path, and matches float64 materialized logits
# ---------------------------------------------------------------------------------------------


def _spy(monkeypatch, module, name, calls):
    real = getattr(module, name)

    def wrapped(*args, **kwargs):
        calls.append(f"{module.__name__.rsplit('.', 1)[-1]}.{name}")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


def _op_cases():
    cases = []
    for backend in BACKEND_NAMES:
        for path in ("fused", "kept_logits", "library_gemm"):
            if path == "library_gemm" and backend != "triton":
                continue  # raises: test_a_forced_path_the_public_call_cannot_take_raises
            cases.append((backend, path))
    return cases


@pytest.mark.parametrize("backend,path", _op_cases())
def test_a_forced_op_path_runs_that_path_and_matches_float64(backend, path, monkeypatch):
    if backend == "triton" and not triton_available():
        pytest.skip("Triton cannot run here")
    dev = device_for(backend)
    dtype, tol = (F32, 2e-5) if backend == "triton" else (F64, 1e-10)
    g = torch.Generator().manual_seed(3)
    n, h, v = 13, 16, 70
    hidden = torch.randn(n, h, generator=g, dtype=F64)
    weight = torch.randn(v, h, generator=g, dtype=F64) * 0.4
    bias = torch.randn(v, generator=g, dtype=F64) * 0.3
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::4] = -100
    grad = torch.randn(n, generator=g, dtype=F64)
    transform = dict(softcap=4.0, temperature=0.9)

    calls: list = []
    module = D.backend_module(backend)
    for name in ("forward_partial", "backward"):
        _spy(monkeypatch, module, name, calls)
    if backend == "triton":
        engine_ops = D.library_gemm_module()
        for name in ("forward_partial", "backward"):
            _spy(monkeypatch, engine_ops, name, calls)
    for name in ("forward_keeping_logits", "backward_from_logits"):
        _spy(monkeypatch, library_gemm, name, calls)

    leaves = [t.to(dev, dtype).detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    with ek.kernel_options(path=path):
        assert D.plan_linear_logprobs(leaves[0], leaves[1], leaves[2], backend=backend).path.value == path
        logp = ek.linear_logprobs(leaves[0], leaves[1], labels.to(dev), leaves[2], backend=backend, **transform)
        (logp.double() * grad.to(dev)).sum().backward()

    backend_mod = module.__name__.rsplit(".", 1)[-1]
    want_calls = {
        "fused": [f"{backend_mod}.forward_partial", f"{backend_mod}.backward"],
        "kept_logits": ["library_gemm.forward_keeping_logits", "library_gemm.backward_from_logits"],
        "library_gemm": ["library_gemm.forward_partial", "library_gemm.backward"],
    }[path]
    assert calls == want_calls

    ref_leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    want = reference_logprobs(ref_leaves[0], ref_leaves[1], labels, ref_leaves[2], **transform)
    (want * grad).sum().backward()
    assert rel_err(logp.cpu(), want) < tol
    for got_t, want_t in zip(leaves, ref_leaves, strict=True):
        assert rel_err(got_t.grad.cpu(), want_t.grad) < tol


def test_engine_false_is_the_fused_alias(monkeypatch):
    calls: list = []
    for name in ("forward_keeping_logits", "backward_from_logits"):
        _spy(monkeypatch, library_gemm, name, calls)
    h = torch.randn(6, 8, dtype=F64, requires_grad=True)
    w = torch.randn(20, 8, dtype=F64, requires_grad=True)
    y = torch.randint(0, 20, (6,))
    with ek.kernel_options(engine=False):
        assert D.plan_linear_logprobs(h, w, backend="torch").path is FUSED
        ek.linear_logprobs(h, w, y, backend="torch").sum().backward()
    assert calls == []
    ek.linear_logprobs(h, w, y, backend="torch").sum().backward()  # the default keeps them
    assert calls == ["library_gemm.forward_keeping_logits", "library_gemm.backward_from_logits"]


def _dpo_reference(hidden, weight, labels, ref_hidden, beta):
    """float64 DPO loss from materialized logits (``reference.py``); the reference through the policy's
    head is a constant of the loss (detached), as in the module."""
    pol = reference_logprobs(hidden, weight, labels).sum(-1)
    ref = reference_logprobs(ref_hidden, weight.detach(), labels).sum(-1)
    b = labels.shape[0] // 2
    margin = (pol[:b] - ref[:b]) - (pol[b:] - ref[b:])
    return -torch.nn.functional.logsigmoid(beta * margin).mean()


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("path", ["pair_engine", "long_pair_chunks", "fused", "kept_logits"])
def test_a_forced_module_path_runs_that_path_and_matches_float64(backend, path, monkeypatch):
    if backend == "triton" and not triton_available():
        pytest.skip("Triton cannot run here")
    if backend != "triton":
        require_backend(backend, device_for(backend).type)
    from expo_kernels import engine
    from expo_kernels.modules import paired

    dev = device_for(backend)
    dtype, tol = (F32, 2e-5) if backend == "triton" else (F64, 1e-10)
    g = torch.Generator().manual_seed(8)
    rows, steps, h, v = 4, 6, 8, 40
    hidden = torch.randn(rows, steps, h, generator=g, dtype=F64)
    ref_hidden = hidden + 0.2 * torch.randn(rows, steps, h, generator=g, dtype=F64)
    weight = torch.randn(v, h, generator=g, dtype=F64) * 0.5
    labels = torch.randint(0, v, (rows, steps), generator=g)
    labels[:, :2] = -100

    steps_run: list = []

    def run_pair_step(*args, **kwargs):
        steps_run.append("long_pair_chunks" if kwargs["plan"].chunks is None else "pair_engine")
        return engine.run_pair_step(*args, **kwargs)

    monkeypatch.setattr(paired, "run_pair_step", run_pair_step)
    calls: list = []
    for name in ("forward_keeping_logits", "backward_from_logits"):
        _spy(monkeypatch, library_gemm, name, calls)

    loss_fn = ek.FusedLinearDPOLoss(beta=0.5, backend=backend, compute_metrics=False)
    h_leaf, w_leaf = (t.to(dev, dtype).detach().clone().requires_grad_() for t in (hidden, weight))
    with ek.kernel_options(path=path):
        assert loss_fn.plan_for(w_leaf, h_leaf, labels=labels.to(dev)).path.value == path
        out = loss_fn(w_leaf, h_leaf, labels.to(dev), ref_hidden=ref_hidden.to(dev, dtype))
        out.loss.backward()
    assert steps_run == ([path] if path in ("pair_engine", "long_pair_chunks") else [])
    # the policy pass keeps its logits on the kept path only (the reference pass runs without a gradient)
    assert ("library_gemm.backward_from_logits" in calls) == (path == "kept_logits")

    h64, w64 = (t.detach().clone().requires_grad_() for t in (hidden, weight))
    want = _dpo_reference(h64, w64, labels, ref_hidden, 0.5)
    want.backward()
    assert math.isclose(out.loss.item(), want.item(), rel_tol=tol, abs_tol=tol)
    assert rel_err(h_leaf.grad.cpu(), h64.grad) < tol
    assert rel_err(w_leaf.grad.cpu(), w64.grad) < tol
