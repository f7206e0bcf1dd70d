#!/usr/bin/env python
"""Run the LOVEU-TGVE 2023 benchmark with Tune-A-Video: tune on every video, sample its four edits, write the
submission layout, and with --clip_model / --pickscore_model score every edit (tav/loveu.py has the layout and
the resume rules, docs/evaluation.md the metrics).

    python tools/loveu.py --data_path loveu-tgve-2023 --pretrained_model_path checkpoints/stable-diffusion-v1-4 \
        --output_dir outputs/loveu --clip_model clip-vit-large-patch14 --pickscore_model PickScore_v1 \
        --pickscore_processor CLIP-ViT-H-14-laion2B-s32B-b79K [key=value ...]

Trailing key=value arguments override the baseline training config (e.g. max_train_steps=300,
train_data.n_sample_frames=8, validation_data.guidance_scale=7.5). Rerunning the same command resumes.

A bad input prints one `error: ...` line and exits 1; --debug shows the traceback instead.
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tav import backend  # noqa: E402
from tav.cli import parse_bool, run_cli  # noqa: E402


def set_up_ranks(args):
    """tav.train_step.DataParallel: rank 0 of 1 alone; under msrun the communication group's, each rank on its own
    device (DEVICE_ID when the launcher sets it). Rank 0 logs to the console, every rank to OUT/logs/rank_N.log."""
    from tav.train_step import DataParallel

    device_id = int(os.environ["DEVICE_ID"]) if "DEVICE_ID" in os.environ else None
    backend.configure(device_target=args.device_target, mode=args.mode, device_id=device_id)
    parallel = DataParallel.from_launcher() if args.use_parallel else DataParallel()
    rank = parallel.rank
    log_dir = os.path.join(args.output_dir, "logs")
    os.makedirs(log_dir, exist_ok=True)
    handlers = [logging.FileHandler(os.path.join(log_dir, f"rank_{rank}.log"), encoding="utf-8")]
    if rank == 0:
        handlers.append(logging.StreamHandler())
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(message)s", handlers=handlers)
    return parallel


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", required=True, help="the benchmark folder (LOVEU-TGVE-2023_Dataset.csv, "
                                                      "<subset>/480p_frames/<video>/)")
    p.add_argument("--pretrained_model_path", required=True, help="Stable Diffusion 1.x folder in diffusers layout")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--clip_model", help="CLIPModel folder for frame consistency and text alignment")
    p.add_argument("--pickscore_model", help="PickScore CLIPModel folder")
    p.add_argument("--pickscore_processor", help="tokenizer + preprocessor folder for PickScore (default: the model's)")
    p.add_argument("--dtype", default="fp32", help="sampling precision (fp32, fp16, bf16)")
    p.add_argument("--keep_work", action="store_true", help="keep each video's tuning run and inverted latents")
    p.add_argument("--device_target", default="CPU", choices=["CPU", "GPU", "Ascend"])
    p.add_argument("--mode", type=int, default=0, choices=[0, 1], help="0 graph (default), 1 pynative")
    p.add_argument("--use_parallel", type=parse_bool, default=False,
                   help="True under msrun: each rank edits every N-th video on its own device; rank 0 writes the "
                        "summary once all are done")
    p.add_argument("--debug", action="store_true", help="show the traceback of an input error")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="training config overrides")
    args = p.parse_args(argv)
    if args.pickscore_processor and not args.pickscore_model:
        p.error("--pickscore_processor needs --pickscore_model")
    return args


def main(argv=None):
    args = parse_args(argv)
    from tav import evaluation, loveu

    loveu.read_dataset(args.data_path)  # a bad dataset fails before any model loads or any rank starts
    parallel = set_up_ranks(args)
    rank, world_size = parallel.rank, parallel.world_size
    scorers = evaluation.Scorers.load(args.clip_model, args.pickscore_model, args.pickscore_processor)
    videos = loveu.edit_share(args.data_path, args.pretrained_model_path, args.output_dir, args.overrides, scorers,
                              args.dtype, args.keep_work, rank, world_size)
    # Every rank's videos are done before rank 0 gathers their scores (an all-reduce: MindSpore 2.10's
    # mint.distributed.barrier returns at once on CPU, before the other ranks arrive).
    if not parallel.all_agree(True):
        raise RuntimeError(f"not all {world_size} ranks reached the gathering of the scores")
    if rank != 0:
        return 0
    summary = loveu.write_summary(videos, args.output_dir, scorers)
    print(f"submission: {os.path.join(os.path.abspath(args.output_dir), 'submission')}")
    if summary is not None:
        print(loveu.summary_table(summary))
        print(f"wrote {loveu.Layout(args.output_dir).scores}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
