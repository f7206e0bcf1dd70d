"""The native CPU norms and GEGLU (kernels/cpu/norms.cc) as Cells with their own backward.

Each Cell wraps a forward and a backward AOT Custom op; its `bprop` calls the backward kernel, which recomputes
what it needs (group/row statistics) from the inputs instead of keeping them from the forward, so the forward
has one output and nothing extra stays alive between the passes. tav/nn.py's layers pick these on CPU
(tav.kernels.cpu.use_native_kernel("norms")) and their portable MindSpore-op twins elsewhere; tests compare the two.

Measurements: docs/kernels.md.
"""
import mindspore as ms
from mindspore import ops

from .aot import KernelFunction, same

LIBRARY = "norms"


def _param_grads_shapes(x, weight, bias, scalars, dy):
    return x, weight, bias


def _param_grads_dtypes(x, weight, bias, scalars, dy):
    return x, weight, bias


class GroupNormFunction(KernelFunction):
    """y = GroupNorm(x) (then SiLU when `fused_silu`) for x ((B F), C, ...) fp32, statistics of each sample b over
    its F frames: the official GroupNorm on (B, C, F, H, W) without the transpose to that layout.

    construct(x, weight, bias, scalars) with scalars = fp32 [eps, frames, groups] (group_norm_scalars)."""

    LIBRARY = LIBRARY

    def __init__(self, fused_silu=False):
        super().__init__()
        suffix = "_silu" if fused_silu else ""
        self.forward_op = self.op(f"group_norm{suffix}_fwd", same, same)
        self.backward_op = self.op(f"group_norm{suffix}_bwd", _param_grads_shapes, _param_grads_dtypes)

    def construct(self, x, weight, bias, scalars):
        return self.forward_op(x, weight, bias, scalars)

    def bprop(self, x, weight, bias, scalars, out, dout):
        dx, dweight, dbias = self.backward_op(x, weight, bias, scalars, dout)
        return dx, dweight, dbias, ops.zeros_like(scalars)


def group_norm_scalars(eps, frames, groups):
    return ms.Tensor([eps, frames, groups], ms.float32)


class LayerNormFunction(KernelFunction):
    """LayerNorm over the last axis, fp32. construct(x, weight, bias, scalars) with scalars = fp32 [eps]."""

    LIBRARY = LIBRARY

    def __init__(self):
        super().__init__()
        self.forward_op = self.op("layer_norm_fwd", same, same)
        self.backward_op = self.op("layer_norm_bwd", _param_grads_shapes, _param_grads_dtypes)

    def construct(self, x, weight, bias, scalars):
        return self.forward_op(x, weight, bias, scalars)

    def bprop(self, x, weight, bias, scalars, out, dout):
        dx, dweight, dbias = self.backward_op(x, weight, bias, scalars, dout)
        return dx, dweight, dbias, ops.zeros_like(scalars)


def _half_last(shape):
    return tuple(shape[:-1]) + (shape[-1] // 2,)


class GEGLUFunction(KernelFunction):
    """diffusers' GEGLU after its projection: (..., 2I) -> hidden * gelu(gate), exact GELU, fp32."""

    LIBRARY = LIBRARY

    def __init__(self):
        super().__init__()
        self.forward_op = self.op("geglu_fwd", _half_last, same)
        self.backward_op = self.op("geglu_bwd", lambda x, dy: x, lambda x, dy: x)

    def construct(self, projected):
        return self.forward_op(projected)

    def bprop(self, projected, out, dout):
        return (self.backward_op(projected, dout),)
