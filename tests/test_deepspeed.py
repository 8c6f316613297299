"""DeepSpeed ZeRO-3 LM heads (expo_kernels.distributed.zero3), two CPU ranks over gloo.

Two ranks are spawned once for the module (DeepSpeed's CPU accelerator, ``init_distributed("gloo")``);
every case runs inside them and writes ``(error, tolerance)`` pairs that the tests here assert on.

* training: a tiny LM under ZeRO-3 (SGD through DeepSpeed, every parameter partitioned:
  ``stage3_param_persistence_threshold: 0``) is trained 3 steps with
  :class:`expo_kernels.FusedLinearPreferenceLoss` called on the partitioned head, against the same model
  trained unsharded in plain PyTorch on the global batch (both ranks' pairs). DPO with a separate
  ZeRO-3 reference model (prepared as TRL prepares it: ``deepspeed.initialize`` without optimizer),
  EXPO with the token KL on that frozen reference head, EXPO with the token KL on a shared head, and the
  functional ops (``linear_logprobs`` + ``linear_token_kl``) on partitioned heads. Losses and final
  parameters within 1e-5 (float32, relative to the reference's largest magnitude); the weights must
  have moved (> 1e-3), so a no-op training cannot pass.
* gathers: a fused call all-gathers each partitioned head exactly once in forward (the shared
  reference reads the policy's gather), again in backward, and leaves every head partitioned
  (``param.data`` empty) after the call and after backward; no gathered storage is alive after the
  call or after backward (weak references to every storage DeepSpeed gathered must have expired).
* the TRL path: ``FusedDPOTrainer`` vs ``trl.DPOTrainer`` under accelerate's DeepSpeed ZeRO-3 plugin
  (see :func:`_run_trl` for how far accelerate drives DeepSpeed on a CPU machine).

Skipped when deepspeed is not installed.
"""

import copy
import datetime
import functools
import gc
import importlib
import importlib.util
import logging
import os
import time
import types

import pytest
import torch
import torch.multiprocessing as mp

import expo_kernels as ek

# deepspeed is imported by the spawned ranks only: importing it here would initialize its accelerator
# in the pytest process, for every other test of the suite too
pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")

WORLD = 2
STEPS = 3
LR = 0.5
TOL = 1e-5
TIMEOUT_S = 240  # a hung rank (a collective one rank skipped) fails the module instead of hanging CI


class TinyLM(torch.nn.Module):
    """Embedding -> Linear+tanh -> LayerNorm; the LM head is a submodule the forward does not call."""

    def __init__(self, vocab=53, dim=24):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.layer = torch.nn.Linear(dim, dim)
        self.norm = torch.nn.LayerNorm(dim)
        self.lm_head = torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        return self.norm(torch.tanh(self.layer(self.embed(ids))))


def _dpo_batch(seed, pairs=2, t=9, vocab=53):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2 * pairs, t + 1), generator=g)
    labels = ids[:, 1:].clone()
    labels[:, :3] = -100  # prompt
    labels[pairs:, -1] = -100  # padding on the rejected rows
    return ids[:, :-1], labels


def _global(batches):
    """All ranks' pairs as one batch (chosen rows first, then rejected), as the unsharded run sees them."""
    p = batches[0][0].shape[0] // 2
    return tuple(torch.cat([b[i][:p] for b in batches] + [b[i][p:] for b in batches]) for i in (0, 1))


def _err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1.0))


def _ds_config(**zero):
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 by default; the unsharded run does not clip
        "zero_allow_untested_optimizer": True,  # torch's SGD: the unsharded run takes the same steps
        # every parameter partitioned (the default keeps parameters below 1e5 elements whole)
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, **zero},
    }


def _counting_gather_class():
    """``deepspeed.zero.GatheredParameters`` with counting (installed in the ranks by ``_worker``)."""
    import deepspeed

    class CountingGather(deepspeed.zero.GatheredParameters):
        """``GatheredParameters`` that counts its gathers (only those that gather a partitioned parameter)
        and keeps a weak reference to every gathered storage: expired = no tensor keeps it alive."""

        calls = 0
        storages: list = []

        def __enter__(self):
            from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
            from torch.multiprocessing.reductions import StorageWeakRef

            gathers = self.enabled and any(p.ds_status == ZeroParamStatus.NOT_AVAILABLE for p in self.params)
            out = super().__enter__()
            if gathers:
                type(self).calls += 1
                type(self).storages += [StorageWeakRef(p.data.untyped_storage()) for p in self.params]
            return out

        @classmethod
        def reset(cls):
            cls.calls, cls.storages = 0, []

        @classmethod
        def alive(cls, patience_s=5.0):
            """How many storages gathered since the last reset are still referenced. The all-gather's
            bookkeeping (gloo's in-flight work) may hold its output buffer until that work completes: a
            barrier first waits for every outstanding collective of the process group (every rank calls
            this at the same point). Gloo's work objects can still drop the buffer a little after the
            barrier returns, on their own thread, with no event to wait for: the count is then re-read
            (with a collection) for at most ``patience_s``, returning at once when it is 0. A tensor the
            autograd graph keeps stays alive until backward, so it still fails the check."""
            torch.distributed.barrier()
            deadline = time.monotonic() + patience_s
            while True:
                gc.collect()
                n = sum(not w.expired() for w in cls.storages)
                if n == 0 or time.monotonic() > deadline:
                    return n
                time.sleep(0.02)

    return CountingGather


_CountingGather = None  # the class above, in the ranks
_OUT_DIR = None  # the ranks' output directory (under the test's tmp_path), set by _worker


@functools.cache
def _trl_fixtures():
    """The TRL test fixtures of tests/helpers.py (shared with test_integration_trl.py), built in the ranks."""
    from helpers import (
        TRL_PARAM_TOL,
        TRL_RTOL,
        TRL_SKIP_LOG,
        plain_logits_expo_trainer_class,
        trl_datasets,
        trl_tokenizer,
    )

    pairs, unpaired = trl_datasets()
    return types.SimpleNamespace(
        TOK=trl_tokenizer(),
        PAIRS=pairs,
        UNPAIRED=unpaired,
        PlainLogitsEXPOTrainer=plain_logits_expo_trainer_class(),
        SKIP_LOG=TRL_SKIP_LOG,
        RTOL=TRL_RTOL,
        PARAM_TOL=TRL_PARAM_TOL,
    )


def _partitioned(p):
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return p.ds_status == ZeroParamStatus.NOT_AVAILABLE and p.data.numel() == 0


def _run_training(name, rank, world):
    import deepspeed

    torch.manual_seed(0)
    model = TinyLM()
    ref_model = copy.deepcopy(model)  # the frozen reference policy
    plain, plain_ref = copy.deepcopy(model), copy.deepcopy(model)  # trained unsharded on the global batch
    # frozen by requires_grad=False, except in "expo-token": there the reference parameters keep
    # requires_grad=True, as TRL's prepare_deepspeed leaves them (only eval()); the loss uses them detached
    for p in list(ref_model.parameters()) * (name != "expo-token") + list(plain_ref.parameters()):
        p.requires_grad_(False)
    if name == "dpo":
        loss_fn = ek.FusedLinearPreferenceLoss("sigmoid", beta=0.5, backend="torch")
    else:  # EXPO's explicit token KL to the reference head
        loss_fn = ek.FusedLinearPreferenceLoss("expo", lam=0.3, kl_estimator="token", backend="torch")
    shared = name == "expo-token-shared-head"
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR), config=_ds_config()
    )
    ref_engine, *_ = deepspeed.initialize(model=ref_model, config=_ds_config())  # as TRL's prepare_deepspeed
    ref_engine.eval()
    opt_plain = torch.optim.SGD(plain.parameters(), lr=LR)
    head, ref_head = model.lm_head.weight, ref_model.lm_head.weight
    res = {"head_partitioned": (0.0 if _partitioned(head) and _partitioned(ref_head) else 1.0, 0.0)}
    for step in range(STEPS):
        batches = [_dpo_batch(1000 * step + r) for r in range(world)]
        ids, labels = batches[rank]
        with torch.no_grad():
            ref_hidden = ref_engine(ids)
        hidden = engine(ids)
        _CountingGather.reset()
        if name == "functional":
            logp = ek.linear_logprobs(hidden, head, labels, backend="torch")
            kl = ek.linear_token_kl(hidden, head, ref_hidden, ref_head, labels, backend="torch")
            loss = -(logp.sum() / (labels != -100).sum()) + 0.3 * kl.sum() / (labels != -100).sum()
            want_fwd = 3  # each op gathers its partitioned heads for its own call
        else:
            out = loss_fn(head, hidden, labels, ref_hidden=ref_hidden, ref_weight=None if shared else ref_head)
            loss = out.loss
            want_fwd = 1 if shared else 2  # the policy head, and the reference head unless shared
        res[f"gathers_forward_step{step}"] = (abs(_CountingGather.calls - want_fwd), 0)
        res[f"partitioned_after_call_step{step}"] = (0.0 if _partitioned(head) and _partitioned(ref_head) else 1.0, 0)
        # nothing the graph keeps for backward holds a gathered head (not even a detached alias)
        res[f"gathered_alive_after_call_step{step}"] = (_CountingGather.alive(), 0)
        _CountingGather.reset()
        engine.backward(loss)
        res[f"gathered_alive_after_backward_step{step}"] = (_CountingGather.alive(), 0)
        # backward re-gathers what the graph saved of the heads (the policy weight for d_hidden; the
        # reference weight for the token KL's gradient), at least once, each for its node only
        res[f"regathered_in_backward_step{step}"] = (0 if _CountingGather.calls >= 1 else 1, 0)
        res[f"partitioned_after_backward_step{step}"] = (0.0 if _partitioned(head) else 1.0, 0)
        engine.step()
        mean_loss = loss.detach().clone()
        torch.distributed.all_reduce(mean_loss)
        mean_loss /= world

        g_ids, g_labels = _global(batches)
        with torch.no_grad():
            g_ref = plain_ref(g_ids)
        g_hidden = plain(g_ids)
        if name == "functional":
            n = (g_labels != -100).sum()
            # per-rank token means averaged over ranks: each rank's batch has the same token count
            logp = ek.linear_logprobs(g_hidden, plain.lm_head.weight, g_labels, backend="torch")
            kl = ek.linear_token_kl(
                g_hidden, plain.lm_head.weight, g_ref, plain_ref.lm_head.weight, g_labels, backend="torch"
            )
            want = -(logp.sum() / n) + 0.3 * kl.sum() / n
        else:
            ref_w = None if shared else plain_ref.lm_head.weight
            want = loss_fn(plain.lm_head.weight, g_hidden, g_labels, ref_hidden=g_ref, ref_weight=ref_w).loss
        want.backward()
        opt_plain.step()
        opt_plain.zero_grad()
        res[f"loss_step{step}"] = (_err(mean_loss, want), TOL)
    moved = 0.0
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        for (n, p1), p2, p0 in zip(model.named_parameters(), plain.parameters(), plain_ref.parameters(), strict=True):
            res[f"param:{n}"] = (_err(p1, p2), TOL)
            moved = max(moved, float((p2.detach() - p0).abs().max()))
    res["params_moved"] = (0.0 if moved > 1e-3 else 1.0, 0.0)
    return res


def _trl_run(trainer_cls, config_cls, dataset, config=None, **kw):
    """One trainer, 3 SGD steps under accelerate's DeepSpeed ZeRO-3 plugin: (logs, full parameters)."""
    import deepspeed
    from accelerate.state import AcceleratorState
    from helpers import TRL_TRAINER_ARGS, tiny_llama

    TI = _trl_fixtures()

    ds_config = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    }
    # use_configured_state: keep the gloo PartialState made in _run_trl (see there)
    # output_dir: under the test's tmp_path (handed to the ranks), never the working directory
    out = os.path.join(_OUT_DIR, f"trainer_output_{trainer_cls.__name__}")
    args = {**TRL_TRAINER_ARGS, "output_dir": out, "use_cpu": False, "per_device_train_batch_size": 2}
    args["deepspeed"] = ds_config
    args.update(config or {})
    args["accelerator_config"] = {"use_configured_state": True}
    torch.manual_seed(0)
    model = tiny_llama(len(TI.TOK))
    torch.manual_seed(1)
    ref = tiny_llama(len(TI.TOK))
    tr = trainer_cls(
        model=model, ref_model=ref, args=config_cls(**args), train_dataset=dataset, processing_class=TI.TOK, **kw
    )
    try:
        tr.train()
    finally:
        AcceleratorState._reset_state()  # the next trainer builds its own Accelerator (DeepSpeed plugin)
    # both heads are ZeRO-3 partitioned outside the calls (the fused head gathered them for each call)
    head, ref_head = model.get_output_embeddings().weight, tr.ref_model.module.get_output_embeddings().weight
    partitioned = _partitioned(head) and _partitioned(ref_head)
    logs = [{k: v for k, v in e.items() if k not in TI.SKIP_LOG} for e in tr.state.log_history if "loss" in e]
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        params = {k: p.detach().clone() for k, p in model.named_parameters()}
    return logs, params, partitioned


def _run_trl(name, rank, world):
    """Our trainer vs TRL's, both under accelerate's DeepSpeed ZeRO-3 plugin, two CPU ranks.

    Where accelerate stops on a CPU-only machine: with ``TrainingArguments(deepspeed=...)``,
    transformers builds accelerate's ``PartialState`` without a backend (``ddp_backend`` is dropped
    for DeepSpeed) and accelerate finds none for the CPU unless ``cpu=True``, which in turn skips its
    DeepSpeed branch; the state then says ``num_processes=1`` on every rank (each rank would read the
    whole dataset, and ``gather_for_metrics`` fails on gloo). Building ``PartialState(backend="gloo")``
    first, with ``ACCELERATE_USE_DEEPSPEED=true``, and passing ``accelerator_config={"use_configured_state":
    True}`` gives the state a multi-GPU launch gets: 2 processes, DeepSpeed's ``init_distributed``,
    ``DistributedType.DEEPSPEED``; from there TRL's own code runs unchanged (``prepare_deepspeed`` of
    the reference model, ZeRO-3 engines, the optimizer step through DeepSpeed).
    """
    from accelerate import PartialState
    from helpers import tiny_llama
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    from expo_kernels.integrations.trl import FusedDPOTrainer, FusedKTOTrainer

    TI = _trl_fixtures()
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    compared = None  # the logged values compared: all of TRL's
    if name == "trl-kto":
        runs = [_trl_run(cls, KTOConfig, TI.UNPAIRED) for cls in (KTOTrainer, FusedKTOTrainer)]
    elif name == "trl-dpo-expo-token":
        # TRL has no EXPO: the reference is tests/test_integration_trl.py's DPOTrainer that materializes
        # the logits (exact token KL), under ZeRO-3 too; it logs the loss only
        lam = TI.PlainLogitsEXPOTrainer.lam
        ours = dict(config={"loss_type": ["expo"]}, loss_kwargs={"lam": lam, "kl_estimator": "token"})
        runs = [
            _trl_run(TI.PlainLogitsEXPOTrainer, DPOConfig, TI.PAIRS),
            _trl_run(FusedDPOTrainer, DPOConfig, TI.PAIRS, **ours),
        ]
        compared = {"loss"}
    else:
        ours = {"registry_loss": True} if name == "trl-dpo-registry-loss" else {}
        runs = [_trl_run(DPOTrainer, DPOConfig, TI.PAIRS), _trl_run(FusedDPOTrainer, DPOConfig, TI.PAIRS, **ours)]
    (logs_a, params_a, part_a), (logs_b, params_b, part_b) = runs
    res = {"heads_partitioned": (0.0 if part_a and part_b else 1.0, 0.0), "three_logs": (abs(len(logs_b) - 3), 0)}
    for step, (la, lb) in enumerate(zip(logs_a, logs_b, strict=True)):
        compared_here = set(la) if compared is None else compared
        res[f"step{step}_metrics_missing"] = (len(compared_here - set(lb)), 0)
        for k in compared_here & set(lb):  # TRL_RTOL relative, 1e-6 absolute (as tests/test_integration_trl.py)
            res[f"step{step}:{k}"] = (abs(la[k] - lb[k]) / max(abs(la[k]), 1e-6 / TI.RTOL), TI.RTOL)
    for k in params_a:
        res[f"param:{k}"] = (float((params_a[k] - params_b[k]).abs().max()), TI.PARAM_TOL)
    torch.manual_seed(0)
    initial = tiny_llama(len(TI.TOK))
    moved = max(float((params_b[k] - p).abs().max()) for k, p in initial.named_parameters())
    res["params_moved"] = (0.0 if moved > 1e-3 else 1.0, 0.0)
    return res


TRL_CASES = ["trl-dpo", "trl-dpo-registry-loss", "trl-dpo-expo-token", "trl-kto"]
CASES = os.environ.get("EK_DS_CASES", "dpo,expo-token,expo-token-shared-head,functional").split(",")


def _worker(rank, world, out_dir):
    global _CountingGather, _OUT_DIR
    import deepspeed

    _OUT_DIR = out_dir
    # anything written relative to the working directory (transformers' default output_dir, caches) lands
    # under the test's tmp_path, not in the repository
    os.chdir(out_dir)
    torch.set_num_threads(1)
    # The ranks meet through a FileStore in the test's tmp_path (init_method file://): no TCP port is
    # picked, so none can be taken by another process between picking and binding. The MASTER_* variables
    # only keep DeepSpeed's launcher check from falling back to MPI discovery; nothing listens on them.
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT="0"
    )
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce (C++, minutes on a clean
    # 2-core CI machine) in init_distributed; gloo does the collectives without it
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    torch.autograd.set_detect_anomaly(bool(os.environ.get("EK_DS_ANOMALY")))
    deepspeed.init_distributed(
        dist_backend="gloo",
        init_method="file://" + os.path.join(out_dir, "rendezvous"),
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    _CountingGather = _counting_gather_class()
    deepspeed.zero.GatheredParameters = _CountingGather  # zero3.py looks it up at call time
    from helpers import run_rank_jobs

    jobs = [
        (n, functools.partial(_run_trl if n in TRL_CASES else _run_training, n, rank, world)) for n in CASES + TRL_CASES
    ]
    run_rank_jobs(jobs, rank, out_dir)


def spawn_ranks(fn, world, *args, timeout=TIMEOUT_S):
    """Run ``fn(rank, world, *args)`` in ``world`` spawned processes, waiting on their joins (``ctx.join``
    returns when a process exits); kill them all after ``timeout``."""
    ctx = mp.start_processes(fn, args=(world, *args), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"ranks still running after {timeout} s")


@pytest.fixture(scope="module")
def ds_results(tmp_path_factory):
    """Both ranks' results, run once for the module; everything they write is under a tmp_path."""
    d = str(tmp_path_factory.mktemp("deepspeed"))
    spawn_ranks(_worker, WORLD, d)
    return [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(WORLD)]


def _check(name, all_results):
    for rank, results in enumerate(all_results):
        assert name in results, f"rank {rank} did not run {name}"
        res = results[name]
        assert res, f"rank {rank} {name}: no checks recorded"
        assert "error" not in res, f"rank {rank}:\n{res.get('error')}"
        bad = {k: v for k, v in res.items() if not v[0] <= v[1]}
        assert not bad, f"rank {rank} {name}: (error, tolerance) {bad}"


@pytest.mark.parametrize("name", CASES)
def test_zero3_training_matches_unsharded(name, ds_results):
    _check(name, ds_results)


@pytest.mark.parametrize("name", TRL_CASES)
def test_trl_trainers_under_zero3_match_trl(name, ds_results):
    pytest.importorskip("trl")
    _check(name, ds_results)


def test_deepspeed_is_not_imported_without_zero3_parameters():
    """The package, the modules, the ops and the TRL integration check attributes only: deepspeed (an
    import that costs seconds and initializes an accelerator) is imported only for a ZeRO-3 parameter."""
    code = """
import sys, torch
import expo_kernels as ek
import expo_kernels.distributed, expo_kernels.integrations.trl
from expo_kernels.integrations.trl import call_with_lm_head
h, w, y = torch.randn(2, 3, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True), torch.randint(0, 11, (2, 3))
ek.linear_logprobs(h, w, y, backend="torch").sum().backward()
ek.linear_token_kl(h, w, h.detach(), w.detach(), y, backend="torch").sum().backward()
ek.FusedLinearPreferenceLoss("sigmoid", backend="torch")(w, h, y, ref_hidden=h.detach()).loss.backward()
call_with_lm_head(torch.nn.Linear(8, 11), lambda w, b, x: x @ w.T, h)
assert "deepspeed" not in sys.modules, "deepspeed was imported"
print("ok")
"""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
