"""Reading source clips and writing results.

Reading mirrors the official ``TuneAVideoDataset`` (decord ``VideoReader(path, width=W, height=H)``):
frame indices ``range(sample_start_idx, num_frames, sample_frame_rate)[:n_sample_frames]``, every frame resized to
``width x height`` with no aspect preservation and no crop, pixel values ``uint8 / 127.5 - 1``. Where the official
code silently returns fewer frames than asked for, we raise :class:`VideoError`.

Writing mirrors the official ``save_videos_grid``: a torchvision ``make_grid`` layout per frame, truncating
``(x * 255).astype(uint8)``, GIF at ``fps`` frames per second. We add mp4 and png-folder output and make every
write atomic.

Decoding and resizing: two backends, chosen by ``resize_backend``: ``"ffmpeg"`` (default; one ffmpeg filter graph
``scale=W:H:flags=bilinear`` to rgb24, the graph decord 0.6.0 builds) and ``"opencv"`` (the fallback without an
ffmpeg binary; INTER_AREA to shrink, INTER_LINEAR to enlarge). docs/video.md says how frames are decoded and why
those defaults, with the measurements behind them.
"""
from __future__ import annotations

import functools
import math
import os
import re
import subprocess
import tempfile
import warnings
from pathlib import Path

import cv2
import numpy as np

from tav.checkpoint import default_file_mode, replace_directory_atomically
from tav.checks import SIZE_RULE, WRITE_FORMATS, is_int, is_pixel_size

__all__ = [
    "VideoError",
    "read_video_frames",
    "frames_to_pixel_values",
    "load_video",
    "video_to_uint8",
    "make_grid_frames",
    "write_video",
    "save_videos_grid",
    "check_writable_dir",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
# decord 0.6.0 + FFmpeg 4.x libavfilter: the scale filter's own default (docs/video.md).
DECORD_SCALE_FLAGS = "bilinear"


class VideoError(ValueError):
    """A clip or an output location that cannot be used; the message names the file and the problem."""


# ----------------------------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------------------------
def read_video_frames(path, n_sample_frames, sample_start_idx=0, sample_frame_rate=1, height=512, width=512, *,
                      resize_backend="auto", scale_flags=DECORD_SCALE_FLAGS, interpolation=None, option_names=None):
    """Decode the official frame selection of a clip, resized to ``width x height``: uint8 ``(F, H, W, 3)`` RGB.

    Frames ``range(sample_start_idx, num_frames_in_file, sample_frame_rate)[:n_sample_frames]``; fewer than
    ``n_sample_frames`` available raises :class:`VideoError` (the official reader returns a shorter clip).

    ``resize_backend``: ``"ffmpeg"`` (decord's own decode+scale graph), ``"opencv"``, or ``"auto"`` (ffmpeg when
    imageio-ffmpeg's binary is available, else OpenCV with a warning). ``scale_flags`` is the libswscale algorithm
    of the ffmpeg backend; ``interpolation`` overrides the OpenCV one (default: INTER_AREA to shrink,
    INTER_LINEAR to enlarge). docs/video.md has the measurements behind these defaults.

    ``option_names`` maps this function's argument names to the names the caller's user typed (the sampling tool
    passes ``{"n_sample_frames": "--video_length", ...}``), so errors speak of the option that was given.
    """
    path = Path(path)
    names = dict(option_names or {})

    def name(argument):
        return names.get(argument, argument)

    _check_sampling(path, n_sample_frames, sample_start_idx, sample_frame_rate, height, width, name)
    if not path.exists():
        raise VideoError(f"video {path}: file not found (missing)")
    backend = _resolve_backend(resize_backend)

    wanted = range(sample_start_idx, sample_start_idx + n_sample_frames * sample_frame_rate, sample_frame_rate)
    if path.is_dir():
        frames, n_total = _read_image_folder(path, wanted, height, width, interpolation)
    elif backend == "ffmpeg":
        frames, n_total = _read_with_ffmpeg(path, wanted, height, width, scale_flags)
    elif path.suffix.lower() == ".gif":
        frames, n_total = _read_gif_with_imageio(path, wanted, height, width, interpolation)
    else:
        frames, n_total = _read_with_opencv(path, wanted, height, width, interpolation)

    if len(frames) < n_sample_frames:
        available = len(range(sample_start_idx, n_total, sample_frame_rate))
        raise VideoError(
            f"video {path} has {n_total} frames; {name('sample_start_idx')}={sample_start_idx}, "
            f"{name('sample_frame_rate')}={sample_frame_rate} give only {available} of the "
            f"{name('n_sample_frames')}={n_sample_frames} requested (too few frames)")
    return np.stack(frames).astype(np.uint8, copy=False)


def frames_to_pixel_values(frames_uint8):
    """uint8 ``(F, H, W, 3)`` -> float32 ``(F, 3, H, W)`` in [-1, 1]: ``x / 127.5 - 1`` exactly as the official."""
    frames = np.asarray(frames_uint8)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise VideoError(f"frames_to_pixel_values expects uint8 (F, H, W, 3); got {frames.dtype} {frames.shape}")
    pixels = frames.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    return np.ascontiguousarray(pixels, dtype=np.float32)


def load_video(path, n_sample_frames, sample_start_idx=0, sample_frame_rate=1, height=512, width=512, **kwargs):
    """The training clip: :func:`read_video_frames` then :func:`frames_to_pixel_values` -> float32 (F, 3, H, W)."""
    frames = read_video_frames(path, n_sample_frames, sample_start_idx, sample_frame_rate, height, width, **kwargs)
    return frames_to_pixel_values(frames)


def _check_sampling(path, n_sample_frames, sample_start_idx, sample_frame_rate, height, width, name):
    # Cheap argument checks first, so a bad config fails before any file is opened.
    if not is_int(n_sample_frames) or n_sample_frames < 1:
        raise VideoError(f"video {path}: {name('n_sample_frames')} must be an integer >= 1, got {n_sample_frames!r}")
    if not is_int(sample_frame_rate) or sample_frame_rate < 1:
        raise VideoError(f"video {path}: {name('sample_frame_rate')} must be an integer >= 1, got "
                         f"{sample_frame_rate!r}")
    if not is_int(sample_start_idx) or sample_start_idx < 0:
        raise VideoError(f"video {path}: {name('sample_start_idx')} must be an integer >= 0, got "
                         f"{sample_start_idx!r}")
    for size_name, value in (("height", height), ("width", width)):
        # The official code would fail much later, inside the UNet.
        if not is_pixel_size(value):
            raise VideoError(f"video {path}: {name(size_name)} must be {SIZE_RULE}, got {value!r}")


def _ffmpeg_exe():
    try:
        import imageio_ffmpeg
        return imageio_ffmpeg.get_ffmpeg_exe()
    except Exception:  # imageio-ffmpeg missing, or its binary missing/unrunnable on this platform
        return None


def _resolve_backend(resize_backend):
    if resize_backend not in ("auto", "ffmpeg", "opencv"):
        raise VideoError(f"resize_backend must be 'auto', 'ffmpeg' or 'opencv', got {resize_backend!r}")
    if resize_backend == "opencv":
        return "opencv"
    if _ffmpeg_exe() is not None:
        return "ffmpeg"
    if resize_backend == "ffmpeg":
        raise VideoError("resize_backend='ffmpeg' needs the ffmpeg binary of imageio-ffmpeg, which was not found; "
                         "install imageio-ffmpeg or pass resize_backend='opencv'")
    warnings.warn("imageio-ffmpeg's ffmpeg binary not found: decoding with OpenCV, whose frames differ slightly from "
                  "the official decord ones (see tav.video)", RuntimeWarning, stacklevel=3)
    return "opencv"


@functools.lru_cache(maxsize=None)
def _fps_mode_args(exe):
    # One output frame per decoded frame: the default vsync of the rawvideo muxer may drop or duplicate frames of
    # variable-frame-rate files, and frame *indices* must mean decoded frames, as they do for decord.
    try:
        out = subprocess.run([exe, "-version"], capture_output=True, text=True, timeout=30).stdout
        major, minor = (int(x) for x in re.search(r"version n?(\d+)\.(\d+)", out).groups())
    except Exception:
        return ("-fps_mode", "passthrough")
    return ("-fps_mode", "passthrough") if (major, minor) >= (5, 1) else ("-vsync", "passthrough")


def _read_with_ffmpeg(path, wanted, height, width, scale_flags):
    exe = _ffmpeg_exe()
    cmd = [exe, "-nostdin", "-hide_banner", "-v", "error", "-i", str(path), "-map", "0:v:0",
           *_fps_mode_args(exe),
           # decord's filter graph runs single-threaded; keep libswscale's slicing identical to it.
           "-filter_threads", "1",
           "-vf", f"scale={width}:{height}:flags={scale_flags}",
           "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"]
    frame_bytes = width * height * 3
    wanted_set = set(wanted)
    last_wanted = wanted[-1]
    frames, n_decoded = [], 0
    # stderr goes to a file: a damaged stream can log a line per frame and fill a pipe, deadlocking the reads.
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err)
        try:
            while True:
                buf = proc.stdout.read(frame_bytes)
                if len(buf) < frame_bytes:
                    break
                if n_decoded in wanted_set:
                    frames.append(np.frombuffer(buf, np.uint8).reshape(height, width, 3))
                n_decoded += 1
                if n_decoded > last_wanted:
                    break  # everything needed is here; the rest of the file does not matter
            stopped_early = n_decoded > last_wanted
            if stopped_early:
                proc.kill()
            proc.stdout.close()
            returncode = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        err.seek(0)
        message = err.read().decode("utf-8", "replace").strip()
    if not stopped_early and returncode != 0:
        last = message.splitlines()[-1] if message else f"ffmpeg exit status {returncode}"
        raise VideoError(f"video {path}: unreadable, ffmpeg could not decode it ({last})")
    if n_decoded == 0:
        raise VideoError(f"video {path}: unreadable, it contains no decodable video frames")
    return frames, n_decoded


def _opencv_interpolation(src_hw, dst_hw, interpolation):
    if interpolation is not None:
        return interpolation
    shrinking = dst_hw[0] <= src_hw[0] and dst_hw[1] <= src_hw[1]
    return cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR


def _resize_rgb(frame, height, width, interpolation):
    if frame.shape[:2] == (height, width):
        return np.ascontiguousarray(frame)
    flag = _opencv_interpolation(frame.shape[:2], (height, width), interpolation)
    return cv2.resize(frame, (width, height), interpolation=flag)


def _read_with_opencv(path, wanted, height, width, interpolation):
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise VideoError(f"video {path}: unreadable, OpenCV could not open it as a video")
        wanted_set = set(wanted)
        last_wanted = wanted[-1]
        frames, n_decoded = [], 0
        while n_decoded <= last_wanted:
            if n_decoded in wanted_set:
                ok, bgr = cap.read()
                if not ok:
                    break
                frames.append(_resize_rgb(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), height, width, interpolation))
            elif not cap.grab():  # decode without the colour conversion of frames we skip
                break
            n_decoded += 1
    finally:
        cap.release()
    if n_decoded == 0:
        raise VideoError(f"video {path}: unreadable, OpenCV decoded no frames from it")
    return frames, n_decoded


def _read_gif_with_imageio(path, wanted, height, width, interpolation):
    import imageio.v3 as iio
    try:
        all_frames = iio.imread(path, index=None, plugin="pillow", mode="RGB")
    except Exception as exc:
        raise VideoError(f"video {path}: unreadable GIF ({type(exc).__name__}: {exc})") from exc
    if all_frames.ndim == 3:  # a single-frame GIF comes back without the frame axis
        all_frames = all_frames[None]
    frames = [_resize_rgb(all_frames[i], height, width, interpolation) for i in wanted if i < len(all_frames)]
    return frames, len(all_frames)


def _read_image_folder(path, wanted, height, width, interpolation):
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise VideoError(f"video folder {path}: unreadable, it holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    frames = []
    for i in wanted:
        if i >= len(files):
            break
        bgr = cv2.imread(str(files[i]), cv2.IMREAD_COLOR)
        if bgr is None:
            raise VideoError(f"video folder {path}: unreadable image {files[i].name}")
        frames.append(_resize_rgb(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), height, width, interpolation))
    return frames, len(files)


# ----------------------------------------------------------------------------------------------------------------
# results -> frames
# ----------------------------------------------------------------------------------------------------------------
def video_to_uint8(videos):
    """Float videos in [0, 1] (any shape, e.g. the sampler's (B, 3, F, H, W)) -> uint8, same shape.

    The official rule ``(x * 255).astype(uint8)``: truncation, no rounding, computed in float32 like the official
    torch tensors. We clamp to [0, 1] first (NaN -> 0) so out-of-range values saturate instead of wrapping.
    """
    x = np.asarray(videos)
    if x.dtype == np.uint8:
        return x
    if not np.issubdtype(x.dtype, np.floating):
        raise VideoError(f"video_to_uint8 expects float values in [0, 1] or uint8; got dtype {x.dtype}")
    x = np.nan_to_num(x.astype(np.float32), nan=0.0)
    return (np.clip(x, 0.0, 1.0) * np.float32(255)).astype(np.uint8)


def make_grid_frames(videos, n_rows=4, padding=2):
    """The official ``save_videos_grid`` layout: (B, 3, F, H, W) uint8 or float in [0, 1] -> uint8 (F, H', W', 3).

    torchvision ``make_grid`` semantics per frame: ``n_rows`` videos per grid row (the name is the official one;
    it counts columns), ``padding`` zero pixels around and between tiles, empty cells left zero; a single video is
    returned as is, with no padding.
    """
    videos = video_to_uint8(videos)
    if videos.ndim != 5 or videos.shape[1] != 3:
        raise VideoError(f"make_grid_frames expects videos of shape (B, 3, F, H, W); got {videos.shape}")
    if not is_int(n_rows) or n_rows < 1:
        raise VideoError(f"make_grid_frames: n_rows must be an integer >= 1, got {n_rows!r}")
    b, _, f, h, w = videos.shape
    frames = videos.transpose(0, 2, 3, 4, 1)  # (B, F, H, W, 3)
    if b == 1:
        return np.ascontiguousarray(frames[0])
    cols = min(n_rows, b)
    rows = math.ceil(b / cols)
    grid = np.zeros((f, rows * (h + padding) + padding, cols * (w + padding) + padding, 3), np.uint8)
    for k in range(b):
        y = (k // cols) * (h + padding) + padding
        x = (k % cols) * (w + padding) + padding
        grid[:, y:y + h, x:x + w] = frames[k]
    return grid


# ----------------------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------------------
def check_writable_dir(path):
    """Create directory ``path`` (and parents) if needed and prove a file can be written there.

    Call it before heavy work with the directory an output will go to; raises :class:`VideoError` naming it.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".tav-write-check-")
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise VideoError(f"output directory {path} is not writable ({type(exc).__name__}: {exc.strerror or exc})") \
            from exc
    return path


def _output_format(path, fmt):
    fmt = (fmt or path.suffix.lstrip(".")).lower()
    if fmt not in WRITE_FORMATS:
        raise VideoError(f"output {path}: unknown video format {fmt!r}; expected one of {', '.join(WRITE_FORMATS)} "
                         "(from the extension or fmt=)")
    return fmt


def write_video(frames, path, fps=8, fmt=None, *, crf=18):
    """Write uint8 frames (F, H, W, 3) RGB as gif, mp4 or a png folder; returns the path written.

    ``fmt`` comes from the extension unless given. gif: imageio/Pillow, looping forever, frame duration 1000/fps
    ms (GIF stores centiseconds, so 8 fps is stored as 120 ms, as the official GIFs are; Pillow also merges
    identical consecutive frames). mp4: imageio's ffmpeg plugin, libx264, yuv420p, constant quality ``crf``; odd
    sizes are padded by one edge-replicated row/column because yuv420p needs even sizes. png: ``<parent>/<stem>/
    00000.png, 00001.png, ...``; the folder is returned.

    Atomic: the data goes to a temporary name in the target directory and is renamed onto the final name only when
    complete, so an interrupted write leaves no partial file and an existing output is replaced only by a complete
    one. The directory is created; an unwritable one raises :class:`VideoError`.
    """
    path = Path(path)
    fmt = _output_format(path, fmt)
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise VideoError(f"output {path}: write_video expects uint8 frames (F, H, W, 3) with F >= 1; got "
                         f"{frames.dtype} {frames.shape} (float videos: use video_to_uint8 first)")
    if not (isinstance(fps, (int, float, np.integer, np.floating)) and fps > 0):
        raise VideoError(f"output {path}: fps must be a positive number, got {fps!r}")
    check_writable_dir(path.parent)
    if fmt == "png":
        return _write_png_folder_atomic(frames, path.parent / path.stem)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp.{fmt}")
    os.close(fd)
    tmp = Path(tmp)
    try:
        _FILE_WRITERS[fmt](frames, tmp, fps, crf)
        os.chmod(tmp, default_file_mode())  # mkstemp's 0600 would make every video private to its writer
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _write_gif(frames, tmp, fps, crf):
    import imageio.v3 as iio
    # imageio >= 2.28 wants the GIF frame duration in milliseconds (its old ``fps`` keyword is ignored with a
    # deprecation warning, and the loop count would default to play-once).
    iio.imwrite(tmp, frames, extension=".gif", plugin="pillow", duration=1000.0 / fps, loop=0)


def _write_mp4(frames, tmp, fps, crf):
    import imageio.v2 as imageio
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    writer = imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", pixelformat="yuv420p",
                                quality=None, macro_block_size=1, ffmpeg_log_level="error",
                                output_params=["-crf", str(crf), "-movflags", "+faststart"])
    try:
        for frame in frames:
            writer.append_data(frame)
    finally:
        writer.close()


_FILE_WRITERS = {"gif": _write_gif, "mp4": _write_mp4}


def _write_png_folder_atomic(frames, folder):
    if (folder.exists() or folder.is_symlink()) and not folder.is_dir():
        raise VideoError(f"output {folder}: exists and is not a folder; png output needs a folder there")

    def fill(tmp):
        for i, frame in enumerate(frames):
            target = Path(tmp) / f"{i:05d}.png"
            if not cv2.imwrite(str(target), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)):
                raise VideoError(f"output {folder}: could not write frame {target.name}")

    replace_directory_atomically(folder, fill)
    return folder


def save_videos_grid(videos, path, n_rows=4, fps=8, fmt=None):
    """The official ``save_videos_grid``: float (B, 3, F, H, W) in [0, 1] -> grid video file (gif unless the
    extension or ``fmt`` says otherwise). Returns the path written."""
    return write_video(make_grid_frames(video_to_uint8(videos), n_rows=n_rows), path, fps=fps, fmt=fmt)


def output_name(prompt, index=None):
    """The file stem of a video sampled for `prompt` (index k when a prompt has several videos): the one naming
    of sampled videos, for tools/sample.py and training's validation alike."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", prompt.strip()).strip("_")[:80] or "video"
    return stem if index is None else f"{stem}-{index}"


def write_prompt_videos(videos, prompt, output_dir, formats=("gif",), fps=8):
    """Write each video of float (N, 3, F, H, W) in [0, 1] sampled for `prompt` as output_dir/<name>.<fmt> for every
    format (png: a folder <name>/ of frames); with N > 1 the names end in -k. Returns the paths written."""
    written = []
    for k in range(videos.shape[0]):
        name = output_name(prompt, k if videos.shape[0] > 1 else None)
        for fmt in formats:
            written.append(str(save_videos_grid(videos[k:k + 1], Path(output_dir) / f"{name}.{fmt}", fps=fps,
                                                fmt=fmt)))
    return written
