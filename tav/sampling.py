"""DDIM sampling with classifier-free guidance, as the official TuneAVideoPipeline's denoising loop
(docs/reference.md, "Sampling").

    for t in timesteps (981, 961, ..., 1 for SD and 50 steps):
        eps_u, eps_c = unet(cat[x, x], t, cat[uncond, cond]).chunk(2)     # one call, batch 2B
        eps = eps_u + s (eps_c - eps_u)
        x = scheduler.step(eps, t, x, eta)
Without guidance (no uncond embedding or s <= 1) the UNet sees the batch once, with the text embedding only.
Randomness (start noise, eta > 0 step noise) comes from numpy's `default_rng(seed)`: the same seed gives the same
numbers on every machine and backend, which MindSpore's device RNGs do not promise.
"""
import mindspore as ms
import numpy as np
from mindspore import ops
from tqdm.auto import tqdm

from tav.inversion import call_unet
from tav.noise import standard_normal
from tav.windows import as_window, windowed_prediction


def prepare_latents(shape, seed, dtype=ms.float32, init_noise_sigma=1.0):
    """Start noise of `shape` (B, 4, F, h, w): float32 N(0, 1) from np.random.default_rng(seed), times
    `init_noise_sigma` (1 for DDIM), cast to `dtype`. Reproducible across machines for a given seed."""
    noise = standard_normal(shape, seed)
    if init_noise_sigma != 1.0:
        noise = noise * np.float32(init_noise_sigma)
    return noise.astype(dtype)


def _batched(embeddings, batch, name):
    if embeddings.shape[0] == batch:
        return embeddings
    if embeddings.shape[0] == 1:
        return ops.broadcast_to(embeddings, (batch,) + tuple(embeddings.shape[1:]))
    raise ValueError(f"{name} has batch {embeddings.shape[0]}, expected 1 or the latents' batch {batch}")


def denoise(
    unet,
    scheduler,
    latents,
    text_embeddings,
    uncond_embeddings,
    num_inference_steps,
    guidance_scale,
    eta=0.0,
    *,
    noise_seed=None,
    generator=None,
    callback=None,
    callback_steps=1,
    progress=False,
    window=None,
):
    """Run `num_inference_steps` DDIM steps from `latents` (B, 4, F, h, w) and return the final latents (same dtype).

    text_embeddings (B, L, D) and uncond_embeddings (B, L, D) or (1, L, D) (broadcast to B); guidance is applied
    when uncond_embeddings is not None and guidance_scale > 1, in one UNet call of batch 2B ([uncond, cond]).
    unet(sample, timestep, encoder_hidden_states) gets `timestep` as a (batch,) int64 Tensor (one value repeated).
    Calls `scheduler.set_timesteps(num_inference_steps)`; the start latents should sit at scheduler.timesteps[0].

    eta > 0 adds fresh noise at each step from `generator` (a np.random.Generator) or from
    np.random.default_rng(noise_seed); with neither, from an unseeded generator (not reproducible).
    `callback(i, t, latents)` runs after every `callback_steps`-th step; `progress=True` shows a tqdm bar (s/step).
    `window` (a tav.windows.WindowSpec, size or (size, overlap)) runs the guided prediction on overlapping windows
    of frames and fuses them (tav.windows); None: one pass over all frames.
    """
    window = as_window(window)
    batch = latents.shape[0]
    text_embeddings = _batched(text_embeddings, batch, "text_embeddings")
    guided = uncond_embeddings is not None and guidance_scale > 1
    if guided:
        context = ops.concat([_batched(uncond_embeddings, batch, "uncond_embeddings"), text_embeddings], axis=0)
    else:
        context = text_embeddings
    if eta > 0 and generator is None:
        generator = np.random.default_rng(noise_seed)

    scheduler.set_timesteps(num_inference_steps)
    timesteps = [int(t) for t in scheduler.timesteps]

    def predict(x, t):
        if guided:
            prediction = call_unet(unet, ops.concat([x, x], axis=0), t, context).astype(ms.float32)
            uncond, cond = prediction[:batch], prediction[batch:]
            return uncond + float(guidance_scale) * (cond - uncond)
        return call_unet(unet, x, t, context)

    for i, t in enumerate(tqdm(timesteps, desc="DDIM sampling", unit="step", disable=not progress)):
        if window is None:
            prediction = predict(latents, t)
        else:
            prediction = windowed_prediction(lambda x: predict(x, t), latents, window)
        latents = scheduler.step(prediction, t, latents, eta=eta, generator=generator if eta > 0 else None).prev_sample
        if callback is not None and i % callback_steps == 0:
            callback(i, t, latents)
    return latents
