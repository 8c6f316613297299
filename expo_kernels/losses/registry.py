"""Registry of the sequence-level preference losses.

Every loss is a plain function ``fn(batch, hp) -> LossTerms`` on per-sequence numbers (see
:class:`~expo_kernels.losses._common.PreferenceBatch`). It is registered under a name together with
a :class:`LossSpec` that says which hyperparameters it takes (with defaults and range checks), whether
it needs the reference model's log-probs, the completion lengths or an NLL term, and whether its
per-pair values are separable (``reduction="none"`` allowed).

Adding a loss::

    @register_loss(
        "my_loss",
        hparams=[HParam("beta", 0.1, "inverse temperature", check=positive)],
        reference="required",
        description="-log sigma(beta * margin) with my twist",
    )
    def _my_loss(batch, hp):
        ...
        return LossTerms(terms=per_pair, metrics=lambda: {...})
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "REQUIRED",
    "HParam",
    "LossSpec",
    "LOSSES",
    "register_loss",
    "get_loss_spec",
    "positive",
    "non_negative",
    "unit_interval",
    "one_of",
    "real",
    "HParamTypeError",
    "is_bool",
    "as_real",
    "describe",
]


class HParamTypeError(TypeError, ValueError):
    """A hyperparameter (or option) of the wrong type, e.g. ``beta="0.1"``.

    A TypeError, and a ValueError too: the loss layer raised ValueError for every bad hyperparameter
    before, so callers catching that keep working.
    """


class _Required:
    """Sentinel default of a hyperparameter that has no default and must be passed."""

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return "REQUIRED"


REQUIRED: Any = _Required()


def checks_values() -> bool:
    """Whether the checks on tensor *values* (a finite loss, finite rewards, ...) run: each reads a flag
    on the host (a device sync), which ``torch.compile`` could only trace by breaking its graph
    (``fullgraph=True``: an error). Under ``torch.compile`` they are skipped; the argument checks
    (types, shapes, hyperparameters) run at trace time, and the fused ops check labels and finiteness
    inside their registered op at run time."""
    import torch

    return not torch.compiler.is_compiling()


# --------------------------------------------------------------------------------------------------
# Range checks. Each returns None when the value is valid, else the text "expected ..." used in the
# ValueError raised by the spec.
# --------------------------------------------------------------------------------------------------
def is_bool(value: Any) -> bool:
    """A Python or NumPy bool (NumPy names the type ``bool_`` before 2.0, ``bool`` since), without importing NumPy."""
    return isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"))


def as_real(value: Any) -> float | None:
    """``value`` as a float when it is a real number, else None.

    Accepted: int / float (not bool), numpy real scalars and 0-dim real tensors. Strings are refused:
    ``float("0.1")`` would accept them, and a string reaching the math fails far from its cause.
    """
    if is_bool(value):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    try:  # torch is optional here: the registry has no hard dependency on it
        import torch
    except ImportError:  # pragma: no cover
        return None
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_complex() and value.dtype != torch.bool:
        return float(value.item())
    return None


def describe(value: Any) -> str:
    """``str '0.1'``, ``float nan``: a value with its type, for error messages."""
    return f"{type(value).__name__} {value!r}"


def _expects(kind: str, fn: Callable) -> Callable:
    """Marks ``fn`` as a check of values of type ``kind`` ("number" or "str"): a value of another type is
    a type error (HParamTypeError). A function attribute, read by ``HParam._wrong_type``."""
    fn.__dict__["expects"] = kind  # the same as `fn.expects = kind`, which mypy refuses on a Callable
    return fn


def _number_check(fn: Callable) -> Callable:
    return _expects("number", fn)


@_number_check
def real(value: Any) -> str | None:
    """Any finite real number."""
    v = as_real(value)
    if v is None or not math.isfinite(v):
        return "a finite real number"
    return None


@_number_check
def positive(value: Any) -> str | None:
    """A finite number > 0."""
    v = as_real(value)
    if v is None or not math.isfinite(v) or v <= 0:
        return "a finite number > 0"
    return None


@_number_check
def non_negative(value: Any) -> str | None:
    """A finite number >= 0."""
    v = as_real(value)
    if v is None or not math.isfinite(v) or v < 0:
        return "a finite number >= 0"
    return None


def unit_interval(low: float, high: float, *, low_open: bool = False) -> Callable:
    """A number in a half-open interval, e.g. ``unit_interval(0, 0.5)`` is ``[0, 0.5)``, ``low_open=True``
    ``(0, 0.5)``."""
    text = f"{'(' if low_open else '['}{low:g}, {high:g})"

    def check(value: Any) -> str | None:
        v = as_real(value)
        if v is None or not math.isfinite(v) or v < low or (low_open and v == low) or v >= high:
            return f"a number in {text}"
        return None

    return _number_check(check)


def one_of(*choices: str) -> Callable:
    """One of the given strings."""

    def check(value: Any) -> str | None:
        # isinstance first: `tensor in choices` would compare element-wise
        if not isinstance(value, str) or value not in choices:
            return f"one of {list(choices)}"
        return None

    return _expects("str", check)


@dataclass(frozen=True)
class HParam:
    """One hyperparameter of a loss: name, default (``REQUIRED`` if none), meaning and range check."""

    name: str
    default: Any
    doc: str
    check: Callable[[Any], str | None] | None = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def validate(self, loss_name: str, value: Any) -> Any:
        if self.check is not None:
            expected = self.check(value)
            if expected is not None:
                exc = HParamTypeError if self._wrong_type(value) else ValueError
                raise exc(
                    f"Loss {loss_name!r}: hyperparameter `{self.name}` must be {expected}; got {describe(value)}."
                )
        # numbers are normalised to float (numpy scalars included); strings and tensors are kept as given
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
        return value

    def _wrong_type(self, value: Any) -> bool:
        """Whether a refused value has the wrong type (vs. the right type out of range). The check
        says what it expects; a custom check without ``expects`` is read from the default's type."""
        expects = getattr(self.check, "expects", None)
        wants_str = isinstance(self.default, str) if expects is None else expects == "str"
        if wants_str:
            return not isinstance(value, str)
        return as_real(value) is None


@dataclass(frozen=True)
class LossSpec:
    """What the registry knows about one loss.

    Attributes:
        name: registry name (TRL's ``loss_type`` where one exists).
        fn: ``fn(batch: PreferenceBatch, hp: dict) -> LossTerms``.
        hparams: the hyperparameters it accepts, by name, with defaults and range checks.
        reference: ``"required"`` (needs ``ref_chosen_logps``/``ref_rejected_logps``), ``"optional"``
            (needed only under some hyperparameters, e.g. EXPO's KL estimators) or ``"none"``.
        needs_lengths: needs ``chosen_lengths``/``rejected_lengths`` (length-normalised loss) under its
            default hyperparameters.
        needs_nll: adds an NLL term on the chosen completion (needs ``chosen_lengths`` or ``chosen_nll``).
        paired: False for unpaired losses (KTO-style) that take ``policy_logps``/``is_desirable``.
        batch_coupled: True when a per-pair value depends on the rest of the batch (sorting, batch
            statistics), so ``reduction="none"`` is refused.
        description: one line.
        aliases: other accepted spellings of hyperparameter names (alias -> canonical name).
    """

    name: str
    fn: Callable
    hparams: Mapping[str, HParam]
    reference: str = "required"
    needs_lengths: bool = False
    needs_nll: bool = False
    paired: bool = True
    batch_coupled: bool = False
    description: str = ""
    aliases: Mapping[str, str] = field(default_factory=dict)

    @property
    def requires_reference(self) -> bool:
        return self.reference == "required"

    @property
    def defaults(self) -> dict[str, Any]:
        """The default value of each hyperparameter (``REQUIRED`` where there is none)."""
        return {k: h.default for k, h in self.hparams.items()}

    def canonical(self, key: str) -> str | None:
        if key in self.hparams:
            return key
        return self.aliases.get(key)

    def resolve(self, hparams: Mapping[str, Any]) -> dict[str, Any]:
        """Fill defaults, map aliases, validate ranges. Keys this loss does not know are ignored here
        (the caller checks that each passed key is known to at least one loss)."""
        out: dict[str, Any] = {}
        for key, value in hparams.items():
            canon = self.canonical(key)
            if canon is None:
                continue
            if canon in out:
                raise ValueError(
                    f"Loss {self.name!r}: hyperparameter `{canon}` given twice (as `{canon}` and an alias)."
                )
            out[canon] = value
        for name, h in self.hparams.items():
            if name not in out:
                if h.required:
                    raise ValueError(
                        f"Loss {self.name!r}: hyperparameter `{name}` is required ({h.doc}); it has no default."
                    )
                out[name] = h.default
            out[name] = h.validate(self.name, out[name])
        return out

    def __repr__(self) -> str:
        hp = ", ".join(f"{k}={h.default!r}" for k, h in self.hparams.items())
        return f"LossSpec({self.name!r}, reference={self.reference!r}, hparams=({hp}))"


LOSSES: dict[str, LossSpec] = {}


def register_loss(
    name: str,
    *,
    hparams: Sequence[HParam] = (),
    reference: str = "required",
    needs_lengths: bool = False,
    needs_nll: bool = False,
    paired: bool = True,
    batch_coupled: bool = False,
    description: str = "",
    aliases: Mapping[str, str] | None = None,
) -> Callable:
    """Decorator registering ``fn(batch, hp) -> LossTerms`` in :data:`LOSSES` under ``name``."""
    if reference not in ("required", "optional", "none"):
        raise ValueError(f"reference must be 'required', 'optional' or 'none', got {reference!r}")

    def deco(fn: Callable) -> Callable:
        if name in LOSSES:
            raise ValueError(f"A loss named {name!r} is already registered.")
        LOSSES[name] = LossSpec(
            name=name,
            fn=fn,
            hparams={h.name: h for h in hparams},
            reference=reference,
            needs_lengths=needs_lengths,
            needs_nll=needs_nll,
            paired=paired,
            batch_coupled=batch_coupled,
            description=description,
            aliases=dict(aliases or {}),
        )
        return fn

    return deco


def get_loss_spec(name: str) -> LossSpec:
    """The spec registered under ``name``; unknown names raise ValueError naming the closest ones."""
    if not isinstance(name, str):
        raise HParamTypeError(f"A loss name must be a string, got {type(name).__name__}: {name!r}.")
    try:
        return LOSSES[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(LOSSES), cutoff=0.5)  # at most 3 (the default n)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"Unknown preference loss {name!r}.{hint} Known losses: {sorted(LOSSES)}.") from None


def loss_names(name: Any) -> tuple[str, ...]:
    if isinstance(name, str):
        return (name,)
    if isinstance(name, (list, tuple)) and len(name) > 0 and all(isinstance(n, str) for n in name):
        return tuple(name)
    raise HParamTypeError(
        f"`name` must be a loss name or a non-empty list of loss names (MPO-style mix); got {describe(name)}."
    )
