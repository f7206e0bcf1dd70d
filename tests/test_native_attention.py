"""tav.kernels.cpu.attention: the fused C++ CPU attention (kernels/cpu/attention.cc) against math_attention.

Forward against math_attention and gradients against autodiff of math_attention, in GRAPH and PYNATIVE mode, at
shapes that hit every edge of the kernel's blocking (16-query tiles, 128-key forward blocks, 16-key backward
blocks, 4-wide register blocking of keys/queries/head columns, the unrolled head dims 8/16/32/40/64/80/128/160
and the generic one), and inside an ms.jit-compiled value_and_grad over parameters the way tav.training does.
Tolerance: 1e-5 relative to each tensor's magnitude (fp32 rounding; the kernels sum in another order).
"""
import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

from tav.kernels import math_attention
from tav.kernels.cpu import build as native
from tav.kernels.cpu.attention import (
    NativeAttention,
    NativeAttentionWithLse,
    native_attention,
    native_attention_supported,
)

# Without a C++ compiler there is nothing to test; with one, a kernel that does not build is a failure, not a skip.
pytestmark = pytest.mark.skipif(native.compiler() is None, reason="no C++ compiler: the native kernels cannot be built")

RTOL = 1e-5


def assert_close(actual, expected, what):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, what
    assert np.isfinite(actual).all(), what
    bound = RTOL * max(1.0, float(np.abs(expected).max()))
    err = float(np.abs(actual - expected).max())
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def random_qkv(batch, nq, nk, heads, dim, seed=0, spread=1.0):
    rng = np.random.default_rng(seed)
    q = spread * rng.standard_normal((batch, nq, heads * dim))
    k = rng.standard_normal((batch, nk, heads * dim))
    v = rng.standard_normal((batch, nk, heads * dim))
    w = rng.standard_normal((batch, nq, heads * dim))  # upstream gradient: loss = sum(out * w)
    return tuple(ms.Tensor(x.astype(np.float32)) for x in (q, k, v, w))


class MathAttention(nn.Cell):
    def __init__(self, num_heads, scale=None):
        super().__init__()
        self.num_heads = num_heads
        self.scale = scale

    def construct(self, q, k, v):
        return math_attention(q, k, v, self.num_heads, scale=self.scale)


class FunctionalNative(nn.Cell):
    def __init__(self, num_heads, scale=None):
        super().__init__()
        self.num_heads = num_heads
        self.scale = scale

    def construct(self, q, k, v):
        return native_attention(q, k, v, self.num_heads, self.scale)


class WeightedSum(nn.Cell):
    def __init__(self, attention, w):
        super().__init__()
        self.attention = attention
        self.w = w

    def construct(self, q, k, v):
        return (self.attention(q, k, v) * self.w).sum()


def output_and_grads(cell, q, k, v, w):
    out = cell(q, k, v)
    _, grads = ms.value_and_grad(WeightedSum(cell, w), grad_position=(0, 1, 2))(q, k, v)
    return out.asnumpy(), [g.asnumpy() for g in grads]


# (batch, Nq, Nk, heads, D)
SHAPES = [
    (2, 37, 300, 2, 8),     # partial query tile, 3 forward key blocks (last partial), partial backward key block
    (1, 16, 128, 8, 8),     # exact tiles and blocks
    (3, 17, 1, 3, 8),       # a single key
    (2, 5, 9, 3, 1),        # head dim 1 (generic path, no 4-wide column blocks)
    (1, 21, 19, 2, 40),     # SD 1.x head dim
    (2, 3, 130, 1, 64),
    (1, 33, 45, 2, 80),
    (1, 20, 35, 1, 160),
    (2, 12, 13, 2, 13),     # generic head dim with a remainder column
    (64, 8, 8, 8, 8),       # attn_temp: many tiny attentions
]


def shape_id(shape):
    return "b{}-q{}-k{}-h{}-d{}".format(*shape)


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_native_matches_math_forward_and_gradients(ms_mode, shape):
    batch, nq, nk, heads, dim = shape
    q, k, v, w = random_qkv(*shape, seed=sum(shape))
    out, grads = output_and_grads(NativeAttention(heads), q, k, v, w)
    ref_out, ref_grads = output_and_grads(MathAttention(heads), q, k, v, w)
    assert_close(out, ref_out, "out")
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(g, r, name)
    assert_close(FunctionalNative(heads)(q, k, v).asnumpy(), ref_out, "native_attention()")


def test_lse_variant_matches_math(ms_mode):
    q, k, v, w = random_qkv(2, 37, 300, 2, 40, seed=5)
    out, grads = output_and_grads(NativeAttentionWithLse(2), q, k, v, w)
    ref_out, ref_grads = output_and_grads(MathAttention(2), q, k, v, w)
    assert_close(out, ref_out, "out")
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(g, r, name)


def float64_attention_and_grads(q, k, v, w, num_heads, scale):
    """numpy float64 forward and gradients of sum(out * w): the flash backward's formulas, independent of MindSpore.
    Also returns the largest |score|, which sets how well any fp32 implementation can do."""
    q, k, v, w = (np.asarray(x.asnumpy(), np.float64) for x in (q, k, v, w))
    b, nq, inner = q.shape
    d = inner // num_heads

    def split(x):
        return x.reshape(b, x.shape[1], num_heads, d).transpose(0, 2, 1, 3)

    def merge(x):
        return x.transpose(0, 2, 1, 3).reshape(b, x.shape[2], inner)

    qh, kh, vh, gh = split(q), split(k), split(v), split(w)
    s = scale * qh @ kh.transpose(0, 1, 3, 2)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = p @ vh
    dp = gh @ vh.transpose(0, 1, 3, 2)
    ds = p * (dp - (gh * o).sum(-1, keepdims=True))
    grads = [merge(scale * ds @ kh), merge(scale * ds.transpose(0, 1, 3, 2) @ qh), merge(p.transpose(0, 1, 3, 2) @ gh)]
    return merge(o), grads, float(np.abs(s).max())


def test_custom_scale_and_peaked_softmax(ms_mode):
    # spread 8 and scale 2 give scores of several hundred: the running max must be subtracted, the probabilities
    # are near one-hot and exp2's underflow clamp is exercised. An fp32 score of magnitude |s| is only known to
    # |s| * 2^-24, so every fp32 implementation (math_attention included) is off by ~|s| * 6e-8 relative here;
    # the bound is 8x that, against float64.
    q, k, v, w = random_qkv(2, 29, 200, 2, 16, seed=7, spread=8.0)
    out, grads = output_and_grads(NativeAttention(2, scale=2.0), q, k, v, w)
    ref_out, ref_grads, max_score = float64_attention_and_grads(q, k, v, w, 2, 2.0)
    assert max_score > 200
    tolerance = 8 * max_score * 2.0**-24
    for name, got, expected in zip(("out", "dq", "dk", "dv"), [out] + grads, [ref_out] + ref_grads):
        err = np.abs(got - expected).max() / np.abs(expected).max()
        assert err < tolerance, f"{name}: relative error {err:.3g} >= {tolerance:.3g}"
    functional = FunctionalNative(2, scale=2.0)(q, k, v).asnumpy()
    assert np.abs(functional - ref_out).max() / np.abs(ref_out).max() < tolerance


def test_matches_float64_reference(ms_mode):
    q, k, v, w = random_qkv(2, 19, 23, 2, 40, seed=3)
    out, grads = output_and_grads(NativeAttention(2), q, k, v, w)
    ref_out, ref_grads, _ = float64_attention_and_grads(q, k, v, w, 2, 40**-0.5)
    for name, got, expected in zip(("out", "dq", "dk", "dv"), [out] + grads, [ref_out] + ref_grads):
        np.testing.assert_allclose(got, expected, atol=2e-6 * max(1.0, np.abs(expected).max()), rtol=0,
                                   err_msg=name)


class TinyAttentionBlock(nn.Cell):
    """q/k/v projections around an attention cell used twice (self- then cross-attention), like a UNet block."""

    def __init__(self, attention_factory, dim=32, heads=4):
        super().__init__()
        self.to_q = nn.Dense(dim, dim, has_bias=False)
        self.to_k = nn.Dense(dim, dim, has_bias=False)
        self.to_v = nn.Dense(dim, dim, has_bias=False)
        self.to_out = nn.Dense(dim, dim)
        self.attn1 = attention_factory(heads)
        self.attn2 = attention_factory(heads)

    def construct(self, x, context):
        h = self.attn1(self.to_q(x), self.to_k(x), self.to_v(x)) + x
        h = self.attn2(self.to_q(h), self.to_k(context), self.to_v(context)) + h
        return self.to_out(h)


def jit_train_grads(attention_factory, x, context, target):
    ms.set_seed(0)
    np.random.seed(0)
    block = TinyAttentionBlock(attention_factory)
    for i, p in enumerate(block.trainable_params()):  # identical weights for both runs
        p.set_data(ms.Tensor(np.random.default_rng(i).standard_normal(p.shape).astype(np.float32) * 0.3))

    def forward(x, context, target):
        return ops.mean(ops.square(block(x, context) - target))

    grad_fn = ms.value_and_grad(forward, None, block.trainable_params())

    @ms.jit
    def train_step(x, context, target):
        return grad_fn(x, context, target)

    loss, grads = train_step(x, context, target)
    return loss.asnumpy(), [g.asnumpy() for g in grads]


def test_gradients_inside_jit_value_and_grad(pynative):
    rng = np.random.default_rng(11)
    x = ms.Tensor(rng.standard_normal((3, 45, 32)).astype(np.float32))
    context = ms.Tensor(rng.standard_normal((3, 7, 32)).astype(np.float32))
    target = ms.Tensor(rng.standard_normal((3, 45, 32)).astype(np.float32))
    loss, grads = jit_train_grads(NativeAttention, x, context, target)
    ref_loss, ref_grads = jit_train_grads(MathAttention, x, context, target)
    assert_close(loss, ref_loss, "loss")
    assert len(grads) == len(ref_grads) == 5  # to_q, to_k, to_v, to_out weight and bias
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert np.abs(r).max() > 1e-4  # the gradient does flow through both attentions
        assert_close(g, r, f"grad {i}")


def test_kernel_builds():
    assert native.unavailable_reason("attention") is None


def test_supported_reasons():
    assert native_attention_supported(ms.float32, (2, 64, 320), (2, 77, 320), 8) is None
    assert "float32" in native_attention_supported(ms.float16, (2, 64, 320), (2, 77, 320), 8)
    assert "num_heads" in native_attention_supported(ms.float32, (2, 64, 320), (2, 77, 320), 3)
    assert native_attention_supported(ms.float32, (2, 64, 320), (3, 77, 320), 8) is not None
    assert native_attention_supported(ms.float32, (2, 64, 320), (2, 0, 320), 8) is not None
