"""Long videos: peak memory and time per frame at 24, 48, 96 (192) frames, one pass against windows (24/8).

    python bench/long_video.py                       # tiny: tools/sample.py end to end (invert + sample + write)
    python bench/long_video.py --config small        # small: one guided DDIM step of the bench's `small` UNet
    python bench/long_video.py --frames 24,96 --json out.json

Every case runs in a fresh interpreter (`--case JSON`), whose peak resident set (VmHWM of /proc/self/status) is its
own. `tiny` runs `tools/sample.py` as a user would, on a generated clip of the demo model at 64x64: VAE encode,
DDIM inversion, guided sampling and decode, then the written png frames are counted; `sample_s/frame` is the
second prompt's sampling time (its graphs already compiled) per frame. `small` runs tav.sampling.denoise for one
guided step (batch 2, 77 text tokens) of the `small` bench UNet (random weights, 32x32 latents = 256 px), the part
whose activations grow with frames; `base` is the RSS after the model is built, before any step.
"""
import argparse
import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.measure import print_case_result, run_case_in_fresh_process  # noqa: E402

WINDOW, OVERLAP = 24, 8
PROMPTS = ("a red disc is moving", "a ball is moving, cartoon style")


def memory_mb(field):
    """VmHWM (peak) or VmRSS (now) of this process in MiB, from /proc/self/status."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def tiny_case(case):
    """tools/sample.py on the tiny model: invert the clip, sample two prompts, write png frames; count them."""
    import importlib.util

    import tav.pipeline

    spec = importlib.util.spec_from_file_location("sample_tool", os.path.join(REPO, "tools", "sample.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    calls = []
    original = tav.pipeline.TuneAVideoPipeline.__call__

    def timed(self, *args, **kwargs):
        started = time.perf_counter()
        result = original(self, *args, **kwargs)
        calls.append(time.perf_counter() - started)
        return result

    tav.pipeline.TuneAVideoPipeline.__call__ = timed
    out = os.path.join(case["workdir"], f"out-{case['frames']}-{case['window'] or 0}")
    argv = ["--pretrained_model_path", case["model"], "--video", case["clip"], "--video_length", str(case["frames"]),
            "--height", "64", "--width", "64", "--num_inference_steps", str(case["steps"]),
            "--num_inv_steps", str(case["steps"]), "--guidance_scale", "7.5", "--format", "png", "--format", "mp4",
            "--output_dir", out]
    for prompt in PROMPTS:
        argv += ["--prompt", prompt]
    if case["window"]:
        argv += ["--window", str(case["window"]), "--window_overlap", str(case["overlap"])]
    started = time.perf_counter()
    status = tool.main(argv)
    total = time.perf_counter() - started
    folders = sorted(os.path.join(out, d) for d in os.listdir(out) if os.path.isdir(os.path.join(out, d))
                     and d != "inv_latents")
    written = [len([f for f in os.listdir(d) if f.endswith(".png")]) for d in folders]
    return {"status": status, "total_s": total, "sample_s": calls[-1], "written_frames": written}


def small_case(case):
    """One guided denoise step of the `small` bench UNet on (1, 4, F, 32, 32) latents."""
    import numpy as np

    import mindspore as ms
    from bench.configs import TEXT_TOKENS, get_config
    from tav.models.unet3d import UNet3DConditionModel
    from tav.sampling import denoise
    from tav.schedulers import SD_V1_SCHEDULE, DDIMScheduler

    config = get_config("small")
    ms.set_seed(0)
    unet = UNet3DConditionModel(dict(config.unet))
    unet.set_train(False)
    rng = np.random.default_rng(0)
    latents = ms.Tensor(rng.standard_normal((1, 4, case["frames"], config.latent, config.latent), dtype=np.float32))
    cond, uncond = (ms.Tensor(rng.standard_normal((1, TEXT_TOKENS, config.cross_attention_dim), dtype=np.float32))
                    for _ in range(2))
    base = memory_mb("VmRSS")
    window = (case["window"], case["overlap"]) if case["window"] else None
    times = []
    for _ in range(case["steps"]):
        started = time.perf_counter()
        denoise(unet, DDIMScheduler(**SD_V1_SCHEDULE), latents, cond, uncond, 1, 7.5, window=window).asnumpy()
        times.append(time.perf_counter() - started)
    return {"base_mb": base, "total_s": sum(times), "sample_s": times[-1]}


def run_case(case):
    from tav import backend

    backend.configure(device_target="CPU", mode=0, cpu_threads=case["threads"])  # the op threads, once per process
    result = (tiny_case if case["config"] == "tiny" else small_case)(case)
    result.update(peak_mb=memory_mb("VmHWM"), frames=case["frames"], window=case["window"],
                  overlap=case["overlap"], config=case["config"])
    print_case_result(result)


def spawn(case):
    return run_case_in_fresh_process(__file__, case)


def table(results):
    rows = ["| config | frames | window | peak RSS MiB | vs 24-frame one pass | sample s/frame | total s "
            "| frames written |",
            "|---|---|---|---|---|---|---|---|"]
    reference = {r["config"]: r["peak_mb"] for r in results if r.get("frames") == 24 and not r.get("window")
                 and "peak_mb" in r}
    for r in results:
        label = f"{r['window']}/{r['overlap']}" if r.get("window") else "one pass"
        if "error" in r:
            rows.append(f"| {r['config']} | {r['frames']} | {label} | error: {r['error'].splitlines()[-1]} |||||")
            continue
        ref = reference.get(r["config"])
        ratio = f"{r['peak_mb'] / ref:.2f}x" if ref else "-"
        written = ",".join(map(str, r.get("written_frames", []))) or "-"
        rows.append(f"| {r['config']} | {r['frames']} | {label} | {r['peak_mb']:.0f} | {ratio} | "
                    f"{r['sample_s'] / r['frames']:.3f} | {r['total_s']:.1f} | {written} |")
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", choices=["tiny", "small"])
    p.add_argument("--frames", default="24,48,96", help="comma-separated frame counts")
    p.add_argument("--modes", default="one,windowed", help="one (one pass), windowed, or both")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (tiny, default 3) or timed steps (small, 1)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case:
        return run_case(json.loads(args.case))

    from tav.tiny import ensure_tiny_pipeline, make_demo_clip

    frames = [int(f) for f in args.frames.split(",")]
    workdir = tempfile.mkdtemp(prefix="tav-long-video-")
    common = dict(config=args.config, threads=args.threads, workdir=workdir,
                  steps=args.steps or (3 if args.config == "tiny" else 1))
    if args.config == "tiny":
        common["model"] = ensure_tiny_pipeline(os.path.join(workdir, "tiny-sd"))
        clip = make_demo_clip(os.path.join(workdir, "clip.mp4"), n_frames=max(frames), height=64, width=64)
        common["clip"] = str(clip)
    results = []
    for n in frames:
        for mode in args.modes.split(","):
            window = (WINDOW, OVERLAP) if mode == "windowed" else (None, None)
            result = spawn(dict(common, frames=n, window=window[0], overlap=window[1]))
            results.append(result)
            print(json.dumps(result), flush=True)
    print(table(results))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
