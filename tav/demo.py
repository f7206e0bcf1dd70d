"""The embedded default job (`make demo`, `python tools/sample.py` with no arguments): tune the tiny model on a
generated clip for a few steps, then invert the clip and sample two prompts with the tuned model.

The assets (the tiny pipeline and the clip) come from tav.tiny's fixture writers; the job runs through the same
library calls as the tools (tav.training.train, tav.generate.run_sampling). Training and sampling are imported
where they are used, so `demo_assets` stays cheap for tools that only need the files.
"""
import os

from tav.tiny import ensure_tiny_pipeline, make_demo_clip

DEMO_DIR = "demo_outputs"
DEMO_SOURCE_PROMPT = "a square is moving"
DEMO_PROMPTS = ("a red square is moving on the snow", "a ball is moving, cartoon style")
# The demo clip: 16 frames at 64x64; the job samples 8 of them (every 2nd) at the same size.
DEMO_CLIP = dict(n_frames=16, height=64, width=64)


def demo_paths(demo_dir=DEMO_DIR):
    """(model folder, clip path) of the demo assets under demo_dir, written or not."""
    return os.path.join(demo_dir, "tiny-sd"), os.path.join(demo_dir, "demo-clip.mp4")


def demo_assets(demo_dir=DEMO_DIR, n_frames=DEMO_CLIP["n_frames"]):
    """(model folder, clip path) under demo_dir: the tiny pipeline and the generated clip, written on first use.
    A request for more frames than the default clip holds (a long-video run) gets a longer clip of its own."""
    model, clip = demo_paths(demo_dir)
    if n_frames > DEMO_CLIP["n_frames"]:
        clip = os.path.join(demo_dir, f"demo-clip-{n_frames}f.mp4")
    ensure_tiny_pipeline(model)
    if not os.path.isfile(clip):
        make_demo_clip(clip, **dict(DEMO_CLIP, n_frames=max(n_frames, DEMO_CLIP["n_frames"])))
    return model, clip


def demo_sample_request(demo_dir=DEMO_DIR, **overrides):
    """Invert the demo clip with the tiny model and sample two prompts (gif + mp4); `overrides` win. A bad option
    is refused before the assets are written."""
    from tav.generate import SampleRequest

    model, clip = demo_paths(demo_dir)
    values = dict(pretrained_model_path=model, prompts=list(DEMO_PROMPTS), video=clip,
                  source_prompt=DEMO_SOURCE_PROMPT, output_dir=os.path.join(demo_dir, "samples"), video_length=8,
                  height=DEMO_CLIP["height"], width=DEMO_CLIP["width"], sample_frame_rate=2, num_inference_steps=10,
                  num_inv_steps=10, guidance_scale=7.5, fmt=["gif", "mp4"])
    values.update(overrides)
    request = SampleRequest(**values).check_options()
    if "video" not in overrides:  # the clip must hold every frame the request samples
        frames = request.sample_start_idx + (request.video_length - 1) * request.sample_frame_rate + 1
        request.video = demo_assets(demo_dir, frames)[1]
    else:
        demo_assets(demo_dir)
    return request


def tune_demo_model(demo_dir, config_path):
    """Tune the tiny model on the demo clip with `config_path` (configs/tiny.yaml: a few steps); returns the path of
    the trainable-only delta. Each call starts over in demo_dir/tuned."""
    from tav.config import load_train_config
    from tav.training import train

    model, clip = demo_assets(demo_dir)
    overrides = [f"pretrained_model_path={model}", f"train_data.video_path={clip}",
                 f"output_dir={os.path.join(demo_dir, 'tuned')}",
                 "validation_data.prompts=[]",  # the demo samples afterwards, with the delta, instead
                 "overwrite_output_dir=true"]
    return train(load_train_config(config_path, overrides)).delta_path


def run_demo(demo_dir=DEMO_DIR, config_path=None):
    """`make demo`: tune (when `config_path` is given), then sample with the tuned UNet's delta as
    tools/sample.py --unet does. Returns the files written."""
    from tav.generate import run_sampling

    if config_path is None:
        return run_sampling(demo_sample_request(demo_dir))
    delta = tune_demo_model(demo_dir, config_path)
    return [delta] + run_sampling(demo_sample_request(demo_dir, unet=delta))
