"""The shapes the bench times: a UNet config (diffusers' 2-D field names, which tav maps to its 3-D blocks and
diffusers reads as they are), the clip shape and the thread count.

`small` is the issue's reference point; `sd15` is Stable Diffusion 1.5's UNet with random weights (opt-in,
minutes per step on CPU); `micro` exists only so tests/test_bench_smoke.py can run the machinery in seconds.
"""
from dataclasses import dataclass, field, replace

from tav.tiny import TINY_UNET_CONFIG

# Every case runs one step of these shapes. CLIP's 77 tokens for every config, as the pipeline feeds the UNet.
TEXT_TOKENS = 77


@dataclass(frozen=True)
class BenchConfig:
    name: str
    unet: dict = field(repr=False)
    frames: int
    latent: int  # latent height = width (pixels / 8)
    batch: int = 1  # videos per step; the sampling step doubles it for classifier-free guidance
    threads: int = 2
    frame_sweep: tuple = ()  # extra frame counts timed by default (graph mode, math attention)

    def with_overrides(self, frames=None, latent=None, batch=None, threads=None):
        return replace(self, frames=frames or self.frames, latent=latent or self.latent,
                       batch=batch or self.batch, threads=threads or self.threads)

    @property
    def cross_attention_dim(self):
        return self.unet["cross_attention_dim"]


def _unet(block_out_channels, down, up, layers_per_block, heads, cross_attention_dim, norm_num_groups=32):
    return {
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": list(block_out_channels),
        "down_block_types": list(down),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": list(up),
        "layers_per_block": layers_per_block,
        "attention_head_dim": heads,
        "cross_attention_dim": cross_attention_dim,
        "norm_num_groups": norm_num_groups,
        "norm_eps": 1e-5,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
        "use_linear_projection": False,
        "upcast_attention": False,
    }


_SD_DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
_SD_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3

CONFIGS = {
    "micro": BenchConfig(
        "micro",
        _unet((16, 32), ("CrossAttnDownBlock2D", "DownBlock2D"), ("UpBlock2D", "CrossAttnUpBlock2D"), 1, 2, 16,
              norm_num_groups=8),
        frames=2, latent=8),
    # tav.tiny's UNet (the demo model) at the demo clip's 64x64 pixels.
    "tiny": BenchConfig("tiny", {k: v for k, v in TINY_UNET_CONFIG.items() if not k.startswith("_")
                                 and k != "sample_size"}, frames=8, latent=8),
    "small": BenchConfig(
        "small",
        _unet((64, 128, 256), ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
              ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), 1, 8, 64),
        frames=8, latent=32, frame_sweep=(4, 8, 16, 24)),
    # SD 1.5's UNet (random weights). 32x32 latents = 256 px: 512 px (--latent 64) does not fit a CPU step budget.
    "sd15": BenchConfig("sd15", _unet((320, 640, 1280, 1280), _SD_DOWN, _SD_UP, 2, 8, 768), frames=8, latent=32),
}


def get_config(name):
    if name not in CONFIGS:
        raise SystemExit(f"bench: unknown config {name!r}; choose one of {', '.join(CONFIGS)}")
    return CONFIGS[name]


def trainable_module_suffixes():
    """The official Tune-A-Video trainable set (train_tuneavideo.py's default `trainable_modules`)."""
    from tav.config import DEFAULT_TRAINABLE_MODULES

    return DEFAULT_TRAINABLE_MODULES
