#!/usr/bin/env python
"""Will my clip fit? Predict a run's peak device memory and the attention backend of each kind of layer.

    python tools/plan.py --model sd15 --task sample --frames 24 --height 512 --width 512 --dtype fp32 \
                         --device Ascend910B [--gradient_checkpointing] [--json]

--model: sd15, sd21 or a diffusers folder (its unet/config.json). --device: Ascend910B (64 GB), Ascend910A (32 GB),
GPU:<N>GB, CPU (this host's RAM). The backends are what tav's own dispatch picks on that device; the memory is a
prediction (tav/memory_plan.py says how it is computed), not a measurement. --allow_flash_cast plans as if
TAV_FLASH_CAST=1 (fp32 layers through fp16 FlashAttention on a 910B).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tav.cli import run_cli  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sd15", help="sd15, sd21 or a diffusers folder")
    p.add_argument("--task", default="sample", choices=["train", "sample", "invert"])
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"])
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--device", default="Ascend910B", help="Ascend910B, Ascend910A, GPU:<N>GB or CPU")
    p.add_argument("--allow_flash_cast", action="store_true",
                   help="let auto attention cast fp32 layers to fp16 for FlashAttention (TAV_FLASH_CAST=1)")
    p.add_argument("--json", action="store_true", help="print {peak_memory_gib, fits, attention, ...} as JSON")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from tav import backend
    from tav.memory_plan import plan_memory

    if args.allow_flash_cast:
        backend.allow_flash_cast(True)
    plan = plan_memory(args.model, args.task, args.frames, args.height, args.width, args.dtype,
                       args.gradient_checkpointing, args.device)
    print(json.dumps(plan.as_json()) if args.json else plan.describe())
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
