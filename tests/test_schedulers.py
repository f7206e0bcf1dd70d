"""tav.schedulers.DDIMScheduler against diffusers' PyTorch DDIMScheduler (0.35.2), and config loading."""
import json

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from tav.schedulers import SD_V1_SCHEDULE, DDIMConfig, DDIMScheduler

SD = SD_V1_SCHEDULE
CONFIGS = {
    "sd": SD,
    "sd_alpha_to_one": {**SD, "set_alpha_to_one": True},
    "linear": dict(beta_schedule="linear", clip_sample=False),
    "sd_v_prediction": {**SD, "prediction_type": "v_prediction"},
    "sd_sample_prediction": {**SD, "prediction_type": "sample"},
    "clip_sample": {**SD, "clip_sample": True, "clip_sample_range": 1.0},
    "trailing": {**SD, "timestep_spacing": "trailing"},
    "linspace": {**SD, "timestep_spacing": "linspace"},
    "cosine": dict(beta_schedule="squaredcos_cap_v2", clip_sample=False),
    "zero_snr_v": {**SD, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
}
# SD v1-4's scheduler/scheduler_config.json (a PNDM config).
SD14_PNDM = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.7.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
# torch's vectorised float32 sqrt is not correctly rounded (about 1 value in 5 is 1 ulp off on AVX-512); the
# zero-SNR rescale takes sqrt of the whole schedule and divides neighbours, which amplifies that near t = 999.
SCHEDULE_RTOL = {"zero_snr_v": 1e-5}
SHAPE = (2, 4, 3, 5, 6)  # (B, C, F, h, w)


def _torch_and_diffusers():
    torch = pytest.importorskip("torch", reason="torch (test-only) is needed for the diffusers parity checks")
    diffusers = pytest.importorskip("diffusers", reason="diffusers is needed for the PyTorch DDIMScheduler reference")
    return torch, diffusers


def assert_close(ours, ref, rtol=1e-6, scale=None):
    """Max error relative to the size of the values (or of the terms that produced them, `scale`)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    scale = max(np.abs(ref).max(), scale or 0.0, 1e-12)
    err = np.abs(ours - ref).max() / scale
    assert err <= rtol, f"max error {err:.3g} relative to max |ref| {scale:.3g} exceeds {rtol}"


def _rand(seed, shape=SHAPE, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


@pytest.fixture(params=sorted(CONFIGS))
def pair(request):
    torch, diffusers = _torch_and_diffusers()
    config = CONFIGS[request.param]
    return DDIMScheduler.from_config(config), diffusers.DDIMScheduler.from_config(config), torch


@pytest.mark.parity
def test_alphas_cumprod_and_final_alpha_match_diffusers(pair, request):
    ours, ref, _ = pair
    rtol = SCHEDULE_RTOL.get(request.node.callspec.params["pair"], 1e-6)
    assert_close(ours.betas, ref.betas.numpy(), rtol)
    assert_close(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol)
    assert ours.alphas_cumprod.dtype == np.float32
    assert float(ours.final_alpha_cumprod) == pytest.approx(float(ref.final_alpha_cumprod), rel=1e-6)


@pytest.mark.parity
def test_sd_alphas_cumprod_are_bit_identical_to_diffusers():
    _, diffusers = _torch_and_diffusers()
    ours, ref = DDIMScheduler.from_config(SD), diffusers.DDIMScheduler.from_config(SD)
    mismatches = int((ours.alphas_cumprod != ref.alphas_cumprod.numpy()).sum())
    print(f"SD alphas_cumprod: {mismatches} of 1000 differ from diffusers in the last bit")
    assert mismatches <= 10  # 0 on x86 with FMA; a platform without FMA may differ by an ulp here and there
    assert ours.alphas_cumprod[0] == pytest.approx(0.99915, abs=1e-6)
    assert ours.alphas_cumprod[999] == pytest.approx(0.0046601, abs=1e-6)


@pytest.mark.parity
@pytest.mark.parametrize("steps", [50, 20, 7, 1])
def test_set_timesteps_matches_diffusers(pair, steps):
    ours, ref, _ = pair
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    assert ours.timesteps.tolist() == ref.timesteps.tolist()
    assert ours.timesteps.dtype == np.int64


def test_sd_50_steps_are_981_down_to_1():
    scheduler = DDIMScheduler.from_config(SD)
    scheduler.set_timesteps(50)
    assert scheduler.timesteps.tolist() == list(range(981, 0, -20))
    assert scheduler.init_noise_sigma == 1.0


@pytest.mark.parity
@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_step_matches_diffusers(pair, eta):
    ours, ref, torch = pair
    ours.set_timesteps(50)
    ref.set_timesteps(50)
    sample, model_output = _rand(1, scale=1.5), _rand(2)
    for t in [int(v) for v in ref.timesteps[[0, 1, 25, -2, -1]]]:
        noise = _rand(100 + t)
        expected = ref.step(
            torch.from_numpy(model_output), t, torch.from_numpy(sample), eta=eta,
            variance_noise=torch.from_numpy(noise) if eta > 0 else None,
        )
        got = ours.step(ms.Tensor(model_output), t, ms.Tensor(sample), eta=eta, noise=ms.Tensor(noise) if eta > 0 else None)
        assert_close(got.prev_sample.asnumpy(), expected.prev_sample.numpy())
        # torch's float32 `alpha ** 0.5` is itself 1 ulp off for about 1 alpha in 3, so x0 = (x - ..) / sqrt(a)
        # can differ by an ulp of x / sqrt(a); clipping to [-1, 1] would hide that size from the scale.
        unclipped = np.abs(sample).max() / np.sqrt(ref.alphas_cumprod[t].item()) if ref.config.clip_sample else None
        assert_close(got.pred_original_sample.asnumpy(), expected.pred_original_sample.numpy(), scale=unclipped)


@pytest.mark.parity
def test_step_with_clipped_model_output_matches_diffusers():
    torch, diffusers = _torch_and_diffusers()
    config = CONFIGS["clip_sample"]
    ours, ref = DDIMScheduler.from_config(config), diffusers.DDIMScheduler.from_config(config)
    ours.set_timesteps(50)
    ref.set_timesteps(50)
    sample, model_output = _rand(3, scale=2.0), _rand(4)
    expected = ref.step(torch.from_numpy(model_output), 501, torch.from_numpy(sample), use_clipped_model_output=True)
    got = ours.step(ms.Tensor(model_output), 501, ms.Tensor(sample), use_clipped_model_output=True)
    assert np.abs(got.pred_original_sample.asnumpy()).max() <= 1.0
    assert_close(got.prev_sample.asnumpy(), expected.prev_sample.numpy())


def test_step_accepts_timestep_as_tensor_and_numpy_int():
    scheduler = DDIMScheduler.from_config(SD)
    scheduler.set_timesteps(50)
    sample, model_output = ms.Tensor(_rand(5)), ms.Tensor(_rand(6))
    by_int = scheduler.step(model_output, 481, sample).prev_sample.asnumpy()
    by_numpy = scheduler.step(model_output, scheduler.timesteps[25], sample).prev_sample.asnumpy()
    by_tensor = scheduler.step(model_output, ms.Tensor([481, 481], ms.int64), sample).prev_sample.asnumpy()
    np.testing.assert_array_equal(by_int, by_numpy)
    np.testing.assert_array_equal(by_int, by_tensor)


def test_step_eta_with_generator_is_reproducible_and_needs_noise():
    scheduler = DDIMScheduler.from_config(SD)
    scheduler.set_timesteps(50)
    sample, model_output = ms.Tensor(_rand(7)), ms.Tensor(_rand(8))
    first = scheduler.step(model_output, 501, sample, eta=1.0, generator=np.random.default_rng(3)).prev_sample
    second = scheduler.step(model_output, 501, sample, eta=1.0, generator=np.random.default_rng(3)).prev_sample
    explicit = scheduler.step(
        model_output, 501, sample, eta=1.0, noise=ms.Tensor(np.random.default_rng(3).standard_normal(SHAPE, dtype=np.float32))
    ).prev_sample
    np.testing.assert_array_equal(first.asnumpy(), second.asnumpy())
    np.testing.assert_array_equal(first.asnumpy(), explicit.asnumpy())
    with pytest.raises(ValueError, match="eta > 0"):
        scheduler.step(model_output, 501, sample, eta=1.0)


def test_step_keeps_fp16_latents_fp16_and_computes_in_fp32():
    scheduler = DDIMScheduler.from_config(SD)
    scheduler.set_timesteps(50)
    sample, model_output = _rand(9), _rand(10)
    full = scheduler.step(ms.Tensor(model_output), 981, ms.Tensor(sample)).prev_sample.asnumpy()
    half = scheduler.step(ms.Tensor(model_output).astype(ms.float16), 981, ms.Tensor(sample).astype(ms.float16))
    assert half.prev_sample.dtype == ms.float16
    assert half.pred_original_sample.dtype == ms.float16
    np.testing.assert_allclose(half.prev_sample.asnumpy().astype(np.float32), full, rtol=2e-3, atol=2e-3)


def test_step_before_set_timesteps_is_an_error():
    scheduler = DDIMScheduler.from_config(SD)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(ms.Tensor(_rand(1)), 981, ms.Tensor(_rand(2)))


@pytest.mark.parity
@pytest.mark.parametrize("dtype", [ms.float32, ms.float16])
def test_add_noise_and_get_velocity_match_diffusers(pair, dtype):
    ours, ref, torch = pair
    original, noise = _rand(11), _rand(12)
    timesteps = np.array([0, 999], np.int64) if dtype == ms.float32 else np.array([17, 640], np.int64)
    torch_dtype = torch.float32 if dtype == ms.float32 else torch.float16
    args_ref = (torch.from_numpy(original).to(torch_dtype), torch.from_numpy(noise).to(torch_dtype), torch.from_numpy(timesteps))
    args_ours = (ms.Tensor(original).astype(dtype), ms.Tensor(noise).astype(dtype), ms.Tensor(timesteps))
    rtol = 1e-6 if dtype == ms.float32 else 2e-3
    noisy = ours.add_noise(*args_ours)
    velocity = ours.get_velocity(*args_ours)
    assert noisy.dtype == dtype and velocity.dtype == dtype
    assert_close(noisy.astype(ms.float32).asnumpy(), ref.add_noise(*args_ref).float().numpy(), rtol)
    assert_close(velocity.astype(ms.float32).asnumpy(), ref.get_velocity(*args_ref).float().numpy(), rtol)


class _NoisyLatents(nn.Cell):
    """How a compiled training step uses the scheduler: add_noise inside construct."""

    def __init__(self, scheduler):
        super().__init__()
        self.scheduler = scheduler

    def construct(self, latents, noise, timesteps):
        return self.scheduler.add_noise(latents, noise, timesteps), self.scheduler.get_velocity(latents, noise, timesteps)


def test_add_noise_and_get_velocity_compile_in_graph_mode():
    scheduler = DDIMScheduler.from_config(SD)
    args = (ms.Tensor(_rand(13)), ms.Tensor(_rand(14)), ms.Tensor(np.array([3, 700], np.int64)))
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        noisy, velocity = _NoisyLatents(scheduler)(*args)
    finally:
        ms.set_context(mode=previous)
    np.testing.assert_allclose(noisy.asnumpy(), scheduler.add_noise(*args).asnumpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(velocity.asnumpy(), scheduler.get_velocity(*args).asnumpy(), rtol=1e-6, atol=1e-6)


# -- from_config -----------------------------------------------------------------------------------------------------


def _resolved(scheduler):
    return {key: value for key, value in scheduler.config.to_dict().items() if not key.startswith("_")}


def test_from_config_json_file(tmp_path):
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(SD14_PNDM))
    scheduler = DDIMScheduler.from_config(str(path))
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.steps_offset == 1


def test_from_config_folder_and_pipeline_folder(tmp_path):
    folder = tmp_path / "scheduler"
    folder.mkdir()
    (folder / "scheduler_config.json").write_text(json.dumps(SD14_PNDM))
    from_folder = DDIMScheduler.from_config(folder)
    from_pipeline = DDIMScheduler.from_config(tmp_path)
    assert _resolved(from_folder) == _resolved(from_pipeline) == _resolved(DDIMScheduler.from_config(SD14_PNDM))


def test_from_config_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        DDIMScheduler.from_config(tmp_path)


@pytest.mark.parity
def test_from_config_sd14_pndm_dict_resolves_like_diffusers():
    _, diffusers = _torch_and_diffusers()
    ours = DDIMScheduler.from_config(SD14_PNDM)
    ref = diffusers.DDIMScheduler.from_config(SD14_PNDM)
    for key, value in _resolved(ours).items():
        assert value == ref.config[key], key
    ours.set_timesteps(50)
    assert ours.timesteps[0] == 981 and ours.final_alpha_cumprod == ours.alphas_cumprod[0]


def test_from_config_overrides_and_defaults():
    scheduler = DDIMScheduler.from_config({k: v for k, v in SD14_PNDM.items() if k != "clip_sample"}, prediction_type="v_prediction")
    assert scheduler.config.clip_sample is True  # diffusers' DDIM default when the key is missing
    assert scheduler.config.prediction_type == "v_prediction"
    with pytest.raises(TypeError, match="skip_prk_steps"):
        DDIMScheduler.from_config(SD, skip_prk_steps=True)


@pytest.mark.parametrize(
    "key, value",
    [
        ("beta_schedule", "cosine"),
        ("prediction_type", "x0"),
        ("timestep_spacing", "middle"),
        ("num_train_timesteps", 0),
        ("steps_offset", 1.5),
        ("clip_sample", "false"),
        ("beta_start", -0.1),
        ("trained_betas", [0.1, 0.2]),
    ],
)
def test_from_config_bad_value_names_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        DDIMScheduler.from_config({**SD14_PNDM, key: value})


def test_thresholding_is_not_implemented():
    with pytest.raises(NotImplementedError, match="thresholding"):
        DDIMScheduler.from_config({**SD, "thresholding": True})


def test_trained_betas_are_used():
    betas = np.linspace(1e-4, 2e-2, 10)
    scheduler = DDIMScheduler.from_config({"num_train_timesteps": 10, "trained_betas": betas.tolist()})
    np.testing.assert_array_equal(scheduler.betas, betas.astype(np.float32))
    assert isinstance(scheduler.config, DDIMConfig)
