"""Timestep embeddings: the sinusoidal projection and the MLP that turns it into the resnets' time vector."""
import math

import numpy as np

import mindspore as ms
from mindspore import nn, ops

from tav.nn import Linear, silu


def timestep_frequencies(num_channels, downscale_freq_shift=0.0, max_period=10000):
    """freq_k = exp(-ln(max_period) * k / (half - shift)), k = 0..half-1 (diffusers' get_timestep_embedding)."""
    half = num_channels // 2
    exponent = -math.log(max_period) * np.arange(half, dtype=np.float32) / np.float32(half - downscale_freq_shift)
    return np.exp(exponent.astype(np.float32)).astype(np.float32)


class Timesteps(nn.Cell):
    """(B,) timesteps -> (B, num_channels) sinusoidal features; with flip_sin_to_cos the order is [cos, sin]."""

    def __init__(self, num_channels, flip_sin_to_cos=True, downscale_freq_shift=0.0):
        super().__init__()
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        # A constant table, built once rather than every step.
        self.frequencies = ms.Tensor(timestep_frequencies(num_channels, downscale_freq_shift)[None, :])

    def construct(self, timesteps):
        args = timesteps.astype(ms.float32)[:, None] * self.frequencies
        if self.flip_sin_to_cos:
            emb = ops.cat([ops.cos(args), ops.sin(args)], -1)
        else:
            emb = ops.cat([ops.sin(args), ops.cos(args)], -1)
        if self.num_channels % 2 == 1:
            emb = ops.pad(emb, (0, 1))
        return emb


class TimestepEmbedding(nn.Cell):
    """linear_1 -> SiLU -> linear_2 (diffusers' names)."""

    def __init__(self, in_channels, time_embed_dim):
        super().__init__()
        self.linear_1 = Linear(in_channels, time_embed_dim)
        self.linear_2 = Linear(time_embed_dim, time_embed_dim)

    def construct(self, sample):
        return self.linear_2(silu(self.linear_1(sample)))
