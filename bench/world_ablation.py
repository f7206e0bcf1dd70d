"""The paper's ablation in tav.world (issue 13 §4): edit accuracy, motion fidelity and temporal consistency of
each method over a fixed set of source clips and edits, judged by tav.world's pixel reader, with the frames on the
path (read as the edit and within one frame's step of the source's object; tav.world_demo.judge_edit). Each
method's edited frames are kept in WORK_DIR/clipN/<method>.npy, to be judged again without rerunning.

    python bench/world_ablation.py WORLD_MODEL_DIR [--clips 3] [--out bench/results/world_ablation.json]

Methods:
  a  one-shot tuning (configs/world.yaml) + DDIM inversion: the paper's method
  b  no tuning: the pretrained model inflated, sampled from the same inverted noise as (a)
  c  tuning, sampled from random noise instead of the inversion
  d  tuning without attn_temp, the temporal attention's output switched off (zeroed) when inverting and sampling
  e  full attention over all frames in attn1 instead of sparse-causal, in tuning (frame_policy: full), inversion
     and sampling (the delta carries the policy)
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tav import world  # noqa: E402
from tav import world_demo  # noqa: E402

METHODS = ("a", "b", "c", "d", "e")
# cases() gives every clip one edit of each kind, in this order.
EDIT_KINDS = ("color", "shape", "background")
MEASURES = ("edit_accuracy", "frames_on_path", "motion_px", "temporal_iou")


def switch_off_temporal_attention(unet):
    import mindspore as ms

    for name, param in unet.parameters_and_names():
        if "attn_temp.to_out." in name:
            param.set_data(ms.ops.zeros(param.shape, param.dtype))


def cases(n_clips, seed=0):
    """Fixed (clip, edit scene) pairs: each clip gets a color, a shape and a background edit."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_clips):
        clip = world.random_clip(rng, n_frames=8)
        s = clip.scene
        colors = [c for c in world.COLORS if c != s.color]
        shapes = [x for x in world.SHAPES if x != s.shape]
        backgrounds = [b for b in world.BACKGROUNDS if b != s.background]
        edits = [world.Scene(str(rng.choice(colors)), s.shape, s.background),
                 world.Scene(s.color, str(rng.choice(shapes)), s.background),
                 world.Scene(s.color, s.shape, str(rng.choice(backgrounds)))]
        out.append((clip, edits))
    return out


def run_case(model_dir, work_dir, clip, edits, methods=METHODS, seed=0, steps=None):
    """Every method edits with configs/world.yaml's inversion steps, DDIM steps and guidance (edit_settings);
    `steps` replaces both step counts."""
    from tav.video import frames_to_pixel_values
    from tav.pipeline import TuneAVideoPipeline

    settings = world_demo.edit_settings(steps=steps)

    def edit(pipeline, latents=None):
        return world_demo.edit_clip(pipeline, clip.frames, clip.caption, prompts, settings, latents=latents,
                                    seed=seed)

    clip_path = world_demo.write_clip(clip, os.path.join(work_dir, "clip.mp4"))
    prompts = [e.caption for e in edits]
    outputs = {}
    delta = world_demo.tune(model_dir, clip_path, clip.caption, os.path.join(work_dir, "tuned"))
    tuned = TuneAVideoPipeline.from_pretrained(model_dir, unet=delta)
    pixels = tuned.encode_video(frames_to_pixel_values(clip.frames), seed=seed)
    inverted = tuned.invert(pixels, settings.num_inv_steps, prompt=clip.caption)[-1]
    if "a" in methods:
        outputs["a"] = edit(tuned, inverted)
    if "c" in methods:
        outputs["c"] = world_demo.to_uint8_frames(tuned(prompts, video_length=len(clip.frames), height=64, width=64,
                                                        num_inference_steps=settings.num_inference_steps,
                                                        guidance_scale=settings.guidance_scale, seed=seed + 7))
    if "e" in methods:
        delta_e = world_demo.tune(model_dir, clip_path, clip.caption, os.path.join(work_dir, "tuned-full"),
                                  overrides=["frame_policy=full"])
        full = TuneAVideoPipeline.from_pretrained(model_dir, unet=delta_e)
        outputs["e"] = edit(full)
    if "b" in methods:
        base = world_demo.untuned_pipeline(model_dir, init_seed=seed)
        outputs["b"] = edit(base, inverted)
    if "d" in methods:
        delta_d = world_demo.tune(model_dir, clip_path, clip.caption, os.path.join(work_dir, "tuned-no-temp"),
                                  overrides=["trainable_modules=[attn1.to_q,attn2.to_q]"])
        off = TuneAVideoPipeline.from_pretrained(model_dir, unet=delta_d)
        switch_off_temporal_attention(off.unet)
        outputs["d"] = edit(off)
    for m, frames in outputs.items():
        np.save(os.path.join(work_dir, f"{m}.npy"), np.asarray(frames))
    return {m: [{"kind": kind, "source": clip.caption, "edit": e.caption,
                 **world_demo.judge_edit(clip.frames, frames, e)}
                for frames, e, kind in zip(outputs[m], edits, EDIT_KINDS)]
            for m in outputs}


def summarise(rows):
    """{measure: mean over rows} for the measures judge_edit gives."""
    return {k: float(np.mean([r[k] for r in rows])) for k in MEASURES}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("--clips", type=int, default=3)
    parser.add_argument("--methods", default="".join(METHODS))
    parser.add_argument("--work_dir", default="demo_outputs/world-ablation")
    parser.add_argument("--out", default=None)
    parser.add_argument("--steps", type=int, default=None,
                        help="inversion and DDIM steps (default: configs/world.yaml's)")
    args = parser.parse_args(argv)
    from tav import backend

    backend.configure(device_target="CPU", mode=0)  # and MindSpore's CPU threads to the cores available
    totals = {m: [] for m in args.methods}
    for i, (clip, edits) in enumerate(cases(args.clips)):
        result = run_case(args.model_dir, os.path.join(args.work_dir, f"clip{i}"), clip, edits, args.methods,
                          steps=args.steps)
        for m, rows in result.items():
            totals[m].extend(rows)
    print(f"{'method':8s} {'edits':12s} {'edit accuracy':>14s} {'on the path':>12s} {'motion px':>10s} "
          f"{'temporal IoU':>13s}")
    table, by_kind = {}, {}
    for m, rows in totals.items():
        table[m] = summarise(rows)
        by_kind[m] = {kind: summarise([r for r in rows if r["kind"] == kind]) for kind in EDIT_KINDS}
        for label, numbers in (("all", table[m]), *by_kind[m].items()):
            print(f"{m:8s} {label:12s} {numbers['edit_accuracy']:14.3f} {numbers['frames_on_path']:12.3f} "
                  f"{numbers['motion_px']:10.2f} {numbers['temporal_iou']:13.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"clips": args.clips, "table": table, "by_kind": by_kind, "rows": totals}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
