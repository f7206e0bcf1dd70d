"""The method edits in tav.world, on the shipped world model with fixed seeds (the README's world section): a
shape edit (a square to a triangle) of a clip it has not seen keeps the object on the source's path when sampled
from the clip's DDIM inversion, loses the path when sampled from random noise (ablation method c), and is drawn in
fewer frames and farther from the path by the untuned inflated model from the same inverted noise (ablation method
b). A regression in inflation, attention, tuning, inversion, CFG, the VAE or the shipped weights moves these
numbers and fails a test."""
import mindspore as ms
import pytest

from tav import world
from tests.helpers import in_mode

EDIT_STEPS = 10


@pytest.fixture(scope="module", autouse=True)
def compiled():
    """Graph mode, as the tools run: the config's 300 tuning steps take seconds compiled and minutes eagerly."""
    with in_mode(ms.GRAPH_MODE):
        yield


@pytest.fixture(scope="module")
def tuned_edit(tmp_path_factory):
    """The demo clip of seed 4, the world model tuned on it with configs/world.yaml (300 steps), its 10-step
    inversion and a shape edit (the same color and background, a triangle) sampled from that inversion. A triangle,
    because the shipped model draws a circle or another color or background from the inverted noise untuned as well
    as tuned: the edit to a triangle is where the tuning shows."""
    from tav import world_demo
    from tav.pipeline import TuneAVideoPipeline
    from tav.video import frames_to_pixel_values
    from tav.world_model import write_world_pipeline

    tmp_path = tmp_path_factory.mktemp("world-edit")
    model = write_world_pipeline(str(tmp_path / "world-sd"))
    clip = world_demo.demo_clip(seed=4, n_frames=8)
    clip_path = world_demo.write_clip(clip, str(tmp_path / "clip.mp4"))
    edit = world.Scene(clip.scene.color, "triangle", clip.scene.background)
    delta = world_demo.tune(model, clip_path, clip.caption, str(tmp_path / "tuned"))
    tuned = TuneAVideoPipeline.from_pretrained(model, unet=delta)
    latents = tuned.invert(tuned.encode_video(frames_to_pixel_values(clip.frames), seed=0), EDIT_STEPS,
                           prompt=clip.caption)[-1]
    from_inversion = world_demo.edit_clip(tuned, clip.frames, clip.caption, [edit.caption],
                                          num_inference_steps=EDIT_STEPS, latents=latents)[0]
    return {"model": model, "clip": clip, "edit": edit, "tuned": tuned, "latents": latents,
            "a": world_demo.judge_edit(clip.frames, from_inversion, edit)}


def test_an_edit_from_the_inversion_keeps_the_path_and_one_from_noise_does_not(tuned_edit):
    from tav import world_demo

    clip, edit, a = tuned_edit["clip"], tuned_edit["edit"], tuned_edit["a"]
    from_noise = world_demo.to_uint8_frames(tuned_edit["tuned"]([edit.caption], video_length=8, height=64, width=64,
                                                                num_inference_steps=EDIT_STEPS, seed=7))[0]
    c = world_demo.judge_edit(clip.frames, from_noise, edit)
    assert a["edit_accuracy"] >= 0.6, (a, c)  # the new shape, read by the pixel reader, in most frames
    assert a["frames_on_path"] >= 0.6, (a, c)  # and there, on the source's path
    # on the source's path by the centroid too (a triangle's sits 2-3 px below its box's centre)
    assert a["motion_px"] <= 4.5, (a, c)
    assert c["motion_px"] >= a["motion_px"] + 8.0, (a, c)  # the inversion is what keeps it there


def test_the_tuned_model_draws_the_edit_in_more_frames_than_the_untuned_one(tuned_edit):
    """Method (a) against (b): the same inverted noise, the same prompt, the pretrained UNet inflated but not tuned.
    Measured on the shipped weights: tuned, 8 of 8 frames read as the triangle, all on the path (2.7 px: a
    triangle's centroid sits below its box's centre); untuned, 6 of 8, 5 of 8 on the path, 15.4 px. On the demo clips
    of seeds 3, 5 and 6 the tuned model draws the triangle in 8 of 8 frames at 2.4-2.7 px too, the untuned one in 6
    or 7 at 2.8-7.8 px: this seed shows the gap widest, the direction holds on all four (bench/world_ablation.py has
    the aggregate)."""
    from tav import world_demo
    from tav.pipeline import TuneAVideoPipeline

    clip, edit, a = tuned_edit["clip"], tuned_edit["edit"], tuned_edit["a"]
    untuned = TuneAVideoPipeline.from_pretrained(tuned_edit["model"], init_seed=0)
    b = world_demo.judge_edit(clip.frames, world_demo.edit_clip(
        untuned, clip.frames, clip.caption, [edit.caption], num_inference_steps=EDIT_STEPS,
        latents=tuned_edit["latents"])[0], edit)
    assert a["edit_accuracy"] >= b["edit_accuracy"] + 0.125, (a, b)  # at least one frame more
    assert a["motion_px"] + 4.0 <= b["motion_px"], (a, b)  # and nearer the source's path
    assert a["frames_on_path"] >= b["frames_on_path"] + 0.25, (a, b)  # on it in at least two frames more
