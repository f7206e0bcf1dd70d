"""The compiled CPU kernels (kernels/cpu/norms.cc) against the portable MindSpore-op layers they replace.

Every layer is built twice, with and without native kernels (tav.backend.force_native), and both must give the
same outputs and the same gradients (through ms.grad, in GRAPH and PYNATIVE mode). The portable path is in turn
checked against numpy/PyTorch elsewhere (test_unet3d.py, test_backend.py).
"""
import os
import shutil
import types

import numpy as np
import pytest

import mindspore as ms
from mindspore import nn

from tav import backend
from tav import nn as tnn
from tav.kernels.cpu import build as native
from tav.kernels.cpu import use_native_kernel

RNG = np.random.default_rng(7)

pytestmark = pytest.mark.skipif(not native.available("norms"),
                                reason=f"native kernels unavailable: {native.unavailable_reason('norms')}")


def build(factory, enabled):
    """The layer built with (True) or without (False) native kernels; asserts the choice took effect."""
    with backend.force_native(enabled):
        layer = factory()
    assert (getattr(layer, "native", None) is not None) == enabled
    return layer


def randomise(layer, seed):
    rng = np.random.default_rng(seed)
    for param in layer.get_parameters():
        param.set_data(ms.Tensor(rng.standard_normal(param.shape).astype(np.float32)))


class WithGrad(nn.Cell):
    """Output and the gradients of sum(output * cotangent) w.r.t. the input and the layer's parameters."""

    def __init__(self, layer, frames):
        super().__init__()
        self.layer = layer
        self.frames = frames
        self.params = ms.ParameterTuple(layer.trainable_params())
        self.grad = ms.ops.GradOperation(get_all=True, get_by_list=True)

    def construct(self, x, cotangent):
        return self.grad(self.loss, self.params)(x, cotangent)

    def loss(self, x, cotangent):
        return (self.apply(x) * cotangent).sum()

    def loss_of(self, x, cotangent):
        return self.loss(x, cotangent)

    def apply(self, x):
        if self.frames is None:
            return self.layer(x)
        return self.layer(x, self.frames)


def compare(factory, x, atol, grad_atol, frames=None):
    """The layer with and without native kernels: outputs and gradients; `frames` is passed on when given."""
    outputs, grads = [], []
    for enabled in (True, False):
        layer = build(factory, enabled)
        randomise(layer, 3)
        out = WithGrad(layer, frames).apply(ms.Tensor(x))
        cotangent = ms.Tensor(np.random.default_rng(5).standard_normal(out.shape).astype(np.float32))
        outputs.append(out.asnumpy())
        input_grads, param_grads = WithGrad(layer, frames)(ms.Tensor(x), cotangent)
        grads.append([g.asnumpy() for g in tuple(input_grads[:1]) + tuple(param_grads)])
    # Tolerances relative to the largest magnitude: fp32 rounding of sums in another order.
    np.testing.assert_allclose(outputs[0], outputs[1], atol=atol * max(1.0, np.abs(outputs[1]).max()), rtol=0)
    assert len(grads[0]) == len(grads[1]) >= 2
    for native_grad, portable_grad in zip(*grads):
        scale = max(1.0, np.abs(portable_grad).max())
        np.testing.assert_allclose(native_grad, portable_grad, atol=grad_atol * scale, rtol=0)


@pytest.mark.parametrize("frames", [1, 3])
@pytest.mark.parametrize("fused_silu", [False, True])
def test_group_norm_over_folded_frames(ms_mode, frames, fused_silu):
    b, c, h, w = 2, 8, 5, 6
    x = (RNG.standard_normal((b * frames, c, h, w)) * 3 + 1).astype(np.float32)
    compare(lambda: tnn.GroupNorm(4, c, eps=1e-5, fused_silu=fused_silu), x, atol=2e-5, grad_atol=2e-5,
            frames=frames)


def test_group_norm_folded_frames_equals_the_5d_norm(pynative):
    """frames=F on ((B F), C, H, W) is the official GroupNorm of (B, C, F, H, W) (reference 1.5), both paths."""
    b, c, f, h, w = 2, 8, 3, 4, 5
    video = RNG.standard_normal((b, c, f, h, w)).astype(np.float32) * np.arange(1, f + 1)[None, None, :, None, None]
    folded = video.transpose(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
    for enabled in (True, False):
        norm = build(lambda: tnn.GroupNorm(4, c, eps=1e-5), enabled)
        randomise(norm, 1)
        whole = norm(ms.Tensor(video)).asnumpy()
        got = norm(ms.Tensor(folded), f).asnumpy().reshape(b, f, c, h, w).transpose(0, 2, 1, 3, 4)
        np.testing.assert_allclose(got, whole, atol=2e-5)
        per_frame = norm(ms.Tensor(folded)).asnumpy().reshape(b, f, c, h, w).transpose(0, 2, 1, 3, 4)
        assert np.abs(per_frame - whole).max() > 1e-2  # frames=1 would be a different (per-frame) norm


def test_group_norm_keeps_precision_on_large_offsets(pynative):
    """Two-pass statistics: a large mean must not swamp the variance (single-pass E[x^2] - E[x]^2 would)."""
    x = (RNG.standard_normal((2, 4, 16, 16)) + 1000.0).astype(np.float32)
    norm = build(lambda: tnn.GroupNorm(2, 4, eps=1e-6), True)
    got = norm(ms.Tensor(x)).asnumpy()
    grouped = x.astype(np.float64).reshape(2, 2, -1)
    expected = (grouped - grouped.mean(-1, keepdims=True)) / np.sqrt(grouped.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(got, expected.reshape(x.shape), atol=5e-4)


def test_layer_norm(ms_mode):
    x = (RNG.standard_normal((3, 7, 40)) * 2 - 1).astype(np.float32)
    compare(lambda: tnn.LayerNorm(40), x, atol=1e-5, grad_atol=1e-5)


def test_gated_gelu(ms_mode):
    x = (RNG.standard_normal((3, 9, 2 * 24)) * 3).astype(np.float32)
    # No parameters: compare() checks the input gradient and needs one more, so wrap it with a Linear.
    compare(lambda: _ProjectedGatedGELU(12, 24), x[..., :12].copy(), atol=2e-6, grad_atol=2e-6)


@pytest.mark.parametrize("bias", [True, False])
def test_linear(ms_mode, bias):
    x = RNG.standard_normal((3, 37, 24)).astype(np.float32)  # 111 rows: uneven blocks across threads
    compare(lambda: tnn.Linear(24, 40, bias=bias), x, atol=1e-5, grad_atol=1e-5)


FROZEN_CASES = pytest.mark.parametrize(
    "factory", [lambda: tnn.Linear(12, 20), lambda: tnn.Linear(12, 20, bias=False),
                lambda: tnn.Conv2d(3, 5, 3, padding=1), lambda: tnn.Conv2d(3, 5, 1),
                lambda: tnn.Conv2d(3, 5, 3, stride=2, padding=1), lambda: tnn.Conv2d(3, 5, 3, stride=2, bias=False)],
    ids=["linear", "linear-nobias", "conv3x3", "conv1x1", "conv3x3-stride2", "conv3x3-stride2-nobias"])


@FROZEN_CASES
def test_frozen_weights_get_no_gradient_and_the_input_gradient_is_unchanged(ms_mode, factory):
    """match_weight_gradients: a frozen layer's native backward skips dW (zeros, as nobody reads it) and still
    gives the exact input gradient, which is what flows on to the trainable layers."""
    shape = (4, 9, 12) if isinstance(factory(), tnn.Linear) else (4, 3, 6, 7)
    x = RNG.standard_normal(shape).astype(np.float32)
    results = []
    for frozen in (False, True):
        layer = build(factory, True)
        randomise(layer, 2)
        layer.weight.requires_grad = not frozen
        tnn.match_weight_gradients(layer)
        assert layer.native.weight_grad is (not frozen)
        out = layer(ms.Tensor(x))
        cotangent = ms.Tensor(np.random.default_rng(6).standard_normal(out.shape).astype(np.float32))
        grad = ms.ops.GradOperation(get_all=True, get_by_list=True)
        params = ms.ParameterTuple([layer.weight])
        (dx, _), (dweight,) = grad(WithGrad(layer, None).loss_of, params)(ms.Tensor(x), cotangent)
        results.append((dx.asnumpy(), dweight.asnumpy()))
    np.testing.assert_allclose(results[1][0], results[0][0], atol=1e-6)
    assert np.abs(results[0][1]).max() > 1e-3
    assert not results[1][1].any()


@FROZEN_CASES
def test_frozen_backward_reads_only_the_input_shape(pynative, factory):
    """A frozen layer's backward must not take its input: autodiff would keep every frozen layer's input alive
    from the forward to the backward. Its bprop gets an object that has a shape and nothing else, and must still
    give the input gradient of the trainable variant (odd sizes: a stride-2 conv's dy does not fix H and W)."""
    shape = (4, 9, 12) if isinstance(factory(), tnn.Linear) else (2, 3, 7, 9)
    x = ms.Tensor(RNG.standard_normal(shape).astype(np.float32))
    layer = build(factory, True)
    randomise(layer, 4)
    out = layer(x)
    dout = ms.Tensor(np.random.default_rng(7).standard_normal(out.shape).astype(np.float32))
    params = [layer.weight] + ([layer.bias] if getattr(layer, "bias", None) is not None else [])
    native = layer.native
    native.weight_grad = True
    expected = native.bprop(x, *params, out, dout)
    native.weight_grad = False
    frozen = native.bprop(types.SimpleNamespace(shape=x.shape), *params, None, dout)
    assert frozen[0].shape == x.shape
    np.testing.assert_allclose(frozen[0].asnumpy(), expected[0].asnumpy(), atol=1e-6)
    assert np.abs(expected[0].asnumpy()).max() > 1e-2


class _ProjectedGatedGELU(nn.Cell):
    def __init__(self, dim_in, inner):
        super().__init__()
        self.proj = tnn.Linear(dim_in, 2 * inner)
        self.gated = tnn.GatedGELU()
        self.native = self.gated.native

    def construct(self, x):
        return self.gated(self.proj(x))


def test_native_kernels_are_chosen_only_on_cpu_and_when_enabled(monkeypatch):
    with backend.force_native(False):
        assert tnn.GroupNorm(2, 4).native is None
    monkeypatch.setenv(backend.NATIVE_KERNELS_ENV, "0")
    assert not backend.native_kernels_enabled()
    monkeypatch.setenv(backend.NATIVE_KERNELS_ENV, "1")
    assert backend.native_kernels_enabled() == (backend.device_target() == "CPU")
    with backend.force_flavour(backend.FLAVOUR_MINT):
        assert not backend.native_kernels_enabled()  # Ascend builds never take the CPU kernels


def test_a_failed_build_falls_back_with_the_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_built", {})
    monkeypatch.setattr(native, "_failures", {})
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert not native.available("norms")
    assert "no C++ compiler" in native.unavailable_reason("norms")
    assert not use_native_kernel("norms")


def test_the_build_is_cached_by_source_and_compiler(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_built", {})
    monkeypatch.setattr(native, "_failures", {})
    monkeypatch.setenv("TAV_KERNEL_CACHE", str(tmp_path))
    first = native.library("norms")
    assert first.startswith(str(tmp_path)) and first.endswith(".so")
    mtime = (tmp_path / first.rsplit("/", 1)[1]).stat().st_mtime_ns
    native._built.clear()
    assert native.library("norms") == first  # reused, not rebuilt
    assert (tmp_path / first.rsplit("/", 1)[1]).stat().st_mtime_ns == mtime
    assert not list(tmp_path.glob("*.part"))


def test_a_changed_header_rebuilds_the_libraries(monkeypatch, tmp_path):
    """The sources include kernels/cpu/common.h: a library cached before a header edit must not be reused."""
    sources = tmp_path / "cpu"
    shutil.copytree(native.SOURCE_DIR, sources)
    monkeypatch.setattr(native, "SOURCE_DIR", str(sources))
    monkeypatch.setattr(native, "_built", {})
    monkeypatch.setattr(native, "_failures", {})
    monkeypatch.setenv("TAV_KERNEL_CACHE", str(tmp_path / "cache"))
    before = native.library("optim")
    with open(sources / "common.h", "a") as handle:
        handle.write("\n// edited\n")
    native._built.clear()
    after = native.library("optim")
    assert after != before and os.path.isfile(before) and os.path.isfile(after)


def test_swap_middle_axes_and_its_gradient(ms_mode):
    x = RNG.standard_normal((2, 19, 35, 3)).astype(np.float32)  # not multiples of the 16 x 16 tiles
    cotangent = RNG.standard_normal((2, 35, 19, 3)).astype(np.float32)
    for enabled in (True, False):
        swap = build(tnn.SwapMiddleAxes, enabled)
        np.testing.assert_array_equal(swap(ms.Tensor(x)).asnumpy(), x.transpose(0, 2, 1, 3))
        grad = ms.grad(_WeightedSum(swap))(ms.Tensor(x), ms.Tensor(cotangent))
        np.testing.assert_array_equal(grad.asnumpy(), cotangent.transpose(0, 2, 1, 3))


class _WeightedSum(nn.Cell):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def construct(self, x, weights):
        return (self.layer(x) * weights).sum()


class _ContextSum(nn.Cell):
    def __init__(self, layer, frames):
        super().__init__()
        self.layer = layer
        self.frames = frames

    def construct(self, x, weights):
        return (self.layer(x, self.frames) * weights).sum()


@pytest.mark.parametrize("frames", [1, 2, 5])
def test_sparse_causal_context_and_its_gradient(ms_mode, frames):
    from tav.models.attention import SparseCausalContext

    x = RNG.standard_normal((2 * frames, 7, 5)).astype(np.float32)
    cotangent = RNG.standard_normal((2 * frames, 14, 5)).astype(np.float32)
    outputs, grads = [], []
    for enabled in (True, False):
        layer = build(SparseCausalContext, enabled)
        outputs.append(layer(ms.Tensor(x), frames).asnumpy())
        grads.append(ms.grad(_ContextSum(layer, frames))(ms.Tensor(x), ms.Tensor(cotangent)).asnumpy())
    np.testing.assert_array_equal(outputs[0], outputs[1])
    np.testing.assert_allclose(grads[0], grads[1], atol=1e-5)
    # Each video's frame 0 collects every frame's first half; the previous frame (frame 0 for frame 0) the second.
    expected = np.zeros_like(x)
    for first in range(0, 2 * frames, frames):
        for i in range(frames):
            expected[first] += cotangent[first + i, :7]
            expected[first + max(i - 1, 0)] += cotangent[first + i, 7:]
    np.testing.assert_allclose(grads[0], expected, atol=1e-5)


def three_frame_policy(video_length):
    """A policy other than the paper's: frames 0, i-1 and i-2 (clamped at 0) for frame i."""
    i = np.arange(video_length)
    return np.stack([np.zeros_like(i), np.maximum(i - 1, 0), np.maximum(i - 2, 0)], 1).astype(np.int32)


@pytest.mark.parametrize("frames", [1, 4])
def test_a_different_frame_policy_gives_the_same_result_on_every_backend(ms_mode, frames):
    """The frame policy is data: the native gather (kernels/cpu/layout.cc) and the portable ops both follow it,
    forward and backward, in both modes; and a built attention layer takes a new one through set_frame_policy."""
    from tav.models.attention import SparseCausalAttention, SparseCausalContext, set_frame_policy

    x = RNG.standard_normal((2 * frames, 7, 5)).astype(np.float32)
    cotangent = RNG.standard_normal((2 * frames, 21, 5)).astype(np.float32)
    table = three_frame_policy(frames)
    outputs, grads = [], []
    for enabled in (True, False):
        layer = build(lambda: SparseCausalContext(three_frame_policy), enabled)
        outputs.append(layer(ms.Tensor(x), frames).asnumpy())
        grads.append(ms.grad(_ContextSum(layer, frames))(ms.Tensor(x), ms.Tensor(cotangent)).asnumpy())
    expected = np.zeros((2 * frames, 21, 5), np.float32)
    expected_grad = np.zeros_like(x)
    for first in range(0, 2 * frames, frames):
        for i in range(frames):
            for s in range(3):
                expected[first + i, 7 * s:7 * (s + 1)] = x[first + table[i, s]]
                expected_grad[first + table[i, s]] += cotangent[first + i, 7 * s:7 * (s + 1)]
    for output, grad in zip(outputs, grads):
        np.testing.assert_array_equal(output, expected)
        np.testing.assert_allclose(grad, expected_grad, atol=1e-5)

    results = []
    tokens = ms.Tensor(RNG.standard_normal((2 * frames, 6, 16)).astype(np.float32))
    for enabled in (True, False):
        with backend.force_native(enabled):
            attn = SparseCausalAttention(16, heads=2, dim_head=8)
        randomise(attn, seed=3)
        assert set_frame_policy(attn, three_frame_policy) == 1
        results.append(attn(tokens, frames).asnumpy())
    np.testing.assert_allclose(results[0], results[1], rtol=1e-4, atol=1e-4)  # native vs portable linears too
