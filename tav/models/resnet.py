"""Convolutional blocks of the inflated UNet on (B, C, F, H, W): ResnetBlock3D, Downsample3D, Upsample3D."""
from mindspore import nn

from tav.nn import GroupNorm, InflatedConv3d, Linear, add_channel_vectors, silu, upsample_nearest


class ResnetBlock3D(nn.Cell):
    """norm1 -> SiLU -> conv1 (+ time projection) -> norm2 -> SiLU -> conv2, plus a (1x1) shortcut.

    The GroupNorms see the whole 5-D tensor, so their statistics span all frames, as in the official model
    (reference 1.5); folding frames into the batch here would not be equivalent.
    """

    def __init__(self, in_channels, out_channels=None, temb_channels=512, groups=32, groups_out=None, eps=1e-6,
                 time_embedding_norm="default", output_scale_factor=1.0):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        groups_out = groups if groups_out is None else groups_out
        if time_embedding_norm not in ("default", "scale_shift"):
            raise ValueError(f"resnet_time_scale_shift {time_embedding_norm!r} is not supported; use 'default' or 'scale_shift'")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.scale_shift = time_embedding_norm == "scale_shift"
        self.output_scale_factor = output_scale_factor
        self.norm1 = GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = InflatedConv3d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = Linear(temb_channels, out_channels * 2 if self.scale_shift else out_channels)
        self.norm2 = GroupNorm(groups_out, out_channels, eps=eps)
        self.conv2 = InflatedConv3d(out_channels, out_channels, 3, padding=1)
        self.use_shortcut = in_channels != out_channels
        if self.use_shortcut:
            self.conv_shortcut = InflatedConv3d(in_channels, out_channels, 1)

    def construct(self, x, temb):
        h = self.conv1(silu(self.norm1(x)))
        t = self.time_emb_proj(silu(temb))
        if self.scale_shift:
            t = t[:, :, None, None, None]
            scale = t[:, : self.out_channels]
            shift = t[:, self.out_channels:]
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(add_channel_vectors(h, t))  # the same time vector on every frame and pixel
        h = self.conv2(silu(h))
        shortcut = self.conv_shortcut(x) if self.use_shortcut else x
        out = shortcut + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample3D(nn.Cell):
    """3x3 stride-2 conv per frame (registered as `conv`, as the official `name="op"` blocks do)."""

    def __init__(self, channels, out_channels=None, padding=1):
        super().__init__()
        if padding == 0:
            raise ValueError("downsample_padding=0 is not supported (the official Downsample3D does not implement it)")
        self.conv = InflatedConv3d(channels, out_channels or channels, 3, stride=2, padding=padding)

    def construct(self, x):
        return self.conv(x)


class Upsample3D(nn.Cell):
    """Nearest resize of H and W (frames untouched) to `output_size`, then a 3x3 conv per frame."""

    def __init__(self, channels, out_channels=None):
        super().__init__()
        self.conv = InflatedConv3d(channels, out_channels or channels, 3, padding=1)

    def construct(self, x, output_size):
        b, c, f, h, w = x.shape
        frames = x.transpose(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        frames = upsample_nearest(frames, output_size)
        up = frames.reshape(b, f, c, output_size[0], output_size[1]).transpose(0, 2, 1, 3, 4)
        return self.conv(up)
