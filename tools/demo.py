#!/usr/bin/env python
"""The embedded default job behind `make demo`: the world model that ships with tav (tav/assets/world_model,
trained by tools/make_world_model.py) is tuned with configs/world.yaml on a generated clip of a red square on white,
the clip is inverted and edited three ways (another color, another shape, another background); each edit is written
as a source | edit GIF and judged frame by frame by the world's pixel reader. --tiny runs the older job instead:
the tiny random model (its videos are noise) through tools/train.py's and tools/sample.py's code paths. Outputs go
to demo_outputs/."""
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
    parser.add_argument("--tiny", action="store_true",
                        help="the tiny random model's job (configs/tiny.yaml) instead of the world model's edits")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    backend.configure(device_target=args.device_target, mode=args.mode)
    if args.tiny:
        from tav import demo

        config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.yaml")
        written = demo.run_demo(args.demo_dir, config_path=config)
        print(f"demo done; outputs in {os.path.abspath(args.demo_dir)}:")
        for path in written:
            print("  " + str(path))
        return 0
    from tav import world_demo

    report = world_demo.run_world_demo(args.demo_dir)
    print(f"demo done: {world_demo.SOURCE_SCENE.caption!r} edited; source | edit GIFs in "
          f"{os.path.abspath(os.path.join(args.demo_dir, 'world-edits'))}")
    print(f"  {'edit':40s} {'frames right':>12s} {'on the path':>11s} {'motion px':>10s} {'temporal IoU':>13s}")
    for caption, result in report.items():
        print(f"  {caption:40s} {result['edit_accuracy']:12.2f} {result['frames_on_path']:11.2f} "
              f"{result['motion_px']:10.1f} {result['temporal_iou']:13.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
