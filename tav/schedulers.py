"""DDIM noise schedule and update, config-compatible with diffusers' `DDIMScheduler` (0.35.2).

Written here rather than reused from `mindone.diffusers` because inversion needs the schedule itself (the
`next_step` of tav/inversion.py), the step must take MindSpore tensors of any dtype, and every per-step scalar
should be a host float so nothing is recompiled or copied between steps.

Numerics follow diffusers on PyTorch/CPU, which computes the schedule in float32:
- `torch.linspace(float32)` evaluates `start + i*step` with a single rounding (a fused multiply-add) from the start
  for the first half and `end - (n-1-i)*step` from the end for the second half;
- `torch.cumprod` on CPU accumulates in float64 and rounds each partial product to float32;
- per-step scalars (`alpha ** 0.5`, `1 - alpha`, the DDIM variance) are float32 arithmetic on 0-d tensors.
Doing the same in numpy gives bit-identical `alphas_cumprod` on x86 (tests/test_schedulers.py checks against
diffusers within 1e-6 relative). Updates are computed in float32 whatever the latent dtype and cast back to it.

Timesteps are host values: `timesteps` is a numpy int64 array (diffusers: a torch tensor); `step` takes a Python
or numpy int (or a one-value Tensor). `add_noise` / `get_velocity` take a (B,) integer Tensor, use only
MindSpore ops on it and may be called inside a graph-mode Cell (the class is an `ms.jit_class`).
"""
import dataclasses
import json
import math
import os
from typing import NamedTuple, Optional, Tuple

import mindspore as ms
import numpy as np
from mindspore import ops

from tav.checks import is_int, is_number
from tav.noise import standard_normal

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
CONFIG_NAME = "scheduler_config.json"
# Stable Diffusion 1.x's noise schedule as its scheduler_config.json gives it (the DDIM-relevant fields).
SD_V1_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    set_alpha_to_one=False,
    clip_sample=False,
)
# dtype of the timestep Tensor handed to the UNet (diffusers and mindone use int64 too).
TIMESTEP_DTYPE = ms.int64


@dataclasses.dataclass(frozen=True)
class DDIMConfig:
    """The fields of diffusers' DDIMScheduler config, with its defaults (so a config that omits a key, e.g. SD
    v1-4's PNDM config without `prediction_type`, resolves exactly as `diffusers.DDIMScheduler.from_config`)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: Optional[Tuple[float, ...]] = None
    clip_sample: bool = True
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    clip_sample_range: float = 1.0
    sample_max_value: float = 1.0
    timestep_spacing: str = "leading"
    rescale_betas_zero_snr: bool = False

    @classmethod
    def from_dict(cls, values, source="config dict"):
        """Keep the DDIM keys of any diffusers scheduler config (PNDM, DDPM, ...), ignore the rest
        (`_class_name`, `skip_prk_steps`, `variance_type`, ...), and validate every kept value."""
        known = {f.name for f in dataclasses.fields(cls)}
        kept = {key: value for key, value in values.items() if key in known}
        for key, value in kept.items():
            _validate(key, value, source)
        if kept.get("trained_betas") is not None:
            kept["trained_betas"] = tuple(float(b) for b in kept["trained_betas"])
        config = cls(**kept)
        if config.trained_betas is not None and len(config.trained_betas) != config.num_train_timesteps:
            raise ValueError(
                f"{source}: 'trained_betas' has {len(config.trained_betas)} values, expected num_train_timesteps = "
                f"{config.num_train_timesteps}"
            )
        if config.thresholding:
            raise NotImplementedError(
                f"{source}: 'thresholding' = True (dynamic thresholding) is not supported; it is meant for pixel-space "
                "models, Stable Diffusion configs set it False"
            )
        return config

    def to_dict(self):
        values = dataclasses.asdict(self)
        if values["trained_betas"] is not None:
            values["trained_betas"] = list(values["trained_betas"])
        return {"_class_name": "DDIMScheduler", **values}


def _validate(key, value, source):
    def fail(expected):
        raise ValueError(f"{source}: '{key}' must be {expected}, got {value!r}")

    if key == "num_train_timesteps":
        if not is_int(value) or value < 1:
            fail("a positive integer")
    elif key == "steps_offset":
        if not is_int(value) or value < 0:
            fail("a non-negative integer")
    elif key in ("beta_start", "beta_end"):
        if not is_number(value) or not 0 < value < 1:
            fail("a number in (0, 1)")
    elif key in ("clip_sample_range", "sample_max_value", "dynamic_thresholding_ratio"):
        if not is_number(value) or value <= 0:
            fail("a positive number")
    elif key in ("clip_sample", "set_alpha_to_one", "thresholding", "rescale_betas_zero_snr"):
        if not isinstance(value, (bool, np.bool_)):
            fail("true or false")
    elif key == "beta_schedule":
        if value not in BETA_SCHEDULES:
            fail(f"one of {', '.join(BETA_SCHEDULES)}")
    elif key == "prediction_type":
        if value not in PREDICTION_TYPES:
            fail(f"one of {', '.join(PREDICTION_TYPES)}")
    elif key == "timestep_spacing":
        if value not in TIMESTEP_SPACINGS:
            fail(f"one of {', '.join(TIMESTEP_SPACINGS)}")
    elif key == "trained_betas":
        if value is not None and (
            isinstance(value, (str, bytes)) or not all(is_number(b) and 0 <= b < 1 for b in np.ravel(value))
        ):
            fail("null or a list of numbers in [0, 1)")


def _read_config(path_or_dict):
    """A dict, a scheduler_config.json, a folder holding one, or a pipeline folder with scheduler/."""
    if isinstance(path_or_dict, dict):
        return dict(path_or_dict), "scheduler config dict"
    path = os.fspath(path_or_dict)
    if os.path.isdir(path):
        candidates = [os.path.join(path, CONFIG_NAME), os.path.join(path, "scheduler", CONFIG_NAME)]
        found = [c for c in candidates if os.path.isfile(c)]
        if not found:
            raise FileNotFoundError(f"{path}: no {CONFIG_NAME} in the folder or in its scheduler/ subfolder")
        path = found[0]
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such scheduler config file or folder")
    with open(path, encoding="utf-8") as f:
        try:
            values = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a JSON object of scheduler settings, got {type(values).__name__}")
    return values, path


# ----------------------------------------------------------------------------------------------------------------
# The schedule, in float32 the way PyTorch computes it (see the module docstring).


def _linspace_float32(start, end, n):
    start, end = np.float32(start), np.float32(end)
    if n == 1:
        return np.array([start], np.float32)
    step = np.float32((end - start) / np.float32(n - 1))
    index = np.arange(n, dtype=np.float64)
    # float32 x float32 is exact in float64, so one float64 add + rounding to float32 emulates the fused multiply-add.
    from_start = np.float64(start) + np.float64(step) * index
    from_end = np.float64(end) - np.float64(step) * (n - 1 - index)
    return np.where(index < n // 2, from_start, from_end).astype(np.float32)


def _cumprod_float32(values):
    return np.cumprod(values.astype(np.float64)).astype(np.float32)


def _cosine_betas(n, max_beta=0.999):
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)], np.float32)


def _rescale_zero_terminal_snr(betas):
    """Shift and scale sqrt(alphas_cumprod) so the last step has zero SNR (arXiv 2305.08891, Algorithm 1)."""
    sqrt_bar = np.sqrt(_cumprod_float32(np.float32(1) - betas))
    first, last = sqrt_bar[0], sqrt_bar[-1]
    sqrt_bar = (sqrt_bar - last) * np.float32(first / (first - last))
    bar = sqrt_bar * sqrt_bar
    alphas = np.concatenate([bar[:1], bar[1:] / bar[:-1]])
    return (np.float32(1) - alphas).astype(np.float32)


def make_betas(config):
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        betas = np.asarray(config.trained_betas, np.float32)
    elif config.beta_schedule == "linear":
        betas = _linspace_float32(config.beta_start, config.beta_end, n)
    elif config.beta_schedule == "scaled_linear":
        root = _linspace_float32(config.beta_start**0.5, config.beta_end**0.5, n)
        betas = root * root
    else:
        betas = _cosine_betas(n)
    if config.rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    return betas


class DDIMStepOutput(NamedTuple):
    prev_sample: ms.Tensor
    pred_original_sample: ms.Tensor


def _host_timestep(timestep):
    """A timestep given as int, numpy int or a Tensor whose values are all equal -> Python int."""
    if isinstance(timestep, ms.Tensor):
        values = np.unique(timestep.asnumpy())
        if values.size != 1:
            raise ValueError(f"step: a timestep Tensor must hold one value (DDIM steps all samples together), got {values}")
        return int(values[0])
    if isinstance(timestep, np.ndarray):
        return _host_timestep(ms.Tensor(timestep))
    return int(timestep)


def timestep_batch(timestep, batch_size):
    """The timestep argument tav hands to a UNet: a (batch_size,) int64 Tensor. A Tensor (not a Python int) so
    a graph-mode UNet compiles once for all timesteps."""
    return ms.Tensor(np.full((batch_size,), int(timestep), np.int64), TIMESTEP_DTYPE)


@ms.jit_class
class DDIMScheduler:
    """DDIM (arXiv 2010.02502) with diffusers' config fields and numbers.

    Host-side state: `betas`, `alphas_cumprod` (numpy float32, length num_train_timesteps), `final_alpha_cumprod`
    (numpy float32: 1 if set_alpha_to_one else alphas_cumprod[0]), `timesteps` (numpy int64, descending),
    `num_inference_steps`. `alphas_cumprod_tensor` is the same schedule as a MindSpore Tensor for add_noise.
    """

    init_noise_sigma = 1.0

    def __init__(self, config=None, **fields):
        if config is None:
            config = DDIMConfig.from_dict(fields, source="DDIMScheduler arguments")
        elif fields:
            config = DDIMConfig.from_dict({**dataclasses.asdict(config), **fields}, source="DDIMScheduler arguments")
        self.config = config
        self.betas = make_betas(config)
        self.alphas = (np.float32(1) - self.betas).astype(np.float32)
        self.alphas_cumprod = _cumprod_float32(self.alphas)
        self.final_alpha_cumprod = np.float32(1.0) if config.set_alpha_to_one else self.alphas_cumprod[0]
        self.alphas_cumprod_tensor = ms.Tensor(self.alphas_cumprod, ms.float32)
        self.num_inference_steps = None
        self.timesteps = np.arange(config.num_train_timesteps, dtype=np.int64)[::-1].copy()

    @classmethod
    def from_config(cls, path_or_dict, **overrides):
        """Build from a diffusers scheduler config: a dict, a scheduler_config.json, a folder holding one, or a
        pipeline folder with scheduler/. Any scheduler class's config with the beta fields works (SD v1-4 ships a
        PNDMScheduler config); keys with no DDIM meaning are ignored, known keys are validated. Keyword
        `overrides` (DDIM keys only) replace config values, e.g. `clip_sample=False`."""
        values, source = _read_config(path_or_dict)
        known = {f.name for f in dataclasses.fields(DDIMConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"DDIMScheduler.from_config: unknown override(s) {unknown}; DDIM keys are {sorted(known)}")
        return cls(DDIMConfig.from_dict({**values, **overrides}, source=source))

    def __len__(self):
        return self.config.num_train_timesteps

    # -- inference timesteps --------------------------------------------------------------------------------------

    def set_timesteps(self, num_inference_steps):
        """Choose the descending inference timesteps (SD, 50 steps, leading + offset 1: 981, 961, ..., 1)."""
        total = self.config.num_train_timesteps
        if not is_int(num_inference_steps) or not 1 <= num_inference_steps <= total:
            raise ValueError(f"num_inference_steps must be an integer in [1, {total}], got {num_inference_steps!r}")
        n = int(num_inference_steps)
        spacing = self.config.timestep_spacing
        if spacing == "linspace":
            timesteps = np.linspace(0, total - 1, n).round()[::-1].astype(np.int64)
        elif spacing == "leading":
            timesteps = (np.arange(n) * (total // n)).round()[::-1].astype(np.int64) + self.config.steps_offset
        else:  # trailing
            timesteps = np.round(np.arange(total, 0, -total / n)).astype(np.int64) - 1
        self.num_inference_steps = n
        self.timesteps = timesteps.copy()
        return self.timesteps

    @property
    def step_size(self):
        """The timestep gap DDIM assumes between neighbours: num_train_timesteps // num_inference_steps."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before stepping")
        return self.config.num_train_timesteps // self.num_inference_steps

    def alpha_cumprod_at(self, timestep):
        """alphas_cumprod[t] for t >= 0; final_alpha_cumprod for t < 0 (the step past the last one)."""
        if timestep < 0:
            return self.final_alpha_cumprod
        if timestep >= self.config.num_train_timesteps:
            raise ValueError(f"timestep {timestep} is outside [0, {self.config.num_train_timesteps - 1}]")
        return self.alphas_cumprod[timestep]

    def scale_model_input(self, sample, timestep=None):
        return sample

    # -- one denoising step ---------------------------------------------------------------------------------------

    def step(self, model_output, timestep, sample, eta=0.0, use_clipped_model_output=False, noise=None, generator=None):
        """x_t -> x_{t - step_size} (DDIM eq. 12), as diffusers' DDIMScheduler.step.

        timestep: the current timestep as int (or a Tensor of one repeated value). For eta > 0 the fresh noise is
        `noise` (a Tensor shaped like the sample, diffusers' `variance_noise`) or drawn from `generator`, a
        `np.random.Generator`; one of them is required. Returns DDIMStepOutput(prev_sample, pred_original_sample),
        both in the sample's dtype (the arithmetic is float32).
        """
        t = _host_timestep(timestep)
        prev_t = t - self.step_size
        alpha_t = self.alpha_cumprod_at(t)
        alpha_prev = self.alpha_cumprod_at(prev_t)
        one = np.float32(1)
        beta_t = one - alpha_t
        sqrt_alpha_t, sqrt_beta_t = float(np.sqrt(alpha_t)), float(np.sqrt(beta_t))

        x = sample.astype(ms.float32)
        out = model_output.astype(ms.float32)
        prediction = self.config.prediction_type
        if prediction == "epsilon":
            pred_x0 = (x - sqrt_beta_t * out) / sqrt_alpha_t
            pred_eps = out
        elif prediction == "sample":
            pred_x0 = out
            pred_eps = (x - sqrt_alpha_t * pred_x0) / sqrt_beta_t
        else:  # v_prediction
            pred_x0 = sqrt_alpha_t * x - sqrt_beta_t * out
            pred_eps = sqrt_alpha_t * out + sqrt_beta_t * x

        if self.config.clip_sample:
            limit = float(self.config.clip_sample_range)
            pred_x0 = ops.clamp(pred_x0, -limit, limit)
        if use_clipped_model_output:
            pred_eps = (x - sqrt_alpha_t * pred_x0) / sqrt_beta_t

        variance = ((one - alpha_prev) / beta_t) * (one - alpha_t / alpha_prev)
        std = np.float32(eta) * np.sqrt(variance, dtype=np.float32)
        direction_scale = float(np.sqrt(one - alpha_prev - std * std, dtype=np.float32))
        prev = float(np.sqrt(alpha_prev)) * pred_x0 + direction_scale * pred_eps

        if eta > 0:
            if noise is not None and generator is not None:
                raise ValueError("step: pass either noise or generator for eta > 0, not both")
            if noise is None:
                if generator is None:
                    raise ValueError("step: eta > 0 needs fresh noise: pass noise=Tensor or generator=np.random.default_rng(seed)")
                noise = standard_normal(model_output.shape, generator)
            prev = prev + float(std) * noise.astype(ms.float32)
        return DDIMStepOutput(prev.astype(sample.dtype), pred_x0.astype(sample.dtype))

    # -- forward process (training) -------------------------------------------------------------------------------

    def _noise_coefficients(self, timesteps, like):
        # diffusers casts the schedule to the sample dtype first (fp16 training adds noise in fp16); so do we.
        if not isinstance(timesteps, ms.Tensor):
            timesteps = ms.Tensor(np.asarray(timesteps, np.int64).reshape(-1))
        alphas = ops.gather(self.alphas_cumprod_tensor.astype(like.dtype), timesteps.reshape(-1), 0)
        shape = (-1,) + (1,) * (like.ndim - 1)
        return ops.sqrt(alphas).reshape(shape), ops.sqrt(1 - alphas).reshape(shape)

    def add_noise(self, original_samples, noise, timesteps):
        """q(x_t | x_0): sqrt(a_t) x0 + sqrt(1 - a_t) noise, with one timestep per batch item ((B,) int Tensor)."""
        sqrt_alpha, sqrt_one_minus_alpha = self._noise_coefficients(timesteps, original_samples)
        return sqrt_alpha * original_samples + sqrt_one_minus_alpha * noise

    def get_velocity(self, sample, noise, timesteps):
        """The v-prediction target: sqrt(a_t) noise - sqrt(1 - a_t) x0."""
        sqrt_alpha, sqrt_one_minus_alpha = self._noise_coefficients(timesteps, sample)
        return sqrt_alpha * noise - sqrt_one_minus_alpha * sample
