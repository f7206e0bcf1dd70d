"""frame_policy: full tunes with every frame in attn1's keys (the paper's full-attention ablation), the delta
records it, and loading the delta builds the UNet with that policy again; sparse_causal stays the default."""
import pytest

from tav import training
from tav.config import ConfigError
from tav.models.attention import SparseCausalContext, full_frame_table, sparse_causal_frame_table
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
