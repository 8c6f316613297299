"""``linear_logprobs(..., topk=k, return_stats=True)``: the k largest transformed logits and their ids
from the same pass, on every backend, against a stable sort of materialized float64 logits.

The order is (value descending, the lower id first on ties) on every backend; ignored tokens hold
values 0 and ids -1; ``topk > V`` raises. ``topk_values`` is differentiable and its gradient reaches
only the selected rows of the head. Shapes stay tiny: Triton runs in its CPU interpreter here.
"""

import math

import pytest
import torch
from conftest import triton_available
from helpers import BACKEND_NAMES, FP64_BACKEND_NAMES, TRANSFORMS, device_for, rel_err, shrink_native_tiles
from reference import logits64

import expo_kernels as ek
from expo_kernels import functional
from expo_kernels.ops import LogitTransform, state, torch_backend, triton_backend


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    # several vocabulary tiles per call (V = 100 is a multiple of none of them): the cross-tile merge runs
    monkeypatch.setattr(torch_backend, "VOCAB_CHUNK", 32)
    monkeypatch.setattr(torch_backend, "TOKEN_CHUNK", 16)
    shrink_native_tiles(monkeypatch, 16, 24)


def reference_topk(hidden, weight, bias, labels, k, ignore_index=-100, **transform):
    """float64 (values, ids) ``[..., k]``: a stable descending sort (equal values keep the lower id
    first), values 0 / ids -1 at ignored tokens."""
    z = logits64(hidden.reshape(-1, hidden.shape[-1]), weight, bias, **transform)
    values, ids = z.sort(dim=1, descending=True, stable=True)
    values, ids = values[:, :k], ids[:, :k]
    keep = (labels.reshape(-1) != ignore_index)[:, None]
    values = torch.where(keep, values, torch.zeros_like(values))
    ids = torch.where(keep, ids, torch.full_like(ids, -1))
    return values.view(*labels.shape, k), ids.view(*labels.shape, k)


def make_inputs(n, h, v, device, dtype=torch.float32, bias=False):
    hidden = torch.randn(n, h, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, device=device) / h**0.5 * 2).to(dtype).requires_grad_()
    b = (torch.randn(v, device=device) * 0.5).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, v, (n,), device=device)
    labels[torch.rand(n, device=device) < 0.25] = -100
    return hidden, weight, labels, b


def check(backend, hidden, weight, labels, b, k, tol, **transform):
    logp, stats = ek.linear_logprobs(hidden, weight, labels, b, return_stats=True, topk=k, backend=backend, **transform)
    want_v, want_i = reference_topk(hidden, weight, b, labels, k, **transform)
    assert stats.topk_indices.dtype == torch.int64 and stats.topk_indices.shape == (*labels.shape, k)
    assert stats.topk_values.dtype == logp.dtype and stats.topk_values.shape == (*labels.shape, k)
    assert torch.equal(stats.topk_indices, want_i)
    torch.testing.assert_close(stats.topk_values.double(), want_v, rtol=tol, atol=tol)
    # the other statistics are untouched by the top-k
    _, plain = ek.linear_logprobs(hidden, weight, labels, b, return_stats=True, backend=backend, **transform)
    # (not bit-identical: without a top-k the call may keep its logits and take one GEMM instead of tiles)
    torch.testing.assert_close(stats.lse, plain.lse, rtol=tol, atol=tol)
    return stats


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("transform", ["plain", "all"])
def test_topk_matches_sorted_logits(backend, transform):
    hidden, weight, labels, b = make_inputs(37, 24, 100, device_for(backend), bias=True)
    check(backend, hidden, weight, labels, b, 5, 2e-5, **TRANSFORMS[transform])


@pytest.mark.parametrize("backend", FP64_BACKEND_NAMES)
@pytest.mark.parametrize("transform", ["temperature", "logit_scale", "softcap"])
def test_topk_float64_transforms(backend, transform):
    hidden, weight, labels, b = make_inputs(21, 16, 70, device_for(backend), torch.float64)
    check(backend, hidden, weight, labels, b, 9, 1e-12, **TRANSFORMS[transform])


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_topk_ties_lower_id_first(backend):
    # small integers: every logit is exact, many values repeat, so the tie order is all that decides
    dev = device_for(backend)
    hidden = torch.randint(-2, 3, (19, 8), device=dev).float()
    weight = torch.randint(-1, 2, (50, 8), device=dev).float()
    weight[7] = weight[40]  # whole duplicated rows too
    labels = torch.randint(0, 50, (19,), device=dev)
    stats = check(backend, hidden, weight, labels, None, 7, 0.0)
    v = stats.topk_values
    assert bool((v[:, :-1] == v[:, 1:]).any()), "the test needs ties inside the top-k"


def test_triton_vocab_splits_merge_ties():
    """Triton's per-split top-k merged across splits keeps the order (ties spanning splits)."""
    if not triton_available():
        pytest.skip("Triton cannot run here")
    dev = device_for("triton")
    hidden = torch.randint(-2, 3, (18, 16), device=dev).float()
    weight = torch.randint(-1, 2, (90, 16), device=dev).float()
    labels = torch.zeros(18, dtype=torch.long, device=dev)
    _, want_i = reference_topk(hidden, weight, None, labels, 6)
    st = triton_backend.forward_partial(hidden, weight, None, labels, LogitTransform(), False, vocab_splits=3, topk=6)
    assert torch.equal(st.topk_ids, want_i)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_topk_k_equals_v_masked_entries_and_strided_hidden(backend):
    dev = device_for(backend)
    base = torch.randn(3, 9, 2 * 12, device=dev)
    hidden = base[..., ::2]  # strided [3, 9, 12]
    weight = torch.randn(11, 12, device=dev)
    b = torch.randn(11, device=dev)
    b[[2, 5]] = -float("inf")  # masked ids: last, in id order
    labels = torch.randint(0, 11, (3, 9), device=dev)
    labels[1, 4] = -100
    stats = check(backend, hidden, weight, labels, b, 11, 2e-5, softcap=4.0)
    assert torch.equal(stats.topk_indices[0, 0, -2:], torch.tensor([2, 5], device=dev))
    assert torch.all(stats.topk_values[1, 4] == 0) and torch.all(stats.topk_indices[1, 4] == -1)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_topk_empty_batch(backend):
    dev = device_for(backend)
    hidden = torch.randn(0, 8, device=dev, requires_grad=True)
    weight = torch.randn(40, 8, device=dev, requires_grad=True)
    labels = torch.zeros(0, dtype=torch.long, device=dev)
    _, stats = ek.linear_logprobs(hidden, weight, labels, return_stats=True, topk=3, backend=backend)
    assert stats.topk_values.shape == (0, 3) and stats.topk_indices.shape == (0, 3)
    stats.topk_values.sum().backward()
    assert torch.all(weight.grad == 0) and hidden.grad.shape == (0, 8)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_topk_gradients_sparse_and_exact(backend):
    dev = device_for(backend)
    hidden, weight, labels, b = make_inputs(23, 16, 60, dev, bias=True)
    transform = TRANSFORMS["all"]
    _, stats = ek.linear_logprobs(hidden, weight, labels, b, return_stats=True, topk=4, backend=backend, **transform)
    g = torch.randn(stats.topk_values.shape, dtype=torch.float64, device=dev)
    got = torch.autograd.grad((stats.topk_values.double() * g).sum(), (hidden, weight, b))
    # materialized float64 logits gathered at the same ids
    ids = stats.topk_indices
    z = logits64(hidden, weight, b, **transform)
    keep = (labels != -100)[:, None]
    want_vals = torch.where(keep, z.gather(1, ids.clamp(min=0)), 0.0)
    want = torch.autograd.grad((want_vals * g).sum(), (hidden, weight, b))
    for name, x, y in zip(("hidden", "weight", "bias"), got, want, strict=True):
        assert rel_err(x, y) < 2e-5, f"d_{name}: {rel_err(x, y):.2e}"
    selected = torch.zeros(60, dtype=torch.bool, device=dev)
    selected[ids[ids >= 0]] = True
    assert torch.all(got[1][~selected] == 0) and torch.all(got[2][~selected] == 0)
    assert bool((got[1][selected].abs().sum(1) > 0).all())
    assert torch.all(got[0][labels == -100] == 0)  # ignored tokens get no gradient


def test_topk_values_ignore_what_ignored_rows_hold():
    """Ignored tokens (id -1) give value 0 and no gradient, even when their hidden rows hold NaN/inf."""
    from expo_kernels.ops.common import topk_logits

    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(5, 4, generator=g, dtype=torch.float64, device="cpu")  # ops.common: any device
    hidden[1] = float("nan")
    hidden[3] = float("inf")
    hidden.requires_grad_()
    weight = torch.randn(9, 4, generator=g, dtype=torch.float64, device="cpu", requires_grad=True)
    ids = torch.tensor([[2, 7], [-1, -1], [0, 8], [-1, -1], [5, 5]], device="cpu")
    values = topk_logits(hidden, weight, None, ids, LogitTransform(softcap=3.0))
    want = LogitTransform(softcap=3.0).apply((weight[ids.clamp(min=0)] * hidden.detach()[:, None, :]).sum(-1))
    keep = ids[:, :1] >= 0
    assert torch.equal(values[~keep[:, 0]], values.new_zeros(2, 2))
    torch.testing.assert_close(values[keep[:, 0]], want[keep[:, 0]], rtol=1e-12, atol=1e-12)
    values.sum().backward()
    assert torch.isfinite(weight.grad).all() and torch.isfinite(hidden.grad).all()
    assert torch.equal(hidden.grad[~keep[:, 0]], hidden.new_zeros(2, 4))
    assert torch.count_nonzero(weight.grad[[1, 3, 4, 6]]) == 0  # never selected by a counted row


def test_topk_argument_errors(monkeypatch):
    dev = device_for("torch")
    hidden, weight = torch.randn(4, 8, device=dev), torch.randn(10, 8, device=dev)
    labels = torch.randint(0, 10, (4,), device=dev)
    for bad, err in ((0, ValueError), (33, ValueError), (11, ValueError), (True, TypeError), (2.0, TypeError)):
        with pytest.raises(err, match="topk"):
            ek.linear_logprobs(hidden, weight, labels, return_stats=True, topk=bad, backend="torch")
    with pytest.raises(ValueError, match="topk requires return_stats=True"):
        ek.linear_logprobs(hidden, weight, labels, topk=3, backend="torch")
    monkeypatch.setattr(functional, "_sharded", lambda group: True)
    with pytest.raises(NotImplementedError, match="topk"):
        ek.linear_logprobs(hidden, weight, labels, return_stats=True, topk=3, process_group=object())


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_select_topk_orders_and_pads_candidates(k):
    # the merge of candidate lists (ops.state.select_topk), against a plain sort by (-value, id); fewer
    # candidates than k (3 per row here) pad with -inf and TOPK_PAD_ID, which rank after every real one
    dev = device_for("torch")
    values = torch.tensor([[0.5, 2.0, -1.0], [1.0, 1.0, 3.0], [-math.inf, 0.0, 0.0], [4.0, -2.0, 4.0]], device=dev)
    ids = torch.tensor([[7, 3, 11], [9, 4, 0], [5, 8, 2], [1, 6, 0]], device=dev)
    got_v, got_i = state.select_topk(values, ids, k)
    assert got_v.shape == got_i.shape == (4, k)
    for r in range(values.shape[0]):
        ranked = sorted(zip(values[r].tolist(), ids[r].tolist(), strict=True), key=lambda p: (-p[0], p[1]))
        ranked += [(-math.inf, state.TOPK_PAD_ID)] * max(0, k - len(ranked))
        assert got_v[r].tolist() == [v for v, _ in ranked[:k]], r
        assert got_i[r].tolist() == [i for _, i in ranked[:k]], r


def test_select_topk_breaks_long_runs_of_ties_by_id():
    # hundreds of candidates with tied values: ties go to the lower id, which needs a stable sort by value
    # after the sort by id (torch's unstable CPU sort reorders equal keys from about 100 elements on)
    g = torch.Generator().manual_seed(7)
    values = torch.randint(0, 3, (4, 300), generator=g, device="cpu").double()
    ids = torch.stack([torch.randperm(1000, generator=g, device="cpu")[:300] for _ in range(4)])
    got_v, got_i = state.select_topk(values, ids, 150)
    for r in range(4):
        ranked = sorted(zip(values[r].tolist(), ids[r].tolist(), strict=True), key=lambda p: (-p[0], p[1]))[:150]
        assert got_v[r].tolist() == [v for v, _ in ranked] and got_i[r].tolist() == [i for _, i in ranked], r


@pytest.mark.parametrize("with_stats", [False, True])
def test_finalized_state_carries_the_top_k(with_stats):
    # the ops layer's contract (ops/state.py): a state folded with topk=k keeps its k best logits and ids through
    # finalize_logprobs, with or without the statistics
    hidden, weight, labels, _ = make_inputs(9, 16, 100, "cpu", torch.float64)
    labels = labels.clamp(min=0)
    part = torch_backend.forward_partial(
        hidden.detach(), weight.detach(), None, labels, LogitTransform(), with_stats, topk=4
    )
    out = state.finalize_logprobs(part, 100)
    want_v, want_i = reference_topk(hidden, weight, None, labels, 4)
    assert torch.equal(out.topk_indices, want_i)
    torch.testing.assert_close(out.topk_values, want_v, rtol=1e-12, atol=1e-12)
