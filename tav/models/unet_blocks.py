"""Down, mid and up stages of the inflated UNet (official block type names, diffusers' channel bookkeeping).

Every stage works on videos with frames folded into the batch, ((B F), C, H, W), and passes `frames` on to the
resnets (whose GroupNorms span a video's frames) and transformers (whose attn1/attn_temp couple frames)."""
from mindspore import nn, ops

from tav.models.attention import Transformer3DModel
from tav.models.resnet import Downsample3D, ResnetBlock3D, Upsample3D


def transformer_stack(num_layers, channels, num_attention_heads, cross_attention_dim, groups, attention_options):
    """One Transformer3DModel per resnet; `num_attention_heads` heads of width channels // heads."""
    return nn.CellList([
        Transformer3DModel(num_attention_heads, channels // num_attention_heads, channels, cross_attention_dim,
                           norm_num_groups=groups, **attention_options)
        for _ in range(num_layers)
    ])


class DownBlock3D(nn.Cell):
    has_cross_attention = False

    def __init__(self, num_layers, in_channels, out_channels, temb_channels, add_downsample, resnet_eps,
                 resnet_groups, downsample_padding=1, resnet_time_scale_shift="default", output_scale_factor=1.0,
                 **_attention_options):
        super().__init__()
        self.resnets = nn.CellList([
            ResnetBlock3D(in_channels if i == 0 else out_channels, out_channels, temb_channels, resnet_groups,
                          eps=resnet_eps, time_embedding_norm=resnet_time_scale_shift,
                          output_scale_factor=output_scale_factor)
            for i in range(num_layers)
        ])
        self.add_downsample = add_downsample
        if add_downsample:
            self.downsamplers = nn.CellList([Downsample3D(out_channels, out_channels, downsample_padding)])

    def construct(self, x, temb, encoder_hidden_states, frames):
        skips = ()
        for resnet in self.resnets:
            x = resnet(x, temb, frames)
            skips += (x,)
        if self.add_downsample:
            x = self.downsamplers[0](x)
            skips += (x,)
        return x, skips


class CrossAttnDownBlock3D(DownBlock3D):
    has_cross_attention = True

    def __init__(self, num_layers, in_channels, out_channels, temb_channels, add_downsample, resnet_eps,
                 resnet_groups, num_attention_heads, cross_attention_dim, downsample_padding=1,
                 resnet_time_scale_shift="default", output_scale_factor=1.0, **attention_options):
        super().__init__(num_layers, in_channels, out_channels, temb_channels, add_downsample, resnet_eps,
                         resnet_groups, downsample_padding, resnet_time_scale_shift, output_scale_factor)
        self.attentions = transformer_stack(num_layers, out_channels, num_attention_heads, cross_attention_dim,
                                            resnet_groups, attention_options)

    def construct(self, x, temb, encoder_hidden_states, frames):
        skips = ()
        for i in range(len(self.resnets)):
            x = self.attentions[i](self.resnets[i](x, temb, frames), encoder_hidden_states, frames)
            skips += (x,)
        if self.add_downsample:
            x = self.downsamplers[0](x)
            skips += (x,)
        return x, skips


class UNetMidBlock3DCrossAttn(nn.Cell):
    """resnet, then (transformer, resnet) once."""

    def __init__(self, in_channels, temb_channels, resnet_eps, resnet_groups, num_attention_heads,
                 cross_attention_dim, resnet_time_scale_shift="default", output_scale_factor=1.0,
                 **attention_options):
        super().__init__()
        attention_options.pop("only_cross_attention", None)  # the official mid block never passes it
        resnet = lambda: ResnetBlock3D(in_channels, in_channels, temb_channels, resnet_groups, eps=resnet_eps,  # noqa: E731
                                       time_embedding_norm=resnet_time_scale_shift,
                                       output_scale_factor=output_scale_factor)
        self.resnets = nn.CellList([resnet(), resnet()])
        self.attentions = nn.CellList([
            Transformer3DModel(num_attention_heads, in_channels // num_attention_heads, in_channels,
                               cross_attention_dim, norm_num_groups=resnet_groups, **attention_options)
        ])

    def construct(self, x, temb, encoder_hidden_states, frames):
        x = self.resnets[0](x, temb, frames)
        x = self.attentions[0](x, encoder_hidden_states, frames)
        return self.resnets[1](x, temb, frames)


class UpBlock3D(nn.Cell):
    has_cross_attention = False

    def __init__(self, num_layers, in_channels, out_channels, prev_output_channel, temb_channels, add_upsample,
                 resnet_eps, resnet_groups, resnet_time_scale_shift="default", output_scale_factor=1.0,
                 **_attention_options):
        super().__init__()
        self.resnets = nn.CellList([
            ResnetBlock3D((prev_output_channel if i == 0 else out_channels)
                          + (in_channels if i == num_layers - 1 else out_channels),
                          out_channels, temb_channels, resnet_groups, eps=resnet_eps,
                          time_embedding_norm=resnet_time_scale_shift, output_scale_factor=output_scale_factor)
            for i in range(num_layers)
        ])
        self.add_upsample = add_upsample
        if add_upsample:
            self.upsamplers = nn.CellList([Upsample3D(out_channels, out_channels)])

    def upsample(self, x, upsample_size):
        if self.add_upsample:
            x = self.upsamplers[0](x, upsample_size)
        return x

    def construct(self, x, skips, temb, encoder_hidden_states, frames, upsample_size):
        n = len(skips)
        for i in range(len(self.resnets)):
            x = self.resnets[i](ops.cat([x, skips[n - 1 - i]], 1), temb, frames)
        return self.upsample(x, upsample_size)


class CrossAttnUpBlock3D(UpBlock3D):
    has_cross_attention = True

    def __init__(self, num_layers, in_channels, out_channels, prev_output_channel, temb_channels, add_upsample,
                 resnet_eps, resnet_groups, num_attention_heads, cross_attention_dim,
                 resnet_time_scale_shift="default", output_scale_factor=1.0, **attention_options):
        super().__init__(num_layers, in_channels, out_channels, prev_output_channel, temb_channels, add_upsample,
                         resnet_eps, resnet_groups, resnet_time_scale_shift, output_scale_factor)
        self.attentions = transformer_stack(num_layers, out_channels, num_attention_heads, cross_attention_dim,
                                            resnet_groups, attention_options)

    def construct(self, x, skips, temb, encoder_hidden_states, frames, upsample_size):
        n = len(skips)
        for i in range(len(self.resnets)):
            x = self.resnets[i](ops.cat([x, skips[n - 1 - i]], 1), temb, frames)
            x = self.attentions[i](x, encoder_hidden_states, frames)
        return self.upsample(x, upsample_size)


DOWN_BLOCKS = {"CrossAttnDownBlock3D": CrossAttnDownBlock3D, "DownBlock3D": DownBlock3D}
UP_BLOCKS = {"CrossAttnUpBlock3D": CrossAttnUpBlock3D, "UpBlock3D": UpBlock3D}
MID_BLOCKS = {"UNetMidBlock3DCrossAttn": UNetMidBlock3DCrossAttn}
