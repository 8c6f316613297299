"""A ZeRO-3 head is partitioned again on every exit path of a backward, a failed one included.

DeepSpeed's gather is replaced by a recording stand-in (one process, no collectives): what is checked
is this package's bookkeeping of when a head is gathered and released, not DeepSpeed's.
"""

import pytest
import torch

deepspeed = pytest.importorskip("deepspeed")
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus  # noqa: E402

from expo_kernels.distributed import release_zero3_heads, zero3  # noqa: E402


class RecordingGather:
    """``deepspeed.zero.GatheredParameters`` for one process: marks the parameters available while
    entered and counts entries and exits."""

    log: list[str] = []

    def __init__(self, params, modifier_rank=None):
        self.params = params

    def __enter__(self):
        for p in self.params:
            p.ds_status = ZeroParamStatus.AVAILABLE
        RecordingGather.log.append("gather")

    def __exit__(self, *exc):
        for p in self.params:
            p.ds_status = ZeroParamStatus.NOT_AVAILABLE
        RecordingGather.log.append("release")
        return False


@pytest.fixture
def head(monkeypatch):
    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", RecordingGather)
    RecordingGather.log = []
    w = torch.nn.Parameter(torch.randn(11, 4, dtype=torch.float64))
    w.ds_id, w.ds_status = 0, ZeroParamStatus.NOT_AVAILABLE
    yield w
    release_zero3_heads()
    assert not zero3._HELD


def _loss(w, x):
    with zero3.zero3_gathered(w) as (wv,):
        return torch.nn.functional.linear(x, wv).log_softmax(-1)[:, 0].sum()


def test_a_successful_backward_releases_the_head(head):
    x = torch.randn(3, 4, dtype=torch.float64)
    _loss(head, x).backward()
    assert head.ds_status == ZeroParamStatus.NOT_AVAILABLE and not zero3._HELD
    assert RecordingGather.log.count("gather") == RecordingGather.log.count("release") == 2
    assert head.grad is not None


def _failed_backward(w, x):
    handle = w.register_hook(lambda g: (_ for _ in ()).throw(RuntimeError("a hook failed mid-backward")))
    with pytest.raises(RuntimeError, match="mid-backward"):
        _loss(w, x).backward()
    handle.remove()


def test_a_failed_backward_is_released_by_the_next_fused_call(head):
    x = torch.randn(3, 4, dtype=torch.float64)
    _failed_backward(head, x)
    assert zero3._HELD  # the failed backward's end-of-backward release never ran
    loss = _loss(head, x)  # the next forward partitions it before gathering
    assert RecordingGather.log[:4] == ["gather", "release", "gather", "release"]
    loss.backward()
    assert head.ds_status == ZeroParamStatus.NOT_AVAILABLE and not zero3._HELD
    assert RecordingGather.log.count("gather") == RecordingGather.log.count("release")


def test_release_zero3_heads_after_a_failed_backward(head):
    x = torch.randn(3, 4, dtype=torch.float64)
    _failed_backward(head, x)
    assert head.ds_status == ZeroParamStatus.AVAILABLE
    assert release_zero3_heads() == 1
    assert head.ds_status == ZeroParamStatus.NOT_AVAILABLE and not zero3._HELD
    assert release_zero3_heads() == 0
