"""Attention kernels and their dispatch (installed as tav.kernels).

attention(q, k, v, num_heads, backend="auto", upcast=False, chunk_size=None) -> (B, Nq, H*D)
q: (B, Nq, H*D), k/v: (B, Nk, H*D); softmax(q k^T / sqrt(D)) v per head, heads split batch-major/head-minor.

Backends: math (matmul + softmax, exact, runs everywhere), chunked (math in blocks of query rows, bounded memory),
flash (Ascend ops.flash_attention_score, head dim zero-padded to what it accepts), auto (flash on Ascend when
its documented limits hold; on CPU chunked for large score tensors; math elsewhere). resolve_backend tells which
one a call will use.
"""
from .chunked import SCORE_BLOCK_ELEMENTS, BlockedAttention, block_plan, chunked_attention, default_chunk_size
from .dispatch import ATTENTION_BACKENDS, AttentionKernel, attention, check_attention_shapes, resolve_backend
from .flash import flash_attention, flash_unsupported_reason, pad_head_dim, padded_head_dim, unpad_head_dim
from .math_attention import math_attention

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
