"""The native CPU Linear (kernels/cpu/linear.cc): y = x W^T + b with oneDNN's sgemm, forward and backward.

Why: MindSpore 2.10's CPU MatMul + BiasAdd ran the UNet's 111 Linears of a small-bench sampling step in ~330 ms,
~3x PyTorch's addmm. The kernel splits the rows of x among OpenMP threads, one sgemm each (the libdnnl.so.3
MindSpore ships), bias added in cache. The backward gives dx = dy W always and dW = dy^T x, db only when the
weight trains: `weight_grad = False` (tav.nn.match_weight_gradients sets it from requires_grad before a train
step compiles) returns zeros instead, as autodiff skips gradients nobody asked for.
"""
import mindspore as ms
from mindspore import nn

from . import native

LIBRARY = "linear"


def _custom(symbol, out_shape, out_dtype):
    return native.custom_op(LIBRARY, symbol, out_shape, out_dtype)


def _forward_shape(x, weight, *bias):
    return list(x[:-1]) + [weight[0]]


def _first(x, *rest):
    return x


def _backward_shapes(x, weight, dy, flags):
    return x, weight, [weight[0]]


def _backward_dtypes(x, weight, dy, flags):
    return x, weight, weight


def _backward_shapes_nobias(x, weight, dy, flags):
    return x, weight


def _backward_dtypes_nobias(x, weight, dy, flags):
    return x, weight


class LinearFunction(nn.Cell):
    """construct(x, weight, bias) for fp32 x (..., K), weight (N, K), bias (N,) -> (..., N)."""

    def __init__(self):
        super().__init__()
        self.weight_grad = True
        self.forward_op = _custom("linear_fwd", _forward_shape, _first)
        self.backward_op = _custom("linear_bwd", _backward_shapes, _backward_dtypes)

    def construct(self, x, weight, bias):
        return self.forward_op(x, weight, bias)

    def bprop(self, x, weight, bias, out, dout):
        flags = ms.Tensor([1.0 if self.weight_grad else 0.0], ms.float32)
        dx, dweight, dbias = self.backward_op(x, weight, dout, flags)
        return dx, dweight, dbias


class LinearNoBiasFunction(nn.Cell):
    """construct(x, weight) -> x W^T; the attention projections to_q/to_k/to_v have no bias."""

    def __init__(self):
        super().__init__()
        self.weight_grad = True
        self.forward_op = _custom("linear_fwd_nobias", _forward_shape, _first)
        self.backward_op = _custom("linear_bwd_nobias", _backward_shapes_nobias, _backward_dtypes_nobias)

    def construct(self, x, weight):
        return self.forward_op(x, weight)

    def bprop(self, x, weight, out, dout):
        flags = ms.Tensor([1.0 if self.weight_grad else 0.0], ms.float32)
        dx, dweight = self.backward_op(x, weight, dout, flags)
        return dx, dweight
