"""Conformance: every (backend, execution path) pair that can exist, by name, against float64 materialized
logits.

A test's ``backend`` alone does not say which code ran (with a gradient on the CPU the op keeps its logits,
so a plain ``backend="native"`` call runs the fold/dz epilogues, never the native fused kernels). Here each
test forces its path with ``kernel_options(path=...)``, checks with a spy on the functions that path calls
that it really ran, and compares values (log-probs; lse, entropy, mean_logit, log_sum_p2, is_top1) and
gradients (hidden, weight, bias) with float64 references (``reference.py``) within ``helpers.tolerance``
(``helpers.assert_close_to_reference``, which prints the worst elements on failure).

The case table comes from the plan (``_dispatch.plan`` / ``plan_pair_step``, asked through
``helpers.forced_path_refusal``): every backend name x every ``Path`` the plan accepts, forced, for a
float32 call on ``device_for(backend)`` (the CPU under the Triton interpreter here). A new path or backend
appears here by itself; ``test_the_case_table`` pins the list so that nothing drops out silently.

Ids: ``test_op_*[<backend>-<path>-...]`` for ``linear_logprobs`` (fused, library_gemm, kept_logits) and
``test_module_*[<backend>-<path>-...]`` for the paired module's step (pair_engine, long_pair_chunks):
``pytest -k "native-fused"`` runs one pair. Shapes are small (the interpreter is slow); V = 100 spans
several vocabulary tiles of every backend (shrunk: torch/native 32, Triton 32 with 2 splits, Triton's
epilogue blocks 64), so the partial-state merges run.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    BACKEND_NAMES,
    TRANSFORMS,
    assert_close_to_reference,
    device_for,
    forced_path_refusal,
    make_logprob_inputs,
    rel_err,
    shrink_native_tiles,
)
from reference import logits64, naive_logprobs, reference_logprobs, reference_module_loss, reference_stats

import expo_kernels as ek
from expo_kernels import _dispatch as D
from expo_kernels.ops import epilogues as epilogue_ops
from expo_kernels.ops import library_gemm, torch_backend

F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16
DTYPES = (F32, F64, BF16)
STAT_NAMES = ("lse", "entropy", "mean_logit", "log_sum_p2", "is_top1")
N, H, V = 13, 16, 100  # V over the (shrunk) vocabulary tiles of every backend


# ---------------------------------------------------------------------------------------------
# the case table, from the plan
# ---------------------------------------------------------------------------------------------


def _cases(paths) -> list[tuple[str, str]]:
    """(backend, path) for every backend name and every path the plan accepts, forced, for float32."""
    return [(b, p.value) for b in BACKEND_NAMES for p in paths if forced_path_refusal(b, p) is None]


def _dtype_cases(cases) -> list[tuple[str, str, torch.dtype]]:
    """(backend, path, dtype) for each dtype of DTYPES the plan accepts for that pair on its device (a case
    this machine cannot run, Triton's bf16 in the interpreter, is skipped by conftest with the reason)."""
    return [(b, p, d) for b, p in cases for d in DTYPES if forced_path_refusal(b, p, d) is None]


OP_CASES = _cases(D.OP_PATHS)
MODULE_CASES = _cases(D.PAIR_PATHS)
OP_DTYPE_CASES = _dtype_cases(OP_CASES)
MODULE_DTYPE_CASES = _dtype_cases(MODULE_CASES)


def _ids(cases):
    return ["-".join(str(x).replace("torch.", "") for x in c) for c in cases]


def test_the_case_table():
    """Every path is an op path or a pair path, and the table holds every pair that can exist: a backend
    or path the plan stops accepting fails here instead of silently leaving the suite."""
    assert set(D.OP_PATHS) | set(D.PAIR_PATHS) == set(ek.Path)
    assert not set(D.OP_PATHS) & set(D.PAIR_PATHS)
    assert OP_CASES == [
        ("native", "fused"),
        ("native", "kept_logits"),
        ("triton", "fused"),
        ("triton", "library_gemm"),
        ("triton", "kept_logits"),
        ("torch", "fused"),
        ("torch", "kept_logits"),
    ]
    assert MODULE_CASES == [(b, p) for b in ("native", "triton", "torch") for p in ("pair_engine", "long_pair_chunks")]
    # library GEMMs run with Triton's epilogues only (the reason is the plan's)
    for backend in ("native", "torch"):
        assert "not 'triton'" in forced_path_refusal(backend, "library_gemm")
    if not torch.cuda.is_available():  # the CPU's dtypes: no 16-bit kept logits or pair engine there
        assert [(b, p) for b, p, d in OP_DTYPE_CASES if d == BF16] == [
            ("native", "fused"),
            ("triton", "fused"),  # skipped in the interpreter (helpers.unsupported_reason)
            ("triton", "library_gemm"),  # likewise
            ("torch", "fused"),
        ]
        assert [d for b, p, d in MODULE_DTYPE_CASES if d == BF16] == []
        assert "head on the CPU" in forced_path_refusal("torch", "kept_logits", BF16)
    assert not any(b == "triton" and d == F64 for b, _, d in OP_DTYPE_CASES + MODULE_DTYPE_CASES)


# ---------------------------------------------------------------------------------------------
# set-up: small tiles, and spies on the functions each path calls
# ---------------------------------------------------------------------------------------------


def _small_tiles(backend, monkeypatch):
    """Vocabulary tiles below V (and token tiles below N): the fused kernels merge partial states."""
    if backend == "torch":
        monkeypatch.setattr(torch_backend, "TOKEN_CHUNK", 8)
        monkeypatch.setattr(torch_backend, "VOCAB_CHUNK", 32)
    elif backend == "native":
        shrink_native_tiles(monkeypatch, 8, 32)
    elif backend == "triton":
        from expo_kernels.ops.triton import configs as triton_configs

        monkeypatch.setattr(triton_configs, "_choose_splits", lambda *a: 2)


def _spy(monkeypatch, module, name, calls, label):
    real = getattr(module, name)

    def wrapped(*args, **kwargs):
        calls.append(label)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


def _spy_paths(backend, path, monkeypatch) -> list:
    """Record, in call order, the backend's fused kernels, the library-GEMM op's four entries and the
    fold/dz epilogues of the backend's provider (and Triton's, which library GEMMs run with)."""
    calls: list = []
    module = D.backend_module(backend)
    for name in ("forward_partial", "backward"):
        _spy(monkeypatch, module, name, calls, f"{backend}.{name}")
    for name in ("forward_partial", "backward", "forward_keeping_logits", "backward_from_logits"):
        _spy(monkeypatch, library_gemm, name, calls, f"library_gemm.{name}")
    providers = {backend} | ({"triton"} if path == "library_gemm" else set())
    for provider in providers:
        if provider == "triton":
            from expo_kernels.ops.triton import epilogues as triton_epilogues

            _spy(monkeypatch, triton_epilogues, "fold", calls, "triton.fold")
            _spy(monkeypatch, triton_epilogues, "to_dz", calls, "triton.to_dz")
        else:
            _spy(monkeypatch, epilogue_ops, f"{provider}_fold", calls, f"{provider}.fold")
            _spy(monkeypatch, epilogue_ops, f"{provider}_to_dz", calls, f"{provider}.to_dz")
    return calls


def _in_order(calls) -> list:
    """The calls with consecutive repeats (one per chunk) collapsed."""
    return [c for i, c in enumerate(calls) if i == 0 or calls[i - 1] != c]


def _expected_op_calls(backend, path, counted: bool) -> list:
    """What a forced op path calls, forward then backward. Without a counted token the kept-logits path
    keeps nothing and the op runs the backend's fused kernels on the empty rows (``autograd``)."""
    if path == "fused" or (path == "kept_logits" and not counted):
        return [f"{backend}.forward_partial", f"{backend}.backward"]
    if path == "kept_logits":
        return [
            "library_gemm.forward_keeping_logits",
            f"{backend}.fold",
            "library_gemm.backward_from_logits",
            f"{backend}.to_dz",
        ]
    assert path == "library_gemm"
    if not counted:
        return ["library_gemm.forward_partial", "library_gemm.backward"]
    return ["library_gemm.forward_partial", "triton.fold", "library_gemm.backward", "triton.to_dz"]


def _op_options(path, v, dtype, device) -> dict:
    """The forced path; for library GEMMs a workspace of 4 tokens' logits, so that the forward runs in
    token chunks and the backward in vocabulary chunks."""
    options = {"path": path}
    if path == "library_gemm":
        options["workspace_bytes"] = 4 * D.logits_bytes_per_token(v, dtype, device, backward=False)
    return options


# ---------------------------------------------------------------------------------------------
# linear_logprobs: one check, many inputs
# ---------------------------------------------------------------------------------------------


def _leaf64(t):
    return None if t is None else t.detach().cpu().double().requires_grad_()


def _naive_errors(backend, dtype, hidden, weight, labels, bias, transform, seed) -> dict:
    """Triton's 16-bit yardstick (a GPU; ``helpers.tolerance``): the errors of the naive computation in
    ``dtype`` (``reference.naive_logprobs``) against float64 of the same inputs, for the log-probs (max of
    ``|err| / (1 + |want|)``) and the gradients of a random projection of them (normwise); {} elsewhere."""
    if backend != "triton" or dtype not in (BF16, torch.float16):
        return {}
    leaves = [t.detach().requires_grad_() for t in (hidden, weight, bias)]
    leaves64 = [_leaf64(t) for t in (hidden, weight, bias)]
    nv = naive_logprobs(leaves[0], leaves[1], labels, leaves[2], **transform)
    ref = reference_logprobs(leaves64[0], leaves64[1], labels.cpu(), leaves64[2], **transform)
    g = torch.randn(labels.shape, generator=torch.Generator().manual_seed(seed + 11), dtype=F64)
    got = torch.autograd.grad((nv * g.to(nv.device)).sum(), leaves)
    want = torch.autograd.grad((ref * g).sum(), leaves64)
    return {
        "logprobs": ((nv.cpu() - ref) / (1 + ref.abs())).abs().max().item() if ref.numel() else 0.0,
        "grad": max(rel_err(a.cpu(), b) for a, b in zip(got, want, strict=True)),
    }


def check_op(
    backend,
    path,
    dtype,
    monkeypatch,
    *,
    n=N,
    v=V,
    transform=None,
    strided=False,
    lead=(),
    ignore_frac=0.3,
    stats=True,
    seed=0,
):
    """Force ``path``, run ``linear_logprobs`` (+ backward) on ``backend``, check the path's calls, the
    values, statistics and gradients against float64 materialized logits."""
    transform = transform or {}
    dev = device_for(backend)
    _small_tiles(backend, monkeypatch)
    hidden, weight, labels, bias = make_logprob_inputs(
        n, H, v, dtype, dev, seed=seed, ignore_frac=ignore_frac, bias=True, strided=strided, lead=lead
    )
    assert hidden.is_contiguous() != strided
    counted = labels != -100
    if bool(counted.any()):  # a few labels the argmax: is_top1 must say True there
        with torch.no_grad():
            top = logits64(hidden.reshape(-1, H).cpu(), weight.cpu(), bias.cpu(), **transform).argmax(-1)
        first = counted.reshape(-1).nonzero()[:3, 0]
        labels.view(-1)[first] = top[first.cpu()].to(dev)
    g = torch.randn(labels.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=F64)
    leaves = (hidden, weight, bias)

    calls = _spy_paths(backend, path, monkeypatch)
    with ek.kernel_options(**_op_options(path, v, dtype, dev)):
        got_plan = D.plan_linear_logprobs(hidden, weight, bias, backend=backend)
        assert got_plan.path.value == path, got_plan.reason
        out = ek.linear_logprobs(hidden, weight, labels, bias, backend=backend, return_stats=stats, **transform)
        logp, got_stats = out if stats else (out, None)
        grads = torch.autograd.grad((logp.double() * g.to(dev)).sum(), leaves)
    assert _in_order(calls) == _expected_op_calls(backend, path, bool(counted.any())), calls
    if path == "library_gemm" and bool(counted.any()):  # the workspace held 4 tokens: several chunks
        assert calls.count("triton.fold") > 1 and calls.count("triton.to_dz") > 1, calls

    assert logp.shape == labels.shape and logp.dtype == (F64 if dtype == F64 else F32)
    assert torch.all(logp[~counted] == 0), "logp must be exactly 0 at ignored tokens"
    h64, w64, b64 = (_leaf64(t) for t in leaves)
    labels64 = labels.cpu()
    want = reference_logprobs(h64, w64, labels64, b64, **transform)
    naive = _naive_errors(backend, dtype, hidden, weight, labels, bias, transform, seed)
    assert_close_to_reference(logp, want, dtype, backend, "logprobs", name="logp", naive_error=naive.get("logprobs"))
    if got_stats is not None:
        ref = reference_stats(h64.detach(), w64.detach(), labels64, b64.detach(), **transform)
        for name in STAT_NAMES:
            value = getattr(got_stats, name)
            assert value.shape == labels.shape and not value.requires_grad
            assert_close_to_reference(
                value, ref[name], dtype, backend, "stats", name=name, naive_error=naive.get("logprobs")
            )
        if bool(counted.any()):
            assert bool(got_stats.is_top1.any())
    want_grads = torch.autograd.grad((want * g).sum(), (h64, w64, b64))
    for name, t, got, ref_grad in zip(("hidden", "weight", "bias"), leaves, grads, want_grads, strict=True):
        assert got.dtype == t.dtype and got.shape == t.shape, f"d_{name}: {got.dtype} {tuple(got.shape)}"
        assert_close_to_reference(
            got, ref_grad, dtype, backend, "grad", name=f"d_{name}", naive_error=naive.get("grad")
        )


# the pair is the innermost parametrization: ids read [<backend>-<path>-...]
@pytest.mark.parametrize("backend,path,dtype", OP_DTYPE_CASES, ids=_ids(OP_DTYPE_CASES))
def test_op_matches_float64(backend, path, dtype, monkeypatch):
    """Bias, ignored tokens, statistics, every gradient: float32, float64 (not Triton), bf16 (where the plan
    takes it on the device; Triton's is skipped in the interpreter)."""
    check_op(backend, path, dtype, monkeypatch)


@pytest.mark.parametrize("transform", ["temperature", "logit_scale", "softcap", "all"])
@pytest.mark.parametrize("backend,path", OP_CASES, ids=_ids(OP_CASES))
def test_op_transforms(backend, path, transform, monkeypatch):
    check_op(backend, path, F32, monkeypatch, transform=TRANSFORMS[transform], seed=1)


@pytest.mark.parametrize("backend,path", OP_CASES, ids=_ids(OP_CASES))
def test_op_strided_hidden(backend, path, monkeypatch):
    """hidden [2, 7, H], a non-contiguous view (every second column); no statistics (the kernels' other
    variant)."""
    check_op(backend, path, F32, monkeypatch, n=7, lead=(2,), strided=True, stats=False, transform=TRANSFORMS["all"])


@pytest.mark.parametrize("batch", ["no_tokens", "all_ignored"])
@pytest.mark.parametrize("backend,path", OP_CASES, ids=_ids(OP_CASES))
def test_op_empty_batch(backend, path, batch, monkeypatch):
    """No token (N = 0), or no counted one: zeros, and zero gradients of the right shapes."""
    if batch == "no_tokens":
        check_op(backend, path, F32, monkeypatch, n=0)
    else:
        check_op(backend, path, F32, monkeypatch, n=5, ignore_frac=1.0)


# ---------------------------------------------------------------------------------------------
# the paired module's step (FusedLinearDPOLoss): pair_engine, long_pair_chunks
# ---------------------------------------------------------------------------------------------

ROWS, STEPS, BETA = 6, 7, 0.5  # 3 pairs


def check_module(
    backend,
    path,
    dtype,
    monkeypatch,
    *,
    transform_name="all",
    shared_head=True,
    strided=False,
    no_counted=False,
    seed=0,
):
    """Force ``path`` for a DPO step with a reference model (through the policy's head, ``shared_head``, or
    its own), check that the engine ran it in several chunks with the backend's epilogues and nothing of the
    op, and compare the loss, the sequence log-probs, the metrics and every gradient with float64."""
    from expo_kernels.modules import paired

    transform = TRANSFORMS[transform_name]
    dev = device_for(backend)
    hidden, weight, labels, bias = make_logprob_inputs(
        STEPS, H, V, dtype, dev, seed=seed, lead=(ROWS,), bias=True, strided=strided, ignore_frac=0.2
    )
    labels[:, :2] = -100  # the prompt
    if no_counted:
        labels.fill_(-100)
    gen = torch.Generator().manual_seed(seed + 7)
    ref_hidden = (hidden.detach().cpu().double() + 0.3 * torch.randn(ROWS, STEPS, H, generator=gen, dtype=F64)).to(
        dev, dtype
    )
    ref_weight = ref_bias = None
    if not shared_head:
        ref_weight = (weight.detach().cpu().double() + 0.2 * torch.randn(V, H, generator=gen, dtype=F64)).to(dev, dtype)
        ref_bias = (torch.randn(V, generator=gen, dtype=F64) * 0.5).to(dev, dtype)

    # the workspace: the longest pair (pair_engine: a chunk per pair) or a third of it (token chunks)
    counts = (labels != -100).sum(1)
    longest = max(1, int((counts[: ROWS // 2] + counts[ROWS // 2 :]).max()))
    per_token = D.logits_bytes_per_token(V, dtype, dev, backward=True, stacked=shared_head)
    tokens = longest if path == "pair_engine" else max(1, longest // 3)
    options = dict(path=path, workspace_bytes=tokens * per_token)

    steps_run: list = []
    real_step = paired.run_pair_step

    def run_pair_step(*args, **kwargs):
        plan = kwargs["plan"]
        steps_run.append(("long_pair_chunks", None) if plan.chunks is None else ("pair_engine", len(plan.chunks)))
        return real_step(*args, **kwargs)

    monkeypatch.setattr(paired, "run_pair_step", run_pair_step)
    calls = _spy_paths(backend, path, monkeypatch)
    loss_fn = ek.FusedLinearDPOLoss(beta=BETA, backend=backend, **{k: v for k, v in transform.items()})
    with ek.kernel_options(**options):
        got_plan = loss_fn.plan_for(weight, hidden, bias, labels)
        assert got_plan.path.value == path, got_plan.reason
        out = loss_fn(
            weight, hidden, labels, bias=bias, ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias
        )
        grads = torch.autograd.grad(out.loss, (hidden, weight, bias))

    assert [s[0] for s in steps_run] == [path], steps_run
    if path == "pair_engine" and not no_counted:
        assert steps_run[0][1] > 1, f"one chunk only: {steps_run}"
    # the backend's epilogues ran (the reference pass's and the step's); the op's kernels did not
    assert {f"{backend}.fold", f"{backend}.to_dz"} <= set(calls) or no_counted, calls
    assert not [c for c in calls if c.startswith(("library_gemm.", f"{backend}.forward", f"{backend}.backward"))], calls

    h64, w64, b64 = (_leaf64(t) for t in (hidden, weight, bias))
    labels64 = labels.cpu()
    # a shared head: the reference goes through the policy's weight and bias (the module's rule)
    refs = dict(ref_hidden=ref_hidden.cpu().double(), ref_bias=b64.detach())
    if not shared_head:
        refs.update(ref_weight=ref_weight.cpu().double(), ref_bias=ref_bias.cpu().double())
    want_loss, s, want_metrics = reference_module_loss(
        "sigmoid", {"beta": BETA}, h64, w64, b64, labels64, transform=transform, **refs
    )
    naive = _naive_errors(backend, dtype, hidden, weight, labels, bias, transform, seed)

    def close(got, want, quantity, name):
        error = naive.get("grad" if quantity == "grad" else "logprobs")
        assert_close_to_reference(got, want, dtype, backend, quantity, name=name, naive_error=error)

    close(out.loss, want_loss, "logprobs", "loss")
    close(out.policy_logps, torch.cat([s["c"], s["r"]]), "logprobs", "policy_logps")
    close(out.ref_logps, torch.cat([s["rc"], s["rr"]]), "logprobs", "ref_logps")
    for name, value in want_metrics.items():
        close(out.metrics[name], value, "stats", name)
    # the statistics' metrics: token means over the completions (TRL's)
    st = reference_stats(h64.detach(), w64.detach(), labels64, b64.detach(), **transform)
    mask = labels64 != -100
    mc, mr = mask.chunk(2)

    def mean(values, m):
        return torch.where(m, values.double(), 0.0).sum() / m.sum().clamp(min=1)

    for name, want in {
        "entropy": mean(st["entropy"], mask),
        "logits/chosen": mean(st["mean_logit"].chunk(2)[0], mc),
        "logits/rejected": mean(st["mean_logit"].chunk(2)[1], mr),
        "mean_token_accuracy": mean(st["is_top1"].chunk(2)[0], mc),
    }.items():
        close(out.metrics[name], want, "stats", name)
    want_grads = torch.autograd.grad(want_loss, (h64, w64, b64))
    for name, t, got, ref_grad in zip(
        ("hidden", "weight", "bias"), (hidden, weight, bias), grads, want_grads, strict=True
    ):
        assert got.dtype == t.dtype and got.shape == t.shape, f"d_{name}: {got.dtype} {tuple(got.shape)}"
        if no_counted:
            assert torch.count_nonzero(got) == 0, f"d_{name} is not zero without a counted token"
        else:
            close(got, ref_grad, "grad", f"d_{name}")


@pytest.mark.parametrize("backend,path,dtype", MODULE_DTYPE_CASES, ids=_ids(MODULE_DTYPE_CASES))
def test_module_matches_float64(backend, path, dtype, monkeypatch):
    """A reference through the policy's head (its rows share the chunk's GEMM), bias, the transforms."""
    check_module(backend, path, dtype, monkeypatch)


@pytest.mark.parametrize("transform", ["plain", "temperature", "logit_scale", "softcap"])
@pytest.mark.parametrize("backend,path", MODULE_CASES, ids=_ids(MODULE_CASES))
def test_module_transforms(backend, path, transform, monkeypatch):
    """A reference model with its own head (its pass through the engine's GEMMs, unstacked)."""
    check_module(backend, path, F32, monkeypatch, transform_name=transform, shared_head=False, seed=2)


@pytest.mark.parametrize("backend,path", MODULE_CASES, ids=_ids(MODULE_CASES))
def test_module_strided_hidden(backend, path, monkeypatch):
    check_module(backend, path, F32, monkeypatch, strided=True, seed=3)


@pytest.mark.parametrize("backend,path", MODULE_CASES, ids=_ids(MODULE_CASES))
def test_module_no_counted_token(backend, path, monkeypatch):
    """Pairs without a counted token: every log-prob 0, the DPO loss log 2, zero gradients."""
    check_module(backend, path, F32, monkeypatch, no_counted=True)


@pytest.mark.parametrize("path", [p.value for p in D.PAIR_PATHS])
def test_module_zero_pairs_is_named(path):
    """An empty batch (no pair) is refused with the module's own error, forced path or not."""
    w = torch.randn(V, H, requires_grad=True)
    hidden = torch.randn(0, STEPS, H, requires_grad=True)
    labels = torch.zeros(0, STEPS, dtype=torch.long)
    with ek.kernel_options(path=path), pytest.raises(ValueError, match="at least one pair"):
        ek.FusedLinearDPOLoss(backend="torch")(w, hidden, labels, ref_hidden=hidden.detach())


def test_module_zero_pairs_default_path():
    """Without a forced path, an empty batch gets the module's error (the behaviour the test above expects
    of a forced pair path too)."""
    w = torch.randn(V, H, requires_grad=True)
    hidden = torch.randn(0, STEPS, H, requires_grad=True)
    labels = torch.zeros(0, STEPS, dtype=torch.long)
    with pytest.raises(ValueError, match="at least one pair"):
        ek.FusedLinearDPOLoss(backend="torch")(w, hidden, labels, ref_hidden=hidden.detach())
