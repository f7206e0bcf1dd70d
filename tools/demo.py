#!/usr/bin/env python
"""The embedded default job behind `make demo`: on the tiny random model and a generated clip, tune for a few
steps, then invert the clip and sample two prompts with the tuned model. Outputs go to demo_outputs/."""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tav import backend  # noqa: E402
from tav.cli import run_cli  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--demo_dir", default="demo_outputs")
    parser.add_argument("--device_target", default="CPU", choices=["CPU", "GPU", "Ascend"])
    parser.add_argument("--mode", type=int, default=0, choices=[0, 1], help="0 graph (default), 1 pynative")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    backend.configure(device_target=args.device_target, mode=args.mode)
    from tav import demo

    config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.yaml")
    written = demo.run_demo(args.demo_dir, config_path=config)
    print(f"demo done; outputs in {os.path.abspath(args.demo_dir)}:")
    for path in written:
        print("  " + str(path))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
