"""LoRA tuning against the official full tuning (issue 16), in tav.world where every frame can be judged: for a
fixed set of clips and edits (bench/world_ablation.py's), each way of tuning is timed, its delta weighed, and its
edits (DDIM inversion with the tuned model, then sampling, as method (a) of the ablation) judged by the pixel
reader.

    python bench/world_lora.py WORLD_MODEL_DIR [--clips 2] [--json OUT]

Ways: full (configs/world.yaml: attn1.to_q, attn2.to_q, attn_temp), and rank-4 adapters on the same modules
(attn1.to_q, attn2.to_q and every projection of attn_temp), at the config's learning rate and at 3e-3 (an
adapter's up-projection starts at zero, so adapters usually want a larger step).
"""
import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.world_ablation import MEASURES, cases  # noqa: E402
from tav import world_demo  # noqa: E402

WAYS = {
    "full": [],
    "lora r4": ["lora_rank=4", "lora_modules=[attn1.to_q,attn2.to_q,attn_temp]"],
    "lora r4, lr 3e-3": ["lora_rank=4", "lora_modules=[attn1.to_q,attn2.to_q,attn_temp]", "learning_rate=3e-3"],
}


def run_case(model_dir, work_dir, clip, edits, seed=0):
    from tav.pipeline import TuneAVideoPipeline

    clip_path = world_demo.write_clip(clip, os.path.join(work_dir, "clip.mp4"))
    prompts = [e.caption for e in edits]
    rows = {}
    for name, overrides in WAYS.items():
        started = time.perf_counter()
        delta = world_demo.tune(model_dir, clip_path, clip.caption, os.path.join(work_dir, name.replace(" ", "_")),
                                overrides=overrides)
        seconds = time.perf_counter() - started
        tuned = TuneAVideoPipeline.from_pretrained(model_dir, unet=delta)
        frames = world_demo.edit_clip(tuned, clip.frames, clip.caption, prompts, seed=seed)  # the config's steps
        scores = [world_demo.judge_edit(clip.frames, f, e) for f, e in zip(frames, edits)]
        rows[name] = {"tune_s": seconds, "delta_kb": os.path.getsize(delta) / 1024, "scores": scores}
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("--clips", type=int, default=2)
    parser.add_argument("--work_dir", default="demo_outputs/world-lora")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    from tav import backend

    backend.configure(device_target="CPU", mode=0)
    per_way = {name: {"tune_s": [], "delta_kb": [], "scores": []} for name in WAYS}
    for i, (clip, edits) in enumerate(cases(args.clips)):
        for name, row in run_case(args.model_dir, os.path.join(args.work_dir, f"clip{i}"), clip, edits).items():
            for key in ("tune_s", "delta_kb"):
                per_way[name][key].append(row[key])
            per_way[name]["scores"].extend(row["scores"])
    table = {}
    print(f"{'tuning':18s} {'tune s':>7s} {'delta KB':>9s} {'edit accuracy':>14s} {'on the path':>12s} "
          f"{'motion px':>10s} {'temporal IoU':>13s}")
    for name, values in per_way.items():
        table[name] = {"tune_s": float(np.mean(values["tune_s"])), "delta_kb": float(np.mean(values["delta_kb"])),
                       **{k: float(np.mean([s[k] for s in values["scores"]]))
                          for k in MEASURES}}
        row = table[name]
        print(f"{name:18s} {row['tune_s']:7.1f} {row['delta_kb']:9.1f} {row['edit_accuracy']:14.3f} "
              f"{row['frames_on_path']:12.3f} {row['motion_px']:10.2f} {row['temporal_iou']:13.3f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"clips": args.clips, "table": table}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
