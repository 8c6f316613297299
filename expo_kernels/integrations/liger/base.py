"""The table the Liger-compatible classes are built from, and the two bases that build them.

:data:`SPECS` has one row per Liger loss: Liger's names, the registry loss, the constructor arguments
Liger takes (order, defaults, and the registry hyperparameter each becomes), the call and
``Function.apply`` argument orders, and the aux outputs Liger returns. A loss family's module adds
what the table cannot say, its ``step`` (the computation) and, where needed, a ``check`` of the
options, and declares the two classes::

    class LigerFusedLinearXFunction(LigerFunction, spec=SPECS["X"], step=step): ...
    class LigerFusedLinearXLoss(LigerLoss, function=LigerFusedLinearXFunction): ...

``Function.apply``, the module's ``__init__`` and ``forward`` take the row's signatures (shown by
:func:`inspect.signature`), validate the options on every call and pass every argument by name to
``step(owner, args, hparams)``: ``args`` holds them as attributes (``lin_weight`` as ``weight``),
``hparams`` the registry hyperparameters the row maps them onto.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from ._core import CallArgs, check_options, check_registry_hparams

__all__ = ["REQUIRED", "Option", "LigerSpec", "SPECS", "LigerFunction", "LigerLoss", "Step", "Check"]

#: An argument with no default.
REQUIRED = inspect.Parameter.empty


#: ``step(owner, args, hparams) -> (loss, aux)``: a loss family's computation.
Step = Callable[[str, CallArgs, dict[str, Any]], tuple[Tensor, tuple[Tensor, ...]]]
#: ``check(owner, args)``: option checks beyond the types and the registry's ranges; raises.
Check = Callable[[str, CallArgs], None]


_TENSORS = ("_input", "weight", "lin_weight", "target")  # the call arguments Liger requires


@dataclass(frozen=True)
class Option:
    """A constructor argument of Liger's class: ``name``, Liger's ``default``, and ``to``, the registry
    hyperparameter it becomes (None: a Liger-level option); with ``only``, it becomes one only for
    those ``loss_type`` values. A bool default makes it a checked bool."""

    name: str
    default: Any
    to: str | None = None
    only: tuple[str, ...] = ()


@dataclass(frozen=True)
class LigerSpec:
    """One Liger loss: ``LigerFusedLinear{short}Loss`` / ``...Function`` in ``liger_kernel.chunked_loss.
    {liger_module}``, on the registry loss ``loss`` (None: the ``loss_type`` option names it)."""

    short: str
    liger_module: str
    loss: str | None
    options: tuple[Option, ...]  # the constructor's arguments, in Liger's order
    call: tuple[str, ...]  # forward's arguments, in Liger's order; optional ones default to None
    apply: tuple[str, ...]  # Function.apply's arguments, in Liger's order
    outputs: tuple[str, ...]  # the aux outputs, in Liger's order
    apply_defaults: Mapping[str, Any] = field(default_factory=dict)  # where apply's differ from the constructor's
    fixed: Mapping[str, Any] = field(default_factory=dict)  # registry hyperparameters Liger does not expose

    @property
    def loss_class(self) -> str:
        return f"LigerFusedLinear{self.short}Loss"

    @property
    def function_class(self) -> str:
        return f"LigerFusedLinear{self.short}Function"

    @property
    def functional(self) -> str:
        """The alias in ``liger_kernel.chunked_loss.functional``."""
        return f"liger_fused_linear_{self.short.lower()}"

    def registry_loss(self, args: CallArgs) -> str:
        return self.loss if self.loss is not None else args.loss_type

    def hparams(self, args: CallArgs) -> dict[str, Any]:
        """The registry hyperparameters of a call: the mapped options, then the fixed ones."""
        loss = self.registry_loss(args)
        hp = {o.to: getattr(args, o.name) for o in self.options if o.to and (not o.only or loss in o.only)}
        return {**hp, **self.fixed}

    def init_signature(self) -> inspect.Signature:
        return _signature(["self", *(o.name for o in self.options)], {o.name: o.default for o in self.options})

    def call_signature(self) -> inspect.Signature:
        return _signature(["self", *self.call], {})

    def apply_signature(self) -> inspect.Signature:
        defaults = {**{o.name: o.default for o in self.options}, **self.apply_defaults}
        return _signature(list(self.apply), defaults)


def _signature(names: list[str], defaults: Mapping[str, Any]) -> inspect.Signature:
    def default(name: str) -> Any:
        if name in defaults:
            return defaults[name]
        return REQUIRED if name in _TENSORS or name == "self" else None

    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    return inspect.Signature([inspect.Parameter(n, kind, default=default(n)) for n in names])


def _signed(fn: Callable[..., Any], signature: inspect.Signature, owner: type) -> Any:
    """``fn``, a method of ``owner`` taking ``*args, **kwargs``, shown with ``signature``."""
    f: Any = fn
    f.__signature__ = signature
    f.__qualname__ = f"{owner.__qualname__}.{fn.__name__}"
    return f


def _bind(name: str, signature: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as err:
        raise TypeError(f"{name}(): {err}") from None
    bound.apply_defaults()
    return dict(bound.arguments)


_PAIRED = ("chosen_logps", "rejected_logps", "chosen_logits_mean", "rejected_logits_mean", "nll_loss")
_REWARDS = ("chosen_rewards", "rejected_rewards")
_HEAD = (Option("ignore_index", -100), Option("beta", 0.1, to="beta"))  # every class starts so
_REF = ("ref_input", "ref_weight", "ref_bias")

#: Liger-Kernel 0.8's chunked preference losses, by ``short`` name.
SPECS: dict[str, LigerSpec] = {
    s.short: s
    for s in (
        LigerSpec(
            "DPO",
            "dpo_loss",
            None,
            options=(
                *_HEAD,
                Option("alpha", 1.0),
                Option("compute_nll_loss", False),
                Option("compiled", True),
                Option("use_ref_model", True),
                Option("average_log_prob", False),
                Option("chunk_size", 1),
                Option("loss_type", "sigmoid"),
                # Liger's sigmoid and the others ignore label_smoothing
                Option("label_smoothing", 0.0, to="label_smoothing", only=("exo_pair", "robust")),
                Option("discopop_tau", 0.05, to="discopop_tau", only=("discopop",)),
            ),
            call=("lin_weight", "_input", "target", "bias", *_REF),
            apply=(
                *("_input", "weight", "target", "bias", *_REF, "ignore_index", "beta", "compute_nll_loss"),
                *("compiled", "use_ref_model", "average_log_prob", "chunk_size", "loss_type", "label_smoothing"),
                *("discopop_tau", "alpha"),
            ),
            outputs=_PAIRED + _REWARDS,
        ),
        LigerSpec(
            "ORPO",
            "orpo_loss",
            "orpo",
            options=(*_HEAD, Option("compute_nll_loss", True), Option("compiled", True), Option("chunk_size", 1)),
            call=("lin_weight", "_input", "target", "bias", "nll_target"),
            apply=(
                *("_input", "weight", "target", "bias", "ignore_index", "beta", "compute_nll_loss", "nll_target"),
                *("compiled", "chunk_size"),
            ),
            outputs=_PAIRED + _REWARDS + ("log_odds_ratio", "log_odds_chosen"),
        ),
        LigerSpec(
            "CPO",
            "cpo_loss",
            "cpo",
            options=(
                *_HEAD,
                Option("alpha", 1.0),  # Liger's NLL weight, not the registry's `alpha`
                Option("label_smoothing", 0.0, to="label_smoothing"),
                Option("compute_nll_loss", True),
                Option("compiled", True),
                Option("average_log_prob", False),
                Option("chunk_size", 1),
            ),
            call=("lin_weight", "_input", "target", "bias"),
            apply=(
                *("_input", "weight", "target", "bias", "ignore_index", "beta", "alpha", "label_smoothing"),
                *("compute_nll_loss", "compiled", "average_log_prob", "chunk_size"),
            ),
            outputs=_PAIRED + _REWARDS,
            fixed={"cpo_alpha": 0.0, "cpo_loss_type": "sigmoid"},  # the NLL is added with Liger's `alpha`
        ),
        LigerSpec(
            "SimPO",
            "simpo_loss",
            "simpo",
            options=(
                *_HEAD,
                Option("alpha", 1.0),
                Option("label_smoothing", 0.0, to="label_smoothing"),
                Option("compute_nll_loss", True),
                Option("compiled", True),
                Option("gamma", 0.5, to="gamma"),
                Option("chunk_size", 1),
            ),
            call=("lin_weight", "_input", "target", "bias"),
            apply=(
                *("_input", "weight", "target", "bias", "ignore_index", "beta", "alpha", "label_smoothing"),
                *("compute_nll_loss", "compiled", "gamma", "chunk_size"),
            ),
            outputs=_PAIRED + _REWARDS,
            apply_defaults={"compute_nll_loss": False},
        ),
        LigerSpec(
            "KTO",
            "kto_loss",
            "kto",
            options=(
                *_HEAD,
                Option("compiled", True),
                Option("use_ref_model", False),
                Option("average_log_prob", False),
                Option("chunk_size", 1),
            ),
            call=("_input", "lin_weight", "target", "bias", "preference_labels", *_REF, "kl"),
            apply=(
                *("_input", "weight", "target", "preference_labels", "bias", *_REF, "kl", "ignore_index", "beta"),
                *("compiled", "use_ref_model", "average_log_prob", "chunk_size"),
            ),
            outputs=(
                *("chosen_logps_sum", "rejected_logps_sum", "chosen_logits_sum", "rejected_logits_sum"),
                *("chosen_rewards_sum", "rejected_rewards_sum"),
            ),
            apply_defaults={"preference_labels": REQUIRED, "use_ref_model": True},
        ),
    )
}


class LigerFunction:
    """Base of the ``LigerFusedLinear*Function`` classes: ``apply`` takes the row's ``apply`` arguments
    and returns ``(loss, aux)``. A plain class (Liger's are autograd Functions): the loss carries the
    gradient itself. Subclasses name the row, the ``step`` and an optional ``check``."""

    spec: ClassVar[LigerSpec]
    _step: ClassVar[Step]
    _check: ClassVar[Check | None]
    apply: ClassVar[Callable[..., tuple[Tensor, tuple[Tensor, ...]]]]

    def __init_subclass__(
        cls, *, spec: LigerSpec | None = None, step: Step | None = None, check: Check | None = None, **kwargs: Any
    ) -> None:
        super().__init_subclass__(**kwargs)
        if spec is None or step is None:  # a user's subclass of one of ours: inherits it all
            return
        cls.spec = spec
        cls._step = staticmethod(step)
        cls._check = None if check is None else staticmethod(check)
        signature = spec.apply_signature()

        def apply(*args: Any, **kwargs: Any) -> tuple[Tensor, tuple[Tensor, ...]]:
            return cls.run(spec.loss_class, _bind(f"{cls.__qualname__}.apply", signature, args, kwargs))

        cls.apply = staticmethod(_signed(apply, signature, cls))  # static: `Cls.apply` is one object

    @classmethod
    def validate(cls, owner: str, values: Mapping[str, Any]) -> dict[str, Any]:
        """Refuse, naming ``owner`` and the option, what Liger would not take or the registry loss cannot;
        returns the registry hyperparameters."""
        args = CallArgs(**values)
        bools = {o.name: values[o.name] for o in cls.spec.options if isinstance(o.default, bool)}
        check_options(owner, ignore_index=args.ignore_index, chunk_size=args.chunk_size, bools=bools)
        if cls._check is not None:
            cls._check(owner, args)
        hp = cls.spec.hparams(args)
        check_registry_hparams(owner, cls.spec.registry_loss(args), **hp)
        return hp

    @classmethod
    def run(cls, owner: str, values: Mapping[str, Any]) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Validate and compute; ``values`` holds every ``apply`` argument by name."""
        hp = cls.validate(owner, values)
        loss, aux = cls._step(owner, CallArgs(**values), hp)
        assert len(aux) == len(cls.spec.outputs), (cls.spec.outputs, len(aux))
        return loss, aux


class LigerLoss(nn.Module):
    """Base of the ``LigerFusedLinear*Loss`` modules: the constructor takes the row's options (kept as
    attributes, read at each call), ``forward`` the row's call arguments; both as Liger's. Subclasses
    name their ``function``."""

    function: ClassVar[type[LigerFunction]]

    def __init_subclass__(cls, *, function: type[LigerFunction] | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if function is None:  # a user's subclass of one of ours: inherits it all
            return
        cls.function = function
        spec = function.spec
        init_signature, call_signature = spec.init_signature(), spec.call_signature()

        def __init__(self: LigerLoss, *args: Any, **kwargs: Any) -> None:
            super(cls, self).__init__()
            options = _bind(f"{type(self).__qualname__}.__init__", init_signature, (self, *args), kwargs)
            del options["self"]
            function.validate(type(self).__name__, options)
            for name, value in options.items():
                setattr(self, name, value)

        def forward(self: LigerLoss, *args: Any, **kwargs: Any) -> tuple[Tensor, tuple[Tensor, ...]]:
            values = {o.name: getattr(self, o.name) for o in spec.options}
            for name, value in _bind(
                f"{type(self).__qualname__}.forward", call_signature, (self, *args), kwargs
            ).items():
                if name != "self":
                    values["weight" if name == "lin_weight" else name] = value
            return function.run(spec.loss_class, values)

        cls.__init__ = _signed(__init__, init_signature, cls)  # type: ignore[method-assign]
        cls.forward = _signed(forward, call_signature, cls)  # type: ignore[method-assign]
