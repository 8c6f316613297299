"""The native C++ CPU backend (csrc/expo_native.cpp): what the shared suites do not cover.

Correctness against the float64 reference comes from test_linear_logprobs.py / test_token_kl.py /
test_input_validation.py, which run on every backend ``available_backends`` lists. Here: the
fallback when the extension cannot be built, ``EXPO_KERNELS_NATIVE=0``, tile boundaries, bit-for-bit
determinism, and that no ``[N, V]`` buffer is allocated (peak RSS in a fresh process).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import require_backend

from expo_kernels import ops
from expo_kernels.ops import LogitTransform, torch_backend

REPO = Path(__file__).resolve().parents[1]
needs_native = pytest.mark.usefixtures("native_built")


@pytest.fixture
def native_built():
    """Skip unless the native backend builds here (resolved when the test runs, not at collection)."""
    require_backend("native", "cpu")


def _run(code: str, **env_overrides) -> dict:
    """Runs ``code`` in a fresh interpreter; its last stdout line is JSON."""
    env = dict(os.environ)
    env.pop("EXPO_KERNELS_BACKEND", None)
    env.update(env_overrides)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=str(REPO),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


FALLBACK_CODE = """
    import json, warnings
    import torch
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        import expo_kernels as ek
        from expo_kernels._dispatch import resolve_backend
        first = ek.available_backends("cpu")
        second = ek.available_backends("cpu")
        default = resolve_backend(None, torch.device("cpu"))
        h = torch.randn(5, 8, requires_grad=True)
        w = torch.randn(11, 8, requires_grad=True)
        logp = ek.linear_logprobs(h, w, torch.randint(0, 11, (5,)))
        logp.sum().backward()
    try:
        resolve_backend("native", torch.device("cpu"))
        refused = None
    except ValueError as exc:
        refused = str(exc)
    native_warnings = [str(w.message) for w in caught if "native" in str(w.message)]
    print(json.dumps(dict(first=first, second=second, default=default, warnings=native_warnings,
                          refused=refused, finite=bool(torch.isfinite(h.grad).all()))))
"""


def test_failed_build_falls_back_to_torch_with_one_warning(tmp_path):
    # A compiler that always fails, in an empty build directory: the build is attempted and fails.
    out = _run(FALLBACK_CODE, EXPO_KERNELS_BUILD_DIR=str(tmp_path), CXX="false", EXPO_KERNELS_NATIVE="1")
    assert out["first"] == out["second"] and "native" not in out["first"] and "torch" in out["first"]
    assert out["default"] == "torch"
    assert len(out["warnings"]) == 1, out["warnings"]
    assert "torch backend" in out["warnings"][0]
    assert out["refused"] and "native" in out["refused"]
    assert out["finite"]


def test_env_var_disables_native_without_warning(tmp_path):
    out = _run(FALLBACK_CODE, EXPO_KERNELS_NATIVE="0", EXPO_KERNELS_BUILD_DIR=str(tmp_path))
    assert "native" not in out["first"] and out["default"] == "torch"
    assert out["warnings"] == []
    assert "EXPO_KERNELS_NATIVE=0" in out["refused"]
    assert not any(tmp_path.iterdir()), "nothing may be built when disabled"


def test_info_runs():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "expo_kernels.info", "--json"],
        cwd=str(REPO),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(proc.stdout)
    assert info["devices"]["cpu"]["available"][-1] == "torch"
    assert ("native" in info["devices"]["cpu"]["available"]) == info["native"]["available"]


# ------------------------------------------------------------------------------------------------


def _inputs(n, h, v, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) / h**0.5 * 2).to(dtype)
    bias = (torch.randn(v, generator=g) * 0.5).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    grad = torch.randn(n, generator=g, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return hidden, weight, bias, labels, grad


def _native_pass(hidden, weight, bias, labels, grad, transform):
    from expo_kernels.ops import native_backend as nb

    out = ops.forward(nb, hidden, weight, bias, labels, transform, True)
    grads = nb.backward(grad, hidden, weight, bias, labels, out.lse, transform, True, True, True)
    ref_h = hidden.flip(0)
    kl = ops.token_kl_forward(nb, hidden, weight, bias, ref_h, weight.flip(0), None, transform)
    kl_grads = nb.token_kl_backward(
        grad, hidden, weight, bias, ref_h, weight.flip(0), None, kl[1], kl[2], transform, True, True, True
    )
    return list(out) + list(grads) + list(kl) + list(kl_grads)


def _torch_pass(hidden, weight, bias, labels, grad, transform):
    out = ops.forward(torch_backend, hidden, weight, bias, labels, transform, True)
    grads = torch_backend.backward(grad, hidden, weight, bias, labels, out.lse, transform, True, True, True)
    ref_h = hidden.flip(0)
    kl = ops.token_kl_forward(torch_backend, hidden, weight, bias, ref_h, weight.flip(0), None, transform)
    kl_grads = torch_backend.token_kl_backward(
        grad, hidden, weight, bias, ref_h, weight.flip(0), None, kl[1], kl[2], transform, True, True, True
    )
    return list(out) + list(grads) + list(kl) + list(kl_grads)


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("transform", [LogitTransform(), LogitTransform(2.0, 5.0, 1.3)], ids=["plain", "all"])
def test_ragged_tiles_match_torch_backend(dtype, transform, monkeypatch):
    """N not a multiple of the token block, V not a multiple of the vocab tile, several of each;
    for bf16 also a weight tile bounded by bytes (the fp32 weight / d_weight tile buffers)."""
    from expo_kernels.ops import native_backend as nb

    monkeypatch.setattr(nb, "TOKEN_BLOCK", 48)
    monkeypatch.setattr(nb, "VOCAB_TILE", 160)
    monkeypatch.setattr(nb, "WEIGHT_TILE_BYTES", 100 * 24 * 4)  # 100-row fp32 weight tiles for bf16
    args = _inputs(203, 24, 1009, dtype)
    got = _native_pass(*args, transform)
    want = _torch_pass(*args, transform)
    tol = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1e-2}[dtype]
    for i, (a, b) in enumerate(zip(got, want, strict=False)):
        if b is None:  # a field not asked for (the top-k)
            assert a is None, i
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, i
        if a.dtype == torch.bool:
            assert (a == b).float().mean() > 0.99, i  # argmax hits: ties at the rounding level may differ
        else:
            assert _rel(a, b) < tol, (i, _rel(a, b))


@needs_native
def test_deterministic_bit_for_bit(monkeypatch):
    from expo_kernels.ops import native_backend as nb

    monkeypatch.setattr(nb, "TOKEN_BLOCK", 64)
    monkeypatch.setattr(nb, "VOCAB_TILE", 256)
    args = _inputs(300, 32, 1500, torch.float32, seed=3)
    transform = LogitTransform(1.0, 8.0, 0.9)
    first = _native_pass(*args, transform)
    second = _native_pass(*args, transform)
    for a, b in zip(first, second, strict=False):
        assert (a is None and b is None) or torch.equal(a, b)
    # Rows are split across threads, never reduced across them: one thread gives the same values
    # up to the GEMM library's own (thread-count dependent) blocking.
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = _native_pass(*args, transform)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(single, first, strict=False):
        if a is None:
            assert b is None
        elif a.dtype == torch.bool:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@needs_native
def test_no_tokens_and_frozen_parts():
    from expo_kernels.ops import native_backend as nb

    hidden, weight, bias, labels, grad = _inputs(0, 8, 50, torch.float32)
    out = ops.forward(nb, hidden, weight, bias, labels, LogitTransform(), True)
    assert out.logp.shape == (0,) and out.is_top1.dtype == torch.bool
    d_h, d_w, d_b = nb.backward(grad, hidden, weight, bias, labels, out.lse, LogitTransform(), True, True, True)
    assert d_h.shape == (0, 8) and torch.equal(d_w, torch.zeros_like(weight)) and torch.equal(d_b, torch.zeros(50))
    hidden, weight, bias, labels, grad = _inputs(9, 8, 50, torch.float32)
    out = ops.forward(nb, hidden, weight, None, labels, LogitTransform(), False)
    assert out.entropy is None
    d_h, d_w, d_b = nb.backward(grad, hidden, weight, None, labels, out.lse, LogitTransform(), False, True, True)
    assert d_h is None and d_b is None and d_w.shape == weight.shape


PEAK_RSS_CODE = """
    import json, gc
    import torch
    from expo_kernels import ops
    from expo_kernels.ops import native_backend as nb
    from expo_kernels.ops import LogitTransform
    assert nb.available()
    nb.TOKEN_BLOCK, nb.VOCAB_TILE = 256, 4096      # 4 MiB tiles: the bound below is then far from them
    n, h, v = 2048, 32, 32768
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) / 8
    labels = torch.randint(0, v, (n,), generator=g)
    grad = torch.randn(n, generator=g)
    t = LogitTransform()
    small = ops.forward(nb, hidden[:300], weight[:5000], None, labels[:300] % 5000, t, True)   # libraries' first use
    nb.backward(grad[:300], hidden[:300], weight[:5000], None, labels[:300] % 5000, small.lse, t, True, True, False)

    def grown(fn):
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                                  # reset the RSS high-water mark
        before = int(open("/proc/self/statm").read().split()[1]) * 4096
        result = fn()
        # VmHWM, not ru_maxrss: the latter also remembers the RSS of the (heavier) parent at exec.
        hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")][0]
        return result, int(hwm.split()[1]) * 1024 - before

    out, fwd = grown(lambda: ops.forward(nb, hidden, weight, None, labels, t, True))
    _, bwd = grown(lambda: nb.backward(grad, hidden, weight, None, labels, out.lse, t, True, True, False))
    _, kl = grown(lambda: ops.token_kl_forward(nb, hidden, weight, None, hidden.flip(0), weight, None, t))
    print(json.dumps(dict(forward=fwd, backward=bwd, token_kl=kl)))
"""


@needs_native
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc/self/clear_refs")
def test_peak_rss_has_no_tokens_by_vocab_buffer():
    # The TorchDispatchMode tests see allocations made through ATen; this one sees every byte the
    # process touches, C++ and the GEMM library included (measured after a smaller call took the
    # libraries' one-time allocations). [N, V] float32 is 256 MiB here; each pass may grow the RSS
    # by its tiles (4 MiB each) and outputs ([V, H] gradient: 4 MiB), not by [N, V].
    out = _run(PEAK_RSS_CODE)
    n_by_v = 2048 * 32768 * 4
    for name, grown in out.items():
        assert grown < n_by_v // 8, f"{name}: peak RSS grew by {grown / 2**20:.0f} MiB; [N, V] fp32 is 256 MiB"
