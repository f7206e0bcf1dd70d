"""A long edit in tav.world, where the truth of every frame is known (issue 15): a 96-frame clip edited three ways
by the world model tuned on the whole clip a window at a time (train_data.frames_per_step = --window), every
frame judged by tav.world's pixel reader.

    python bench/world_long_video.py WORLD_MODEL_DIR [--frames 96] [--window 24] [--overlap 8] [--json OUT]

Ways:
  windows  one inversion and one sampling over all frames in overlapping windows fused at every step (--window)
  pieces   the users' workaround: the clip cut into independent pieces of --window frames, each inverted and
           sampled on its own
  one pass all frames in every UNet call (memory grows with the frames; fine at 64x64)

Per way: edit accuracy (frames read as the edited scene), motion fidelity (mean distance in px between the edit's
and the source's object centroids), and temporal consistency split into the consecutive-frame pairs that cross a
seam (the pieces' cuts; the middles of the windows' overlaps) and those inside: the motion error
|(c[f+1] - c[f]) - (s[f+1] - s[f])| in px and the IoU of the two masks once the first is moved by the source's
motion (rounded to whole pixels).
"""
import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tav import world  # noqa: E402
from tav import world_demo  # noqa: E402

WAYS = ("windows", "pieces", "one pass")
# The source is a red square on a white background; a background edit is one the shipped model keeps on the
# source's path, so the seams' numbers measure the windows, not the model's color edits leaving the path.
DEFAULT_EDIT = "a red square on a black background"


def slow_line_clip(rng, n_frames, scene, speed=0.4):
    """A clip whose object moves `speed` px a frame along a straight line that stays inside the frame for all
    n_frames (world.random_clip stops at 24 frames: at its speeds a longer line would leave the frame)."""
    span = speed * (n_frames - 1)
    for _ in range(1000):
        angle = rng.uniform(0, 2 * np.pi)
        direction = np.array([np.cos(angle), np.sin(angle)])
        start = rng.uniform(world.CENTER_MIN, world.CENTER_MAX, size=2)
        end = start + span * direction
        if world.CENTER_MIN <= end.min() and end.max() <= world.CENTER_MAX:
            path = start + np.arange(n_frames)[:, None] * speed * direction
            return world.render_clip(scene, path, "line")
    raise RuntimeError(f"no line of {n_frames} frames at {speed} px/frame fits the frame")


def seam_pairs(way, n_frames, window, overlap):
    """Indices f of the pairs (f, f+1) that cross a seam of `way` (for one pass: the windows' seams, as a
    reference with none)."""
    if way == "pieces":
        return [f - 1 for f in range(window, n_frames, window)]
    from tav.windows import WindowSpec, window_starts

    starts = window_starts(n_frames, WindowSpec(window, overlap))
    return [s + overlap // 2 - 1 for s in starts[1:]]


def shift_mask(mask, dx, dy):
    out = np.zeros_like(mask)
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    ys, xs = ys + dy, xs + dx
    keep = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    out[ys[keep], xs[keep]] = True
    return out


def pair_scores(source_readings, edit_readings, f):
    """(motion error px, shifted-mask IoU) of the pair (f, f+1); None when either edit frame has no object."""
    a, b = edit_readings[f], edit_readings[f + 1]
    if a.center is None or b.center is None:
        return None
    src_step = np.array(source_readings[f + 1].center) - np.array(source_readings[f].center)
    edit_step = np.array(b.center) - np.array(a.center)
    dx, dy = (int(v) for v in np.round(src_step))
    return float(np.hypot(*(edit_step - src_step))), world.mask_iou(shift_mask(a.mask, dx, dy), b.mask)


def judge_long_edit(source_frames, edit_frames, scene, seams):
    source, edit = world.read_clip(source_frames), world.read_clip(edit_frames)
    numbers = world_demo.judge_edit(source_frames, edit_frames, scene)
    split = {"seam": [], "inside": []}
    for f in range(len(edit) - 1):
        scores = pair_scores(source, edit, f)
        if scores is not None:
            split["seam" if f in seams else "inside"].append(scores)
    for where, rows in split.items():
        numbers[f"{where}_motion_px"] = float(np.mean([r[0] for r in rows])) if rows else float("nan")
        numbers[f"{where}_iou"] = float(np.mean([r[1] for r in rows])) if rows else float("nan")
        numbers[f"{where}_pairs"] = len(rows)
    return numbers


def edit_long_clip(pipeline, clip, edit_caption, way, window, overlap, steps, seed):
    """(F, 64, 64, 3) uint8 edit of the whole clip, done `way`."""
    from tav.video import frames_to_pixel_values

    settings = world_demo.edit_settings(steps=steps)

    def invert_and_sample(frames, spec):
        latents = pipeline.encode_video(frames_to_pixel_values(frames), seed=seed)
        inverted = pipeline.invert(latents, settings.num_inv_steps, prompt=clip.caption, window=spec)[-1]
        videos = pipeline([edit_caption], video_length=len(frames), height=64, width=64,
                          num_inference_steps=settings.num_inference_steps, guidance_scale=settings.guidance_scale,
                          latents=inverted, seed=seed, window=spec)
        return world_demo.to_uint8_frames(videos)[0]

    if way == "windows":
        return invert_and_sample(clip.frames, (window, overlap))
    if way == "pieces":
        return np.concatenate([invert_and_sample(clip.frames[s:s + window], None)
                               for s in range(0, len(clip.frames), window)])
    return invert_and_sample(clip.frames, None)


def run(model_dir, work_dir, n_frames=96, window=24, overlap=8, steps=None, seed=0, ways=WAYS, tune_steps=None,
        edit_caption=DEFAULT_EDIT):
    from tav.pipeline import TuneAVideoPipeline

    rng = np.random.default_rng(seed)
    scene = world.Scene("red", "square", "white")
    clip = slow_line_clip(rng, n_frames, scene)
    edit = world.parse_caption(edit_caption)
    clip_path = world_demo.write_clip(clip, os.path.join(work_dir, "long-clip.mp4"))
    overrides = [f"train_data.n_sample_frames={n_frames}", f"train_data.frames_per_step={window}",
                 "validation_data.video_length=null"]
    if tune_steps:
        overrides.append(f"max_train_steps={tune_steps}")
    delta = world_demo.tune(model_dir, clip_path, clip.caption, os.path.join(work_dir, "tuned"), overrides=overrides)
    pipeline = TuneAVideoPipeline.from_pretrained(model_dir, unet=delta)
    table = {}
    for way in ways:
        started = time.perf_counter()
        frames = edit_long_clip(pipeline, clip, edit.caption, way, window, overlap, steps, seed)
        seconds = time.perf_counter() - started
        world_demo.write_clip(world.Clip(frames, edit, clip.path, "line"),
                              os.path.join(work_dir, way.replace(" ", "-") + ".mp4"))
        table[way] = judge_long_edit(clip.frames, frames, edit, set(seam_pairs(way, n_frames, window, overlap)))
        table[way]["seconds_per_frame"] = seconds / n_frames  # invert + sample, graphs compiled on first use
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("--frames", type=int, default=96)
    parser.add_argument("--window", type=int, default=24)
    parser.add_argument("--overlap", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None,
                        help="inversion and DDIM steps (default: configs/world.yaml's)")
    parser.add_argument("--tune_steps", type=int, default=None, help="default: configs/world.yaml's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--edit", default=DEFAULT_EDIT,
                        help="the edit caption (the source is a red square on a white background)")
    parser.add_argument("--threads", type=int, default=None, help="CPU op threads (default: the cores available)")
    parser.add_argument("--work_dir", default="demo_outputs/world-long")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    from tav import backend

    backend.configure(device_target="CPU", mode=0, cpu_threads=args.threads)
    table = run(args.model_dir, args.work_dir, args.frames, args.window, args.overlap, args.steps, args.seed,
                tune_steps=args.tune_steps, edit_caption=args.edit)
    keys = ("edit_accuracy", "frames_on_path", "motion_px", "temporal_iou", "inside_motion_px", "seam_motion_px",
            "inside_iou", "seam_iou", "seconds_per_frame")
    print(f"{'way':10s} " + " ".join(f"{k:>16s}" for k in keys))
    for way, row in table.items():
        print(f"{way:10s} " + " ".join(f"{row[k]:16.3f}" for k in keys))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"edit": args.edit, "frames": args.frames, "window": args.window, "overlap": args.overlap, "table": table}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
