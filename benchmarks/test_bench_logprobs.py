"""pytest-benchmark cases for the per-token log-prob implementations (small shapes).

Not part of the test suite (``testpaths = ["tests"]``); run on request. The project's pytest
options include ``--benchmark-disable`` (each case then runs once, as a plain test), so enable it:

    pytest benchmarks/ --benchmark-enable
    pytest benchmarks/ --benchmark-enable -k "naive or expo"      # a subset

Each case times one forward+backward of ``(logp * g).sum()`` after a warm-up round (so
``torch.compile`` time is excluded) and checks the log-probs against an exact fp32 reference.
Memory is not measured here; use ``python -m benchmarks.bench_logprobs`` for that.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from benchmarks import bench_logprobs as B  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPE = dict(n_tokens=256, hidden_size=128, vocab=4096)  # small: each case takes well under a second
TOL = 1e-4  # fp32 inputs; generous for TF32 / reordered reductions


def _impl_params():
    params = []
    for name in B.ALL_IMPLS:
        marks = []
        if name == "expo-triton" and DEVICE != "cuda":
            marks.append(pytest.mark.skip(reason="the triton backend is only benchmarked on CUDA"))
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.mark.parametrize("impl", _impl_params())
def test_fwd_bwd(benchmark, impl):
    try:
        fn = B.build_impl(impl, DEVICE)
    except ImportError as exc:
        pytest.skip(f"{impl} not importable: {exc}")
    hidden, weight, labels, g = B.make_inputs(device=DEVICE, dtype="fp32", ignore_frac=0.33, seed=0, **SHAPE)
    step = B.make_step(fn, hidden, weight, labels, g)
    benchmark.extra_info.update(
        impl=impl, device=DEVICE, detail=B.impl_detail(impl, torch.device(DEVICE).type), **SHAPE
    )

    if DEVICE == "cuda":

        def timed():
            out = step()
            torch.cuda.synchronize()
            return out
    else:
        timed = step

    logp = benchmark.pedantic(timed, rounds=5, warmup_rounds=1, iterations=1)

    ref_logp, ref_dh_r, ref_dw_r = B.reference(hidden, weight, labels, g)
    assert logp.shape == labels.shape and logp.dtype == torch.float32
    torch.testing.assert_close(logp, ref_logp, rtol=0, atol=TOL)
    assert torch.all(logp[labels == B.IGNORE_INDEX] == 0)
    r = B.grad_probe(hidden.shape[1], hidden.device)
    torch.testing.assert_close(hidden.grad.float() @ r, ref_dh_r, rtol=TOL, atol=TOL * ref_dh_r.abs().max().item())
    torch.testing.assert_close(weight.grad.float() @ r, ref_dw_r, rtol=TOL, atol=TOL * ref_dw_r.abs().max().item())
