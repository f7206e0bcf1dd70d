"""tav/memory_plan.py's prediction against measured peak RSS on this CPU: the bench's `small` UNet (bench/configs.py)
for one sampling step (batch 2, classifier-free guidance) and one train step, at several frame counts and latent
sizes, each measured in a fresh interpreter by bench.worker (peak RSS of that process, native CPU kernels on).

    python bench/plan_vs_measured.py [--points sample:8:32,sample:16:32,train:8:32,...] [--json FILE]

A point is step:frames:latent (latent = pixels / 8). Prints a table of predicted vs measured GiB and the ratio;
the planner's claim is |ratio - 1| <= 0.2. Only the UNet is loaded by the worker, so the plan is made for a shape
without VAE/text encoder weights.
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEFAULT_POINTS = "sample:4:32,sample:8:32,sample:16:32,sample:8:16,train:8:32,train:16:32"


def plan_for(step, frames, latent, config):
    from tav.memory_plan import plan_memory

    shape = {"unet": dict(config.unet), "vae_params": 0, "text_params": 0, "text_length": 77}
    task = "sample" if step == "sample" else "train"
    return plan_memory(shape, task, frames, latent * 8, latent * 8, "fp32", False, "CPU")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", default=DEFAULT_POINTS)
    parser.add_argument("--config", default="small")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--timeout", type=float, default=1200)
    args = parser.parse_args(argv)
    from bench.configs import get_config
    from bench.run import run_case

    config = get_config(args.config)
    rows = []
    for point in args.points.split(","):
        step, frames, latent = point.split(":")
        frames, latent = int(frames), int(latent)
        case = {"id": f"plan/{step}/f{frames}/l{latent}", "framework": "tav", "step": step, "config": config.name,
                "frames": frames, "latent": latent, "batch": config.batch, "threads": config.threads,
                "mode": "graph", "attention": "native", "warmup": 0, "repeats": 1, "weights": None,
                "chunk_budget": None}
        result = run_case(case, args.timeout)
        predicted = plan_for(step, frames, latent, config.with_overrides(frames=frames, latent=latent))
        measured = result.get("peak_rss_mb", float("nan")) / 1024 if result.get("ok") else float("nan")
        row = {"step": step, "frames": frames, "pixels": latent * 8, "predicted_gib": round(predicted.peak_gib, 3),
               "measured_gib": round(measured, 3), "ratio": round(predicted.peak_gib / measured, 3),
               "breakdown_gib": predicted.as_json()["breakdown_gib"], "error": result.get("error")}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| step | frames | pixels | predicted GiB | measured peak RSS GiB | predicted / measured |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['step']} | {r['frames']} | {r['pixels']} | {r['predicted_gib']:.3f} | {r['measured_gib']:.3f} "
              f"| {r['ratio']:.2f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
