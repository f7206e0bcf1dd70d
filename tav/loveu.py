"""The LOVEU-TGVE 2023 benchmark as one resumable job: for every video of the dataset, tune once, invert once,
sample the four edit prompts, write the submission layout, and (optionally) score every edit.

Dataset layout (as published):

    DATA/LOVEU-TGVE-2023_Dataset.csv     columns `Video name`, `Our GT caption`, `Style Change Caption`,
                                         `Object Change Caption`, `Background Change Caption`,
                                         `Multiple Changes Caption`; rows grouped in sections, each opened by a row
                                         naming the subset (DAVIS_480p, youtube_480p, videvo_480p), blank rows between
    DATA/<subset>/480p_frames/<video>/*.jpg

Output layout:

    OUT/submission/<subset>/<video>/<type>/00000.jpg ...   type = style, object, background, multiple
    OUT/done/<subset>/<video>.json      the video's done marker: its prompts and, when scored, its scores
    OUT/work/<subset>/<video>/          a video in progress (the tuning run, inverted latents, frames being written)
    OUT/scores.json                     per video, per edit type, and the mean over all (video, prompt) pairs

Resuming: a video with a done marker is skipped (scored from its written frames if the marker lacks a metric now
asked for, never rewritten); a video without one starts over in a fresh work folder. Its frames are written
inside the work folder and the whole video folder is moved into submission/ by one rename, so submission/
holds complete videos only.
"""
import csv
import dataclasses
import logging
import os
import shutil
from typing import Dict

import numpy as np

from tav.checkpoint import read_json, write_json_atomic
from tav.video import IMAGE_EXTENSIONS, VideoError, video_to_uint8

logger = logging.getLogger(__name__)

CSV_NAME = "LOVEU-TGVE-2023_Dataset.csv"
SUBSETS = ("DAVIS_480p", "youtube_480p", "videvo_480p")
FRAMES_FOLDER = "480p_frames"
NAME_COLUMN = "Video name"
CAPTION_COLUMN = "Our GT caption"
EDIT_COLUMNS = {
    "style": "Style Change Caption",
    "object": "Object Change Caption",
    "background": "Background Change Caption",
    "multiple": "Multiple Changes Caption",
}
EDIT_TYPES = tuple(EDIT_COLUMNS)
JPEG_QUALITY = 95

# The benchmark's Tune-A-Video baseline: every frame at 480 x 480, 500 steps at lr 3e-5, CFG 12.5, 50 DDIM
# inversion steps (and 50 sampling steps), the official trainable modules and seed. `train_data.n_sample_frames`
# defaults to the video's frame count.
BASELINE = {
    "train_data": {"width": 480, "height": 480, "sample_start_idx": 0, "sample_frame_rate": 1},
    "validation_data": {"prompts": [], "width": 480, "height": 480, "num_inference_steps": 50,
                        "guidance_scale": 12.5, "use_inv_latent": True, "num_inv_steps": 50},
    "learning_rate": 3e-5,
    "train_batch_size": 1,
    "max_train_steps": 500,
    "trainable_modules": ["attn1.to_q", "attn2.to_q", "attn_temp"],
    "seed": 33,
    "mixed_precision": "fp16",
    "gradient_checkpointing": True,
    "enable_xformers_memory_efficient_attention": True,
}


class DatasetError(VideoError):
    """The benchmark's CSV or frame folders are not as expected; the message names the file and the row."""


@dataclasses.dataclass
class BenchmarkVideo:
    subset: str
    name: str
    caption: str
    prompts: Dict[str, str]  # edit type -> prompt
    frames_dir: str

    @property
    def key(self):
        return f"{self.subset}/{self.name}"

    def frame_count(self):
        return len([f for f in os.listdir(self.frames_dir) if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS])


# ---------------------------------------------------------------------------------------------------------------
# the dataset


def read_dataset(data_path):
    """The benchmark's videos in CSV order, each with its frame folder (checked to exist and hold images)."""
    csv_path = os.path.join(os.fspath(data_path), CSV_NAME)
    if not os.path.isfile(csv_path):
        raise DatasetError(f"no {CSV_NAME} in {os.fspath(data_path)!r}")
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.reader(handle))
    header_index = next((i for i, row in enumerate(rows) if NAME_COLUMN in [c.strip() for c in row]), None)
    if header_index is None:
        raise DatasetError(f"{csv_path}: no header row with a {NAME_COLUMN!r} column")
    header = [c.strip() for c in rows[header_index]]
    missing = [c for c in [NAME_COLUMN, CAPTION_COLUMN, *EDIT_COLUMNS.values()] if c not in header]
    if missing:
        raise DatasetError(f"{csv_path}: missing column(s) {', '.join(map(repr, missing))}")
    column = {name: header.index(name) for name in header}

    videos, subset = [], None
    for line, row in enumerate(rows[header_index + 1:], start=header_index + 2):
        cells = [c.strip() for c in row] + [""] * (len(header) - len(row))
        if not any(cells):
            continue
        if cells[0] in SUBSETS and not any(cells[1:]):
            subset = cells[0]
            continue
        if subset is None:
            raise DatasetError(f"{csv_path} line {line}: video {cells[0]!r} comes before any subset row "
                               f"({', '.join(SUBSETS)})")
        name = cells[column[NAME_COLUMN]]
        prompts = {kind: cells[column[title]] for kind, title in EDIT_COLUMNS.items()}
        empty = [kind for kind, prompt in prompts.items() if not prompt]
        if not name or empty:
            raise DatasetError(f"{csv_path} line {line}: video {name!r} lacks "
                               f"{'its name' if not name else 'the ' + ', '.join(empty) + ' prompt(s)'}")
        frames_dir = os.path.join(os.fspath(data_path), subset, FRAMES_FOLDER, name)
        if not os.path.isdir(frames_dir):
            raise DatasetError(f"{csv_path} line {line}: no frame folder {frames_dir}")
        video = BenchmarkVideo(subset, name, cells[column[CAPTION_COLUMN]], prompts, frames_dir)
        if video.frame_count() == 0:
            raise DatasetError(f"frame folder {frames_dir} holds no images")
        videos.append(video)
    if not videos:
        raise DatasetError(f"{csv_path}: no videos")
    return videos


def shard(videos, rank, world_size):
    """The videos one of `world_size` workers handles: every world_size-th, starting at `rank`."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    return videos[rank::world_size]


# ---------------------------------------------------------------------------------------------------------------
# one video


class Layout:
    """Where a run keeps what (see the module docstring)."""

    def __init__(self, output_dir):
        self.root = os.path.abspath(os.fspath(output_dir))

    def submission(self, video):
        return os.path.join(self.root, "submission", video.subset, video.name)

    def marker(self, video):
        return os.path.join(self.root, "done", video.subset, video.name + ".json")

    def work(self, video):
        return os.path.join(self.root, "work", video.subset, video.name)

    @property
    def scores(self):
        return os.path.join(self.root, "scores.json")


def tuning_config(video, pretrained_model_path, output_dir, overrides=()):
    """The training config of one video: BASELINE, the video's clip and caption, then the user's overrides."""
    from tav.config import apply_overrides, config_from_dict, override_keys

    n_frames = video.frame_count()
    raw = {
        **BASELINE,
        "pretrained_model_path": os.path.abspath(os.fspath(pretrained_model_path)),
        "output_dir": os.fspath(output_dir),
        "overwrite_output_dir": True,
        "validation_steps": 10 ** 9,  # no validation videos: the edits are sampled below
        "checkpointing_steps": 10 ** 9,  # only the final state
        "train_data": {**BASELINE["train_data"], "video_path": video.frames_dir, "prompt": video.caption,
                       "n_sample_frames": n_frames},
        "validation_data": {**BASELINE["validation_data"], "video_length": n_frames},
    }
    raw = apply_overrides(raw, overrides)
    # Sampling follows the clip the model was tuned on, unless an override says otherwise.
    if "validation_data.video_length" not in override_keys(overrides):
        raw["validation_data"]["video_length"] = raw["train_data"]["n_sample_frames"]
    return config_from_dict(raw, source=f"loveu config of {video.key}", overridden=override_keys(overrides))


def write_jpg_frames(frames, folder):
    """uint8 (F, H, W, 3) -> folder/00000.jpg, 00001.jpg, ... (the submission's naming)."""
    from PIL import Image

    os.makedirs(folder)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(os.path.join(folder, f"{i:05d}.jpg"), quality=JPEG_QUALITY)


def edit_video(video, config, destination, dtype="fp32"):
    """Tune on the video, invert it once, sample the four edits into `destination`/<type>/ (created here)."""
    from tav.pipeline import TuneAVideoPipeline, invert_video
    from tav.training import train

    result = train(config)
    data, val = config.train_data, config.validation_data
    pipeline = TuneAVideoPipeline.from_pretrained(config.pretrained_model_path, unet=result.delta_path, dtype=dtype,
                                                  attention_backend=config.resolved_attention_backend())
    latents, _ = invert_video(pipeline, data.video_path, data.n_sample_frames, data.height, data.width,
                              val.num_inv_steps, data.sample_start_idx, data.sample_frame_rate, prompt="",
                              seed=config.seed, cache_dir=os.path.join(config.output_dir, "inversion"))
    os.makedirs(destination)
    for kind in EDIT_TYPES:
        videos = pipeline(video.prompts[kind], val.video_length, val.height, val.width, val.num_inference_steps,
                          val.guidance_scale, negative_prompt=val.negative_prompt, eta=val.eta,
                          latents=latents if val.use_inv_latent else None, seed=config.seed)
        frames = video_to_uint8(videos[0]).transpose(1, 2, 3, 0)  # (3, F, H, W) -> (F, H, W, 3)
        write_jpg_frames(frames, os.path.join(destination, kind))


def score_video(video, submission, scorers):
    """{edit type: metrics} of a written video, read back from its jpg frames as the benchmark reads them."""
    from tav.evaluation import read_frames

    return {kind: scorers.score(read_frames(os.path.join(submission, kind)), video.prompts[kind])
            for kind in EDIT_TYPES}


def _wanted_metrics(scorers):
    wanted = []
    if scorers is not None and scorers.clip is not None:
        wanted += ["frame_consistency", "text_alignment"]
    if scorers is not None and scorers.pickscore is not None:
        wanted.append("pickscore")
    return wanted


def run_video(video, layout, pretrained_model_path, overrides=(), scorers=None, dtype="fp32", keep_work=False):
    """Bring one video to done: edit it unless its submission folder is complete, score what is missing, write
    its marker. Returns the marker's contents and whether the video was (re)generated."""
    submission, marker_path, work = layout.submission(video), layout.marker(video), layout.work(video)
    marker = read_json(marker_path, "done marker") if os.path.isfile(marker_path) else None
    generated = False
    if not os.path.isdir(submission):
        # Not finished: whatever a killed run left in the work folder is discarded.
        shutil.rmtree(work, ignore_errors=True)
        config = tuning_config(video, pretrained_model_path, os.path.join(work, "tune"), overrides)
        partial = os.path.join(work, "submission")
        edit_video(video, config, partial, dtype)
        os.makedirs(os.path.dirname(submission), exist_ok=True)
        os.rename(partial, submission)  # the commit point: submission/ only ever holds complete videos
        marker, generated = None, True
    if marker is None:
        marker = {"video": video.key, "prompts": video.prompts, "scores": {kind: {} for kind in EDIT_TYPES}}
    wanted = _wanted_metrics(scorers)
    if any(metric not in marker["scores"][kind] for kind in EDIT_TYPES for metric in wanted):
        for kind, scores in score_video(video, submission, scorers).items():
            marker["scores"][kind].update(scores)
    os.makedirs(os.path.dirname(marker_path), exist_ok=True)
    write_json_atomic(marker, marker_path)
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return marker, generated


# ---------------------------------------------------------------------------------------------------------------
# the whole benchmark


def mean_scores(score_dicts):
    """Metric-wise mean over dicts, each metric over the dicts that have it."""
    metrics = sorted({key for scores in score_dicts for key in scores})
    return {m: float(np.mean([s[m] for s in score_dicts if m in s])) for m in metrics}


def summarise(videos, layout):
    """scores.json's contents from the done markers of `videos`: per video and edit type, per edit type, and the
    mean over all (video, prompt) pairs."""
    per_video = {}
    for video in videos:
        per_video[video.key] = read_json(layout.marker(video), "done marker")["scores"]
    per_type = {kind: mean_scores([per_video[key][kind] for key in per_video]) for kind in EDIT_TYPES}
    all_pairs = [scores for video_scores in per_video.values() for scores in video_scores.values()]
    return {"videos": per_video, "edit_types": per_type, "mean": mean_scores(all_pairs),
            "num_edits": len(all_pairs)}


def summary_table(summary):
    from tav.evaluation import format_table

    rows = [(f"{key} {kind}", scores) for key, video in summary["videos"].items() for kind, scores in video.items()]
    rows += [(f"mean {kind}", scores) for kind, scores in summary["edit_types"].items()]
    rows.append((f"mean of {summary['num_edits']} edits", summary["mean"]))
    return format_table(rows)


def edit_share(data_path, pretrained_model_path, output_dir, overrides=(), scorers=None, dtype="fp32",
               keep_work=False, rank=0, world_size=1, on_video=None):
    """Bring every video this worker owns (`shard`) to done; `on_video(video, generated)` runs after each."""
    videos = read_dataset(data_path)
    layout = Layout(output_dir)
    for video in shard(videos, rank, world_size):
        logger.info(f"{video.key}: {'done already' if os.path.isfile(layout.marker(video)) else 'editing'}")
        _, generated = run_video(video, layout, pretrained_model_path, overrides, scorers, dtype, keep_work)
        if on_video is not None:
            on_video(video, generated)
    return videos


def remove_empty_work_folders(layout):
    """work/<subset>/ and work/ once they hold nothing (only after every worker is done: another worker may be
    about to create its video's folder in them)."""
    work = os.path.join(layout.root, "work")
    if not os.path.isdir(work):
        return
    for subset in os.listdir(work):
        try:
            os.rmdir(os.path.join(work, subset))
        except OSError:
            pass
    try:
        os.rmdir(work)
    except OSError:
        pass


def write_summary(videos, output_dir, scorers):
    """Tidy the work folders; OUT/scores.json from every video's done marker, when scores were asked for and every video is done;
    returns the summary, or None."""
    layout = Layout(output_dir)
    remove_empty_work_folders(layout)
    if not _wanted_metrics(scorers) or not all(os.path.isfile(layout.marker(v)) for v in videos):
        return None
    summary = summarise(videos, layout)
    write_json_atomic(summary, layout.scores)
    return summary


def run_benchmark(data_path, pretrained_model_path, output_dir, overrides=(), scorers=None, dtype="fp32",
                  keep_work=False, on_video=None):
    """The whole benchmark in one process: edit (and score) every video, then the summary (see write_summary)."""
    videos = edit_share(data_path, pretrained_model_path, output_dir, overrides, scorers, dtype, keep_work,
                        on_video=on_video)
    return write_summary(videos, output_dir, scorers)
