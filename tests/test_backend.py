"""The device module and the portable op layer: which op flavour is chosen where, and that the portable ops
compute what PyTorch's do."""
import numpy as np
import pytest

import mindspore as ms
from mindspore import nn

from tav import backend
from tav import nn as tnn

RNG = np.random.default_rng(0)


def test_cpu_uses_the_classic_ops():
    assert backend.device_target() == "CPU"
    assert backend.op_flavour() == backend.FLAVOUR_CLASSIC
    assert not tnn.Linear(4, 4).use_mint and not tnn.Conv2d(4, 4, 3).use_mint


def test_forced_mint_flavour_reaches_every_layer_and_is_restored():
    with backend.force_flavour(backend.FLAVOUR_MINT):
        layers = [tnn.Linear(4, 4), tnn.Conv2d(4, 4, 3), tnn.GroupNorm(2, 4), tnn.LayerNorm(4)]
    assert all(layer.use_mint for layer in layers)  # built for Ascend; never run here (no CPU kernels)
    assert backend.op_flavour() == backend.FLAVOUR_CLASSIC


def test_ascend_selects_mint(monkeypatch):
    monkeypatch.setattr(backend, "device_target", lambda: "Ascend")
    assert backend.op_flavour() == backend.FLAVOUR_MINT
    assert tnn.Linear(4, 4).use_mint
    assert backend.supports_dtype(ms.bfloat16)


def test_optimizer_update_compiles_only_off_cpu(monkeypatch):
    assert not backend.compile_optimizer_update()  # CPU: eager (a compiled update holds host memory per node)
    monkeypatch.setattr(backend, "device_target", lambda: "Ascend")
    assert backend.compile_optimizer_update()


def test_free_host_memory_goes_back_to_the_os():
    import ctypes.util
    import sys

    glibc = sys.platform.startswith("linux") and "libc.so.6" in (ctypes.util.find_library("c") or "")
    assert backend.release_free_host_memory() is glibc


class _Scale(ms.nn.Cell):
    def construct(self, x):
        return x * 2.0


def test_compile_ahead_once_per_cell_and_shape_in_graph_mode_only(graph_mode):
    cell, x = _Scale(), ms.Tensor(np.ones((2, 3), np.float32))
    assert backend.compile_ahead(cell, x)
    assert not backend.compile_ahead(cell, x)  # compiled already: nothing to do
    np.testing.assert_array_equal(cell(x).asnumpy(), np.full((2, 3), 2.0, np.float32))
    assert backend.compile_ahead(cell, ms.Tensor(np.ones((4, 3), np.float32)))  # a new shape compiles again
    assert backend.compile_ahead(_Scale(), x)  # per cell
    assert not backend.compile_ahead(lambda y: y, x)  # not a Cell
    ms.set_context(mode=ms.PYNATIVE_MODE)
    assert not backend.compile_ahead(_Scale(), x)


def test_bf16_is_refused_off_ascend():
    assert not backend.supports_dtype(ms.bfloat16)
    assert backend.supports_dtype(ms.float16) and backend.supports_dtype(ms.float32)


@pytest.mark.parametrize("bad", ["TPU", "cuda"])
def test_unknown_device_target_is_named(bad):
    with pytest.raises(ValueError, match=bad):
        backend.configure(device_target=bad)


def test_unknown_mode_and_flavour_are_refused():
    with pytest.raises(ValueError, match="mode"):
        backend.configure(mode=3)
    with pytest.raises(ValueError, match="flavour"):
        backend.force_flavour("fast")


class Upsample(nn.Cell):
    def __init__(self, size):
        super().__init__()
        self.size = size

    def construct(self, x):
        return tnn.upsample_nearest(x, self.size)


def test_linear_and_conv_match_numpy(ms_mode):
    linear = tnn.Linear(6, 5)
    x = RNG.standard_normal((2, 3, 6)).astype(np.float32)
    expected = x @ linear.weight.asnumpy().T + linear.bias.asnumpy()
    np.testing.assert_allclose(linear(ms.Tensor(x)).asnumpy(), expected, atol=1e-5)

    conv = tnn.Conv2d(3, 4, 3, stride=2, padding=1)
    image = RNG.standard_normal((1, 3, 7, 9)).astype(np.float32)
    w, b = conv.weight.asnumpy(), conv.bias.asnumpy()
    padded = np.pad(image, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((1, 4, 4, 5), np.float32)
    for i in range(4):
        for j in range(5):
            patch = padded[:, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3]
            out[:, :, i, j] = np.einsum("bchw,ochw->bo", patch, w) + b
    np.testing.assert_allclose(conv(ms.Tensor(image)).asnumpy(), out, atol=1e-5)


def test_layer_norm_matches_numpy_with_torch_default_eps(ms_mode):
    norm = tnn.LayerNorm(8)
    norm.weight.set_data(ms.Tensor(RNG.standard_normal(8).astype(np.float32)))
    norm.bias.set_data(ms.Tensor(RNG.standard_normal(8).astype(np.float32)))
    x = RNG.standard_normal((3, 5, 8)).astype(np.float32)
    expected = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    expected = expected * norm.weight.asnumpy() + norm.bias.asnumpy()
    np.testing.assert_allclose(norm(ms.Tensor(x)).asnumpy(), expected, atol=1e-5)


@pytest.mark.parametrize("src,dst", [((4, 4), (8, 8)), ((5, 7), (9, 14)), ((3, 3), (5, 5))])
def test_nearest_upsampling_uses_pytorchs_index_rule(ms_mode, src, dst):
    """PyTorch 'nearest': source index floor(dst_index * in / out); sizes that are not 2x occur when H or W is
    not a multiple of 64 (the UNet forwards the skip's size)."""
    x = RNG.standard_normal((1, 2) + src).astype(np.float32)
    rows = np.floor(np.arange(dst[0]) * (src[0] / dst[0])).astype(int)
    cols = np.floor(np.arange(dst[1]) * (src[1] / dst[1])).astype(int)
    expected = x[:, :, rows][:, :, :, cols]
    got = Upsample(dst)(ms.Tensor(x)).asnumpy()
    np.testing.assert_array_equal(got, expected)


def test_configure_sizes_the_cpu_thread_pool_to_the_available_cores_once():
    """MindSpore's CPU pool defaults to 25 threads whatever the machine has; configure() sizes it to the cores this
    process may use, and a later request keeps that size (MindSpore refuses a second setting)."""
    import subprocess
    import sys

    code = ("from tav import backend\n"
            "first = backend.set_cpu_threads()\n"
            "print(first, backend.available_cores(), backend.set_cpu_threads(3))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[-3] == out[-2] and int(out[-2]) >= 1 and out[-1] == "None", out
    code = ("from tav import backend\n"
            "backend.configure(device_target='CPU', cpu_threads=2)\n"
            "print(backend.set_cpu_threads(5))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[-1] == "None", out  # configure set it already
    with pytest.raises(ValueError, match="threads must be >= 1"):
        backend.set_cpu_threads(0)
