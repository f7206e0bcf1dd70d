"""Windowed denoising (tav.windows): the window plan, the fade weights, the anchor layout, the fusion, and the
promise that one window covering the video is the single pass bit for bit."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

from tav.generate import SampleRequest
from tav.inversion import ddim_invert
from tav.models.attention import sparse_causal_frame_table
from tav.pipeline import PipelineError
from tav.sampling import denoise
from tav.schedulers import SD_V1_SCHEDULE, DDIMScheduler
from tav.windows import (WindowError, WindowSpec, fusion_weights, normalised_weights, own_frames,
                         window_frame_table, window_frames, window_starts, windowed_prediction)

PLANS = [(96, 24, 8), (10, 4, 1), (13, 5, 0), (7, 3, 0), (25, 24, 8), (11, 5, 2), (30, 9, 6)]


def _rand(seed, shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


class SparseCausalToy(nn.Cell):
    """A one-layer denoiser whose frame f sees only frame 0 and frame max(f-1, 0), through
    sparse_causal_frame_table: what the windows' anchor layout reproduces exactly (one layer deep)."""

    def construct(self, sample, timestep, encoder_hidden_states):
        table = sparse_causal_frame_table(sample.shape[2])
        anchor = ops.gather(sample, ms.Tensor(table[:, 0]), 2)
        previous = ops.gather(sample, ms.Tensor(table[:, 1]), 2)
        t = timestep.astype(ms.float32).reshape(-1, 1, 1, 1, 1) / 1000
        z = 0.5 * sample + 0.3 * anchor - 0.2 * previous + t + encoder_hidden_states.mean() * 0.1
        return z / (1 + ops.abs(z))


class TemporalToy(SparseCausalToy):
    """Adds a mean over all frames (as a temporal attention would): windows then see something else than one pass."""

    def construct(self, sample, timestep, encoder_hidden_states):
        return super().construct(sample, timestep, encoder_hidden_states) + sample.mean(axis=2, keep_dims=True)


# -- the plan ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("frames, size, overlap", PLANS)
def test_windows_cover_every_frame_share_the_overlap_and_end_on_the_last_frame(frames, size, overlap):
    starts = window_starts(frames, (size, overlap))
    ends = [min(s + own_frames(s, size), frames) for s in starts]
    covered = np.zeros(frames, int)
    for s, e in zip(starts, ends):
        covered[s:e] += 1
    assert covered.min() >= 1
    assert starts[0] == 0 and ends[-1] == frames and starts == sorted(set(starts))
    assert all(end - start == overlap for end, start in zip(ends[:-2], starts[1:-1]))
    if len(starts) > 1:
        assert ends[-2] - starts[-1] >= overlap and 1 not in starts


def test_96_frames_in_windows_of_24_overlapping_by_8():
    # own frames 0-23, then 22 a window (frames 0 and s-1 are context): 16-37, 30-51, ..., the last 74-95
    assert window_starts(96, WindowSpec(24, 8)) == [0, 16, 30, 44, 58, 72, 74]


@pytest.mark.parametrize("frames, size, overlap", PLANS)
def test_every_unet_call_has_the_window_size(frames, size, overlap):
    for start in window_starts(frames, (size, overlap)):
        assert len(window_frames(start, size, frames)[0]) == min(size, frames)


def test_a_window_longer_than_the_video_is_the_video():
    assert window_starts(5, (8, 2)) == [0] and window_frames(0, 8, 5) == ([0, 1, 2, 3, 4], 0)


# -- the weights ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size, overlap", [(24, 8), (5, 0), (4, 3), (2, 1), (22, 8)])
def test_fusion_weights_are_symmetric_positive_and_smallest_at_the_edges(size, overlap):
    w = fusion_weights(size, overlap)
    assert w.dtype == np.float32 and w.shape == (size,)
    np.testing.assert_array_equal(w, w[::-1])
    assert (w > 0).all() and (w <= 1).all() and w[0] == w.min()
    if overlap == 0:
        assert (w == 1).all()


@pytest.mark.parametrize("frames, size, overlap", PLANS)
def test_normalised_weights_sum_to_one_on_every_frame(frames, size, overlap):
    total = np.zeros(frames, np.float64)
    for start, weights in normalised_weights(frames, (size, overlap)):
        total[start:start + len(weights)] += weights
    np.testing.assert_allclose(total, 1.0, atol=1e-6)


def test_a_frame_owned_by_one_window_keeps_weight_exactly_one():
    (_, first), *_ = normalised_weights(96, (24, 8))
    assert (first[:16] == 1.0).all() and (first[16:] < 1).all()


# -- the anchor -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("frames, size, overlap", PLANS)
def test_every_window_anchors_on_video_frame_0_and_each_frames_previous_frame(frames, size, overlap):
    for start in window_starts(frames, (size, overlap)):
        local, context = window_frames(start, size, frames)
        assert local[0] == 0 and local[context:] == list(range(start, min(start + own_frames(start, size), frames)))
        table = window_frame_table(local)
        for j in range(context, len(local)):
            assert local[table[j, 0]] == 0
            assert local[table[j, 1]] == max(local[j] - 1, 0)
        # so the model's own default policy over the window's frames is the right table: no per-window policy
        np.testing.assert_array_equal(table, sparse_causal_frame_table(len(local)))


def test_windowed_sparse_causal_model_equals_the_single_pass(pynative):
    """A model that only looks at frame 0 and the previous frame gives, window by window, its single-pass output."""
    sample, context = ms.Tensor(_rand(0, (2, 4, 11, 3, 3))), ms.Tensor(_rand(1, (2, 5, 6)))
    t = ms.Tensor(np.array([500, 500], np.int64))
    unet = SparseCausalToy()
    whole = unet(sample, t, context).asnumpy()
    for window in [(4, 1), (3, 0), (5, 2), (6, 3)]:
        fused = windowed_prediction(lambda x: unet(x, t, context), sample, window).asnumpy()
        np.testing.assert_allclose(fused, whole, rtol=1e-6, atol=1e-6)


# -- the loops --------------------------------------------------------------------------------------------------------
@pytest.fixture
def toy_inputs():
    latents = ms.Tensor(_rand(2, (1, 4, 6, 3, 3)))
    cond, uncond = ms.Tensor(_rand(3, (1, 5, 6)) + 0.3), ms.Tensor(_rand(4, (1, 5, 6)) - 0.3)
    return latents, cond, uncond


def _denoise(inputs, **options):
    latents, cond, uncond = inputs
    return denoise(TemporalToy(), DDIMScheduler.from_config(SD_V1_SCHEDULE), latents, cond, uncond, 5, 7.5,
                   **options).asnumpy()


def _invert(inputs, **options):
    latents, cond, _ = inputs
    walk = ddim_invert(TemporalToy(), DDIMScheduler.from_config(SD_V1_SCHEDULE), latents, cond, 5, **options)
    return np.stack([x.asnumpy() for x in walk])


@pytest.mark.parametrize("run", [_denoise, _invert], ids=["denoise", "invert"])
def test_one_window_covering_the_video_is_the_single_pass_bit_for_bit(pynative, toy_inputs, run):
    single = run(toy_inputs)
    np.testing.assert_array_equal(run(toy_inputs, window=(6, 2)), single)
    np.testing.assert_array_equal(run(toy_inputs, window=WindowSpec(24, 8)), single)


@pytest.mark.parametrize("run", [_denoise, _invert], ids=["denoise", "invert"])
def test_smaller_windows_change_a_model_that_mixes_all_frames(pynative, toy_inputs, run):
    single, windowed = run(toy_inputs), run(toy_inputs, window=(4, 1))
    assert windowed.shape == single.shape and np.isfinite(windowed).all()
    assert not np.array_equal(windowed, single)


def test_windows_see_the_anchor_frames_and_the_guided_batch(pynative, toy_inputs):
    seen = []

    class Recorder(TemporalToy):
        def construct(self, sample, timestep, encoder_hidden_states):
            seen.append((sample.shape[0], sample.shape[2]))
            return super().construct(sample, timestep, encoder_hidden_states)

    latents, cond, uncond = toy_inputs
    denoise(Recorder(), DDIMScheduler.from_config(SD_V1_SCHEDULE), latents, cond, uncond, 1, 7.5, window=(4, 1))
    # own frames 0-3, 3-4, 4-5 of 6 frames: [0,1,2,3], [0,2,3,4], [0,3,4,5]; every call 4 frames, CFG batch 2
    assert seen == [(2, 4), (2, 4), (2, 4)]


# -- the arguments ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size, overlap", [(2, 0), (0, 0), (4, 2), (4, -1), (4.0, 1), (True, 0), (4, 1.5)])
def test_bad_windows_are_refused(size, overlap):
    with pytest.raises(WindowError):
        WindowSpec(size, overlap)


@pytest.mark.parametrize("options, message", [
    (dict(window=2), "--window must be an integer >= 3"),
    (dict(window=24, window_overlap=22), "--window_overlap must be an integer with 0 <= --window_overlap <= "
                                         "--window - 3"),
    (dict(window=8, window_overlap=-2), "--window_overlap must be"),
    (dict(window_overlap=4), "--window_overlap 4 needs --window"),
])
def test_request_window_errors_name_the_option_before_anything_is_loaded(tmp_path, options, message):
    request = SampleRequest(str(tmp_path / "missing"), prompts=["a cat"], **options)
    with pytest.raises(PipelineError, match=message.replace("(", r"\(")):
        request.validate()  # the model folder does not exist: the window is checked first


def test_request_overlap_defaults_to_a_third_of_the_window():
    assert SampleRequest("x", prompts=["a"], window=24).window_spec() == WindowSpec(24, 8)
    assert SampleRequest("x", prompts=["a"], window=4).window_spec() == WindowSpec(4, 1)
    assert SampleRequest("x", prompts=["a"]).window_spec() is None
