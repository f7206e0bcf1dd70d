#!/usr/bin/env python
"""Score an edited video as the LOVEU-TGVE benchmark does: frame consistency and text alignment with a CLIP model,
PickScore with a PickScore model (tav/evaluation.py has the formulas, docs/evaluation.md what they mean).

    python tools/evaluate.py --video out/edit.mp4 --prompt "a cat surfing" --clip_model clip-vit-large-patch14 \
        --pickscore_model PickScore_v1 --pickscore_processor CLIP-ViT-H-14-laion2B-s32B-b79K --json scores.json

A bad input prints one `error: ...` line and exits 1; --debug shows the traceback instead.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tav import backend  # noqa: E402
from tav.cli import run_cli  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--video", required=True, help="an mp4/gif, or a folder of frame images (sorted by name)")
    p.add_argument("--prompt", required=True, help="the edit prompt the video was made for")
    p.add_argument("--clip_model", help="CLIPModel folder for frame consistency and text alignment "
                                        "(the benchmark: openai/clip-vit-large-patch14)")
    p.add_argument("--pickscore_model", help="PickScore CLIPModel folder (yuvalkirstain/PickScore_v1)")
    p.add_argument("--pickscore_processor", help="tokenizer + preprocessor folder for PickScore (default: the "
                                                 "model's own; the benchmark: laion/CLIP-ViT-H-14-laion2B-s32B-b79K)")
    p.add_argument("--json", help="also write the scores to this JSON file")
    p.add_argument("--device_target", default="CPU", choices=["CPU", "GPU", "Ascend"])
    p.add_argument("--mode", type=int, default=1, choices=[0, 1], help="0 graph, 1 pynative (default)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an input error")
    args = p.parse_args(argv)
    if not args.clip_model and not args.pickscore_model:
        p.error("give --clip_model, --pickscore_model or both")
    if args.pickscore_processor and not args.pickscore_model:
        p.error("--pickscore_processor needs --pickscore_model")
    return args


def main(argv=None):
    args = parse_args(argv)
    backend.configure(device_target=args.device_target, mode=args.mode)
    from tav import evaluation

    frames = evaluation.read_frames(args.video)  # a bad path fails before any model loads
    scorers = evaluation.Scorers.load(args.clip_model, args.pickscore_model, args.pickscore_processor)
    scores = scorers.score(frames, args.prompt)
    print(evaluation.format_table([(os.path.basename(os.path.normpath(args.video)), scores)]))
    if args.json:
        evaluation.write_scores(scores, args.json)
        print(f"wrote {os.path.abspath(args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
