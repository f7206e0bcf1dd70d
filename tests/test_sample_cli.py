"""tools/sample.py and the sampling request as a user meets them: one `error: ...` line for a bad input (the
traceback with --debug), every numeric option range-checked before anything is loaded, prompts checked by position,
errors named by the option the user typed, --no_check_base reaching the delta loader, the untuned base model's
fresh temporal layers covered by the seed, and no import-time noise from the libraries under the text encoder."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from tav import cli, generate, tiny
from tav.models.unet3d import UNet3DConditionModel, is_temporal_key
from tav.pipeline import PipelineError, TuneAVideoPipeline
from tav.tiny import make_demo_clip
from tests.helpers import REPO_ROOT, run_tool


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return tiny.write_tiny_pipeline(str(tmp_path_factory.mktemp("tiny") / "tiny-sd"))


def request(tiny_model, tmp_path, **changes):
    values = dict(pretrained_model_path=tiny_model, prompts=["a cat"], video_length=4, height=64, width=64,
                  output_dir=str(tmp_path / "out"), progress=False)
    values.update(changes)
    return generate.SampleRequest(**values)


# ------------------------------------------------------------------------------------------------ error policy
def test_a_user_error_is_one_line_on_stderr_and_exit_status_1(tmp_path):
    result = run_tool("sample", "--pretrained_model_path", tmp_path / "missing", "--prompt", "a cat")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"error: --pretrained_model_path "
                                                  f"{str(tmp_path / 'missing')!r} does not exist (expected a "
                                                  f"diffusers folder or one checkpoint file: .safetensors, .ckpt, "
                                                  f".pt, .pth, .bin)"]
    assert "Traceback" not in result.stderr


def test_debug_shows_the_traceback_of_a_user_error(tmp_path):
    result = run_tool("sample", "--pretrained_model_path", tmp_path / "missing", "--prompt", "a cat", "--debug")
    assert result.returncode != 0
    # CheckpointNotFoundError is a FileNotFoundError (tav.checkpoint), named as raised in the traceback
    assert "Traceback" in result.stderr and "CheckpointNotFoundError" in result.stderr


def test_run_cli_keeps_the_traceback_of_a_bug(capsys):
    def main(argv):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        cli.run_cli(main, [])
    assert capsys.readouterr().err == ""


def test_run_cli_prints_every_tav_input_error_class_as_one_line(capsys):
    from tav.checkpoint import CheckpointMismatchError
    from tav.config import ConfigError
    from tav.video import VideoError

    for error in (ConfigError("bad key 'x'"), PipelineError("no prompt"), VideoError("short clip"),
                  CheckpointMismatchError("other base"), FileNotFoundError("no such clip")):
        def main(argv, error=error):
            raise error

        assert cli.run_cli(main, []) == 1
        assert capsys.readouterr().err == f"error: {error}\n"


def run_python(code, timeout=300):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT,
                          timeout=timeout)


def test_cli_imports_no_tav_module():
    result = run_python("import sys, tav.cli; print(sorted(m for m in sys.modules if m.startswith('tav.')))")
    assert result.stdout.strip() == "['tav.cli']"


# ------------------------------------------------------------------------------------------------ numeric ranges
@pytest.mark.parametrize("name,value,words", [
    ("guidance_scale", math.nan, "--guidance_scale must be a finite number >= 0, got nan"),
    ("guidance_scale", math.inf, "--guidance_scale must be a finite number >= 0, got inf"),
    ("guidance_scale", -1.0, "--guidance_scale must be a finite number >= 0"),
    ("eta", 1.5, r"--eta must be a finite number in \[0, 1\]"),
    ("eta", math.nan, r"--eta must be a finite number in \[0, 1\]"),
    ("fps", 0, "--fps must be a finite number > 0"),
    ("fps", math.inf, "--fps must be a finite number > 0"),
    ("num_inference_steps", 0, "--num_inference_steps must be an integer >= 1"),
    ("num_inv_steps", 2.5, "--num_inv_steps must be an integer >= 1"),
    ("video_length", 0, "--video_length must be an integer >= 1"),
    ("num_videos_per_prompt", 0, "--num_videos_per_prompt must be an integer >= 1"),
    ("sample_start_idx", -1, "--sample_start_idx must be an integer >= 0"),
    ("sample_frame_rate", 0, "--sample_frame_rate must be an integer >= 1"),
    ("seed", -3, "--seed must be an integer >= 0"),
    ("height", 60, "--height must be a positive multiple of 8"),
    ("width", 0, "--width must be a positive multiple of 8"),
])
def test_every_numeric_option_is_range_checked_before_loading(tiny_model, tmp_path, no_loading, name, value, words):
    with pytest.raises(PipelineError, match=words):
        generate.run_sampling(request(tiny_model, tmp_path, **{name: value}))
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_guidance_nan_or_inf_is_refused_by_the_tool_before_anything_is_written(tmp_path, value):
    result = run_tool("sample", "--guidance_scale", value, "--output_dir", tmp_path / "out", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: --guidance_scale must be a finite number >= 0, got {value}"
    assert os.listdir(tmp_path) == []  # neither the demo assets nor an output folder


# ------------------------------------------------------------------------------------------------ prompts
def test_a_request_without_prompts_says_no_prompt_given(tiny_model, tmp_path, no_loading):
    with pytest.raises(PipelineError, match="no prompt given"):
        generate.run_sampling(generate.SampleRequest(pretrained_model_path=tiny_model,
                                                     output_dir=str(tmp_path / "out")))


def test_the_tool_without_prompt_says_no_prompt_given(sample_tool, tiny_model, tmp_path, no_loading):
    args = sample_tool.parse_args(["--pretrained_model_path", tiny_model, "--output_dir", str(tmp_path)])
    with pytest.raises(PipelineError, match="no prompt given"):
        generate.run_sampling(sample_tool.build_request(args))


def test_an_empty_prompts_file_says_no_prompt_given(sample_tool, tiny_model, tmp_path, no_loading):
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n  \n")
    for extra in ([], ["--pretrained_model_path", tiny_model]):  # with the demo model too: no silent fallback
        args = sample_tool.parse_args(["--prompts_file", str(empty), *extra])
        with pytest.raises(PipelineError, match="no prompt given"):
            generate.run_sampling(sample_tool.build_request(args))


def test_a_blank_prompt_among_valid_ones_is_named_by_position(tiny_model, tmp_path, no_loading):
    with pytest.raises(PipelineError, match=r"prompt 2 of 3 is blank \(' '\)") as info:
        generate.run_sampling(request(tiny_model, tmp_path, prompts=["a cat", " ", "a dog"]))
    assert "no prompt given" not in str(info.value)


# ------------------------------------------------------------------------------------------------ messages
def test_a_short_clip_is_reported_with_the_options_the_user_passed(tiny_model, tmp_path, no_loading):
    clip = make_demo_clip(tmp_path / "clip.mp4", n_frames=8, height=64, width=64)
    with pytest.raises(Exception, match="too few frames") as info:
        generate.run_sampling(request(tiny_model, tmp_path, video=str(clip), video_length=8, sample_frame_rate=3))
    message = str(info.value)
    assert "--video_length=8" in message and "--sample_frame_rate=3" in message
    assert "n_sample_frames" not in message


def test_no_check_base_reaches_the_delta_loader(sample_tool, tiny_model, tmp_path, monkeypatch):
    seen = {}

    def from_pretrained(*args, **kwargs):
        seen.update(kwargs)
        raise PipelineError("stop here")

    monkeypatch.setattr(TuneAVideoPipeline, "from_pretrained", from_pretrained)
    delta = tmp_path / "unet_delta.safetensors"
    delta.write_bytes(b"x")
    for flags, expected in (([], True), (["--no_check_base"], False)):
        args = sample_tool.parse_args(["--pretrained_model_path", tiny_model, "--prompt", "a cat", "--unet",
                                       str(delta), "--height", "64", "--width", "64", "--output_dir",
                                       str(tmp_path / "out"), *flags])
        with pytest.raises(PipelineError, match="stop here"):
            generate.run_sampling(sample_tool.build_request(args))
        assert seen["check_base"] is expected


# ------------------------------------------------------------------------------------------------ the seed
def temporal_params(model):
    return {name: param.asnumpy().copy() for name, param in model.parameters_and_names() if is_temporal_key(name)}


def test_the_fresh_temporal_layers_follow_init_seed(tiny_model):
    a = temporal_params(UNet3DConditionModel.from_pretrained_2d(tiny_model, init_seed=7))
    b = temporal_params(UNet3DConditionModel.from_pretrained_2d(tiny_model, init_seed=7))
    c = temporal_params(UNet3DConditionModel.from_pretrained_2d(tiny_model, init_seed=8))
    assert a.keys() == b.keys() and a
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    drawn = [n for n in a if "attn_temp" in n and not n.endswith("to_out.0.weight")]
    assert drawn and all(not np.array_equal(a[n], c[n]) for n in drawn)


def test_init_seed_keeps_the_official_initial_distribution(tiny_model):
    params = temporal_params(UNet3DConditionModel.from_pretrained_2d(tiny_model, init_seed=0))
    for name, values in params.items():
        if ".norm_temp." in name:
            assert np.all(values == (1.0 if name.endswith("weight") else 0.0)), name
        elif name.endswith("to_out.0.weight"):
            assert np.all(values == 0.0), name  # the new layer starts as its (constant) output bias
        else:
            weight = params[name[: -len("bias")] + "weight"] if name.endswith(".bias") else values
            bound = 1.0 / math.sqrt(weight.shape[1])
            assert np.abs(values).max() <= bound and np.abs(values).max() > 0.5 * bound, name


def test_sampling_passes_the_seed_to_the_fresh_temporal_layers(tiny_model, tmp_path, monkeypatch):
    seen = {}

    def from_pretrained(*args, **kwargs):
        seen.update(kwargs)
        raise PipelineError("stop here")

    monkeypatch.setattr(TuneAVideoPipeline, "from_pretrained", from_pretrained)
    with pytest.raises(PipelineError, match="stop here"):
        generate.run_sampling(request(tiny_model, tmp_path, seed=41))
    assert seen["init_seed"] == 41


def test_the_untuned_pipeline_is_the_same_for_the_same_seed(tiny_model):
    import mindspore as ms

    ms.set_seed(1)
    a = temporal_params(TuneAVideoPipeline.from_pretrained(tiny_model, init_seed=5).unet)
    ms.set_seed(2)  # the global RNG no longer decides
    b = temporal_params(TuneAVideoPipeline.from_pretrained(tiny_model, init_seed=5).unet)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


# ------------------------------------------------------------------------------------------------ import noise
def test_loading_a_model_prints_no_library_import_noise(tiny_model):
    code = ("import warnings, sys\n"
            "from tav.pipeline import TuneAVideoPipeline\n"
            f"TuneAVideoPipeline.from_pretrained({tiny_model!r})\n"
            "warnings.warn('a real warning still shows', FutureWarning)\n")
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "Config not found for parakeet" not in output
    assert "image_processor_class argument is deprecated" not in output
    assert "a real warning still shows" in output


def test_the_demo_request_gets_a_clip_long_enough_for_its_frames(tmp_path):
    from tav.demo import DEMO_CLIP, demo_sample_request
    from tav.video import read_video_frames

    default = demo_sample_request(str(tmp_path))
    assert read_video_frames(default.video, DEMO_CLIP["n_frames"], height=64, width=64).shape[0] == 16
    long = demo_sample_request(str(tmp_path), video_length=40, sample_frame_rate=1)
    assert long.video != default.video
    assert read_video_frames(long.video, 40, height=64, width=64).shape == (40, 64, 64, 3)


def test_the_frame_size_defaults_to_the_models_own(sample_tool, tmp_path):
    """512 is SD 1.x's size, not every model's: without --height/--width the tool samples at unet sample_size x the
    VAE's downscale factor, read from its configs, and a flag still wins."""
    from tav import checkpoint
    from tav.tiny import write_tiny_pipeline

    model = write_tiny_pipeline(str(tmp_path / "sd"))
    unet = checkpoint.read_json(os.path.join(model, "unet", "config.json"))
    vae = checkpoint.read_json(os.path.join(model, "vae", "config.json"))
    size = unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)
    assert size != 512
    request = sample_tool.build_request(sample_tool.parse_args(["--pretrained_model_path", model, "--prompt", "a"]))
    assert (request.height, request.width) == (size, size)
    request = sample_tool.build_request(sample_tool.parse_args(["--pretrained_model_path", model, "--prompt", "a",
                                                                "--height", "48"]))
    assert (request.height, request.width) == (48, size)


def test_a_delta_beside_its_run_config_samples_with_that_runs_validation_settings(sample_tool, tiny_model, tmp_path):
    """tools/sample.py --unet RUN/unet_delta.safetensors takes RUN/config.yaml's validation steps, inversion steps and
    guidance as defaults; a flag still wins, and a delta without a run config keeps the official defaults."""
    from tav.config import RUN_CONFIG_NAME

    run = tmp_path / "run"
    run.mkdir()
    delta = run / "unet_delta.safetensors"
    delta.write_bytes(b"x")
    (run / RUN_CONFIG_NAME).write_text(
        f"pretrained_model_path: {tiny_model}\noutput_dir: {run}\n"
        "train_data: {video_path: clip.mp4, prompt: a cat}\n"
        "validation_data: {prompts: [a dog], num_inference_steps: 7, num_inv_steps: 9, guidance_scale: 3.5}\n")
    base = ["--pretrained_model_path", tiny_model, "--prompt", "a cat", "--output_dir", str(tmp_path / "out")]
    request = sample_tool.build_request(sample_tool.parse_args(base + ["--unet", str(delta)]))
    assert (request.num_inference_steps, request.num_inv_steps, request.guidance_scale) == (7, 9, 3.5)
    assert request.prompts == ["a cat"]  # the run's settings, not its prompts
    flagged = sample_tool.build_request(sample_tool.parse_args(base + ["--unet", str(delta), "--guidance_scale", "5"]))
    assert (flagged.num_inference_steps, flagged.guidance_scale) == (7, 5.0)
    lone = tmp_path / "lone" / "unet_delta.safetensors"
    lone.parent.mkdir()
    lone.write_bytes(b"x")
    official = sample_tool.build_request(sample_tool.parse_args(base + ["--unet", str(lone)]))
    assert (official.num_inference_steps, official.num_inv_steps, official.guidance_scale) == (50, 50, 12.5)
