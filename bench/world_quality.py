"""The world model's quality: one image per caption (36), DDIM + classifier-free guidance, judged by the
pixel-level reader of tav.world (background, color, shape). Prints the table and the fraction right.

    python bench/world_quality.py PIPELINE_DIR [--steps 25] [--guidance 7.5] [--seed 0] [--json OUT.json]
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def measure(pipeline_dir, steps=25, guidance=7.5, seed=0, images_per_caption=1):
    """{caption: [{"background", "color", "shape", "right"} per image]}, and the fraction right overall."""
    import numpy as np

    from tav import world
    from tav.pipeline import TuneAVideoPipeline

    pipeline = TuneAVideoPipeline.from_pretrained(pipeline_dir, init_seed=seed)
    rows, right = {}, 0
    for i, scene in enumerate(world.all_scenes()):
        videos = pipeline([scene.caption], video_length=1, height=64, width=64, num_inference_steps=steps,
                          guidance_scale=guidance, seed=seed + 1000 * i, num_videos_per_prompt=images_per_caption)
        rows[scene.caption] = []
        for video in videos:
            frame = (np.clip(video[:, 0].transpose(1, 2, 0), 0, 1) * 255).round().astype(np.uint8)
            reading = world.read_frame(frame)
            ok = reading.matches(scene)
            right += ok
            rows[scene.caption].append({"background": reading.background, "color": reading.color,
                                        "shape": reading.shape, "right": bool(ok)})
    return rows, right / (36 * images_per_caption)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipeline_dir")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images_per_caption", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the table here")
    args = parser.parse_args(argv)
    from tav import backend

    backend.configure(device_target="CPU", mode=0)  # and MindSpore's CPU threads to the cores available
    rows, fraction = measure(args.pipeline_dir, args.steps, args.guidance, args.seed, args.images_per_caption)
    print(f"{'caption':45s} {'read as':40s} right")
    for caption, readings in rows.items():
        for r in readings:
            print(f"{caption:45s} {str(r['color']) + ' ' + str(r['shape']) + ' / ' + r['background']:40s} "
                  f"{'yes' if r['right'] else 'no'}")
    print(f"fraction right: {fraction:.3f} ({args.steps} DDIM steps, guidance {args.guidance}, seed {args.seed})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"fraction_right": fraction, "steps": args.steps, "guidance": args.guidance,
                       "seed": args.seed, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
