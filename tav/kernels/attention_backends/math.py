"""Exact softmax attention from matmul + softmax: the reference every other backend is measured against.

Semantics are diffusers 0.11 `CrossAttention`: heads split batch-major/head-minor, scores
scaled by D^-0.5, softmax over keys, probabilities cast to v's dtype before the product with v. Built only from
ops that have CPU, GPU and Ascend kernels in MindSpore 2.10 (ops.BatchMatMul, ops.softmax), so it runs everywhere.
"""
import mindspore as ms
from mindspore import ops

# On (B*H, N, D) operands. transpose_b spares materialising k^T; ops.matmul on 4-D (B, H, N, D) operands would
# also route both through BroadcastTo first.
_scores = ops.BatchMatMul(transpose_b=True)
_weighted_sum = ops.BatchMatMul()


def split_heads(x, num_heads):
    """(B, N, H*D) -> (B, H, N, D): the batch-major, head-minor order of diffusers' head_to_batch_dim."""
    b, n, inner = x.shape
    return x.reshape(b, n, num_heads, inner // num_heads).transpose(0, 2, 1, 3)


def merge_heads(x):
    """(B, H, N, D) -> (B, N, H*D), the inverse of split_heads."""
    b, h, n, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, n, h * d)


def heads_as_batch(x, num_heads):
    """(B, N, H*D) -> (B*H, N, D), rows ordered batch-major, head-minor."""
    b, n, inner = x.shape
    return split_heads(x, num_heads).reshape(b * num_heads, n, inner // num_heads)


def attend(qh, kh, vh, scale, upcast=False):
    """softmax(scale * q k^T) v on (rows, N, D) tensors whose rows are independent attentions."""
    if upcast:
        qh = qh.astype(ms.float32)
        kh = kh.astype(ms.float32)
    # Scaling q before the product (not the scores after) keeps fp16 scores from overflowing where diffusers'
    # baddbmm(alpha=scale) would not; in fp32 the two orders agree to rounding.
    probs = ops.softmax(_scores(qh * scale, kh), -1).astype(vh.dtype)
    return _weighted_sum(probs, vh)


def math_attention(q, k, v, num_heads, upcast=False, scale=None):
    """softmax(scale * q k^T) v per head. q (B, Nq, H*D), k/v (B, Nk, H*D) -> (B, Nq, H*D) in q's dtype.

    `scale` defaults to D^-0.5 of the tensors given; the flash path's zero-padding tests pass the unpadded D's
    scale here explicitly. `upcast` (SD 2.1 upcast_attention) computes q k^T and the softmax in fp32.
    """
    b, nq, inner = q.shape
    head_dim = inner // num_heads
    if scale is None:
        scale = head_dim**-0.5
    out = attend(heads_as_batch(q, num_heads), heads_as_batch(k, num_heads), heads_as_batch(v, num_heads), scale,
                 upcast)
    return merge_heads(out.reshape(b, num_heads, nq, head_dim)).astype(q.dtype)
