"""DeepSpeed ZeRO-3 LM heads: gather a partitioned head for exactly one fused call.

Under ZeRO-3 every rank holds ``1/world`` of each parameter (``param.ds_tensor``); ``param.data`` is an
empty placeholder except while the parameter is gathered. Our fused ops read the whole head
(``[V, H]``) in forward and again in backward. :func:`zero3_gathered` (used by the loss modules,
:func:`~expo_kernels.linear_logprobs`, :func:`~expo_kernels.linear_token_kl` and the TRL integration
whenever a head is a partitioned ZeRO-3 parameter) does, per call:

* forward: one all-gather per partitioned head (``deepspeed.zero.GatheredParameters``) for the whole
  call: the policy pass, the token KL and the reference pass of a *shared* head read one gathered
  weight. On exit every head is partitioned again.
* between forward and backward nothing gathered stays alive: the graph would keep the weight it saved
  for backward (the parameter, or a detached alias of it such as the shared reference head); a
  saved-tensor hook stores a handle instead, and backward gathers the head again when the first node
  that needs it runs (as DeepSpeed re-fetches a module's parameters before the module's backward).
* the weight gradient: a trainable head reaches the op through an identity node whose backward keeps
  (or makes) the head gathered until its ``AccumulateGrad`` ran: autograd accumulates a ``[V, H]``
  gradient only into a ``[V, H]`` parameter, and DeepSpeed's post-accumulate hook then
  reduce-scatters it into the owners' partitions (the same hook as for any ZeRO-3 layer). A
  one-shot hook partitions the head right after (at the latest at the end of the backward pass, for
  a head that requires grad but was used detached, as TRL's reference model is).

So a trainable head is all-gathered once in forward and once in backward, a frozen one once in
forward and once in backward only if its weight was saved (the token KL's reference head).

A backward that raises between a head's re-gather and its gradient accumulation ends without its
end-of-backward callbacks, so nothing released that gather then. Each hold remembers the backward
(graph task) that made it; any hold of an earlier backward is released before this module gathers
anything again (the next forward through a fused call, or the next backward that needs the head),
and :func:`release_zero3_heads` releases them at once (for a trainer's ``except`` block).

Not covered: tied input/output embeddings (DeepSpeed's embedding module would gather the same
parameter), parameter offload to CPU/NVMe.

Nothing here imports ``deepspeed`` unless a tensor is a ZeRO-3 parameter (which only exists when
deepspeed is installed): the checks read attributes only.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = ["is_zero3_param", "any_zero3_partitioned", "zero3_gathered", "gathers_zero3_heads", "release_zero3_heads"]

F = TypeVar("F", bound=Callable[..., Any])


def is_zero3_param(t: Any) -> bool:
    """Whether ``t`` is a DeepSpeed ZeRO-3 parameter (DeepSpeed sets ``ds_id``/``ds_status`` on them)."""
    return isinstance(t, Tensor) and hasattr(t, "ds_id") and hasattr(t, "ds_status")


def _is_partitioned(t: Any) -> bool:
    """A ZeRO-3 parameter that is not gathered now (outside any DeepSpeed module forward or gather)."""
    if not is_zero3_param(t):
        return False
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return t.ds_status == ZeroParamStatus.NOT_AVAILABLE


def any_zero3_partitioned(*tensors: Any) -> bool:
    """Whether any of ``tensors`` is a partitioned ZeRO-3 parameter (a call must gather it)."""
    return any(_is_partitioned(t) for t in tensors)


# -- backward: gathers that last until a trainable head's gradient is accumulated ----------------
# id(param) -> (the GatheredParameters context holding it gathered in backward, the graph task that
# gathered it); exited by the hook on the parameter's AccumulateGrad (after DeepSpeed's reduce-scatter
# hook), else at the end of that backward, else -- that backward raised -- by _release_stale
_HELD: dict[int, tuple[Any, int]] = {}
# id(param) of the trainable heads whose gradient a pending backward will accumulate
_AWAITING_GRAD: dict[int, int] = {}


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def _gather_until_accumulated(param: Tensor) -> None:
    """Gather ``param`` (called in backward) until its gradient is accumulated: released by the hook
    of :class:`_GradToPartitioned`, at the latest at the end of this backward pass (a head that
    required grad but whose gradient never arrived, e.g. a reference model's head used detached)."""
    import deepspeed

    _release_stale()
    if id(param) in _HELD or not _is_partitioned(param):
        return
    gather = deepspeed.zero.GatheredParameters([param], modifier_rank=None)
    gather.__enter__()
    _HELD[id(param)] = (gather, torch._C._current_graph_task_id())
    torch.autograd.Variable._execution_engine.queue_callback(lambda: _release(param))


def _release(param: Tensor) -> None:
    held = _HELD.pop(id(param), None)
    if held is not None:
        held[0].__exit__(None, None, None)


def _release_stale() -> None:
    """Partition again every head held gathered by a backward other than the running one (none runs
    in forward): a backward that raised left it, as its end-of-backward callback never ran."""
    task = torch._C._current_graph_task_id()
    for key, (gather, held_by) in list(_HELD.items()):
        if held_by != task:
            del _HELD[key]
            gather.__exit__(None, None, None)


def release_zero3_heads() -> int:
    """Partition every ZeRO-3 head a backward still holds gathered; returns how many. Called outside a
    backward (e.g. in the ``except`` block around a failed ``loss.backward()``); a successful backward
    needs no call, and the next fused call releases what a failed one left in any case."""
    count = len(_HELD)
    _release_stale()
    return count - len(_HELD)


class _GradToPartitioned(torch.autograd.Function):
    """Identity on a gathered trainable head; its backward has the head gathered when the head's
    ``AccumulateGrad`` (next node) runs and partitions it right after (DeepSpeed's reduce-scatter is
    a post-accumulate hook, so it has run by then)."""

    @staticmethod
    def forward(ctx, weight: Tensor) -> Tensor:  # type: ignore[override]
        ctx.param = weight
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        param = ctx.param
        count = _AWAITING_GRAD.get(id(param), 0) - 1
        if count > 0:
            _AWAITING_GRAD[id(param)] = count
        else:
            _AWAITING_GRAD.pop(id(param), None)
        _gather_until_accumulated(param)
        accumulate = ctx.next_functions[0][0]  # the parameter's AccumulateGrad
        handles: list[Any] = []

        def after_accumulate(*_: Any) -> None:  # one shot: this backward's accumulation only
            handles.pop().remove()
            _release(param)

        handles.append(accumulate.register_hook(after_accumulate))
        return grad


class _Regather:
    """What the graph saves instead of a tensor aliasing a gathered ZeRO-3 head: the parameter and the
    alias's geometry, rebuilt from a fresh gather when backward needs it."""

    __slots__ = ("param", "size", "stride", "offset", "requires_grad")

    def __init__(self, param: Tensor, t: Tensor) -> None:
        self.param, self.size, self.stride, self.offset = param, t.size(), t.stride(), t.storage_offset()
        self.requires_grad = t.requires_grad  # the trainable head itself, not a detached alias of it

    def unpack(self) -> Tensor:
        import deepspeed

        p = self.param
        if self.requires_grad and id(p) in _AWAITING_GRAD and _in_backward():
            _gather_until_accumulated(p)  # the gradient's accumulation needs it gathered too: one gather
            full = p.data
        elif not _is_partitioned(p):
            full = p.data
        else:
            # partitioning only points ``param.data`` at an empty placeholder: ``full`` keeps the
            # gathered storage exactly as long as the backward node that asked for it
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                full = p.data
        return full.as_strided(self.size, self.stride, self.offset)


# (parameter, storage address) of every head gathered by an active ``zero3_gathered``: one pair of
# saved-tensor hooks (the outermost context's) serves nested contexts, e.g. a trainer gathering the
# reference head around a loss module that gathers the policy head (torch lets only the innermost
# pair of hooks see what is saved inside it)
_ACTIVE: list[tuple[Tensor, int]] = []


def _pack(t: Tensor) -> Any:
    if t.device.type != "meta":
        ptr = t.untyped_storage().data_ptr()
        for p, p_ptr in _ACTIVE:
            if ptr == p_ptr and ptr != 0:
                return _Regather(p, t)
    return t


def _unpack(x: Any) -> Tensor:
    return x.unpack() if isinstance(x, _Regather) else x


@contextlib.contextmanager
def zero3_gathered(*tensors: Tensor | None) -> Iterator[tuple[Tensor | None, ...]]:
    """Gather the partitioned ZeRO-3 parameters among ``tensors`` (heads: weights ``[V, H]``, biases
    ``[V]``) for the body of the ``with``; yields ``tensors`` with each gathered one that requires
    grad replaced by an identity view of it: compute with those. Other tensors (plain ones, ``None``,
    parameters already gathered, e.g. inside a DeepSpeed module's forward) pass through unchanged.

    Each partitioned parameter is all-gathered once on entry and partitioned on exit; backward gathers
    again what it needs (see the module docstring). Every rank must enter with the same parameters
    (the gathers are collectives).
    """
    if _HELD:
        _release_stale()  # a backward that raised left a head gathered: partition it before gathering
    params: list[Tensor] = []
    for t in tensors:
        if t is not None and _is_partitioned(t) and all(t is not p for p in params):
            params.append(t)
    if not params:
        yield tensors
        return
    import deepspeed

    outermost = not _ACTIVE
    n_before = len(_ACTIVE)
    with contextlib.ExitStack() as stack:
        # one GatheredParameters per head, in ds_id order on every rank: the policy and a separate
        # reference head may belong to different DeepSpeed engines (TRL prepares the reference model
        # with its own)
        for p in sorted(params, key=lambda p: p.ds_id):  # type: ignore[attr-defined]
            stack.enter_context(deepspeed.zero.GatheredParameters([p], modifier_rank=None))
        _ACTIVE.extend((p, p.data.untyped_storage().data_ptr()) for p in params)
        stack.callback(lambda: _ACTIVE.__delitem__(slice(n_before, None)))
        if outermost:
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(_pack, _unpack))
        out: list[Tensor | None] = []
        for t in tensors:
            if any(t is p for p in params) and t is not None and t.requires_grad and torch.is_grad_enabled():
                out.append(_GradToPartitioned.apply(t))
                _AWAITING_GRAD[id(t)] = _AWAITING_GRAD.get(id(t), 0) + 1
            else:
                out.append(t)
        yield tuple(out)


def gathers_zero3_heads(*names: str) -> Callable[[F], F]:
    """Decorator: ``fn``'s arguments ``names`` (its heads), when partitioned ZeRO-3 parameters, are
    gathered for the call (:func:`zero3_gathered`). Without a ZeRO-3 argument it costs one attribute
    check per argument and never imports deepspeed."""

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not any(hasattr(a, "ds_id") for a in (*args, *kwargs.values())):
                return fn(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            with zero3_gathered(*(bound.arguments.get(n) for n in names)) as heads:
                for n, h in zip(names, heads, strict=True):
                    if n in bound.arguments:
                        bound.arguments[n] = h
                return fn(*bound.args, **bound.kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
