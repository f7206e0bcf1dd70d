"""Exact softmax attention from matmul + softmax: the reference every other backend is measured against.

Semantics are diffusers 0.11 `CrossAttention` (reference doc §1.11): heads split batch-major/head-minor, scores
scaled by D^-0.5, softmax over keys, probabilities cast to v's dtype before the product with v. Built only from
ops with CPU kernels (ops.matmul, ops.softmax; see mindspore-cpu.md) so it runs on every device.
"""
import mindspore as ms
from mindspore import ops


def split_heads(x, num_heads):
    """(B, N, H*D) -> (B, H, N, D): the batch-major, head-minor order of diffusers' head_to_batch_dim."""
    b, n, inner = x.shape
    return x.reshape(b, n, num_heads, inner // num_heads).transpose(0, 2, 1, 3)


def merge_heads(x):
    """(B, H, N, D) -> (B, N, H*D), the inverse of split_heads."""
    b, h, n, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, n, h * d)


def math_attention(q, k, v, num_heads, upcast=False, scale=None):
    """softmax(scale * q k^T) v per head. q (B, Nq, H*D), k/v (B, Nk, H*D) -> (B, Nq, H*D) in q's dtype.

    `scale` defaults to D^-0.5 of the tensors given; the flash path's zero-padding tests pass the unpadded D's
    scale here explicitly. `upcast` (SD 2.1 upcast_attention) computes q k^T and the softmax in fp32.
    """
    head_dim = q.shape[-1] // num_heads
    if scale is None:
        scale = head_dim**-0.5
    qh = split_heads(q, num_heads)
    kt = split_heads(k, num_heads).transpose(0, 1, 3, 2)
    vh = split_heads(v, num_heads)
    if upcast:
        qh = qh.astype(ms.float32)
        kt = kt.astype(ms.float32)
    # Scaling q before the product (not the scores after) keeps fp16 scores from overflowing where diffusers'
    # baddbmm(alpha=scale) would not; in fp32 the two orders agree to rounding.
    scores = ops.matmul(qh * scale, kt)
    probs = ops.softmax(scores, -1).astype(vh.dtype)
    out = merge_heads(ops.matmul(probs, vh))
    return out.astype(q.dtype)
