"""train_data.frames_per_step: a long clip is tuned a window at a time. Each update sees frames_per_step frames in
the layout windowed sampling feeds the UNet (frame 0, frame s-1, a run from a random s), drawn from the run's
resumable RNG; validation inverts and samples the whole clip in windows of that size."""
import numpy as np
import pytest

import mindspore as ms

from tav import training
from tav.config import ConfigError, config_from_dict
from tav.train_state import StepNoise
from tav.windows import WindowSpec, window_frames
from tests.test_training import clip, run_config, small_pipeline  # noqa: F401 (fixtures)


class RecordingStep:
    """Stands in for TrainStep and keeps the posterior mean and noise of every update."""

    def __init__(self):
        self.means, self.noise_shapes = [], []

    def report(self, mean, std, posterior_noise, *rest):
        self.means.append(mean.asnumpy())
        self.noise_shapes.append(tuple(posterior_noise.shape))
        return 1.0, True, 0.5


def test_every_update_sees_a_window_of_the_clip(small_pipeline, clip, tmp_path, monkeypatch):
    step = RecordingStep()
    monkeypatch.setattr(training, "TrainStep", lambda *args, **kwargs: step)
    config = run_config(small_pipeline, tmp_path / "out", clip, max_train_steps=12, train_batch_size=1,
                        train_data=dict(n_sample_frames=8, frames_per_step=4))
    training.train(config)
    plan = training.precision_plan(config.mixed_precision, "CPU")
    vae = training.load_models(config, plan, seed=7)[1]
    mean, _ = training.encode_clip(vae, training.read_clip(config).astype(np.float32))
    mean = mean.asnumpy()
    starts = set()
    for seen in step.means:
        assert seen.shape == mean.shape[:2] + (4,) + mean.shape[3:]
        matches = [s for s in range(0, 7) if np.array_equal(seen, mean[:, :, window_frames(s, 4, 8)[0]])]
        assert matches, "an update saw frames that are not one window of the clip"
        starts.add(tuple(window_frames(matches[0], 4, 8)[0]))
    assert len(starts) > 2  # drawn afresh, not one fixed window
    assert all(shape == (1, 1, 4, 4, 8, 8) for shape in step.noise_shapes)  # (micro-steps, batch, c, K, h, w)


def test_the_frame_draw_is_part_of_the_resumable_state():
    first = StepNoise(3)
    draws = [first.draw_frames(24, 8) for _ in range(3)]
    again = StepNoise(3)
    again.draw_frames(24, 8)
    state = again.state()
    resumed = StepNoise(99)
    resumed.set_state(state)
    assert [resumed.draw_frames(24, 8) for _ in range(2)] == draws[1:]
    assert all(len(d) == 8 and d[0] == 0 and list(d[2:]) == list(range(d[2], d[2] + 6)) for d in draws)


def test_validation_samples_in_windows_of_frames_per_step(small_pipeline, clip, tmp_path, monkeypatch):
    windows = []
    original = training.run_validation

    def spy(config, *args, **kwargs):
        windows.append(training.validation_window(config))
        return original(config, *args, **kwargs)

    monkeypatch.setattr(training, "run_validation", spy)
    monkeypatch.setattr(training, "TrainStep", lambda *args, **kwargs: RecordingStep())
    config = run_config(small_pipeline, tmp_path / "out", clip, max_train_steps=1, train_batch_size=1,
                        validation_steps=1, mode=1, mixed_precision="no",
                        train_data=dict(n_sample_frames=8, frames_per_step=4),
                        validation_data=dict(prompts=["a bear"], num_inference_steps=1, num_inv_steps=1))
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        result = training.train(config)
    finally:
        ms.set_context(mode=previous)
    assert windows == [WindowSpec(4, 1)]
    assert result.samples and all(path.startswith(str(tmp_path / "out" / "samples")) for path in result.samples)


@pytest.mark.parametrize("frames_per_step, expected", [(9, "at most train_data.n_sample_frames"), (2, "at least 3")])
def test_frames_per_step_is_checked_against_the_clip(frames_per_step, expected):
    values = dict(pretrained_model_path="sd", output_dir="out", validation_data=dict(prompts=[]),
                  train_data=dict(video_path="clip.mp4", prompt="p", n_sample_frames=8,
                                  frames_per_step=frames_per_step))
    with pytest.raises(ConfigError, match=rf"train_data.frames_per_step.*{expected}"):
        config_from_dict(values)
