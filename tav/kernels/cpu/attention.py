"""Fused CPU attention (kernels/cpu/attention.cc) as MindSpore AOT Custom ops: forward and backward, fp32.

Why: on CPU, math_attention is BatchMatMul + softmax + BatchMatMul. It writes the (B*H, Nq, Nk) score tensor,
reads it back for the softmax, writes the probabilities and reads them again for the product with v; for the
UNet's small head dims (D = 8 in the `small` bench config) that memory traffic, not arithmetic, is the cost, and
softmax + BatchMatMul are about half of a sampling step. chunked_attention bounds the tensor but still makes the
round trips. The native kernel keeps one block of scores in L1 and never stores probabilities.

How: q (B, Nq, H*D) and k, v (B, Nk, H*D) are reshaped (no copy, no transpose) to (B, N, H, D) and the kernel
reads each head's rows in place with a stride of H*D floats; the output comes back in the same layout. The head
count travels in the 4-D shape and the scale as a 1-element fp32 input tensor, so one compiled library serves
every layer and the graph stays static.
  forward: flash attention with an online softmax. Work items (batch*head, 16 queries) under `omp parallel for`;
    the 16 queries are the lanes of one vector, so the running max and sum are lane-wise. Per block of keys:
    scores (k broadcast, 4 keys at a time), max, one rescale of the accumulator, p = 2^(s - m) by a Cephes-style
    polynomial (~2 ulp; q pre-scaled by scale*log2 e), then o^T += v^T p.
  backward: the flash attention backward, parallel over batch*head (dK, dV and dQ of a head belong to one
    thread: no races). NativeAttention's bprop only sees q, k, v, out and dout, so the row log-sum-exp is
    recomputed by a statistics-only forward pass; then per 16-key block x 16-query tile: p = 2^(s - lse),
    dP = dO V^T, dS = p (dP - rowsum(dO O)), dV += P^T dO, dK += scale dS^T Q, dQ += scale dS K.
  NativeAttentionWithLse keeps the forward's log-sum-exp instead (the Custom op's own bprop receives it) and
  skips that pass: 10-25% faster forward+backward.

Speed against chunked/math and PyTorch's SDPA: docs/kernels.md.

Only float32 (callers check native_attention_supported first). Importing this module compiles nothing: the
library is built (once per machine, kernels/cpu/build.py) when the first op is created -- in a Cell's __init__, or at
graph compile time for native_attention() (through ops.constexpr: a graph cannot run the compiler itself).
"""
import mindspore as ms
from mindspore import ops

from . import build
from .aot import KernelFunction, custom_op

LIBRARY = "attention"

_ops = {}


def native_attention_supported(dtype, q_shape, k_shape, num_heads):
    """None when the native kernel can run attention on these operands, else the reason it cannot."""
    if dtype != ms.float32:
        return f"native attention is float32 only (got {dtype})"
    if len(q_shape) != 3 or len(k_shape) != 3:
        return f"native attention expects 3-D (B, N, H*D) operands; got q {tuple(q_shape)}, k {tuple(k_shape)}"
    if q_shape[0] != k_shape[0] or q_shape[2] != k_shape[2]:
        return f"q {tuple(q_shape)} and k {tuple(k_shape)} differ in batch or H*D"
    if num_heads < 1 or q_shape[2] % num_heads or q_shape[2] == 0:
        return f"num_heads={num_heads} does not divide the hidden size {q_shape[2]}"
    if k_shape[1] < 1:
        return "native attention needs at least one key"
    return build.unavailable_reason(LIBRARY)


def _attention_op(symbol):
    """The ops.Custom for one entry point of attention.cc, created once per process (builds the library)."""
    if symbol in _ops:
        return _ops[symbol]
    f32 = ms.float32
    if symbol == "attention_forward":
        op = custom_op(LIBRARY, symbol, lambda q, k, v, s: q, f32)
    elif symbol == "attention_backward":
        op = custom_op(LIBRARY, symbol, lambda q, k, v, o, g, s: (q, k, v), (f32, f32, f32))
    elif symbol == "attention_backward_lse":
        op = custom_op(LIBRARY, symbol, lambda q, k, v, o, g, s, lse: (q, k, v), (f32, f32, f32))
    else:
        raise ValueError(symbol)
    _ops[symbol] = op
    return op


def _heads(x, num_heads):
    b, n, inner = x.shape
    return x.reshape(b, n, num_heads, inner // num_heads)


def _merged(x):
    b, n, h, d = x.shape
    return x.reshape(b, n, h * d)


def _scale_tensor(q, num_heads, scale):
    if scale is None:
        scale = (q.shape[-1] // num_heads) ** -0.5
    return ms.Tensor([scale], ms.float32)


class NativeAttention(KernelFunction):
    """softmax(scale q k^T) v per head by the native kernel, with a native backward (bprop below).

    construct(q, k, v): q (B, Nq, H*D), k/v (B, Nk, H*D), float32 -> (B, Nq, H*D). `scale` defaults to D^-0.5.
    """

    def __init__(self, num_heads, scale=None):
        super().__init__()
        self.num_heads = num_heads
        self.scale = scale
        self.forward_op = _attention_op("attention_forward")
        self.backward_op = _attention_op("attention_backward")

    def construct(self, q, k, v):
        h = self.num_heads
        out = self.forward_op(_heads(q, h), _heads(k, h), _heads(v, h), _scale_tensor(q, h, self.scale))
        return _merged(out)

    def bprop(self, q, k, v, out, dout):
        h = self.num_heads
        dq, dk, dv = self.backward_op(_heads(q, h), _heads(k, h), _heads(v, h), _heads(out, h), _heads(dout, h),
                                      _scale_tensor(q, h, self.scale))
        return _merged(dq), _merged(dk), _merged(dv)


class NativeAttentionWithLse(KernelFunction):
    """Same as NativeAttention, but the forward keeps the row log-sum-exp for the backward instead of the backward
    recomputing it: the gradient comes from the Custom op's own bprop (autodiff sees out and lse as outputs)."""

    def __init__(self, num_heads, scale=None):
        super().__init__()
        self.num_heads = num_heads
        self.scale = scale
        backward_op = _attention_op("attention_backward_lse")

        def bprop(q, k, v, s, out, dout):
            # out = (attention, lse); dout[1] is zero: construct never lets the lse reach the loss.
            dq, dk, dv = backward_op(q, k, v, out[0], dout[0], s, out[1])
            return dq, dk, dv, ops.zeros_like(s)

        self.forward_op = custom_op(LIBRARY, "attention_forward_lse",
                                           lambda q, k, v, s: (q, [q[0], q[2], q[1]]), (ms.float32, ms.float32),
                                           bprop=bprop)

    def construct(self, q, k, v):
        h = self.num_heads
        out, _ = self.forward_op(_heads(q, h), _heads(k, h), _heads(v, h), _scale_tensor(q, h, self.scale))
        return _merged(out)


@ops.constexpr
def _forward_op():
    # Runs in Python at graph compile time, so the library is built then (a graph cannot run build.library).
    return _attention_op("attention_forward")


def native_attention(q, k, v, num_heads, scale=None):
    """Forward only: softmax(scale q k^T) v per head, q (B, Nq, H*D), k/v (B, Nk, H*D) float32 -> (B, Nq, H*D)."""
    out = _forward_op()(_heads(q, num_heads), _heads(k, num_heads), _heads(v, num_heads),
                        _scale_tensor(q, num_heads, scale))
    return _merged(out)
