"""The native CPU norms and GEGLU (kernels/cpu/norms.cc) as Cells with their own backward.

Each Cell wraps a forward and a backward AOT Custom op; its `bprop` calls the backward kernel, which recomputes
what it needs (group/row statistics) from the inputs instead of keeping them from the forward, so the forward
has one output and nothing extra stays alive between the passes. tav/nn.py's layers pick these on CPU
(tav.backend.use_native_kernel("norms")) and their portable MindSpore-op twins elsewhere; tests compare the two.

Measured (2 threads, (16 frames x 64 channels x 32 x 32), 32 groups): GroupNorm 7 ms -> see bench/README.md.
"""
import numpy as np

import mindspore as ms
from mindspore import nn, ops

from . import native

LIBRARY = "norms"


def _custom(symbol, out_shape, out_dtype):
    return native.custom_op(LIBRARY, symbol, out_shape, out_dtype)


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


def _swapped_shape(x):
    return [x[0], x[2], x[1], x[3]]


class SwapMiddleAxesFunction(nn.Cell):
    """(A, B, C, D) -> (A, C, B, D) for fp32; the backward is the same swap the other way. MindSpore 2.10's CPU
    Transpose kernel holds twice its output as workspace for as long as the graph lives (a 64 MiB transpose kept
    128 MiB), ~150 MiB of a small-bench sampling step; this op holds nothing."""

    def __init__(self):
        super().__init__()
        self.op = _custom("swap_middle_axes", _swapped_shape, _same)

    def construct(self, x):
        return self.op(x)

    def bprop(self, x, out, dout):
        return (self.op(dout),)


def _doubled_tokens(x, scalars):
    return [x[0], 2 * x[1], x[2]]


def _halved_tokens(dy, scalars):
    return [dy[0], dy[1] // 2, dy[2]]


class SparseCausalContextFunction(nn.Cell):
    """((B F), D, C) -> ((B F), 2D, C): for frame i the tokens of frame 0 then of frame max(i-1, 0), in one copy
    (MindSpore ops need two slices, a broadcast and two concatenations, whose workspaces stay alive; more so in
    their backward). construct(x, scalars) with scalars = fp32 [frames]."""

    def __init__(self):
        super().__init__()
        self.forward_op = _custom("sparse_causal_fwd", _doubled_tokens, _same)
        self.backward_op = _custom("sparse_causal_bwd", _halved_tokens, _same)

    def construct(self, x, scalars):
        return self.forward_op(x, scalars)

    def bprop(self, x, scalars, out, dout):
        return self.backward_op(dout, scalars), ops.zeros_like(scalars)


def _adamw_shapes(param, grad, exp_avg, exp_avg_sq, scalars):
    return param, param, param


def _adamw_dtypes(param, grad, exp_avg, exp_avg_sq, scalars):
    return param, param, param


def adamw_update_op():
    """The fused AdamW update of one fp32 tensor (kernels/cpu/optim.cc): (param, grad, exp_avg, exp_avg_sq,
    scalars [step_size, decay, bias_correction2_sqrt, 1-beta1, beta2, 1-beta2, eps]) -> (param', exp_avg',
    exp_avg_sq'). One op where the op-by-op form took ~15, each of which MindSpore's CPU graph holds memory for."""
    return native.custom_op("optim", "adamw_update", _adamw_shapes, _adamw_dtypes)


class HostOptimizerKernels:
    """optim.cc's plain C functions for the host-side update of a CPU train step, called through ctypes on numpy
    arrays -- which must be the tensors' own storage (Tensor.asnumpy on CPU) for the in-place update to land:

        unscaled_sum_squares(grad, denominator) -> (sum of (grad / denominator)^2 as a Python float, all finite)
        adamw_step(param, grad, exp_avg, exp_avg_sq, scalars)   in place; scalars as optim.cc lists them
    """

    def __init__(self):
        import ctypes

        handle = ctypes.CDLL(native.library("optim"))
        self._sum_squares = handle.tav_unscaled_sum_squares
        self._sum_squares.restype = ctypes.c_double
        self._sum_squares.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.POINTER(ctypes.c_int)]
        self._adamw = handle.tav_adamw_step
        self._adamw.restype = None
        self._adamw.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_void_p]
        self._ctypes = ctypes

    @staticmethod
    def shares_storage(tensor):
        """Whether tensor.asnumpy() is a view of the tensor's own storage (documented for CPU tensors): two calls
        then return the same buffer. If it were a copy, in-place updates would be lost."""
        first, second = tensor.asnumpy(), tensor.asnumpy()
        return first.ctypes.data == second.ctypes.data and first.dtype == np.float32 and first.flags.c_contiguous

    @staticmethod
    def _checked(array):
        if array.dtype != np.float32 or not array.flags.c_contiguous:
            raise ValueError(f"host optimizer kernels take contiguous float32 arrays, got {array.dtype} "
                             f"(contiguous: {array.flags.c_contiguous})")
        return array.ctypes.data

    def unscaled_sum_squares(self, grad, denominator):
        finite = self._ctypes.c_int(1)
        total = self._sum_squares(self._checked(grad), grad.size, float(denominator), self._ctypes.byref(finite))
        return total, bool(finite.value)

    def adamw_step(self, param, grad, exp_avg, exp_avg_sq, scalars):
        if not (param.size == grad.size == exp_avg.size == exp_avg_sq.size):
            raise ValueError(f"adamw_step: sizes differ {param.size}, {grad.size}, {exp_avg.size}, {exp_avg_sq.size}")
        scalars = np.ascontiguousarray(scalars, np.float32)
        if scalars.shape != (9,):
            raise ValueError(f"adamw_step takes 9 scalars, got {scalars.shape}")
        self._adamw(self._checked(param), self._checked(grad), self._checked(exp_avg), self._checked(exp_avg_sq),
                    param.size, scalars.ctypes.data)


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
