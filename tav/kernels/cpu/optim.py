"""The native CPU AdamW (kernels/cpu/optim.cc): as an AOT op for a compiled update, and as plain C functions
called through ctypes for the host-side update of a CPU train step (tav/optim.py chooses between them)."""
import ctypes

import numpy as np

from . import build
from .aot import custom_op

LIBRARY = "optim"


def _adamw_shapes(param, grad, exp_avg, exp_avg_sq, scalars):
    return param, param, param


def adamw_update_op():
    """The fused AdamW update of one fp32 tensor: (param, grad, exp_avg, exp_avg_sq, scalars [step_size, decay,
    bias_correction2_sqrt, 1-beta1, beta2, 1-beta2, eps]) -> (param', exp_avg', exp_avg_sq'). One op where the
    op-by-op form took ~15, each of which MindSpore's CPU graph holds memory for."""
    return custom_op(LIBRARY, "adamw_update", _adamw_shapes, _adamw_shapes)


class HostOptimizerKernels:
    """optim.cc's plain C functions for the host-side update of a CPU train step, called through ctypes on numpy
    arrays -- which must be the tensors' own storage (Tensor.asnumpy on CPU) for the in-place update to land:

        unscaled_sum_squares(grad, denominator) -> (sum of (grad / denominator)^2 as a Python float, all finite)
        adamw_step(param, grad, exp_avg, exp_avg_sq, scalars)   in place; scalars as optim.cc lists them
    """

    def __init__(self):
        handle = ctypes.CDLL(build.library("optim"))
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
