"""The native CPU 2-D convolution (kernels/cpu/conv.cc) as Cells with their own backward.

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

Measured (2 threads, the bench `small` UNet's nine conv shapes at 16 images, GRAPH mode, best of 15 rounds
interleaved with the alternatives on a shared, busy machine; /tmp/convbench/bench_conv.py of the change that
added this): forward 74 ms in all vs 114 ms for tav.nn.Conv2d's portable path and 62 ms for PyTorch's mkldnn
conv2d; forward + backward 248 vs 327 vs 204 ms. Per core (quiet moment, kernel called directly) the GEMMs run at
92-105 GFLOP/s, PyTorch's direct conv at 104-123: unfolding costs ~10-15%, and oneDNN's sgemm on narrow
(8x8 = 64 column) images loses another ~10%. Errors vs PyTorch: < 1e-6 of the magnitude (y, dx), < 5e-6 (dw, db).

Use: `Conv2dFunction(stride, padding)(x, weight, bias)` or `Conv2dNoBiasFunction(stride, padding)(x, weight)`
for fp32 NCHW x, weight (O, C, KH, KW), symmetric zero padding; `native_conv_supported(...)` says whether a
call qualifies (None) or why not (a string).
"""
import mindspore as ms
from mindspore import nn, ops

from . import native

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
    if not native.available(LIBRARY):
        return native.unavailable_reason(LIBRARY)
    return None


def _forward_shape(stride, padding):
    def shape(x, weight, *rest):
        return [x[0], weight[0], _output_size(x[2], weight[2], stride, padding),
                _output_size(x[3], weight[3], stride, padding)]
    return shape


def _first_dtype(x, *rest):
    return x


def _backward_shapes(x, weight, scalars, dy):
    return x, weight, [weight[0]]


def _backward_dtypes(x, weight, scalars, dy):
    return x, weight, weight


def _backward_shapes_nobias(x, weight, scalars, dy):
    return x, weight


def _backward_dtypes_nobias(x, weight, scalars, dy):
    return x, weight


def _input_gradient_shape(weight, scalars, dy, size):
    return [dy[0], weight[1], size[0], size[1]]


def _input_gradient_dtype(weight, scalars, dy, size):
    return dy


def _custom(symbol, out_shape, out_dtype, geometry=""):
    return native.custom_op(LIBRARY, symbol, out_shape, out_dtype, variant=geometry)


def _input_gradient(op, x_shape, weight, stride, padding, dout):
    """dx of a frozen-weight conv without x: only x's static shape, whose (H, W) a strided conv's dy does not
    determine, travels as the shape of a small tensor."""
    size = ops.zeros((x_shape[2], x_shape[3]), ms.float32)
    return op(weight, ms.Tensor([stride, padding], ms.float32), dout, size)


class Conv2dFunction(nn.Cell):
    """y = conv2d(x, weight) + bias for fp32 x (N, C, H, W), weight (O, C, KH, KW), bias (O,); stride and
    symmetric zero padding the same along both axes. Backward: the native kernel (dx, dweight, dbias)."""

    def __init__(self, stride=1, padding=0):
        super().__init__()
        self.stride = int(stride)
        self.padding = int(padding)
        # False (set before compiling): the backward gives dx without reading x (conv2d_bwd_input) and zeros for
        # dweight/dbias, so the forward's input need not stay alive until the backward.
        self.weight_grad = True
        self.forward_op = _custom("conv2d_fwd", _forward_shape(self.stride, self.padding), _first_dtype,
                                  f"s{self.stride}p{self.padding}")
        self.backward_op = _custom("conv2d_bwd", _backward_shapes, _backward_dtypes)
        self.input_backward_op = _custom("conv2d_bwd_input", _input_gradient_shape, _input_gradient_dtype)

    def construct(self, x, weight, bias):
        scalars = ms.Tensor([self.stride, self.padding], ms.float32)
        return self.forward_op(x, weight, bias, scalars)

    def bprop(self, x, weight, bias, out, dout):
        if self.weight_grad:
            scalars = ms.Tensor([self.stride, self.padding, 1.0], ms.float32)
            dx, dweight, dbias = self.backward_op(x, weight, scalars, dout)
            return dx, dweight, dbias
        dx = _input_gradient(self.input_backward_op, x.shape, weight, self.stride, self.padding, dout)
        return dx, ops.zeros_like(weight), ops.zeros_like(bias)


class Conv2dNoBiasFunction(nn.Cell):
    """Conv2dFunction without a bias: construct(x, weight); backward (dx, dweight)."""

    def __init__(self, stride=1, padding=0):
        super().__init__()
        self.stride = int(stride)
        self.padding = int(padding)
        self.weight_grad = True
        self.forward_op = _custom("conv2d_fwd_nobias", _forward_shape(self.stride, self.padding), _first_dtype,
                                  f"s{self.stride}p{self.padding}")
        self.backward_op = _custom("conv2d_bwd_nobias", _backward_shapes_nobias, _backward_dtypes_nobias)
        self.input_backward_op = _custom("conv2d_bwd_input", _input_gradient_shape, _input_gradient_dtype)

    def construct(self, x, weight):
        scalars = ms.Tensor([self.stride, self.padding], ms.float32)
        return self.forward_op(x, weight, scalars)

    def bprop(self, x, weight, out, dout):
        if self.weight_grad:
            scalars = ms.Tensor([self.stride, self.padding, 1.0], ms.float32)
            dx, dweight = self.backward_op(x, weight, scalars, dout)
            return dx, dweight
        dx = _input_gradient(self.input_backward_op, x.shape, weight, self.stride, self.padding, dout)
        return dx, ops.zeros_like(weight)
