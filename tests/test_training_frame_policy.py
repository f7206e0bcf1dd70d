"""frame_policy: full tunes with every frame in attn1's keys (the paper's full-attention ablation), the delta
records it, and loading the delta builds the UNet with that policy again; sparse_causal stays the default. The same
for group_norm_scope: frame (each frame's own GroupNorm statistics), video staying the default."""
import mindspore as ms
import numpy as np
import pytest

from tav import training
from tav.config import ConfigError
from tav.models.attention import SparseCausalContext, full_frame_table, sparse_causal_frame_table
from tav.models.resnet import set_group_norm_scope
from tav.nn import GroupNorm
from tav.pipeline import TuneAVideoPipeline
from tests.test_training import clip, fake_train_step, run_config, small_pipeline  # noqa: F401 (fixtures)


def policies(unet):
    return {cell.frame_policy for _, cell in unet.cells_and_names() if isinstance(cell, SparseCausalContext)}


def norm_scopes(unet):
    return {cell.per_frame for _, cell in unet.cells_and_names() if isinstance(cell, GroupNorm)}


# (key, value, what to read off a UNet, what a UNet tuned with key=value reads, what the default UNet reads)
DELTA_SETTINGS = [
    pytest.param("frame_policy", "full", policies, {full_frame_table}, {sparse_causal_frame_table},
                 id="frame_policy"),
    pytest.param("group_norm_scope", "frame", norm_scopes, {True}, {False}, id="group_norm_scope"),
]


@pytest.mark.parametrize("key, value, read, tuned, default", DELTA_SETTINGS)
def test_a_run_and_its_delta_keep_the_setting(key, value, read, tuned, default, small_pipeline, clip, tmp_path,
                                              monkeypatch):
    fake_train_step(monkeypatch, nan_at=None)
    config = run_config(small_pipeline, tmp_path / "out", clip, max_train_steps=1, **{key: value})
    plan = training.precision_plan(config.mixed_precision, "CPU")
    assert read(training.load_models(config, plan, seed=7)[0]) == tuned
    result = training.train(config)
    assert read(TuneAVideoPipeline.from_pretrained(small_pipeline, unet=result.delta_path).unet) == tuned
    assert read(TuneAVideoPipeline.from_pretrained(small_pipeline).unet) == default  # the official default


@pytest.mark.parametrize("key, value, message", [
    ("frame_policy", "causal", r"frame_policy must be one of sparse_causal, full, got 'causal'"),
    ("group_norm_scope", "clip", r"group_norm_scope must be one of video, frame, got 'clip'"),
], ids=["frame_policy", "group_norm_scope"])
def test_an_unknown_value_is_refused_naming_the_key(key, value, message, small_pipeline, clip, tmp_path):
    with pytest.raises(ConfigError, match=message):
        run_config(small_pipeline, tmp_path / "out", clip, **{key: value})


def test_a_per_frame_group_norm_normalises_each_frame_alone():
    """Two frames of one video folded into the batch, one 10x the other: with the video's statistics the small
    frame stays ~10x smaller after the norm; per frame both come out alike, each as if normalised alone."""
    rng = np.random.default_rng(0)
    frame = rng.standard_normal((1, 8, 4, 4)).astype(np.float32)
    video = ms.Tensor(np.concatenate([frame, 10 * frame]))  # ((B F), C, H, W) with B=1, F=2
    norm = GroupNorm(2, 8)
    spans_video = norm(video, 2).asnumpy()
    assert np.abs(spans_video[1]).mean() > 5 * np.abs(spans_video[0]).mean()
    assert set_group_norm_scope(norm, "frame") == 1
    per_frame = norm(video, 2).asnumpy()
    alone = norm(ms.Tensor(frame), 1).asnumpy()[0]
    np.testing.assert_allclose(per_frame[0], alone, atol=1e-4)
    np.testing.assert_allclose(per_frame[1], alone, atol=1e-4)
