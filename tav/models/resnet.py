"""Convolutional blocks of the inflated UNet: ResnetBlock3D, Downsample3D, Upsample3D.

They work on videos with the frames folded into the batch, ((B F), C, H, W) batch-major/frame-minor, and are
told the frame count: the official blocks' convolutions are per-frame 2-D convs on (B, C, F, H, W) ("inflated"),
which on the folded layout are plain 2-D convs with no transposes; only the GroupNorms must see whole videos
(frames=F), as the official 5-D GroupNorm does (docs/reference.md).
"""
from mindspore import nn, ops

from tav.nn import Conv2d, GroupNorm, Linear, add_channel_vectors, silu, upsample_nearest


def per_frame(vectors, frames):
    """(B, C) -> ((B F), C): each video's vector repeated for its frames, in the folded order."""
    if frames == 1:
        return vectors
    b, c = vectors.shape
    return ops.broadcast_to(vectors.reshape(b, 1, c), (b, frames, c)).reshape(b * frames, c)


# Where the UNet's GroupNorms take their statistics: over all of a video's frames ("video": the official inflated
# model, whose GroupNorm sees the 5-D tensor) or per frame ("frame": as the 2-D model was trained; why in
# docs/reference.md, "Where the norms see whole videos").
GROUP_NORM_SCOPES = ("video", "frame")


def set_group_norm_scope(network, scope):
    """Make every GroupNorm in `network` take its statistics over `scope` (GROUP_NORM_SCOPES), before the network
    compiles. The transformers' GroupNorms are per frame either way; the VAE's see one frame each. Returns the
    number of norms set."""
    if scope not in GROUP_NORM_SCOPES:
        raise ValueError(f"group_norm_scope must be one of {', '.join(GROUP_NORM_SCOPES)}, got {scope!r}")
    norms = [cell for _, cell in network.cells_and_names() if isinstance(cell, GroupNorm)]
    for cell in norms:
        cell.per_frame = scope == "frame"
    return len(norms)


class ResnetBlock3D(nn.Cell):
    """norm1 -> SiLU -> conv1 (+ time projection) -> norm2 -> SiLU -> conv2, plus a (1x1) shortcut.

    The GroupNorms' statistics span all frames of a video, as in the official model (docs/reference.md): they are
    given the frame count (norm -> SiLU is one fused layer).
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
        self.norm1 = GroupNorm(groups, in_channels, eps=eps, fused_silu=True)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = Linear(temb_channels, out_channels * 2 if self.scale_shift else out_channels)
        # scale_shift modulates between the norm and the SiLU, so only the default norm2 fuses them.
        self.norm2 = GroupNorm(groups_out, out_channels, eps=eps, fused_silu=not self.scale_shift)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.use_shortcut = in_channels != out_channels
        if self.use_shortcut:
            self.conv_shortcut = Conv2d(in_channels, out_channels, 1)

    def construct(self, x, temb, frames):
        h = self.conv1(self.norm1(x, frames))
        t = per_frame(self.time_emb_proj(silu(temb)), frames)
        if self.scale_shift:
            t = t[:, :, None, None]
            scale = t[:, : self.out_channels]
            shift = t[:, self.out_channels:]
            h = silu(self.norm2(h, frames) * (1 + scale) + shift)
        else:
            h = self.norm2(add_channel_vectors(h, t), frames)  # the same time vector on every frame and pixel
        h = self.conv2(h)
        shortcut = self.conv_shortcut(x) if self.use_shortcut else x
        out = shortcut + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample3D(nn.Cell):
    """3x3 stride-2 conv per frame (registered as `conv`, as the official `name="op"` blocks do); ((B F), C, H, W)."""

    def __init__(self, channels, out_channels=None, padding=1):
        super().__init__()
        if padding == 0:
            raise ValueError("downsample_padding=0 is not supported (the official Downsample3D does not implement it)")
        self.conv = Conv2d(channels, out_channels or channels, 3, stride=2, padding=padding)

    def construct(self, x):
        return self.conv(x)


class Upsample3D(nn.Cell):
    """Nearest resize of each frame's H and W to `output_size`, then a 3x3 conv per frame; ((B F), C, H, W)."""

    def __init__(self, channels, out_channels=None):
        super().__init__()
        self.conv = Conv2d(channels, out_channels or channels, 3, padding=1)

    def construct(self, x, output_size):
        return self.conv(upsample_nearest(x, output_size))
