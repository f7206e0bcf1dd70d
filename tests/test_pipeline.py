"""The tiny pipeline end to end: written in diffusers layout, loaded (safetensors and .bin), every component run,
inversion + sampling to gif/mp4 through the same function tools/sample.py calls, and bad input refused early."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import mindspore as ms

from tav import checkpoint, generate, tiny
from tav.pipeline import PipelineError, TuneAVideoPipeline
from tav.tiny import make_demo_clip
from tav.video import VideoError, read_video_frames
from tests.helpers import REPO_ROOT, import_parity_extra


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return tiny.write_tiny_pipeline(str(tmp_path_factory.mktemp("tiny") / "tiny-sd"))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("clip") / "clip.mp4")
    make_demo_clip(path, n_frames=8, height=64, width=64)
    return path


@pytest.fixture(scope="module")
def graph_pipeline(tiny_model):
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    yield TuneAVideoPipeline.from_pretrained(tiny_model)
    ms.set_context(mode=previous)


def test_tiny_pipeline_has_the_diffusers_layout(tiny_model):
    for relative in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                     "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
                     "text_encoder/model.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt",
                     "scheduler/scheduler_config.json"):
        assert os.path.isfile(os.path.join(tiny_model, relative)), relative
    unet_keys = checkpoint.read_state_dict(os.path.join(tiny_model, "unet", "diffusion_pytorch_model.safetensors"))
    assert not [k for k in unet_keys if "_temp." in k]  # a 2-D SD UNet, as downloaded


def test_every_component_runs_in_graph_mode(graph_pipeline, clip):
    pipe = graph_pipeline
    text = pipe.encode_text(["a man is skiing", ""])
    assert text.shape == (2, 77, 32)
    pixels = np.stack([f.transpose(2, 0, 1) for f in read_video_frames(clip, 4, 0, 2, 64, 64)]) / 127.5 - 1
    latents = pipe.encode_video(pixels.astype(np.float32), seed=0)
    assert latents.shape == (1, 4, 4, 8, 8)
    video = pipe.decode(latents)
    assert video.shape == (1, 3, 4, 64, 64) and 0 <= video.min() and video.max() <= 1
    noise = pipe.unet(latents, 981, text[:1])
    assert noise.shape == latents.shape and np.isfinite(noise.asnumpy()).all()


def to_bin_folder(src, dst):
    """The same weights as legacy PyTorch .bin files (how older SD snapshots ship)."""
    torch, _ = import_parity_extra()
    shutil.copytree(src, dst)
    for sub, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                      ("text_encoder", "model")):
        st = os.path.join(dst, sub, stem + ".safetensors")
        state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in checkpoint.read_state_dict(st).items()}
        torch.save(state, os.path.join(dst, sub, ("pytorch_model" if sub == "text_encoder" else stem) + ".bin"))
        os.remove(st)


@pytest.mark.parity
def test_bin_and_safetensors_pipelines_give_identical_outputs(tiny_model, tmp_path, pynative):
    to_bin_folder(tiny_model, str(tmp_path / "bin"))
    outputs = []
    for folder in (tiny_model, str(tmp_path / "bin")):
        ms.set_seed(0)  # the fresh temporal layers
        pipe = TuneAVideoPipeline.from_pretrained(folder)
        text = pipe.encode_text(["a rabbit is eating a watermelon"])
        pixels = np.random.default_rng(0).uniform(-1, 1, (2, 3, 64, 64)).astype(np.float32)
        latents = pipe.encode_video(pixels, seed=1)
        outputs.append([text.asnumpy(), latents.asnumpy(), pipe.unet(latents, 500, text).asnumpy()])
    for a, b in zip(*outputs):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder", "tokenizer", "scheduler"])
def test_a_missing_component_is_named(tiny_model, tmp_path, component):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    shutil.rmtree(broken / component)
    with pytest.raises(checkpoint.CheckpointError, match=component):
        TuneAVideoPipeline.from_pretrained(str(broken))


def test_missing_weights_file_is_named(tiny_model, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    os.remove(broken / "vae" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(checkpoint.CheckpointError, match="vae"):
        TuneAVideoPipeline.from_pretrained(str(broken))


def test_invert_then_sample_two_prompts_to_gif_and_mp4(graph_pipeline, tiny_model, clip, tmp_path):
    request = generate.SampleRequest(
        pretrained_model_path=tiny_model, prompts=["a red square on the snow", "a ball, cartoon style"],
        video=clip, video_length=4, height=64, width=64, sample_frame_rate=2, num_inference_steps=3,
        num_inv_steps=3, guidance_scale=7.5, fmt=["gif", "mp4"], output_dir=str(tmp_path / "out"), progress=False)
    written = generate.run_sampling(request, pipeline=graph_pipeline)
    assert sorted(os.path.basename(p) for p in written) == sorted([
        "a_red_square_on_the_snow.gif", "a_red_square_on_the_snow.mp4",
        "a_ball_cartoon_style.gif", "a_ball_cartoon_style.mp4"])
    frames = read_video_frames(written[0], 4, height=64, width=64)
    assert frames.shape == (4, 64, 64, 3)
    cache = os.listdir(tmp_path / "out" / "inv_latents")
    assert len([f for f in cache if f.endswith(".safetensors")]) == 1 and any(f.endswith(".json") for f in cache)
    # The same request again reuses the inverted latents instead of inverting anew.
    calls = []
    original = graph_pipeline.invert
    graph_pipeline.invert = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        generate.run_sampling(request, pipeline=graph_pipeline)
    finally:
        graph_pipeline.invert = original
    assert calls == []


def test_sampling_from_inverted_latents_is_deterministic_and_prompt_dependent(graph_pipeline):
    pipe = graph_pipeline
    # 4 frames, as the end-to-end test: the compiled graphs are reused
    start = ms.Tensor(np.random.default_rng(3).standard_normal((1, 4, 4, 8, 8)).astype(np.float32))
    a = pipe("a man is skiing", 4, 64, 64, num_inference_steps=2, latents=start, output_type="latent").asnumpy()
    b = pipe("a man is skiing", 4, 64, 64, num_inference_steps=2, latents=start, output_type="latent").asnumpy()
    c = pipe("a panda is surfing", 4, 64, 64, num_inference_steps=2, latents=start, output_type="latent").asnumpy()
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-4


def request(tiny_model, tmp_path, **changes):
    values = dict(pretrained_model_path=tiny_model, prompts=["a cat"], video_length=4, height=64, width=64,
                  output_dir=str(tmp_path / "out"), progress=False)
    values.update(changes)
    return generate.SampleRequest(**values)


@pytest.mark.parametrize("changes,error,words", [
    (dict(prompts=[]), PipelineError, "prompt"),
    (dict(height=60), PipelineError, "multiple of 8"),
    (dict(video="/nonexistent/clip.mp4"), VideoError, "does not exist"),
    (dict(pretrained_model_path="/nonexistent/sd"), FileNotFoundError, "pretrained_model_path"),
    (dict(inv_latents="/nonexistent/inv.safetensors"), FileNotFoundError, "inv_latents"),
    (dict(fmt=["avi"]), PipelineError, "format"),
])
def test_bad_requests_fail_before_loading(tiny_model, tmp_path, changes, error, words, monkeypatch):
    monkeypatch.setattr(TuneAVideoPipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(error, match=words):
        generate.run_sampling(request(tiny_model, tmp_path, **changes))


def test_too_short_and_unreadable_clips_fail_before_loading(tiny_model, clip, tmp_path, monkeypatch):
    monkeypatch.setattr(TuneAVideoPipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(VideoError, match="too few frames"):
        generate.run_sampling(request(tiny_model, tmp_path, video=clip, video_length=8, sample_frame_rate=3))
    garbage = tmp_path / "garbage.mp4"
    garbage.write_text("not a video")
    with pytest.raises(VideoError):
        generate.run_sampling(request(tiny_model, tmp_path, video=str(garbage)))


def test_unwritable_output_dir_fails_before_loading(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(TuneAVideoPipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded a model"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(VideoError, match="not writable"):
        generate.run_sampling(request(tiny_model, tmp_path, output_dir=str(blocker / "sub")))


def test_inverted_latents_of_the_wrong_shape_are_refused(graph_pipeline, tiny_model, tmp_path):
    path = str(tmp_path / "inv.safetensors")
    checkpoint.save_state_dict({"latents": np.zeros((1, 4, 3, 8, 8), np.float32)}, path)
    with pytest.raises(PipelineError, match="start latents have shape"):
        generate.run_sampling(request(tiny_model, tmp_path, inv_latents=path), pipeline=graph_pipeline)
    assert not os.listdir(tmp_path / "out") or not [f for f in os.listdir(tmp_path / "out") if f.endswith(".gif")]


def test_sample_tool_help_runs():
    out = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "sample.py"), "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "--pretrained_model_path" in out.stdout and "--inv_latents" in out.stdout
