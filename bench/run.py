#!/usr/bin/env python
"""Time tav's UNet3D sampling and train steps (and PyTorch's stand-in) and print a markdown table + write JSON.

    python bench/run.py --config small            # the default table: ~10 minutes on 2 quiet cores
    python bench/run.py --config sd15 --steps sample --frameworks tav,torch   # opt-in, minutes per step

Each case runs in its own process (`python -m bench.worker`), so peak RSS is the case's own and no compile cache
is shared. Per case: the first call (graph compilation + one step), `--warmup` more calls, then the median of
`--repeats` timed calls. See bench/README.md for what each column means.
"""
import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.configs import CONFIGS, get_config  # noqa: E402
from bench.measure import load_average, run_and_read_result  # noqa: E402
from bench.worker import RESULT_PREFIX  # noqa: E402

STEPS = ("sample", "train", "attn1")
FRAMEWORKS = ("tav", "torch")
TAV_MODES = ("graph", "pynative")
# native first: it is what tav runs on CPU by default ("auto" picks the fused kernel), so the frame sweep and the
# PyTorch ratio use the first backend listed in --attention.
# "native" = tav as it runs on CPU by default: the compiled kernels (kernels/cpu: fused attention, conv, norms).
# "chunked" and "math" run with TAV_NATIVE_KERNELS=0, i.e. MindSpore's own ops everywhere (the portable model).
TAV_ATTENTION = ("native", "chunked", "math")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="small", choices=sorted(CONFIGS))
    parser.add_argument("--steps", default="sample,train,attn1", help=f"comma list of {', '.join(STEPS)}")
    parser.add_argument("--frameworks", default="tav,torch", help="comma list of tav, torch")
    parser.add_argument("--modes", default="graph,pynative", help="tav execution modes to time")
    parser.add_argument("--attention", default="native,chunked",
                        help="tav attention backends to time (the first one is used for the frame sweep)")
    parser.add_argument("--torch-attention", default="sdpa",
                        help="diffusers attention processors: sdpa (AttnProcessor2_0, default) and/or math")
    parser.add_argument("--frames", default=None,
                        help="comma list of frame counts for the sweep (default: the config's sweep, e.g. 4,8,16,24 "
                             "at small; the first headline rows always use the config's frame count)")
    parser.add_argument("--sweep-steps", default="sample,attn1",
                        help="steps timed at every --frames count (the others only at the config's frame count)")
    parser.add_argument("--full", action="store_true",
                        help="every mode x attention backend and the frame sweep for every step (long)")
    parser.add_argument("--latent", type=int, default=None, help="latent height = width (pixels / 8)")
    parser.add_argument("--batch", type=int, default=None, help="videos per step (sampling doubles it for CFG)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for both frameworks")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls after the first")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls; the table shows their median")
    parser.add_argument("--chunk-budget", type=int, default=None,
                        help="score elements per block for the chunked rows (default: tav.kernels.attention_backends.chunked's)")
    parser.add_argument("--weights", default=None,
                        help="safetensors file loaded into both models (tav: all keys; diffusers: minus _temp. keys)")
    parser.add_argument("--export-weights", default=None, metavar="FILE",
                        help="write tav's seeded random UNet weights for --config to FILE (safetensors) and exit")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per case before it is abandoned")
    parser.add_argument("--json", default=None, help="result file (default bench/results/<config>.json)")
    parser.add_argument("--quiet", action="store_true", help="no per-case progress lines")
    return parser.parse_args(argv)


def _csv(text, allowed=None, what="value"):
    items = [item.strip() for item in str(text).split(",") if item.strip()]
    if allowed is not None:
        bad = [item for item in items if item not in allowed]
        if bad:
            raise SystemExit(f"bench: unknown {what} {bad}; choose from {', '.join(allowed)}")
    return items


# ---------------------------------------------------------------------------------------------------------------
# What to run


def plan_cases(args):
    """The list of cases. Headline rows at the config's frame count: tav in graph mode with every attention
    backend, in PyNative with the first one (every one with --full; a PyNative step is several times slower and
    the backend question is answered in graph mode), and PyTorch with every processor. Then the frame sweep,
    tav graph + first backend and PyTorch's first processor, for the --sweep-steps (every step with --full)."""
    config = get_config(args.config).with_overrides(latent=args.latent, batch=args.batch, threads=args.threads)
    steps = _csv(args.steps, STEPS, "step")
    frameworks = _csv(args.frameworks, FRAMEWORKS, "framework")
    modes = _csv(args.modes, TAV_MODES, "mode")
    attentions = _csv(args.attention, TAV_ATTENTION, "attention backend")
    torch_attentions = _csv(args.torch_attention, ("sdpa", "math"), "torch attention")
    sweep = [int(f) for f in _csv(args.frames)] if args.frames else list(config.frame_sweep)
    sweep_steps = steps if args.full else _csv(args.sweep_steps, STEPS, "step")

    def case(framework, step, frames, mode, attention):
        return {
            "id": f"{framework}/{step}/{mode}/{attention}/f{frames}",
            "framework": framework, "step": step, "config": config.name, "frames": frames,
            "latent": config.latent, "batch": config.batch, "threads": config.threads, "mode": mode,
            "attention": attention, "warmup": args.warmup, "repeats": args.repeats, "weights": args.weights,
            "chunk_budget": args.chunk_budget if attention == "chunked" else None,
        }

    cases = []
    for step in steps:
        if "tav" in frameworks:
            for mode in modes:
                if step == "attn1" and mode == "pynative":
                    continue  # one layer: the graph/pynative question is answered by the full steps
                for attention in attentions if mode == "graph" or args.full else attentions[:1]:
                    cases.append(case("tav", step, config.frames, mode, attention))
        if "torch" in frameworks:
            cases += [case("torch", step, config.frames, "eager", a) for a in torch_attentions]
        if step not in sweep_steps:
            continue
        for frames in sweep:
            if frames == config.frames:
                continue
            if "tav" in frameworks and attentions:
                cases.append(case("tav", step, frames, "graph" if "graph" in modes else modes[0], attentions[0]))
            if "torch" in frameworks:
                cases.append(case("torch", step, frames, "eager", torch_attentions[0]))
    return config, cases


# ---------------------------------------------------------------------------------------------------------------
# Running


def worker_env(threads, attention=None):
    env = dict(os.environ)
    if attention in ("chunked", "math"):
        env["TAV_NATIVE_KERNELS"] = "0"  # the portable rows: no compiled kernels anywhere in the model
    elif attention == "native":
        env["TAV_NATIVE_KERNELS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    # Read by OpenMP/oneDNN (both frameworks) when they start: must be in the environment before the import.
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    env.setdefault("GLOG_v", "3")  # MindSpore: errors only
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def run_case(case, timeout):
    """Run one case in a fresh interpreter; returns the case merged with its measurements (or its error)."""
    started = time.perf_counter()
    load_before = load_average()
    env = worker_env(case["threads"], case["attention"] if case["framework"] == "tav" else None)
    result, tail = run_and_read_result([sys.executable, "-m", "bench.worker", json.dumps(case)], env, str(ROOT),
                                       timeout, prefix=RESULT_PREFIX, tail_lines=15)
    if result is None:
        result = {"ok": False, "error": f"worker {tail}"[:500]}
    if not result.get("ok"):
        result["stderr_tail"] = tail.splitlines()
    result["wall_s"] = time.perf_counter() - started
    result["load_before"] = load_before
    return {**case, **result}


def machine_info():
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as handle:
            models = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        cpu = models[0] if models else cpu
    except OSError:
        pass
    memory_gb = None
    try:
        with open("/proc/meminfo") as handle:
            memory_gb = round(int(handle.readline().split()[1]) / 1024 / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gb": memory_gb,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


# ---------------------------------------------------------------------------------------------------------------
# Reporting


def _find(results, **match):
    for row in results:
        if row.get("ok") and all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def summarise(results, config):
    """tav (graph mode, each attention backend) / PyTorch (each processor) at each frame count, and how each
    step's time grows with frames (tav graph + the first attention backend timed; PyTorch's first processor)."""
    summary = {"vs_torch": [], "frame_scaling": []}
    tav_attention = next((r["attention"] for r in results if r["framework"] == "tav"), None)
    torch_attention = next((r["attention"] for r in results if r["framework"] == "torch"), None)
    for step in STEPS:
        for frames in sorted({r["frames"] for r in results if r["step"] == step}):
            for tav in [r for r in results if r.get("ok") and r["framework"] == "tav" and r["step"] == step
                        and r["frames"] == frames and r["mode"] == "graph"]:
                for torch in [r for r in results if r.get("ok") and r["framework"] == "torch"
                              and r["step"] == step and r["frames"] == frames]:
                    summary["vs_torch"].append({
                        "step": step, "frames": frames, "tav_attention": tav["attention"],
                        "torch_attention": torch["attention"],
                        "time_ratio": tav["median_s"] / torch["median_s"],
                        "peak_rss_ratio": tav["peak_rss_mb"] / torch["peak_rss_mb"],
                    })
        for framework, mode, attention in (("tav", "graph", tav_attention), ("torch", "eager", torch_attention)):
            rows = [r for r in results if r.get("ok") and r["framework"] == framework and r["step"] == step
                    and r["mode"] == mode and r["attention"] == attention]
            base = next((r for r in rows if r["frames"] == config.frames), None)
            if base and len(rows) > 1:
                summary["frame_scaling"].append({
                    "framework": framework, "step": step, "base_frames": config.frames,
                    "time_vs_base": {str(r["frames"]): r["median_s"] / base["median_s"]
                                     for r in sorted(rows, key=lambda r: r["frames"])},
                })
    return summary


def _fmt(value, digits=3):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


TABLE_COLUMNS = ("framework", "step", "frames", "mode", "attention", "compile_s", "median_s", "min_s", "cpu/wall",
                 "peak_rss_mb", "load")


def markdown_table(results):
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for row in results:
        if not row.get("ok"):
            cells = [row["framework"], row["step"], str(row["frames"]), row["mode"], row["attention"],
                     f"FAILED: {row.get('error', '?')}"[:160]] + [""] * (len(TABLE_COLUMNS) - 6)
        else:
            cpu_ratio = row["cpu_per_step_s"] / row["median_s"] if row.get("cpu_per_step_s") and row["median_s"] \
                else None
            load = row.get("load_before")
            cells = [row["framework"], row["step"], str(row["frames"]), row["mode"], row["attention"],
                     _fmt(row["compile_s"]), _fmt(row["median_s"]), _fmt(row["min_s"]), _fmt(cpu_ratio, 2),
                     _fmt(row["peak_rss_mb"], 4), _fmt(load[0], 2) if load else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_summary(summary):
    lines = []
    if summary["vs_torch"]:
        lines += ["", "tav (graph mode) / PyTorch (eager), below 1 = tav faster or leaner:", "",
                  "| step | frames | tav attention | torch attention | time ratio | peak RSS ratio |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {s['step']} | {s['frames']} | {s['tav_attention']} | {s['torch_attention']} "
                  f"| {s['time_ratio']:.2f} | {s['peak_rss_ratio']:.2f} |" for s in summary["vs_torch"]]
    if summary["frame_scaling"]:
        lines += ["", "time relative to the config's frame count:", ""]
        for s in summary["frame_scaling"]:
            growth = ", ".join(f"F={f}: {r:.2f}x" for f, r in s["time_vs_base"].items())
            lines.append(f"- {s['framework']} {s['step']} (F={s['base_frames']} = 1): {growth}")
    return "\n".join(lines)


def render(report):
    config = report["config"]
    machine = report["machine"]
    head = (f"config `{config['name']}`: latent {config['latent']}x{config['latent']}, batch {config['batch']}, "
            f"{config['threads']} threads; {machine['cpu']} ({machine['usable_cpus']} usable CPUs), "
            f"load average {report['load_average_start']} at start")
    return "\n".join([head, "", markdown_table(report["results"]), markdown_summary(report["summary"])])


def export_weights(args):
    """tav's random UNet for --config, seeded, all keys (diffusers drops the _temp. ones when loading)."""
    import mindspore as ms

    from tav import checkpoint
    from tav.models.unet3d import UNet3DConditionModel

    ms.set_device("CPU")
    ms.set_seed(0)
    unet = UNet3DConditionModel(dict(get_config(args.config).unet))
    checkpoint.save_state_dict(checkpoint.cell_state_dict(unet), args.export_weights)
    print(f"wrote {args.export_weights}")


def main(argv=None):
    args = parse_args(argv)
    if args.export_weights:
        export_weights(args)
        return 0
    config, cases = plan_cases(args)
    report = {
        "command": " ".join([Path(sys.executable).name, "bench/run.py"] + list(sys.argv[1:] if argv is None else argv)),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "config": {"name": config.name, "unet": config.unet, "frames": config.frames, "latent": config.latent,
                   "batch": config.batch, "threads": config.threads},
        "load_average_start": load_average(),
        "results": [],
    }
    json_path = Path(args.json) if args.json else ROOT / "bench" / "results" / f"{config.name}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    for i, case in enumerate(cases, 1):
        if not args.quiet:
            print(f"[{i}/{len(cases)}] {case['id']} ...", end=" ", flush=True, file=sys.stderr)
        row = run_case(case, args.timeout)
        report["results"].append(row)
        if not args.quiet:
            done = f"{row['median_s']:.3f} s/step" if row.get("ok") else f"FAILED ({row.get('error')})"
            print(f"{done} ({row['wall_s']:.0f} s)", file=sys.stderr, flush=True)
        report["summary"] = summarise(report["results"], config)
        report["load_average_end"] = load_average()
        json_path.write_text(json.dumps(report, indent=1))  # after every case: a long run keeps what it measured
    if not cases:
        raise SystemExit("bench: the filters leave no case to run")
    print(render(report))
    print(f"\nJSON: {json_path}")
    return 0 if all(row.get("ok") for row in report["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
