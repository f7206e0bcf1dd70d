#!/usr/bin/env python
"""Rerun the bad-input probe against both tools and print its table (docs/reliability.md holds a copy).

Each case runs tools/sample.py or tools/train.py in a fresh process, as a user would, on the tiny model and
generated clips in a scratch folder, and records the exit status, what the user sees (the first line on stderr)
and what the case left behind (files created or changed in the scratch folder, and whether a planted pickle ran).
Nothing here is part of the test suite (tests/test_sample_cli.py and the training tests check the same behaviour
one case at a time); it takes a minute or two on two cores.

    python bench/bad_inputs.py [--with-runs] [--keep]

--with-runs adds the cases that need a finished training run first (a second run into its output_dir, a resume
under a changed config, --overwrite_output_dir): about a minute more. --keep leaves the scratch folder.
"""
import argparse
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def snapshot(root):
    """{relative path: (size, mtime_ns)} of every file under root."""
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            stat = os.stat(path)
            files[os.path.relpath(path, root)] = (stat.st_size, stat.st_mtime_ns)
    return files


def changes(before, after):
    created = sorted(set(after) - set(before))
    changed = sorted(p for p in set(after) & set(before) if after[p] != before[p])
    removed = sorted(set(before) - set(after))
    parts = []
    for label, paths in (("new", created), ("changed", changed), ("removed", removed)):
        if paths:
            shown = ", ".join(paths[:3]) + (f" (+{len(paths) - 3})" if len(paths) > 3 else "")
            parts.append(f"{label}: {shown}")
    return "; ".join(parts) or "nothing written"


class MaliciousPickle:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_malicious_bin(path, marker):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"conv_in.weight": MaliciousPickle(marker)}, protocol=2))


def prepare(root):
    """The inputs every case starts from: a tiny model, a good clip, a short one, a corrupt one, bad checkpoints."""
    from tav import tiny

    model = tiny.write_tiny_pipeline(os.path.join(root, "tiny-sd"))
    good = tiny.make_demo_clip(os.path.join(root, "clip.mp4"), n_frames=16, height=64, width=64)
    short = tiny.make_demo_clip(os.path.join(root, "short.mp4"), n_frames=3, height=64, width=64)
    corrupt = os.path.join(root, "corrupt.mp4")
    with open(corrupt, "w") as handle:
        handle.write("not a video\n" * 50)
    truncated = os.path.join(root, "truncated_delta.safetensors")
    with open(os.path.join(model, "unet", "diffusion_pytorch_model.safetensors"), "rb") as handle:
        data = handle.read()
    with open(truncated, "wb") as handle:
        handle.write(data[: len(data) // 3])
    malicious = os.path.join(root, "malicious-sd")
    shutil.copytree(model, malicious)
    os.remove(os.path.join(malicious, "unet", "diffusion_pytorch_model.safetensors"))
    marker = os.path.join(root, "PICKLE_RAN")
    write_malicious_bin(os.path.join(malicious, "unet", "diffusion_pytorch_model.bin"), marker)
    empty_prompts = os.path.join(root, "empty_prompts.txt")
    open(empty_prompts, "w").close()
    scalar_yaml = os.path.join(root, "scalar.yaml")
    with open(scalar_yaml, "w") as handle:
        handle.write("just a string\n")
    return dict(model=model, good=str(good), short=str(short), corrupt=corrupt, truncated=truncated,
                malicious=malicious, marker=marker, empty_prompts=empty_prompts, scalar_yaml=scalar_yaml)


def cases(inputs, root):
    out = os.path.join(root, "out")
    sample = ["--pretrained_model_path", inputs["model"], "--prompt", "a cat", "--video_length", "4", "--height",
              "64", "--width", "64", "--num_inference_steps", "1", "--output_dir", out]
    train = ["--config", os.path.join(REPO, "configs", "tiny.yaml"), f"pretrained_model_path={inputs['model']}",
             f"train_data.video_path={inputs['good']}", f"output_dir={os.path.join(root, 'run')}"]
    yield "missing video", "sample", sample + ["--video", os.path.join(root, "nope.mp4")]
    yield "corrupt video", "sample", sample + ["--video", inputs["corrupt"]]
    yield "short video (--video_length 8, stride 3)", "sample", sample[:5] + ["8"] + sample[6:] + [
        "--video", inputs["short"], "--sample_frame_rate", "3"]
    yield "size not a multiple of 8", "sample", sample + ["--height", "60"]
    yield "--guidance_scale nan", "sample", sample + ["--guidance_scale", "nan"]
    yield "--guidance_scale inf", "sample", sample + ["--guidance_scale", "inf"]
    yield "--eta 2", "sample", sample + ["--eta", "2"]
    yield "--num_inference_steps 0", "sample", sample + ["--num_inference_steps", "0"]
    yield "no --prompt", "sample", [a for a in sample if a not in ("--prompt", "a cat")]
    yield "empty --prompts_file", "sample", [a for a in sample if a not in ("--prompt", "a cat")] + [
        "--prompts_file", inputs["empty_prompts"]]
    yield "blank prompt among valid ones", "sample", sample + ["--prompt", " ", "--prompt", "a dog"]
    yield "missing model folder", "sample", ["--pretrained_model_path", os.path.join(root, "nowhere")] + sample[2:]
    yield "truncated delta (--unet)", "sample", sample + ["--unet", inputs["truncated"]]
    yield "malicious .bin checkpoint", "sample", ["--pretrained_model_path", inputs["malicious"]] + sample[2:]
    yield "unknown config key", "train", train + ["learning_rat=1e-3"]
    yield "mistyped config value", "train", train + ["learning_rate=fast"]
    yield "learning_rate=nan", "train", train + ["learning_rate=nan"]
    yield "scalar YAML file", "train", ["--config", inputs["scalar_yaml"]]
    yield "missing training clip", "train", train + [f"train_data.video_path={os.path.join(root, 'nope.mp4')}"]
    yield "short training clip", "train", train + [f"train_data.video_path={inputs['short']}"]
    yield "corrupt training clip", "train", train + [f"train_data.video_path={inputs['corrupt']}"]
    yield "bad --resume_from_checkpoint", "train", train + ["--resume_from_checkpoint",
                                                           os.path.join(root, "no-such-checkpoint")]


def run_cases(inputs, root):
    """Cases that need a finished run in root/run first (the tiny config, two steps, a checkpoint each step)."""
    train = ["--config", os.path.join(REPO, "configs", "tiny.yaml"), f"pretrained_model_path={inputs['model']}",
             f"train_data.video_path={inputs['good']}", f"output_dir={os.path.join(root, 'run')}",
             "max_train_steps=2", "checkpointing_steps=1", "validation_steps=100"]
    yield "(a first run, for the cases below)", "train", train
    yield "a new run into that output_dir", "train", train
    yield "resume latest under a changed config", "train", train + ["learning_rate=2e-3", "--resume_from_checkpoint",
                                                                   "latest"]
    yield "--overwrite_output_dir", "train", train + ["--overwrite_output_dir"]


def first_line(text):
    lines = [line for line in text.strip().splitlines() if line.strip()]
    error = [line for line in lines if line.startswith("error:")]
    return (error or lines[-1:] or [""])[0]


def shorten(text, limit=220):
    return text if len(text) <= limit else text[: limit - 5] + " ..."


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--with-runs", dest="with_runs", action="store_true")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)
    root = tempfile.mkdtemp(prefix="tav-bad-inputs-")
    inputs = prepare(root)
    rows = []
    probe = list(cases(inputs, root)) + (list(run_cases(inputs, root)) if args.with_runs else [])
    for name, tool, arguments in probe:
        before = snapshot(root)
        started = time.time()
        result = subprocess.run([sys.executable, os.path.join(REPO, "tools", f"{tool}.py"), *arguments],
                                capture_output=True, text=True, cwd=root, timeout=600)
        seconds = time.time() - started
        kept = changes(before, snapshot(root))
        if os.path.exists(inputs["marker"]):
            kept += "; THE PLANTED PICKLE RAN"
        traceback = "Traceback" in result.stderr
        rows.append((name, tool, result.returncode, "yes" if traceback else "no", f"{seconds:.0f}",
                     shorten(first_line(result.stderr or result.stdout)), kept))
        print(f"{name}: exit {result.returncode} in {seconds:.0f} s", file=sys.stderr)
    header = ("bad input", "tool", "exit", "traceback", "s", "what the user sees", "what is kept / written")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(cell).replace("|", "\\|").replace(root, "<scratch>").replace(REPO, "<repo>")
                                for cell in row) + " |")
    if args.keep:
        print(f"\nscratch folder: {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
