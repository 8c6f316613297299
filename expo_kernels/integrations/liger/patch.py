"""``patch()`` / ``unpatch()``: swap our classes into ``liger_kernel.chunked_loss`` so code written
against Liger runs on expo_kernels without edits.

Replaced, for DPO, ORPO, CPO, SimPO and KTO: the ``LigerFusedLinear*Loss`` names in
``liger_kernel.chunked_loss`` and in their defining modules (``liger_kernel.chunked_loss.dpo_loss``,
...), the ``LigerFusedLinear*Function`` names there, and the ``liger_fused_linear_*`` aliases of
``liger_kernel.chunked_loss.functional``. Code that looks a name up after ``patch()`` gets ours; a
name bound earlier (``from liger_kernel.chunked_loss import X`` run before ``patch()``) keeps Liger's,
so call ``patch()`` first. Needs ``liger_kernel`` (``pip install expo_kernels[liger]``).
"""

from __future__ import annotations

import importlib
from typing import Any

from . import cpo_orpo_simpo, dpo, kto
from .base import SPECS

__all__ = ["patch", "unpatch", "is_patched"]

_FAMILIES = (dpo, cpo_orpo_simpo, kto)
_saved: dict[tuple[str, str], Any] = {}


def _ours(name: str) -> Any:
    return next(getattr(module, name) for module in _FAMILIES if hasattr(module, name))


def _targets():
    """``(liger module, attribute, our object)`` for every name ``patch`` replaces."""
    try:
        pkg = importlib.import_module("liger_kernel.chunked_loss")
    except ImportError as err:
        raise ImportError(
            "expo_kernels.integrations.liger.patch() needs liger-kernel: pip install 'expo_kernels[liger]'. "
            "(The Liger-compatible classes themselves do not: import them from expo_kernels.integrations.liger.)"
        ) from err
    functional = importlib.import_module("liger_kernel.chunked_loss.functional")
    out = []
    for spec in SPECS.values():
        mod = importlib.import_module(f"liger_kernel.chunked_loss.{spec.liger_module}")
        loss_cls, fn_cls = _ours(spec.loss_class), _ours(spec.function_class)
        out += [
            (pkg, spec.loss_class, loss_cls),
            (mod, spec.loss_class, loss_cls),
            (mod, spec.function_class, fn_cls),
            (functional, spec.functional, fn_cls.apply),
        ]
    return out


def patch() -> None:
    """Route Liger's DPO/ORPO/CPO/SimPO/KTO chunked losses to expo_kernels (idempotent)."""
    for mod, name, ours in _targets():
        key = (mod.__name__, name)
        if key not in _saved:
            _saved[key] = getattr(mod, name)
        setattr(mod, name, ours)


def unpatch() -> None:
    """Restore Liger's own classes (a no-op when not patched)."""
    for (mod_name, name), original in list(_saved.items()):
        setattr(importlib.import_module(mod_name), name, original)
        del _saved[(mod_name, name)]


def is_patched() -> bool:
    """Whether :func:`patch` is in effect."""
    return bool(_saved)
