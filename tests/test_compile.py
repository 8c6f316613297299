"""Every public entry point inside ``torch.compile`` on the CPU: values and gradients match eager.

Backends: most cases run under ``backend="aot_eager"`` (dynamo + AOT autograd + fake tensors, the
parts that trace our ops, without inductor's C++ code generation: seconds instead of minutes), in
the default mode and with ``fullgraph=True``; a few run under the real ``inductor`` backend (the
op, the pair engine's graph break, the training loop). The comparison is float32 with
``atol = rtol = 1e-6``: under ``aot_eager`` the results are the eager ones bit for bit; inductor
fuses the surrounding model code differently (last-bit differences of ``hidden``).

Graph breaks (README, "torch.compile"): in the default mode the pair engine's step is one eager
region (a graph break around ``FusedLinearPreferenceLoss``'s engine step); under ``fullgraph=True``
the modules take the op's path and nothing breaks.
"""

from __future__ import annotations

import pytest
import torch

import expo_kernels as ek

torch._dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.utils import counters  # noqa: E402

B, T, H, V = 2, 6, 8, 24
TOL = dict(atol=1e-6, rtol=1e-6)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test traces afresh: the modules' ``forward`` is one code object for every instance, and
    dynamo's recompile limit would otherwise send later tests to eager without saying so."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def make_inputs(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, V, (2 * B, T), generator=g)
    y[:, :2] = -100  # a prompt
    y[0, -1] = -100  # padding
    return dict(
        x=torch.randn(2 * B, T, H, generator=g),
        w=(0.5 * torch.randn(V, H, generator=g)).requires_grad_(),
        b=torch.randn(V, generator=g).requires_grad_(),
        y=y,
        rx=torch.randn(2 * B, T, H, generator=g),
        rw=0.5 * torch.randn(V, H, generator=g),
    )


PROJ = torch.nn.Linear(H, H)
torch.nn.init.normal_(PROJ.weight, std=0.3)


def hidden(t: dict) -> torch.Tensor:
    """The model part of the compiled step: the hidden states are a function of a trainable layer."""
    return torch.tanh(PROJ(t["x"]))


def run(fn, *, compile_kw=None) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """``fn(inputs)`` -> scalar loss, eager or compiled; the loss and the gradients of the head weight,
    bias and the projection."""
    t = make_inputs()
    PROJ.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    f = fn if compile_kw is None else torch.compile(fn, **compile_kw)
    loss = f(t)
    loss.backward()
    return loss.detach(), [t["w"].grad, t["b"].grad, PROJ.weight.grad]


def check(fn, backend: str = "aot_eager", fullgraph: bool = False) -> None:
    want, want_grads = run(fn)
    got, got_grads = run(fn, compile_kw=dict(backend=backend, fullgraph=fullgraph))
    torch.testing.assert_close(got, want, **TOL)
    for a, b in zip(got_grads, want_grads, strict=True):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, **TOL)


def only_engine_breaks() -> bool:
    """Graph breaks happened, and each at the pair engine's eager region (dynamo counts a break once per
    trace attempt, so the count is not the number of regions)."""
    reasons = list(counters["graph_break"])
    return bool(reasons) and all("pair engine" in r for r in reasons)


# ---------------------------------------------------------------------------------------------------
# the op and the loss functions
# ---------------------------------------------------------------------------------------------------
def _logprobs(t):
    return ek.linear_logprobs(hidden(t), t["w"], t["y"], t["b"]).sum()


def _logprobs_stats_topk(t):
    logp, stats = ek.linear_logprobs(hidden(t), t["w"], t["y"], t["b"], return_stats=True, topk=3)
    return logp.sum() + stats.topk_values.sum() + 0 * stats.entropy.sum()


def _token_kl(t):
    return ek.linear_token_kl(hidden(t), t["w"], t["rx"], t["rw"], t["y"], t["b"]).sum()


def _preference_loss(t):
    seq = ek.linear_logprobs(hidden(t), t["w"], t["y"]).sum(1)
    zeros = torch.zeros(B)
    return ek.preference_loss("sigmoid", seq[:B], seq[B:], zeros, zeros, beta=0.1)


OPS = {
    "linear_logprobs": _logprobs,
    "linear_logprobs_stats_topk": _logprobs_stats_topk,
    "linear_token_kl": _token_kl,
    "preference_loss": _preference_loss,
}


@pytest.mark.parametrize("fullgraph", [False, True], ids=["default", "fullgraph"])
@pytest.mark.parametrize("name", list(OPS))
def test_ops(name, fullgraph):
    check(OPS[name], fullgraph=fullgraph)
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_linear_logprobs_inductor():
    check(_logprobs, backend="inductor", fullgraph=True)


# ---------------------------------------------------------------------------------------------------
# the modules
# ---------------------------------------------------------------------------------------------------
DPO = ek.FusedLinearDPOLoss(beta=0.1)
SIMPO = ek.FusedLinearSimPOLoss(beta=2.0, gamma=0.5)
MPO = ek.FusedLinearPreferenceLoss(["sigmoid", "ipo"], loss_weights=[1.0, 0.5], beta=0.1)
EXPO = ek.FusedLinearEXPOLoss(lam=0.1, kl_estimator="token")
KTO = ek.FusedLinearKTOLoss(beta=0.1)
RRHF, RAFT = ek.FusedLinearRankingLoss("rrhf"), ek.FusedLinearRankingLoss("raft")
CRINGE = ek.FusedLinearCRINGELoss()
REWARDS = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
MODULES = {
    # the pair engine (default mode: one eager region), ref head of its own / shared with the policy
    "dpo_engine": lambda t: DPO(t["w"], hidden(t), t["y"], bias=t["b"], ref_hidden=t["rx"], ref_weight=t["rw"]).loss,
    "dpo_engine_shared_head": lambda t: DPO(t["w"], hidden(t), t["y"], ref_hidden=t["rx"]).loss,
    "simpo_engine_metrics": lambda t: (lambda o: o.loss + 0 * sum(o.metrics.values()) + 0 * o.policy_logps.sum())(
        SIMPO(t["w"], hidden(t), t["y"], bias=t["b"])
    ),
    # the op's path: a batch-coupled mix, EXPO's token KL
    "mpo_op_path": lambda t: MPO(t["w"], hidden(t), t["y"], ref_hidden=t["rx"], ref_weight=t["rw"]).loss,
    "expo_token_kl": lambda t: EXPO(t["w"], hidden(t), t["y"], ref_hidden=t["rx"], ref_weight=t["rw"]).loss,
    "kto": lambda t: (lambda o: o.loss + 0 * sum(o.metrics.values()))(
        KTO(
            t["w"],
            hidden(t),
            t["y"],
            ref_hidden=t["rx"],
            ref_weight=t["rw"],
            is_desirable=torch.tensor([True, False, True, False]),
            kl=0.0,
        )
    ),
    "ranking_rrhf": lambda t: RRHF(t["w"], hidden(t).view(B, 2, T, H), t["y"].view(B, 2, T), REWARDS).loss,
    "ranking_raft": lambda t: RAFT(t["w"], hidden(t).view(B, 2, T, H), t["y"].view(B, 2, T), REWARDS).loss,
    # the positives are sampled from the global generator (seeded in `run`)
    "cringe": lambda t: CRINGE(t["w"], hidden(t), t["y"]).loss,
}


@pytest.mark.parametrize("fullgraph", [False, True], ids=["default", "fullgraph"])
@pytest.mark.parametrize("name", list(MODULES))
def test_modules(name, fullgraph):
    check(MODULES[name], fullgraph=fullgraph)
    if fullgraph:
        assert not counters["graph_break"]
    elif name in ("dpo_engine", "dpo_engine_shared_head", "simpo_engine_metrics"):
        assert only_engine_breaks(), dict(counters["graph_break"])  # the engine's step: one eager region


def test_engine_op_path_under_kernel_options():
    """``kernel_options(engine=False)`` entered outside the compiled function: the op's path, no break."""
    with ek.kernel_options(engine=False):
        check(MODULES["dpo_engine"], fullgraph=True)


def test_dpo_engine_inductor():
    """The issue's step: the pair engine under inductor, one graph break around it."""
    check(MODULES["dpo_engine"], backend="inductor")
    assert only_engine_breaks()


def test_forced_pair_engine_under_fullgraph_names_the_call():
    t = make_inputs()
    loss = ek.FusedLinearSimPOLoss()
    f = torch.compile(lambda x: loss(t["w"], x, t["y"]).loss, backend="aot_eager", fullgraph=True)
    with ek.kernel_options(path="pair_engine"), pytest.raises(RuntimeError, match="FusedLinearSimPOLoss.*fullgraph"):
        f(t["x"])
    torch._dynamo.reset()
    with ek.kernel_options(path="pair_engine"):  # the default mode: the forced engine, as one eager region
        check(lambda t: loss(t["w"], hidden(t), t["y"]).loss)


def test_plan_under_fullgraph_is_the_op_path():
    seen = {}

    def step(t):
        seen["plan"] = DPO.plan_for(t["w"], hidden(t))
        return MODULES["dpo_engine"](t)

    run(step, compile_kw=dict(backend="aot_eager", fullgraph=True))
    assert seen["plan"].path is ek.Path.FUSED and "fullgraph" in seen["plan"].reason
    assert DPO.plan_for(make_inputs()["w"], make_inputs()["x"]).path is ek.Path.PAIR_ENGINE  # eager


# ---------------------------------------------------------------------------------------------------
# the Liger front end (its `compiled=True` is accepted and unused: the op tiles the work itself)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fullgraph", [False, True], ids=["default", "fullgraph"])
def test_liger_front_end(fullgraph):
    liger = pytest.importorskip("expo_kernels.integrations.liger")
    dpo = liger.LigerFusedLinearDPOLoss(beta=0.1, compiled=True)
    check(
        lambda t: dpo(t["w"], hidden(t), t["y"], t["b"], ref_input=t["rx"], ref_weight=t["rw"])[0],
        fullgraph=fullgraph,
    )
    simpo = liger.LigerFusedLinearSimPOLoss(beta=0.1, compiled=True)
    check(lambda t: simpo(t["w"], hidden(t), t["y"], t["b"])[0], fullgraph=fullgraph)


# ---------------------------------------------------------------------------------------------------
# a compiled training loop: model, loss, optimizer step
# ---------------------------------------------------------------------------------------------------
class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Parameter(0.5 * torch.randn(V, H, generator=g))
        self.mix = torch.nn.Parameter(0.3 * torch.randn(H, H, generator=g))
        self.head = torch.nn.Parameter(0.5 * torch.randn(V, H, generator=g))

    def hidden(self, ids):
        return torch.tanh(self.emb[ids] @ self.mix)


def _train(compiled: bool, steps: int = 3):
    model, ref = TinyLM(), TinyLM()
    ref.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = ek.FusedLinearDPOLoss(beta=0.1)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, V, (2 * B, T), generator=g)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, :2] = -100

    def step(ids, labels):
        out = loss_fn(model.head, model.hidden(ids), labels, ref_hidden=ref.hidden(ids), ref_weight=ref.head)
        out.loss.backward()
        return out.loss.detach()

    fn = torch.compile(step, backend="inductor") if compiled else step
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        losses.append(fn(ids, labels))
        opt.step()
    return torch.stack(losses), [p.detach().clone() for p in model.parameters()]


def test_compiled_training_loop_matches_eager():
    want_losses, want_params = _train(compiled=False)
    got_losses, got_params = _train(compiled=True)
    torch.testing.assert_close(got_losses, want_losses, **TOL)
    for a, b in zip(got_params, want_params, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    # the breaks: the engine's eager region, and dynamo's own at `loss.backward()` inside the step
    reasons = list(counters["graph_break"])
    assert any("pair engine" in r for r in reasons), reasons
    assert all("pair engine" in r or "backward" in r for r in reasons), reasons


# ---------------------------------------------------------------------------------------------------
# the native ops' fake implementations, and a first native use inside a fullgraph compile
# ---------------------------------------------------------------------------------------------------
def _native_cases():
    g = torch.Generator().manual_seed(3)
    n, h, v = 5, 8, 24
    hid, w, b = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g), torch.randn(v, generator=g)
    y, lse, grad = torch.randint(0, v, (n,), generator=g), torch.randn(n, generator=g) + 5, torch.randn(n, generator=g)
    t = (1.0, None, 1.0)
    return {
        "logprobs_forward": (hid, w, b, y, *t, True, 0, 4, 8, 3),
        "logprobs_backward": (grad, hid, w, b, y, lse, *t, True, True, True, 0, 4, 8),
        "token_kl_forward": (hid, w, b, hid + 0.1, w * 0.9, None, *t, 4, 8),
        "token_kl_backward": (grad, hid, w, b, hid + 0.1, w * 0.9, None, lse, lse, *t, True, False, True, 4, 8),
        "fold_logits_": (hid @ w.T, b, y, 0, *t, True),
        "logits_to_dz_": (torch.randn(n, v, generator=g), y, 0, lse, grad, *t),
    }


@pytest.mark.parametrize("name", list(_native_cases()))
def test_native_ops_have_fakes(name):
    """``torch.library.opcheck``: schema (mutation), fake implementation and real kernel agree."""
    if "native" not in ek.available_backends("cpu"):
        pytest.skip("the native backend does not build here")
    op = getattr(torch.ops.expo_native, name).default
    torch.library.opcheck(op, _native_cases()[name], test_utils=("test_schema", "test_faketensor"))


def test_first_native_use_inside_fullgraph_compile():
    """The extension's first load happens while dynamo traces (a fresh process): no lock in the graph."""
    import subprocess
    import sys

    code = (
        "import torch, expo_kernels as ek\n"
        "x, w, y = torch.randn(6, 8), torch.randn(24, 8, requires_grad=True), torch.randint(0, 24, (6,))\n"
        "f = torch.compile(lambda x: ek.linear_logprobs(x, w, y).sum(), backend='aot_eager', fullgraph=True)\n"
        "got = f(x); got.backward(); g = w.grad.clone(); w.grad = None\n"
        "want = ek.linear_logprobs(x, w, y).sum(); want.backward()\n"
        "assert torch.equal(got, want) and torch.equal(g, w.grad), (got, want)\n"
        "print(ek.available_backends('cpu')[0])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
