"""tav's kernels, by role.

    attention_backends/  attention backends (math, chunked, flash, native) and their dispatch: attention(),
                         resolve_backend, ATTENTION_BACKENDS (the one list of backend names), AttentionKernel.
                         Not `attention/`: `tav.kernels.attention` is the function, which would shadow it.
    cpu/                 the native CPU kernel library: its build, the AOT-op calling convention and one Python
                         wrapper per C++ source (conv, linear, norms, layout, attention, optim)

The names below are the public surface (`from tav.kernels import attention, ATTENTION_BACKENDS, ...`).
"""
from . import attention_backends
from .attention_backends import *  # noqa: F401,F403  (the attention backends' public names, listed there once)

__all__ = list(attention_backends.__all__)
