"""Sampling as a job: validate a request, load the pipeline, invert the source clip (cached) or draw noise,
sample every prompt, write the videos. tools/sample.py is a thin argument parser over `run_sampling`."""
import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from typing import List, Optional


from tav import video as video_io
from tav.checks import SIZE_RULE, describe_range, in_range, is_int, is_pixel_size
from tav.evaluation import METRICS, Scorers, format_table, score_videos, write_scores
from tav.ldm_checkpoint import check_pretrained_source
from tav.lora import parse_lora_spec
from tav.pipeline import (PipelineError, TuneAVideoPipeline, default_pixel_size, invert_video, load_inverted_latents,
                          resolve_dtype)
from tav.windows import WindowError, WindowSpec, check_window, default_overlap

logger = logging.getLogger(__name__)
OUTPUT_FORMATS = video_io.WRITE_FORMATS
NO_PROMPT = "no prompt given: pass --prompt (repeatable) or --prompts_file"

# The finite range of every numeric option: (name, integer?, in_range keywords). Guidance 0 is unconditional
# sampling and 1 the conditional prediction alone; eta blends DDIM (0) into DDPM-like sampling (1).
NUMERIC_OPTIONS = (
    ("video_length", True, dict(low=1)),
    ("num_inference_steps", True, dict(low=1)),
    ("num_inv_steps", True, dict(low=1)),
    ("num_videos_per_prompt", True, dict(low=1)),
    ("sample_start_idx", True, dict(low=0)),
    ("sample_frame_rate", True, dict(low=1)),
    ("seed", True, dict(low=0)),
    ("fps", False, dict(low=0, low_open=True)),
    ("guidance_scale", False, dict(low=0)),
    ("eta", False, dict(low=0, high=1)),
)
# read_video_frames' argument names as this request's options, so a clip error names what the user typed.
VIDEO_OPTION_NAMES = {"n_sample_frames": "--video_length", "sample_start_idx": "--sample_start_idx",
                      "sample_frame_rate": "--sample_frame_rate", "height": "--height", "width": "--width"}


def check_prompts(prompts):
    """At least one prompt, none of them blank; a blank one is named by its position (1-based)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise PipelineError(NO_PROMPT)
    for position, prompt in enumerate(prompts, 1):
        if not isinstance(prompt, str) or not prompt.strip():
            what = "blank" if isinstance(prompt, str) else "not text"
            raise PipelineError(f"prompt {position} of {len(prompts)} is {what} ({prompt!r}); every prompt needs "
                                "some text")


@dataclass
class SampleRequest:
    pretrained_model_path: str
    prompts: List[str] = field(default_factory=list)  # empty: validate() says "no prompt given"
    output_dir: str = "outputs/samples"
    unet: Optional[str] = None
    video: Optional[str] = None
    source_prompt: str = ""
    invert_with_source_prompt: bool = False
    inv_latents: Optional[str] = None
    video_length: int = 8
    height: Optional[int] = None  # None: the base model's size (tav.pipeline.default_pixel_size)
    width: Optional[int] = None
    sample_start_idx: int = 0
    sample_frame_rate: int = 1
    num_inference_steps: int = 50
    num_inv_steps: int = 50
    guidance_scale: float = 12.5
    negative_prompt: Optional[str] = None
    num_videos_per_prompt: int = 1
    eta: float = 0.0
    seed: int = 33
    fmt: List[str] = field(default_factory=lambda: ["gif"])
    fps: int = 8
    dtype: str = "fp32"
    attention: str = "auto"
    cache_dir: Optional[str] = None
    progress: bool = True
    check_base: bool = True  # False: apply a delta even when the base weights' fingerprint differs
    window: Optional[int] = None  # frames per UNet call (docs/long-videos.md); None: one pass over all frames
    window_overlap: Optional[int] = None  # frames shared by neighbouring windows; default window // 3
    # A single-file --pretrained_model_path (docs/checkpoints.md): what its tensors cannot tell, and where the
    # converted folder is kept (None: a temporary folder).
    prediction_type: Optional[str] = None
    tokenizer_from: Optional[str] = None
    config_from: Optional[str] = None
    converted_cache_dir: Optional[str] = None
    loras: List[str] = field(default_factory=list)  # PATH[:SCALE], fused in order after the UNet (and delta) load
    # Score every written video (docs/evaluation.md): CLIP folder for the two CLIP metrics, PickScore folder.
    eval_clip_model: Optional[str] = None
    pickscore_model: Optional[str] = None
    pickscore_processor: Optional[str] = None

    def __post_init__(self):
        for name in ("height", "width"):
            if getattr(self, name) is None:
                setattr(self, name, default_pixel_size(self.pretrained_model_path))

    def check_options(self):
        """The values alone (prompts, numbers, sizes, formats, dtype), before any file is read or written."""
        check_prompts(self.prompts)
        for name, integer, bounds in NUMERIC_OPTIONS:  # cheap value checks before any file is touched
            value = getattr(self, name)
            if (integer and not is_int(value)) or not in_range(value, **bounds):
                rule = describe_range(**bounds).replace("a finite number", "an integer" if integer else "a finite number")
                raise PipelineError(f"--{name} must be {rule}, got {value!r}")
        for name in ("height", "width"):
            if not is_pixel_size(getattr(self, name)):
                raise PipelineError(f"--{name} must be {SIZE_RULE}, got {getattr(self, name)!r}")
        if not self.fmt:
            raise PipelineError(f"no --format given; use one or more of {', '.join(OUTPUT_FORMATS)}")
        unknown = [f for f in self.fmt if f not in OUTPUT_FORMATS]
        if unknown:
            raise PipelineError(f"--format {unknown[0]!r} unknown; use one of {', '.join(OUTPUT_FORMATS)}")
        resolve_dtype(self.dtype)
        self.window_spec()
        return self

    def window_spec(self):
        """The WindowSpec of --window/--window_overlap (overlap window // 3, at most window - 3, unless given)."""
        if self.window is None:
            if self.window_overlap is not None:
                raise PipelineError(f"--window_overlap {self.window_overlap!r} needs --window (frames per window)")
            return None
        overlap = self.window_overlap
        if overlap is None and is_int(self.window):
            overlap = default_overlap(self.window)
        try:
            check_window(self.window, overlap, "--window", "--window_overlap")
        except WindowError as exc:
            raise PipelineError(str(exc)) from None
        return WindowSpec(self.window, overlap)

    def validate(self):
        """Everything that can be checked before loading a model; errors name the option."""
        self.check_options()
        check_pretrained_source(self.pretrained_model_path, self.prediction_type, self.tokenizer_from,
                                self.config_from)
        self.check_loras()
        self.check_scoring_models()
        if self.unet is not None and not os.path.exists(self.unet):
            raise FileNotFoundError(f"--unet {self.unet!r} does not exist")
        if self.video is not None and self.inv_latents is not None:
            raise PipelineError("give either --video (to invert) or --inv_latents, not both")
        if self.video is not None and not os.path.isfile(self.video):
            raise video_io.VideoError(f"--video {self.video!r} does not exist")
        if self.inv_latents is not None and not os.path.isfile(self.inv_latents):
            raise FileNotFoundError(f"--inv_latents {self.inv_latents!r} does not exist")
        video_io.check_writable_dir(self.output_dir)
        if self.video is not None:  # decode now: a bad clip fails before any model is loaded
            video_io.read_video_frames(self.video, self.video_length, self.sample_start_idx, self.sample_frame_rate,
                                       self.height, self.width, option_names=VIDEO_OPTION_NAMES)
        return self


    def check_loras(self):
        for spec in self.loras:
            path, scale = parse_lora_spec(spec)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"--lora {spec!r}: file {path!r} does not exist (expected PATH[:SCALE])")
            if not in_range(scale):
                raise PipelineError(f"--lora {spec!r}: the scale must be a finite number, got {scale!r}")

    def check_scoring_models(self):
        if self.pickscore_processor is not None and self.pickscore_model is None:
            raise PipelineError(f"--pickscore_processor {self.pickscore_processor!r} needs --pickscore_model")
        for option, folder in (("--eval_clip_model", self.eval_clip_model), ("--pickscore_model", self.pickscore_model),
                               ("--pickscore_processor", self.pickscore_processor)):
            if folder is not None and not os.path.isfile(os.path.join(folder, "config.json")):
                raise FileNotFoundError(f"{option} {folder!r} is not a transformers CLIP folder (no config.json)")

    def scores_requested(self):
        return self.eval_clip_model is not None or self.pickscore_model is not None


# The denoising settings of a config's validation_data, by the names they have there and in a SampleRequest.
VALIDATION_SAMPLING_FIELDS = ("num_inference_steps", "num_inv_steps", "guidance_scale")


def tuned_run_defaults(unet):
    """The DDIM steps, inversion steps and guidance scale that the training run of the delta `unet` validated with:
    when `unet` is a file (or a tuned folder) whose folder holds the run's resolved config (config.yaml, written
    by tav.training.train), {request field: value} from its validation_data; {} when there is none. A model
    tuned for a small world may need other settings than the official 50 steps at guidance 12.5, and its run
    recorded them. A config there that does not load is reported and ignored: it must not stop sampling."""
    from tav.config import RUN_CONFIG_NAME, ConfigError, load_train_config

    if not unet:
        return {}
    folder = unet if os.path.isdir(unet) else os.path.dirname(os.path.abspath(unet))
    path = os.path.join(folder, RUN_CONFIG_NAME)
    if not os.path.isfile(path):
        return {}
    try:
        validation = load_train_config(path).validation_data
    except (ConfigError, OSError, ValueError) as exc:
        logger.warning("ignoring the run config beside the delta, %s: %s", path, exc)
        return {}
    return {name: getattr(validation, name) for name in VALIDATION_SAMPLING_FIELDS}


def request_from_config(config_path, **overrides):
    """A SampleRequest from an official Tune-A-Video training YAML: its validation_data, the training clip and
    prompt (for inversion), the base model and the seed. `overrides` (non-None values) win."""
    from tav.config import load_train_config

    cfg = load_train_config(config_path)
    val, train = cfg.validation_data, cfg.train_data
    values = dict(
        pretrained_model_path=cfg.pretrained_model_path,
        prompts=list(val.prompts),
        output_dir=os.path.join(cfg.output_dir, "samples"),
        video=train.video_path if val.use_inv_latent else None,
        source_prompt=train.prompt,
        video_length=val.video_length, height=val.height, width=val.width,
        sample_start_idx=train.sample_start_idx, sample_frame_rate=train.sample_frame_rate,
        seed=cfg.seed if cfg.seed is not None else 33,
        **{name: getattr(val, name) for name in VALIDATION_SAMPLING_FIELDS},
    )
    values.update({k: v for k, v in overrides.items() if v is not None})
    return SampleRequest(**values)


def run_sampling(request, pipeline=None, step_callback=None):
    """Serve a SampleRequest; returns the list of written files. A prebuilt `pipeline` skips loading.
    `step_callback(phase, step, total)` runs after every DDIM step: phase "inversion", then "prompt k/N" (1-based)."""
    request.validate()
    started = time.time()
    if pipeline is None:
        # init_seed: an untuned base model's fresh temporal layers are drawn from the request's seed too.
        pipeline = TuneAVideoPipeline.from_pretrained(request.pretrained_model_path, unet=request.unet,
                                                      dtype=request.dtype, attention_backend=request.attention,
                                                      check_base=request.check_base, init_seed=request.seed,
                                                      prediction_type=request.prediction_type,
                                                      tokenizer_from=request.tokenizer_from,
                                                      config_from=request.config_from,
                                                      converted_cache_dir=request.converted_cache_dir)
    for report in pipeline.fuse_loras(request.loras):
        logger.info("LoRA %s", report.describe())
    latents = None
    if request.video is not None:
        inversion_prompt = request.source_prompt if request.invert_with_source_prompt else ""
        latents, cached = invert_video(
            pipeline, request.video, request.video_length, request.height, request.width, request.num_inv_steps,
            start=request.sample_start_idx, stride=request.sample_frame_rate, prompt=inversion_prompt,
            seed=request.seed, cache_dir=request.cache_dir or os.path.join(request.output_dir, "inv_latents"),
            progress=request.progress, window=request.window_spec(),
            callback=None if step_callback is None else
            (lambda i, t, x: step_callback("inversion", i + 1, request.num_inv_steps)))
        logger.info("inverted latents: %s", cached)
    elif request.inv_latents is not None:
        latents = load_inverted_latents(request.inv_latents)
    if latents is not None:
        pipeline.check_request(request.prompts, request.video_length, request.height, request.width, latents, 1)

    written, prompt_of = [], {}
    for p, prompt in enumerate(request.prompts):
        on_step = None
        if step_callback is not None:
            def on_step(index, i, t, x, phase=f"prompt {p + 1}/{len(request.prompts)}"):
                step_callback(phase, i + 1, request.num_inference_steps)
        videos = pipeline(prompt, request.video_length, request.height, request.width, request.num_inference_steps,
                          request.guidance_scale, request.negative_prompt, request.num_videos_per_prompt,
                          request.eta, latents=latents, seed=request.seed + p * request.num_videos_per_prompt,
                          progress=request.progress, window=request.window_spec(), callback=on_step)
        paths = video_io.write_prompt_videos(videos, prompt, request.output_dir, request.fmt, request.fps)
        prompt_of.update({path: prompt for path in paths})
        written += paths
    logger.info("sampled %d prompt(s) in %.1f s", len(request.prompts), time.time() - started)
    if request.scores_requested():
        written.append(score_samples(request, [(path, prompt_of[path]) for path in written]))
    return written


SCORES_FILE = "scores.json"


def score_samples(request, videos):
    """Score [(path, prompt)] with the request's CLIP / PickScore models as the LOVEU-TGVE benchmark does (every
    written file: a gif, an mp4 and a png folder of one video each count, as each is what a reader of that file
    sees), log the table and write OUTPUT_DIR/scores.json: {"videos": {name: {"prompt", metrics...}}, "mean":
    {metric: mean over the videos}}. Returns the json's path."""
    scorers = Scorers.load(request.eval_clip_model, request.pickscore_model, request.pickscore_processor)
    scored = score_videos(videos, scorers)
    names = [os.path.relpath(path, request.output_dir) for path, _ in scored]
    mean = {key: float(sum(s[key] for _, s in scored) / len(scored)) for key in METRICS if key in scored[0][1]}
    rows = list(zip(names, (s for _, s in scored))) + ([("mean", mean)] if len(scored) > 1 else [])
    logger.info("scores:\n%s", format_table(rows))
    path = os.path.join(request.output_dir, SCORES_FILE)
    write_scores({"videos": {name: {"prompt": prompt, **scores}
                             for name, (_, prompt), (_, scores) in zip(names, videos, scored)},
                  "mean": mean}, path)
    return path


def request_fields():
    return {f.name for f in dataclasses.fields(SampleRequest)}
