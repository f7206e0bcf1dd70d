"""The web app's jobs (tools/app.py): tune on an uploaded clip, edit it with the tuned model, score the edits.
Plain functions of a work folder, with no Gradio in them: tav.app_ui builds the page over them and the tests call
them directly.

    work_dir/clips/<sha>.mp4          each uploaded clip, named by its content (the inversion cache key stays put)
    work_dir/base/<name>/             the embedded base model, written on first use
    work_dir/models/<name>/           one tuning run (tav.training.train's output_dir: unet_delta.safetensors,
                                      config.yaml, train.log) and its edits/<stamp>/
    work_dir/inversions/              inverted latents, one per clip + tuned model + sampling (tav.pipeline)

The method is the whole Tune-A-Video: tune the UNet on the clip, DDIM-invert the clip with the tuned model, sample
each prompt from the inverted latents (tav.generate.run_sampling with --video). Bad input raises tav's own input
errors (tav.cli.USER_ERRORS), so the page shows the line the CLI prints, before any model is loaded.
"""
import dataclasses
import hashlib
import os
import re
import shutil
import threading
import time
import zipfile
from typing import List, Optional

import numpy as np

from tav import video as video_io
from tav.checkpoint import read_json, write_file_atomic, write_json_atomic

# The embedded bases: the trained world model when it ships, else the tiny random one (its videos are noise).
WORLD_BASE = "world model (embedded)"
TINY_BASE = "tiny random model (embedded)"
# The bundled clip: a red square of the synthetic world (tav.world), which the world model was trained on.
BUNDLED_CLIP = "world: a red square moving (16 frames)"
BUNDLED_PROMPT = "a red square on a white background"
EDIT_FORMATS = ("gif", "mp4", "png")  # png: a folder of frames, offered zipped
DELTA_NAME = "unet_delta.safetensors"
# read_video_frames' argument names as the Tune form labels them, so a clip error names the field to change.
FORM_NAMES = {"n_sample_frames": "frames", "sample_frame_rate": "stride", "sample_start_idx": "start frame",
              "height": "size", "width": "size"}
RECORD_NAME = "edits.json"  # what an edit run wrote, per prompt (what Evaluate scores)


class JobCancelled(Exception):
    """The user pressed Cancel; the run stops after its current step."""


@dataclasses.dataclass
class TuneSettings:
    video: str  # an uploaded file (any path) or BUNDLED_CLIP
    prompt: str
    base_model: str = ""  # a diffusers folder, one checkpoint file, WORLD_BASE or TINY_BASE; "" = the default
    n_frames: int = 8
    stride: int = 1
    start: int = 0
    size: int = 64
    steps: int = 20
    learning_rate: float = 3e-4
    seed: int = 33


@dataclasses.dataclass
class EditSettings:
    model: str  # a tuned model's name (list_tuned_models)
    prompts: List[str]
    negative_prompt: Optional[str] = None
    guidance_scale: float = 7.5
    steps: int = 20
    seed: int = 33
    window: Optional[int] = None
    window_overlap: Optional[int] = None


@dataclasses.dataclass
class TunedModel:
    name: str
    folder: str
    delta: str
    config: object  # its TrainConfig, as recorded in config.yaml

    def describe(self):
        data = self.config.train_data
        return (f"{self.name}: \"{data.prompt}\", {data.n_sample_frames} frames (stride {data.sample_frame_rate}) "
                f"at {data.width}x{data.height}, {self.config.max_train_steps} steps, base "
                f"{os.path.basename(self.config.pretrained_model_path.rstrip(os.sep))}")


@dataclasses.dataclass
class EditOutput:
    prompt: str
    gif: str
    mp4: str
    frames_zip: str
    grid: str  # source | edit, frame for frame (gif)
    scores: dict = dataclasses.field(default_factory=dict)


class JobProgress:
    """What a running job reports to the page: its state, the (step, loss, seconds) of every update, a message,
    and the cancel flag the training callback checks after every step."""

    def __init__(self, total_steps=0):
        self.total_steps = total_steps
        self.steps = []
        self.state = "queued"
        self.message = ""
        self.started = time.time()
        self._cancel = threading.Event()
        self._lock = threading.Lock()

    def cancel(self):
        self._cancel.set()

    @property
    def cancelled(self):
        return self._cancel.is_set()

    def record(self, step, loss, seconds):
        with self._lock:
            self.steps.append((int(step), float(loss), float(seconds)))

    def snapshot(self):
        with self._lock:
            return list(self.steps)

    def summary(self):
        """One line: the step, the loss, the seconds per step (the mean of the last five), or the state."""
        steps = self.snapshot()
        if not steps:
            return f"{self.state}{': ' + self.message if self.message else ''}"
        step, loss, _ = steps[-1]
        recent = [seconds for _, _, seconds in steps[-5:]]
        line = f"step {step}/{self.total_steps}, loss {loss:.4f}, {sum(recent) / len(recent):.2f} s/step"
        return f"{self.state}: {line}{' - ' + self.message if self.message else ''}"


# ---------------------------------------------------------------------------------------------------------------
# Inputs: the base model and the clip


def base_model_choices():
    """The embedded base the app offers: the world model when its asset ships, else the tiny random model."""
    from tav.world_model import ASSET_DIR

    return [WORLD_BASE] if os.path.isfile(os.path.join(ASSET_DIR, "model_index.json")) else [TINY_BASE]


def resolve_base_model(choice, work_dir):
    """The diffusers folder of `choice`: an embedded base (written under work_dir/base/ on first use), a folder,
    or one checkpoint file (converted once under work_dir/base/converted/)."""
    choice = (choice or "").strip() or base_model_choices()[0]
    if choice == WORLD_BASE:
        from tav.world_model import write_world_pipeline

        folder = os.path.join(work_dir, "base", "world-sd")
        if not os.path.isfile(os.path.join(folder, "model_index.json")):
            write_world_pipeline(folder)
        return os.path.abspath(folder)
    if choice == TINY_BASE:
        from tav.tiny import ensure_tiny_pipeline

        folder = os.path.join(work_dir, "base", "tiny-sd")
        ensure_tiny_pipeline(folder)
        return os.path.abspath(folder)
    from tav.ldm_checkpoint import resolve_pretrained
    from tav.pipeline import check_pipeline_folder

    folder = resolve_pretrained(choice, cache_dir=os.path.join(work_dir, "base", "converted"))
    check_pipeline_folder(folder)
    return os.path.abspath(folder)


def bundled_clip(work_dir):
    """The bundled clip (tav.world's red square, 16 frames at 64x64), written once under work_dir/clips/."""
    from tav.world_demo import demo_clip, write_clip

    path = os.path.join(work_dir, "clips", "bundled-world-red-square.mp4")
    if not os.path.isfile(path):
        write_clip(demo_clip(seed=0, n_frames=16), path)
    return os.path.abspath(path)


def store_clip(path, work_dir):
    """Copy an uploaded clip to work_dir/clips/<content hash><ext>: the same upload gets the same path (and so the
    same inversion), whatever temporary name the browser's upload had."""
    if path == BUNDLED_CLIP:
        return bundled_clip(work_dir)
    if not path or not os.path.isfile(path):
        raise video_io.VideoError(f"video {path!r}: no file uploaded (choose a clip or the bundled one)")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    stored = os.path.join(work_dir, "clips", digest.hexdigest()[:16] + os.path.splitext(path)[1].lower())
    if not os.path.isfile(stored):
        os.makedirs(os.path.dirname(stored), exist_ok=True)
        write_file_atomic(stored, lambda tmp: shutil.copyfile(path, tmp))
    return os.path.abspath(stored)


def model_name(prompt, stamp=None):
    """A tuned model's folder name: the time and the caption's first words."""
    words = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40].strip("-") or "clip"
    return f"{stamp or time.strftime('%Y%m%d-%H%M%S')}-{words}"


# ---------------------------------------------------------------------------------------------------------------
# Tune


def tune_config(settings, work_dir, name=None):
    """The TrainConfig of a Tune form, checked the way tools/train.py checks a YAML (tav.config) and with the clip
    decoded (tav.video), so a bad value or upload is refused before anything is loaded. The clip is stored first;
    the base model is written or converted when it is an embedded one or a single file."""
    from tav.config import config_from_dict

    video = store_clip(settings.video, work_dir)
    raw = dict(
        pretrained_model_path=resolve_base_model(settings.base_model, work_dir),
        output_dir=os.path.join(os.path.abspath(work_dir), "models", name or model_name(settings.prompt)),
        train_data=dict(video_path=video, prompt=settings.prompt, n_sample_frames=settings.n_frames,
                        sample_start_idx=settings.start, sample_frame_rate=settings.stride,
                        height=settings.size, width=settings.size),
        validation_data=dict(prompts=[]),  # the Edit tab samples, with the delta
        max_train_steps=settings.steps, learning_rate=settings.learning_rate, seed=settings.seed,
        checkpointing_steps=max(1, settings.steps), validation_steps=max(1, settings.steps),
        checkpoints_total_limit=1, mixed_precision="no", gradient_checkpointing=False,
    )
    config = config_from_dict(raw, source="the Tune form")
    data = config.train_data
    try:
        video_io.read_video_frames(data.video_path, data.n_sample_frames, data.sample_start_idx,
                                   data.sample_frame_rate, data.height, data.width, option_names=FORM_NAMES)
    except video_io.VideoError as exc:  # name the file the user uploaded, not its stored copy
        raise video_io.VideoError(str(exc).replace(video, os.path.basename(settings.video))) from None
    return config


def run_tune(config, progress=None):
    """tav.training.train on a tune_config; `progress` (JobProgress) gets every step and may cancel, in which case
    the partial run is removed (no half-tuned model in the list) and JobCancelled is raised."""
    from tav.training import train

    progress = progress or JobProgress()
    progress.total_steps, progress.state = config.max_train_steps, "tuning"
    last = [time.perf_counter()]

    def on_step(step, loss):
        now = time.perf_counter()
        progress.record(step, loss, now - last[0])
        last[0] = now
        if progress.cancelled:
            raise JobCancelled(f"cancelled at step {step}")

    try:
        result = train(config, step_callback=on_step)
    except JobCancelled:
        shutil.rmtree(config.output_dir, ignore_errors=True)
        progress.state = "cancelled"
        raise
    progress.state = "done"
    return result


def list_tuned_models(work_dir):
    """Every finished tuning run under work_dir/models/ (a delta and its config.yaml), newest first."""
    from tav.config import ConfigError, load_train_config

    root = os.path.join(work_dir, "models")
    models = []
    for name in sorted(os.listdir(root), reverse=True) if os.path.isdir(root) else []:
        folder = os.path.join(root, name)
        delta, config_path = os.path.join(folder, DELTA_NAME), os.path.join(folder, "config.yaml")
        if os.path.isfile(delta) and os.path.isfile(config_path):
            try:
                models.append(TunedModel(name, folder, delta, load_train_config(config_path)))
            except ConfigError:
                continue  # a run whose config no longer validates is not offered
    return models


def find_tuned_model(name, work_dir):
    for model in list_tuned_models(work_dir):
        if model.name == name:
            return model
    raise FileNotFoundError(f"tuned model {name!r} not found under {os.path.join(work_dir, 'models')}; tune one first")


# ---------------------------------------------------------------------------------------------------------------
# Edit


def split_prompts(text):
    """One prompt per line of the Edit form, blank lines dropped."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def edit_request(settings, work_dir, stamp=None):
    """The SampleRequest of an Edit form: the tuned model's base + delta, its clip and sampling to invert, the
    form's prompts and steps; inversions cached in work_dir/inversions/ (one per clip + model + sampling)."""
    from tav.generate import SampleRequest

    model = find_tuned_model(settings.model, work_dir)
    data = model.config.train_data
    request = SampleRequest(
        pretrained_model_path=model.config.pretrained_model_path, unet=model.delta, prompts=list(settings.prompts),
        output_dir=os.path.join(model.folder, "edits", stamp or time.strftime("%Y%m%d-%H%M%S")),
        video=data.video_path, source_prompt=data.prompt, video_length=data.n_sample_frames, height=data.height,
        width=data.width, sample_start_idx=data.sample_start_idx, sample_frame_rate=data.sample_frame_rate,
        num_inference_steps=settings.steps, num_inv_steps=settings.steps, guidance_scale=settings.guidance_scale,
        negative_prompt=settings.negative_prompt or None, seed=settings.seed, fmt=list(EDIT_FORMATS),
        cache_dir=os.path.join(os.path.abspath(work_dir), "inversions"), progress=False, window=settings.window,
        window_overlap=settings.window_overlap)
    return request.validate()


def source_edit_grid(source_frames, edit_frames, path, fps=8, gap=2):
    """A gif of the source and the edit side by side, frame for frame, with a white gap between."""
    frames, height = len(edit_frames), edit_frames.shape[1]
    spacer = np.full((frames, height, gap, 3), 255, np.uint8)
    return str(video_io.write_video(np.concatenate([source_frames[:frames], spacer, edit_frames], axis=2), path,
                                    fps=fps, fmt="gif"))


def zip_folder(folder, path):
    """`folder`'s files as a zip at `path`, written atomically."""
    def write_zip(tmp):
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
            for name in sorted(os.listdir(folder)):
                archive.write(os.path.join(folder, name), name)

    write_file_atomic(path, write_zip)
    return str(path)


def run_edit(request, scorers=None, progress=None):
    """Invert the clip (or reuse the cached inversion), sample every prompt (tav.generate.run_sampling), then per
    prompt the source|edit grid and the frames zip; scored when `scorers` (tav.evaluation.Scorers) are given.
    `progress` (JobProgress) says which phase and DDIM step is running. Returns [EditOutput], also recorded in the
    edit folder's edits.json."""
    from tav.evaluation import read_frames
    from tav.generate import run_sampling

    def on_step(phase, step, total):
        progress.message = f"{phase}, DDIM step {step}/{total}"

    if progress is not None:
        progress.state, progress.message = "editing", "loading the model"
    written = run_sampling(request, step_callback=None if progress is None else on_step)
    if progress is not None:
        progress.message = "writing the grids and downloads"
    source = video_io.read_video_frames(request.video, request.video_length, request.sample_start_idx,
                                        request.sample_frame_rate, request.height, request.width)
    outputs = []
    for prompt in request.prompts:
        stem = os.path.join(request.output_dir, video_io.output_name(prompt))
        files = {fmt: next(str(p) for p in written if os.path.splitext(p)[0] == stem and _format_of(p) == fmt)
                 for fmt in EDIT_FORMATS}
        edit_frames = read_frames(files["png"])
        output = EditOutput(prompt, files["gif"], files["mp4"], zip_folder(files["png"], stem + "-frames.zip"),
                            source_edit_grid(source, edit_frames, stem + "-grid.gif", request.fps))
        if scorers:
            output.scores = scorers.score(edit_frames, prompt)
        outputs.append(output)
    write_json_atomic([dataclasses.asdict(o) for o in outputs], os.path.join(request.output_dir, RECORD_NAME))
    if progress is not None:
        progress.state, progress.message = "done", f"{len(outputs)} edit(s)"
    return outputs


def _format_of(path):
    return "png" if os.path.isdir(path) else os.path.splitext(path)[1].lstrip(".").lower()


# ---------------------------------------------------------------------------------------------------------------
# Evaluate


def list_edits(model, work_dir):
    """[EditOutput] of every edit run of tuned model `model` (a name), newest run first."""
    root = os.path.join(find_tuned_model(model, work_dir).folder, "edits")
    outputs = []
    for stamp in sorted(os.listdir(root), reverse=True) if os.path.isdir(root) else []:
        record = os.path.join(root, stamp, RECORD_NAME)
        if os.path.isfile(record):
            outputs += [EditOutput(**entry) for entry in read_json(record, "edit record")]
    return outputs


def evaluate_edits(model, work_dir, scorers):
    """Score every edit of `model` with `scorers`: [(EditOutput, scores)]; the scores are written back into each
    run's edits.json."""
    from tav.evaluation import evaluate_video

    if not scorers:
        raise FileNotFoundError("no scoring models configured: start the app with --eval_clip_model and/or "
                                "--eval_pickscore_model (folders of CLIP / PickScore weights)")
    outputs = list_edits(model, work_dir)
    for output in outputs:
        output.scores = evaluate_video(output.mp4, output.prompt, scorers)
    by_record = {}
    for output in outputs:
        by_record.setdefault(os.path.join(os.path.dirname(output.gif), RECORD_NAME), []).append(output)
    for record, entries in by_record.items():
        write_json_atomic([dataclasses.asdict(o) for o in entries], record)
    return outputs


def scores_table(outputs):
    """Markdown: one row per edit, its prompt and metrics (tav.evaluation's titles)."""
    from tav.evaluation import METRIC_TITLES, METRICS

    present = [key for key in METRICS if any(key in o.scores for o in outputs)]
    if not present:
        return "no scores yet"
    lines = ["| prompt | " + " | ".join(METRIC_TITLES.get(k, k) for k in present) + " |",
             "| --- |" + " ---: |" * len(present)]
    lines += [f"| {o.prompt} | " + " | ".join(f"{o.scores[k]:.4f}" if k in o.scores else "-" for k in present) + " |"
              for o in outputs]
    return "\n".join(lines)

