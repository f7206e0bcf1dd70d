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


def test_a_full_attention_run_and_its_delta_keep_the_policy(small_pipeline, clip, tmp_path, monkeypatch):
    fake_train_step(monkeypatch, nan_at=None)
    config = run_config(small_pipeline, tmp_path / "out", clip, max_train_steps=1, frame_policy="full")
    plan = training.precision_plan(config.mixed_precision, "CPU")
    assert policies(training.load_models(config, plan, seed=7)[0]) == {full_frame_table}
    result = training.train(config)
    tuned = TuneAVideoPipeline.from_pretrained(small_pipeline, unet=result.delta_path)
    assert policies(tuned.unet) == {full_frame_table}
    assert policies(TuneAVideoPipeline.from_pretrained(small_pipeline).unet) == {sparse_causal_frame_table}


def test_an_unknown_policy_is_refused_naming_the_key(small_pipeline, clip, tmp_path):
    with pytest.raises(ConfigError, match=r"frame_policy must be one of sparse_causal, full, got 'causal'"):
        run_config(small_pipeline, tmp_path / "out", clip, frame_policy="causal")


def norm_scopes(unet):
    return {cell.per_frame for _, cell in unet.cells_and_names() if isinstance(cell, GroupNorm)}


def test_per_frame_norms_tune_and_the_delta_keeps_them(small_pipeline, clip, tmp_path, monkeypatch):
    fake_train_step(monkeypatch, nan_at=None)
    config = run_config(small_pipeline, tmp_path / "out", clip, max_train_steps=1, group_norm_scope="frame")
    plan = training.precision_plan(config.mixed_precision, "CPU")
    assert norm_scopes(training.load_models(config, plan, seed=7)[0]) == {True}
    result = training.train(config)
    assert norm_scopes(TuneAVideoPipeline.from_pretrained(small_pipeline, unet=result.delta_path).unet) == {True}
    assert norm_scopes(TuneAVideoPipeline.from_pretrained(small_pipeline).unet) == {False}  # the official default


def test_an_unknown_norm_scope_is_refused_naming_the_key(small_pipeline, clip, tmp_path):
    with pytest.raises(ConfigError, match=r"group_norm_scope must be one of video, frame, got 'clip'"):
        run_config(small_pipeline, tmp_path / "out", clip, group_norm_scope="clip")


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
