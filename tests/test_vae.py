"""tav.models.vae: Stable Diffusion's AutoencoderKL (parity with diffusers, checkpoint spellings and formats,
saving) and the chunked video helpers."""
import inspect
import json
import os
import shutil

import mindspore as ms
import numpy as np
import pytest
import safetensors.numpy

from tav import checkpoint
from tav.models import AutoencoderKL
from tav.models.vae import (
    AutoencoderKLConfig,
    DiagonalGaussian,
    decode_video,
    encode_video,
    latents_to_video,
    rename_legacy_attention_keys,
    standard_normal,
    video_to_latents,
)
from tests.helpers import import_parity_extra

TINY = {
    "block_out_channels": [32, 64],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "latent_channels": 4,
    "sample_size": 32,
}
# Non-square so a swapped H/W in the attention's token reshape fails; MindSpore's CPU convs are slow, hence small.
IMAGE_SHAPE = (2, 3, 16, 24)
TOL = 1e-4
ATTENTION = "mid_block.attentions.0"
OLD_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def tiny_vae(seed=0, **overrides):
    ms.set_seed(seed)
    return AutoencoderKL(AutoencoderKLConfig(**{**TINY, **overrides}))


def max_abs(a, b):
    a = a.asnumpy() if isinstance(a, ms.Tensor) else np.asarray(a)
    b = b.asnumpy() if isinstance(b, ms.Tensor) else np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def params_of(vae):
    return checkpoint.cell_state_dict(vae)


def assert_same_params(a, b):
    pa, pb = params_of(a), params_of(b)
    assert sorted(pa) == sorted(pb)
    for name in pa:
        assert pa[name].dtype == pb[name].dtype, name
        np.testing.assert_array_equal(pa[name], pb[name], err_msg=name)


# ---------------------------------------------------------------------------------------------------------
# The diffusers original, built once


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny random diffusers AutoencoderKL saved as safetensors, its outputs on a fixed input, and the folder."""
    torch, diffusers = import_parity_extra()
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(**TINY).eval()
    with torch.no_grad():  # GroupNorm init is 1/0; perturb it so a norm loaded wrongly (or not at all) shows
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.3 * torch.randn_like(param))
    folder = tmp_path_factory.mktemp("diffusers_vae")
    model.save_pretrained(folder, safe_serialization=True)
    x = np.random.default_rng(0).uniform(-1, 1, IMAGE_SHAPE).astype(np.float32)
    with torch.no_grad():
        posterior = model.encode(torch.from_numpy(x)).latent_dist
        decoded = model.decode(posterior.mean).sample
    outputs = {
        "x": x,
        "mean": posterior.mean.numpy(),
        "logvar": posterior.logvar.numpy(),
        "std": posterior.std.numpy(),
        "decoded": decoded.numpy(),  # decode(mean): also the deterministic round trip vae(x)
    }
    return {"torch": torch, "model": model, "folder": str(folder), "out": outputs}


def folder_with(tmp_path, reference, state_dict=None, weights_name="diffusion_pytorch_model.safetensors"):
    """A copy of the reference VAE folder whose weights are `state_dict` (numpy) saved under `weights_name`."""
    shutil.copy(os.path.join(reference["folder"], "config.json"), tmp_path / "config.json")
    if state_dict is not None:
        safetensors.numpy.save_file(state_dict, str(tmp_path / weights_name), metadata={"format": "pt"})
    return tmp_path


def reference_state_dict(reference):
    return safetensors.numpy.load_file(os.path.join(reference["folder"], "diffusion_pytorch_model.safetensors"))


# ---------------------------------------------------------------------------------------------------------
# Config


@pytest.mark.parity
def test_config_defaults_are_diffusers_defaults():
    _, diffusers = import_parity_extra()
    signature = inspect.signature(diffusers.AutoencoderKL.__init__).parameters
    ours = AutoencoderKLConfig().to_dict()
    for name, param in signature.items():
        if name == "self":
            continue
        expected = list(param.default) if isinstance(param.default, tuple) else param.default
        assert ours[name] == expected, name


def test_config_ignores_underscore_keys_and_warns_on_unknown_keys():
    raw = {**TINY, "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "future_field": 1}
    with pytest.warns(UserWarning, match="future_field"):
        config = AutoencoderKLConfig.from_dict(raw, source="vae/config.json")
    assert config.block_out_channels == (32, 64)


def test_config_without_scaling_factor_uses_sd_value():
    assert AutoencoderKLConfig.from_dict(dict(TINY)).scaling_factor == 0.18215
    assert AutoencoderKLConfig.from_dict({**TINY, "scaling_factor": 0.13025}).scaling_factor == 0.13025


@pytest.mark.parametrize(
    "field, value",
    [
        ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
        ("up_block_types", ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]),
        ("act_fn", "gelu"),
        ("norm_num_groups", 5),
        ("block_out_channels", [32, 64, 64]),
    ],
)
def test_unsupported_config_values_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field) as info:
        AutoencoderKLConfig.from_dict({**TINY, field: value}, source="some/vae/config.json")
    assert "some/vae/config.json" in str(info.value)


@pytest.mark.parity
def test_parameter_names_and_shapes_are_diffusers_keys(reference):
    expected = {name: tuple(t.shape) for name, t in reference["model"].state_dict().items()}
    ours = {name: tuple(p.shape) for name, p in tiny_vae().parameters_and_names()}
    assert ours == expected


@pytest.mark.parity
@pytest.mark.parametrize(
    "overrides",
    [{"mid_block_add_attention": False}, {"use_quant_conv": False, "use_post_quant_conv": False},
     {"layers_per_block": 2, "block_out_channels": [32, 32], "latent_channels": 8}],
    ids=["no-mid-attention", "no-quant-convs", "two-layers-same-width"],
)
def test_parameter_names_follow_config_switches(reference, overrides):
    _, diffusers = import_parity_extra()
    expected = {n: tuple(t.shape) for n, t in diffusers.AutoencoderKL(**{**TINY, **overrides}).state_dict().items()}
    ours = {name: tuple(p.shape) for name, p in tiny_vae(**overrides).parameters_and_names()}
    assert ours == expected


@pytest.mark.parity
def test_stable_diffusion_config_builds_diffusers_keys():
    _, diffusers = import_parity_extra()
    sd = {"block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
          "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 2, "sample_size": 512}
    expected = {name: tuple(t.shape) for name, t in diffusers.AutoencoderKL(**sd).state_dict().items()}
    ours = {name: tuple(p.shape) for name, p in AutoencoderKL(sd).parameters_and_names()}
    assert ours == expected and sum(np.prod(s) for s in ours.values()) == 83_653_863


# ---------------------------------------------------------------------------------------------------------
# Parity with diffusers


@pytest.mark.parity
def test_matches_diffusers(reference, ms_mode):
    out = reference["out"]
    for name in ("mean", "std", "decoded"):  # outputs large enough that a wrong model cannot pass by being ~0
        assert out[name].std() > 0.05, name
    vae = AutoencoderKL.from_pretrained(reference["folder"])
    posterior = vae.encode(ms.Tensor(out["x"]))
    errors = {
        "mean": max_abs(posterior.mean, out["mean"]),
        "logvar": max_abs(posterior.logvar, out["logvar"]),
        "std": max_abs(posterior.std, out["std"]),
        "decode": max_abs(vae.decode(ms.Tensor(out["mean"])), out["decoded"]),
        "round trip vae(x)": max_abs(vae(ms.Tensor(out["x"])), out["decoded"]),  # one graph: construct
    }
    print(f"max-abs error vs diffusers ({'graph' if ms_mode == ms.GRAPH_MODE else 'pynative'}): {errors}")
    assert all(err < TOL for err in errors.values()), errors


# ---------------------------------------------------------------------------------------------------------
# Checkpoint spellings and formats


@pytest.mark.parity
@pytest.mark.parametrize("shape", ["linear", "conv1x1"])
def test_old_attention_key_names_load_to_the_same_model(tmp_path, reference, pynative, shape):
    state_dict = {}
    for name, array in reference_state_dict(reference).items():
        for new, old in OLD_NAMES.items():
            if f"{ATTENTION}.{new}." in name:
                name = name.replace(f"{ATTENTION}.{new}.", f"{ATTENTION}.{old}.")
                if shape == "conv1x1" and array.ndim == 2:
                    array = array[:, :, None, None]
        state_dict[name] = array
    assert f"encoder.{ATTENTION}.query.weight" in state_dict and f"decoder.{ATTENTION}.proj_attn.bias" in state_dict
    old = AutoencoderKL.from_pretrained(folder_with(tmp_path, reference, state_dict))
    assert_same_params(old, AutoencoderKL.from_pretrained(reference["folder"]))
    assert max_abs(old(ms.Tensor(reference["out"]["x"])), reference["out"]["decoded"]) < TOL


def test_rename_legacy_attention_keys_leaves_other_keys_alone():
    weight = np.ones((4, 4, 1, 1), np.float32)
    renamed = rename_legacy_attention_keys(
        {
            "decoder.mid_block.attentions.0.proj_attn.weight": weight,
            "decoder.mid_block.resnets.0.conv_shortcut.weight": weight,  # a real 1x1 conv: not squeezed
            "encoder.mid_block.attentions.0.group_norm.bias": np.zeros(4, np.float32),
        }
    )
    assert renamed["decoder.mid_block.attentions.0.to_out.0.weight"].shape == (4, 4)
    assert renamed["decoder.mid_block.resnets.0.conv_shortcut.weight"].shape == (4, 4, 1, 1)
    assert "encoder.mid_block.attentions.0.group_norm.bias" in renamed
    with pytest.raises(checkpoint.CheckpointError, match="to_q.weight"):
        rename_legacy_attention_keys({"a.attentions.0.query.weight": weight, "a.attentions.0.to_q.weight": weight})


@pytest.mark.parity
def test_bin_and_safetensors_give_identical_models(tmp_path, reference, pynative):
    torch = reference["torch"]
    folder = folder_with(tmp_path, reference)
    torch.save(reference["model"].state_dict(), folder / "diffusion_pytorch_model.bin")
    from_bin = AutoencoderKL.from_pretrained(folder)
    from_safetensors = AutoencoderKL.from_pretrained(reference["folder"])
    assert_same_params(from_bin, from_safetensors)
    x = ms.Tensor(reference["out"]["x"][:1])
    assert max_abs(from_bin(x), from_safetensors(x)) == 0.0


@pytest.mark.parity
def test_pipeline_folder_with_vae_subfolder_loads(tmp_path, reference):
    shutil.copytree(reference["folder"], tmp_path / "vae")
    assert_same_params(AutoencoderKL.from_pretrained(tmp_path), AutoencoderKL.from_pretrained(reference["folder"]))


# ---------------------------------------------------------------------------------------------------------
# Saving and errors


def test_save_then_load_is_bit_exact(tmp_path):
    vae = tiny_vae(seed=3, scaling_factor=0.5, shift_factor=0.1)
    vae.save_pretrained(tmp_path / "saved")
    assert sorted(os.listdir(tmp_path / "saved")) == ["config.json", "diffusion_pytorch_model.safetensors"]
    loaded = AutoencoderKL.from_pretrained(tmp_path / "saved")
    assert_same_params(loaded, vae)
    assert loaded.config == vae.config and loaded.scaling_factor == 0.5 and loaded.shift_factor == 0.1


@pytest.mark.parity
def test_fp16_weights_load_and_save_as_fp16(tmp_path, reference):
    vae = AutoencoderKL.from_pretrained(reference["folder"], dtype=ms.float16)
    assert {p.dtype for _, p in vae.parameters_and_names()} == {ms.float16}
    vae.save_pretrained(tmp_path / "fp16")
    saved = safetensors.numpy.load_file(str(tmp_path / "fp16" / "diffusion_pytorch_model.safetensors"))
    assert {a.dtype for a in saved.values()} == {np.dtype(np.float16)}
    again = AutoencoderKL.from_pretrained(tmp_path / "fp16", dtype=ms.float16)
    assert_same_params(again, vae)
    fp32_from_fp16 = AutoencoderKL.from_pretrained(tmp_path / "fp16")  # fp16 file into fp32 parameters
    assert {p.dtype for _, p in fp32_from_fp16.parameters_and_names()} == {ms.float32}


@pytest.mark.parity
def test_fp16_model_decodes_close_to_fp32(reference, pynative):
    z = ms.Tensor(reference["out"]["mean"][:1])  # an fp32 input: the model casts it to its own dtype
    decoded = AutoencoderKL.from_pretrained(reference["folder"], dtype=ms.float16).decode(z)
    assert decoded.dtype == ms.float16
    assert max_abs(decoded, reference["out"]["decoded"][:1]) < 2e-2


@pytest.mark.parity
def test_diffusers_loads_what_tav_saves(tmp_path, reference):
    tav_vae = AutoencoderKL.from_pretrained(reference["folder"])
    tav_vae.save_pretrained(tmp_path / "tav")
    _, diffusers = import_parity_extra()
    loaded = diffusers.AutoencoderKL.from_pretrained(tmp_path / "tav")
    ours = params_of(tav_vae)
    for name, tensor in loaded.state_dict().items():
        np.testing.assert_array_equal(tensor.numpy(), ours[name], err_msg=name)
    assert sorted(loaded.state_dict()) == sorted(ours)


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(checkpoint.CheckpointNotFoundError, match="nowhere"):
        AutoencoderKL.from_pretrained(tmp_path / "nowhere")


def test_missing_config_is_named(tmp_path):
    with pytest.raises(checkpoint.CheckpointNotFoundError, match="config.json"):
        AutoencoderKL.from_pretrained(tmp_path)


@pytest.mark.parity
def test_missing_weights_are_named(tmp_path, reference):
    folder = folder_with(tmp_path, reference)
    with pytest.raises(checkpoint.CheckpointNotFoundError, match="diffusion_pytorch_model") as info:
        AutoencoderKL.from_pretrained(folder)
    assert str(folder) in str(info.value)


@pytest.mark.parity
def test_wrong_shape_weight_is_named(tmp_path, reference):
    state_dict = reference_state_dict(reference)
    state_dict["decoder.conv_out.weight"] = np.zeros((3, 32, 1, 1), np.float32)
    with pytest.raises(checkpoint.CheckpointMismatchError, match="decoder.conv_out.weight"):
        AutoencoderKL.from_pretrained(folder_with(tmp_path, reference, state_dict))


@pytest.mark.parity
def test_missing_weight_is_named(tmp_path, reference):
    state_dict = reference_state_dict(reference)
    del state_dict["encoder.mid_block.attentions.0.to_v.bias"]
    with pytest.raises(checkpoint.CheckpointMismatchError, match="to_v.bias"):
        AutoencoderKL.from_pretrained(folder_with(tmp_path, reference, state_dict))


@pytest.mark.parity
def test_unsupported_config_in_a_folder_names_the_file(tmp_path, reference):
    folder = folder_with(tmp_path, reference, reference_state_dict(reference))
    config = json.loads((folder / "config.json").read_text())
    config["act_fn"] = "relu"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="act_fn") as info:
        AutoencoderKL.from_pretrained(folder)
    assert str(folder / "config.json") in str(info.value)


# ---------------------------------------------------------------------------------------------------------
# Posterior


def test_posterior_clamps_logvar_and_samples_mean_plus_std_noise():
    mean = ms.Tensor(np.array([[0.5, -1.0]], np.float32))
    logvar = ms.Tensor(np.array([[-40.0, 25.0]], np.float32))
    posterior = DiagonalGaussian(mean, logvar)
    np.testing.assert_array_equal(posterior.logvar.asnumpy(), [[-30.0, 20.0]])
    np.testing.assert_allclose(posterior.std.asnumpy(), np.exp([[-15.0, 10.0]]), rtol=1e-5)
    noise = np.array([[2.0, -3.0]], np.float32)
    expected = mean.asnumpy() + posterior.std.asnumpy() * noise
    np.testing.assert_allclose(posterior.sample(noise=noise).asnumpy(), expected, rtol=1e-6)
    seeded = posterior.sample(seed=7).asnumpy()
    np.testing.assert_array_equal(seeded, posterior.sample(seed=7).asnumpy())
    np.testing.assert_allclose(seeded, expected - posterior.std.asnumpy() * noise
                               + posterior.std.asnumpy() * standard_normal((1, 2), 7).asnumpy(), rtol=1e-6)
    assert posterior.mode() is mean


# ---------------------------------------------------------------------------------------------------------
# Video helpers: (B, C, F, H, W), frames folded as (b f). A narrower model and small frames keep these fast:
# MindSpore's CPU convs dominate the suite's runtime.

FRAMES = 5
VIDEO_SHAPE = (2, 3, FRAMES, 8, 12)
LATENT_SHAPE = (2, 4, FRAMES, 4, 6)


@pytest.fixture(scope="module")
def video_vae():
    return tiny_vae(seed=1, block_out_channels=[8, 16])


@pytest.fixture(scope="module")
def video():
    # Every frame and every clip differs, so any mix-up of the (b f) order changes the result.
    return ms.Tensor(np.random.default_rng(5).uniform(-1, 1, VIDEO_SHAPE).astype(np.float32))


@pytest.fixture(scope="module")
def latents():
    return ms.Tensor(np.random.default_rng(6).standard_normal(LATENT_SHAPE).astype(np.float32))


@pytest.fixture(scope="module")
def unchunked(video_vae, video, latents):
    """encode_video and decode_video with every frame in one call (chunk_size=None)."""
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        return {"posterior": encode_video(video_vae, video, chunk_size=None),
                "decoded": decode_video(video_vae, latents, chunk_size=None)}
    finally:
        ms.set_context(mode=previous)


def test_encode_video_is_per_frame_encode_in_bcfhw_layout(video_vae, video, unchunked, pynative):
    posterior = unchunked["posterior"]
    assert posterior.mean.shape == LATENT_SHAPE
    for f in range(FRAMES):
        frame = video_vae.encode(video[:, :, f])
        assert max_abs(posterior.mean[:, :, f], frame.mean) < 1e-5, f
        assert max_abs(posterior.logvar[:, :, f], frame.logvar) < 1e-5, f


def test_decode_video_is_per_frame_decode_in_bcfhw_layout(video_vae, latents, unchunked, pynative):
    decoded = unchunked["decoded"]
    assert decoded.shape == VIDEO_SHAPE
    for f in range(FRAMES):
        assert max_abs(decoded[:, :, f], video_vae.decode(latents[:, :, f])) < 1e-5, f


@pytest.mark.parametrize("chunk_size", [1, 3, FRAMES])
def test_chunked_encode_and_decode_equal_unchunked(video_vae, video, latents, unchunked, pynative, chunk_size):
    chunked = encode_video(video_vae, video, chunk_size=chunk_size)
    assert max_abs(chunked.mean, unchunked["posterior"].mean) < 1e-5
    assert max_abs(chunked.logvar, unchunked["posterior"].logvar) < 1e-5
    assert max_abs(decode_video(video_vae, latents, chunk_size), unchunked["decoded"]) < 1e-5


def test_video_to_latents_scales_the_seeded_sample(video_vae, video, unchunked, pynative):
    posterior = unchunked["posterior"]
    sf = video_vae.scaling_factor
    mean_latents = video_to_latents(video_vae, video, sample=False, chunk_size=None)
    assert max_abs(mean_latents, posterior.mean * sf) < 1e-5
    sampled = video_to_latents(video_vae, video, noise_seed=11, chunk_size=None)
    expected = (posterior.mean + posterior.std * standard_normal(LATENT_SHAPE, 11)) * sf
    assert max_abs(sampled, expected) < 1e-5
    assert max_abs(sampled, mean_latents) > 1e-3  # the sample is not the mean


def test_latents_to_video_unscales_decodes_and_maps_to_unit_range(video_vae, latents, unchunked, pynative):
    sf = video_vae.scaling_factor
    frames = latents_to_video(video_vae, latents * sf, chunk_size=None)
    assert frames.dtype == ms.float32 and frames.shape == VIDEO_SHAPE
    expected = np.clip(unchunked["decoded"].asnumpy() / 2 + 0.5, 0, 1)
    assert max_abs(frames, expected) < 1e-5
    assert 0.0 <= frames.asnumpy().min() and frames.asnumpy().max() <= 1.0


def test_video_helpers_reject_frame_first_layout(video_vae):
    with pytest.raises(ValueError, match="frames"):
        encode_video(video_vae, np.zeros((5, 3, 8, 8), np.float32))
    with pytest.raises(ValueError, match="chunk_size"):
        decode_video(video_vae, np.zeros((1, 4, 3, 4, 4), np.float32), chunk_size=0)
