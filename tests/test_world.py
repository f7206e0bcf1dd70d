"""tav.world: the generator obeys the world's rules and the pixel-level reader reads its frames right."""
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
