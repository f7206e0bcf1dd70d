"""UNet3DConditionModel: Stable Diffusion's UNet inflated to video, as the official Tune-A-Video model.

Configured by `UNet3DConfig`, whose fields are diffusers' UNet2DConditionModel `config.json` fields, so an SD
1.x/2.x UNet folder builds it directly. Parameter names are the official state-dict keys (diffusers naming plus
`attn_temp.*` / `norm_temp.*`), so loading is name for name.
"""
import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Optional, Tuple, Union

import numpy as np

import mindspore as ms
from mindspore import nn, ops

from tav import checkpoint
from tav.kernels import ATTENTION_BACKENDS
from tav.models.embeddings import TimestepEmbedding, Timesteps
from tav.models.unet_blocks import DOWN_BLOCKS, MID_BLOCKS, UP_BLOCKS
from tav.nn import Conv2d, GroupNorm, LayerNorm, SwapMiddleAxes

WEIGHTS_STEM = "diffusion_pytorch_model"
CONFIG_NAME = "config.json"

# 2-D names found in Stable Diffusion configs -> the inflated blocks that replace them.
BLOCK_TYPE_3D = {
    "CrossAttnDownBlock2D": "CrossAttnDownBlock3D",
    "DownBlock2D": "DownBlock3D",
    "UNetMidBlock2DCrossAttn": "UNetMidBlock3DCrossAttn",
    "UpBlock2D": "UpBlock3D",
    "CrossAttnUpBlock2D": "CrossAttnUpBlock3D",
}

# Fields newer diffusers configs carry; we support only the value SD 1.x/2.x use (the first of each tuple).
FIXED_FIELDS = {
    "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "cross_attention_norm": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "mid_block_only_cross_attention": (None, False),
    "projection_class_embeddings_input_dim": (None,),
    "resnet_out_scale_factor": (1.0, 1),
    "resnet_skip_time_act": (False,),
    "reverse_transformer_layers_per_block": (None,),
    "time_cond_proj_dim": (None,),
    "time_embedding_act_fn": (None,),
    "time_embedding_dim": (None,),
    "time_embedding_type": ("positional",),
    "timestep_post_act": (None,),
    "transformer_layers_per_block": (1,),
    "dropout": (0.0, 0),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "act_fn": ("silu", "swish"),
}
# Fields with no effect on the network.
IGNORED_FIELDS = {"addition_embed_type_num_heads", "sample_size"}


@dataclass
class UNet3DConfig:
    sample_size: Optional[int] = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: Tuple[str, ...] = ("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D")
    mid_block_type: str = "UNetMidBlock3DCrossAttn"
    up_block_types: Tuple[str, ...] = ("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D")
    only_cross_attention: Union[bool, Tuple[bool, ...]] = False
    block_out_channels: Tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    # diffusers' naming quirk, kept for config compatibility: this is the NUMBER of heads (docs/reference.md).
    attention_head_dim: Union[int, Tuple[int, ...]] = 8
    num_attention_heads: Optional[Union[int, Tuple[int, ...]]] = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    extra: dict = field(default_factory=dict, repr=False)  # fixed-value fields as read, saved back unchanged

    @classmethod
    def from_dict(cls, raw, source="config"):
        """Validate a diffusers-style config dict. Unsupported values raise, naming the field."""
        raw = dict(raw)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values, extra, unknown = {}, {}, []
        for key, value in raw.items():
            if key.startswith("_"):
                continue
            if key in known:
                values[key] = value
            elif key in FIXED_FIELDS:
                if value not in FIXED_FIELDS[key]:
                    raise ValueError(f"{source}: {key}={value!r} is not supported by tav's UNet3DConditionModel "
                                     f"(supported: {FIXED_FIELDS[key][0]!r})")
                extra[key] = value
            elif key in IGNORED_FIELDS:
                extra[key] = value
            else:
                unknown.append(key)
        if unknown:
            warnings.warn(f"{source}: ignoring unknown UNet config keys {sorted(unknown)}")
        for key in ("dual_cross_attention", "class_embed_type", "num_class_embeds", "act_fn"):
            if key in values and values[key] not in FIXED_FIELDS[key]:
                raise ValueError(f"{source}: {key}={values[key]!r} is not supported by tav's UNet3DConditionModel "
                                 f"(supported: {FIXED_FIELDS[key][0]!r})")
        config = cls(**values, extra=extra)
        config.normalise(source)
        return config

    def normalise(self, source="config"):
        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            setattr(self, name, tuple(getattr(self, name)))
        self.down_block_types = tuple(BLOCK_TYPE_3D.get(t, t) for t in self.down_block_types)
        self.up_block_types = tuple(BLOCK_TYPE_3D.get(t, t) for t in self.up_block_types)
        self.mid_block_type = BLOCK_TYPE_3D.get(self.mid_block_type, self.mid_block_type)
        if self.mid_block_type is None:
            self.mid_block_type = "UNetMidBlock3DCrossAttn"
        for name, allowed in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
            for block in getattr(self, name):
                if block not in allowed:
                    raise ValueError(f"{source}: {name} contains {block!r}; supported: {sorted(allowed)} "
                                     f"(or their 2-D names)")
        if self.mid_block_type not in MID_BLOCKS:
            raise ValueError(f"{source}: mid_block_type={self.mid_block_type!r} is not supported; "
                             f"supported: UNetMidBlock3DCrossAttn / UNetMidBlock2DCrossAttn")
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"{source}: down_block_types, up_block_types and block_out_channels must have the "
                             f"same length (got {len(self.down_block_types)}, {len(self.up_block_types)}, {n})")
        if not isinstance(self.layers_per_block, int):
            raise ValueError(f"{source}: layers_per_block must be an int, got {self.layers_per_block!r}")
        if self.act_fn == "swish":
            self.act_fn = "silu"
        if self.resnet_time_scale_shift not in ("default", "scale_shift"):
            raise ValueError(f"{source}: resnet_time_scale_shift={self.resnet_time_scale_shift!r} is not supported")
        for name in ("attention_head_dim", "num_attention_heads", "only_cross_attention"):
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, tuple(value))
        heads = self.heads_per_block()
        for channels, h, block in zip(self.block_out_channels, heads, self.down_block_types):
            if channels % h != 0:
                raise ValueError(f"{source}: {channels} channels do not split into {h} heads "
                                 f"(attention_head_dim / num_attention_heads)")
            if channels % self.norm_num_groups != 0:
                raise ValueError(f"{source}: norm_num_groups={self.norm_num_groups} does not divide {channels} channels")
        return self

    def heads_per_block(self):
        """Number of heads per down block. diffusers uses `num_attention_heads or attention_head_dim`."""
        heads = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
        if isinstance(heads, int):
            heads = (heads,) * len(self.block_out_channels)
        if len(heads) != len(self.block_out_channels):
            raise ValueError(f"attention_head_dim has {len(heads)} entries for {len(self.block_out_channels)} blocks")
        return tuple(heads)

    def only_cross_attention_per_block(self):
        value = self.only_cross_attention
        if isinstance(value, bool):
            return (value,) * len(self.down_block_types)
        return tuple(value)

    def to_dict(self):
        """The config.json content, with the 3-D block names the official code writes."""
        out = {"_class_name": "UNet3DConditionModel", "_diffusers_version": "0.11.1"}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        if out["num_attention_heads"] is None:
            del out["num_attention_heads"]
        return out


class UNet3DConditionModel(nn.Cell):
    """unet(sample (B, C, F, H, W), timestep, encoder_hidden_states (B, L, D)) -> noise prediction like sample.

    `timestep` may be a Python number, a 0-d tensor or a (B,) tensor (one timestep per video, shared by its frames).
    """

    def __init__(self, config=None, attention_backend="auto"):
        super().__init__()
        if config is None:
            config = UNet3DConfig()
        elif isinstance(config, dict):
            config = UNet3DConfig.from_dict(config)
        else:
            config.normalise()
        if attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention backend {attention_backend!r} unknown; use one of {ATTENTION_BACKENDS}")
        self.config = config
        channels = config.block_out_channels
        heads = config.heads_per_block()
        only_cross = config.only_cross_attention_per_block()
        time_embed_dim = channels[0] * 4
        attention_options = dict(use_linear_projection=config.use_linear_projection,
                                 upcast_attention=config.upcast_attention, attention_backend=attention_backend)

        self.center_input_sample = config.center_input_sample
        self.conv_in = Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.time_proj = Timesteps(channels[0], config.flip_sin_to_cos, config.freq_shift)
        self.time_embedding = TimestepEmbedding(channels[0], time_embed_dim)

        down_blocks = []
        output_channel = channels[0]
        for i, block_type in enumerate(config.down_block_types):
            input_channel, output_channel = output_channel, channels[i]
            down_blocks.append(DOWN_BLOCKS[block_type](
                num_layers=config.layers_per_block, in_channels=input_channel, out_channels=output_channel,
                temb_channels=time_embed_dim, add_downsample=i < len(channels) - 1, resnet_eps=config.norm_eps,
                resnet_groups=config.norm_num_groups, num_attention_heads=heads[i],
                cross_attention_dim=config.cross_attention_dim, downsample_padding=config.downsample_padding,
                resnet_time_scale_shift=config.resnet_time_scale_shift, only_cross_attention=only_cross[i],
                **attention_options))
        self.down_blocks = nn.CellList(down_blocks)

        self.mid_block = MID_BLOCKS[config.mid_block_type](
            in_channels=channels[-1], temb_channels=time_embed_dim, resnet_eps=config.norm_eps,
            resnet_groups=config.norm_num_groups, num_attention_heads=heads[-1],
            cross_attention_dim=config.cross_attention_dim, resnet_time_scale_shift=config.resnet_time_scale_shift,
            output_scale_factor=config.mid_block_scale_factor, **attention_options)

        up_blocks = []
        reversed_channels = list(reversed(channels))
        reversed_heads = list(reversed(heads))
        reversed_only_cross = list(reversed(only_cross))
        output_channel = reversed_channels[0]
        for i, block_type in enumerate(config.up_block_types):
            prev_output_channel, output_channel = output_channel, reversed_channels[i]
            input_channel = reversed_channels[min(i + 1, len(channels) - 1)]
            up_blocks.append(UP_BLOCKS[block_type](
                num_layers=config.layers_per_block + 1, in_channels=input_channel, out_channels=output_channel,
                prev_output_channel=prev_output_channel, temb_channels=time_embed_dim,
                add_upsample=i < len(channels) - 1, resnet_eps=config.norm_eps, resnet_groups=config.norm_num_groups,
                num_attention_heads=reversed_heads[i], cross_attention_dim=config.cross_attention_dim,
                resnet_time_scale_shift=config.resnet_time_scale_shift, only_cross_attention=reversed_only_cross[i],
                **attention_options))
        self.up_blocks = nn.CellList(up_blocks)
        self.up_block_sizes = [config.layers_per_block + 1] * len(up_blocks)

        self.conv_norm_out = GroupNorm(config.norm_num_groups, channels[0], eps=config.norm_eps, fused_silu=True)
        self.conv_out = Conv2d(channels[0], config.out_channels, 3, padding=1)
        self.swap = SwapMiddleAxes()  # (B, C, F, H*W) <-> (B, F, C, H*W) at the entry and exit

    # --- calling -----------------------------------------------------------------------------------------------
    def __call__(self, sample, timestep, encoder_hidden_states):
        # A Python number would be a compile-time constant in graph mode (one graph per timestep): make it data.
        if isinstance(timestep, (int, float, np.integer, np.floating)):
            timestep = ms.Tensor(np.array([timestep], dtype=np.float32 if isinstance(timestep, (float, np.floating)) else np.int64))
        return super().__call__(sample, timestep, encoder_hidden_states)

    def construct(self, sample, timestep, encoder_hidden_states):
        batch = sample.shape[0]
        if self.center_input_sample:
            sample = 2 * sample - 1.0
        timesteps = timestep.reshape(-1)
        if timesteps.shape[0] != batch:
            timesteps = ops.broadcast_to(timesteps, (batch,))
        emb = self.time_embedding(self.time_proj(timesteps).astype(self.conv_in.weight.dtype))

        # Frames folded into the batch for the whole network, ((B F), C, H, W): the per-frame ("inflated") convs
        # are then plain 2-D convs; the blocks are told `frames` where frames interact (GroupNorm, attention).
        b, c, frames, h, w = sample.shape
        x = self.conv_in(self.swap(sample.reshape(b, c, frames, h * w)).reshape(b * frames, c, h, w))
        skips = (x,)
        for i in range(len(self.down_blocks)):
            x, block_skips = self.down_blocks[i](x, emb, encoder_hidden_states, frames)
            skips += block_skips

        x = self.mid_block(x, emb, encoder_hidden_states, frames)

        for i in range(len(self.up_blocks)):
            n = self.up_block_sizes[i]
            block_skips = skips[len(skips) - n:]
            skips = skips[: len(skips) - n]
            # Upsample to the next skip's size, so H and W need only be multiples of 8 (docs/reference.md).
            upsample_size = skips[-1].shape[2:] if i < len(self.up_blocks) - 1 else None
            x = self.up_blocks[i](x, block_skips, emb, encoder_hidden_states, frames, upsample_size)

        out = self.conv_out(self.conv_norm_out(x, frames))
        return self.swap(out.reshape(b, frames, out.shape[1], h * w)).reshape(b, out.shape[1], frames, h, w)

    # --- options -----------------------------------------------------------------------------------------------
    def set_attention_backend(self, backend):
        """Switch every attention layer (attn1, attn2, attn_temp) to `backend`; call before compiling."""
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention backend {backend!r} unknown; use one of {ATTENTION_BACKENDS}")
        for _, cell in self.cells_and_names():
            if hasattr(cell, "attention_backend"):
                cell.attention_backend = backend

    def enable_gradient_checkpointing(self):
        """Recompute resnets and transformers of the down and up blocks in the backward pass (as the official,
        which never checkpoints the mid block)."""
        for block in list(self.down_blocks) + list(self.up_blocks):
            for resnet in block.resnets:
                resnet.recompute()
            if block.has_cross_attention:
                for attn in block.attentions:
                    attn.recompute()

    @property
    def dtype(self):
        return self.conv_in.weight.dtype

    # --- loading and saving ------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config, **kwargs):
        return cls(config, **kwargs)

    @classmethod
    def from_pretrained(cls, path, dtype=None, strict=True, attention_backend="auto"):
        """Load a Tune-A-Video UNet folder (config.json + weights): the folder itself or a pipeline's `unet/`."""
        folder = unet_folder(path)
        config = UNet3DConfig.from_dict(checkpoint.read_json(os.path.join(folder, CONFIG_NAME), what="UNet config"),
                                        source=os.path.join(folder, CONFIG_NAME))
        model = cls(config, attention_backend=attention_backend)
        weights = checkpoint.find_weights_file(folder, WEIGHTS_STEM)
        state = checkpoint.read_state_dict(weights)
        if strict and not any("_temp." in key for key in state):
            raise checkpoint.CheckpointError(
                f"{weights} has no temporal layers (attn_temp / norm_temp): it is a 2-D Stable Diffusion UNet; "
                f"use UNet3DConditionModel.from_pretrained_2d to inflate it")
        checkpoint.load_state_dict_into(model, state, strict=strict, dtype=dtype, source=weights)
        return model

    @classmethod
    def from_pretrained_2d(cls, path, dtype=None, attention_backend="auto", init_seed=None):
        """Inflate a Stable Diffusion 2-D UNet (pipeline folder or its `unet/`) into the 3-D model.

        Block types are renamed to their 3-D versions (a `mid_block_type: UNetMidBlock2DCrossAttn` entry is
        accepted, unlike the official code: its issues #56/#71). Every 2-D weight is loaded strictly; the
        temporal layers keep their fresh initialisation as in the official `from_pretrained_2d`: to_q/to_k/to_v
        and the to_out weight use PyTorch's default uniform(+-1/sqrt(fan_in)) init except the to_out weight,
        which is zero, so each temporal layer starts as the constant to_out bias (uniform init, not zeroed, as
        the official); norm_temp starts at weight 1, bias 0. With `init_seed` (an int) those draws come from
        numpy's Generator seeded with it (`init_temporal_layers`), so the same seed gives the same model in any
        process; without it from MindSpore's global RNG (`mindspore.set_seed`). Neither is PyTorch's RNG stream
        (docs/reference.md, "Initialisation of the new layers").
        """
        folder = unet_folder(path)
        config_path = os.path.join(folder, CONFIG_NAME)
        config = UNet3DConfig.from_dict(checkpoint.read_json(config_path, what="UNet config"), source=config_path)
        model = cls(config, attention_backend=attention_backend)
        weights = checkpoint.find_weights_file(folder, WEIGHTS_STEM)
        state = checkpoint.read_state_dict(weights)
        checkpoint.load_state_dict_into(model, state, strict=True, dtype=dtype, ignore=is_temporal_key, source=weights)
        if init_seed is not None:
            init_temporal_layers(model, init_seed)
        if dtype is not None:
            model.to_dtype(dtype)
        return model

    def to_dtype(self, dtype):
        """Cast the weights to `dtype`, except the GroupNorm/LayerNorm parameters, which stay fp32 (the norms
        compute their statistics in fp32; the official fp16 run keeps fp32 weights under autocast)."""
        norm_params = {id(p) for _, cell in self.cells_and_names() if isinstance(cell, (GroupNorm, LayerNorm))
                       for p in cell.get_parameters(expand=False)}
        for param in self.get_parameters():
            target = ms.float32 if id(param) in norm_params else dtype
            if param.dtype != target:
                # set_data alone would cast the values back to the parameter's old dtype
                param.set_dtype(target)
        return self

    def save_pretrained(self, path, dtype=None):
        """config.json + diffusion_pytorch_model.safetensors with the official key names, each written atomically."""
        os.makedirs(path, exist_ok=True)
        checkpoint.write_json_atomic(self.config.to_dict(), os.path.join(path, CONFIG_NAME))
        state = checkpoint.cell_state_dict(self)
        if dtype is not None:
            np_dtype = np.float16 if dtype == ms.float16 else np.float32
            state = {k: v.astype(np_dtype) for k, v in state.items()}
        checkpoint.save_state_dict(state, os.path.join(path, WEIGHTS_STEM + ".safetensors"))


def is_temporal_key(name):
    """The layers Tune-A-Video adds to SD's UNet: attn_temp.* and norm_temp.*"""
    return "_temp." in name


def init_temporal_layers(model, seed):
    """Re-draw the temporal layers' fresh initialisation from numpy's Generator(seed): the distribution of the
    constructor (and of the official model): every attn_temp linear weight and bias uniform(+-1/sqrt(fan_in)),
    except attn_temp.to_out.0.weight, which is zero; norm_temp weight 1, bias 0. Parameters are visited in name
    order, so the values depend on the seed and the model's config only."""
    rng = np.random.default_rng(seed)
    params = {name: param for name, param in model.parameters_and_names() if is_temporal_key(name)}
    for name in sorted(params):
        param = params[name]
        shape = tuple(param.shape)
        if ".norm_temp." in f".{name}":
            values = np.ones(shape) if name.endswith(".weight") else np.zeros(shape)
        elif name.endswith("to_out.0.weight"):
            values = np.zeros(shape)
        else:
            fan_in = params[name[: -len("bias")] + "weight"].shape[1] if name.endswith(".bias") else shape[1]
            bound = 1.0 / np.sqrt(fan_in)
            values = rng.uniform(-bound, bound, size=shape)
        param.set_data(ms.Tensor(values.astype(np.float32)).astype(param.dtype))
    return model


def unet_folder(path):
    """A UNet folder given as itself or as a pipeline folder containing unet/."""
    return checkpoint.component_folder(path, "unet", CONFIG_NAME)
