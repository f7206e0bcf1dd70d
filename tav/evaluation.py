"""The field's numbers for an edited video, computed as the LOVEU-TGVE 2023 benchmark's evaluation script does.

    frames      every frame resized to 480 x 480 by PIL's `Image.resize` with its default filter (bicubic for
                RGB images), then the scoring model's own CLIPImageProcessor
    frame consistency   (1 / (F (F - 1))) * sum over i != j of cos(e_i, e_j), e_i the CLIP image embedding of
                frame i: the mean over ordered pairs of distinct frames, raw (the paper prints it x 100)
    text alignment      (1 / F) * sum over i of exp(logit_scale) * cos(e_i, t), t the CLIP text embedding of the
                prompt: the mean of CLIPModel's `logits_per_image`, with the model's own logit scale
    PickScore           the text-alignment formula with the PickScore model (text truncated to 77 tokens)

The CLIP metrics use openai/clip-vit-large-patch14; PickScore uses PickScore_v1's weights with
laion/CLIP-ViT-H-14-laion2B-s32B-b79K's processor. docs/evaluation.md compares the numbers with the paper's.
"""
import os
from pathlib import Path

import numpy as np

from tav.checkpoint import write_json_atomic
from tav.clip import Clip
from tav.video import IMAGE_EXTENSIONS, VideoError

BENCHMARK_FRAME_SIZE = 480
METRICS = ("frame_consistency", "text_alignment", "pickscore")
METRIC_TITLES = {"frame_consistency": "frame consistency", "text_alignment": "text alignment",
                 "pickscore": "PickScore"}


# ---------------------------------------------------------------------------------------------------------------
# frames


def read_frames(path):
    """Every frame of a clip at its own size: uint8 (F, H, W, 3) RGB.

    A folder is its images sorted by file name, decoded by PIL as the benchmark decodes its JPEG folders; a .gif
    is decoded by PIL frame by frame; any other file by OpenCV, as tav.video's OpenCV reader decodes it.
    """
    path = Path(path)
    if not path.exists():
        raise VideoError(f"video {path}: not found")
    if path.is_dir():
        frames = _read_folder(path)
    elif path.suffix.lower() == ".gif":
        frames = _read_gif(path)
    else:
        frames = _read_with_opencv(path)
    if not frames:
        raise VideoError(f"video {path}: no frames could be read")
    return np.stack(frames)


def _read_folder(path):
    from PIL import Image

    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise VideoError(f"video folder {path}: it holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    frames = []
    for file in files:
        try:
            with Image.open(file) as image:
                frames.append(np.array(image.convert("RGB")))
        except OSError as exc:
            raise VideoError(f"video folder {path}: unreadable image {file.name} ({exc})") from exc
    return frames


def _read_gif(path):
    from PIL import Image, ImageSequence

    try:
        with Image.open(path) as gif:
            return [np.array(frame.convert("RGB")) for frame in ImageSequence.Iterator(gif)]
    except OSError as exc:
        raise VideoError(f"video {path}: unreadable GIF ({exc})") from exc


def _read_with_opencv(path):
    import cv2

    capture = cv2.VideoCapture(str(path))
    frames = []
    try:
        if not capture.isOpened():
            raise VideoError(f"video {path}: unreadable, OpenCV could not open it as a video")
        while True:
            ok, bgr = capture.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    finally:
        capture.release()
    return frames


def benchmark_frames(frames, size=BENCHMARK_FRAME_SIZE):
    """The benchmark's first step: each frame as a PIL image resized to size x size with `Image.resize`'s default
    filter (the filter is not named, so it is PIL's default: bicubic for RGB in the Pillow versions we support)."""
    from PIL import Image

    return [Image.fromarray(np.asarray(frame, np.uint8)).resize((size, size)) for frame in frames]


# ---------------------------------------------------------------------------------------------------------------
# metrics (on unit embeddings)


def frame_consistency(image_embeddings):
    """Mean cosine similarity over ordered pairs of distinct frames; needs at least two frames."""
    e = np.asarray(image_embeddings, np.float64)
    n = len(e)
    if n < 2:
        raise VideoError(f"frame consistency needs at least 2 frames, got {n}")
    similarity = e @ e.T
    return float((similarity.sum() - np.trace(similarity)) / (n * (n - 1)))


def text_alignment(image_embeddings, text_embedding, logit_scale):
    """Mean over frames of logit_scale * cos(frame, text): CLIPModel's logits_per_image averaged."""
    e = np.asarray(image_embeddings, np.float64)
    t = np.asarray(text_embedding, np.float64).reshape(-1)
    return float(logit_scale * (e @ t).mean())


def evaluate_frames(frames, prompt, clip=None, pickscore=None):
    """The metrics of one edited video: {"frame_consistency", "text_alignment"} with a CLIP model (tav.clip.Clip),
    {"pickscore"} with a PickScore model; keys only for the models given."""
    if clip is None and pickscore is None:
        raise ValueError("evaluate_frames needs a CLIP model, a PickScore model or both")
    images = benchmark_frames(frames)
    scores = {}
    if clip is not None:
        embeddings = clip.image_embeddings(images)
        scores["frame_consistency"] = frame_consistency(embeddings)
        scores["text_alignment"] = text_alignment(embeddings, clip.text_embeddings([prompt])[0], clip.logit_scale)
    if pickscore is not None:
        embeddings = pickscore.image_embeddings(images)
        scores["pickscore"] = text_alignment(embeddings, pickscore.text_embeddings([prompt])[0],
                                             pickscore.logit_scale)
    return scores


class Scorers:
    """The models a run scores with, loaded once: CLIP (both CLIP metrics) and/or PickScore."""

    def __init__(self, clip=None, pickscore=None):
        self.clip = clip
        self.pickscore = pickscore

    @classmethod
    def load(cls, clip_model=None, pickscore_model=None, pickscore_processor=None):
        clip = Clip.from_folder(clip_model) if clip_model else None
        pickscore = Clip.from_folder(pickscore_model, pickscore_processor) if pickscore_model else None
        return cls(clip, pickscore)

    def __bool__(self):
        return self.clip is not None or self.pickscore is not None

    def score(self, frames, prompt):
        return evaluate_frames(frames, prompt, self.clip, self.pickscore)


def evaluate_video(path, prompt, scorers):
    """The metrics of the clip at `path` (mp4/gif or a folder of frames) for `prompt`."""
    return scorers.score(read_frames(path), prompt)


def score_videos(videos, scorers):
    """[(path, prompt)] -> [(path, scores)]: every written video scored (what `tools/sample.py --eval_clip_model`
    reports for the videos it writes)."""
    return [(path, evaluate_video(path, prompt, scorers)) for path, prompt in videos]


# ---------------------------------------------------------------------------------------------------------------
# reporting


def format_table(rows, columns=None):
    """Plain-text table of rows (label, {metric: value}); columns default to the metrics present, in METRICS order."""
    if columns is None:
        present = {key for _, scores in rows for key in scores}
        columns = [key for key in METRICS if key in present]
    header = [""] + [METRIC_TITLES.get(key, key) for key in columns]
    body = [[label] + [f"{scores[key]:.4f}" if key in scores else "-" for key in columns] for label, scores in rows]
    widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in [header] + body]
    return "\n".join(lines)


def write_scores(scores, path):
    """`scores` as JSON at `path`, atomically (a reader never sees half a file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_json_atomic(scores, os.fspath(path))
