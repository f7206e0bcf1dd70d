"""ddim_invert and denoise against references built from diffusers' PyTorch DDIMScheduler and the official formulas,
on a small deterministic denoiser mirrored in MindSpore and torch."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

from tav.inversion import ddim_invert
from tav.sampling import denoise, prepare_latents
from tav.schedulers import SD_V1_SCHEDULE, DDIMScheduler

SD = SD_V1_SCHEDULE
B, F, H, W, L, D = 2, 3, 4, 5, 7, 8
LATENT = (B, 4, F, H, W)
TOL = 1e-4  # measured ~1e-6


def _rand(seed, shape, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


COEF_A, COEF_B, COEF_C = _rand(1, LATENT[1:], 0.5), _rand(2, LATENT[1:]), _rand(3, LATENT[1:])


class ToyDenoiser(nn.Cell):
    """unet(sample, t, ehs) = softsign(a * sample + b * mean(ehs) + c * t / 1000), per batch item.

    softsign z / (1 + |z|) rather than tanh: it is plain IEEE arithmetic, so MindSpore and torch agree to the last
    bit, while MindSpore's CPU tanh is only accurate to ~1e-4 and would hide the scheduler's 1e-6 parity."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = ms.Tensor(COEF_A), ms.Tensor(COEF_B), ms.Tensor(COEF_C)

    def construct(self, sample, timestep, encoder_hidden_states):
        context = encoder_hidden_states.mean(axis=(1, 2)).reshape(-1, 1, 1, 1, 1)
        t = timestep.astype(ms.float32).reshape(-1, 1, 1, 1, 1) / 1000
        z = sample * self.a + context * self.b + t * self.c
        return z / (1 + ops.abs(z))


def torch_denoiser(torch, sample, t, ehs):
    context = ehs.mean(dim=(1, 2)).reshape(-1, 1, 1, 1, 1)
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1, 1) / 1000
    z = sample * torch.from_numpy(COEF_A) + context * torch.from_numpy(COEF_B) + t * torch.from_numpy(COEF_C)
    return z / (1 + torch.abs(z))


class Recorder:
    """Wraps a unet callable and remembers (batch size, timestep values, context) of every call."""

    def __init__(self, unet):
        self.unet, self.calls = unet, []

    def __call__(self, sample, timestep, encoder_hidden_states):
        assert isinstance(timestep, ms.Tensor) and timestep.shape == (sample.shape[0],) and timestep.dtype == ms.int64
        self.calls.append((sample.shape[0], timestep.asnumpy().tolist(), encoder_hidden_states.asnumpy()))
        return self.unet(sample, timestep, encoder_hidden_states)


def _torch_and_diffusers():
    torch = pytest.importorskip("torch", reason="torch (test-only) is needed for the PyTorch references")
    diffusers = pytest.importorskip("diffusers", reason="diffusers is needed for the PyTorch DDIMScheduler reference")
    return torch, diffusers


def reference_inversion(torch, diffusers, latents, ehs, steps):
    """The official ddim_loop / next_step (tuneavideo/util.py) on diffusers' scheduler."""
    scheduler = diffusers.DDIMScheduler(**SD)
    scheduler.set_timesteps(steps)
    latent, walk = torch.from_numpy(latents), [torch.from_numpy(latents)]
    for i in range(steps):
        t = int(scheduler.timesteps[len(scheduler.timesteps) - i - 1])
        eps = torch_denoiser(torch, latent, [t] * latent.shape[0], ehs)
        t_cur = min(t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps, 999)
        alpha = scheduler.alphas_cumprod[t_cur] if t_cur >= 0 else scheduler.final_alpha_cumprod
        alpha_next = scheduler.alphas_cumprod[t]
        x0 = (latent - (1 - alpha) ** 0.5 * eps) / alpha**0.5
        latent = alpha_next**0.5 * x0 + (1 - alpha_next) ** 0.5 * eps
        walk.append(latent)
    return [w.numpy() for w in walk]


def reference_sampling(torch, diffusers, latents, cond, uncond, steps, guidance_scale, eta=0.0, seed=None):
    """The official pipeline's loop with diffusers' DDIMScheduler.step; eta noise from numpy's default_rng(seed)."""
    scheduler = diffusers.DDIMScheduler(**SD)
    scheduler.set_timesteps(steps)
    rng = np.random.default_rng(seed)
    latent, trajectory = torch.from_numpy(latents), []
    guided = uncond is not None and guidance_scale > 1
    context = torch.cat([uncond, cond]) if guided else cond
    for t in scheduler.timesteps:
        model_input = torch.cat([latent] * 2) if guided else latent
        eps = torch_denoiser(torch, model_input, [int(t)] * model_input.shape[0], context)
        if guided:
            eps_uncond, eps_text = eps.chunk(2)
            eps = eps_uncond + guidance_scale * (eps_text - eps_uncond)
        noise = torch.from_numpy(rng.standard_normal(latents.shape, dtype=np.float32)) if eta > 0 else None
        latent = scheduler.step(eps, t, latent, eta=eta, variance_noise=noise).prev_sample
        trajectory.append(latent.numpy())
    return trajectory


def max_rel_error(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-12)


@pytest.fixture
def inputs():
    latents = _rand(10, LATENT)
    cond, uncond = _rand(11, (B, L, D), 0.5) + 0.3, _rand(12, (B, L, D), 0.5) - 0.3
    return latents, cond, uncond


# -- inversion -------------------------------------------------------------------------------------------------------


def test_inversion_walks_timesteps_upwards_and_returns_every_latent(inputs):
    latents, cond, _ = inputs
    unet = Recorder(ToyDenoiser())
    start = ms.Tensor(latents)
    walk = ddim_invert(unet, DDIMScheduler.from_config(SD), start, ms.Tensor(cond), 50)
    assert len(walk) == 51
    assert walk[0] is start
    assert [call[1] for call in unet.calls] == [[t] * B for t in range(1, 1000, 20)]
    assert all(call[0] == B for call in unet.calls)


@pytest.mark.parity
@pytest.mark.parametrize("steps", [50, 10])
def test_inversion_matches_the_official_next_step(inputs, steps):
    torch, diffusers = _torch_and_diffusers()
    latents, cond, _ = inputs
    walk = ddim_invert(ToyDenoiser(), DDIMScheduler.from_config(SD), ms.Tensor(latents), ms.Tensor(cond), steps)
    reference = reference_inversion(torch, diffusers, latents, torch.from_numpy(cond), steps)
    errors = [max_rel_error(ours.asnumpy(), ref) for ours, ref in zip(walk, reference)]
    print(f"inversion ({steps} steps): max relative error {max(errors):.2e}")
    assert len(walk) == len(reference) == steps + 1
    assert max(errors) < TOL


def test_inversion_callback_sees_every_step(inputs):
    latents, cond, _ = inputs
    seen = []
    walk = ddim_invert(
        ToyDenoiser(), DDIMScheduler.from_config(SD), ms.Tensor(latents), ms.Tensor(cond), 5,
        callback=lambda i, t, x: seen.append((i, t, x)), progress=True,
    )
    assert [(i, t) for i, t, _ in seen] == [(0, 1), (1, 201), (2, 401), (3, 601), (4, 801)]
    assert seen[-1][2] is walk[-1]


def test_unet_may_return_a_tuple_or_an_object_with_sample(inputs):
    latents, cond, _ = inputs

    class Output:
        def __init__(self, sample):
            self.sample = sample

    toy = ToyDenoiser()
    plain = ddim_invert(toy, DDIMScheduler.from_config(SD), ms.Tensor(latents), ms.Tensor(cond), 3)[-1].asnumpy()
    for wrap in (lambda x: (x,), Output):
        unet = lambda sample, t, ehs, wrap=wrap: wrap(toy(sample, t, ehs))  # noqa: E731
        walk = ddim_invert(unet, DDIMScheduler.from_config(SD), ms.Tensor(latents), ms.Tensor(cond), 3)
        np.testing.assert_array_equal(walk[-1].asnumpy(), plain)


# -- sampling --------------------------------------------------------------------------------------------------------


def _sample(unet, inputs, steps=50, guidance_scale=7.5, uncond=True, **options):
    latents, cond, uncond_embeddings = inputs
    trajectory = []
    final = denoise(
        unet, DDIMScheduler.from_config(SD), ms.Tensor(latents), ms.Tensor(cond),
        ms.Tensor(uncond_embeddings) if uncond else None, steps, guidance_scale,
        callback=lambda i, t, x: trajectory.append(x.asnumpy()), **options,
    )
    return final, trajectory


@pytest.mark.parity
def test_sampling_with_guidance_matches_the_official_loop(inputs):
    torch, diffusers = _torch_and_diffusers()
    latents, cond, uncond = inputs
    final, trajectory = _sample(ToyDenoiser(), inputs)
    reference = reference_sampling(torch, diffusers, latents, torch.from_numpy(cond), torch.from_numpy(uncond), 50, 7.5)
    errors = [max_rel_error(ours, ref) for ours, ref in zip(trajectory, reference)]
    print(f"sampling (CFG 7.5, 50 steps): max relative error {max(errors):.2e}")
    assert len(trajectory) == 50
    assert max(errors) < TOL
    np.testing.assert_array_equal(final.asnumpy(), trajectory[-1])


def test_guidance_is_one_unet_call_of_batch_2b_with_uncond_first(inputs):
    _, cond, uncond = inputs
    unet = Recorder(ToyDenoiser())
    _sample(unet, inputs, steps=10)
    assert len(unet.calls) == 10
    assert [call[1] for call in unet.calls] == [[t] * 2 * B for t in range(901, 0, -100)]
    batch, _, context = unet.calls[0]
    assert batch == 2 * B
    np.testing.assert_array_equal(context, np.concatenate([uncond, cond]))


@pytest.mark.parity
@pytest.mark.parametrize("guidance_scale, uncond", [(1.0, True), (0.5, True), (7.5, False)])
def test_no_guidance_is_a_single_batch_path(inputs, guidance_scale, uncond):
    torch, diffusers = _torch_and_diffusers()
    latents, cond, _ = inputs
    unet = Recorder(ToyDenoiser())
    final, _ = _sample(unet, inputs, steps=10, guidance_scale=guidance_scale, uncond=uncond)
    assert len(unet.calls) == 10
    assert all(batch == B for batch, _, _ in unet.calls)
    np.testing.assert_array_equal(unet.calls[0][2], cond)
    reference = reference_sampling(torch, diffusers, latents, torch.from_numpy(cond), None, 10, guidance_scale)
    assert max_rel_error(final.asnumpy(), reference[-1]) < TOL


def test_uncond_embedding_of_batch_one_is_broadcast(inputs):
    latents, cond, uncond = inputs
    one_uncond = uncond[:1]
    unet = Recorder(ToyDenoiser())
    final = denoise(unet, DDIMScheduler.from_config(SD), ms.Tensor(latents), ms.Tensor(cond), ms.Tensor(one_uncond), 5, 7.5)
    np.testing.assert_array_equal(unet.calls[0][2], np.concatenate([one_uncond, one_uncond, cond]))
    expected = denoise(
        ToyDenoiser(), DDIMScheduler.from_config(SD), ms.Tensor(latents), ms.Tensor(cond),
        ms.Tensor(np.concatenate([one_uncond] * B)), 5, 7.5,
    )
    np.testing.assert_array_equal(final.asnumpy(), expected.asnumpy())


@pytest.mark.parity
def test_sampling_with_eta_matches_diffusers_given_the_same_noise(inputs):
    torch, diffusers = _torch_and_diffusers()
    latents, cond, uncond = inputs
    final, _ = _sample(ToyDenoiser(), inputs, steps=20, eta=0.8, noise_seed=1234)
    again, _ = _sample(ToyDenoiser(), inputs, steps=20, eta=0.8, noise_seed=1234)
    reference = reference_sampling(
        torch, diffusers, latents, torch.from_numpy(cond), torch.from_numpy(uncond), 20, 7.5, eta=0.8, seed=1234
    )
    np.testing.assert_array_equal(final.asnumpy(), again.asnumpy())
    assert max_rel_error(final.asnumpy(), reference[-1]) < TOL


def test_fp16_latents_stay_fp16(inputs):
    latents, cond, uncond = inputs
    final = denoise(
        ToyDenoiser(), DDIMScheduler.from_config(SD), ms.Tensor(latents).astype(ms.float16), ms.Tensor(cond),
        ms.Tensor(uncond), 5, 7.5,
    )
    walk = ddim_invert(ToyDenoiser(), DDIMScheduler.from_config(SD), ms.Tensor(latents).astype(ms.float16), ms.Tensor(cond), 5)
    assert final.dtype == ms.float16 and all(w.dtype == ms.float16 for w in walk)
    assert np.isfinite(final.asnumpy()).all()


def test_denoiser_cell_in_graph_mode_gives_the_pynative_result(inputs):
    latents, cond, _ = inputs
    pynative_walk = ddim_invert(ToyDenoiser(), DDIMScheduler.from_config(SD), ms.Tensor(latents), ms.Tensor(cond), 10)
    pynative_final, _ = _sample(ToyDenoiser(), inputs, steps=10)
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        graph_walk = ddim_invert(ToyDenoiser(), DDIMScheduler.from_config(SD), ms.Tensor(latents), ms.Tensor(cond), 10)
        graph_final, _ = _sample(ToyDenoiser(), inputs, steps=10)
    finally:
        ms.set_context(mode=previous)
    assert max_rel_error(graph_walk[-1].asnumpy(), pynative_walk[-1].asnumpy()) < 1e-5
    assert max_rel_error(graph_final.asnumpy(), pynative_final.asnumpy()) < 1e-5


def test_prepare_latents_is_seeded_and_reproducible():
    first = prepare_latents(LATENT, seed=33, dtype=ms.float16)
    second = prepare_latents(LATENT, seed=33, dtype=ms.float16)
    other = prepare_latents(LATENT, seed=34)
    assert first.shape == LATENT and first.dtype == ms.float16 and other.dtype == ms.float32
    np.testing.assert_array_equal(first.asnumpy(), second.asnumpy())
    np.testing.assert_array_equal(
        other.asnumpy(), np.random.default_rng(34).standard_normal(LATENT, dtype=np.float32)
    )


# -- prediction types ------------------------------------------------------------------------------------------------


class Oracle:
    """A perfect model for one known (x0, noise) pair: returns the exact eps / v / x0 at the timestep it is given,
    whatever the sample (as a well-trained model would for latents on this trajectory)."""

    def __init__(self, scheduler, x0, noise):
        self.scheduler, self.x0, self.noise = scheduler, x0, noise

    def __call__(self, sample, timestep, encoder_hidden_states):
        t = int(timestep.asnumpy()[0])
        alpha = np.float64(self.scheduler.alphas_cumprod[t])
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            out = self.noise
        elif kind == "sample":
            out = self.x0
        else:
            out = np.sqrt(alpha) * self.noise - np.sqrt(1 - alpha) * self.x0
        return ms.Tensor(out.astype(np.float32))


def _round_trip(prediction_type, inversion_reads_as=None, steps=50):
    scheduler = DDIMScheduler.from_config({**SD, "prediction_type": prediction_type})
    x0, noise = _rand(20, LATENT), _rand(21, LATENT)
    # DDIM with set_alpha_to_one=False starts inversion from, and ends sampling at, the noise level
    # final_alpha_cumprod = alphas_cumprod[0]; put the input on the trajectory there.
    alpha_0 = np.float64(scheduler.final_alpha_cumprod)
    start = (np.sqrt(alpha_0) * x0 + np.sqrt(1 - alpha_0) * noise).astype(np.float32)
    oracle = Oracle(scheduler, x0, noise)
    cond = ms.Tensor(np.zeros((B, L, D), np.float32))
    walk = ddim_invert(oracle, scheduler, ms.Tensor(start), cond, steps, prediction_type=inversion_reads_as)
    alpha_T = np.float64(scheduler.alphas_cumprod[scheduler.timesteps[0]])
    expected_noisy = np.sqrt(alpha_T) * x0 + np.sqrt(1 - alpha_T) * noise
    inverted_error = max_rel_error(walk[-1].asnumpy(), expected_noisy)
    back = denoise(oracle, scheduler, walk[-1], cond, None, steps, 1.0)
    return inverted_error, max_rel_error(back.asnumpy(), start)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_inversion_with_a_perfect_model_lands_on_the_forward_trajectory(prediction_type):
    inverted_error, round_trip_error = _round_trip(prediction_type)
    print(f"{prediction_type}: inverted latent error {inverted_error:.2e}, round trip error {round_trip_error:.2e}")
    assert inverted_error < TOL
    assert round_trip_error < TOL


def test_reading_v_as_eps_like_the_official_code_is_measurably_worse():
    _, ours = _round_trip("v_prediction")
    _, official = _round_trip("v_prediction", inversion_reads_as="epsilon")
    print(f"v-prediction round trip error: ours {ours:.2e}, v read as eps {official:.2e}")
    assert official > 1e-2
    assert official > 100 * ours


def test_without_a_window_sampling_is_the_loop_it_always_was(inputs):
    """window=None leaves denoise as the loop it was before windows existed (written out here), bit for bit."""
    from tav.inversion import call_unet

    latents, cond, uncond = (ms.Tensor(a) for a in inputs)
    unet, scheduler, steps, scale = ToyDenoiser(), DDIMScheduler.from_config(SD), 4, 7.5
    scheduler.set_timesteps(steps)
    x, context = latents, ops.concat([uncond, cond], axis=0)
    for t in [int(t) for t in scheduler.timesteps]:
        prediction = call_unet(unet, ops.concat([x, x], axis=0), t, context).astype(ms.float32)
        prediction = prediction[:B] + float(scale) * (prediction[B:] - prediction[:B])
        x = scheduler.step(prediction, t, x).prev_sample
    ours = denoise(unet, DDIMScheduler.from_config(SD), latents, cond, uncond, steps, scale, window=None)
    np.testing.assert_array_equal(ours.asnumpy(), x.asnumpy())
