"""Kernels on plain tensors: compacted tokens in, per-token results out.

Every backend module exposes the same two functions (see ``torch_backend`` for the
readable specification):

* ``forward(hidden [N, H], weight [V, H], bias [V] | None, labels [N], transform, with_stats)``
  -> ``TokenOutputs`` of ``[N]`` tensors (float32; float64 for float64 inputs);
* ``backward(grad_logp [N], hidden, weight, bias, labels, lse [N], transform, need_hidden,
  need_weight, need_bias)`` -> ``(d_hidden | None, d_weight | None, d_bias | None)``.

The tokens are already compacted (no ``ignore_index`` rows) and labels are in ``[0, V)``.
"""
from .common import LogitTransform, TokenOutputs

__all__ = ["LogitTransform", "TokenOutputs"]
