"""The native CPU Linear (kernels/cpu/linear.cc): y = x W^T + b with oneDNN's sgemm, forward and backward.

Why: MindSpore 2.10's CPU MatMul + BiasAdd ran the UNet's 111 Linears of a small-bench sampling step in ~330 ms,
~3x PyTorch's addmm. The kernel splits the rows of x among OpenMP threads, one sgemm each (the libdnnl.so.3
MindSpore ships), bias added in cache. The backward gives dx = dy W always and dW = dy^T x, db only when the
weight trains: with `weight_grad = False` (tav.nn.match_weight_gradients sets it from requires_grad before a train
step compiles) the backward is linear_bwd_input(dy, W), which does not read x, and returns zeros for dW and db
(nobody asks for them). Not reading x matters as much as the skipped product: a backward that takes x keeps
every frozen Linear's input alive from the forward to the backward (the GEGLU output before ff.net.2 alone is
4x the block's activations).
"""
import mindspore as ms
from mindspore import nn, ops

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


def _input_gradient_shape(dy, weight):
    return list(dy[:-1]) + [weight[1]]


def _input_gradient_dtype(dy, weight):
    return dy


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
        self.input_backward_op = _custom("linear_bwd_input", _input_gradient_shape, _input_gradient_dtype)

    def construct(self, x, weight, bias):
        return self.forward_op(x, weight, bias)

    def bprop(self, x, weight, bias, out, dout):
        if self.weight_grad:
            dx, dweight, dbias = self.backward_op(x, weight, dout, ms.Tensor([1.0], ms.float32))
            return dx, dweight, dbias
        return self.input_backward_op(dout, weight), ops.zeros_like(weight), ops.zeros_like(bias)


class LinearNoBiasFunction(nn.Cell):
    """construct(x, weight) -> x W^T; the attention projections to_q/to_k/to_v have no bias."""

    def __init__(self):
        super().__init__()
        self.weight_grad = True
        self.forward_op = _custom("linear_fwd_nobias", _forward_shape, _first)
        self.backward_op = _custom("linear_bwd_nobias", _backward_shapes_nobias, _backward_dtypes_nobias)
        self.input_backward_op = _custom("linear_bwd_input", _input_gradient_shape, _input_gradient_dtype)

    def construct(self, x, weight):
        return self.forward_op(x, weight)

    def bprop(self, x, weight, out, dout):
        if self.weight_grad:
            dx, dweight = self.backward_op(x, weight, dout, ms.Tensor([1.0], ms.float32))
            return dx, dweight
        return self.input_backward_op(dout, weight), ops.zeros_like(weight)
