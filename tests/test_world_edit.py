"""The method against its ablation (b) in tav.world, on the shipped world model with fixed seeds: tuning + DDIM
inversion must edit better than the untuned inflated model sampled from the same inverted noise. A regression in
inflation, attention, tuning, inversion or CFG moves the numbers and fails it."""
import os

import numpy as np
import pytest

from tav import world
from tav.world_model import ASSET_DIR

pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(ASSET_DIR, "model_index.json")),
                                reason="no shipped world model (tools/make_world_model.py --retrain)")

MARGIN = 0.1


def test_tuning_and_inversion_edit_better_than_the_untuned_model(tmp_path):
    from tav import world_demo
    from tav.pipeline import TuneAVideoPipeline
    from tav.video import frames_to_pixel_values
    from tav.world_model import write_world_pipeline

    model = write_world_pipeline(str(tmp_path / "world-sd"))
    clip = world_demo.demo_clip(seed=3, n_frames=8)
    clip_path = world_demo.write_clip(clip, str(tmp_path / "clip.mp4"))
    edit = world.Scene("blue", clip.scene.shape, clip.scene.background)
    delta = world_demo.tune(model, clip_path, clip.caption, str(tmp_path / "tuned"),
                            overrides=["max_train_steps=30"])
    tuned = TuneAVideoPipeline.from_pretrained(model, unet=delta)
    latents = tuned.invert(tuned.encode_video(frames_to_pixel_values(clip.frames), seed=0), 10,
                           prompt=clip.caption)[-1]
    base = TuneAVideoPipeline.from_pretrained(model, init_seed=0)
    scores = {}
    for name, pipeline in (("tuned", tuned), ("base", base)):
        frames = world_demo.edit_clip(pipeline, clip.frames, clip.caption, [edit.caption], num_inference_steps=10,
                                      latents=latents)[0]
        scores[name] = world_demo.judge_edit(clip.frames, frames, edit)
    a, b = scores["tuned"], scores["base"]
    assert a["edit_accuracy"] + 0.5 * a["temporal_iou"] >= b["edit_accuracy"] + 0.5 * b["temporal_iou"] + MARGIN, scores
    assert a["motion_px"] < b["motion_px"] + 1.0, scores
