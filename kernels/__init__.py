"""Attention kernels and their dispatch (installed as tav.kernels).

attention(q, k, v, num_heads, backend="auto", upcast=False) -> (B, Nq, H*D)
q: (B, Nq, H*D), k/v: (B, Nk, H*D); softmax(q k^T / sqrt(D)) v per head, heads split batch-major/head-minor.
"""
import mindspore as ms
from mindspore import ops


def attention(q, k, v, num_heads, backend="auto", upcast=False):
    b, nq, inner = q.shape
    nk = k.shape[1]
    head_dim = inner // num_heads
    scale = head_dim**-0.5
    qh = q.reshape(b, nq, num_heads, head_dim).transpose(0, 2, 1, 3)
    kh = k.reshape(b, nk, num_heads, head_dim).transpose(0, 2, 3, 1)
    vh = v.reshape(b, nk, num_heads, head_dim).transpose(0, 2, 1, 3)
    if upcast:
        qh = qh.astype(ms.float32)
        kh = kh.astype(ms.float32)
    scores = ops.matmul(qh * scale, kh)
    probs = ops.softmax(scores, -1).astype(vh.dtype)
    out = ops.matmul(probs, vh)
    return out.transpose(0, 2, 1, 3).reshape(b, nq, inner)
