"""Triton backward switches (``expo_kernels.kernel_options``, deterministic mode), in the interpreter
without a GPU: exact mode is exact, filtering drops exactly the tiles it should, deterministic mode
is the chunked-GEMM schedule."""

import warnings

import pytest
import torch
from conftest import triton_available

import expo_kernels as ek
from expo_kernels import ops
from expo_kernels.ops import LogitTransform, torch_backend

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if not triton_available():
    pytest.skip("triton backend unavailable", allow_module_level=True)
from expo_kernels.ops import triton_backend  # noqa: E402

N, H, V = 40, 24, 200
PLAIN = LogitTransform(1.0, None, 1.0)


def _inputs(seed=0, spread=6.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * spread / H**0.5  # peaked softmax
    labels = torch.randint(0, V, (N,), generator=g)
    grad = torch.randn(N, generator=g, dtype=torch.float64)
    return [t.to(DEVICE) for t in (hidden, weight, labels, grad)]


def _backward(hidden, weight, labels, grad, lse):
    return triton_backend.backward(grad, hidden, weight, None, labels, lse, PLAIN, True, True, False)


def test_exact_mode_is_the_default_and_equals_the_reference():
    hidden, weight, labels, grad = _inputs()
    lse = ops.forward(torch_backend, hidden, weight, None, labels, PLAIN, False).lse
    ref = torch_backend.backward(grad, hidden, weight, None, labels, lse, PLAIN, True, True, False)
    with ek.kernel_options(grad_filter_eps=None):
        got = _backward(hidden, weight, labels, grad, lse)
    for a, b in zip(got[:2], ref[:2], strict=False):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_filter_drops_exactly_the_negligible_label_free_tiles():
    eps = 1e-2
    hidden, weight, labels, grad = _inputs(spread=20.0)
    lse = ops.forward(torch_backend, hidden, weight, None, labels, PLAIN, False).lse
    with ek.kernel_options(grad_filter_eps=eps):
        d_h, d_w, _ = _backward(hidden, weight, labels, grad, lse)
    # float64 reference with the kernel's tiling: zero dz on (token block, vocab tile) pairs whose
    # probabilities are all < eps and that hold no label of the block
    cfg = triton_backend._launch_config("backward", hidden, need_hidden=True, need_weight=True, need_bias=False)
    p = torch.exp(hidden @ weight.T - lse[:, None])
    onehot = torch.nn.functional.one_hot(labels, V).to(p.dtype)
    dz = grad[:, None] * (onehot - p)
    skipped = 0
    for n0 in range(0, N, cfg.block_n):
        for v0 in range(0, V, cfg.block_v):
            tile = (slice(n0, n0 + cfg.block_n), slice(v0, v0 + cfg.block_v))
            if p[tile].max() < eps and onehot[tile].sum() == 0:
                dz[tile] = 0
                skipped += 1
    assert skipped > 0, "the test must exercise skipping"
    torch.testing.assert_close(d_h, dz @ weight, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(d_w, dz.T @ hidden, rtol=1e-7, atol=1e-9)
    # and the error it makes is bounded by eps * |g| per skipped logit
    exact = torch_backend.backward(grad, hidden, weight, None, labels, lse, PLAIN, True, False, False)[0]
    bound = eps * grad.abs()[:, None] * weight.abs().sum(0)[None, :]
    assert ((d_h - exact).abs() <= bound + 1e-12).all()


def test_filter_on_token_kl():
    hidden, weight, labels, grad = _inputs(seed=1, spread=20.0)
    ref_hidden = hidden + 0.1 * torch.randn_like(hidden)
    kl, lse_p, lse_r = ops.token_kl_forward(torch_backend, hidden, weight, None, ref_hidden, weight, None, PLAIN)
    exact = torch_backend.token_kl_backward(
        grad, hidden, weight, None, ref_hidden, weight, None, lse_p, lse_r, PLAIN, True, False, False
    )[0]
    with ek.kernel_options(grad_filter_eps=1e-2):
        got = triton_backend.token_kl_backward(
            grad, hidden, weight, None, ref_hidden, weight, None, lse_p, lse_r, PLAIN, True, False, False
        )[0]
    bound = 1e-2 * grad.abs()[:, None] * weight.abs().sum(0)[None, :]
    assert ((got - exact).abs() <= bound + 1e-12).all()
    assert not torch.equal(got, exact)  # some tiles were skipped


def test_deterministic_mode_runs_the_chunked_schedule():
    hidden, weight, labels, grad = _inputs(seed=2)
    lse = ops.forward(torch_backend, hidden, weight, None, labels, PLAIN, False).lse
    ref = torch_backend.backward(grad, hidden, weight, None, labels, lse, PLAIN, True, True, False)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        got = _backward(hidden, weight, labels, grad, lse)
        again = _backward(hidden, weight, labels, grad, lse)
    finally:
        torch.use_deterministic_algorithms(was)
    for a, b, c in zip(got[:2], ref[:2], again[:2], strict=False):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("bad", [0.0, 1.0, -1e-3, float("nan"), True, "1e-3"])
def test_bad_filter_eps(bad):
    with pytest.raises(ValueError, match="grad_filter_eps"):
        with ek.kernel_options(grad_filter_eps=bad):
            pass


def test_options_restore_after_the_block():
    with ek.kernel_options(grad_filter_eps=1e-4):
        assert ek.ops.options.get_kernel_options().grad_filter_eps == 1e-4
    assert ek.ops.options.get_kernel_options().grad_filter_eps is None


def test_cpu_backends_warn_once_that_filtering_is_triton_only(monkeypatch):
    from expo_kernels import _dispatch

    monkeypatch.setattr(_dispatch, "_WARNED_FILTER", set())
    hidden, weight, labels, grad = _inputs()
    h = hidden.float().requires_grad_()
    with ek.kernel_options(grad_filter_eps=1e-3):
        with pytest.warns(RuntimeWarning, match="applies to the triton backend only; the torch backend"):
            ek.linear_logprobs(h, weight.float(), labels, backend="torch").sum().backward()
        exact = h.grad.clone()
        h.grad = None
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per backend
            ek.linear_logprobs(h, weight.float(), labels, backend="torch").sum().backward()
    assert torch.equal(h.grad, exact)
