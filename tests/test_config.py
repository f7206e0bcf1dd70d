"""The training config: the official YAML files parse and validate unchanged, defaults are the official ones,
unknown keys and bad values are errors naming the key and the file, relative paths resolve against the working
directory, and the command line reaches every key."""
import dataclasses
import subprocess
import sys

import pytest

from tav.config import ConfigError, check_input_paths, config_from_dict, load_train_config
from tests.helpers import REPO_ROOT, load_tool

OFFICIAL = ("man-skiing", "man-surfing", "rabbit-watermelon")
SHIPPED = ("car-turn", "man-skiing", "man-surfing", "rabbit-watermelon", "tiny")


def minimal(**extra):
    values = dict(pretrained_model_path="sd", output_dir="out",
                  train_data=dict(video_path="clip.mp4", prompt="a man is skiing"),
                  validation_data=dict(prompts=["a bear is skiing"]))
    values.update(extra)
    return values


def write_yaml(path, text):
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("name", OFFICIAL)
def test_official_yaml_parses_and_validates(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_train_config(REPO_ROOT / "configs" / f"{name}.yaml")
    assert config.pretrained_model_path == str(tmp_path / "checkpoints" / "stable-diffusion-v1-4")
    assert config.output_dir == str(tmp_path / "outputs" / name)
    assert config.train_data.video_path == str(tmp_path / "data" / f"{name}.mp4")
    assert (config.train_data.n_sample_frames, config.train_data.width, config.train_data.height) == (24, 512, 512)
    assert config.learning_rate == 3e-5 and isinstance(config.learning_rate, float)
    assert (config.max_train_steps, config.checkpointing_steps, config.validation_steps, config.seed) == (500, 1000,
                                                                                                         100, 33)
    assert config.trainable_modules == ["attn1.to_q", "attn2.to_q", "attn_temp"]
    assert (config.mixed_precision, config.use_8bit_adam, config.gradient_checkpointing) == ("fp16", False, True)
    val = config.validation_data
    assert len(val.prompts) == 4 and (val.video_length, val.num_inference_steps, val.guidance_scale) == (24, 50, 12.5)
    assert val.use_inv_latent and val.num_inv_steps == 50
    assert config.resolved_attention_backend() == "auto"  # enable_xformers_memory_efficient_attention: True


def test_absent_keys_take_the_official_defaults():
    config = config_from_dict(minimal())
    assert (config.adam_beta1, config.adam_beta2, config.adam_weight_decay, config.adam_epsilon) == (0.9, 0.999,
                                                                                                     1e-2, 1e-8)
    assert (config.max_grad_norm, config.lr_scheduler, config.lr_warmup_steps) == (1.0, "constant", 0)
    assert (config.gradient_accumulation_steps, config.resume_from_checkpoint, config.scale_lr) == (1, None, False)
    assert (config.train_batch_size, config.max_train_steps, config.learning_rate) == (1, 500, 3e-5)
    assert (config.validation_steps, config.checkpointing_steps, config.mixed_precision) == (100, 500, "fp16")
    data = config.train_data
    assert (data.width, data.height, data.n_sample_frames, data.sample_start_idx, data.sample_frame_rate) == (
        512, 512, 8, 0, 1)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_parse(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_train_config(REPO_ROOT / "configs" / f"{name}.yaml")
    assert config.trainable_modules == ["attn1.to_q", "attn2.to_q", "attn_temp"]


def test_shipped_official_configs_equal_the_published_ones(shared_data):
    """Only with the published files beside the repository (../shared/data); the shipped copies are tested above."""
    published = [name for name in OFFICIAL if (shared_data / f"{name}.yaml").is_file()]
    assert published
    for name in published:
        assert load_train_config(REPO_ROOT / "configs" / f"{name}.yaml") == load_train_config(
            shared_data / f"{name}.yaml")


GOOD_YAML = """\
pretrained_model_path: sd
output_dir: out
train_data:
  video_path: a.mp4
  prompt: p
validation_data:
  prompts: [a]
"""


@pytest.mark.parametrize("key,line_after,line", [
    ("learning_rat", "output_dir: out", "learning_rat: 1e-4"),
    ("train_data.n_frames", "  prompt: p", "  n_frames: 8"),
    ("validation_data.cfg_scale", "  prompts: [a]", "  cfg_scale: 7"),
])
def test_unknown_key_names_the_key_and_the_file(tmp_path, key, line_after, line):
    path = write_yaml(tmp_path / "bad.yaml", GOOD_YAML.replace(line_after + "\n", f"{line_after}\n{line}\n"))
    with pytest.raises(ConfigError, match=rf"{path}: unknown key '{key}'"):
        load_train_config(path)


def test_bad_values_name_the_key(tmp_path):
    cases = {
        "learning_rate": ("fast", "a number"),
        "max_train_steps": (0, "at least 1"),
        "mixed_precision": ("fp8", "one of no, fp16, bf16"),
        "gradient_checkpointing": ("yes", "true or false"),
        "lr_scheduler": ("exponential", "one of constant"),
        "attention_backend": ("xformers", "one of auto"),
    }
    for key, (value, expected) in cases.items():
        with pytest.raises(ConfigError, match=rf"{key} must be {expected}"):
            config_from_dict(minimal(**{key: value}), source="x.yaml")
    with pytest.raises(ConfigError, match=r"train_data.width must be a positive multiple of 8"):
        config_from_dict(minimal(train_data=dict(video_path="a", prompt="p", width=500)))
    with pytest.raises(ConfigError, match="required key train_data.prompt is missing"):
        config_from_dict(minimal(train_data=dict(video_path="a")))
    with pytest.raises(ConfigError, match="required key 'output_dir' is missing"):
        config_from_dict({k: v for k, v in minimal().items() if k != "output_dir"})


def test_inverted_latent_fixes_the_validation_video_shape():
    with pytest.raises(ConfigError, match="validation_data.video_length must be train_data.n_sample_frames"):
        config_from_dict(minimal(validation_data=dict(prompts=["a"], video_length=12)))
    config = config_from_dict(minimal(validation_data=dict(prompts=["a"], video_length=12, use_inv_latent=False)))
    assert config.validation_data.video_length == 12


def test_overrides_reach_top_level_and_section_keys():
    official = REPO_ROOT / "configs" / "man-skiing.yaml"
    config = load_train_config(official, [
        "max_train_steps=20", "learning_rate=1e-4", "train_data.n_sample_frames=8", "validation_data.video_length=8",
        "validation_data.prompts=[a cat is skiing]", "mixed_precision=no", "device_target=CPU"])
    assert (config.max_train_steps, config.learning_rate, config.train_data.n_sample_frames) == (20, 1e-4, 8)
    assert config.train_data.prompt == "a man is skiing"  # the rest of the section is kept
    assert config.validation_data.prompts == ["a cat is skiing"]
    assert (config.mixed_precision, config.device_target) == ("no", "CPU")
    with pytest.raises(ConfigError, match="unknown key 'train_data.frames'"):
        load_train_config(official, ["train_data.frames=8"])
    with pytest.raises(ConfigError, match="must look like key=value"):
        load_train_config(official, ["max_train_steps"])


def test_keys_without_a_mindspore_meaning_map_to_the_nearest():
    assert config_from_dict(minimal(enable_xformers_memory_efficient_attention=False)).resolved_attention_backend() \
        == "math"
    assert config_from_dict(minimal(attention_backend="chunked")).resolved_attention_backend() == "chunked"
    assert any("AdamW" in line for line in config_from_dict(minimal(use_8bit_adam=True)).notices())
    assert config_from_dict(minimal()).notices() == []
    scaled = config_from_dict(minimal(scale_lr=True, gradient_accumulation_steps=2, train_batch_size=3))
    assert scaled.effective_learning_rate() == pytest.approx(3e-5 * 6)


def test_relative_paths_resolve_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = config_from_dict(minimal(resume_from_checkpoint="out/checkpoint-5"))
    assert config.pretrained_model_path == str(tmp_path / "sd")
    assert config.train_data.video_path == str(tmp_path / "clip.mp4")
    assert config.resume_from_checkpoint == str(tmp_path / "out" / "checkpoint-5")
    assert config_from_dict(minimal(resume_from_checkpoint="latest")).resume_from_checkpoint == "latest"


def test_missing_inputs_name_the_key_that_points_to_them(tmp_path):
    config = config_from_dict(minimal(), source="run.yaml", base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"run.yaml: pretrained_model_path points to .*sd'.*does not exist"):
        check_input_paths(config)
    (tmp_path / "sd").mkdir()
    with pytest.raises(ConfigError, match=r"train_data.video_path points to .*clip.mp4'.*does not exist"):
        check_input_paths(config)


def test_missing_config_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_train_config(tmp_path / "none.yaml")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_train_config(write_yaml(tmp_path / "broken.yaml", "a: [1, 2\n"))


def test_to_yaml_round_trips(tmp_path):
    config = config_from_dict(minimal(), base_dir=tmp_path)
    again = load_train_config(write_yaml(tmp_path / "saved.yaml", config.to_yaml()))
    assert again == config


def test_command_line_reports_an_unknown_key_without_a_traceback(tmp_path):
    path = write_yaml(tmp_path / "bad.yaml", "pretrained_model_path: sd\nbogus: 1\n")
    run = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "train.py"), "--config", str(path)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 1
    assert f"error: {path}: unknown key 'bogus'" in run.stderr and "Traceback" not in run.stderr


def test_command_line_flags_become_overrides():
    tool = load_tool("train")
    args = tool.parse_args(["--config", "c.yaml", "max_train_steps=3", "--device_target", "Ascend", "--mode", "1",
                            "--jit_level", "O1", "--resume_from_checkpoint", "latest"])
    assert tool.command_line_overrides(args) == ["max_train_steps=3", "device_target=Ascend", "mode=1",
                                                 "jit_level=O1", "resume_from_checkpoint=latest"]
    args = tool.parse_args(["--config", "c.yaml", "--overwrite_output_dir"])
    assert tool.command_line_overrides(args) == ["overwrite_output_dir=true"]


@pytest.mark.parametrize("key,value,expected", [
    ("learning_rate", "inf", "a finite number"),
    ("learning_rate", 0, "a finite number > 0"),
    ("adam_beta2", 1.0, r"a finite number in \[0, 1\)"),
    ("adam_epsilon", 0, "a finite number > 0"),
    ("adam_weight_decay", -0.1, "a finite number >= 0"),
    ("max_grad_norm", 0, "a finite number > 0"),
    ("validation_data.guidance_scale", "nan", "a finite number"),
    ("validation_data.eta", 1.5, r"a finite number in \[0, 1\]"),
    ("validation_data.fps", 0, "a finite number > 0"),
    ("validation_data.num_inference_steps", 0, "at least 1"),
])
def test_numeric_keys_must_be_finite_and_in_range(key, value, expected):
    section, _, name = key.rpartition(".")
    values = minimal(**{name: value}) if not section else minimal(
        validation_data=dict(prompts=["a"], **{name: value}))
    with pytest.raises(ConfigError, match=rf"x.yaml: {key} must be {expected}, got"):
        config_from_dict(values, source="x.yaml")


def test_override_errors_name_the_command_line_not_the_file(tmp_path):
    path = write_yaml(tmp_path / "good.yaml", GOOD_YAML)
    with pytest.raises(ConfigError, match=r"^command line \(max_train_steps=0\): max_train_steps must be at least 1"):
        load_train_config(path, ["max_train_steps=0"])
    with pytest.raises(ConfigError, match=r"^command line \(train_data.frames=8\): unknown key 'train_data.frames'"):
        load_train_config(path, ["train_data.frames=8"])
    bad_file = write_yaml(tmp_path / "bad.yaml", GOOD_YAML + "max_train_steps: 0\n")
    with pytest.raises(ConfigError, match=rf"^{bad_file}: max_train_steps must be at least 1"):
        load_train_config(bad_file, ["learning_rate=1e-4"])


def test_a_missing_path_set_on_the_command_line_is_blamed_on_the_command_line(tmp_path):
    (tmp_path / "sd").mkdir()  # the base model exists: the clip is what is missing
    path = write_yaml(tmp_path / "good.yaml",
                      GOOD_YAML.replace("pretrained_model_path: sd", f"pretrained_model_path: {tmp_path / 'sd'}"))
    config = load_train_config(path, [f"train_data.video_path={tmp_path / 'nowhere.mp4'}"])
    with pytest.raises(ConfigError, match=r"^command line \(train_data.video_path=.*\): train_data.video_path "):
        check_input_paths(config)
    from_file = load_train_config(write_yaml(tmp_path / "other.yaml", path.read_text().replace(
        "video_path:", f"video_path: {tmp_path / 'gone.mp4'} #")))
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'other.yaml'}: train_data.video_path points to"):
        check_input_paths(from_file)


def test_a_scalar_yaml_file_is_not_a_mapping(tmp_path):
    path = write_yaml(tmp_path / "scalar.yaml", "just a string\n")
    with pytest.raises(ConfigError, match=r"expected a mapping of keys .* got a str \('just a string'\)"):
        load_train_config(path)


def test_overwrite_and_resume_exclude_each_other():
    assert config_from_dict(minimal(overwrite_output_dir=True)).overwrite_output_dir
    with pytest.raises(ConfigError, match="overwrite_output_dir must be false when resume_from_checkpoint is set"):
        config_from_dict(minimal(overwrite_output_dir=True, resume_from_checkpoint="latest"))


def test_every_config_field_has_a_type_from_its_annotation():
    from tav import config as config_module

    for cls in (config_module.TrainConfig, config_module.TrainData, config_module.ValidationData):
        kinds = config_module._field_kinds(cls)
        assert set(kinds) == {f.name for f in dataclasses.fields(cls)}
    assert config_module._field_kinds(config_module.ValidationData)["video_length"] == (int, True)
    assert not hasattr(config_module, "_FIELD_TYPES")  # one source: the annotations


def test_command_line_debug_shows_the_traceback(tmp_path):
    path = write_yaml(tmp_path / "bad.yaml", "pretrained_model_path: sd\nbogus: 1\n")
    run = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "train.py"), "--config", str(path), "--debug"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode != 0
    assert "Traceback" in run.stderr and "unknown key 'bogus'" in run.stderr
