"""Triton backend: the fused LM head + log-softmax + gather and the fused two-head token KL, with their
backwards -- the module ``_dispatch.backend_module("triton")`` returns (the ``Backend`` contract of
``ops``).

The kernels and their launchers live by family in ``ops/triton/`` (``logprobs.py``, ``token_kl.py``;
tile configs in ``configs.py``, shared ``@triton.jit`` helpers in ``jit.py``); this module is their public
face: the four backend functions, and the tile configuration a caller may pass as ``config=``.
"""

from __future__ import annotations

from .triton.configs import TileConfig, select_config
from .triton.logprobs import backward, forward_partial
from .triton.token_kl import token_kl_backward, token_kl_forward_partial

__all__ = [
    "forward_partial",
    "backward",
    "token_kl_forward_partial",
    "token_kl_backward",
    "TileConfig",
    "select_config",
]
