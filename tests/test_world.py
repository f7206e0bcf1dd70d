"""tav.world: the generator obeys the world's rules and the pixel-level reader reads its frames right."""
import os

import numpy as np
import pytest

from tav import world


def _true_centroid(scene, center):
    # The triangle's area centroid lies a third of the way up from its base, not at its box's centre.
    offset = world.OBJECT_SIZE / 6 if scene.shape == "triangle" else 0.0
    return np.array([center[0], center[1] + offset])


def test_there_are_36_distinct_captions_of_the_documented_form():
    captions = [s.caption for s in world.all_scenes()]
    assert len(set(captions)) == 36
    assert "a red square on a white background" in captions
    assert all(world.parse_caption(c).caption == c for c in captions)


def test_parse_caption_refuses_other_text():
    with pytest.raises(ValueError, match="not a caption"):
        world.parse_caption("a red square is moving")
    with pytest.raises(ValueError, match="unknown color"):
        world.parse_caption("a pink square on a white background")


def test_a_frame_is_64x64_rgb_with_the_exact_background_and_object_colors():
    scene = world.Scene("blue", "square", "gray")
    frame = world.render_frame(scene, (32, 32))
    assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8
    assert tuple(frame[0, 0]) == world.BACKGROUNDS["gray"]
    assert tuple(frame[32, 32]) == world.COLORS["blue"]
    assert (np.abs(frame.astype(int) - 128).max(axis=-1) > 0).sum() == 16 * 16


def test_an_object_outside_the_frame_is_refused():
    with pytest.raises(ValueError, match="outside the frame"):
        world.render_frame(world.Scene("red", "circle", "white"), (4, 32))


@pytest.mark.parametrize("scene", world.all_scenes(), ids=lambda s: s.caption.replace(" ", "-"))
def test_the_reader_reads_every_scene_right(scene):
    rng = np.random.default_rng(len(scene.caption))
    for _ in range(4):
        center = world.random_center(rng)
        reading = world.read_frame(world.render_frame(scene, center))
        assert reading.matches(scene), (reading.color, reading.shape, reading.background)
        assert np.linalg.norm(np.array(reading.center) - _true_centroid(scene, center)) < 1.0


def test_the_reader_finds_no_object_in_an_empty_frame():
    frame = np.full((64, 64, 3), world.BACKGROUNDS["black"], np.uint8)
    reading = world.read_frame(frame)
    assert reading.background == "black" and reading.color is None and reading.center is None


@pytest.mark.parametrize("seed", range(12))
def test_clips_obey_the_motion_rules(seed):
    rng = np.random.default_rng(seed)
    clip = world.random_clip(rng)
    n = len(clip.frames)
    assert world.MIN_FRAMES <= n <= world.MAX_FRAMES
    assert clip.kind in ("line", "arc")
    assert clip.frames.shape == (n, 64, 64, 3)
    steps = np.linalg.norm(np.diff(clip.path, axis=0), axis=1)
    assert steps.max() <= world.MAX_SPEED + 1e-9 and steps.min() > 0
    assert clip.path.min() >= world.CENTER_MIN and clip.path.max() <= world.CENTER_MAX
    for frame, center, reading in zip(clip.frames, clip.path, world.read_clip(clip.frames)):
        assert reading.matches(clip.scene)
        assert np.linalg.norm(np.array(reading.center) - _true_centroid(clip.scene, center)) < 1.0


def test_clips_are_seedable():
    a = world.random_clip(np.random.default_rng(5))
    b = world.random_clip(np.random.default_rng(5))
    assert a.scene == b.scene and np.array_equal(a.frames, b.frames)


def test_a_line_path_is_straight_and_an_arc_path_keeps_its_radius():
    rng = np.random.default_rng(1)
    line = world.random_path(rng, 16, kind="line")
    direction = np.diff(line, axis=0)
    assert np.allclose(np.cross(direction[:-1], direction[1:]), 0, atol=1e-9)
    arc = world.random_path(rng, 16, kind="arc")
    # Three consecutive points of a circle: equal chords, equal turning.
    chords = np.linalg.norm(np.diff(arc, axis=0), axis=1)
    assert np.allclose(chords, chords[0])


def test_mask_iou():
    a = np.zeros((4, 4), bool)
    a[:2] = True
    assert world.mask_iou(a, a) == 1.0
    assert world.mask_iou(a, ~a) == 0.0


def test_a_shapes_box_centre_is_read_where_it_was_drawn_whatever_the_shape():
    center = (30.0, 25.0)
    for shape in world.SHAPES:
        reading = world.read_frame(world.render_frame(world.Scene("green", shape, "gray"), center))
        assert np.hypot(*(np.array(reading.box_center) - center)) < 0.5, shape
    triangle = world.read_frame(world.render_frame(world.Scene("green", "triangle", "gray"), center))
    assert triangle.center[1] > center[1] + 1.5  # its centroid lies below the box's centre: box_center corrects it
    assert world.read_frame(np.full((64, 64, 3), 128, np.uint8)).box_center is None


def test_the_world_edits_sample_at_the_steps_and_guidance_of_the_config(tmp_path):
    """The demo, the benches and the test edit at what tools/sample.py takes from a run tuned with the config."""
    from tav.world_demo import CONFIG, edit_settings

    settings = edit_settings()
    assert (settings.num_inv_steps, settings.num_inference_steps, settings.guidance_scale) == (15, 15, 7.5)
    other = tmp_path / "world.yaml"
    text = open(CONFIG).read().replace("num_inference_steps: 15", "num_inference_steps: 30")
    other.write_text(text.replace("guidance_scale: 7.5", "guidance_scale: 5.0"))
    assert edit_settings(str(other)) == type(settings)(15, 30, 5.0)
    assert edit_settings(str(other), steps=25) == type(settings)(25, 25, 5.0)  # the benches' --steps


def test_frames_on_path_counts_the_right_object_within_one_step_of_the_sources_box():
    from tav.world_demo import judge_edit

    source = world.Scene("red", "square", "white")
    edit = world.Scene("blue", "triangle", "white")
    centers = [(20.0 + 3 * i, 30.0) for i in range(8)]
    source_frames = [world.render_frame(source, c) for c in centers]
    in_place = [world.render_frame(edit, c) for c in centers]
    assert judge_edit(source_frames, in_place, edit)["frames_on_path"] == 1.0
    # two frames drawn 10 px off the path, one in the wrong color on it: 5 of 8 frames on the path
    edited = list(in_place)
    edited[2] = world.render_frame(edit, (centers[2][0], 40.0))
    edited[5] = world.render_frame(edit, (centers[5][0] + 10, 30.0))
    edited[7] = world.render_frame(world.Scene("yellow", "triangle", "white"), centers[7])
    scores = judge_edit(source_frames, edited, edit)
    assert scores["frames_on_path"] == 5 / 8
    assert scores["edit_accuracy"] == 7 / 8  # the misplaced frames are the right object, in the wrong place


class _ScaledDownsample:
    """A per-channel scale (the parameter), then the VAE's Downsample (pad right/bottom, 3x3 stride-2 conv): the
    scale's gradient flows back through the pad, as the VAE encoder's do."""

    @staticmethod
    def build(channels=8):
        import mindspore as ms
        from mindspore import nn

        from tav.models.vae import Downsample

        class Net(nn.Cell):
            def __init__(self):
                super().__init__()
                self.scale = ms.Parameter(ms.Tensor(np.linspace(0.5, 1.5, channels, dtype=np.float32)[:, None, None]))
                self.down = Downsample(channels)

            def construct(self, x):
                y = self.down(x * self.scale)
                return (y * y).mean()

        ms.set_seed(0)
        return Net()


def _scale_gradients(net, inputs, compiled):
    import mindspore as ms

    grad_fn = ms.value_and_grad(net, None, ms.ParameterTuple([net.scale]))
    if compiled:
        grad_fn = ms.jit(grad_fn)
    return [grad_fn(ms.Tensor(x))[1][0].asnumpy() for x in inputs]


def test_pad_right_bottom_is_the_zero_pad():
    import mindspore as ms

    from tav.nn import pad_right_bottom

    x = np.random.default_rng(0).standard_normal((2, 3, 4, 6)).astype(np.float32)
    np.testing.assert_array_equal(pad_right_bottom(ms.Tensor(x)).asnumpy(), np.pad(x, ((0, 0), (0, 0), (0, 1), (0, 1))))


def test_the_vae_training_graph_gives_the_eager_gradients_run_after_run():
    """MindSpore 2.10's CPU PadV3 (ops.pad) in a compiled value_and_grad graph: wrong gradients through it from
    the second run on, then a hang (docs/world.md); tav.nn.pad_right_bottom avoids it on CPU. Every run of the
    compiled graph must give PyNative's gradients."""
    import mindspore as ms

    from tav.world_training import vae_training_ops
    from tests.helpers import in_mode

    inputs = np.random.default_rng(1).standard_normal((4, 2, 8, 16, 16)).astype(np.float32)
    with vae_training_ops():
        net = _ScaledDownsample.build()
        with in_mode(ms.GRAPH_MODE):
            compiled = _scale_gradients(net, inputs, compiled=True)
        with in_mode(ms.PYNATIVE_MODE):
            eager = _scale_gradients(net, inputs, compiled=False)
    for run, (a, b) in enumerate(zip(compiled, eager)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7, err_msg=f"run {run + 1}")


def test_a_retrain_writes_a_loadable_pipeline_and_goes_on_from_a_reused_vae_and_unet(tmp_path):
    """tools/make_world_model.py --retrain's path at toy sizes: the folder loads as a pipeline, and a second run
    that reuses the first VAE and refines it (vae_from + vae_refine_steps) and trains on from the first UNet
    (unet_from) changes the weights, records where they came from, and starts from the saved UNet's weights."""
    import json

    from tav.checkpoint import read_state_dict
    from tav.pipeline import TuneAVideoPipeline
    from tav.world_training import train_world_model

    sizes = dict(vae_steps=1, unet_steps=1, bank_size=4, vae_batch=2, unet_batch=2)
    first, second = tmp_path / "first", tmp_path / "second"
    train_world_model(str(first), **sizes)
    record = train_world_model(str(second), vae_from=str(first / "vae"), vae_refine_steps=1, presence_weight=0.5,
                               unet_from=str(first / "unet"), unet_lr=3e-4, **sizes)
    assert (record["vae_reused_from"], record["vae_refine_steps"], record["vae_steps"]) == (str(first / "vae"), 1, None)
    assert (record["presence_weight"], record["unet_from"], record["unet_lr"]) == (0.5, str(first / "unet"), 3e-4)
    from tav.checkpoint import cell_state_dict
    from tav.world_training import build_unet

    saved = read_state_dict(str(first / "unet" / "diffusion_pytorch_model.safetensors"))
    resumed = cell_state_dict(build_unet(0, unet_from=str(first / "unet"))[0])
    assert all(np.array_equal(resumed[k], saved[k].astype(np.float32)) for k in saved)
    trained_on = read_state_dict(str(second / "unet" / "diffusion_pytorch_model.safetensors"))
    assert any(not np.array_equal(saved[k], trained_on[k]) for k in saved)
    with pytest.raises(ValueError, match="takes 8x8 latents, the VAE writes 16x16"):
        build_unet(0, latent_downscale=4, unet_from=str(first / "unet"))
    with pytest.raises(ValueError, match="needs vae_from"):
        train_world_model(str(tmp_path / "refused"), unet_from=str(first / "unet"))
    assert not (tmp_path / "refused").exists()
    written = json.loads((second / "world_model.json").read_text())
    assert written["vae_refine_steps"] == 1
    assert written["continued_from"] == json.loads((first / "world_model.json").read_text())
    before, after = (read_state_dict(str(d / "vae" / "diffusion_pytorch_model.safetensors")) for d in (first, second))
    assert before.keys() == after.keys()
    assert any(not np.array_equal(before[k], after[k]) for k in before)
    pipeline = TuneAVideoPipeline.from_pretrained(str(second))
    assert pipeline.vae.config.scaling_factor == pytest.approx(record["scaling_factor"])


def test_a_quarter_scale_world_model_has_16x16_latents_for_64_pixel_frames(tmp_path):
    """latent_downscale=4 drops the VAE's deepest block: a frame encodes to 16x16 latents, the UNet's sample_size
    follows, and the pipeline folder's configs still say 64-pixel frames; other downscales are refused."""
    import mindspore as ms

    from tav.checkpoint import write_json_atomic
    from tav.models.vae import AutoencoderKL
    from tav.pipeline import default_pixel_size
    from tav.world_training import vae_training_ops, world_unet_config, world_vae_config

    vae_config, unet_config = world_vae_config(4), world_unet_config(4)
    with vae_training_ops():
        vae = AutoencoderKL(dict(vae_config))
    frame, _, _ = world.random_frame(np.random.default_rng(0))
    pixels = ms.Tensor(frame.astype(np.float32).transpose(2, 0, 1)[None] / 127.5 - 1.0)
    assert vae.downscale_factor == 4
    assert vae.encode_moments(pixels).shape == (1, 8, 16, 16)
    assert unet_config["sample_size"] == 16 and world_unet_config()["sample_size"] == 8
    (tmp_path / "unet").mkdir(), (tmp_path / "vae").mkdir()
    write_json_atomic(unet_config, str(tmp_path / "unet" / "config.json"))
    write_json_atomic(vae_config, str(tmp_path / "vae" / "config.json"))
    assert default_pixel_size(str(tmp_path)) == world.FRAME_SIZE
    with pytest.raises(ValueError, match="latent_downscale"):
        world_vae_config(2)
    from tav.world_training import train_world_model

    with pytest.raises(ValueError, match="latent_downscale"):
        train_world_model(str(tmp_path / "refused"), latent_downscale=2)
    assert not (tmp_path / "refused").exists()  # refused before anything is written


def test_the_presence_target_is_the_objects_coverage_of_each_latent_cell_whatever_its_colors():
    """The VAE's presence channel is pulled to PRESENCE_LEVEL x the fraction of each latent cell the object covers,
    read back from the frame: the same numbers for every color and background, zero off the object."""
    from tav.world_training import PRESENCE_LEVEL, object_coverage, presence_targets

    targets = []
    for color, background in (("red", "white"), ("yellow", "white"), ("blue", "black"), ("green", "gray")):
        scene = world.Scene(color, "square", background)
        coverage = object_coverage(world.render_frame(scene, (24, 40)), scene)  # box [16, 32) x [32, 48)
        targets.append(presence_targets(coverage[None], 4)[0, 0])
    expected = np.zeros((16, 16), np.float32)
    expected[8:12, 4:8] = PRESENCE_LEVEL
    for target in targets:
        np.testing.assert_allclose(target, expected, atol=1e-6)
    circle = world.Scene("red", "circle", "white")
    coverage = object_coverage(world.render_frame(circle, (24.5, 40.25)), circle)
    assert coverage.sum() == pytest.approx(np.pi * 8 ** 2, rel=0.02)  # anti-aliased edges counted in part


def test_a_box_presence_target_is_the_objects_box_whatever_its_shape():
    """presence_region="box" marks the object's 16x16 box: a circle's and a triangle's targets are the square's at
    the same centre, the frames and the random draws are those of the object's own region."""
    from tav.world_training import frame_batch, object_coverage, presence_targets

    center = (24.5, 40.25)
    square = world.Scene("red", "square", "white")
    expected = presence_targets(object_coverage(world.render_frame(square, center), square)[None], 4)
    np.testing.assert_allclose(presence_targets(world.box_coverage(center)[None], 4), expected, atol=1e-6)
    for shape in ("circle", "triangle"):
        scene = world.Scene("blue", shape, "black")
        own = presence_targets(object_coverage(world.render_frame(scene, center), scene)[None], 4)
        assert np.abs(own - expected).max() > 1.0  # its own pixels leave corners of the box empty
    by_object = frame_batch(np.random.default_rng(3), 6, "object")
    by_box = frame_batch(np.random.default_rng(3), 6, "box")
    np.testing.assert_array_equal(by_object[0], by_box[0])
    assert by_object[3] == by_box[3]
    # the object's coverage is read back from rounded pixels: a hundredth or so above the exact one at edges
    assert (by_box[2] >= by_object[2] - 0.02).all() and by_box[2].sum() > by_object[2].sum()
    with pytest.raises(ValueError, match="presence_region='outline'"):
        frame_batch(np.random.default_rng(3), 1, "outline")


def test_the_vae_loss_adds_the_weighted_presence_error_of_its_channel():
    import mindspore as ms

    from tav.models.vae import AutoencoderKL
    from tav.world_training import PRESENCE_CHANNEL, VAELoss, frame_batch, presence_targets, vae_training_ops, \
        world_vae_config

    rng = np.random.default_rng(0)
    pixels, weights, coverage, _ = frame_batch(rng, 2)
    presence = presence_targets(coverage, 4)
    noise = np.zeros((2, 4, 16, 16), np.float32)  # z = the mean: the loss is deterministic
    with vae_training_ops():
        ms.set_seed(0)
        vae = AutoencoderKL(world_vae_config(4))
    inputs = [ms.Tensor(a) for a in (pixels, weights, presence, noise)]
    without, weighted = (float(VAELoss(vae, 1e-6, w)(*inputs).asnumpy()) for w in (0.0, 0.5))
    mean = vae.encode_moments(inputs[0]).asnumpy()[:, PRESENCE_CHANNEL:PRESENCE_CHANNEL + 1]
    assert weighted - without == pytest.approx(0.5 * ((mean - presence) ** 2).mean(), rel=1e-4)
    assert weighted - without > 0.1  # an untrained encoder is far from the targets


def test_the_shipped_recipe_is_how_the_shipped_weights_were_made():
    """tools/make_world_model.py --retrain runs SHIPPED_RECIPE: its stages, last first, carry the settings that the
    shipped world_model.json records for each run in its continued_from chain."""
    from tav.checkpoint import read_json
    from tav.world_model import ASSET_DIR, RECORD
    from tav.world_training import SHIPPED_RECIPE

    record = read_json(os.path.join(ASSET_DIR, RECORD), "world model record")
    chain = []
    while record is not None:
        chain.append(record)
        record = record.get("continued_from")
    assert len(chain) == len(SHIPPED_RECIPE)
    recorded_as = {"unet_batch": "unet_batch_size", "vae_from": "vae_reused_from"}
    for stage, run in zip(reversed(SHIPPED_RECIPE), chain):
        for key, value in stage.items():
            if key in ("vae_from", "unet_from"):  # a folder of the run named, recorded as its path
                assert run[recorded_as.get(key, key)], (key, run["command"])
            else:
                assert run[recorded_as.get(key, key)] == value, (key, run["command"])
        assert run["seed"] == 0
    assert "vae_from" not in SHIPPED_RECIPE[0] and chain[-1]["vae_reused_from"] is None


def test_retrain_with_no_training_flags_runs_the_shipped_recipe_and_with_one_a_single_run(tmp_path, monkeypatch):
    from tav import backend, world_training
    from tests.helpers import load_tool

    monkeypatch.setattr(backend, "configure", lambda **kw: None)  # leave this process's mode as it is
    calls = []
    monkeypatch.setattr(world_training, "train_recipe", lambda out, **kw: calls.append(("recipe", out, kw)) or {})
    monkeypatch.setattr(world_training, "train_world_model", lambda out, **kw: calls.append(("run", out, kw)) or {})
    tool = load_tool("make_world_model")
    tool.main([str(tmp_path / "a"), "--retrain", "--seed", "2"])
    tool.main([str(tmp_path / "b"), "--retrain", "--unet_steps", "5"])
    assert [(c[0], c[1], c[2]["seed"]) for c in calls] == [("recipe", str(tmp_path / "a"), 2),
                                                           ("run", str(tmp_path / "b"), 0)]
    assert calls[1][2]["unet_steps"] == 5


def test_the_recipe_runs_its_stages_in_order_each_from_the_folders_it_names(tmp_path):
    """train_recipe at toy sizes: the earlier stages land in OUT/stages/N, the last in OUT, which loads as a
    pipeline and whose record chains back through every stage; a stage naming a later one is refused."""
    from tav.checkpoint import read_json
    from tav.pipeline import TuneAVideoPipeline
    from tav.world_training import SHIPPED_RECIPE, train_recipe

    toy = dict(vae_steps=1, unet_steps=1, vae_refine_steps=1, bank_size=4, vae_batch=2, unet_batch=2)
    out = tmp_path / "world"
    record = train_recipe(str(out), command="retrain", **toy)
    chain = [record, record["continued_from"], record["continued_from"]["continued_from"]]
    assert [r["command"] for r in chain] == [f"retrain [stage {n} of 3]" for n in (3, 2, 1)]
    assert record["unet_from"] == str(out / "stages" / "2" / "unet")
    assert record["vae_reused_from"] == chain[1]["vae_reused_from"] == str(out / "stages" / "1" / "vae")
    assert (record["presence_region"], record["vae_refine_steps"], chain[2]["latent_downscale"]) == ("box", 1, 4)
    assert [r["vae_refine_steps"] for r in chain[1:]] == [0, 0]  # an override changes only the stages that set it
    assert [r["bank_size"] for r in chain] == [4, 4, 4]  # and a size no stage sets applies to all
    assert read_json(str(out / "world_model.json"), "record") == record
    assert TuneAVideoPipeline.from_pretrained(str(out)).unet.config.sample_size == 16
    with pytest.raises(ValueError, match="stage 1: unet_from=2 names no earlier stage"):
        train_recipe(str(tmp_path / "refused"), recipe=({"unet_from": 2},) + SHIPPED_RECIPE[1:])
    with pytest.raises(ValueError, match="stage 3: unet_from=3 names no earlier stage"):
        train_recipe(str(tmp_path / "late"), recipe=SHIPPED_RECIPE[:2] + ({"vae_from": 1, "unet_from": 3},), **toy)
    assert not (tmp_path / "late").exists()  # refused before its first stage trained
