"""The LOVEU-TGVE 2023 baseline's training configs load as the official schema: num_frames, frame_rate, ext, a
frame folder as video_path, and validation prompts as a mapping of edit type -> prompt."""
import pytest

from tav.config import ConfigError, check_input_paths, load_train_config

# One of the benchmark's configs as it publishes them (configs/loveu-tgve-2023/<subset>/<video>.yaml), paths local.
LOVEU_CONFIG = """\
pretrained_model_path: ./sd
output_dir: ./outputs/bmx-rider
train_data:
  video_path: ./frames/bmx-rider
  prompt: A person does a trick on a BMX bike at a skatepark.
  height: 480
  width: 480
  num_frames: 32
  frame_rate: 1
validation_data:
  prompts:
    style: A person does a trick on a BMX bike at a skatepark, grayscale.
    object: A person does a trick on a unicycle at a skatepark.
    background: A person does a trick on a BMX bike at a snow covered park in Antarctica.
    multiple: A person does a trick on a skateboard at a beach skate park, vintage
      style.
  height: 480
  width: 480
  num_inference_steps: 50
  guidance_scale: 12.5
  use_inv_latent: true
  num_inv_steps: 50
learning_rate: 3.0e-05
train_batch_size: 1
max_train_steps: 500
checkpointing_steps: 100
validation_steps: 100
trainable_modules:
- attn1.to_q
- attn2.to_q
- attn_temp
seed: 33
mixed_precision: fp16
use_8bit_adam: false
gradient_checkpointing: true
enable_xformers_memory_efficient_attention: true
"""


@pytest.fixture
def loveu_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sd").mkdir()
    (tmp_path / "frames" / "bmx-rider").mkdir(parents=True)
    path = tmp_path / "bmx-rider.yaml"
    path.write_text(LOVEU_CONFIG, encoding="utf-8")
    return path


def test_the_loveu_baseline_config_maps_to_the_official_keys(loveu_yaml, tmp_path):
    config = load_train_config(loveu_yaml)
    data = config.train_data
    assert (data.n_sample_frames, data.sample_frame_rate, data.sample_start_idx) == (32, 1, 0)
    assert data.video_path == str(tmp_path / "frames" / "bmx-rider")
    check_input_paths(config)  # a frame folder is a valid clip path
    assert config.validation_data.prompts == [
        "A person does a trick on a BMX bike at a skatepark, grayscale.",
        "A person does a trick on a unicycle at a skatepark.",
        "A person does a trick on a BMX bike at a snow covered park in Antarctica.",
        "A person does a trick on a skateboard at a beach skate park, vintage style.",
    ]
    # The recorded config (config.yaml, checkpoints) is in the official schema and loads as itself.
    recorded = tmp_path / "recorded.yaml"
    recorded.write_text(config.to_yaml(), encoding="utf-8")
    assert load_train_config(recorded).to_dict() == config.to_dict()


def test_command_line_overrides_reach_the_loveu_keys(loveu_yaml):
    assert load_train_config(loveu_yaml, ["train_data.num_frames=8"]).train_data.n_sample_frames == 8


def test_both_spellings_of_a_key_are_an_error_naming_both(loveu_yaml):
    with pytest.raises(ConfigError, match=r"train_data.num_frames .*train_data.n_sample_frames .*both given"):
        load_train_config(loveu_yaml, ["train_data.n_sample_frames=8"])


def test_a_prompt_mapping_with_an_empty_prompt_names_its_edit_type(loveu_yaml):
    with pytest.raises(ConfigError, match=r"command line .*validation_data.prompts .*not a prompt: object"):
        load_train_config(loveu_yaml, ["validation_data.prompts.object=''"])


def test_a_frame_extension_needs_a_frame_folder(loveu_yaml, tmp_path):
    (tmp_path / "clip.mp4").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"train_data.ext \('jpg'\) .*is a file; expected a folder of frames"):
        load_train_config(loveu_yaml, ["train_data.ext=jpg", "train_data.video_path=clip.mp4"])
    with pytest.raises(ConfigError, match=r"train_data.ext must be one of jpg, jpeg, png .*got 'gif'"):
        load_train_config(loveu_yaml, ["train_data.ext=gif"])
    assert load_train_config(loveu_yaml, ["train_data.ext=jpg"]).train_data.n_sample_frames == 32
