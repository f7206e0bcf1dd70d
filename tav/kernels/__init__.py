"""tav's kernels, by role.

    attention_backends/  attention backends (math, chunked, flash, native) and their dispatch: attention(),
                         resolve_backend, ATTENTION_BACKENDS (the one list of backend names), AttentionKernel.
                         Not `attention/`: `tav.kernels.attention` is the function, which would shadow it.
    cpu/                 the native CPU kernel library: its build, the AOT-op calling convention and one Python
                         wrapper per C++ source (conv, linear, norms, layout, attention, optim)

The names below are the public surface (`from tav.kernels import attention, ATTENTION_BACKENDS, ...`).
"""
from .attention_backends import (
    ATTENTION_BACKENDS,
    SCORE_BLOCK_ELEMENTS,
    AttentionKernel,
    BlockedAttention,
    attention,
    block_plan,
    check_attention_shapes,
    chunked_attention,
    default_chunk_size,
    flash_attention,
    flash_unsupported_reason,
    math_attention,
    pad_head_dim,
    padded_head_dim,
    resolve_backend,
    unpad_head_dim,
)

__all__ = [
    "ATTENTION_BACKENDS",
    "AttentionKernel",
    "BlockedAttention",
    "SCORE_BLOCK_ELEMENTS",
    "attention",
    "block_plan",
    "check_attention_shapes",
    "chunked_attention",
    "default_chunk_size",
    "flash_attention",
    "flash_unsupported_reason",
    "math_attention",
    "pad_head_dim",
    "padded_head_dim",
    "resolve_backend",
    "unpad_head_dim",
]
