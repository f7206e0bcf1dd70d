"""Reproducible Gaussian noise: every random draw of sampling, inversion, the VAE posterior and the scheduler's
eta > 0 step comes from numpy's PCG64 generator, so a seed gives the same numbers on every machine and backend
(MindSpore's device RNGs promise no such thing). Imports nothing from tav."""
import mindspore as ms
import numpy as np


def standard_normal(shape, seed=None, dtype=ms.float32):
    """float32 N(0, 1) noise of `shape` as a Tensor of `dtype`: `seed` an int (reproducible), a np.random.Generator
    (used as is, advancing its stream), or None (fresh entropy)."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    return ms.Tensor(rng.standard_normal(tuple(shape), dtype=np.float32), dtype)
