"""Windowed denoising of long videos: at every DDIM step the UNet sees overlapping windows of frames, and the
overlapping predictions are fused into one prediction for the whole video (Gen-L-Video's co-denoising, with
Tune-A-Video's sparse-causal anchor kept).

    a window is `size` frames per UNet call: [0, s-1, s, ..., s+size-3] for s >= 2 (its own frames s..s+size-3,
    frames 0 and s-1 as context), [0, ..., size-1] for the first window (all its own)
    windows follow each other so that neighbours share `overlap` own frames; the last is moved back to end on the
    last frame
    eps[f] = sum_k w_k(f) eps_k[f] / sum_k w_k(f)        over the windows k that own frame f

Every UNet call has the same `size` frames, so the model compiles once and its activations are those of a
`size`-frame video. Video frame 0 and frame s-1 come along so that every own frame's sparse-causal attention sees
the keys of the *video's* first frame and of its own previous frame, as a single pass over all frames would. In
that layout the table "local index of video frame 0, local index of the previous video frame" is exactly
sparse_causal_frame_table(size) (see window_frame_table), so the UNet runs with its default frame policy and needs
no per-window policy. The two context frames' predictions are dropped. What differs from one pass: the temporal
attention (attn_temp) of a window sees its frames plus frames 0 and s-1 instead of all frames (the model has no
attention mask to hide them, and seeing them is closer to the single pass than hiding them), and frame s-1, as
context, attends to frame 0 only, so after the first block its hidden state lacks its own history.

The fusion weight of a window's own frame is 1 inside and ramps linearly down across the overlap at either edge,
(j+1)/(overlap+1), so a frame owned by two windows fades from one to the other; normalising per frame makes the
weights of a frame sum to 1, and a frame owned by one window takes that window's prediction unchanged.
"""
from dataclasses import dataclass

import numpy as np

import mindspore as ms
from mindspore import ops


class WindowError(ValueError):
    """A window size/overlap that cannot tile a video."""


def check_window(size, overlap, size_name="window", overlap_name="window_overlap"):
    """size an integer >= 3 and 0 <= overlap <= size - 3 (a window after the first owns size - 2 frames, the two
    anchor frames aside, and must move on by at least one); the error names the options."""
    def is_integer(value):
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

    if not is_integer(size) or size < 3:
        raise WindowError(f"{size_name} must be an integer >= 3 (frames per UNet call, two of them the anchor frames "
                          f"0 and s-1), got {size!r}")
    if not is_integer(overlap) or not 0 <= overlap <= size - 3:
        raise WindowError(f"{overlap_name} must be an integer with 0 <= {overlap_name} <= {size_name} - 3 "
                          f"(= {size - 3}), got {overlap!r}")


@dataclass(frozen=True)
class WindowSpec:
    """Windows of `size` frames per UNet call whose own frames overlap their neighbour's by `overlap` frames
    (the last window by at least that)."""
    size: int
    overlap: int = 0

    def __post_init__(self):
        check_window(self.size, self.overlap)


def default_overlap(size):
    """The overlap when none is given: a third of the window, at most size - 3 (what check_window allows)."""
    return max(0, min(size // 3, size - 3))


def as_window(window):
    """None, a WindowSpec, an int (size, no overlap) or a (size, overlap) pair -> WindowSpec or None."""
    if window is None or isinstance(window, WindowSpec):
        return window
    if isinstance(window, (tuple, list)):
        return WindowSpec(*window)
    return WindowSpec(window)


def own_frames(start, size):
    """How many frames the window at `start` owns: all `size` for the first, size - 2 after (two are context)."""
    return size - min(start, 2)


def window_starts(video_length, window):
    """First own frames of the windows that cover `video_length` frames: 0, then each window starting `overlap`
    frames before its predecessor's own frames end, the last moved back to end on the last frame. One window [0]
    when size >= video_length."""
    window = as_window(window)
    if window.size >= video_length:
        return [0]
    starts = [0]
    while starts[-1] + own_frames(starts[-1], window.size) < video_length:
        starts.append(starts[-1] + own_frames(starts[-1], window.size) - window.overlap)
    if starts[-1] + own_frames(starts[-1], window.size) > video_length:
        starts[-1] = video_length - own_frames(2, window.size)  # > the previous start: it ended short of the end
    return starts


def window_frames(start, size, video_length):
    """(frames fed to the UNet, number of leading context frames) for the window at `start`: [0, s-1, s, ...,
    s+size-3] (context 2) for s >= 2, [0, ..., size-1] for s <= 1 (context s), cut at the video's end (a window
    longer than the video is the video)."""
    if start <= 1:
        return list(range(0, min(size, video_length))), start
    return [0] + list(range(start - 1, min(start + size - 2, video_length))), 2


def random_window_frames(rng, size, video_length):
    """The frames of one window of `size` at a uniformly drawn start (window_frames' layout: the first `size`
    frames, or frame 0, frame s-1 and the run from s): what one tuning step on a long clip sees
    (train_data.frames_per_step), so tuning meets the layout that windowed inversion and sampling feed the UNet.
    `rng` is a numpy Generator (its draw is part of a resumable run's state)."""
    start = int(rng.integers(1, video_length - size + 3)) if size < video_length else 0
    return window_frames(start, size, video_length)[0]


def window_frame_table(frames):
    """For each local frame (video frame v = frames[j]): (local index of video frame 0, local index of the latest
    earlier video frame in `frames`, or of v itself when none is earlier), int32 (len(frames), 2). For the layout
    of window_frames this is sparse_causal_frame_table(len(frames)): the previous frame of every own frame is
    its previous video frame, and the anchor is video frame 0."""
    local = {v: j for j, v in enumerate(frames)}
    rows = []
    for v in frames:
        earlier = [u for u in frames if u < v]
        rows.append([local[0], local[max(earlier)] if earlier else local[v]])
    return np.asarray(rows, np.int32)


def fusion_weights(size, overlap):
    """Per-frame weight of a window's frames, float32 (size,): 1 inside, (j+1)/(overlap+1) over the first and last
    `overlap` frames (smallest at the edges, symmetric); all ones when overlap is 0."""
    j = np.arange(size, dtype=np.float64)
    ramp = np.minimum(j + 1, size - j) / (overlap + 1)
    return np.minimum(ramp, 1.0).astype(np.float32)


def normalised_weights(video_length, window):
    """[(start, weights (n,)) per window]: each window's fusion weights over its own n frames, divided per frame by
    the sum over the windows owning that frame, so every frame's weights sum to 1 (exactly 1.0 for a frame owned
    by a single window)."""
    window = as_window(window)
    starts = window_starts(video_length, window)
    lengths = [min(own_frames(s, window.size), video_length - s) for s in starts]
    total = np.zeros(video_length, np.float32)
    for s, n in zip(starts, lengths):
        total[s:s + n] += fusion_weights(n, window.overlap)
    return [(s, fusion_weights(n, window.overlap) / total[s:s + n]) for s, n in zip(starts, lengths)]


def windowed_prediction(predict, sample, window):
    """The fused prediction for `sample` (B, C, F, h, w): `predict(window_sample)` (-> same shape as its input) on
    every window of frames, the context frames' outputs dropped, the own frames' outputs weighted by
    normalised_weights and summed into float32 and cast back to the prediction's dtype. One window covering the
    video is `predict(sample)` itself."""
    window = as_window(window)
    video_length = sample.shape[2]
    plan = normalised_weights(video_length, window)
    if len(plan) == 1:
        return predict(sample)
    fused, dtype = None, None
    for start, weights in plan:
        frames, context = window_frames(start, window.size, video_length)
        if context == 2:  # frames 0 and s-1..s+size-3: two slices, no gather
            part = ops.concat([sample[:, :, 0:1], sample[:, :, start - 1:start + window.size - 2]], axis=2)
        else:
            part = sample[:, :, 0:len(frames)]
        prediction = predict(part)
        dtype = prediction.dtype
        own = prediction[:, :, context:].astype(ms.float32)
        own = own * ms.Tensor(weights.reshape(1, 1, -1, 1, 1))
        after = video_length - start - own.shape[2]
        own = ops.pad(own, (0, 0, 0, 0, start, after))
        fused = own if fused is None else fused + own
    return fused.astype(dtype)
