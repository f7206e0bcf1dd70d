"""DDIM inversion: walk a clean latent up the DDIM timesteps to the noise the sampler starts from.

Follows the official `ddim_loop` / `next_step` (tuneavideo/util.py; docs/reference.md): with N inversion steps and
gap k = num_train_timesteps // N, for t = 1, 1+k, ..., 1+(N-1)k (the DDIM timesteps in increasing order) the model
is evaluated at t on the latent that still sits at t_cur = t - k (alpha_cur = final_alpha_cumprod for t_cur < 0),
and the latent is moved from t_cur to t:
    x0 = (x - sqrt(1 - a_cur) eps) / sqrt(a_cur);    x_next = sqrt(a_t) x0 + sqrt(1 - a_t) eps.
The official code always reads the model output as eps; here the output is read according to the scheduler's
`prediction_type`, which is the same thing for epsilon models (bit for bit) and correct for v / sample models.
"""
import mindspore as ms
import numpy as np
from tqdm.auto import tqdm

from tav import backend
from tav.schedulers import timestep_batch
from tav.windows import as_window, windowed_prediction


def call_unet(unet, sample, timestep, encoder_hidden_states):
    """unet(sample, (B,) int64 timestep Tensor, encoder_hidden_states) -> the prediction Tensor. The timestep is a
    Tensor, not a Python int, so a graph-mode UNet compiles once for all timesteps. The UNet may return a Tensor,
    a tuple whose first item is the prediction, or an object with `.sample` (diffusers style). The first call
    for given shapes compiles ahead and trims the heap (tav.backend.compile_ahead)."""
    timesteps = timestep_batch(timestep, sample.shape[0])
    backend.compile_ahead(unet, sample, timesteps, encoder_hidden_states)
    output = unet(sample, timesteps, encoder_hidden_states)
    if isinstance(output, (tuple, list)):
        return output[0]
    return getattr(output, "sample", output)


def _sqrt32(value):
    # float32 sqrt of a float32 scalar: what `alpha ** 0.5` gives on the official float32 0-d torch tensor.
    return float(np.sqrt(np.float32(value), dtype=np.float32))


def next_step(model_output, timestep, sample, scheduler, prediction_type=None):
    """One inversion step: `sample` (at timestep - k) -> the latent at `timestep`, `model_output` having been
    evaluated at `timestep`. Arithmetic in float32, result in the sample's dtype."""
    prediction_type = prediction_type or scheduler.config.prediction_type
    total = scheduler.config.num_train_timesteps
    t_cur = min(timestep - scheduler.step_size, total - 1)
    alpha_cur = scheduler.alpha_cumprod_at(t_cur)
    alpha_next = scheduler.alpha_cumprod_at(timestep)
    one = np.float32(1)
    sqrt_a_cur, sqrt_b_cur = _sqrt32(alpha_cur), _sqrt32(one - alpha_cur)
    sqrt_a_next, sqrt_b_next = _sqrt32(alpha_next), _sqrt32(one - alpha_next)

    x = sample.astype(ms.float32)
    out = model_output.astype(ms.float32)
    if prediction_type == "epsilon":
        eps = out
        x0 = (x - sqrt_b_cur * eps) / sqrt_a_cur
    elif prediction_type == "sample":
        x0 = out
        eps = (x - sqrt_a_cur * x0) / sqrt_b_cur
    elif prediction_type == "v_prediction":
        # v is defined at the level the model was evaluated at (t): v = sqrt(a_t) eps - sqrt(1 - a_t) x0, while
        # the latent is at t_cur: x = sqrt(a_cur) x0 + sqrt(1 - a_cur) eps. Solving these two equations for
        # (x0, eps) is the v analogue of the official assumption "the eps predicted at t is the eps of x"; the
        # determinant is cos(angle_t - angle_cur), about 1. (Converting v with a_t alone and re-noising to t would
        # return x unchanged; reading v as eps, as the official code does, drifts away from the trajectory.)
        sqrt_a_t, sqrt_b_t = sqrt_a_next, sqrt_b_next
        det = sqrt_a_cur * sqrt_a_t + sqrt_b_cur * sqrt_b_t
        x0 = (sqrt_a_t * x - sqrt_b_cur * out) / det
        eps = (sqrt_b_t * x + sqrt_a_cur * out) / det
    else:
        raise ValueError(f"prediction_type must be epsilon, v_prediction or sample, got {prediction_type!r}")
    return (sqrt_a_next * x0 + sqrt_b_next * eps).astype(sample.dtype)


def ddim_invert(
    unet,
    scheduler,
    latents,
    encoder_hidden_states,
    num_inv_steps,
    *,
    prediction_type=None,
    callback=None,
    progress=False,
    window=None,
):
    """Invert `latents` (B, 4, F, h, w) with `num_inv_steps` DDIM steps; returns the `num_inv_steps + 1` latents
    of the walk, `latents` itself first and the noise at the last timestep (981 for SD and 50 steps) last.

    unet(sample, timestep, encoder_hidden_states) is called once per step, with `timestep` a (B,) int64 Tensor
    (one value repeated) and `encoder_hidden_states` as given (the empty-prompt embedding in Tune-A-Video; no
    guidance). Calls `scheduler.set_timesteps(num_inv_steps)`. `prediction_type` overrides the scheduler's
    (e.g. "epsilon" reproduces the official reading of a v model's output). `callback(i, t, latents)` runs after
    each step; `progress=True` shows a tqdm bar. `window` (a tav.windows.WindowSpec, size or (size, overlap)) runs
    the UNet on overlapping windows of frames and fuses their predictions (tav.windows); None: one pass.
    """
    window = as_window(window)
    scheduler.set_timesteps(num_inv_steps)
    timesteps = [int(t) for t in scheduler.timesteps[::-1]]
    walk = [latents]
    latent = latents
    for i, t in enumerate(tqdm(timesteps, desc="DDIM inversion", unit="step", disable=not progress)):
        if window is None:
            model_output = call_unet(unet, latent, t, encoder_hidden_states)
        else:
            model_output = windowed_prediction(lambda x: call_unet(unet, x, t, encoder_hidden_states), latent, window)
        latent = next_step(model_output, t, latent, scheduler, prediction_type)
        walk.append(latent)
        if callback is not None:
            callback(i, t, latent)
    return walk
