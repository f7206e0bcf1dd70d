"""Attention, organised by op: one module per backend and the dispatch that picks among them.

attention(q, k, v, num_heads, backend="auto", upcast=False, chunk_size=None) -> (B, Nq, H*D)
q: (B, Nq, H*D), k/v: (B, Nk, H*D); softmax(q k^T / sqrt(D)) v per head, heads split batch-major/head-minor.

    math.py      matmul + softmax, exact, runs everywhere (the reference)
    chunked.py   math in blocks of query rows, bounded memory, with a recomputing backward
    flash.py     Ascend ops.flash_attention_score, head dim zero-padded to what it accepts
    native.py    the fused CPU kernel (kernels/cpu/attention.cc)
    dispatch.py  the registry of backends with their device and dtype/shape constraints; resolve_backend tells
                 which one a call will use, attention()/AttentionKernel run it
"""
from .chunked import SCORE_BLOCK_ELEMENTS, BlockedAttention, block_plan, chunked_attention, default_chunk_size
from .dispatch import (ATTENTION_BACKENDS, BACKENDS, AttentionBackend, AttentionKernel, attention,
                       check_attention_shapes, resolve_backend)
from .flash import flash_attention, flash_unsupported_reason, pad_head_dim, padded_head_dim, unpad_head_dim
from .math import math_attention

__all__ = [
    "ATTENTION_BACKENDS",
    "AttentionBackend",
    "AttentionKernel",
    "BACKENDS",
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
