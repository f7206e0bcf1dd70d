"""The calling convention of the native CPU kernels, and the one base class their Python wrappers share.

Every kernel is an extern "C" function of kernels/cpu/<library>.cc with MindSpore's AOT signature
`int f(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream, void *extra)`:
params are the inputs then the outputs, shapes/ndims describe each, 0 means success. Scalars (eps, stride,
frames) travel as small fp32 input tensors, so one compiled library serves every layer and graphs stay static.
Each wrapper (conv.py, linear.py, norms.py, layout.py, attention.py, optim.py: one per C++ source) is a
KernelFunction: a Cell whose forward and backward are such ops, with a `bprop` calling the backward kernel.
"""
from mindspore import nn, ops

from . import build


def custom_op(library, symbol, out_shape, out_dtype, variant="", **kwargs):
    """ops.Custom running kernels/cpu/<library>.cc's `symbol` (built on first use), the one way the native Cells
    make their ops. `variant` names what `out_shape` closes over beyond the input shapes (a conv's stride and
    padding): PyNative caches a Custom op's shape inference by its primitive attributes, so two ops of one symbol
    whose inference differs must differ in an attribute -- without it a stride-2 conv once got a stride-1 output
    shape. Extra keyword arguments (e.g. bprop) go to ops.Custom."""
    op = ops.Custom(build.function(library, symbol), out_shape=out_shape, out_dtype=out_dtype, func_type="aot",
                    **kwargs)
    op.add_prim_attr("tav_kernel", f"{library}:{symbol}:{variant}")
    return op


def same(*args):
    """out_shape/out_dtype of an op whose output is like its first input."""
    return args[0]


class KernelFunction(nn.Cell):
    """Base of the native wrappers: `LIBRARY` names the C++ source, `op` makes one of its AOT ops."""

    LIBRARY = None

    def op(self, symbol, out_shape=same, out_dtype=same, variant="", **kwargs):
        return custom_op(self.LIBRARY, symbol, out_shape, out_dtype, variant, **kwargs)


class WeightedFunction(KernelFunction):
    """y = f(x, weight) [+ bias] with a native backward (conv, linear): one class for both bias variants.

    Subclasses set the op symbols and implement `forward(x, weight, bias)` and `gradients(x, weight, bias, dout)`
    with bias None when there is none. `weight_grad = False` (set before compiling, tav.nn.match_weight_gradients)
    makes the backward give dx alone, without reading x, and zeros for the parameters. construct/bprop below take
    (x, weight, bias); `without_bias` (NoBias) is the same class taking (x, weight) -- MindSpore's graph mode needs
    a bprop with exactly construct's arguments, so the two signatures are the only thing spelled twice."""

    def __init__(self):
        super().__init__()
        self.weight_grad = True

    def construct(self, x, weight, bias):
        return self.forward(x, weight, bias)

    def bprop(self, x, weight, bias, out, dout):
        return self.gradients(x, weight, bias, dout)


class NoBias:
    """Mixin: a WeightedFunction called as (x, weight), its backward giving (dx, dweight). Signatures only."""

    def construct(self, x, weight):
        return self.forward(x, weight, None)

    def bprop(self, x, weight, out, dout):
        return self.gradients(x, weight, None, dout)
