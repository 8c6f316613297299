"""The Triton kernels, one family per module (importing any of them imports ``triton``: only the Triton
paths do, through ``_dispatch``):

* ``logprobs.py``: the fused log-prob forward (online log-softmax, statistics, top-k) and backward;
* ``token_kl.py``: the fused two-head KL forward and backward;
* ``epilogues.py``: the fold and dz kernels on logits a library GEMM wrote (``ops/library_gemm.py``);
* ``configs.py``: the fused kernels' tile configs, per-architecture choices and launch flags;
* ``jit.py``: the shared ``@triton.jit`` helpers, the state buffers' slots, the transform's arguments.

``ops/triton_backend.py`` is the backend the dispatcher registers; it re-exports the launchers.
"""
