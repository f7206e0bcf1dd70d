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
from mindspore import ops

from .aot import NoBias, WeightedFunction, same

LIBRARY = "linear"


def _forward_shape(x, weight, *bias):
    return list(x[:-1]) + [weight[0]]


def _backward_shapes(x, weight, dy, flags):
    return x, weight, [weight[0]]


def _backward_dtypes(x, weight, dy, flags):
    return x, weight, weight


def _backward_shapes_nobias(x, weight, dy, flags):
    return x, weight


def _input_gradient_shape(dy, weight):
    return list(dy[:-1]) + [weight[1]]


class LinearFunction(WeightedFunction):
    """construct(x, weight, bias) for fp32 x (..., K), weight (N, K), bias (N,) -> (..., N).
    LinearNoBiasFunction: construct(x, weight) -> x W^T (the attention projections to_q/to_k/to_v)."""

    LIBRARY = LIBRARY
    has_bias = True

    def __init__(self):
        super().__init__()
        suffix = "" if self.has_bias else "_nobias"
        self.forward_op = self.op(f"linear_fwd{suffix}", _forward_shape, same)
        self.backward_op = self.op(f"linear_bwd{suffix}", *((_backward_shapes, _backward_dtypes) if self.has_bias
                                                           else (_backward_shapes_nobias, _backward_shapes_nobias)))
        self.input_backward_op = self.op("linear_bwd_input", _input_gradient_shape, same)

    def forward(self, x, weight, bias):
        if bias is None:
            return self.forward_op(x, weight)
        return self.forward_op(x, weight, bias)

    def gradients(self, x, weight, bias, dout):
        if self.weight_grad:
            return self.backward_op(x, weight, dout, ms.Tensor([1.0], ms.float32))
        dx = self.input_backward_op(dout, weight)
        if bias is None:
            return dx, ops.zeros_like(weight)
        return dx, ops.zeros_like(weight), ops.zeros_like(bias)


class LinearNoBiasFunction(NoBias, LinearFunction):
    has_bias = False


def linear_function(bias):
    """The native Linear Cell for a layer with (bias=True) or without a bias."""
    return LinearFunction() if bias else LinearNoBiasFunction()
