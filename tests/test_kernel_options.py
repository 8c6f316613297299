"""Triton backward switches (``expo_kernels.kernel_options``, deterministic mode) of the fused kernels:
exact mode is exact, filtering drops exactly the tiles it should, deterministic mode is the chunked-GEMM
schedule.

In the CPU interpreter the kernels run in float64 (the interpreter takes it), so the comparisons are
tight; a GPU compiles them in float32 only (Triton refuses float64 there), against float64 references
of the same float32 inputs. ``engine=False`` keeps every call on the fused kernels: on CUDA the op
otherwise runs on library GEMMs (``ops.library_gemm``), which have no filter switch to test."""

import warnings

import pytest
import torch
from conftest import triton_available
from helpers import deterministic_algorithms, device_for

import expo_kernels as ek
from expo_kernels import ops
from expo_kernels.ops import LogitTransform, torch_backend

if not triton_available():
    pytest.skip("triton backend unavailable", allow_module_level=True)
from expo_kernels.ops import triton_backend  # noqa: E402
from expo_kernels.ops.triton import configs as triton_configs  # noqa: E402

N, H, V = 40, 24, 200
PLAIN = LogitTransform(1.0, None, 1.0)
DEVICE = device_for("triton")
DTYPE = torch.float32 if DEVICE.type == "cuda" else torch.float64
# float64 interpreter runs: rounding of float64 sums; float32 GPU runs: float32 dot products over H = 24
# and sums over V = 200 of O(1) terms (~1e-6), with margin
RTOL, ATOL = (1e-7, 1e-9) if DTYPE == torch.float64 else (2e-5, 2e-5)


def _inputs(seed=0, spread=6.0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)  # on the CPU: the same numbers on every device
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64).to(device, DTYPE)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) * spread / H**0.5).to(device, DTYPE)  # peaked
    labels = torch.randint(0, V, (N,), generator=g).to(device)
    grad = torch.randn(N, generator=g, dtype=torch.float64).to(device, DTYPE)
    return hidden, weight, labels, grad


def _backward(hidden, weight, labels, grad, lse):
    with ek.kernel_options(engine=False):  # the fused kernels (see the module docstring)
        return triton_backend.backward(grad, hidden, weight, None, labels, lse, PLAIN, True, True, False)


def _f64(*ts):
    return [t.double() for t in ts]


def test_exact_mode_is_the_default_and_equals_the_reference():
    hidden, weight, labels, grad = _inputs()
    lse = ops.forward(torch_backend, hidden, weight, None, labels, PLAIN, False).lse
    h64, w64, g64, lse64 = _f64(hidden, weight, grad, lse)
    ref = torch_backend.backward(g64, h64, w64, None, labels, lse64, PLAIN, True, True, False)
    with ek.kernel_options(grad_filter_eps=None):
        got = _backward(hidden, weight, labels, grad, lse)
    for a, b in zip(got[:2], ref[:2], strict=False):
        torch.testing.assert_close(a.double(), b, rtol=RTOL, atol=ATOL)


def test_filter_drops_exactly_the_negligible_label_free_tiles():
    eps = 1e-2
    hidden, weight, labels, grad = _inputs(spread=20.0)
    lse = ops.forward(torch_backend, hidden, weight, None, labels, PLAIN, False).lse
    with ek.kernel_options(grad_filter_eps=eps):
        d_h, d_w, _ = _backward(hidden, weight, labels, grad, lse)
    # float64 reference with the kernel's tiling: zero dz on (token block, vocab tile) pairs whose
    # probabilities are all < eps and that hold no label of the block
    cfg = triton_configs.launch_config("backward", hidden, need_hidden=True, need_weight=True, need_bias=False)
    h64, w64, g64, lse64 = _f64(hidden, weight, grad, lse)
    p = torch.exp(h64 @ w64.T - lse64[:, None])
    onehot = torch.nn.functional.one_hot(labels, V).to(p.dtype)
    dz = g64[:, None] * (onehot - p)
    skipped = 0
    for n0 in range(0, N, cfg.block_n):
        for v0 in range(0, V, cfg.block_v):
            tile = (slice(n0, n0 + cfg.block_n), slice(v0, v0 + cfg.block_v))
            # the kernel decides in its own precision: no tile may sit within rounding of the threshold
            assert abs(p[tile].max() / eps - 1) > 1e-3, "a tile's decision would hang on rounding"
            if p[tile].max() < eps and onehot[tile].sum() == 0:
                dz[tile] = 0
                skipped += 1
    assert skipped > 0, "the test must exercise skipping"
    torch.testing.assert_close(d_h.double(), dz @ w64, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(d_w.double(), dz.T @ h64, rtol=RTOL, atol=ATOL)
    # and the error it makes is bounded by eps * |g| per skipped logit
    exact = torch_backend.backward(g64, h64, w64, None, labels, lse64, PLAIN, True, False, False)[0]
    bound = eps * g64.abs()[:, None] * w64.abs().sum(0)[None, :]
    assert ((d_h.double() - exact).abs() <= bound + ATOL).all()


def test_filter_on_token_kl():
    hidden, weight, labels, grad = _inputs(seed=1, spread=20.0)
    ref_hidden = hidden + 0.1 * torch.randn_like(hidden)
    kl, lse_p, lse_r = ops.token_kl_forward(torch_backend, hidden, weight, None, ref_hidden, weight, None, PLAIN)
    h64, w64, r64, g64, lp64, lr64 = _f64(hidden, weight, ref_hidden, grad, lse_p, lse_r)
    exact = torch_backend.token_kl_backward(g64, h64, w64, None, r64, w64, None, lp64, lr64, PLAIN, True, False, False)[
        0
    ]
    # 3e-2: p - q is tiny for a reference this close, and at 1e-2 no tile of these inputs is skipped
    eps = 3e-2
    with ek.kernel_options(grad_filter_eps=eps):
        got = triton_backend.token_kl_backward(
            grad, hidden, weight, None, ref_hidden, weight, None, lse_p, lse_r, PLAIN, True, False, False
        )[0]
    bound = eps * g64.abs()[:, None] * w64.abs().sum(0)[None, :]
    assert ((got.double() - exact).abs() <= bound + ATOL).all()
    # some tiles were skipped: an effect far above rounding (measured 0.2 of |d_hidden|max ~15)
    assert (got.double() - exact).abs().max() > 1e-3


def test_deterministic_mode_runs_the_chunked_schedule():
    hidden, weight, labels, grad = _inputs(seed=2)
    lse = ops.forward(torch_backend, hidden, weight, None, labels, PLAIN, False).lse
    with deterministic_algorithms():
        ref = torch_backend.backward(grad, hidden, weight, None, labels, lse, PLAIN, True, True, False)
        got = _backward(hidden, weight, labels, grad, lse)
        again = _backward(hidden, weight, labels, grad, lse)
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
    hidden, weight, labels, grad = _inputs(device=device_for("torch"))
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
