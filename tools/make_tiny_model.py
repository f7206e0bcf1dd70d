#!/usr/bin/env python
"""Write the tiny random Stable-Diffusion-1.x-shaped pipeline (diffusers layout) to OUTPUT_DIR.

Its weights are random (videos come out as noise); it exists to run the real loading, tuning and sampling code.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tav.cli import run_cli  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("output_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    from tav import tiny

    path = tiny.write_tiny_pipeline(args.output_dir, seed=args.seed)
    print(f"wrote the tiny pipeline to {os.path.abspath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
