"""Tuning on long clips: what recompute per block (gradient_checkpointing) buys, and what train_data.frames_per_step
costs, on the `small` bench UNet.

    python bench/long_clip_tuning.py                     # 8, 16, 24 frames, recompute off and on
    python bench/long_clip_tuning.py --frames 8,16,24,48 --json out.json

Each case is tav.train_step.TrainStep (bench/tav_case.py's train case: noise, UNet forward, MSE, backward over the
official trainable set, clipping, AdamW) in graph mode, in a fresh interpreter, so its peak resident set (ru_maxrss)
is its own; the step time is the median of the timed calls after a warm-up. `frames_per_step: K` tunes a clip of
any length on K-frame windows (tav.windows.random_window_frames): its step is the K-frame row below whatever the
clip's length; only the clip's VAE posterior (4 x F x h x w floats, encoded once in 8-frame slices) grows with F.
"""
import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.measure import print_case_result, run_case_in_fresh_process  # noqa: E402


def run_case(case):
    from bench.configs import get_config
    from bench.tav_case import run

    config = get_config("small").with_overrides(frames=case["frames"], threads=case["threads"])
    result = run(case, config)
    print_case_result(result)


def spawn(case, timeout):
    return run_case_in_fresh_process(__file__, case, timeout, tail_lines=3)


def table(results):
    rows = ["| frames | recompute | peak RSS MiB | vs no recompute | step s | vs no recompute |",
            "|---|---|---|---|---|---|"]
    plain = {r["frames"]: r for r in results if not r["recompute"] and "error" not in r}
    for r in results:
        if "error" in r:
            error = " / ".join(r["error"].splitlines())
            rows.append(f"| {r['frames']} | {'on' if r['recompute'] else 'off'} | error: {error} | | | |")
            continue
        base = plain.get(r["frames"])
        memory = f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x" if base and r["recompute"] else "-"
        speed = f"{r['median_s'] / base['median_s']:.2f}x" if base and r["recompute"] else "-"
        rows.append(f"| {r['frames']} | {'on' if r['recompute'] else 'off'} | {r['peak_rss_mb']:.0f} | {memory} | "
                    f"{r['median_s']:.2f} | {speed} |")
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", default="8,16,24", help="comma-separated frame counts")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case:
        run_case(json.loads(args.case))
        return 0
    results = []
    for frames in [int(f) for f in args.frames.split(",")]:
        for recompute in (False, True):
            case = {"id": f"train/f{frames}/recompute-{recompute}", "framework": "tav", "step": "train",
                    "config": "small", "frames": frames, "threads": args.threads, "mode": "graph",
                    "attention": "native", "warmup": 1, "repeats": args.repeats, "weights": None,
                    "recompute": recompute}
            results.append(spawn(case, args.timeout))
            print(json.dumps({k: results[-1].get(k) for k in ("id", "peak_rss_mb", "median_s", "error")}),
                  flush=True)
    print(table(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
