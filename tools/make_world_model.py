#!/usr/bin/env python
"""Write the world model (issue 13's trained text-to-image pipeline of tav.world, diffusers layout) to OUTPUT_DIR.

By default it copies the shipped weights (tav/assets/world_model/). --retrain reproduces them from scratch with
tav.world_training: alone, the shipped recipe (three runs, each going on from the one before, about two hours on
two CPU cores; the earlier runs stay in OUTPUT_DIR/stages/); with any of the training flags below, one run of those
settings instead. --assets then also replaces the shipped copy.
"""
import argparse
import logging
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tav.cli import run_cli  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("output_dir")
    parser.add_argument("--retrain", action="store_true", help="train the model from its seed instead of copying")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae_steps", type=int, default=None)
    parser.add_argument("--unet_steps", type=int, default=None)
    parser.add_argument("--vae_batch", type=int, default=None)
    parser.add_argument("--unet_batch", type=int, default=None)
    parser.add_argument("--bank_size", type=int, default=None)
    parser.add_argument("--vae_from", default=None, help="reuse a VAE folder an earlier --retrain wrote")
    parser.add_argument("--vae_refine_steps", type=int, default=None,
                        help="then train the VAE this many more steps at --vae_refine_lr (its own schedule)")
    parser.add_argument("--vae_refine_lr", type=float, default=None)
    parser.add_argument("--unet_from", default=None,
                        help="train on from a UNet folder an earlier --retrain wrote (with --vae_from its VAE)")
    parser.add_argument("--unet_lr", type=float, default=None, help="the UNet's peak learning rate (default 1e-3)")
    parser.add_argument("--latent_downscale", type=int, default=None, choices=(8, 4),
                        help="pixels per latent cell: 8 (SD's) or 4 (16x16 latents, objects of 4x4 cells)")
    parser.add_argument("--presence_weight", type=float, default=None,
                        help="weight of the VAE's presence-channel loss (where the object is, written the same way "
                             "for every color and background; default 0)")
    parser.add_argument("--presence_region", default=None, choices=("object", "box"),
                        help="what the presence channel marks: the object's own pixels (default) or its 16x16 box, "
                             "the same for every shape")
    parser.add_argument("--threads", type=int, default=None,
                        help="MindSpore CPU op threads (--retrain; default: the cores available)")
    parser.add_argument("--assets", action="store_true",
                        help="with --retrain: also replace the shipped copy (tav/assets/world_model/)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv if argv is not None else sys.argv[1:])
    from tav import world_model

    if not args.retrain:
        path = world_model.write_world_pipeline(args.output_dir)
        print(f"wrote the world model to {os.path.abspath(path)}")
        return 0
    from tav import backend, world_training

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    backend.configure(device_target="CPU", mode=0, cpu_threads=args.threads)
    names = ("vae_steps", "unet_steps", "vae_batch", "unet_batch", "bank_size", "vae_from", "vae_refine_steps",
             "vae_refine_lr", "latent_downscale", "presence_weight", "presence_region", "unet_from", "unet_lr")
    steps = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    command = "python tools/make_world_model.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    if steps:
        record = world_training.train_world_model(args.output_dir, seed=args.seed, command=command, **steps)
    else:
        record = world_training.train_recipe(args.output_dir, seed=args.seed, command=command)
    print(record)
    if args.assets:
        import shutil

        shutil.copytree(args.output_dir, world_model.ASSET_DIR, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(world_training.STAGES_DIR))
        print(f"replaced the shipped world model at {world_model.ASSET_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
