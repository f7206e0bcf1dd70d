"""The native CPU norms and GEGLU (kernels/cpu/norms.cc) as Cells with their own backward.

Each Cell wraps a forward and a backward AOT Custom op; its `bprop` calls the backward kernel, which recomputes
what it needs (group/row statistics) from the inputs instead of keeping them from the forward, so the forward
has one output and nothing extra stays alive between the passes. tav/nn.py's layers pick these on CPU
(tav.backend.use_native_kernel("norms")) and their portable MindSpore-op twins elsewhere; tests compare the two.

Measured (2 threads, (16 frames x 64 channels x 32 x 32), 32 groups): GroupNorm 7 ms -> see bench/README.md.
"""
import mindspore as ms
from mindspore import nn, ops

from . import native

LIBRARY = "norms"


def _custom(symbol, out_shape, out_dtype):
    return ops.Custom(native.function(LIBRARY, symbol), out_shape=out_shape, out_dtype=out_dtype, func_type="aot")


def _same(*args):
    return args[0]


def _param_grads_shapes(x, weight, bias, scalars, dy):
    return x, weight, bias


def _param_grads_dtypes(x, weight, bias, scalars, dy):
    return x, weight, bias


class GroupNormFunction(nn.Cell):
    """y = GroupNorm(x) (then SiLU when `fused_silu`) for x ((B F), C, ...) fp32, statistics of each sample b over
    its F frames: the official GroupNorm on (B, C, F, H, W) without the transpose to that layout.

    construct(x, weight, bias, scalars) with scalars = fp32 [eps, frames, groups] (group_norm_scalars)."""

    def __init__(self, fused_silu=False):
        super().__init__()
        suffix = "_silu" if fused_silu else ""
        self.forward_op = _custom(f"group_norm{suffix}_fwd", _same, _same)
        self.backward_op = _custom(f"group_norm{suffix}_bwd", _param_grads_shapes, _param_grads_dtypes)

    def construct(self, x, weight, bias, scalars):
        return self.forward_op(x, weight, bias, scalars)

    def bprop(self, x, weight, bias, scalars, out, dout):
        dx, dweight, dbias = self.backward_op(x, weight, bias, scalars, dout)
        return dx, dweight, dbias, ops.zeros_like(scalars)


def group_norm_scalars(eps, frames, groups):
    return ms.Tensor([eps, frames, groups], ms.float32)


class LayerNormFunction(nn.Cell):
    """LayerNorm over the last axis, fp32. construct(x, weight, bias, scalars) with scalars = fp32 [eps]."""

    def __init__(self):
        super().__init__()
        self.forward_op = _custom("layer_norm_fwd", _same, _same)
        self.backward_op = _custom("layer_norm_bwd", _param_grads_shapes, _param_grads_dtypes)

    def construct(self, x, weight, bias, scalars):
        return self.forward_op(x, weight, bias, scalars)

    def bprop(self, x, weight, bias, scalars, out, dout):
        dx, dweight, dbias = self.backward_op(x, weight, bias, scalars, dout)
        return dx, dweight, dbias, ops.zeros_like(scalars)


def _half_last(shape):
    return tuple(shape[:-1]) + (shape[-1] // 2,)


class GEGLUFunction(nn.Cell):
    """diffusers' GEGLU after its projection: (..., 2I) -> hidden * gelu(gate), exact GELU, fp32."""

    def __init__(self):
        super().__init__()
        self.forward_op = _custom("geglu_fwd", _half_last, _same)
        self.backward_op = _custom("geglu_bwd", lambda x, dy: x, lambda x, dy: x)

    def construct(self, projected):
        return self.forward_op(projected)

    def bprop(self, projected, out, dout):
        return (self.backward_op(projected, dout),)
