"""The portable op layer: small Cells and functions that pick, once at construction, the op that runs on the
current backend (tav.backend.op_flavour): the Ascend-first `mint` ops on Ascend (called through
tav.kernels.ascend_ops, which TAV_EMULATE_ASCEND replaces by CPU emulations), the classic `nn`/`ops` ops with
CPU/GPU kernels elsewhere. Models are built only from these, so they never branch on the device.

Norms keep fp32 statistics and fp32 parameters on every path, fp16 models included (the official fp16 run keeps
fp32 weights under autocast; UNet3DConditionModel.to_dtype leaves norm parameters fp32): mint's group_norm is the
same GroupNorm primitive as ops.group_norm, so feeding it fp16 would save nothing and cost precision.

Parameter names are PyTorch's (`weight`, `bias`) and shapes are PyTorch's, so checkpoints load name for name.
Random initialisation follows PyTorch's defaults (uniform +-1/sqrt(fan_in)) so a freshly built model has the
same scale as the original.
"""
import math

import mindspore as ms
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import One, Uniform, Zero, initializer

from tav import backend
from tav.kernels import ascend_ops
from tav.kernels.cpu import conv, layout, linear, norms, use_native_kernel
from tav.kernels.cpu.norms import GEGLUFunction, GroupNormFunction, LayerNormFunction, group_norm_scalars


# No broadcasting elementwise ops in the classic (CPU) path: in GRAPH_MODE, MindSpore 2.10's CPU Add/Mul with a
# broadcast operand (x + b, b of shape (C,) or (N, C, 1, 1, 1)) keeps about four times its output as workspace
# until the whole graph has run, so every bias add of a UNet step stayed alive (8 GiB peak at the `small` bench
# config). ops.bias_add and the GroupNorm kernel do the same arithmetic without that.


def _uniform(shape, bound, dtype):
    return Parameter(initializer(Uniform(bound), shape, dtype))


class Linear(nn.Cell):
    """y = x W^T + b, with W shaped (out, in) as in PyTorch."""

    def __init__(self, in_features, out_features, bias=True, dtype=ms.float32):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        bound = 1.0 / math.sqrt(in_features)
        self.weight = _uniform((out_features, in_features), bound, dtype)
        self.bias = _uniform((out_features,), bound, dtype) if bias else None
        self.use_mint = backend.use_mint_ops()
        # The compiled CPU kernel (kernels/cpu/linear.cc: threaded oneDNN sgemm, bias fused): ~3x MindSpore's
        # MatMul + BiasAdd at the UNet's shapes.
        self.native = None
        if not self.use_mint and use_native_kernel(linear.LIBRARY):
            self.native = linear.linear_function(bias)

    def construct(self, x):
        if self.use_mint:
            return ascend_ops.linear(x, self.weight, self.bias)
        if self.native is not None and x.dtype == ms.float32 and self.weight.dtype == ms.float32:
            if self.bias is None:
                return self.native(x, self.weight)
            return self.native(x, self.weight, self.bias)
        # A 2-D product and bias_add: ops.dense's own bias add broadcasts (see the note at the top).
        shape = x.shape
        y = ops.dense(x.reshape(-1, shape[-1]), self.weight)
        if self.bias is not None:
            y = ops.bias_add(y, self.bias)
        return y.reshape(shape[:-1] + (self.out_features,))


class Conv2d(nn.Cell):
    """2-D convolution on (N, C, H, W) with symmetric zero padding; weight (out, in, kh, kw)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True, dtype=ms.float32):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        bound = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.weight = _uniform((out_channels, in_channels, kernel_size, kernel_size), bound, dtype)
        self.bias = _uniform((out_channels,), bound, dtype) if bias else None
        self.use_mint = backend.use_mint_ops()
        # MindSpore 2.10's CPU Conv2D kernel is ~50x slower on a 3x3 conv than im2col (ops.unfold) + one matmul:
        # 16 frames of 64 channels at 32x32, 64 -> 64: 1.2-2.0 s vs 0.03 s forward, 5.2 s vs 0.18 s with the
        # backward. 1x1 convs are fast as convs. Same sums in another order: results agree to float rounding.
        self.use_unfold = not self.use_mint and kernel_size > 1 and backend.device_target() == "CPU"
        # Faster still, where it builds: the compiled kernel (kernels/cpu/conv.cc: per-thread im2col bands and
        # oneDNN sgemm straight into the output, bias fused; 1.3-1.5x the unfold path forward and backward).
        self.native = None
        if not self.use_mint and use_native_kernel(conv.LIBRARY):
            self.native = conv.conv2d_function(stride, padding, bias)

    def construct(self, x):
        if self.use_mint:
            return ascend_ops.conv2d(x, self.weight, self.bias, self.stride, self.padding)
        if self.native is not None and x.dtype == ms.float32 and self.weight.dtype == ms.float32:
            if self.bias is None:
                return self.native(x, self.weight)
            return self.native(x, self.weight, self.bias)
        if self.use_unfold:
            return self.unfold_conv(x)
        if self.padding > 0:
            y = ops.conv2d(x, self.weight, None, self.stride, "pad", self.padding)
        else:
            y = ops.conv2d(x, self.weight, None, self.stride, "valid", 0)
        if self.bias is not None:
            y = ops.bias_add(y, self.bias)
        return y


    def unfold_conv(self, x):
        n, _, h, w = x.shape
        k, s, p = self.kernel_size, self.stride, self.padding
        out_h, out_w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        # (n, c*k*k, out_h*out_w), channel-major then kernel row/column: the order of weight.reshape(out, -1).
        columns = ops.unfold(x, k, 1, p, s).reshape(n, -1, out_h, out_w)
        # The product as a 1x1 conv: ops.matmul(weight, columns) would first copy the weight n times through
        # BroadcastTo (2.5x slower at 256 channels, 8x8), while the 1x1 Conv2D kernel is fast (see above).
        y = ops.conv2d(columns, self.weight.reshape(self.out_channels, -1, 1, 1), None, 1, "valid")
        if self.bias is not None:
            y = ops.bias_add(y, self.bias)
        return y


class GroupNorm(nn.Cell):
    """GroupNorm over (N, C, *): statistics per sample and group over (C/G) x all trailing axes.

    `construct(x, frames=1)`: with frames > 1, x is a video with its frames folded into the batch,
    ((B F), C, H, W), and each sample's statistics span its F frames -- exactly PyTorch's GroupNorm on the
    official (B, C, F, H, W) tensor (docs/reference.md), while the convolutions around it see plain 2-D batches.
    `fused_silu=True` applies SiLU to the output (the resnets' norm -> SiLU pairs), in the same pass on CPU.
    Statistics are computed in fp32 whatever the input dtype. `per_frame = True` (set before the network compiles;
    tav.models.resnet.set_group_norm_scope) gives every frame its own statistics, as the 2-D model was trained.
    """

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, dtype=ms.float32, fused_silu=False):
        super().__init__()
        if num_channels % num_groups != 0:
            raise ValueError(f"GroupNorm: {num_channels} channels do not split into {num_groups} groups")
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        self.fused_silu = fused_silu
        self.per_frame = False
        if affine:
            self.weight = Parameter(initializer(One(), (num_channels,), dtype))
            self.bias = Parameter(initializer(Zero(), (num_channels,), dtype))
        self.use_mint = backend.use_mint_ops()
        # The compiled CPU kernel (kernels/cpu/norms.cc): statistics across folded frames without transposing,
        # SiLU fused; 1.6x faster than MindSpore's GroupNorm + Sigmoid + Mul even before the saved transposes.
        self.native = None
        if affine and use_native_kernel(norms.LIBRARY):
            self.native = GroupNormFunction(fused_silu)

    def construct(self, x, frames=1):
        if self.per_frame:
            frames = 1
        if self.native is not None and x.dtype == ms.float32:
            return self.native(x, self.weight, self.bias, group_norm_scalars(self.eps, frames, self.num_groups))
        shape = x.shape
        # (N, C, rest, 1), with a video's frames moved next to its other positions when they are folded.
        grouped = fold_frames_into_positions(x, frames)
        weight = self.weight.astype(ms.float32) if self.affine else None
        bias = self.bias.astype(ms.float32) if self.affine else None
        if self.use_mint:
            y = ascend_ops.group_norm(grouped.astype(ms.float32), self.num_groups, weight, bias, self.eps)
        else:
            # The GroupNorm kernel on (N, C, rest, 1): one op, no broadcast workspace (note at the top), and faster
            # than mean/var from reductions (10 vs 15 ms on 2 x 64 x 8 x 32 x 32).
            y = ops.group_norm(grouped.astype(ms.float32), self.num_groups, weight, bias, self.eps)
        y = y.astype(x.dtype)
        y = unfold_frames_from_positions(y, shape, frames)
        return silu(y) if self.fused_silu else y


def fold_frames_into_positions(x, frames):
    """((B F), C, *rest) -> (B, C, F * prod(rest), 1): a video's frames as more positions of each channel."""
    shape = x.shape
    if frames == 1:
        return x.reshape(shape[0], shape[1], -1, 1)
    b = shape[0] // frames
    return x.reshape(b, frames, shape[1], -1).transpose(0, 2, 1, 3).reshape(b, shape[1], -1, 1)


def unfold_frames_from_positions(y, shape, frames):
    """The inverse of fold_frames_into_positions, back to `shape`."""
    if frames == 1:
        return y.reshape(shape)
    b = shape[0] // frames
    return y.reshape(b, shape[1], frames, -1).transpose(0, 2, 1, 3).reshape(shape)


class LayerNorm(nn.Cell):
    """LayerNorm over the last axis with PyTorch names (weight, bias) and PyTorch's default eps 1e-5."""

    def __init__(self, normalized_shape, eps=1e-5, dtype=ms.float32):
        super().__init__()
        self.normalized_shape = normalized_shape
        self.eps = eps
        self.weight = Parameter(initializer(One(), (normalized_shape,), dtype))
        self.bias = Parameter(initializer(Zero(), (normalized_shape,), dtype))
        self.use_mint = backend.use_mint_ops()
        self.native = None
        if not self.use_mint:
            self.layer_norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)
            # The compiled CPU kernel: 6x faster than the LayerNorm op on (16 x 1024, 64) rows.
            if use_native_kernel(norms.LIBRARY):
                self.native = LayerNormFunction()

    def construct(self, x):
        weight, bias = self.weight.astype(ms.float32), self.bias.astype(ms.float32)
        if self.use_mint:
            y = ascend_ops.layer_norm(x.astype(ms.float32), (self.normalized_shape,), weight, bias, self.eps)
            return y.astype(x.dtype)
        if self.native is not None and x.dtype == ms.float32:
            return self.native(x, self.weight, self.bias, ms.Tensor([self.eps], ms.float32))
        return self.layer_norm(x.astype(ms.float32), weight, bias)[0].astype(x.dtype)


class Dropout(nn.Cell):
    """Dropout placeholder that keeps PyTorch's module positions (e.g. `to_out.1`); Tune-A-Video uses p=0."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def construct(self, x):
        if self.training and self.p > 0:
            return ops.dropout(x, self.p, True)
        return x


def match_weight_gradients(network):
    """Tell every native Linear/Conv2d in `network` whether its weight trains (Parameter.requires_grad), so their
    backward kernels skip the weight gradient of frozen layers -- most of them when tuning. Call after choosing the
    trainable set and before the train step compiles (graph mode reads the flag as a constant)."""
    for _, cell in network.cells_and_names():
        if isinstance(cell, (Linear, Conv2d)) and cell.native is not None:
            cell.native.weight_grad = bool(cell.weight.requires_grad)


def add_channel_vectors(x, vectors):
    """x (N, C, ...) + vectors (N, C) broadcast over the trailing axes, as one bias_add over N*C channels (no
    broadcasting Add: see the note at the top)."""
    shape = x.shape
    return ops.bias_add(x.reshape(1, shape[0] * shape[1], -1), vectors.reshape(-1)).reshape(shape)


def silu(x):
    return ops.silu(x)


def gelu(x):
    """Exact (erf) GELU, as torch.nn.functional.gelu's default: x/2 (1 + erf(x/sqrt(2))), torch's own formula.

    Spelled out because ops.gelu(approximate="none") broadcasts internally and so keeps workspace alive until
    the graph ends on CPU (the note at the top): 1.1 GiB over 8 calls on a 32 MiB tensor, none this way."""
    return x * 0.5 * (1.0 + ops.erf(x * 0.7071067811865476))


class GatedGELU(nn.Cell):
    """(..., 2I) -> hidden * gelu(gate), hidden the first I columns, gate the last I (diffusers' GEGLU after its
    projection). On CPU one compiled pass (kernels/cpu/norms.cc), 1.8x faster than split + erf + products."""

    def __init__(self):
        super().__init__()
        self.native = None
        if use_native_kernel(norms.LIBRARY):
            self.native = GEGLUFunction()

    def construct(self, projected):
        if self.native is not None and projected.dtype == ms.float32:
            return self.native(projected)
        hidden, gate = ops.chunk(projected, 2, -1)
        return hidden * gelu(gate)


class SwapMiddleAxes(nn.Cell):
    """(A, B, C, D) -> (A, C, B, D): the UNet's layout changes (channels <-> tokens, frames <-> positions).

    On CPU a compiled copy (kernels/cpu/layout.cc): MindSpore 2.10's CPU Transpose holds twice its output as workspace for the life of
    the graph (a 64 MiB transpose kept 128 MiB), which was most of tav's memory above PyTorch's."""

    def __init__(self):
        super().__init__()
        self.native = layout.SwapMiddleAxesFunction() if use_native_kernel(layout.LIBRARY) else None

    def construct(self, x):
        if self.native is not None and x.dtype == ms.float32:
            return self.native(x)
        return x.transpose(0, 2, 1, 3)


@ops.constexpr
def _mint_flavour():
    # The op flavour as a compile-time constant, for the functions below (Cells decide at construction).
    return backend.use_mint_ops()


def upsample_nearest(x, size):
    """Nearest-neighbour resize of the last two axes of (N, C, H, W) to `size`, with PyTorch's 'nearest' index
    rule src = floor(dst * in / out). mint's on Ascend (native kernel there; ops.interpolate goes through
    ResizeNearestNeighborV2)."""
    if _mint_flavour():
        return ascend_ops.interpolate_nearest(x, size)
    return ops.interpolate(x, size=size, mode="nearest")


def pad_right_bottom(x, amount=1):
    """Zero-pad one column on the right and one row at the bottom (the VAE downsampler's asymmetric pad). mint's
    on Ascend (native ConstantPadND; ops.pad is PadV3 there).

    Elsewhere two concats with zeros, not ops.pad: MindSpore 2.10's CPU PadV3 inside a compiled value_and_grad
    graph gives wrong gradients from the graph's second run on and later hangs in its strided copy (docs/world.md
    has the evidence). Same values; the backward is two slices."""
    if _mint_flavour():
        return ascend_ops.pad(x, (0, amount, 0, amount))
    n, c, h, w = x.shape
    x = ops.concat((x, ops.zeros((n, c, h, amount), x.dtype)), 3)
    return ops.concat((x, ops.zeros((n, c, amount, w + amount), x.dtype)), 2)
