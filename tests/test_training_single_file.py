"""tools/train.py's pretrained_model_path takes one checkpoint file too: it loads the same weights as the diffusers
folder they came from, the delta records the file the user named, and what a file needs (tokenizer_from) or a
folder refuses (prediction_type) is an error before anything is written."""
import json
import os

import numpy as np
import pytest

from tav import delta, optim, training
from tav.config import ConfigError, config_from_dict
from tav.tiny import make_demo_clip
from tests.ldm_fixtures import ldm_state, tiny, write_container  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_demo_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", n_frames=8, height=64, width=64, seed=2)


def run_config(model, output_dir, video, **keys):
    return config_from_dict(dict(
        pretrained_model_path=str(model), output_dir=str(output_dir),
        train_data=dict(video_path=str(video), prompt="a disc", n_sample_frames=2, width=64, height=64),
        validation_data=dict(prompts=[], num_inference_steps=1, num_inv_steps=1),
        max_train_steps=2, checkpointing_steps=2, seed=1, mixed_precision="no", gradient_checkpointing=False,
        **keys))


def parameters(cell):
    return {name: p.asnumpy() for name, p in cell.parameters_and_names()}


def test_a_single_file_loads_the_weights_of_its_folder(tiny, ldm_state, tmp_path, clip):
    path = write_container("safetensors", ldm_state, str(tmp_path))
    plan = optim.precision_plan("no", "CPU")
    folder_config = run_config(tiny, tmp_path / "a", clip)
    file_config = run_config(path, tmp_path / "b", clip, tokenizer_from=os.path.join(tiny, "tokenizer"),
                             config_from=tiny, converted_cache_dir=str(tmp_path / "converted"))
    expected = training.load_models(folder_config, plan, seed=4)
    got = training.load_models(file_config, plan, seed=4)
    for index in (0, 1, 3):  # unet (with its seeded temporal layers), vae, text encoder
        want, have = parameters(expected[index]), parameters(got[index])
        assert sorted(want) == sorted(have)
        for name in want:
            np.testing.assert_array_equal(have[name], want[name], err_msg=name)
    assert got[2]("a disc")["input_ids"] == expected[2]("a disc")["input_ids"]
    assert len(os.listdir(tmp_path / "converted")) == 1  # kept where asked, reused by the next load
    assert training.base_model_folder(file_config) == training.base_model_folder(file_config)


def test_a_run_from_a_single_file_records_the_file_in_its_delta(tiny, ldm_state, tmp_path, clip, monkeypatch):
    from tests.test_training import fake_train_step

    path = write_container("safetensors", ldm_state, str(tmp_path))
    fake_train_step(monkeypatch, nan_at=None)
    result = training.train(run_config(path, tmp_path / "out", clip, tokenizer_from=tiny, config_from=tiny))
    metadata = delta.read_delta(result.delta_path)[1]
    assert json.loads(metadata["tav_base_model_path"]) == os.path.abspath(path)


def test_a_single_file_without_a_tokenizer_is_refused_before_writing(ldm_state, tmp_path, clip):
    path = write_container("safetensors", ldm_state, str(tmp_path))
    with pytest.raises(ConfigError, match=r"pretrained_model_path: .*--tokenizer_from"):
        training.train(run_config(path, tmp_path / "out", clip))
    assert not (tmp_path / "out").exists()


def test_a_folder_refuses_the_single_file_keys(tiny, tmp_path, clip):
    with pytest.raises(ConfigError, match=r"pretrained_model_path: .*prediction_type.*single-file checkpoint only"):
        training.train(run_config(tiny, tmp_path / "out", clip, prediction_type="epsilon"))
