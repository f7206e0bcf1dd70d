#!/usr/bin/env python
"""Tune a Stable Diffusion UNet on one clip (Tune-A-Video), from an official-format YAML config.

    python tools/train.py --config configs/man-skiing.yaml [key=value ...] [--device_target Ascend|CPU|GPU]
                          [--mode 0|1] [--jit_level O0|O1|O2] [--resume_from_checkpoint latest|PATH]
                          [--overwrite_output_dir] [--use_parallel True] [--debug]

key=value overrides any config key; dotted keys reach into sections (train_data.n_sample_frames=8,
validation_data.prompts=[a,b]). `--config configs/tiny.yaml` runs the CPU demo and writes its tiny model and clip
on first use. Outputs: <output_dir>/unet_delta.safetensors (for tools/sample.py --unet), checkpoint-N/, samples/,
train.log. An output_dir holding another run is refused unless you resume it or pass --overwrite_output_dir.

Data parallel: `msrun --worker_num=N --local_worker_num=N tools/train.py --config C --use_parallel True` tunes the
clip on N ranks (each on its own device, DEVICE_ID as the launcher sets it), each drawing its own timesteps and
noise for train_batch_size videos, gradients averaged over ranks: the run equals one process with
train_batch_size = N x batch. Rank 0 writes every output and logs to the console and train.log; each other rank
logs to its own console (msrun's --log_dir holds one log per rank) and never writes into output_dir.

This tool owns the process: the MindSpore device, execution mode and jit level (from the config, the flags winning)
and the console logging; tav.training.train only trains. A bad input prints one `error: ...` line and exits 1;
--debug shows the traceback instead.
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tav.cli import parse_bool, run_cli  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="training YAML (the official Tune-A-Video format)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--mode", type=int, choices=[0, 1], help="0 graph (default), 1 pynative (the train step then runs "
                                                             "op by op, several times slower)")
    from tav import backend

    # --device_target (overrides the config's; default the config's, else MindSpore's), --device_id, --jit_level
    # (overrides the config's), --max_device_memory.
    backend.add_device_arguments(p, "the config's device_target, else MindSpore's default device")
    p.add_argument("--resume_from_checkpoint", metavar="latest|PATH",
                   help="continue from the newest checkpoint-N in output_dir (latest) or from a checkpoint folder")
    p.add_argument("--overwrite_output_dir", action="store_true",
                   help="start over in an output_dir holding another run: its checkpoints, delta, samples and log "
                        "are deleted first")
    p.add_argument("--use_parallel", type=parse_bool, default=False, metavar="True|False",
                   help="True under msrun: data-parallel tuning over the launcher's ranks (rank 0 writes the outputs)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p.parse_args(argv)


def command_line_overrides(args):
    extra = [f"{key}={getattr(args, key)}" for key in ("device_target", "mode", "jit_level", "resume_from_checkpoint")
             if getattr(args, key) is not None]
    if args.overwrite_output_dir:
        extra.append("overwrite_output_dir=true")
    return list(args.overrides) + extra


class ProgressBarHandler(logging.Handler):
    """Console lines written above tqdm's progress bar instead of through it."""

    def emit(self, record):
        from tqdm.auto import tqdm

        tqdm.write(self.format(record), file=sys.stdout)


def setup_console_logging(rank=None):
    """The tav loggers to the console; under data parallel each line says its rank."""
    handler = ProgressBarHandler()
    handler.setFormatter(logging.Formatter("%(message)s" if rank is None else f"[rank {rank}] %(message)s"))
    tav_logger = logging.getLogger("tav")
    tav_logger.addHandler(handler)
    tav_logger.setLevel(logging.INFO)


def ensure_demo_assets(config):
    """Write the tiny model and the demo clip when the config points at them and they are not there yet."""
    from tav import demo

    demo_dir = os.path.abspath(demo.DEMO_DIR)
    model, clip = os.path.join(demo_dir, "tiny-sd"), os.path.join(demo_dir, "demo-clip.mp4")
    wanted = config.pretrained_model_path == model or config.train_data.video_path == clip
    if wanted and not (os.path.isdir(model) and os.path.isfile(clip)):
        print(f"writing the tiny demo model and clip under {demo_dir}")
        demo.demo_assets(demo_dir)


def main(argv=None):
    args = parse_args(argv)
    from tav import backend
    from tav.config import load_train_config
    from tav.training import train

    config = load_train_config(args.config, command_line_overrides(args))
    backend.configure(device_target=config.device_target, mode=config.mode, jit_level=config.jit_level,
                      device_id=args.device_id, max_device_memory=args.max_device_memory)
    from tav.train_step import DataParallel

    parallel = DataParallel.from_launcher() if args.use_parallel else DataParallel()
    setup_console_logging(parallel.rank if args.use_parallel else None)
    if parallel.is_main:
        ensure_demo_assets(config)
    parallel.all_agree(True)  # the other ranks read the demo assets only once rank 0 has written them
    from tav.memory_plan import check_run_fits

    data = config.train_data  # refused before any weight is loaded when predicted not to fit
    check_run_fits(config.pretrained_model_path, "train", data.frames_per_step or data.n_sample_frames, data.height,
                   data.width, "fp16" if config.mixed_precision == "fp16" else "fp32", args.max_device_memory,
                   config.gradient_checkpointing)
    train(config, parallel=parallel)


if __name__ == "__main__":
    sys.exit(run_cli(main))  # a bad input: one `error: ...` line and exit 1; --debug shows the traceback
