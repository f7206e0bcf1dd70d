"""The training config: the official Tune-A-Video YAML files, validated once, plus tav's own keys.

    config = load_train_config("configs/man-skiing.yaml", overrides=["max_train_steps=300"])
    config.train_data.video_path, config.validation_data.prompts, config.learning_rate, ...

Every key of the official `train_tuneavideo.py main()` is accepted, with the official defaults where a file omits
it. Keys with no MindSpore meaning map to the nearest equivalent:
`enable_xformers_memory_efficient_attention` picks the attention backend, `use_8bit_adam` prints a notice (tav uses
AdamW), `mixed_precision` is honoured where the device supports it (fp16/bf16 on Ascend, fp32 on CPU; see
tav.optim.precision_plan). An unknown key, at the top level or inside train_data / validation_data, is an error
naming the key and the file. Relative paths resolve against the working directory, as in the official script.

Two official keys read slightly differently: `train_batch_size` B draws B noise/timestep pairs of the clip per step
(the official dataset holds one clip, so its batches hold one video whatever B says), and
`gradient_accumulation_steps` A averages the gradients of A such draws per update (lr_warmup_steps and
max_train_steps count updates). With the shipped values (1 and 1) both match the official exactly.

The LOVEU-TGVE 2023 baseline's configs (its Tune-A-Video training script) are accepted too, mapped to the official
keys by `from_loveu_schema`: `train_data.num_frames` -> n_sample_frames, `train_data.frame_rate` ->
sample_frame_rate, `train_data.ext` (the frames' extension; video_path is then a folder of frame images, read in
name order), `validation_data.prompts` as a mapping of edit type -> prompt (sampled in the mapping's order). A
config giving both spellings of one key is an error naming both.

tav's own keys (all optional):
    attention_backend       auto | math | chunked | flash | native; wins over enable_xformers_memory_efficient_attention
    device_target, mode, jit_level   MindSpore context (the command line overrides them)
    checkpoints_total_limit keep only the newest k checkpoint-N folders (null: keep all, as the official)
    overwrite_output_dir    start over in an output_dir that holds another run (its checkpoints, delta, samples and
                            log are deleted first); without it such a run refuses
    save_full_pipeline      also write the tuned pipeline folder in diffusers layout at the end (official export)
    lora_rank               tune low-rank adapters of this rank instead of trainable_modules (null: the official
                            full tuning); the delta then holds the adapters only (tav.lora_tuning)
    lora_modules            the Linears that get adapters, as module-name suffixes (default attn1.to_q, attn2.to_q;
                            add attn1.to_k, attn2.to_v, attn1.to_out, attn_temp, ...)
    lora_alpha              the adapters' scale is lora_alpha / lora_rank (null: lora_rank, scale 1)
    frame_policy            sparse_causal (the paper's: frame 0 and the previous frame) or full (every frame; the
                            paper's ablation); the delta records it and loading it sets it again
    group_norm_scope        video (the official: the resnets' GroupNorm statistics span all frames) or frame (each
                            frame its own, as the 2-D model was trained; docs/reference.md); recorded like frame_policy
    prediction_type, tokenizer_from, config_from, converted_cache_dir
                            for a pretrained_model_path that is one checkpoint file (docs/checkpoints.md): what its
                            tensors cannot tell, and where its converted folder is kept (null: a temporary folder)
    train_data.frames_per_step
                            long clips: each update tunes on this many of the clip's frames, laid out as a window of
                            windowed sampling (frame 0, frame s-1 and a run from a random s; tav.windows), and
                            validation samples in windows of that size (docs/long-videos.md); null: every frame
    validation_data.negative_prompt / eta / fps / format / seed
"""
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tav.checks import SIZE_RULE, WRITE_FORMATS, describe_range, in_range, is_int, is_pixel_size
from tav.kernels import ATTENTION_BACKENDS
from tav.models.attention import FRAME_POLICIES
from tav.models.resnet import GROUP_NORM_SCOPES

MIXED_PRECISIONS = ("no", "fp16", "bf16")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
# A png "video" is a folder of frames: validation's all-prompts grid samples/step-N.png would be the folder
# samples/step-N/ that already holds the per-prompt videos, so validation writes the file formats only.
VALIDATION_FORMATS = tuple(fmt for fmt in WRITE_FORMATS if fmt != "png")
DEFAULT_TRAINABLE_MODULES = ("attn1.to_q", "attn2.to_q", "attn_temp")  # the official set
DEFAULT_LORA_MODULES = ("attn1.to_q", "attn2.to_q")  # LoRA tuning's default: the official projections
# The resolved config a training run writes into its output_dir (beside the delta); sampling reads it back.
RUN_CONFIG_NAME = "config.yaml"


# TrainConfig fields that record where the config came from, not settings: never read from or written to YAML.
NOT_CONFIG_KEYS = ("source", "origins")


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and where it came from (file or command
    line)."""


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
    frames_per_step: Optional[int] = None  # tav's: tune each step on this many of the clip's frames (None: all)


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
    overwrite_output_dir: bool = False
    lora_rank: Optional[int] = None
    lora_modules: List[str] = field(default_factory=lambda: list(DEFAULT_LORA_MODULES))
    lora_alpha: Optional[float] = None
    frame_policy: str = "sparse_causal"  # the frames attn1 attends to (tav.models.attention.FRAME_POLICIES)
    group_norm_scope: str = "video"  # what the UNet's GroupNorm statistics span (tav.models.resnet.GROUP_NORM_SCOPES)
    # A single-file pretrained_model_path (docs/checkpoints.md): what its tensors cannot tell, and where to keep
    # the converted diffusers folder (None: a temporary folder removed at exit). A folder takes none of these.
    prediction_type: Optional[str] = None
    tokenizer_from: Optional[str] = None
    config_from: Optional[str] = None
    converted_cache_dir: Optional[str] = None
    source: str = field(default="<dict>", compare=False)  # the file it came from, for messages
    origins: Optional["_Origins"] = field(default=None, compare=False, repr=False)  # per key: file or command line

    def where(self, key):
        """Where `key`'s value came from, for messages: the YAML file, or the command-line override that set it."""
        return self.origins(key) if self.origins is not None else self.source

    # -- derived values -----------------------------------------------------------------------------------------
    def resolved_attention_backend(self):
        """attention_backend if given, else xformers on -> auto (flash where available), off -> math."""
        if self.attention_backend is not None:
            return self.attention_backend
        return "auto" if self.enable_xformers_memory_efficient_attention else "math"

    def effective_learning_rate(self, ranks=1):
        """learning_rate, times accumulation x batch x data-parallel ranks when scale_lr (as the official's
        accelerate script scales it by its processes)."""
        if self.scale_lr:
            return self.learning_rate * self.gradient_accumulation_steps * self.train_batch_size * ranks
        return self.learning_rate

    def notices(self):
        """One-line notices for official keys that mean something else here."""
        lines = []
        if self.use_8bit_adam:
            lines.append("use_8bit_adam: bitsandbytes has no MindSpore version; training with the standard AdamW")
        if self.lora_rank is not None:
            lines.append(f"lora_rank {self.lora_rank}: training rank-{self.lora_rank} adapters on "
                         f"{', '.join(self.lora_modules)}; trainable_modules ({', '.join(self.trainable_modules)}) "
                         f"is not used")
        return lines

    def to_dict(self):
        out = dataclasses.asdict(self)
        for bookkeeping in NOT_CONFIG_KEYS:
            out.pop(bookkeeping)
        return out

    def to_yaml(self):
        return OmegaConf.to_yaml(OmegaConf.create(self.to_dict()))


# ---------------------------------------------------------------------------------------------------------------
# Loading


def load_train_config(path, overrides=(), base_dir=None):
    """Read a training YAML, apply `key=value` overrides (dotted keys reach into train_data / validation_data),
    validate every key and value, and resolve relative paths against `base_dir` (default: the working directory).
    Raises ConfigError naming the key and where its value came from (the file or the command line)."""
    import yaml

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as handle:
            top = yaml.safe_load(handle)  # OmegaConf reads a lone scalar as a key; look at the top level first
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True) if isinstance(top, dict) else top
    except (OmegaConfBaseException, ValueError, OSError) as exc:  # yaml errors are ValueError subclasses here
        raise ConfigError(f"cannot parse config file {path!r}: {exc}") from None
    except Exception as exc:  # yaml.YAMLError and friends
        raise ConfigError(f"cannot parse config file {path!r}: {type(exc).__name__}: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys (key: value lines) at the top level, got a "
                          f"{type(raw).__name__} ({raw!r:.60})")
    raw, overridden = apply_overrides(raw, overrides), override_keys(overrides)
    return config_from_dict(raw, source=path, base_dir=base_dir, overridden=overridden)


def override_keys(overrides):
    """{dotted key: "key=value" as typed} of the command-line overrides."""
    return {item.split("=", 1)[0].strip(): item for item in overrides or ()}


def apply_overrides(raw, overrides):
    """`raw` with each "a.b=value" applied (value parsed as YAML: 3e-5, true, [a, b] ...)."""
    overrides = list(overrides or ())
    if not overrides:
        return raw
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"command line: override {item!r} must look like key=value (e.g. max_train_steps=300)")
    try:
        dotlist = OmegaConf.to_container(OmegaConf.from_dotlist(overrides), resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"command line: cannot parse overrides {overrides}: {exc}") from None
    merged = dict(raw)
    for key, value in dotlist.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


class _Origins:
    """Where each key's value came from, for messages: the file, or the command-line override that set it."""

    def __init__(self, source, overridden=None):
        self.source, self.overridden = source, dict(overridden or {})

    def __call__(self, key):
        for candidate in (key, key.split(".")[0]):
            if candidate in self.overridden:
                return f"command line ({self.overridden[candidate]})"
        return self.source

    def fail(self, key, expected, value):
        raise ConfigError(f"{self(key)}: {key} must be {expected}, got {value!r}")


def config_from_dict(raw, source="<dict>", base_dir=None, overridden=None):
    """Validate a plain dict (as read from YAML) into a TrainConfig; see load_train_config. `overridden` maps the
    dotted keys set on the command line to the override as typed (their errors name it, not the file)."""
    origin = _Origins(source, overridden)
    raw = from_loveu_schema(dict(raw), origin)
    _reject_unknown(raw, _known_fields(TrainConfig) - set(NOT_CONFIG_KEYS), "", origin)
    for required in ("pretrained_model_path", "output_dir", "train_data", "validation_data"):
        if raw.get(required) is None:
            raise ConfigError(f"{source}: required key {required!r} is missing")

    train_data = _section(raw["train_data"], TrainData, "train_data", origin)
    validation_data = _section(raw["validation_data"], ValidationData, "validation_data", origin)
    values = {k: v for k, v in raw.items() if k not in ("train_data", "validation_data")}
    if values.get("mixed_precision") is False:  # YAML 1.1 reads the official value `no` as false
        values["mixed_precision"] = "no"
    kinds = _field_kinds(TrainConfig)
    checked = {f.name: _check_value(f.name, values[f.name], kinds[f.name], origin)
               for f in dataclasses.fields(TrainConfig) if f.name in values}
    config = TrainConfig(train_data=train_data, validation_data=validation_data, source=source, origins=origin,
                         **checked)
    _check_ranges(config, origin)
    _resolve_paths(config, base_dir)
    return config


# The LOVEU baseline's train_data keys -> the official ones (the same meaning; its loader's defaults are 32 and 1).
LOVEU_TRAIN_DATA_KEYS = {"num_frames": "n_sample_frames", "frame_rate": "sample_frame_rate"}
LOVEU_FRAME_EXTENSIONS = ("jpg", "jpeg", "png")


def from_loveu_schema(raw, origin):
    """`raw` with the LOVEU-TGVE baseline's keys (module docstring) rewritten to the official schema; a config in the
    official schema comes back unchanged. Raises ConfigError naming the key and what was expected."""
    train_data, validation_data = raw.get("train_data"), raw.get("validation_data")
    if isinstance(train_data, dict):
        train_data = dict(train_data)
        for loveu_key, official_key in LOVEU_TRAIN_DATA_KEYS.items():
            if loveu_key not in train_data:
                continue
            if official_key in train_data:
                raise ConfigError(f"{origin('train_data.' + loveu_key)}: train_data.{loveu_key} (the LOVEU baseline's "
                                  f"name) and train_data.{official_key} (the official name) both given; keep one")
            train_data[official_key] = train_data.pop(loveu_key)
        if "ext" in train_data:
            ext = train_data.pop("ext")
            if not isinstance(ext, str) or ext.lower().lstrip(".") not in LOVEU_FRAME_EXTENSIONS:
                raise ConfigError(f"{origin('train_data.ext')}: train_data.ext must be one of "
                                  f"{', '.join(LOVEU_FRAME_EXTENSIONS)} (the frame images' extension), got {ext!r}")
            path = train_data.get("video_path")
            if isinstance(path, str) and os.path.isfile(os.path.expanduser(path)):
                raise ConfigError(f"{origin('train_data.ext')}: train_data.ext ({ext!r}) names the extension of frame "
                                  f"images, but train_data.video_path {path!r} is a file; expected a folder of frames")
        raw["train_data"] = train_data
    if isinstance(validation_data, dict) and isinstance(validation_data.get("prompts"), dict):
        validation_data = dict(validation_data)
        prompts = validation_data["prompts"]
        bad = [str(kind) for kind, prompt in prompts.items() if not isinstance(prompt, str) or not prompt.strip()]
        if bad or not prompts:
            where = origin("validation_data.prompts" + (f".{bad[0]}" if bad else ""))
            raise ConfigError(f"{where}: validation_data.prompts as a mapping must map "
                              f"each edit type to a non-empty prompt string; "
                              f"{'empty mapping' if not prompts else 'not a prompt: ' + ', '.join(bad)}")
        validation_data["prompts"] = list(prompts.values())
        raw["validation_data"] = validation_data
    return raw


def _known_fields(cls):
    return {f.name for f in dataclasses.fields(cls)}


def _reject_unknown(raw, known, prefix, origin):
    unknown = sorted(str(k) for k in raw if k not in known)
    if unknown:
        key = prefix + unknown[0]
        more = f" (and {', '.join(prefix + k for k in unknown[1:])})" if len(unknown) > 1 else ""
        raise ConfigError(
            f"{origin(key)}: unknown key {key!r}{more}; known keys{' of ' + prefix[:-1] if prefix else ''}: "
            f"{', '.join(sorted(known))}"
        )


def _section(raw, cls, name, origin):
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin(name)}: {name} must be a mapping of keys, got {raw!r}")
    _reject_unknown(raw, _known_fields(cls), name + ".", origin)
    kinds = _field_kinds(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            values[f.name] = _check_value(f"{name}.{f.name}", raw[f.name], kinds[f.name], origin)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{origin.source}: required key {name}.{f.name} is missing")
    return cls(**values)


def _field_kinds(cls):
    """{field: (type, nullable)} from the dataclass annotations: int, float, bool, str or list (of str)."""
    kinds = {}
    for name, hint in typing.get_type_hints(cls).items():
        nullable = typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)
        if nullable:
            hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
        kinds[name] = (typing.get_origin(hint) or hint, nullable)
    return kinds


def _check_value(key, value, kind, origin):
    kind, nullable = kind
    if value is None:
        if nullable:
            return None
        raise ConfigError(f"{origin(key)}: {key} must not be null")

    def fail(expected):
        origin.fail(key, expected, value)

    if kind is bool:
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if kind is int:
        if not is_int(value):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            fail("an integer")
        return int(value)
    if kind is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-5" (no dot) as a string; accept what it means
            try:
                value = float(value)
            except ValueError:
                fail("a number")
        if not in_range(value):
            fail("a finite number")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            fail("a string")
        return value
    if kind is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            fail("a list of strings")
        return list(value)
    raise AssertionError(f"{key}: no check for {kind}")


# Finite ranges of the numeric keys: key -> in_range arguments (low, high, low_open, high_open).
_RANGES = {
    "validation_steps": (1,), "train_batch_size": (1,), "max_train_steps": (1,), "gradient_accumulation_steps": (1,),
    "checkpointing_steps": (1,), "lr_warmup_steps": (0,),
    "learning_rate": (0, None, True), "adam_beta1": (0, 1, False, True), "adam_beta2": (0, 1, False, True),
    "adam_weight_decay": (0,), "adam_epsilon": (0, None, True), "max_grad_norm": (0, None, True),
    "train_data.n_sample_frames": (1,), "train_data.sample_start_idx": (0,), "train_data.sample_frame_rate": (1,),
    "train_data.frames_per_step": (3,),
    "validation_data.video_length": (1,), "validation_data.num_inference_steps": (1,),
    "validation_data.num_inv_steps": (1,), "validation_data.guidance_scale": (),
    "validation_data.eta": (0, 1), "validation_data.fps": (0, None, True),
    "lora_rank": (1, 1024), "lora_alpha": (0, None, True),
}


def _get(config, key):
    value = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _check_ranges(config, origin):
    def need(ok, key, expected, value):
        if not ok:
            origin.fail(key, expected, value)

    for key, bounds in _RANGES.items():
        value = _get(config, key)
        if value is None:  # nullable keys (validation_data.video_length): "as the training clip"
            continue
        low, high, low_open, high_open = (tuple(bounds) + (None, None, False, False)[len(bounds):])
        if not in_range(value, low, high, low_open, high_open):
            integer = is_int(value) and low is not None and high is None and not low_open
            need(False, key, "0 or more" if integer and low == 0 else f"at least {low}" if integer else
                 describe_range(low, high, low_open, high_open), value)
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
    need(config.frame_policy in FRAME_POLICIES, "frame_policy", f"one of {', '.join(FRAME_POLICIES)}",
         config.frame_policy)
    need(config.group_norm_scope in GROUP_NORM_SCOPES, "group_norm_scope", f"one of {', '.join(GROUP_NORM_SCOPES)}",
         config.group_norm_scope)
    need(config.mode in (0, 1), "mode", "0 (graph) or 1 (pynative)", config.mode)
    need(config.jit_level in (None, "O0", "O1", "O2"), "jit_level", "O0, O1 or O2", config.jit_level)
    need(config.checkpoints_total_limit is None or config.checkpoints_total_limit >= 1, "checkpoints_total_limit",
         "at least 1 (or null)", config.checkpoints_total_limit)
    need(not (config.overwrite_output_dir and config.resume_from_checkpoint), "overwrite_output_dir",
         "false when resume_from_checkpoint is set (resume continues the run in output_dir, overwrite deletes it)",
         config.overwrite_output_dir)

    data = config.train_data
    for key in ("width", "height"):
        need(is_pixel_size(getattr(data, key)), f"train_data.{key}", SIZE_RULE, getattr(data, key))
    need(bool(data.prompt.strip()), "train_data.prompt", "a non-empty string", data.prompt)
    need(data.frames_per_step is None or data.frames_per_step <= data.n_sample_frames, "train_data.frames_per_step",
         f"at most train_data.n_sample_frames ({data.n_sample_frames}), or null for all of them",
         data.frames_per_step)

    val = config.validation_data
    for key in ("width", "height"):
        value = getattr(val, key)
        need(value is None or is_pixel_size(value), f"validation_data.{key}", SIZE_RULE, value)
    need(val.format in VALIDATION_FORMATS, "validation_data.format", f"one of {', '.join(VALIDATION_FORMATS)}",
         val.format)
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
    for key in ("tokenizer_from", "config_from", "converted_cache_dir"):
        if getattr(config, key) is not None:
            setattr(config, key, resolve(getattr(config, key)))
    config.train_data.video_path = resolve(config.train_data.video_path)
    if config.resume_from_checkpoint not in (None, "latest"):
        config.resume_from_checkpoint = resolve(config.resume_from_checkpoint)


def check_input_paths(config):
    """Raise ConfigError naming the key when the base model folder or the training clip does not exist."""
    for key, path, want in (
        ("pretrained_model_path", config.pretrained_model_path,
         "a Stable Diffusion pipeline folder or one checkpoint file"),
        ("train_data.video_path", config.train_data.video_path, "a video file (or a folder of frames)"),
    ):
        if not os.path.exists(path):
            raise ConfigError(f"{config.where(key)}: {key} points to {path!r}, which does not exist (expected {want})")
