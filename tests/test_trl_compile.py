"""``FusedDPOTrainer`` with ``torch_compile=True`` (transformers' TrainingArguments option) on the CPU.

The Trainer (through accelerate) wraps the policy, and the reference model, in ``torch.compile``; our
patched forward (``add_fused_lm_head``) is traced with the model. Backend ``aot_eager`` (dynamo + AOT
autograd + fake tensors, no inductor code generation: seconds on the CPU). Two SGD steps of the tiny
Llama of tests/test_integration_trl.py, DPO sigmoid loss, fp32: the logged losses and metrics and the
final parameters must match the same trainer without compile (1e-5; under ``aot_eager`` they are
the same bit for bit), the compiled graphs must hold the whole forward (no graph break) and, on the
default path (TRL's loss code on our head), our registered op ``expo_kernels::linear_logprobs``.
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")
torch._dynamo = pytest.importorskip("torch._dynamo")
os.environ.setdefault("TQDM_DISABLE", "1")

from helpers import TRL_SKIP_LOG, TRL_TRAINER_ARGS, tiny_llama, trl_datasets, trl_tokenizer  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402
from trl import DPOConfig  # noqa: E402

from expo_kernels.integrations.trl import FusedDPOTrainer  # noqa: E402

_COMPILE_FIELDS = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
pytestmark = pytest.mark.skipif(
    not {"torch_compile", "torch_compile_backend"} <= _COMPILE_FIELDS,
    reason=f"transformers {transformers.__version__}: TrainingArguments has no torch_compile / torch_compile_backend",
)

TOL = 1e-5  # float32; aot_eager gives the eager values bit for bit
OP = "expo_kernels.linear_logprobs.default"  # the registered op, as the FX graph names it
TOK = trl_tokenizer()
PAIRS, _ = trl_datasets()


@pytest.fixture(autouse=True)
def _quiet_fresh(tmp_path, monkeypatch):
    """Each test writes under its own tmp_path and traces afresh (dynamo caches per code object)."""
    monkeypatch.chdir(tmp_path)
    torch._dynamo.reset()
    counters.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    torch._dynamo.reset()


@pytest.fixture
def graphs(monkeypatch):
    """The FX graphs dynamo hands to the backend: ``torch.compile`` (as accelerate calls it) gets the named
    backend wrapped in a recorder."""
    recorded: list = []
    compile_ = torch.compile

    def recording_compile(model, *, backend="inductor", **kwargs):
        inner = torch._dynamo.lookup_backend(backend)

        def record(gm, example_inputs):
            recorded.append(gm)
            return inner(gm, example_inputs)

        return compile_(model, backend=record, **kwargs)

    monkeypatch.setattr(torch, "compile", recording_compile)
    return recorded


def run(registry_loss: bool, **cfg):
    torch.manual_seed(0)
    model = tiny_llama(len(TOK))
    torch.manual_seed(1)  # a reference unlike the policy
    ref_model = tiny_llama(len(TOK))
    args = DPOConfig(
        **{**TRL_TRAINER_ARGS, "output_dir": "trainer_output", "max_steps": 2, "beta": 0.1, "loss_type": ["sigmoid"]},
        **cfg,
    )
    tr = FusedDPOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=PAIRS,
        processing_class=TOK,
        registry_loss=registry_loss,
    )
    tr.train()
    logs = [{k: v for k, v in e.items() if k not in TRL_SKIP_LOG} for e in tr.state.log_history if "loss" in e]
    params = {k: p.detach().clone() for k, p in tr.model.named_parameters()}
    return tr, logs, params


@pytest.mark.parametrize("registry_loss", [False, True], ids=["trl_loss", "registry_loss"])
def test_dpo_trainer_under_torch_compile_matches_eager(registry_loss, graphs):
    _, eager_logs, eager_params = run(registry_loss)
    assert not graphs and not counters["stats"]["unique_graphs"]  # the eager run compiled nothing

    tr, logs, params = run(registry_loss, torch_compile=True, torch_compile_backend="aot_eager")
    assert hasattr(tr.model_wrapped, "_orig_mod"), "the Trainer did not wrap the model in torch.compile"
    assert graphs, "nothing was compiled"
    assert not counters["graph_break"], dict(counters["graph_break"])
    if not registry_loss:  # TRL's loss code calls our head inside the policy's forward: in its graphs
        ops = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
        assert OP in ops

    assert len(logs) == len(eager_logs) == 2
    for step, (want, got) in enumerate(zip(eager_logs, logs, strict=True)):
        assert got.keys() == want.keys()
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=TOL, abs=TOL), f"step {step} {k}: {want[k]} vs {got[k]}"
    assert params.keys() == eager_params.keys()
    worst = max((params[k] - eager_params[k]).abs().max().item() for k in params)
    assert worst <= TOL
    moved = max((params[k] - p0).abs().max().item() for k, p0 in _initial_params().items())
    assert moved > 1e-3  # the steps trained something


def _initial_params():
    torch.manual_seed(0)
    return dict(tiny_llama(len(TOK)).named_parameters())
