"""The compiled CPU convolution (kernels/cpu/conv.cc, tav/kernels/cpu/conv.py) against MindSpore's own conv2d.

Outputs and all gradients (x, weight, bias) of the native Cells must match ops.conv2d (+ bias_add) and
MindSpore's autodiff of it, in GRAPH and PYNATIVE mode and inside an ms.jit'd value_and_grad over Parameters,
to fp32 rounding (1e-5 of the largest magnitude): the same sums in another order.
"""
import ctypes

import numpy as np
import pytest

import mindspore as ms
from mindspore import Parameter, nn, ops

from tav.kernels.cpu import build as native
from tav.kernels.cpu.conv import Conv2dFunction, Conv2dNoBiasFunction, native_conv_supported

pytestmark = pytest.mark.skipif(not native.available("conv"),
                                reason=f"native conv unavailable: {native.unavailable_reason('conv')}")

TOLERANCE = 1e-5

# (batch, in channels, height, width, out channels, kernel, stride, padding, bias)
CASES = [
    (1, 3, 7, 5, 5, 3, 1, 1, True),
    (2, 5, 7, 5, 6, 3, 2, 1, True),
    (3, 6, 8, 9, 7, 3, 2, 0, False),
    (2, 5, 7, 5, 6, 1, 1, 0, True),     # 1x1 stride 1: no unfolding
    (2, 5, 7, 5, 6, 1, 2, 0, False),    # 1x1 strided
    (1, 4, 6, 6, 3, 1, 1, 1, True),     # 1x1 padded
    (2, 9, 4, 4, 11, 3, 1, 0, True),
    (1, 37, 9, 11, 13, 3, 1, 1, True),  # one image: forward bands, backward channel slices
    (3, 2, 11, 10, 3, 5, 3, 2, False),  # 5x5, stride 3
]


def case_id(case):
    n, c, h, w, o, k, s, p, bias = case
    return f"n{n}c{c}-{h}x{w}-o{o}-k{k}s{s}p{p}" + ("" if bias else "-nobias")


def reference_conv(x, weight, bias, stride, padding):
    if padding > 0:
        y = ops.conv2d(x, weight, None, stride, "pad", padding)
    else:
        y = ops.conv2d(x, weight, None, stride, "valid", 0)
    if bias is not None:
        y = ops.bias_add(y, bias)
    return y


class NativeAndReference(nn.Cell):
    """Both convolutions with sum(y * cotangent)'s gradients w.r.t. x, weight (and bias), in one graph."""

    def __init__(self, stride, padding, bias):
        super().__init__()
        self.stride = stride
        self.padding = padding
        self.has_bias = bias
        self.native = Conv2dFunction(stride, padding) if bias else Conv2dNoBiasFunction(stride, padding)
        self.grad = ops.GradOperation(get_all=True)

    def native_loss(self, x, weight, bias, cotangent):
        if self.has_bias:
            y = self.native(x, weight, bias)
        else:
            y = self.native(x, weight)
        return (y * cotangent).sum()

    def reference_loss(self, x, weight, bias, cotangent):
        if self.has_bias:
            y = reference_conv(x, weight, bias, self.stride, self.padding)
        else:
            y = reference_conv(x, weight, None, self.stride, self.padding)
        return (y * cotangent).sum()

    def construct(self, x, weight, bias, cotangent):
        if self.has_bias:
            y_native = self.native(x, weight, bias)
            y_reference = reference_conv(x, weight, bias, self.stride, self.padding)
        else:
            y_native = self.native(x, weight)
            y_reference = reference_conv(x, weight, None, self.stride, self.padding)
        grads_native = self.grad(self.native_loss)(x, weight, bias, cotangent)
        grads_reference = self.grad(self.reference_loss)(x, weight, bias, cotangent)
        return y_native, y_reference, grads_native[:3], grads_reference[:3]


def inputs(case, seed=0):
    n, c, h, w, o, k, s, p, bias = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    weight = rng.standard_normal((o, c, k, k)).astype(np.float32)
    b = rng.standard_normal((o,)).astype(np.float32)
    out_h, out_w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    cotangent = rng.standard_normal((n, o, out_h, out_w)).astype(np.float32)
    return x, weight, b, cotangent


def assert_close(actual, expected, what):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, atol=TOLERANCE * scale, rtol=0, err_msg=what)


def check_case(case):
    n, c, h, w, o, k, s, p, bias = case
    x, weight, b, cotangent = inputs(case)
    net = NativeAndReference(s, p, bias)
    y_native, y_reference, grads_native, grads_reference = net(*(ms.Tensor(a) for a in (x, weight, b, cotangent)))
    assert_close(y_native.asnumpy(), y_reference.asnumpy(), "y")
    names = ("dx", "dweight", "dbias") if bias else ("dx", "dweight")
    for name, got, want in zip(names, grads_native, grads_reference):
        assert_close(got.asnumpy(), want.asnumpy(), name)
    if bias:  # the independent check of db: the sum of the cotangent over images and positions
        assert_close(grads_native[2].asnumpy(), cotangent.sum(axis=(0, 2, 3)), "dbias vs numpy")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_conv2d_and_its_gradients(ms_mode, case):
    check_case(case)


class ConvLayer(nn.Cell):
    """A layer holding its weight and bias as Parameters, the way tav.nn.Conv2d would use the native Cells."""

    def __init__(self, weight, bias, stride, padding, native_path):
        super().__init__()
        self.weight = Parameter(ms.Tensor(weight), name="weight")
        self.bias = Parameter(ms.Tensor(bias), name="bias")
        self.stride = stride
        self.padding = padding
        self.native_path = native_path
        self.native = Conv2dFunction(stride, padding)

    def construct(self, x):
        if self.native_path:
            return self.native(x, self.weight, self.bias)
        return reference_conv(x, self.weight, self.bias, self.stride, self.padding)


def test_jit_value_and_grad_over_parameters(pynative):
    case = (2, 6, 9, 7, 10, 3, 2, 1, True)
    x, weight, b, cotangent = inputs(case, seed=1)
    results = []
    for native_path in (True, False):
        layer = ConvLayer(weight, b, 2, 1, native_path)
        cot = ms.Tensor(cotangent)

        def loss(inputs_):
            return (layer(inputs_) * cot).sum()

        step = ms.jit(ms.value_and_grad(loss, grad_position=0, weights=layer.trainable_params()))
        value, (dx, (dweight, dbias)) = step(ms.Tensor(x))
        results.append([value.asnumpy(), dx.asnumpy(), dweight.asnumpy(), dbias.asnumpy()])
    for name, got, want in zip(("loss", "dx", "dweight", "dbias"), *results):
        assert_close(got, want, name)


def test_convs_of_different_strides_in_one_process(ms_mode):
    """Each conv keeps its own output shape: PyNative once reused the first op's shape inference for every later
    op of the same kernel symbol, so a stride-2 conv after a stride-1 one got a stride-1 output shape."""
    rng = np.random.default_rng(4)
    x = ms.Tensor(rng.standard_normal((2, 3, 8, 8)).astype(np.float32))
    weight = ms.Tensor(rng.standard_normal((4, 3, 3, 3)).astype(np.float32))
    bias = ms.Tensor(rng.standard_normal(4).astype(np.float32))
    for stride, padding, size in [(1, 1, 8), (2, 1, 4), (1, 0, 6), (2, 0, 3)]:
        got = Conv2dFunction(stride, padding)(x, weight, bias)
        assert got.shape == (2, 4, size, size)
        assert_close(got.asnumpy(), reference_conv(x, weight, bias, stride, padding).asnumpy(), "y")


@pytest.mark.parametrize("tuning", [(1, 0), (7, 2), (7, 1)], ids=["one-row-bands", "bands-channel-slices", "bands-image-groups"])
def test_band_and_thread_splits(pynative, tuning):
    """The kernel's other work splits (bands of one output row or a few, backward over channel slices or image
    groups), forced through conv_set_tuning in the loaded library, give the same results."""
    lib = ctypes.CDLL(native.library("conv"))
    lib.conv_set_tuning.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int64]
    band_columns, split = tuning
    lib.conv_set_tuning(band_columns, 0, split, 0)
    try:
        for case in [(3, 5, 7, 6, 4, 3, 1, 1, True), (2, 6, 9, 7, 5, 3, 2, 1, True), (3, 4, 5, 7, 6, 1, 1, 0, True)]:
            check_case(case)
    finally:
        lib.conv_set_tuning(0, 2 << 20, 0, 64 << 20)


def test_supported():
    assert native_conv_supported(ms.float32, (2, 4, 8, 8), (5, 4, 3, 3), 1, 1) is None
    assert "fp32" in native_conv_supported(ms.float16, (2, 4, 8, 8), (5, 4, 3, 3), 1, 1)
    assert "groups" in native_conv_supported(ms.float32, (2, 4, 8, 8), (5, 2, 3, 3), 1, 1)
    assert "larger" in native_conv_supported(ms.float32, (2, 4, 2, 2), (5, 4, 3, 3), 1, 0)
    assert native_conv_supported(ms.float32, (2, 4, 8), (5, 4, 3), 1, 0) is not None
    assert native_conv_supported(ms.float32, (2, 4, 8, 8), (5, 4, 3, 3), (1, 1), 0) is not None
