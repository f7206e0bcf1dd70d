"""Stable Diffusion's VAE: diffusers' `AutoencoderKL`, with its config fields and state-dict key names, plus the
video helpers Tune-A-Video needs (frames folded into the batch, encoded/decoded in chunks to bound memory).

    vae = AutoencoderKL.from_pretrained("stable-diffusion-v1-5")      # the SD folder or its vae/ subfolder
    latents = video_to_latents(vae, pixels, noise_seed=0)              # (B, 3, F, H, W) -> (B, 4, F, H/8, W/8)
    frames = latents_to_video(vae, latents)                            # -> (B, 3, F, H, W) in [0, 1]

Structure and numbers follow diffusers 0.35.2 (models/autoencoders/vae.py, autoencoder_kl.py, resnet.py,
unets/unet_2d_blocks.py): every norm uses eps 1e-6, resnets have no time embedding, the mid-block attention is one
head over the H*W positions with a residual, the encoder's downsampler pads right/bottom by one then runs a
stride-2 conv, the decoder runs its up blocks from the widest channel count to the narrowest.

About 600 lines because the blocks are the VAE's own (diffusers' names, no time embedding) and are used nowhere
else; the UNet's blocks live in tav.models.unet_blocks.
"""
import os
import re
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Optional

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from tav import __version__ as tav_version
from tav import checkpoint
from tav.kernels import attention
from tav.nn import Conv2d, Dropout, GroupNorm, Linear, pad_right_bottom, silu, upsample_nearest
from tav.noise import standard_normal  # noqa: F401 - also the VAE's public name for its posterior noise

CONFIG_NAME = "config.json"
WEIGHTS_STEM = "diffusion_pytorch_model"
NORM_EPS = 1e-6  # every GroupNorm in the VAE (resnets, attention, conv_norm_out)
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamp
_SUPPORTED_ACT_FNS = ("silu", "swish")  # diffusers maps both names to SiLU


# ---------------------------------------------------------------------------------------------------------
# Config


@dataclass
class AutoencoderKLConfig:
    """The fields of diffusers' `vae/config.json`, with diffusers' defaults for absent keys.

    Only what SD-family VAEs use is supported: DownEncoderBlock2D / UpDecoderBlock2D blocks and SiLU; anything
    else raises ValueError naming the field. `latents_mean`/`latents_std` are kept for round-tripping but tav's
    helpers (like the SD 1.x pipelines) use only `scaling_factor` and `shift_factor`.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple = ("DownEncoderBlock2D",)
    up_block_types: tuple = ("UpDecoderBlock2D",)
    block_out_channels: tuple = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: object = 32  # an int, or [h, w] in some configs; informational here
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None
    latents_mean: Optional[tuple] = None
    latents_std: Optional[tuple] = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        for name in ("down_block_types", "up_block_types", "block_out_channels", "latents_mean", "latents_std"):
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, tuple(value))
        if isinstance(self.sample_size, list):
            self.sample_size = tuple(self.sample_size)
        if self.scaling_factor is None:  # very old configs write null where newer ones omit the key
            self.scaling_factor = 0.18215
        self._validate()

    def _validate(self):
        for name in ("in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        channels = self.block_out_channels
        if not isinstance(channels, tuple) or not channels or not all(
            isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in channels
        ):
            raise ValueError(f"block_out_channels must be a non-empty list of positive integers, got {channels!r}")
        for name, supported in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = getattr(self, name)
            if not isinstance(types, tuple) or len(types) != len(channels):
                raise ValueError(
                    f"{name} must list one block per block_out_channels entry ({len(channels)}), got {types!r}"
                )
            for i, block_type in enumerate(types):
                if block_type != supported:
                    raise ValueError(f"{name}[{i}] is {block_type!r}; only {supported!r} is supported")
        if self.act_fn not in _SUPPORTED_ACT_FNS:
            raise ValueError(f"act_fn is {self.act_fn!r}; only 'silu' is supported")
        for c in channels:
            if c % self.norm_num_groups != 0:
                raise ValueError(
                    f"norm_num_groups {self.norm_num_groups} does not divide block_out_channels entry {c}"
                )
        if not isinstance(self.scaling_factor, (int, float)) or self.scaling_factor <= 0:
            raise ValueError(f"scaling_factor must be a positive number, got {self.scaling_factor!r}")
        if self.shift_factor is not None and not isinstance(self.shift_factor, (int, float)):
            raise ValueError(f"shift_factor must be a number or null, got {self.shift_factor!r}")
        for name in ("force_upcast", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, config, source="VAE config"):
        """Build from a parsed config.json. Keys starting with "_" (diffusers' bookkeeping) are skipped; unknown
        keys are ignored with a warning, since diffusers adds fields over time. `source` names the file in
        messages."""
        if not isinstance(config, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(config).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
        if unknown:
            warnings.warn(f"{source}: ignoring unknown AutoencoderKL config keys {unknown}", stacklevel=2)
        try:
            return cls(**{k: v for k, v in config.items() if k in known})
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None

    def to_dict(self):
        """config.json content in diffusers' spelling (lists, `_class_name`), loadable by diffusers too."""
        out = {"_class_name": "AutoencoderKL", "_tav_version": tav_version}
        for key, value in asdict(self).items():
            out[key] = list(value) if isinstance(value, tuple) else value
        return out


# ---------------------------------------------------------------------------------------------------------
# Blocks (diffusers class in brackets; parameter names are that class's)


class ResnetBlock(nn.Cell):
    """Pre-norm residual block without time embedding [ResnetBlock2D, temb_channels=None]:
    x + conv2(silu(norm2(conv1(silu(norm1(x)))))), with a 1x1 `conv_shortcut` when the width changes."""

    def __init__(self, in_channels, out_channels, groups, dtype=ms.float32):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels, eps=NORM_EPS, dtype=dtype)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1, dtype=dtype)
        self.norm2 = GroupNorm(groups, out_channels, eps=NORM_EPS, dtype=dtype)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1, dtype=dtype)
        self.has_shortcut = in_channels != out_channels
        if self.has_shortcut:
            self.conv_shortcut = Conv2d(in_channels, out_channels, 1, dtype=dtype)

    def construct(self, x):
        h = self.conv1(silu(self.norm1(x)))
        h = self.conv2(silu(self.norm2(h)))  # dropout p=0 in every SD VAE: omitted
        if self.has_shortcut:
            x = self.conv_shortcut(x)
        return x + h


class Downsample(nn.Cell):
    """[Downsample2D, padding=0] zero-pad one column right and one row bottom, then a 3x3 stride-2 conv, so the
    output is exactly half the (even) input size."""

    def __init__(self, channels, dtype=ms.float32):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=0, dtype=dtype)

    def construct(self, x):
        return self.conv(pad_right_bottom(x))


class Upsample(nn.Cell):
    """[Upsample2D, use_conv=True] nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels, dtype=ms.float32):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1, dtype=dtype)

    def construct(self, x):
        return self.conv(upsample_nearest(x, (x.shape[2] * 2, x.shape[3] * 2)))


class SpatialSelfAttention(nn.Cell):
    """[Attention with _from_deprecated_attn_block=True] one head over the H*W positions of (N, C, H, W):
    x + to_out(attention(GroupNorm(x))), scale C^-0.5, softmax in fp32, rescale factor 1."""

    def __init__(self, channels, groups, dtype=ms.float32):
        super().__init__()
        self.group_norm = GroupNorm(groups, channels, eps=NORM_EPS, dtype=dtype)
        self.to_q = Linear(channels, channels, dtype=dtype)
        self.to_k = Linear(channels, channels, dtype=dtype)
        self.to_v = Linear(channels, channels, dtype=dtype)
        self.to_out = nn.CellList([Linear(channels, channels, dtype=dtype), Dropout(0.0)])

    def construct(self, x):
        n, c, h, w = x.shape
        tokens = self.group_norm(x).reshape(n, c, h * w).transpose(0, 2, 1)
        out = attention(self.to_q(tokens), self.to_k(tokens), self.to_v(tokens), 1, upcast=True)
        out = self.to_out[1](self.to_out[0](out))
        return x + out.transpose(0, 2, 1).reshape(n, c, h, w)


class MidBlock(nn.Cell):
    """[UNetMidBlock2D, one layer] resnet, (attention), resnet at constant width."""

    def __init__(self, channels, groups, add_attention=True, dtype=ms.float32):
        super().__init__()
        self.add_attention = add_attention
        if add_attention:
            self.attentions = nn.CellList([SpatialSelfAttention(channels, groups, dtype=dtype)])
        self.resnets = nn.CellList(
            [ResnetBlock(channels, channels, groups, dtype=dtype), ResnetBlock(channels, channels, groups, dtype=dtype)]
        )

    def construct(self, x):
        x = self.resnets[0](x)
        if self.add_attention:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class DownEncoderBlock(nn.Cell):
    """[DownEncoderBlock2D] `num_layers` resnets, then (unless last) a Downsample as `downsamplers.0`."""

    def __init__(self, in_channels, out_channels, num_layers, groups, add_downsample, dtype=ms.float32):
        super().__init__()
        self.resnets = nn.CellList(
            [
                ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups, dtype=dtype)
                for i in range(num_layers)
            ]
        )
        self.add_downsample = add_downsample
        if add_downsample:
            self.downsamplers = nn.CellList([Downsample(out_channels, dtype=dtype)])

    def construct(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.add_downsample:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock(nn.Cell):
    """[UpDecoderBlock2D] `num_layers` resnets, then (unless last) an Upsample as `upsamplers.0`."""

    def __init__(self, in_channels, out_channels, num_layers, groups, add_upsample, dtype=ms.float32):
        super().__init__()
        self.resnets = nn.CellList(
            [
                ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups, dtype=dtype)
                for i in range(num_layers)
            ]
        )
        self.add_upsample = add_upsample
        if add_upsample:
            self.upsamplers = nn.CellList([Upsample(out_channels, dtype=dtype)])

    def construct(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.add_upsample:
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Cell):
    """[Encoder, double_z=True] image (N, in_channels, H, W) -> moments (N, 2*latent_channels, h, w)."""

    def __init__(self, config, dtype=ms.float32):
        super().__init__()
        channels = config.block_out_channels
        groups = config.norm_num_groups
        self.conv_in = Conv2d(config.in_channels, channels[0], 3, padding=1, dtype=dtype)
        blocks = []
        for i, out_channels in enumerate(channels):
            in_channels = channels[max(i - 1, 0)]
            add_downsample = i < len(channels) - 1
            blocks.append(
                DownEncoderBlock(in_channels, out_channels, config.layers_per_block, groups, add_downsample, dtype)
            )
        self.down_blocks = nn.CellList(blocks)
        self.mid_block = MidBlock(channels[-1], groups, config.mid_block_add_attention, dtype=dtype)
        self.conv_norm_out = GroupNorm(groups, channels[-1], eps=NORM_EPS, dtype=dtype)
        self.conv_out = Conv2d(channels[-1], 2 * config.latent_channels, 3, padding=1, dtype=dtype)

    def construct(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(silu(self.conv_norm_out(x)))


class Decoder(nn.Cell):
    """[Decoder, norm_type="group"] latent (N, latent_channels, h, w) -> image (N, out_channels, H, W).
    Up blocks run from the widest channel count (block_out_channels[-1]) to the narrowest, each with
    layers_per_block + 1 resnets."""

    def __init__(self, config, dtype=ms.float32):
        super().__init__()
        channels = tuple(reversed(config.block_out_channels))
        groups = config.norm_num_groups
        self.conv_in = Conv2d(config.latent_channels, channels[0], 3, padding=1, dtype=dtype)
        self.mid_block = MidBlock(channels[0], groups, config.mid_block_add_attention, dtype=dtype)
        blocks = []
        for i, out_channels in enumerate(channels):
            in_channels = channels[max(i - 1, 0)]
            add_upsample = i < len(channels) - 1
            blocks.append(
                UpDecoderBlock(in_channels, out_channels, config.layers_per_block + 1, groups, add_upsample, dtype)
            )
        self.up_blocks = nn.CellList(blocks)
        self.conv_norm_out = GroupNorm(groups, channels[-1], eps=NORM_EPS, dtype=dtype)
        self.conv_out = Conv2d(channels[-1], config.out_channels, 3, padding=1, dtype=dtype)

    def construct(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(silu(self.conv_norm_out(x)))


# ---------------------------------------------------------------------------------------------------------
# Posterior


class DiagonalGaussian:
    """The VAE posterior N(mean, exp(logvar)) per latent element [DiagonalGaussianDistribution].

    `logvar` is clamped to [-30, 20] on construction as in diffusers; `std = exp(logvar / 2)`. Works on any
    layout with the channel axis given to `from_moments` (axis 1 for both (N, C, h, w) and (B, C, F, h, w)).
    """

    def __init__(self, mean, logvar):
        self.mean = mean
        self.logvar = ops.clamp(logvar, LOGVAR_RANGE[0], LOGVAR_RANGE[1])
        self.std = ops.exp(0.5 * self.logvar)

    @classmethod
    def from_moments(cls, moments, axis=1):
        """Split the encoder's (mean ‖ logvar) output along `axis` (mean first, as diffusers' torch.chunk)."""
        mean, logvar = ops.chunk(moments, 2, axis)
        return cls(mean, logvar)

    @property
    def var(self):
        return ops.exp(self.logvar)

    def mode(self):
        return self.mean

    def sample(self, noise=None, seed=None):
        """mean + std * noise. Pass `noise` (same shape as mean) to control it exactly, or `seed` (int or
        np.random.Generator) to draw it with `standard_normal`; neither draws fresh, unrepeatable noise."""
        if noise is not None and seed is not None:
            raise ValueError("DiagonalGaussian.sample: pass noise or seed, not both")
        if noise is None:
            noise = standard_normal(self.mean.shape, seed)
        else:
            noise = _as_tensor(noise)
            if tuple(noise.shape) != tuple(self.mean.shape):
                raise ValueError(
                    f"DiagonalGaussian.sample: noise shape {tuple(noise.shape)} != mean shape {tuple(self.mean.shape)}"
                )
        return self.mean + self.std * noise.astype(self.mean.dtype)


# ---------------------------------------------------------------------------------------------------------
# The model


class AutoencoderKL(nn.Cell):
    """Stable Diffusion's KL autoencoder; parameter names are diffusers' state-dict keys.

    `encode(x)` on (N, in_channels, H, W) in [-1, 1] returns a DiagonalGaussian over (N, latent_channels,
    H/2^k, W/2^k) with k = len(block_out_channels) - 1; `decode(z)` maps unscaled latents back to images.
    `construct(x)` is the deterministic round trip decode(encode(x).mode()), as diffusers' forward.
    Inputs are cast to the weights' dtype. In GRAPH_MODE `encoder`, `decoder` and the 1x1 quant convs compile
    as separate graphs; `encode`/`decode` themselves are Python glue.
    """

    def __init__(self, config=None, dtype=ms.float32):
        super().__init__()
        if config is None:
            config = AutoencoderKLConfig()
        elif isinstance(config, dict):
            config = AutoencoderKLConfig.from_dict(config)
        self.config = config
        self.encoder = Encoder(config, dtype=dtype)
        self.decoder = Decoder(config, dtype=dtype)
        latent = config.latent_channels
        self.use_quant_conv = config.use_quant_conv
        self.use_post_quant_conv = config.use_post_quant_conv
        if self.use_quant_conv:
            self.quant_conv = Conv2d(2 * latent, 2 * latent, 1, dtype=dtype)
        if self.use_post_quant_conv:
            self.post_quant_conv = Conv2d(latent, latent, 1, dtype=dtype)
        self.set_train(False)

    # -- numbers from the config

    @property
    def dtype(self):
        return self.encoder.conv_in.weight.dtype

    @property
    def scaling_factor(self):
        return self.config.scaling_factor

    @property
    def shift_factor(self):
        return self.config.shift_factor

    @property
    def downscale_factor(self):
        """Pixels per latent along H and W (8 for SD)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    # -- forward passes

    def encode_moments(self, x):
        """The raw posterior parameters (N, 2*latent_channels, h, w): mean then logvar (unclamped)."""
        moments = self.encoder(x.astype(self.dtype))
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        return moments

    def encode(self, x):
        return DiagonalGaussian.from_moments(self.encode_moments(x), axis=1)

    def decode(self, z):
        """Unscaled latents (N, latent_channels, h, w) -> images (N, out_channels, H, W), roughly in [-1, 1]."""
        z = z.astype(self.dtype)
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def construct(self, x):
        mean, _ = ops.chunk(self.encode_moments(x), 2, 1)
        return self.decode(mean)

    # -- files

    @classmethod
    def from_pretrained(cls, path, dtype=ms.float32, strict=True):
        """Load from a VAE folder (config.json + diffusion_pytorch_model.{safetensors,bin}) or from a pipeline
        folder that has one under `vae/`. Old attention key names (query/key/value/proj_attn) are accepted.
        `dtype` is the parameter dtype (fp32 or fp16 weights load into either). `strict=False` loads what
        matches and warns about the rest."""
        folder = resolve_vae_folder(path)
        config_path = os.path.join(folder, CONFIG_NAME)
        config = AutoencoderKLConfig.from_dict(checkpoint.read_json(config_path, what="VAE config"), source=config_path)
        weights_path = checkpoint.find_weights_file(folder, WEIGHTS_STEM)
        state_dict = rename_legacy_attention_keys(checkpoint.read_state_dict(weights_path))
        model = cls(config, dtype=dtype)
        checkpoint.load_state_dict_into(model, state_dict, strict=strict, dtype=dtype, source=weights_path)
        return model

    def save_pretrained(self, path):
        """Write `path`/config.json and `path`/diffusion_pytorch_model.safetensors (diffusers' current key names,
        the parameters' dtype), each atomically; diffusers' AutoencoderKL.from_pretrained reads the folder."""
        os.makedirs(path, exist_ok=True)
        checkpoint.save_cell(self, os.path.join(path, WEIGHTS_STEM + checkpoint.SAFETENSORS_SUFFIX))
        checkpoint.write_json_atomic(self.config.to_dict(), os.path.join(path, CONFIG_NAME))


def resolve_vae_folder(path):
    """`path`/vae of a pipeline folder, else `path` itself when it holds config.json (checkpoint.component_folder)."""
    return checkpoint.component_folder(path, "vae", CONFIG_NAME)


_LEGACY_ATTENTION_KEY = re.compile(
    r"^(?P<block>(?:.+\.)?attentions\.\d+)\.(?P<old>query|key|value|proj_attn)\.(?P<kind>weight|bias)$"
)
_LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_ATTENTION_LINEAR_WEIGHT = re.compile(r"(?:^|\.)attentions\.\d+\.(?:to_q|to_k|to_v|to_out\.0)\.weight$")


def rename_legacy_attention_keys(state_dict):
    """Return a copy of `state_dict` with the VAE attention's pre-0.14 diffusers names translated:
    `<...>.attentions.N.{query,key,value,proj_attn}.{weight,bias}` -> `to_q`/`to_k`/`to_v`/`to_out.0`.

    Checkpoints converted from the original LDM code may store these projections as 1x1 conv weights
    (C, C, 1, 1); they are squeezed to the linear (C, C). Current names pass through unchanged, so the function
    is safe on any VAE state dict; a key present in both spellings is an error."""
    renamed = {}
    for name, array in state_dict.items():
        match = _LEGACY_ATTENTION_KEY.match(name)
        new_name = name
        if match:
            new_name = f"{match['block']}.{_LEGACY_ATTENTION_NAMES[match['old']]}.{match['kind']}"
        if new_name in renamed:
            raise checkpoint.CheckpointError(
                f"state dict has {new_name!r} twice (in the old attention spelling and the current one)"
            )
        if _ATTENTION_LINEAR_WEIGHT.search(new_name) and np.ndim(array) == 4 and tuple(np.shape(array)[2:]) == (1, 1):
            array = np.asarray(array)[:, :, 0, 0]
        renamed[new_name] = array
    return renamed


# ---------------------------------------------------------------------------------------------------------
# Video helpers. Videos and video latents are (B, C, F, H, W), channels before frames (Tune-A-Video's layout).
# The VAE is per-image, so frames are folded into the batch as (b f): batch-major, frame-minor, run through it
# `chunk_size` images at a time, and unfolded again. chunk_size counts images of the folded batch (a chunk may
# span two clips); None runs them all in one call. Results do not depend on it.


def _as_tensor(x):
    return x if isinstance(x, ms.Tensor) else ms.Tensor(np.asarray(x))


def _check_video(x, channels, what):
    if x.ndim != 5 or x.shape[1] != channels:
        raise ValueError(
            f"{what} must be (batch, {channels}, frames, height, width), got shape {tuple(x.shape)}"
            + (" (a single clip (F, C, H, W) becomes x.transpose(1, 0, 2, 3)[None])" if x.ndim == 4 else "")
        )


def fold_frames(video):
    """(B, C, F, H, W) -> (B*F, C, H, W), image index b*F + f."""
    b, c, f, h, w = video.shape
    return video.transpose(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


def unfold_frames(images, frames):
    """(B*F, C, H, W) with index b*F + f -> (B, C, F, H, W)."""
    n, c, h, w = images.shape
    return images.reshape(n // frames, frames, c, h, w).transpose(0, 2, 1, 3, 4)


def map_in_chunks(fn, images, chunk_size):
    """fn applied to `images` (N, ...) `chunk_size` items at a time, outputs concatenated along axis 0.

    fn must treat batch items independently (true of the VAE: GroupNorm is per item). The last chunk is padded
    by repeating its final item so every call has the same shape (one graph compilation in GRAPH_MODE); the
    padded outputs are dropped. chunk_size=None runs everything in one call."""
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    n = images.shape[0]
    if chunk_size is None or chunk_size >= n:
        return fn(images)
    outputs = []
    for start in range(0, n, chunk_size):
        part = images[start : start + chunk_size]
        real = part.shape[0]
        if real < chunk_size:
            filler = ops.tile(part[real - 1 : real], (chunk_size - real,) + (1,) * (part.ndim - 1))
            part = ops.concat((part, filler), 0)
        outputs.append(fn(part)[:real])
    return ops.concat(outputs, 0)


def encode_video(vae, pixel_values, chunk_size=8):
    """Posterior of every frame: pixel_values (B, in_channels, F, H, W) in [-1, 1] -> DiagonalGaussian whose
    mean/logvar/std are (B, latent_channels, F, h, w). Unscaled (no scaling_factor)."""
    pixel_values = _as_tensor(pixel_values)
    _check_video(pixel_values, vae.config.in_channels, "encode_video: pixel_values")
    frames = pixel_values.shape[2]
    moments = map_in_chunks(vae.encode_moments, fold_frames(pixel_values), chunk_size)
    return DiagonalGaussian.from_moments(unfold_frames(moments, frames), axis=1)


def decode_video(vae, latents, chunk_size=8):
    """Unscaled latents (B, latent_channels, F, h, w) -> the decoder's raw output (B, out_channels, F, H, W),
    roughly in [-1, 1]."""
    latents = _as_tensor(latents)
    _check_video(latents, vae.config.latent_channels, "decode_video: latents")
    frames = latents.shape[2]
    return unfold_frames(map_in_chunks(vae.decode, fold_frames(latents), chunk_size), frames)


def scale_latents(vae, z):
    """VAE latents -> diffusion latents: (z - shift_factor) * scaling_factor (shift only if configured)."""
    if vae.shift_factor is not None:
        z = z - vae.shift_factor
    return z * vae.scaling_factor


def unscale_latents(vae, latents):
    """Diffusion latents -> VAE latents, the inverse of scale_latents."""
    z = latents / vae.scaling_factor
    if vae.shift_factor is not None:
        z = z + vae.shift_factor
    return z


def video_to_latents(vae, pixel_values, sample=True, noise_seed=None, noise=None, chunk_size=8):
    """Video (B, 3, F, H, W) in [-1, 1] -> diffusion latents (B, 4, F, h, w), scaled by scaling_factor.

    sample=True (Tune-A-Video's training) draws mean + std * noise, with noise drawn once in the output layout
    from `noise_seed` (so the result does not depend on chunk_size) or given as `noise` (B, 4, F, h, w);
    with neither the noise is fresh each call. sample=False returns the posterior mean."""
    posterior = encode_video(vae, pixel_values, chunk_size=chunk_size)
    if sample:
        z = posterior.sample(noise=noise, seed=noise_seed)
    else:
        if noise is not None or noise_seed is not None:
            raise ValueError("video_to_latents: noise/noise_seed given with sample=False")
        z = posterior.mode()
    return scale_latents(vae, z)


def latents_to_video(vae, latents, chunk_size=8):
    """Diffusion latents (B, 4, F, h, w) -> video (B, 3, F, H, W) in [0, 1], float32: unscale, decode,
    clamp(x / 2 + 0.5, 0, 1), as the official pipeline's decode_latents."""
    video = decode_video(vae, unscale_latents(vae, _as_tensor(latents)), chunk_size=chunk_size)
    return ops.clamp(video.astype(ms.float32) / 2 + 0.5, 0.0, 1.0)
