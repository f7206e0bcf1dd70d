"""The native CPU 2-D convolution (kernels/cpu/conv.cc) as a Cell with its own backward.

Why: MindSpore 2.10's CPU Conv2D kernel is ~50x slower than im2col + a matmul on a 3x3 conv, and the portable
replacement in tav/nn.py (ops.unfold + a 1x1 Conv2D + bias_add, with MindSpore's autodiff for the backward)
still writes the whole unfolded tensor of the batch, reads it back, and in the backward runs the adjoint of
Im2Col through its own slow kernel. PyTorch's mkldnn conv is ~1.7x faster than that path at our shapes.

How: conv.cc unfolds one band of output rows of one image at a time into a per-thread buffer (cache-sized) and
multiplies the weight by it with oneDNN's sgemm (the libdnnl.so.3 MindSpore's CPU build ships, single-threaded
per call; OpenMP threads take images and bands), writing straight into the NCHW output with the bias fused.
1x1 stride-1 convs multiply the input planes directly. The backward recomputes the unfolded band (nothing kept
from the forward) and gives dw += dy x columns^T, dx = col2im(w^T x dy) and db = sum(dy), with threads split
over input channels (disjoint slices of dx and dw, no reduction) or over images (private dw copies, summed).

Measurements: docs/kernels.md.

Use: `Conv2dFunction(stride, padding)(x, weight, bias)` or `Conv2dNoBiasFunction(stride, padding)(x, weight)`
for fp32 NCHW x, weight (O, C, KH, KW), symmetric zero padding; `native_conv_supported(...)` says whether a
call qualifies (None) or why not (a string).
"""
import mindspore as ms
from mindspore import ops

from . import build
from .aot import NoBias, WeightedFunction, same

LIBRARY = "conv"


def _output_size(size, kernel, stride, padding):
    if size is None or size < 0:
        return -1
    return (size + 2 * padding - kernel) // stride + 1


def native_conv_supported(dtype, x_shape, weight_shape, stride, padding):
    """None when conv.cc can run this convolution here, else the reason (a string)."""
    if dtype != ms.float32:
        return f"dtype {dtype} (the native conv is fp32 only)"
    if len(x_shape) != 4 or len(weight_shape) != 4:
        return f"shapes {tuple(x_shape)}, {tuple(weight_shape)} are not NCHW / OIHW"
    if not isinstance(stride, int) or not isinstance(padding, int) or stride < 1 or padding < 0:
        return f"stride {stride!r} / padding {padding!r} are not one int each (stride >= 1, padding >= 0)"
    if x_shape[1] >= 0 and x_shape[1] != weight_shape[1]:
        return f"input channels {x_shape[1]} != weight's {weight_shape[1]} (groups are not supported)"
    for size, kernel in zip(x_shape[2:], weight_shape[2:]):
        if size >= 0 and size + 2 * padding < kernel:
            return f"kernel {kernel} larger than the padded input {size + 2 * padding}"
    if not build.available(LIBRARY):
        return build.unavailable_reason(LIBRARY)
    return None


def _forward_shape(stride, padding):
    def shape(x, weight, *rest):
        return [x[0], weight[0], _output_size(x[2], weight[2], stride, padding),
                _output_size(x[3], weight[3], stride, padding)]
    return shape


def _backward_shapes(x, weight, scalars, dy):
    return x, weight, [weight[0]]


def _backward_dtypes(x, weight, scalars, dy):
    return x, weight, weight


def _backward_shapes_nobias(x, weight, scalars, dy):
    return x, weight


def _input_gradient_shape(weight, scalars, dy, size):
    return [dy[0], weight[1], size[0], size[1]]


def _input_gradient_dtype(weight, scalars, dy, size):
    return dy


class Conv2dFunction(WeightedFunction):
    """y = conv2d(x, weight) + bias for fp32 x (N, C, H, W), weight (O, C, KH, KW), bias (O,); stride and
    symmetric zero padding the same along both axes. Backward: the native kernel (dx, dweight, dbias).
    Conv2dNoBiasFunction is the same without a bias: construct(x, weight); backward (dx, dweight)."""

    LIBRARY = LIBRARY
    has_bias = True

    def __init__(self, stride=1, padding=0):
        super().__init__()
        self.stride = int(stride)
        self.padding = int(padding)
        suffix = "" if self.has_bias else "_nobias"
        backward_shapes = _backward_shapes if self.has_bias else _backward_shapes_nobias
        backward_dtypes = _backward_dtypes if self.has_bias else _backward_shapes_nobias
        self.forward_op = self.op(f"conv2d_fwd{suffix}", _forward_shape(self.stride, self.padding), same,
                                  f"s{self.stride}p{self.padding}")
        self.backward_op = self.op(f"conv2d_bwd{suffix}", backward_shapes, backward_dtypes)
        # With weight_grad False: dx from (weight, dy) alone, so the forward's input need not stay alive.
        self.input_backward_op = self.op("conv2d_bwd_input", _input_gradient_shape, _input_gradient_dtype)

    def forward(self, x, weight, bias):
        scalars = ms.Tensor([self.stride, self.padding], ms.float32)
        if bias is None:
            return self.forward_op(x, weight, scalars)
        return self.forward_op(x, weight, bias, scalars)

    def gradients(self, x, weight, bias, dout):
        if self.weight_grad:
            scalars = ms.Tensor([self.stride, self.padding, 1.0], ms.float32)
            return self.backward_op(x, weight, scalars, dout)
        # dx of a frozen-weight conv without x: only x's static shape, whose (H, W) a strided conv's dy does not
        # determine, travels as the shape of a small tensor.
        size = ops.zeros((x.shape[2], x.shape[3]), ms.float32)
        dx = self.input_backward_op(weight, ms.Tensor([self.stride, self.padding], ms.float32), dout, size)
        if bias is None:
            return dx, ops.zeros_like(weight)
        return dx, ops.zeros_like(weight), ops.zeros_like(bias)


class Conv2dNoBiasFunction(NoBias, Conv2dFunction):
    has_bias = False


def conv2d_function(stride, padding, bias):
    """The native conv Cell for a layer with (bias=True) or without a bias."""
    return Conv2dFunction(stride, padding) if bias else Conv2dNoBiasFunction(stride, padding)
