"""The training config: the official Tune-A-Video YAML files, validated once, plus tav's own keys.

    config = load_train_config("configs/man-skiing.yaml", overrides=["max_train_steps=300"])
    config.train_data.video_path, config.validation_data.prompts, config.learning_rate, ...

Every key of the official `train_tuneavideo.py main()` is accepted, with the official defaults where a file omits
it (reference section 2.2). Keys with no MindSpore meaning map to the nearest equivalent:
`enable_xformers_memory_efficient_attention` picks the attention backend, `use_8bit_adam` prints a notice (tav uses
AdamW), `mixed_precision` is honoured where the device supports it (fp16/bf16 on Ascend, fp32 on CPU; see
tav.training.precision_plan). An unknown key, at the top level or inside train_data / validation_data, is an error
naming the key and the file. Relative paths resolve against the working directory, as in the official script.

Two official keys read slightly differently: `train_batch_size` B draws B noise/timestep pairs of the clip per step
(the official dataset holds one clip, so its batches hold one video whatever B says), and
`gradient_accumulation_steps` A averages the gradients of A such draws per update (lr_warmup_steps and
max_train_steps count updates). With the shipped values (1 and 1) both match the official exactly.

tav's own keys (all optional):
    attention_backend       auto | math | chunked | flash | native; wins over enable_xformers_memory_efficient_attention
    device_target, mode, jit_level   MindSpore context (the command line overrides them)
    checkpoints_total_limit keep only the newest k checkpoint-N folders (null: keep all, as the official)
    save_full_pipeline      also write the tuned pipeline folder in diffusers layout at the end (official export)
    validation_data.negative_prompt / eta / fps / format / seed
"""
import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

ATTENTION_BACKENDS = ("auto", "math", "chunked", "flash", "native")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
VIDEO_FORMATS = ("gif", "mp4")
DEFAULT_TRAINABLE_MODULES = ("attn1.to_q", "attn2.to_q", "attn_temp")


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and the file."""


@dataclass
class TrainData:
    """`train_data`: the one clip and its prompt (official TuneAVideoDataset arguments and defaults)."""

    video_path: str
    prompt: str
    width: int = 512
    height: int = 512
    n_sample_frames: int = 8
    sample_start_idx: int = 0
    sample_frame_rate: int = 1


@dataclass
class ValidationData:
    """`validation_data`: the official pipeline-call keys, plus tav's negative_prompt/eta/fps/format/seed.

    None for video_length/width/height means "as the training clip"."""

    prompts: List[str] = field(default_factory=list)
    video_length: Optional[int] = None
    width: Optional[int] = None
    height: Optional[int] = None
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    use_inv_latent: bool = True
    num_inv_steps: int = 50
    negative_prompt: Optional[str] = None
    eta: float = 0.0
    fps: int = 8
    format: str = "gif"
    seed: Optional[int] = None  # None: the top-level seed


@dataclass
class TrainConfig:
    pretrained_model_path: str
    output_dir: str
    train_data: TrainData
    validation_data: ValidationData
    validation_steps: int = 100
    trainable_modules: List[str] = field(default_factory=lambda: list(DEFAULT_TRAINABLE_MODULES))
    train_batch_size: int = 1
    max_train_steps: int = 500
    learning_rate: float = 3e-5
    scale_lr: bool = False
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = True
    checkpointing_steps: int = 500
    resume_from_checkpoint: Optional[str] = None
    mixed_precision: Optional[str] = "fp16"
    use_8bit_adam: bool = False
    enable_xformers_memory_efficient_attention: bool = True
    seed: Optional[int] = None
    # tav's own keys
    attention_backend: Optional[str] = None
    device_target: Optional[str] = None
    mode: int = 0
    jit_level: Optional[str] = None
    checkpoints_total_limit: Optional[int] = None
    save_full_pipeline: bool = False
    source: str = field(default="<dict>", compare=False)  # the file it came from, for messages

    # -- derived values -----------------------------------------------------------------------------------------
    def resolved_attention_backend(self):
        """attention_backend if given, else xformers on -> auto (flash where available), off -> math."""
        if self.attention_backend is not None:
            return self.attention_backend
        return "auto" if self.enable_xformers_memory_efficient_attention else "math"

    def effective_learning_rate(self):
        """learning_rate, times accumulation x batch when scale_lr (one process, as the official)."""
        if self.scale_lr:
            return self.learning_rate * self.gradient_accumulation_steps * self.train_batch_size
        return self.learning_rate

    def notices(self):
        """One-line notices for official keys that mean something else here."""
        lines = []
        if self.use_8bit_adam:
            lines.append("use_8bit_adam: bitsandbytes has no MindSpore version; training with the standard AdamW")
        return lines

    def to_dict(self):
        out = dataclasses.asdict(self)
        out.pop("source")
        return out

    def to_yaml(self):
        return OmegaConf.to_yaml(OmegaConf.create(self.to_dict()))


# ---------------------------------------------------------------------------------------------------------------
# Loading


def load_train_config(path, overrides=(), base_dir=None):
    """Read a training YAML, apply `key=value` overrides (dotted keys reach into train_data / validation_data),
    validate every key and value, and resolve relative paths against `base_dir` (default: the working directory).
    Raises ConfigError naming the key and the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except (OmegaConfBaseException, ValueError, OSError) as exc:  # yaml errors are ValueError subclasses here
        raise ConfigError(f"cannot parse config file {path!r}: {exc}") from None
    except Exception as exc:  # yaml.YAMLError and friends
        raise ConfigError(f"cannot parse config file {path!r}: {type(exc).__name__}: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides, path)
    return config_from_dict(raw, source=path, base_dir=base_dir)


def apply_overrides(raw, overrides, source="config"):
    """`raw` with each "a.b=value" applied (value parsed as YAML: 3e-5, true, [a, b] ...)."""
    overrides = list(overrides or ())
    if not overrides:
        return raw
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} must look like key=value (e.g. max_train_steps=300)")
    try:
        dotlist = OmegaConf.to_container(OmegaConf.from_dotlist(overrides), resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cannot parse overrides {overrides}: {exc}") from None
    merged = dict(raw)
    for key, value in dotlist.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def config_from_dict(raw, source="<dict>", base_dir=None):
    """Validate a plain dict (as read from YAML) into a TrainConfig; see load_train_config."""
    raw = dict(raw)
    top = _known_fields(TrainConfig) - {"source"}
    _reject_unknown(raw, top, "", source)
    for required in ("pretrained_model_path", "output_dir", "train_data", "validation_data"):
        if raw.get(required) is None:
            raise ConfigError(f"{source}: required key {required!r} is missing")

    train_data = _section(raw["train_data"], TrainData, "train_data", source)
    validation_data = _section(raw["validation_data"], ValidationData, "validation_data", source)
    values = {k: v for k, v in raw.items() if k not in ("train_data", "validation_data")}
    checked = {}
    if values.get("mixed_precision") is False:  # YAML 1.1 reads the official value `no` as false
        values["mixed_precision"] = "no"
    for f in dataclasses.fields(TrainConfig):
        if f.name in values:
            checked[f.name] = _check_value(f.name, values[f.name], _FIELD_TYPES[f.name], source)
    config = TrainConfig(train_data=train_data, validation_data=validation_data, source=source, **checked)
    _check_ranges(config)
    _resolve_paths(config, base_dir)
    return config


def _known_fields(cls):
    return {f.name for f in dataclasses.fields(cls)}


def _reject_unknown(raw, known, prefix, source):
    unknown = sorted(k for k in raw if k not in known)
    if unknown:
        key = prefix + str(unknown[0])
        more = f" (and {', '.join(prefix + str(k) for k in unknown[1:])})" if len(unknown) > 1 else ""
        raise ConfigError(
            f"{source}: unknown key {key!r}{more}; known keys{' of ' + prefix[:-1] if prefix else ''}: "
            f"{', '.join(sorted(known))}"
        )


def _section(raw, cls, name, source):
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {name} must be a mapping of keys, got {raw!r}")
    _reject_unknown(raw, _known_fields(cls), name + ".", source)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            values[f.name] = _check_value(f"{name}.{f.name}", raw[f.name], _FIELD_TYPES[f"{name}.{f.name}"], source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: required key {name}.{f.name} is missing")
    return cls(**values)


# Expected kinds: "int", "float", "bool", "str", "str_list", with "?" for "may be null".
_FIELD_TYPES = {
    "pretrained_model_path": "str", "output_dir": "str", "validation_steps": "int", "trainable_modules": "str_list",
    "train_batch_size": "int", "max_train_steps": "int", "learning_rate": "float", "scale_lr": "bool",
    "lr_scheduler": "str", "lr_warmup_steps": "int", "adam_beta1": "float", "adam_beta2": "float",
    "adam_weight_decay": "float", "adam_epsilon": "float", "max_grad_norm": "float",
    "gradient_accumulation_steps": "int", "gradient_checkpointing": "bool", "checkpointing_steps": "int",
    "resume_from_checkpoint": "str?", "mixed_precision": "str?", "use_8bit_adam": "bool",
    "enable_xformers_memory_efficient_attention": "bool", "seed": "int?", "attention_backend": "str?",
    "device_target": "str?", "mode": "int", "jit_level": "str?", "checkpoints_total_limit": "int?",
    "save_full_pipeline": "bool",
    "train_data.video_path": "str", "train_data.prompt": "str", "train_data.width": "int",
    "train_data.height": "int", "train_data.n_sample_frames": "int", "train_data.sample_start_idx": "int",
    "train_data.sample_frame_rate": "int",
    "validation_data.prompts": "str_list", "validation_data.video_length": "int?", "validation_data.width": "int?",
    "validation_data.height": "int?", "validation_data.num_inference_steps": "int",
    "validation_data.guidance_scale": "float", "validation_data.use_inv_latent": "bool",
    "validation_data.num_inv_steps": "int", "validation_data.negative_prompt": "str?", "validation_data.eta": "float",
    "validation_data.fps": "int", "validation_data.format": "str", "validation_data.seed": "int?",
}


def _check_value(key, value, kind, source):
    nullable = kind.endswith("?")
    kind = kind.rstrip("?")
    if value is None:
        if nullable:
            return None
        raise ConfigError(f"{source}: {key} must not be null")

    def fail(expected):
        raise ConfigError(f"{source}: {key} must be {expected}, got {value!r}")

    if kind == "bool":
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            fail("an integer")
        return value
    if kind == "float":
        if isinstance(value, str):  # YAML 1.1 reads "3e-5" (no dot) as a string; accept what it means
            try:
                number = float(value)
            except ValueError:
                number = None
            if number is None:
                fail("a number")
            value = number
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            fail("a finite number")
        return float(value)
    if kind == "str":
        if not isinstance(value, str):
            fail("a string")
        return value
    if kind == "str_list":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            fail("a list of strings")
        return list(value)
    raise AssertionError(kind)


def _check_ranges(config):
    src = config.source

    def need(ok, key, expected, value):
        if not ok:
            raise ConfigError(f"{src}: {key} must be {expected}, got {value!r}")

    for key in ("validation_steps", "train_batch_size", "max_train_steps", "gradient_accumulation_steps",
                "checkpointing_steps"):
        need(getattr(config, key) >= 1, key, "at least 1", getattr(config, key))
    need(config.lr_warmup_steps >= 0, "lr_warmup_steps", "0 or more", config.lr_warmup_steps)
    need(config.learning_rate > 0, "learning_rate", "positive", config.learning_rate)
    for key in ("adam_beta1", "adam_beta2"):
        need(0.0 <= getattr(config, key) < 1.0, key, "in [0, 1)", getattr(config, key))
    need(config.adam_weight_decay >= 0, "adam_weight_decay", "0 or more", config.adam_weight_decay)
    need(config.adam_epsilon >= 0, "adam_epsilon", "0 or more", config.adam_epsilon)
    need(config.max_grad_norm > 0, "max_grad_norm", "positive", config.max_grad_norm)
    need(config.lr_scheduler in LR_SCHEDULERS, "lr_scheduler", f"one of {', '.join(LR_SCHEDULERS)}",
         config.lr_scheduler)
    if config.mixed_precision is None:
        config.mixed_precision = "no"
    need(config.mixed_precision in MIXED_PRECISIONS, "mixed_precision", f"one of {', '.join(MIXED_PRECISIONS)}",
         config.mixed_precision)
    need(bool(config.trainable_modules) and all(config.trainable_modules), "trainable_modules",
         "a non-empty list of module name suffixes", config.trainable_modules)
    need(config.attention_backend is None or config.attention_backend in ATTENTION_BACKENDS, "attention_backend",
         f"one of {', '.join(ATTENTION_BACKENDS)}", config.attention_backend)
    need(config.device_target is None or config.device_target.lower() in ("cpu", "gpu", "ascend"), "device_target",
         "CPU, GPU or Ascend", config.device_target)
    need(config.mode in (0, 1), "mode", "0 (graph) or 1 (pynative)", config.mode)
    need(config.jit_level in (None, "O0", "O1", "O2"), "jit_level", "O0, O1 or O2", config.jit_level)
    need(config.checkpoints_total_limit is None or config.checkpoints_total_limit >= 1, "checkpoints_total_limit",
         "at least 1 (or null)", config.checkpoints_total_limit)

    data = config.train_data
    for key in ("width", "height"):
        value = getattr(data, key)
        need(value >= 8 and value % 8 == 0, f"train_data.{key}", "a positive multiple of 8", value)
    need(data.n_sample_frames >= 1, "train_data.n_sample_frames", "at least 1", data.n_sample_frames)
    need(data.sample_start_idx >= 0, "train_data.sample_start_idx", "0 or more", data.sample_start_idx)
    need(data.sample_frame_rate >= 1, "train_data.sample_frame_rate", "at least 1", data.sample_frame_rate)
    need(bool(data.prompt.strip()), "train_data.prompt", "a non-empty string", data.prompt)

    val = config.validation_data
    for key in ("width", "height"):
        value = getattr(val, key)
        need(value is None or (value >= 8 and value % 8 == 0), f"validation_data.{key}", "a positive multiple of 8",
             value)
    need(val.video_length is None or val.video_length >= 1, "validation_data.video_length", "at least 1",
         val.video_length)
    need(val.num_inference_steps >= 1, "validation_data.num_inference_steps", "at least 1", val.num_inference_steps)
    need(val.num_inv_steps >= 1, "validation_data.num_inv_steps", "at least 1", val.num_inv_steps)
    need(val.eta >= 0, "validation_data.eta", "0 or more", val.eta)
    need(val.fps >= 1, "validation_data.fps", "at least 1", val.fps)
    need(val.format in VIDEO_FORMATS, "validation_data.format", f"one of {', '.join(VIDEO_FORMATS)}", val.format)
    if val.use_inv_latent:
        length = val.video_length or data.n_sample_frames
        # The inverted latent is the training clip's: sampling from it fixes the frame count (official shape check).
        need(length == data.n_sample_frames, "validation_data.video_length",
             f"train_data.n_sample_frames ({data.n_sample_frames}) when use_inv_latent is true", val.video_length)
        for key in ("width", "height"):
            value = getattr(val, key)
            need(value is None or value == getattr(data, key), f"validation_data.{key}",
                 f"train_data.{key} ({getattr(data, key)}) when use_inv_latent is true", value)


def _resolve_paths(config, base_dir):
    base = os.path.abspath(base_dir or os.getcwd())

    def resolve(path):
        return os.path.normpath(os.path.join(base, os.path.expanduser(path)))

    config.pretrained_model_path = resolve(config.pretrained_model_path)
    config.output_dir = resolve(config.output_dir)
    config.train_data.video_path = resolve(config.train_data.video_path)
    if config.resume_from_checkpoint not in (None, "latest"):
        config.resume_from_checkpoint = resolve(config.resume_from_checkpoint)


def check_input_paths(config):
    """Raise ConfigError naming the key when the base model folder or the training clip does not exist."""
    for key, path, want in (
        ("pretrained_model_path", config.pretrained_model_path, "a Stable Diffusion pipeline folder"),
        ("train_data.video_path", config.train_data.video_path, "a video file (or a folder of frames)"),
    ):
        if not os.path.exists(path):
            raise ConfigError(f"{config.source}: {key} points to {path!r}, which does not exist (expected {want})")
