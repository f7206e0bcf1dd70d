"""A small world whose truth is known in every frame: 64x64 frames of one colored shape on a uniform background.

Three backgrounds, three shapes (16x16 bounding box), four colors, so 36 captions of the form
`a {color} {shape} on a {background} background`. A clip is 8-24 frames of one caption whose object moves along a
line or an arc, at most MAX_SPEED pixels a frame, wholly inside the frame.

`render_frame` draws a frame (anti-aliased by supersampling), `random_frame` / `random_clip` draw them from a
numpy Generator, so everything is seedable. `read_frame` is the pixel-level reader that judges generated frames:
background from the border, object mask = pixels far from it, color = the nearest of the four colors to the mask's
mean, shape from the mask's geometry, centroid. The world model's quality, the edit demo and the ablation all
measure with it.
"""
from dataclasses import dataclass

import numpy as np

FRAME_SIZE = 64
OBJECT_SIZE = 16
MAX_SPEED = 4.0
MIN_FRAMES, MAX_FRAMES = 8, 24

BACKGROUNDS = {"white": (240, 240, 240), "black": (16, 16, 16), "gray": (128, 128, 128)}
SHAPES = ("square", "circle", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 200, 40)}

# A centre this far from every edge keeps the 16x16 box inside the frame.
_HALF = OBJECT_SIZE / 2
CENTER_MIN, CENTER_MAX = _HALF, FRAME_SIZE - _HALF
_SUPERSAMPLE = 4
# A pixel belongs to the object when its RGB distance to the background exceeds this. The closest object/background
# pair (green on gray) is ~123 apart; an anti-aliased edge pixel is counted when it is mostly object.
MASK_THRESHOLD = 60.0


class WorldError(ValueError):
    """A scene, caption, frame count or path that the world does not have; the message says what it has."""


@dataclass(frozen=True)
class Scene:
    color: str
    shape: str
    background: str

    def __post_init__(self):
        for value, allowed, what in ((self.color, COLORS, "color"), (self.shape, SHAPES, "shape"),
                                     (self.background, BACKGROUNDS, "background")):
            if value not in allowed:
                raise WorldError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")

    @property
    def caption(self):
        return caption(self.color, self.shape, self.background)


def caption(color, shape, background):
    return f"a {color} {shape} on a {background} background"


def parse_caption(text):
    """`a {color} {shape} on a {background} background` -> Scene; a ValueError for anything else."""
    words = text.strip().lower().split()
    if len(words) != 7 or words[0] != "a" or words[3:5] != ["on", "a"] or words[6] != "background":
        raise WorldError(f"not a caption of the world: {text!r}; expected 'a {{color}} {{shape}} on a "
                         f"{{background}} background'")
    return Scene(words[1], words[2], words[5])


def all_scenes():
    """The 36 scenes, background-major, then shape, then color (a fixed order for tables)."""
    return [Scene(c, s, b) for b in BACKGROUNDS for s in SHAPES for c in COLORS]


def _coverage(shape, cx, cy):
    """Fraction of each pixel covered by the shape centred at (cx, cy), (64, 64) float, by 4x4 supersampling."""
    n = FRAME_SIZE * _SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / _SUPERSAMPLE
    x, y = coords[None, :], coords[:, None]
    dx, dy = x - cx, y - cy
    if shape == "square":
        inside = (np.abs(dx) <= _HALF) & (np.abs(dy) <= _HALF)
    elif shape == "circle":
        inside = dx * dx + dy * dy <= _HALF * _HALF
    elif shape == "triangle":
        # Apex at the top centre, base along the bottom edge of the box: half-width grows linearly downwards.
        t = (dy + _HALF) / OBJECT_SIZE
        inside = (t >= 0) & (t <= 1) & (np.abs(dx) <= _HALF * t)
    else:
        raise WorldError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")
    return inside.reshape(FRAME_SIZE, _SUPERSAMPLE, FRAME_SIZE, _SUPERSAMPLE).mean(axis=(1, 3))


def box_coverage(center):
    """(64, 64) float: the fraction of each pixel inside the object's 16x16 box centred at `center` = (x, y), the
    same for every shape (a square fills its box)."""
    return _coverage("square", float(center[0]), float(center[1]))


def render_frame(scene, center):
    """One (64, 64, 3) uint8 frame of `scene` with the object's box centred at `center` = (x, y) in pixels."""
    cx, cy = float(center[0]), float(center[1])
    if not (CENTER_MIN <= cx <= CENTER_MAX and CENTER_MIN <= cy <= CENTER_MAX):
        raise WorldError(f"centre {center} puts the 16x16 object outside the frame; each coordinate must lie in "
                         f"[{CENTER_MIN}, {CENTER_MAX}]")
    alpha = _coverage(scene.shape, cx, cy)[..., None]
    background = np.array(BACKGROUNDS[scene.background], np.float64)
    color = np.array(COLORS[scene.color], np.float64)
    return np.round(background * (1 - alpha) + color * alpha).astype(np.uint8)


def random_scene(rng):
    return Scene(str(rng.choice(list(COLORS))), str(rng.choice(SHAPES)), str(rng.choice(list(BACKGROUNDS))))


def random_center(rng):
    return rng.uniform(CENTER_MIN, CENTER_MAX, size=2)


def random_frame(rng, scene=None):
    """(frame, scene, center): a frame of `scene` (random if None) at a uniformly random position."""
    scene = random_scene(rng) if scene is None else scene
    center = random_center(rng)
    return render_frame(scene, center), scene, center


def random_path(rng, n_frames, max_speed=MAX_SPEED, kind=None, tries=1000):
    """(n_frames, 2) object centres along a line or an arc ('line'/'arc', random if None), each step at most
    `max_speed` px, every centre inside [CENTER_MIN, CENTER_MAX]; drawn until a path fits."""
    if not MIN_FRAMES <= n_frames <= MAX_FRAMES:
        raise WorldError(f"a clip has {MIN_FRAMES}-{MAX_FRAMES} frames, got {n_frames}")
    if not 0 < max_speed <= MAX_SPEED:
        raise WorldError(f"max_speed must be in (0, {MAX_SPEED}], got {max_speed}")
    kind = str(rng.choice(["line", "arc"])) if kind is None else kind
    steps = np.arange(n_frames)
    for _ in range(tries):
        speed = rng.uniform(0.4 * max_speed, max_speed)
        if kind == "line":
            start = random_center(rng)
            angle = rng.uniform(0, 2 * np.pi)
            path = start + steps[:, None] * speed * np.array([np.cos(angle), np.sin(angle)])
        elif kind == "arc":
            radius = rng.uniform(10, 24)
            pivot = rng.uniform(CENTER_MIN, CENTER_MAX, size=2)
            # The chord of an arc step is shorter than the arc, so speed along the arc bounds the step.
            omega = speed / radius * rng.choice([-1, 1])
            phase = rng.uniform(0, 2 * np.pi) + omega * steps
            path = pivot + radius * np.stack([np.cos(phase), np.sin(phase)], axis=1)
        else:
            raise WorldError(f"path kind must be 'line' or 'arc', got {kind!r}")
        if path.min() >= CENTER_MIN and path.max() <= CENTER_MAX:
            return path
    raise RuntimeError(f"no {kind} path of {n_frames} frames fitted in {tries} draws")


@dataclass
class Clip:
    frames: np.ndarray  # (F, 64, 64, 3) uint8
    scene: Scene
    path: np.ndarray  # (F, 2) object centres (x, y)
    kind: str

    @property
    def caption(self):
        return self.scene.caption


def render_clip(scene, path, kind="line"):
    return Clip(np.stack([render_frame(scene, c) for c in path]), scene, np.asarray(path, np.float64), kind)


def random_clip(rng, n_frames=None, scene=None, kind=None):
    """A clip of one scene (random if None), n_frames (random in 8..24 if None) along a random line or arc."""
    n_frames = int(rng.integers(MIN_FRAMES, MAX_FRAMES + 1)) if n_frames is None else n_frames
    scene = random_scene(rng) if scene is None else scene
    kind = str(rng.choice(["line", "arc"])) if kind is None else kind
    return render_clip(scene, random_path(rng, n_frames, kind=kind), kind)


# ---------------------------------------------------------------------------------------------------------------
# The reader
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Reading:
    background: str
    color: str  # None when no object was found
    shape: str  # None when no object was found
    center: tuple  # (x, y) mask centroid, None when no object was found
    mask: np.ndarray  # (64, 64) bool

    def matches(self, scene):
        return self.background == scene.background and self.color == scene.color and self.shape == scene.shape

    @property
    def box_center(self):
        """(x, y) of the 16x16 box the object is drawn in: the centroid less its shape's centroid offset (a
        triangle's centroid lies 2-3 px below its box's centre, a square's and a circle's on it), so a shape edit
        drawn in the source's box reads as in place. None when no object was found."""
        if self.center is None:
            return None
        dx, dy = centroid_offset(self.shape)
        return (self.center[0] - dx, self.center[1] - dy)


def _nearest(rgb, palette):
    names = list(palette)
    distances = [np.linalg.norm(np.asarray(rgb, np.float64) - np.array(palette[n], np.float64)) for n in names]
    return names[int(np.argmin(distances))]


def _largest_component(mask):
    from scipy import ndimage

    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = ndimage.sum(mask, labels, range(1, count + 1))
    return labels == (1 + int(np.argmax(sizes)))


def classify_shape(mask):
    """'square', 'circle' or 'triangle' from a boolean object mask, by how it fills its bounding box (1, pi/4, 1/2)
    and whether its top is narrower than its bottom (the triangle's apex is up)."""
    ys, xs = np.nonzero(mask)
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = mask.sum() / float(h * w)
    box = mask[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    quarter = max(1, h // 4)
    top, bottom = box[:quarter].sum(), box[-quarter:].sum()
    if fill < 0.64 or top < 0.6 * bottom:
        return "triangle"
    return "square" if fill > 0.89 else "circle"


def read_frame(frame, min_pixels=20):
    """Judge one (64, 64, 3) uint8 frame: background (nearest background color to the border's median), the mask
    of pixels far from the measured background (largest connected part), its color (nearest of COLORS to the
    mask's mean), shape (classify_shape) and centroid. An object of fewer than `min_pixels` pixels is not found."""
    pixels = np.asarray(frame, np.float64)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    measured = np.median(border, axis=0)
    background = _nearest(measured, BACKGROUNDS)
    mask = np.linalg.norm(pixels - measured, axis=-1) > MASK_THRESHOLD
    if mask.sum() >= min_pixels:
        mask = _largest_component(mask)
    if mask.sum() < min_pixels:
        return Reading(background, None, None, None, mask)
    color = _nearest(pixels[mask].mean(axis=0), COLORS)
    ys, xs = np.nonzero(mask)
    # +0.5: a pixel's centre, so the centroid is in the same coordinates as render_frame's `center`.
    return Reading(background, color, classify_shape(mask), (xs.mean() + 0.5, ys.mean() + 0.5), mask)


_CENTROID_OFFSETS = {}


def centroid_offset(shape):
    """(dx, dy): where read_frame puts a `shape`'s centroid relative to its box's centre, measured on a rendered
    frame (so it carries the reader's own anti-aliasing and threshold)."""
    if shape not in _CENTROID_OFFSETS:
        center = (FRAME_SIZE / 2, FRAME_SIZE / 2)
        reading = read_frame(render_frame(Scene("red", shape, "white"), center))
        _CENTROID_OFFSETS[shape] = (reading.center[0] - center[0], reading.center[1] - center[1])
    return _CENTROID_OFFSETS[shape]


def read_clip(frames):
    return [read_frame(f) for f in frames]


def mask_iou(a, b):
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0
