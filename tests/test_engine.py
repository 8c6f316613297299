"""The chunked engine (``expo_kernels.engine``) against the op's recompute path and float64 references.

``test_fused_module.py`` already runs every registered loss through ``FusedLinearPreferenceLoss`` (the
engine takes the pair-separable ones) against materialized float64 logits at 1e-9; here: the chunk
boundaries (one pair per chunk, a pair longer than the workspace, pairs with no counted token), both
epilogues (C++ and torch) against each other and against float64, frozen and shared heads, which calls
take the engine, and the memory bound. Tensors live on ``helpers.device_for(backend)``; the CUDA-only
tests compare against float64 references made on the CPU (``device="cpu"``, on purpose).
"""

import contextlib
import copy

import pytest
import torch
from conftest import require_backend
from helpers import LargestTensor, backend_dtype_cases, device_for, rel_err
from reference import reference_module_loss
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import expo_kernels as ek
from expo_kernels import engine
from expo_kernels.ops import LogitTransform
from expo_kernels.ops.state import finalize_logprobs

DT = torch.float64
B, T, H, V = 3, 7, 12, 53


def batch(seed=0, dtype=DT, empty_pair=False, *, device):
    g = torch.Generator().manual_seed(seed)  # on the CPU: the same numbers on every device
    hidden = torch.randn(2 * B, T, H, generator=g, dtype=dtype).to(device)
    ref_hidden = hidden + 0.3 * torch.randn(2 * B, T, H, generator=g, dtype=dtype).to(device)
    weight = torch.randn(V, H, generator=g, dtype=dtype).to(device) * 0.5
    bias = torch.randn(V, generator=g, dtype=dtype).to(device) * 0.1
    labels = torch.randint(0, V, (2 * B, T), generator=g).to(device)
    labels[:, :2] = -100  # prompt
    labels[1, 5:] = -100  # padding
    if empty_pair:
        labels[2] = -100  # pair 2's chosen row counts no token
    return hidden, ref_hidden, weight, bias, labels


def run(loss_fn, hidden, ref_hidden, weight, bias, labels, *, engine_on=True, workspace=None, backend_="keep", **kw):
    """One step's outputs and gradients. ``backend_=None``: the same loss through the default backend
    (the float64 references of Triton runs)."""
    if backend_ is None:
        loss_fn = copy.copy(loss_fn)
        loss_fn.backend = None
    h, w, b = (t.detach().clone().requires_grad_() for t in (hidden, weight, bias))
    with ek.kernel_options(engine=engine_on, workspace_bytes=workspace):
        out = loss_fn(w, h, labels, bias=b, ref_hidden=ref_hidden, **kw)
        out.loss.backward()
    return out, (h.grad, w.grad, b.grad)


def assert_same(a, b, tol):
    """Loss, metrics and policy log-probs within ``tol`` (elementwise, after casting ``b`` to ``a``'s
    dtype); gradients within ``tol`` normwise."""
    (out_a, grads_a), (out_b, grads_b) = a, b

    def close(x, y, msg=None):
        torch.testing.assert_close(x, y.to(x.dtype), rtol=tol, atol=tol, msg=msg)

    close(out_a.loss, out_b.loss)
    assert out_a.metrics.keys() == out_b.metrics.keys()
    for k in out_a.metrics:
        close(out_a.metrics[k], out_b.metrics[k], msg=k)
    close(out_a.policy_logps, out_b.policy_logps)
    for x, y in zip(grads_a, grads_b, strict=True):
        assert rel_err(x, y) <= tol, (rel_err(x, y), tol)


def assert_matches_reference(got, name, hp, data, tol, *, ref=True, **options):
    """A step's loss, logged metrics and gradients against the hand-written float64 reference
    (tests/reference.py: materialized logits and the paper's formula; never the library's losses). The
    reference model runs through the policy's head (``run`` passes no ``ref_weight``)."""
    out, grads = got
    hidden, ref_hidden, weight, bias, labels = (t.double() if t.is_floating_point() else t for t in data)
    h, w, b = (t.detach().clone().requires_grad_() for t in (hidden, weight, bias))
    ref_kw = dict(ref_hidden=ref_hidden, ref_weight=w.detach(), ref_bias=b.detach()) if ref else {}
    loss, _, metrics = reference_module_loss(name, hp, h, w, b, labels, **ref_kw, **options)
    loss.backward()
    torch.testing.assert_close(out.loss.double(), loss, rtol=tol, atol=tol)
    for k, v in metrics.items():
        torch.testing.assert_close(out.metrics[k].double(), v, rtol=tol, atol=tol, msg=k)
    for x, y in zip(grads, (h.grad, w.grad, b.grad), strict=True):
        assert rel_err(x, y) <= tol, (rel_err(x, y), tol)


@pytest.fixture
def spy(monkeypatch):
    """Records whether each call ran the engine to the end (True) or fell back (None result)."""
    from expo_kernels.modules import paired

    calls = []

    def wrapped(*args, **kwargs):
        step = engine.run_pair_step(*args, **kwargs)
        calls.append(step is not None)
        return step

    monkeypatch.setattr(paired, "run_pair_step", wrapped)
    return calls


@pytest.mark.parametrize("backend", ["native", "torch", "triton"])
@pytest.mark.parametrize(
    "workspace,chunks",
    [(None, "one chunk"), (8 * V * 10, "a pair per chunk"), (8 * V * 12, "uneven"), (8 * V * 4, "too small")],
)
def test_chunk_boundaries_match_the_recompute_path(backend, workspace, chunks, spy):
    # float32 for Triton (no float64 kernels); float64 elsewhere
    dtype, tol = (torch.float32, 2e-5) if backend == "triton" else (DT, 1e-10)
    data = batch(seed=1, dtype=dtype, empty_pair=True, device=device_for(backend))
    loss_fn = ek.FusedLinearDPOLoss(beta=0.3, label_smoothing=0.1, backend=backend)
    if workspace is not None:
        workspace = workspace // 8 * dtype.itemsize
    got = run(loss_fn, *data, workspace=workspace)
    # a pair holds at most 2 x 5 = 10 counted tokens: 4 tokens of workspace cannot take one, and the
    # step then runs two passes over chunks of 4 tokens (the logits recomputed in the second)
    assert spy == [True]
    want = run(loss_fn, *[t.double() if t.is_floating_point() else t for t in data], engine_on=False, backend_=None)
    assert_same(got, want, tol)
    assert_matches_reference(got, "sigmoid", dict(beta=0.3, label_smoothing=0.1), data, tol)


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize(
    "loss,hp",
    [
        ("sigmoid", dict(beta=0.2)),
        ("ipo", dict(beta=0.5)),
        ("orpo", dict(beta=0.2)),
        ("rpo", dict(beta=0.2, rpo_alpha=0.7)),
        ("expo", dict(lam=0.3, kl_estimator="pair")),
    ],
)
@pytest.mark.parametrize("tf", [{}, dict(temperature=0.7, logit_scale=1.3, softcap=2.5)], ids=["plain", "softcap"])
def test_losses_options_and_transforms(backend, loss, hp, tf, spy):
    data = batch(seed=2, device=device_for(backend))
    kw = {} if loss not in ("orpo",) else {}
    loss_fn = ek.FusedLinearPreferenceLoss(
        loss, backend=backend, ld_alpha=0.6 if loss == "sigmoid" else None, use_weighting=loss == "ipo", **tf, **hp
    )
    ref_kw = {} if loss == "orpo" else {"ref_hidden": data[1]}
    h, ref_hidden, w, b, labels = data
    outs = []
    for engine_on in (True, False):
        hh, ww, bb = (t.detach().clone().requires_grad_() for t in (h, w, b))
        with ek.kernel_options(engine=engine_on, workspace_bytes=8 * V * 10):
            out = loss_fn(ww, hh, labels, bias=bb, **ref_kw, **kw)
            out.loss.backward()
        outs.append((out, (hh.grad, ww.grad, bb.grad)))
    assert spy == [True]
    assert_same(*outs, 1e-10)
    assert_matches_reference(
        outs[0],
        loss,
        hp,
        data,
        1e-10,
        ref=loss != "orpo",
        ld_alpha=0.6 if loss == "sigmoid" else None,
        use_weighting=loss == "ipo",
        transform=tf,
    )


def test_frozen_and_shared_head(spy):
    hidden, ref_hidden, weight, _, labels = batch(seed=3, device=device_for("torch"))
    loss_fn = ek.FusedLinearDPOLoss(beta=0.1, backend="torch")
    grads = []
    for engine_on in (True, False):
        h = hidden.clone().requires_grad_()
        with ek.kernel_options(engine=engine_on):
            out = loss_fn(weight, h, labels, ref_hidden=ref_hidden)  # frozen head, the reference shares it
            out.loss.backward()
        grads.append((out.loss, h.grad))
    assert spy == [True]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-10)


def test_calls_the_engine_does_not_serve_take_the_op(spy):
    dev = device_for("torch")  # the default backends of this device
    hidden, ref_hidden, weight, bias, labels = batch(seed=4, device=dev)
    w = weight.clone().requires_grad_()
    for loss_fn in (
        ek.FusedLinearPreferenceLoss("aot", beta=0.1),
        ek.FusedLinearEXPOLoss(lam=0.1, kl_estimator="token"),
    ):
        loss_fn(w, hidden, labels, ref_hidden=ref_hidden).loss.backward()
    with torch.no_grad():  # no gradient: a forward pass is all there is
        ek.FusedLinearDPOLoss()(w, hidden, labels, ref_hidden=ref_hidden)
    ek.FusedLinearDPOLoss()(w.detach().float(), hidden.float().requires_grad_(), labels, ref_hidden=ref_hidden.float())
    ek.FusedLinearDPOLoss()(
        w.bfloat16(), hidden.bfloat16().requires_grad_(), labels, ref_hidden=ref_hidden.bfloat16()
    )  # 16-bit head: the op's path on the CPU (no float32-output 16-bit GEMM there), the engine on CUDA
    assert spy == [True] + [True] * (dev.type == "cuda")  # the float32 DPO call (and the bf16 one on CUDA)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_native_epilogues_match_the_torch_specification(softcap):
    require_backend("native", "cpu")
    dev = device_for("native")
    g = torch.Generator().manual_seed(5)
    z = torch.randn(9, 300, generator=g).to(dev) * 4
    bias = torch.randn(300, generator=g).to(dev)
    bias[[3, 77]] = -float("inf")  # masked ids
    labels = torch.randint(0, 300, (9,), generator=g).to(dev)
    labels[labels == 3] = 4
    labels[labels == 77] = 78
    t = LogitTransform(1.7, softcap, 0.8)
    za, zb = z.clone(), z.clone()
    sa = finalize_logprobs(engine.native_fold(za, bias, labels, t, True), 300)
    sb = finalize_logprobs(engine.torch_fold(zb, bias, labels, t, True), 300)
    torch.testing.assert_close(za, zb, rtol=1e-6, atol=1e-5)
    for f in sa._fields:
        torch.testing.assert_close(getattr(sa, f), getattr(sb, f), rtol=1e-5, atol=1e-5, msg=f)
    grad = torch.randn(9, generator=g).to(dev)
    engine.native_to_dz(za, labels, sa.lse, grad, t)
    engine.torch_to_dz(zb, labels, sa.lse, grad, t)
    # normwise: under a softcap dz/draw = 1 - tanh^2 comes from the transformed logit, which loses
    # relative precision on saturated entries (|tanh| ~ 1), where dz itself is tiny
    assert rel_err(za, zb) < 1e-6
    # and against float64 softmax gradients
    z64 = z.double() + bias.double()
    z64 = t.apply(z64).requires_grad_()
    logp = torch.log_softmax(z64, -1).gather(1, labels[:, None])[:, 0]
    (dz,) = torch.autograd.grad((logp * grad.double()).sum(), z64)
    deriv = 1.7 / 0.8 if softcap is None else 1.7 / 0.8 * (1 - (z64.detach() * 0.8 / softcap) ** 2)
    assert rel_err(za, dz * deriv) < 1e-6


def test_memory_is_bounded_by_the_workspace(monkeypatch):
    # N x V (2 x 40 x 640 = 51200 fp64 = 400 KiB) dwarfs the workspace (64 tokens x 640 x 8 = 320 KiB):
    # nothing larger than max(workspace, the [V, H] gradient) may be allocated.
    rows, steps, h, v = 8, 10, 8, 640
    dev = device_for("torch")
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(rows, steps, h, generator=g, dtype=DT).to(dev).requires_grad_()
    weight = torch.randn(v, h, generator=g, dtype=DT).to(dev).requires_grad_()
    labels = torch.randint(0, v, (rows, steps), generator=g).to(dev)
    budget = 64 * v * 8
    loss_fn = ek.FusedLinearSimPOLoss(backend="torch", compute_metrics=False)
    monkeypatch.setattr("expo_kernels.ops.torch_backend.VOCAB_CHUNK", 64)
    with ek.kernel_options(workspace_bytes=budget), LargestTensor() as rec:
        loss_fn(weight, hidden, labels).loss.backward()
    assert rec.largest <= max(budget, v * h * 8), f"{rec.op} made a {rec.largest}-byte tensor"
    assert rec.largest < rows * steps * v * 8


def test_workspace_option_is_validated():
    with pytest.raises(ValueError, match="workspace_bytes"):
        with ek.kernel_options(workspace_bytes=0):
            pass
    with pytest.raises(TypeError, match="engine must be a bool"):
        with ek.kernel_options(engine="yes"):
            pass
    with pytest.raises(TypeError, match="unknown kernel option"):
        with ek.kernel_options(workspace=1):
            pass


def test_chunks_grow_to_the_target_within_the_budget():
    counts = torch.tensor([300, 300, 100, 600, 50, 0, 700], device=device_for("torch"))
    assert engine.pair_chunks(counts, budget_tokens=1000, target_tokens=512) == [(0, 2), (2, 4), (4, 7)]
    assert engine.pair_chunks(counts, budget_tokens=700, target_tokens=512) == [(0, 2), (2, 4), (4, 6), (6, 7)]
    assert engine.pair_chunks(counts, budget_tokens=699, target_tokens=512) is None  # pair 6 does not fit
    assert engine.pair_chunks(torch.tensor([], dtype=torch.long, device=counts.device), budget_tokens=10) == []


def test_a_second_backward_is_refused():
    hidden, ref_hidden, weight, _, labels = batch(seed=7, device=device_for("torch"))
    w = weight.clone().requires_grad_()
    out = ek.FusedLinearDPOLoss(backend="torch")(w, hidden, labels, ref_hidden=ref_hidden)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="handed out once"):
        out.loss.backward()


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_all_ignored_and_empty_batches(backend):
    hidden, ref_hidden, weight, bias, labels = batch(seed=8, device=device_for(backend))
    loss_fn = ek.FusedLinearDPOLoss(beta=0.1, backend=backend)
    ignored = torch.full_like(labels, -100)
    got = run(loss_fn, hidden, ref_hidden, weight, bias, ignored)
    want = run(loss_fn, hidden, ref_hidden, weight, bias, ignored, engine_on=False)
    assert_same(got, want, 1e-12)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in got[1])
    for engine_on in (True, False):  # no pair at all: the same clear error on both paths
        with pytest.raises(ValueError, match="at least one pair"):
            run(loss_fn, hidden[:0], ref_hidden[:0], weight, bias, labels[:0], engine_on=engine_on)


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("with_bias", [False, True])
def test_triton_epilogues_match_the_torch_specification(softcap, with_bias):
    """The Triton fold and dz (CUDA, or the interpreter here) against the torch specification in float64."""
    from conftest import triton_available

    if not triton_available():
        pytest.skip("Triton cannot run here")
    from expo_kernels.ops.triton import epilogues as triton_epilogues

    dev = device_for("triton")
    g = torch.Generator().manual_seed(9)
    n, v = 7, 333  # several interpreter blocks of 64 and a ragged last one
    z = (torch.randn(n, v, generator=g) * 4).to(dev)
    bias = torch.randn(v, generator=g).to(dev) if with_bias else None
    labels = torch.randint(0, v, (n,), generator=g).to(dev)
    if with_bias:
        bias[[3, 77]] = -float("inf")  # masked ids (never a label)
        labels[(labels == 3) | (labels == 77)] = 5
    t = LogitTransform(1.7, softcap, 0.8)
    got = finalize_logprobs(triton_epilogues.fold(z, bias, labels, t, True), v)
    z64 = z.double()
    want = finalize_logprobs(engine.torch_fold(z64, None if bias is None else bias.double(), labels, t, True), v)
    for f in want._fields:
        a, b = getattr(got, f), getattr(want, f)
        if b is None:  # a field this call does not ask for
            assert a is None, f
        elif f == "is_top1":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5, msg=f)
    grad = torch.randn(n, generator=g).to(dev)
    for out_dtype in (torch.float32, torch.bfloat16) if dev.type == "cuda" else (torch.float32,):
        zz = z.clone()
        out = zz if out_dtype == torch.float32 else torch.empty(n, v, dtype=out_dtype, device=dev)
        triton_epilogues.to_dz(zz, bias, labels, got.lse, grad, t, out)
        want_dz = z64.clone()
        engine.torch_to_dz(want_dz, labels, want.lse, grad.double(), t)
        assert rel_err(out, want_dz) < (1e-5 if out_dtype == torch.float32 else 1e-2)
    # an empty chunk is a no-op
    empty = triton_epilogues.fold(z[:0], bias, labels[:0], t, False)
    assert all(f is None or f.numel() == 0 for f in empty)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@CUDA
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3), (torch.float32, 2e-4)])
@pytest.mark.parametrize("case", ["pairs", "long pair", "frozen", "metrics"])
def test_cuda_engine_against_float64(dtype, tol, case, spy):
    """The CUDA engine (cuBLAS + Triton epilogues) for every GPU dtype against the float64 op path on the
    CPU, and bit-identical on a second run (no atomics)."""
    data = batch(seed=10, device="cpu")  # the float64 reference runs on the CPU
    hidden, ref_hidden, weight, bias, labels = data
    loss_fn = ek.FusedLinearDPOLoss(beta=0.3, compute_metrics=case == "metrics")
    workspace = None if case != "long pair" else 4 * V * 6  # 4 tokens: the token-chunk path
    dev = [t.to("cuda", dtype) if t.is_floating_point() else t.cuda() for t in data]
    if case == "frozen":
        outs = []
        for _ in range(2):
            h = dev[0].clone().requires_grad_()
            with ek.kernel_options(workspace_bytes=workspace):
                out = loss_fn(dev[2], h, dev[4], ref_hidden=dev[1])
                out.loss.backward()
            outs.append((out, (h.grad,)))
        h64 = hidden.clone().requires_grad_()
        with ek.kernel_options(engine=False):
            ref = loss_fn(weight, h64, labels, ref_hidden=ref_hidden)
            ref.loss.backward()
        want = (ref, (h64.grad,))
    else:
        outs = [run(loss_fn, *dev, workspace=workspace) for _ in range(2)]
        want = run(loss_fn, *data, engine_on=False)
    assert spy == [True, True]
    assert_same(outs[0], want, tol)
    for a, b in zip(outs[0][1], outs[1][1], strict=True):
        assert torch.equal(a, b), "the engine's gradients differ between two runs"


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("vocab_start", [0, 40])
def test_gemm_op_matches_the_torch_backend(with_bias, vocab_start):
    """The op's forward and backward on library GEMMs + Triton epilogues (the CUDA default) against the
    torch backend, with a workspace small enough to cut both the tokens and the vocabulary."""
    from conftest import triton_available

    if not triton_available():
        pytest.skip("Triton cannot run here")
    from expo_kernels.ops import library_gemm, torch_backend

    dev = device_for("triton")
    g = torch.Generator().manual_seed(11)
    n, h, v = 23, 16, 97
    hidden = torch.randn(n, h, generator=g).to(dev)
    weight = (torch.randn(2 * v, h, generator=g) * 0.5).to(dev)[::2]  # strided rows
    bias = torch.randn(v, generator=g).to(dev) if with_bias else None
    labels = torch.randint(vocab_start, vocab_start + v + 30, (n,), generator=g).to(dev)  # some outside
    t = LogitTransform(1.2, 4.0, 0.9)
    with ek.kernel_options(workspace_bytes=5 * v * 4):  # 5 tokens / ~9 columns per chunk
        got = library_gemm.forward_partial(hidden, weight, bias, labels, t, True, vocab_start)
        want = torch_backend.forward_partial(
            hidden.double(), weight.double(), None if bias is None else bias.double(), labels, t, True, vocab_start
        )
        for f in want._fields:
            if getattr(want, f) is None:  # a field this call does not ask for
                assert getattr(got, f) is None, f
                continue
            torch.testing.assert_close(getattr(got, f).double(), getattr(want, f), rtol=1e-5, atol=1e-5, msg=f)
        lse = finalize_logprobs(want, v).lse
        grad = torch.randn(n, generator=g, dtype=torch.float64).to(dev)
        need = (True, True, with_bias)
        got_g = library_gemm.backward(grad.float(), hidden, weight, bias, labels, lse.float(), t, *need, vocab_start)
        want_g = torch_backend.backward(
            grad,
            hidden.double(),
            weight.double(),
            None if bias is None else bias.double(),
            labels,
            lse,
            t,
            *need,
            vocab_start,
        )
    for a, b in zip(got_g, want_g, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert rel_err(a, b) < 1e-5


@CUDA
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3), (torch.float32, 2e-4)])
def test_cuda_op_on_library_gemms_against_float64(dtype, tol, monkeypatch):
    """``linear_logprobs`` on CUDA (library GEMMs + Triton epilogues by default) against the float64
    torch backend on the CPU: log-probs, statistics and all gradients; bit-identical on a rerun."""
    from expo_kernels.ops import library_gemm

    calls = []
    for name in ("forward_partial", "backward"):
        real = getattr(library_gemm, name)
        monkeypatch.setattr(library_gemm, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    g = torch.Generator().manual_seed(5)
    n, h, v = 300, 64, 1000
    # the float64 reference on the CPU, the op under test on CUDA (below)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64, device="cpu")
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, device="cpu") * 0.2
    bias = torch.randn(v, generator=g, dtype=torch.float64, device="cpu")
    labels = torch.randint(0, v, (n,), generator=g, device="cpu")
    labels[::7] = -100
    grad = torch.randn(n, generator=g, dtype=torch.float64, device="cpu")

    def grads(tensors, backend, workspace=None):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        with ek.kernel_options(workspace_bytes=workspace):
            logp, stats = ek.linear_logprobs(
                leaves[0],
                leaves[1],
                labels.to(leaves[0].device),
                leaves[2],
                softcap=30.0,
                return_stats=True,
                backend=backend,
            )
            (logp.double() * grad.to(logp.device)).sum().backward()
        return [logp, stats.entropy] + [t.grad for t in leaves]

    want = grads([hidden, weight, bias], "torch")
    on_gpu = [t.to("cuda", dtype) for t in (hidden, weight, bias)]
    got = grads(on_gpu, "triton", workspace=64 * v * 4)  # several token and vocabulary chunks
    again = grads(on_gpu, "triton", workspace=64 * v * 4)
    assert "forward_partial" in calls and "backward" in calls
    for a, b, c in zip(got, want, again, strict=True):
        assert rel_err(a, b) < tol
        assert torch.equal(a, c), "the op's GEMM path differs between two runs"


# a warning is an error here: writing the stacked rows' logits into a view of the wrong size would only
# warn (torch resizes an `out=` tensor) and give the same numbers
@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("ref_head", ["omitted", "weight.detach()", "a copy"])
def test_a_shared_head_runs_both_models_through_one_gemm(backend, ref_head, monkeypatch):
    """A reference through the policy's own head joins each chunk's GEMM (the head read once); a copy of
    the head, or a workspace that holds one model's rows but not both, runs the reference apart. Every
    variant matches the op's path: loss, metrics (reference rewards included), gradients."""
    from expo_kernels.ops import gemm

    hidden, ref_hidden, weight, bias, labels = batch(seed=21, device=device_for(backend))
    rows_per_gemm = []
    real = gemm.logits_into
    monkeypatch.setattr(gemm, "logits_into", lambda z, h, w: rows_per_gemm.append(h.shape[0]) or real(z, h, w))
    loss_fn = ek.FusedLinearDPOLoss(beta=0.2, backend=backend, compute_metrics=True)
    per_pair = 2 * (T - 2)  # counted tokens of a full pair
    for workspace, stacked in ((None, ref_head != "a copy"), (8 * V * per_pair, False)):  # 8 B: one fp64 logit
        rows_per_gemm.clear()
        h, w, b = (t.detach().clone().requires_grad_() for t in (hidden, weight, bias))
        kw = {} if ref_head == "omitted" else {"ref_weight": w.detach() if ref_head != "a copy" else w.detach().clone()}
        if "ref_weight" in kw:
            kw["ref_bias"] = b.detach()
        with ek.kernel_options(workspace_bytes=workspace):
            out = loss_fn(w, h, labels, bias=b, ref_hidden=ref_hidden, **kw)
            out.loss.backward()
        want = run(loss_fn, hidden, ref_hidden, weight, bias, labels, engine_on=False)
        assert_same((out, (h.grad, w.grad, b.grad)), want, 1e-10)
        torch.testing.assert_close(out.ref_logps, want[0].ref_logps, rtol=1e-10, atol=1e-10)
        counted = int((labels != -100).sum())
        if stacked:  # every chunk's GEMM carries its reference rows: 2x the counted tokens, no other GEMM
            assert sum(rows_per_gemm) == 2 * counted
        else:  # the reference pass apart, then the policy's chunks
            assert sum(rows_per_gemm) == 2 * counted and max(rows_per_gemm) <= counted


@pytest.mark.parametrize("backend,dtype", backend_dtype_cases([torch.float32, torch.float64]))
def test_the_op_keeps_its_logits_when_they_fit(backend, dtype, monkeypatch):
    """``linear_logprobs`` with its logits kept for backward (one GEMM, no recompute) against float64
    materialized logits and against the recompute path: values, statistics, gradients; a second
    backward (retain_graph) forms the logits again by one GEMM; a workspace too small keeps nothing."""
    from expo_kernels.ops import library_gemm

    kept_calls = []
    real = library_gemm.forward_keeping_logits
    monkeypatch.setattr(library_gemm, "forward_keeping_logits", lambda *a: kept_calls.append(1) or real(*a))
    dev = device_for(backend)
    g = torch.Generator().manual_seed(8)
    n, h, v = 29, 16, 70
    hidden = torch.randn(n, 2 * h, generator=g, dtype=torch.float64).to(dev)[:, ::2]  # strided
    weight = torch.randn(v, h, generator=g, dtype=torch.float64).to(dev) * 0.4
    bias = torch.randn(v, generator=g, dtype=torch.float64).to(dev)
    labels = torch.randint(0, v, (n,), generator=g).to(dev)
    labels[::4] = -100
    grad = torch.randn(n, generator=g, dtype=torch.float64).to(dev)
    tf = dict(softcap=3.0, temperature=0.7, logit_scale=1.3)

    z = (hidden @ weight.T + bias) * 1.3
    z = 3.0 * torch.tanh(z / 3.0) / 0.7
    want_logp = torch.where(labels >= 0, z.log_softmax(-1).gather(1, labels.clamp(min=0)[:, None])[:, 0], 0.0)

    def run(workspace):
        leaves = [t.detach().to(dtype, copy=True).requires_grad_() for t in (hidden, weight, bias)]
        with ek.kernel_options(workspace_bytes=workspace):
            logp, stats = ek.linear_logprobs(
                leaves[0], leaves[1], labels, leaves[2], return_stats=True, backend=backend, **tf
            )
        (logp * grad.to(dtype)).sum().backward(retain_graph=True)
        first = [t.grad.clone() for t in leaves]
        # the kept logits were consumed: this one forms them again by the same single GEMM (so that
        # repeated backwards agree to the bit; tests/test_gradcheck.py checks that)
        (logp * grad.to(dtype)).sum().backward()
        second = [t.grad - f for t, f in zip(leaves, first, strict=True)]
        return logp, stats, first, second

    tol = 1e-10 if dtype == torch.float64 else 5e-5
    kept = run(None)
    assert kept_calls == [1, 1]  # the forward's GEMM, then the second backward's
    recomputed = run(n * v * 4 - 1)  # float32 logits of every row do not fit: nothing kept
    assert kept_calls == [1, 1]
    w64 = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    zz = ((w64[0] @ w64[1].T + w64[2]) * 1.3 / 3.0).tanh() * 3.0 / 0.7
    lp = torch.where(labels >= 0, zz.log_softmax(-1).gather(1, labels.clamp(min=0)[:, None])[:, 0], 0.0)
    want_grads = torch.autograd.grad((lp * grad).sum(), w64)
    assert rel_err(kept[0], want_logp) < tol
    for out in (kept, recomputed):
        for got in (out[2], out[3]):
            for a, b in zip(got, want_grads, strict=True):
                assert rel_err(a, b) < tol
    assert torch.equal(kept[1].lse, recomputed[1].lse) or rel_err(kept[1].lse, recomputed[1].lse) < tol


def test_kept_logits_are_bounded_and_refuse_a_double_backward():
    """The kept logits are the largest tensor (within the workspace), and ``create_graph=True`` still
    reaches the op's refusal of a double backward."""
    dev = device_for("torch")
    g = torch.Generator().manual_seed(9)
    hidden = torch.randn(40, 8, generator=g).to(dev).requires_grad_()
    weight = torch.randn(50, 8, generator=g).to(dev).requires_grad_()
    labels = torch.randint(0, 50, (40,), generator=g).to(dev)
    with LargestTensor() as largest:
        ek.linear_logprobs(hidden, weight, labels, backend="torch").sum().backward()
    assert largest.largest <= 40 * 50 * 4
    logp = ek.linear_logprobs(hidden, weight, labels, backend="torch")
    (gh,) = torch.autograd.grad(logp.sum(), hidden, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        gh.sum().backward()


@pytest.mark.parametrize("path", ["a pair per chunk", "token chunks"])
def test_16bit_d_weight_accumulates_in_float32_across_chunks(path, monkeypatch):
    """A bf16 head's ``d_weight`` summed over 64 chunks against float64 gradients of the same bf16 inputs.

    The CPU has no float32-output bf16 GEMM (the engine leaves 16-bit CPU heads to the op), so the
    GEMM provider is replaced by CUDA's contract: float32 logits from 16-bit operands. Everything else
    is the CUDA pipeline: dz rounded to bf16, dH/dW GEMMs on bf16 operands. Measured: 1.6-1.8e-3
    normwise with float32 accumulation (the bf16 rounding of dz and of the result, as for d_hidden);
    8e-3 (pairs) and 1.2-1.5e-2 (token chunks) with a bf16 accumulator rounded once per chunk."""
    _cuda_gemm_contract(monkeypatch)
    pairs, steps = (64, 8) if path == "a pair per chunk" else (1, 512)
    h_size, vocab = 32, 48
    g = torch.Generator().manual_seed(12)
    hidden = (torch.randn(2 * pairs, steps, h_size, generator=g, device="cpu") + 1.0).bfloat16()
    weight = (torch.randn(vocab, h_size, generator=g, device="cpu") * 0.3).bfloat16()
    labels = torch.randint(0, vocab, (2 * pairs, steps), generator=g, device="cpu")
    workspace = 16 * vocab * 6  # 16 tokens a chunk (float32 logits + bf16 dz: 6 bytes a logit): 64 chunks
    with ek.kernel_options(workspace_bytes=workspace):
        plan = engine.plan_pairs(labels, -100, vocab, torch.bfloat16)
        step = engine.run_pair_step(
            hidden,
            weight,
            None,
            labels,
            ignore_index=-100,
            transform=LogitTransform(1.0, None, 1.0),
            with_stats=False,
            loss_of_tokens=lambda logp, log_sum_p2, ref: logp.sum(),  # separable: g = 1 on every token
            backend="torch",
            need=(True, True, False),
            plan=plan,
        )
    assert (len(plan.chunks) if plan.chunks is not None else plan.token_ids.numel() // plan.budget_tokens) == 64
    assert (plan.chunks is None) == (path == "token chunks")
    h64 = hidden.double().reshape(-1, h_size).requires_grad_()
    w64 = weight.double().requires_grad_()
    logp = torch.log_softmax(h64 @ w64.T, -1).gather(1, labels.reshape(-1, 1)).sum()
    want_h, want_w = torch.autograd.grad(logp, (h64, w64))
    assert step.d_weight is not None and step.d_hidden is not None
    assert step.d_weight.dtype == torch.bfloat16
    assert rel_err(step.d_hidden.reshape(-1, h_size), want_h) < 4e-3
    assert rel_err(step.d_weight, want_w) < 4e-3, "d_weight lost precision across the chunks"


class _SyncCounter(TorchDispatchMode):
    """Counts the ops that make CUDA wait for the host: reading a scalar (``.item()``, ``bool()``,
    ``int()``) and the ops whose output size is data-dependent; ``Tensor.tolist`` is counted by a patch
    (a CPU tensor's ``tolist`` dispatches nothing)."""

    SYNCING = ("aten._local_scalar_dense", "aten.nonzero", "aten.bincount", "aten.unique", "aten.masked_select")

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith(self.SYNCING):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def syncs(monkeypatch):
    counter = _SyncCounter()
    real = torch.Tensor.tolist

    def tolist(self):
        counter.ops.append("tolist")
        return real(self)

    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    return counter


def test_a_shared_head_that_does_not_fit_is_planned_with_one_sync(syncs):
    """The module's planning of a shared-head step whose stacked GEMM does not fit the workspace (as at
    N = 8192, V = 128256 on CUDA): the stacked plan, the unstacked one, and the reference pass's tokens
    cost one host read of the counts together (engine.py's docstring counts every sync of a step)."""
    dev = device_for("torch")
    hidden, ref_hidden, weight, bias, labels = batch(seed=22, empty_pair=True, device=dev)
    per_pair = 2 * (T - 2)
    with ek.kernel_options(workspace_bytes=8 * V * per_pair), syncs:  # one pair's fp64 logits, not two
        stacked = engine.plan_pairs(labels, -100, V, DT, stacked=True)
        plain = engine.plan_pairs(labels, -100, V, DT, counts_of=stacked)  # as the module re-plans
        ref_logp = _forward_logps(
            ref_hidden,
            weight,
            bias,
            labels,
            plan=plain,  # as the module hands its plan to the reference pass
        )
    assert stacked is not None and stacked.chunks is None  # two models' rows of a pair do not fit
    assert plain is not None and plain.chunks is not None and len(plain.chunks) == B  # a pair per chunk
    # tolist: the counts; the one scalar read: forward_logps's finiteness check of its inputs, and one a
    # chunk for its results
    chunks = -(-int(plain.token_ids.numel()) // min(engine.chunk_tokens(dev), per_pair))  # workspace-bound
    assert syncs.ops == ["tolist"] + ["aten._local_scalar_dense.default"] * (1 + chunks), syncs.ops
    # the plans' bookkeeping against a direct count
    mask = labels != -100
    assert torch.equal(plain.token_ids, mask.reshape(-1).nonzero().squeeze(1))
    assert torch.equal(plain.labels, labels[mask])
    assert plain.pair_tokens.tolist() == (mask[:B].sum(1) + mask[B:].sum(1)).tolist()
    want = torch.log_softmax(ref_hidden @ weight.T + bias, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    torch.testing.assert_close(ref_logp, torch.where(mask, want, 0.0), rtol=1e-12, atol=1e-12)


def test_a_step_syncs_once_for_its_inputs_and_once_per_chunk(syncs):
    """``run_pair_step`` with a plan and a loss that reads nothing back: no sync to slice the chunks or to
    size them; one for the inputs' finiteness, one per chunk for the results'."""
    dev = device_for("torch")
    hidden, ref_hidden, weight, bias, labels = batch(seed=23, device=dev)
    with ek.kernel_options(workspace_bytes=8 * V * 2 * (T - 2)):
        plan = engine.plan_pairs(labels, -100, V, DT)
        assert plan is not None and plan.chunks is not None and len(plan.chunks) == B
        syncs.ops.clear()  # the plan's own read of the counts
        with syncs:
            step = engine.run_pair_step(
                hidden,
                weight,
                bias,
                labels,
                ignore_index=-100,
                transform=LogitTransform(1.0, None, 1.0),
                with_stats=True,
                loss_of_tokens=lambda logp, log_sum_p2, ref: logp.sum(),
                backend="torch",
                need=(True, True, True),
                plan=plan,
            )
    assert syncs.ops == ["aten._local_scalar_dense.default"] * (1 + B), syncs.ops
    mask = labels != -100
    h64, w64, b64 = (t.detach().clone().requires_grad_() for t in (hidden, weight, bias))
    logp = torch.log_softmax(h64 @ w64.T + b64, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    logp = torch.where(mask, logp, 0.0)
    torch.testing.assert_close(step.logp, logp.detach(), rtol=1e-12, atol=1e-12)
    for got, want in zip(
        (step.d_hidden, step.d_weight, step.d_bias), torch.autograd.grad(logp.sum(), (h64, w64, b64)), strict=True
    ):
        assert rel_err(got, want) < 1e-12


# ----------------------------------------------------------------------------------------------------
# The one-pass long-pair step (engine._long_pairs_one_pass): a pair longer than the workspace, a loss
# whose per-token gradient is one number per row, and per-row d_weight / d_bias partials that fit half
# the workspace. On the CPU (logits in the head's dtype, no separate dz buffer) a float64 token takes
# 8 V bytes of workspace and a sequence's partials 8 V (H + 1) bytes (d_weight + d_bias; 4 V (H + 1)
# for a 16-bit head, whose gradients accumulate in float32); the one-pass chunk is the largest number of
# tokens whose logits fit the workspace less the partials (one buffer with one pair in the batch: its
# chosen row's partials are the gradients themselves; two with more pairs).
# ----------------------------------------------------------------------------------------------------
V1 = 53


def _dpo_with_sft(logp, mask, pairs):
    """A pair-separable loss whose per-token gradient is one number per row, and a different one for the
    chosen and the rejected row of a pair: DPO's ``softplus(-beta (S_c - S_r))`` plus an NLL term on the
    chosen rows (``S``: the row's sum of counted log-probs)."""
    s = (logp * mask).sum(-1)
    return torch.nn.functional.softplus(-0.5 * (s[:pairs] - s[pairs:])).sum() - 0.3 * s[:pairs].sum()


def _float64_logp(hidden, weight, bias, labels, transform=None):
    """Per-token log-probs ``[R, T]`` (0 at ignored tokens) from materialized float64 logits."""
    z = hidden.double() @ weight.double().T + (0.0 if bias is None else bias.double())
    if transform is not None:
        z = z * transform.logit_scale
        if transform.softcap is not None:
            z = transform.softcap * torch.tanh(z / transform.softcap)
        z = z * transform.inv_temperature
    logp = torch.log_softmax(z, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return torch.where(labels != -100, logp, torch.zeros_like(logp))


class _Allocations(TorchDispatchMode):
    """The op names, shapes and dtypes of the tensors that factory ops (zeros, empty, full, ...) return."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func).split(".")[1] if str(func).startswith("aten.") else ""
        if name in ("zeros", "zeros_like", "empty", "empty_like", "new_zeros", "new_empty", "full", "full_like"):
            if isinstance(out, torch.Tensor):
                self.made.append((name, tuple(out.shape), out.dtype))
        return out


def _cuda_gemm_contract(monkeypatch):
    """A 16-bit head's GEMM as on CUDA (float32 logits from 16-bit operands; the CPU has no such GEMM)."""
    from expo_kernels.ops import gemm

    monkeypatch.setattr(gemm, "logits_dtype", lambda dtype, device: torch.float64 if dtype == DT else torch.float32)
    monkeypatch.setattr(gemm, "logits_into", lambda z, h, w: torch.mm(h.to(z.dtype), w.to(z.dtype).T, out=z))


def _step(hidden, weight, bias, labels, loss, *, need=(True, True, True), **kw):
    """``engine.run_pair_step`` of a plain head (no transform, no statistics, torch backend unless ``kw`` says
    otherwise); ``loss(logp, log_sum_p2, ref)`` is the loss of the per-token log-probs."""
    kw = dict(ignore_index=-100, transform=LogitTransform(1.0, None, 1.0), with_stats=False, backend="torch") | kw
    return engine.run_pair_step(hidden, weight, bias, labels, loss_of_tokens=loss, need=need, **kw)


def _forward_logps(hidden, weight, bias, labels, **kw):
    """``engine.forward_logps`` (the reference pass) of a plain head on the torch backend unless ``kw`` says
    otherwise."""
    kw = dict(ignore_index=-100, transform=LogitTransform(1.0, None, 1.0), backend="torch") | kw
    return engine.forward_logps(hidden, weight, bias, labels, **kw)


def _record_gemm_rows(monkeypatch):
    """The row count of every logits GEMM from now on (a list the caller reads)."""
    rows, real = [], engine.gemm.logits_into
    monkeypatch.setattr(engine.gemm, "logits_into", lambda z, h, w: rows.append(z.shape[0]) or real(z, h, w))
    return rows


def _long_pair_step(
    monkeypatch,
    chosen,
    rejected,
    *,
    h_size,
    need,
    bias,
    workspace,
    dtype=DT,
    backend="torch",
    row_constant=True,
    token_weight=None,
    seed=30,
):
    """One ``run_pair_step`` on the CPU with rows of the given counted tokens (pair ``p``: rows ``p`` and
    ``p + B``); returns the step, the row count of every logits GEMM, the [V, H] gradient buffers it
    allocated, and the float64 reference gradients (materialized logits, autograd through the same
    formula). ``token_weight [R, T]``: a per-token factor in the loss (its gradient then varies along a row)."""
    pairs, counts = len(chosen), list(chosen) + list(rejected)
    steps = max(counts)
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * pairs, steps, h_size, generator=g, dtype=DT, device="cpu").to(dtype)
    weight = (torch.randn(V1, h_size, generator=g, dtype=DT, device="cpu") * 0.5).to(dtype)
    b = (torch.randn(V1, generator=g, dtype=DT, device="cpu") * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, V1, (2 * pairs, steps), generator=g, device="cpu")
    for r, c in enumerate(counts):
        labels[r, : steps - c] = -100  # the counted tokens at the end of the row
    mask = (labels != -100).double()
    tw = torch.ones_like(mask) if token_weight is None else token_weight(mask)

    def loss(logp, mask=mask):
        return _dpo_with_sft(logp * tw.to(logp.dtype), mask.to(logp.dtype), pairs)

    gemm_rows = _record_gemm_rows(monkeypatch)
    with ek.kernel_options(workspace_bytes=workspace), _Allocations() as alloc:
        step = _step(
            hidden,
            weight,
            b,
            labels,
            lambda logp, log_sum_p2, ref: loss(logp),
            need=need,
            backend=backend,
            row_constant=row_constant,
        )
    gradient_buffers = sum(shape == (V1, h_size) and dt.is_floating_point for _, shape, dt in alloc.made)
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    b64 = None if b is None else b.double().requires_grad_()
    logp = _float64_logp(h64, w64, b64, labels)
    wanted = [t for t, n in zip((h64, w64, b64), need, strict=True) if n and t is not None]
    want = iter(torch.autograd.grad(loss(logp), wanted))
    want = [next(want) if n and t is not None else None for t, n in zip((h64, w64, b64), need, strict=True)]
    return step, gemm_rows, gradient_buffers, want


def _vary_along_rows(mask):
    return 1.0 + mask.cumsum(-1) / 10  # ld_alpha-like: a later token counts more


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize(
    "chosen,rejected,h_size,need,bias,workspace,gemm_rows,buffers",
    [
        # one pair of 17 tokens; partials 8 x 53 x 5 = 2120 B of 5188: (5188 - 2120) // 424 = 7 tokens a
        # chunk, the last two chunks wholly or partly in the rejected row; the rejected row's partial is
        # the one [V, H] buffer next to d_weight
        ([8], [9], 4, (True, True, True), True, 5188, [7, 7, 3], 2),
        # a pair of 24 tokens between a pair of exactly one chunk (10 tokens) and a short one: two partial
        # buffers (4240 B of 8580, chunk (8580 - 4240) // 424 = 10); the long pair goes first, then the
        # other pairs in chunks of whole pairs
        ([6, 12, 2], [4, 12, 1], 4, (True, True, True), True, 8580, [10, 10, 4, 10, 3], 3),
        # a frozen weight with a trainable bias: partials of 8 x 53 = 424 B of 948, one token a chunk
        ([2], [2], 4, (True, False, True), True, 948, [1, 1, 1, 1], 0),
        # a chosen row of one token, and a pair whose rejected row counts none: 2 x 8 x 53 x 3 = 2544 B of
        # 5188, (5188 - 2544) // 424 = 6 tokens a chunk
        ([1, 14], [13, 0], 2, (True, True, True), True, 5188, [6, 6, 2, 6, 6, 2], 3),
        # a bias that is given but not trained takes no partial: 8 x 53 x 4 = 1696 B, (5188 - 1696) // 424 = 8
        ([8], [9], 4, (True, True, False), True, 5188, [8, 8, 1], 2),
    ],
    ids=["one pair", "a long pair between short ones", "frozen weight", "1-token and empty rows", "fixed bias"],
)
def test_one_pass_long_pairs_against_float64(
    backend, chosen, rejected, h_size, need, bias, workspace, gemm_rows, buffers, monkeypatch
):
    # A pair longer than the workspace with a row-constant loss runs in one pass (each token's logits
    # computed once, in chunks of the workspace less the per-row partials) and its gradients -- dz with
    # g = 1, then each row's partials scaled by that row's g -- match float64 autograd; a mix-up of the
    # rows at a chunk boundary, an unscaled or leaked partial, or a wrong chunk size would show here.
    # On the CPU: the chunk arithmetic is the CPU's (tolerance 1e-10, float64 throughout).
    require_backend(backend, "cpu")
    step, rows, made, want = _long_pair_step(
        monkeypatch, chosen, rejected, h_size=h_size, need=need, bias=bias, workspace=workspace, backend=backend
    )
    assert rows == gemm_rows  # one pass: every counted token's logits once
    assert made == buffers  # the gradient's [V, H] buffers: d_weight and the partials
    for got, w in zip((step.d_hidden, step.d_weight, step.d_bias), want, strict=True):
        assert (got is None) == (w is None)
        if w is not None:
            assert rel_err(got, w) < 1e-10


def test_one_pass_long_pair_of_a_16bit_head_against_float64(monkeypatch):
    # A bf16 head through CUDA's contract (as in test_16bit_d_weight_accumulates_in_float32_across_chunks:
    # the CPU has no float32-output bf16 GEMM): float32 logits and a bf16 dz buffer, 6 x 53 = 318 B a
    # token; float32 partials, 4 x 53 x 5 = 1060 B of 2226: (2226 - 1060) // 318 = 3 tokens a chunk. dH's
    # rows are scaled in float32 and written back in bf16; d_weight's partials accumulate dz upcast
    # through the chunk's float32 logits. Against float64 of the same bf16 inputs: 5e-3 normwise (the
    # bf16 rounding of dz and of the results, as in that test; measured 1.8e-3 to 3.2e-3).
    _cuda_gemm_contract(monkeypatch)
    step, rows, made, want = _long_pair_step(
        monkeypatch, [12], [12], h_size=4, need=(True, True, True), bias=True, workspace=2226, dtype=torch.bfloat16
    )
    assert rows == [3] * 8
    assert made == 2
    assert step.d_hidden.dtype == step.d_weight.dtype == torch.bfloat16
    for got, w in zip((step.d_hidden, step.d_weight, step.d_bias), want, strict=True):
        assert rel_err(got, w) < 5e-3


def test_long_pair_of_a_loss_that_varies_along_rows_takes_two_passes(monkeypatch):
    # row_constant=False (a gradient that varies along a row, as ld_alpha's): the logits are recomputed
    # once g is known -- two passes of min(budget 5188 // 424 = 12, 17) tokens -- and the gradients are
    # exact; d_weight is the only [V, H] buffer (no partials).
    step, rows, made, want = _long_pair_step(
        monkeypatch,
        [8],
        [9],
        h_size=4,
        need=(True, True, False),
        bias=False,
        workspace=5188,
        row_constant=False,
        token_weight=_vary_along_rows,
    )
    assert rows == [12, 5, 12, 5]
    assert made == 1
    assert rel_err(step.d_hidden, want[0]) < 1e-10
    assert rel_err(step.d_weight, want[1]) < 1e-10


def test_one_pass_long_pair_checks_that_the_loss_is_row_constant(monkeypatch):
    # row_constant=True is the caller's word, checked once the pair's g is known: a chosen row whose
    # first token's gradient differs from the rest of the row raises (instead of scaling the whole row's
    # d_weight partial by one of its numbers).
    def first_chosen_token_counts_twice(mask):
        w = torch.ones_like(mask)
        w[0, mask[0].argmax()] = 2.0
        return w

    with pytest.raises(RuntimeError, match="row_constant"):
        _long_pair_step(
            monkeypatch,
            [8],
            [9],
            h_size=4,
            need=(True, True, True),
            bias=True,
            workspace=5188,
            token_weight=first_chosen_token_counts_twice,
        )


# ---------------------------------------------------------------------------------------------
# the reference pass (forward_logps), the step's argument checks and chunk sizes, error names
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("tokens_per_chunk", [1, 3])
def test_reference_pass_against_float64(backend, tokens_per_chunk, monkeypatch):
    # forward_logps without a plan (it counts the labels itself): per-token log-probs of a biased,
    # softcapped head with prompt and padding tokens ignored and one vocabulary entry masked (-inf bias:
    # an allowed input, with a finite log-softmax) against float64 log_softmax of materialized logits
    # (1e-12; float64 throughout). Pinned down too: the chunk is workspace // (8 B x V) tokens, down to
    # one (every GEMM's rows); the pass runs on the backend it is given (the native fold is called only
    # for backend="native"); and it allocates no gradient buffer ([V, H] or [V] or [R*T, H] zeros).
    require_backend(backend, "cpu")
    from expo_kernels.ops import epilogues as epi

    hidden, _, weight, bias, labels = batch(seed=41, device="cpu")
    bias = bias.clone()
    bias[7] = -torch.inf
    transform = LogitTransform(0.8, 2.5, 1.3)
    gemm_rows, native_folds = _record_gemm_rows(monkeypatch), []
    real_native_fold = epi.native_fold
    monkeypatch.setattr(epi, "native_fold", lambda *a: native_folds.append(1) or real_native_fold(*a))
    with ek.kernel_options(workspace_bytes=tokens_per_chunk * V * 8 + 7), _Allocations() as alloc:
        logp = engine.forward_logps(
            hidden, weight, bias, labels, ignore_index=-100, transform=transform, backend=backend
        )
    counted = int((labels != -100).sum())
    assert gemm_rows == [tokens_per_chunk] * (counted // tokens_per_chunk) + [counted % tokens_per_chunk] * bool(
        counted % tokens_per_chunk
    )
    assert bool(native_folds) == (backend == "native")
    assert not [m for m in alloc.made if m[0] == "zeros" and m[1] in ((V, H), (V,), (2 * B * T, H))]
    assert logp.dtype == torch.float64 and logp.shape == labels.shape
    torch.testing.assert_close(logp, _float64_logp(hidden, weight, bias, labels, transform), rtol=1e-12, atol=1e-12)


def test_reference_pass_of_a_16bit_head_takes_no_dz(monkeypatch):
    # The reference pass has no backward: a bf16 head's token costs its float32 logits only (4 x 53 B, no
    # bf16 dz), so a workspace of 3 x 212 B holds 3 tokens a chunk (2 if a dz were counted). Log-probs
    # against float64 of the same bf16 inputs at 1e-5 (float32 logits of exact bf16 products).
    _cuda_gemm_contract(monkeypatch)
    hidden, _, weight, bias, labels = batch(seed=42, device="cpu")
    hidden, weight, bias = hidden.bfloat16(), weight.bfloat16(), bias.bfloat16()
    gemm_rows = _record_gemm_rows(monkeypatch)
    with ek.kernel_options(workspace_bytes=3 * 4 * V):
        logp = engine.forward_logps(
            hidden, weight, bias, labels, ignore_index=-100, transform=LogitTransform(1.0, None, 1.0), backend="torch"
        )
    counted = int((labels != -100).sum())
    assert gemm_rows == [3] * (counted // 3) + [counted % 3] * bool(counted % 3)
    torch.testing.assert_close(logp.double(), _float64_logp(hidden, weight, bias, labels), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("culprit", ["ref_hidden", "ref_weight", "ref_bias"])
def test_reference_pass_names_a_non_finite_input(culprit):
    # A NaN in the reference's hidden state (at a counted token) or head, or a +inf in its bias, is named
    # as the reference's: the error says which input to look at.
    hidden, _, weight, bias, labels = batch(seed=44, device="cpu")
    t = {"ref_hidden": hidden, "ref_weight": weight, "ref_bias": bias}[culprit]
    t.view(-1)[t.numel() - 1] = torch.inf if culprit == "ref_bias" else torch.nan
    with pytest.raises(ValueError, match=f"^{culprit} contains NaN"):
        engine.forward_logps(
            hidden, weight, bias, labels, ignore_index=-100, transform=LogitTransform(1.0, None, 1.0), backend="torch"
        )


@pytest.mark.parametrize("rows", ["policy", "reference"])
def test_an_overflow_is_named_in_policy_and_reference_rows(rows):
    # Finite float32 inputs whose logits overflow (hidden 1e38: h . w exceeds 3.4e38) in the policy's rows,
    # or only in the reference's rows of a shared head's stacked GEMM: the step refuses with the overflow
    # message (naming the transform), before the non-finite results reach the loss.
    hidden, ref_hidden, weight, bias, labels = (
        t.float() if t.is_floating_point() else t for t in batch(seed=45, device="cpu")
    )
    weight = weight.abs() + 0.5
    (hidden if rows == "policy" else ref_hidden)[:] = 1e38
    plan = engine.plan_pairs(labels, -100, V, torch.float32, stacked=True)
    with pytest.raises(ValueError, match="overflow the accumulation precision"):
        _step(hidden, weight, bias, labels, lambda logp, p2, ref: (logp - ref).sum(), plan=plan, ref_hidden=ref_hidden)


def test_a_masked_vocabulary_is_named_with_statistics():
    # Every vocabulary entry masked (-inf bias) leaves no log-softmax; with statistics asked for, the step
    # still names the masked vocabulary (not an overflow).
    hidden, _, weight, bias, labels = batch(seed=46, device="cpu")
    with pytest.raises(ValueError, match="every vocabulary entry is masked"):
        _step(
            hidden, weight, torch.full_like(bias, -torch.inf), labels, lambda logp, p2, ref: logp.sum(), with_stats=True
        )


def test_a_plan_of_the_other_kind_is_refused():
    # A stacked plan (reference rows in each GEMM) for a step without a reference, or an unstacked plan
    # for a step with one, would size the workspace wrongly: refused.
    hidden, ref_hidden, weight, bias, labels = batch(seed=47, device="cpu")
    loss = lambda logp, p2, ref: logp.sum()  # noqa: E731
    for stacked, ref in ((True, None), (False, ref_hidden)):
        plan = engine.plan_pairs(labels, -100, V, DT, stacked=stacked)
        with pytest.raises(ValueError, match="stacked plan"):
            _step(hidden, weight, bias, labels, loss, plan=plan, ref_hidden=ref)


def _one_long_pair(counts, seed=48):
    g = torch.Generator().manual_seed(seed)
    steps = max(counts)
    hidden = torch.randn(len(counts), steps, 2, generator=g, dtype=DT, device="cpu")
    weight = torch.randn(V, 2, generator=g, dtype=DT, device="cpu")
    labels = torch.randint(0, V, (len(counts), steps), generator=g, device="cpu")
    for r, c in enumerate(counts):
        labels[r, : steps - c] = -100
    return hidden, weight, labels


@pytest.mark.parametrize(
    "counts,workspace,chunk",
    [
        ([3, 2], V * 8, 1),  # a workspace of one float64 token: chunks of 1 token
        ([300, 0, 290, 0], 550 * V * 8, 512),  # 590 tokens, budget 550: chunks of chunk_tokens (512)
    ],
    ids=["one-token budget", "budget above chunk_tokens"],
)
def test_two_pass_token_chunks_and_the_row_constant_default(counts, workspace, chunk, monkeypatch):
    # A pair longer than the workspace, with a loss whose gradient varies along a row and no row_constant
    # given (the default: False): two passes of token chunks of min(budget, chunk_tokens, tokens) rows,
    # and the gradients of float64 autograd through materialized logits (1e-10; float64 throughout).
    hidden, weight, labels = _one_long_pair(counts)
    mask = (labels != -100).double()
    tw = _vary_along_rows(mask)
    pairs = len(counts) // 2

    def loss(logp):
        return _dpo_with_sft(logp * tw, mask, pairs)

    gemm_rows = _record_gemm_rows(monkeypatch)
    with ek.kernel_options(workspace_bytes=workspace):
        step = _step(hidden, weight, None, labels, lambda logp, p2, ref: loss(logp), need=(True, True, False))
    n = sum(counts)
    assert gemm_rows == 2 * ([chunk] * (n // chunk) + [n % chunk] * bool(n % chunk))
    h64, w64 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    want_h, want_w = torch.autograd.grad(loss(_float64_logp(h64, w64, None, labels)), (h64, w64))
    assert rel_err(step.d_hidden, want_h) < 1e-10
    assert rel_err(step.d_weight, want_w) < 1e-10


def test_a_chunk_of_pairs_without_tokens(monkeypatch):
    # Pair 0 fills a chunk (512 counted tokens: chunk_tokens on the CPU), so pair 1, which counts no
    # token, is a chunk of its own with no rows: its positions are empty, and the gradients are those of
    # float64 autograd through materialized logits (1e-10).
    hidden, weight, labels = _one_long_pair([300, 0, 212, 0])
    mask = (labels != -100).double()
    plan = engine.plan_pairs(labels, -100, V, DT)
    assert plan.chunks == [(0, 1), (1, 2)]
    step = _step(hidden, weight, None, labels, lambda logp, p2, ref: _dpo_with_sft(logp, mask, 2), plan=plan)
    h64, w64 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    want = torch.autograd.grad(_dpo_with_sft(_float64_logp(h64, w64, None, labels), mask, 2), (h64, w64))
    assert rel_err(step.d_hidden, want[0]) < 1e-10
    assert rel_err(step.d_weight, want[1]) < 1e-10


# ---------------------------------------------------------------------------------------------
# the bookkeeping's edges (labels, chunks), the devices and dtypes a step's tensors take, its memory
# ---------------------------------------------------------------------------------------------


def test_label_range_and_counted_positions(syncs):
    # Labels in [0, V) and ignore_index are accepted (0 and V - 1 included) with one host read (the counts
    # and the number of bad labels together: no second look for a culprit); V, or a negative label other
    # than ignore_index, is refused with the op's message. A batch with as many counted tokens as rows /
    # steps (4 x 2 labels, 2 counted) gets the counted positions, not every position.
    labels = torch.tensor([[0, V - 1, -100, 3], [-100, 5, 6, V - 1]], device="cpu")
    with syncs:
        plan = engine.plan_pairs(labels, -100, V, DT)
    assert syncs.ops == ["tolist"], syncs.ops
    assert torch.equal(plan.token_ids, torch.tensor([0, 1, 3, 5, 6, 7], device="cpu"))
    assert torch.equal(plan.labels, torch.tensor([0, V - 1, 3, 5, 6, V - 1], device="cpu"))
    for bad in (V, -1):
        with pytest.raises(ValueError, match=rf"labels must be in \[0, {V}\).*found {bad}"):
            engine.plan_pairs(labels.masked_fill(labels == 5, bad), -100, V, DT)
    labels = torch.full((4, 2), -100, device="cpu")
    labels[1, 0], labels[3, 1] = 4, 7
    plan = engine.plan_pairs(labels, -100, V, DT)
    assert torch.equal(plan.token_ids, torch.tensor([2, 7], device="cpu"))
    assert torch.equal(plan.labels, torch.tensor([4, 7], device="cpu"))
    assert plan.row_tokens == (0, 1, 0, 1) and plan.pair_tokens.tolist() == [0, 2]


def test_pair_chunks_edges(syncs):
    # A tensor of counts is read once (one tolist, no scalar read per pair); the first chunk starts empty
    # (2 + 1 tokens reach a target of 3 only with both pairs; 2 + 2 fit a budget of 4 exactly); a target
    # of 0 gives a pair per chunk, and no chunk is empty.
    counts = torch.tensor([300, 300, 100, 600, 50, 0, 700], device="cpu")
    with syncs:
        chunks = engine.pair_chunks(counts, budget_tokens=1000, target_tokens=512)
    assert chunks == [(0, 2), (2, 4), (4, 7)]
    assert syncs.ops == ["tolist"], syncs.ops
    assert engine.pair_chunks([2, 1, 5], budget_tokens=10, target_tokens=3) == [(0, 2), (2, 3)]
    assert engine.pair_chunks([2, 2, 1], budget_tokens=4, target_tokens=10) == [(0, 2), (2, 3)]
    assert engine.pair_chunks([3, 4], budget_tokens=10, target_tokens=0) == [(0, 1), (1, 2)]


def test_chunk_tokens_of_other_devices():
    # A device without its own entry (meta, xpu, mps, ...) takes CUDA's chunk (a number, never None).
    assert engine.chunk_tokens(torch.device("meta")) == engine.CHUNK_TOKENS["cuda"]
    assert engine.chunk_tokens(torch.device("cpu")) == engine.CHUNK_TOKENS["cpu"]


def test_chunks_follow_chunk_tokens(monkeypatch):
    # The chunk target is chunk_tokens(device), read when the step runs (here 600 instead of the CPU's 512):
    # pairs of [520, 10, 300] tokens make one chunk within the default budget (a target of 512 would cut
    # after the first). The same in a one-pass long-pair step: pair 0 (640 tokens, more than the
    # workspace's 620) in token chunks of 600, then pairs 1-3 in chunks of whole pairs of at most 600
    # tokens, [1, 3) and [3, 4) (512 would cut [1, 2), [2, 4)), each chunk's tokens those of its own pairs;
    # gradients against float64 autograd (1e-10).
    monkeypatch.setitem(engine.CHUNK_TOKENS, "cpu", 600)
    hidden, weight, labels = _one_long_pair([260, 5, 150, 260, 5, 150])
    assert engine.plan_pairs(labels, -100, V, DT).chunks == [(0, 3)]
    step, rows, made, want = _long_pair_step(
        monkeypatch,
        [320, 260, 5, 150],
        [320, 260, 5, 150],
        h_size=2,
        need=(True, True, True),
        bias=True,
        workspace=620 * 8 * V1,
    )
    assert rows == [600, 40, 530, 300]
    assert made == 3
    for got, w in zip((step.d_hidden, step.d_weight, step.d_bias), want, strict=True):
        assert rel_err(got, w) < 1e-10


# (chosen, rejected, workspace) of a step whose pairs fit, of one with a long pair in one pass (a pair of
# 24 tokens between short ones: the configuration of test_one_pass_long_pairs_against_float64, 10 tokens
# a chunk), and of one with a long pair in two passes (partials that do not fit: chunks of 12 tokens)
_PATHS = {
    "pairs": ([8, 3], [9, 2], None, [22]),
    "one pass": ([6, 12, 2], [4, 12, 1], 8580, [10, 10, 4, 10, 3]),
    "two passes": ([8, 3], [9, 2], 5188, [12, 10, 12, 10]),
    "all counted": ([5, 5], [5, 5], None, [20]),  # no ignored label: the counted positions are all of them
}


@pytest.mark.parametrize("case", list(_PATHS))
def test_a_step_places_its_tensors_on_the_inputs_device(case, monkeypatch):
    # Every tensor a step makes lives on its inputs' device, whatever torch's default device: under
    # torch.device("meta") a CPU step (pairs that fit, a long pair in one pass, or in two) gives CPU
    # gradients equal to float64 autograd (1e-10); a tensor left on the default device would be a meta
    # tensor, which no CPU op takes.
    chosen, rejected, workspace, gemm_rows = _PATHS[case]
    with torch.device("meta"):
        step, rows, _, want = _long_pair_step(
            monkeypatch, chosen, rejected, h_size=4, need=(True, True, True), bias=True, workspace=workspace
        )
    assert rows == gemm_rows
    for got, w in zip((step.d_hidden, step.d_weight, step.d_bias), want, strict=True):
        assert got.device.type == "cpu"
        assert rel_err(got, w) < 1e-10


@pytest.mark.parametrize("culprit", ["hidden", "weight", "bias", "ref_hidden"])
def test_step_names_a_non_finite_input(culprit):
    # A NaN in the policy's hidden state (at a counted token), head, bias, or the reference's hidden state (a
    # reference through the shared head) is named: the error says which input.
    hidden, ref_hidden, weight, bias, labels = batch(seed=49, device="cpu")
    t = {"hidden": hidden, "weight": weight, "bias": bias, "ref_hidden": ref_hidden}[culprit]
    t.view(-1)[t.numel() - 1] = torch.nan
    with pytest.raises(ValueError, match=f"^{culprit} contains NaN"):
        _step(hidden, weight, bias, labels, lambda logp, p2, ref: logp.sum(), ref_hidden=ref_hidden)


def _raw_logit_epilogues():
    """Triton's contract, in torch ops on the CPU: ``fold`` leaves the logits raw (no bias, no transform),
    and ``to_dz`` adds the bias and applies the transform itself."""
    from expo_kernels.ops import epilogues as epi

    def fold(z, bias, y, t, with_stats):
        return epi.torch_fold(z.clone(), bias, y, t, with_stats)

    def to_dz(z, bias, y, lse, g, t, out):
        zt = z.clone()
        epi.transform_in_place(zt, bias, t)
        epi.torch_to_dz(zt, y, lse, g, t)
        out.copy_(zt)

    return epi.Epilogues(fold, to_dz, False)


@pytest.mark.parametrize("case", list(_PATHS))
def test_epilogues_that_leave_the_logits_raw(case, monkeypatch):
    # A provider whose fold leaves the logits raw (as Triton's does) is handed the bias in to_dz: on pairs
    # that fit and on a long pair (one pass or two), a biased head's gradients match float64 autograd
    # (1e-10).
    monkeypatch.setattr(engine, "epilogues", lambda backend: _raw_logit_epilogues())
    chosen, rejected, workspace, gemm_rows = _PATHS[case]
    step, rows, _, want = _long_pair_step(
        monkeypatch, chosen, rejected, h_size=4, need=(True, True, True), bias=True, workspace=workspace
    )
    assert rows == gemm_rows
    for got, w in zip((step.d_hidden, step.d_weight, step.d_bias), want, strict=True):
        assert rel_err(got, w) < 1e-10


def test_reference_pass_folds_without_statistics(monkeypatch):
    # The reference pass needs log-probs only: every fold it runs is asked for no statistics.
    from expo_kernels.ops import epilogues as epi

    asked, real = [], epi.torch_fold
    monkeypatch.setattr(
        epi, "torch_fold", lambda z, b, y, t, with_stats: asked.append(with_stats) or real(z, b, y, t, with_stats)
    )
    hidden, _, weight, bias, labels = batch(seed=50, device="cpu")
    logp = engine.forward_logps(
        hidden, weight, bias, labels, ignore_index=-100, transform=LogitTransform(1.0, None, 1.0), backend="torch"
    )
    assert asked and not any(asked)
    torch.testing.assert_close(logp, _float64_logp(hidden, weight, bias, labels), rtol=1e-12, atol=1e-12)


def test_tracing_fullgraph_needs_both_a_trace_and_fullgraph(monkeypatch):
    # True only while torch.compile traces (is_compiling) a frame that may not break (the probe).
    for compiling in (False, True):
        for probe in (False, True):
            monkeypatch.setattr(torch.compiler, "is_compiling", lambda c=compiling: c)
            monkeypatch.setattr(engine, "_fullgraph_probe", lambda p=probe: p)
            assert engine.tracing_fullgraph() == (compiling and probe), (compiling, probe)


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("bias_dtype", [torch.bfloat16, torch.float32], ids=["bf16 bias", "float32 bias"])
@pytest.mark.parametrize("path", ["pairs", "one pass"])
def test_16bit_head_bias_gradient_sums_in_float32(path, bias_dtype, backend, monkeypatch):
    # A bf16 head through CUDA's contract (float32 logits, a bf16 dz buffer): d_bias sums the bf16 dz of
    # each chunk in float32 (16 chunks of a pair each; or a long pair in one pass, 3 tokens a chunk, as in
    # test_one_pass_long_pair_of_a_16bit_head_against_float64) and comes back in the bias's dtype. The
    # reference: float64 autograd's per-token dz (the pairs: g (onehot - p); the long pair: onehot - p,
    # scaled by its row's g afterwards) rounded to bf16 as the engine's dz buffer is, then summed in
    # float64. A float32 bias keeps the float32 sum: 1e-5 (measured ~1e-7; a bf16 rounding of each
    # chunk's sum would be ~1e-3); a bf16 bias is rounded once: 4e-3 (2^-9 per entry at most).
    require_backend(backend, "cpu")
    _cuda_gemm_contract(monkeypatch)
    pairs, (chosen, rejected, workspace) = {
        "pairs": (16, ([8] * 16, [7] * 16, 16 * V1 * 6)),
        "one pass": (1, ([12], [12], 2226)),
    }[path]
    g = torch.Generator().manual_seed(51)
    steps = max(chosen + rejected)
    hidden = torch.randn(2 * pairs, steps, 4, generator=g, dtype=DT, device="cpu").bfloat16()
    weight = (torch.randn(V1, 4, generator=g, dtype=DT, device="cpu") * 0.5).bfloat16()
    bias = (torch.randn(V1, generator=g, dtype=DT, device="cpu") * 0.5).to(bias_dtype)
    labels = torch.randint(0, V1, (2 * pairs, steps), generator=g, device="cpu")
    for r, c in enumerate(chosen + rejected):
        labels[r, : steps - c] = -100
    mask = (labels != -100).double()
    gemm_rows = _record_gemm_rows(monkeypatch)
    with ek.kernel_options(workspace_bytes=workspace):
        step = _step(
            hidden,
            weight,
            bias,
            labels,
            lambda logp, p2, ref: _dpo_with_sft(logp, mask.to(logp.dtype), pairs),
            backend=backend,
            row_constant=True,
        )
    assert gemm_rows == ([15] * 16 if path == "pairs" else [3] * 8)
    z = hidden.double() @ weight.double().T + bias.double()
    p = torch.softmax(z, -1)
    logp = _float64_logp(hidden, weight, bias, labels).requires_grad_()
    (g_tok,) = torch.autograd.grad(_dpo_with_sft(logp, mask, pairs), logp)
    onehot = torch.nn.functional.one_hot(labels.clamp(min=0), V1).double()
    if path == "pairs":
        dz = (g_tok[..., None] * (onehot - p)).bfloat16().double()
    else:
        dz = g_tok[..., None] * (onehot - p).bfloat16().double()
    want = (dz * mask[..., None]).sum((0, 1))
    assert step.d_bias.dtype == bias_dtype
    assert rel_err(step.d_bias, want) < (1e-5 if bias_dtype == torch.float32 else 4e-3)


class _NewTensors(TorchDispatchMode):
    """The size in bytes of every tensor an op returns in storage none of its inputs own (in-place
    results and views of an input are not new)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        owned = {t.untyped_storage().data_ptr() for t in inputs}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in owned:
                self.sizes.append(t.numel() * t.element_size())
        return out


def test_16bit_d_weight_upcasts_dz_through_the_dead_logits(monkeypatch):
    # d_weight += dz^T h, bf16 dz and h into a float32 d_weight, where the device's addmm cannot write
    # float32 (the probe is asked about dz's own device: the CPU, which cannot): dz is upcast through the
    # chunk's float32 logits z (dead once dz is formed), so no new tensor as large as dz; the result is
    # exact up to float32 sums (bf16 x bf16 products are exact in float32): 1e-6 against float64.
    asked, real = [], engine._addmm_writes_float32
    monkeypatch.setattr(engine, "_addmm_writes_float32", lambda d, t: asked.append((d, t)) or real(d, t))
    g = torch.Generator().manual_seed(52)
    n, v, h = 64, 300, 8
    dz = torch.randn(n, v, generator=g, device="cpu").bfloat16()
    hh = torch.randn(n, h, generator=g, device="cpu").bfloat16()
    z = torch.randn(n, v, generator=g, device="cpu")
    d_weight = torch.randn(v, h, generator=g, device="cpu")
    want = d_weight.double() + dz.double().T @ hh.double()
    with _NewTensors() as new:
        engine._accumulate_d_weight(d_weight, dz, hh, z)
    assert asked == [("cpu", torch.bfloat16)]
    assert max(new.sizes) < n * v * 2, new.sizes  # at most h's upcast (n x h float32)
    assert rel_err(d_weight, want) < 1e-6
    torch.testing.assert_close(z, dz.float(), rtol=0, atol=0)  # the logits' buffer took dz's upcast


@pytest.mark.parametrize("default_device", [None, "meta"])
@pytest.mark.parametrize("case", ["float64", "shared head", "bf16", "bf16 reference pass"])
def test_workspace_buffers(case, default_device, monkeypatch):
    # The workspace a step allocates ([n x V] buffers, one chunk of n counted tokens here): a float64 head's
    # logits only (dz is formed in place); twice the rows for a shared head's stacked GEMM (the reference's
    # rows and the policy's: 2 n V, not more); a 16-bit head's float32 logits and a bf16 dz (CUDA's contract);
    # and no dz for a pass without backward. The workspace dtype is asked for the inputs' device. Under a "meta"
    # default device (torch.set_default_device), every buffer still goes to the inputs' device: a meta one would
    # fail the CPU step.
    hidden, ref_hidden, weight, bias, labels = batch(seed=53, device="cpu")
    n = int((labels != -100).sum())
    devices = []
    if case.startswith("bf16"):
        _cuda_gemm_contract(monkeypatch)
        hidden, weight, bias = hidden.bfloat16(), weight.bfloat16(), bias.bfloat16()
    real = engine.gemm.logits_dtype
    monkeypatch.setattr(engine.gemm, "logits_dtype", lambda dt, dev: devices.append(dev) or real(dt, dev))
    loss = lambda logp, p2, ref: logp.sum() if ref is None else (logp - ref).sum()  # noqa: E731
    with torch.device(default_device) if default_device else contextlib.nullcontext(), _Allocations() as alloc:
        if case == "bf16 reference pass":
            _forward_logps(
                hidden,
                weight,
                bias,
                labels,
            )
        elif case == "shared head":  # (the step plans its stacked chunks itself)
            _step(hidden, weight, bias, labels, loss, ref_hidden=ref_hidden)
        else:
            _step(hidden, weight, bias, labels, loss)
    workspace = [(shape[0], dt) for name, shape, dt in alloc.made if name == "empty" and len(shape) == 1]
    assert (
        workspace
        == {
            "float64": [(n * V, DT)],
            "shared head": [(2 * n * V, DT)],
            "bf16": [(n * V, torch.bfloat16), (n * V, torch.float32)],
            "bf16 reference pass": [(n * V, torch.float32)],
        }[case]
    )
    assert devices and all(d == torch.device("cpu") for d in devices), devices


def test_one_pass_long_pair_with_an_empty_chosen_row(monkeypatch):
    # A long pair whose chosen row counts no token (its rejected row 24), between short pairs, in one pass: the
    # rejected row's partials are still scaled by its g (float64 autograd, 1e-10). The log-probs weighted by 1/50
    # keep DPO's sigmoid off saturation, so that g is not ~0 (sums of 24 log-probs would make it 1e-25).
    step, rows, _, want = _long_pair_step(
        monkeypatch,
        [6, 0, 2],
        [4, 24, 1],
        h_size=4,
        need=(True, True, True),
        bias=True,
        workspace=8580,
        token_weight=lambda mask: torch.full_like(mask, 0.02),
    )
    assert max(rows) < 24  # the long pair took token chunks
    for got, w in zip((step.d_hidden, step.d_weight, step.d_bias), want, strict=True):
        assert rel_err(got, w) < 1e-10
