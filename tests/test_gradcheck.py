"""``torch.autograd.gradcheck`` on the op in float64, on every path a float64 call can take.

gradcheck compares the analytical gradients with finite differences, and also runs the backward twice
on one graph and demands the same bits ("Backward is not reentrant" otherwise). With its logits kept,
the op's first backward consumes them; the second must form them again the same way, or the two
backwards sum in different orders and differ in the last bits.
"""

import pytest
import torch
from helpers import FP64_BACKEND_NAMES

import expo_kernels as ek
from expo_kernels import _dispatch

F64 = torch.float64


def _inputs(n=7, h=5, v=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=F64).requires_grad_()
    weight = (0.5 * torch.randn(v, h, generator=g, dtype=F64)).requires_grad_()
    bias = (0.1 * torch.randn(v, generator=g, dtype=F64)).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    labels[2] = -100
    return hidden, weight, bias, labels


@pytest.mark.parametrize("backend", FP64_BACKEND_NAMES)
@pytest.mark.parametrize("path", ["kept_logits", "fused"])
@pytest.mark.parametrize("transform", [{}, {"softcap": 3.0, "temperature": 0.8}])
def test_gradcheck_float64(backend, path, transform):
    hidden, weight, bias, labels = _inputs()

    def fn(h, w, b):
        return ek.linear_logprobs(h, w, labels, b, backend=backend, **transform)

    with ek.kernel_options(path=path):
        assert _dispatch.plan_linear_logprobs(hidden, weight, bias, backend=backend).path.value == path
        assert torch.autograd.gradcheck(fn, (hidden, weight, bias), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", FP64_BACKEND_NAMES)
def test_repeated_backwards_of_kept_logits_are_bit_identical(backend):
    hidden, weight, bias, labels = _inputs(n=9, v=13, seed=1)
    grad = torch.randn(9, dtype=F64, generator=torch.Generator().manual_seed(2))
    with ek.kernel_options(path="kept_logits"):
        logp = ek.linear_logprobs(hidden, weight, labels, bias, backend=backend)
    first = torch.autograd.grad(logp, (hidden, weight, bias), grad, retain_graph=True)
    second = torch.autograd.grad(logp, (hidden, weight, bias), grad, retain_graph=True)
    third = torch.autograd.grad(logp, (hidden, weight, bias), grad)
    for a, b, c in zip(first, second, third, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_a_second_backward_without_counted_tokens_gives_zeros():
    hidden, weight, bias, labels = _inputs()
    labels = torch.full_like(labels, -100)
    with ek.kernel_options(path="kept_logits"):
        logp = ek.linear_logprobs(hidden, weight, labels, bias, backend="torch")
    grads = [torch.autograd.grad(logp.sum(), (hidden, weight, bias), retain_graph=True) for _ in range(2)]
    for g in grads:
        for t in g:
            assert t is None or torch.count_nonzero(t) == 0
