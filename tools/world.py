#!/usr/bin/env python
"""The synthetic world of tav.world from the command line: write a clip, judge an edit.

    python tools/world.py clip CLIP.mp4 [--caption "a red square on a white background"] [--frames 16]
                               [--path line|arc] [--seed 0]
    python tools/world.py judge --source CLIP.mp4 --edit EDIT.gif --prompt "a blue circle on a white background"
                                [--json OUT.json]

`clip` renders a seeded clip (8-24 frames of one scene whose object moves along a line or an arc, at most 4 px a
frame; a random scene unless --caption names one) and prints its caption. `judge` reads every frame of the edit
with the world's pixel reader and compares it with the source's first frames, frame for frame: edit accuracy
(the fraction of frames read as the prompt's scene), motion fidelity (mean distance of the object's centroid to
the source's, px), temporal consistency (mean IoU of consecutive frames' object masks) and the frames on the path
(the fraction read as the prompt's scene with the object's box within 4 px, one frame's largest step, of the
source's).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tav.cli import run_cli  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    clip = commands.add_parser("clip", help="write a clip of the world")
    clip.add_argument("output", help="the clip file (.mp4, .gif) or a folder for png frames")
    clip.add_argument("--caption", help="its scene (default: a random one)")
    clip.add_argument("--frames", type=int, default=16, help="8 to 24")
    clip.add_argument("--path", choices=["line", "arc"], default=None, help="default: random")
    clip.add_argument("--seed", type=int, default=0)
    clip.add_argument("--fps", type=int, default=8)
    judge = commands.add_parser("judge", help="judge an edit against its source clip")
    judge.add_argument("--source", required=True)
    judge.add_argument("--edit", required=True)
    judge.add_argument("--prompt", required=True, help="the edit's caption")
    judge.add_argument("--json", help="also write the numbers here")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser.parse_args(argv)


def write_clip(output, caption=None, frames=16, path=None, seed=0, fps=8):
    """The clip's caption, after writing it to `output`."""
    import numpy as np

    from tav import world
    from tav.video import write_video

    scene = world.parse_caption(caption) if caption else None
    clip = world.random_clip(np.random.default_rng(seed), n_frames=frames, scene=scene, kind=path)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    write_video(clip.frames, output, fps=fps, fmt="png" if os.path.splitext(output)[1] == "" else None)
    return clip.caption


def judge(source, edit, prompt):
    """judge_edit's numbers for the edit file against the source file's first frames."""
    from tav import world
    from tav.evaluation import read_frames
    from tav.world_demo import judge_edit

    scene = world.parse_caption(prompt)
    edit_frames, source_frames = read_frames(edit), read_frames(source)
    if edit_frames.shape[1:3] != source_frames.shape[1:3] or len(edit_frames) > len(source_frames):
        raise world.WorldError(f"--edit {edit} has {len(edit_frames)} frames of {edit_frames.shape[2]}x"
                               f"{edit_frames.shape[1]}; expected at most the {len(source_frames)} frames of "
                               f"--source {source}, at its size {source_frames.shape[2]}x{source_frames.shape[1]}")
    return {"frames": len(edit_frames), **judge_edit(source_frames[:len(edit_frames)], edit_frames, scene)}


def main(argv=None):
    args = parse_args(argv)
    if args.command == "clip":
        print(write_clip(args.output, args.caption, args.frames, args.path, args.seed, args.fps))
        return 0
    scores = judge(args.source, args.edit, args.prompt)
    print(f"{scores['frames']} frames: edit accuracy {scores['edit_accuracy']:.2f}, motion "
          f"{scores['motion_px']:.2f} px, temporal IoU {scores['temporal_iou']:.2f}, on the path "
          f"{scores['frames_on_path']:.2f}")
    if args.json:
        from tav.checkpoint import write_json_atomic

        write_json_atomic(scores, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
