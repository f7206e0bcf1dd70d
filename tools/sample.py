#!/usr/bin/env python
"""Invert a clip (or load inverted latents) and sample edited videos with a Tune-A-Video model.

With no arguments it runs the embedded tiny model end to end on a clip it generates (random weights: the
videos are noise; point --pretrained_model_path at a Stable Diffusion 1.x folder for real results).

A bad input prints one `error: ...` line and exits 1; --debug shows the traceback instead.
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tav import backend  # noqa: E402
from tav.cli import run_cli  # noqa: E402
from tav.kernels import ATTENTION_BACKENDS  # noqa: E402
from tav.video import WRITE_FORMATS  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_path",
                   help="Stable Diffusion folder in diffusers layout, or one checkpoint file in the original LDM "
                        "layout (.safetensors, PyTorch .ckpt, mindone's MindSpore .ckpt; docs/checkpoints.md)")
    p.add_argument("--prediction_type", choices=("epsilon", "v_prediction", "sample"),
                   help="a single file's prediction type (SD 2.x 768 models: v_prediction; the tensors cannot tell; "
                        "default: an LDM <stem>.yaml beside the file, else --config_from's scheduler, else epsilon)")
    p.add_argument("--tokenizer_from",
                   help="a single file's tokenizer: a CLIP tokenizer folder (vocab.json, merges.txt) or an SD folder")
    p.add_argument("--config_from", help="a diffusers SD folder whose unet/vae/text_encoder configs a single file "
                                         "uses instead of SD's published values (non-SD sizes)")
    p.add_argument("--converted_cache_dir",
                   help="keep a single file's converted diffusers folder here and reuse it while the file is "
                        "unchanged (default: a temporary folder removed on exit)")
    p.add_argument("--lora", action="append", dest="loras", metavar="PATH[:SCALE]",
                   help="a LoRA file (diffusers or kohya .safetensors) fused into the UNet and text encoder after "
                        "--unet is applied, scale default 1 (repeatable, applied in order)")
    p.add_argument("--unet", help="tuned UNet folder (or pipeline folder with unet/) or a trainable-only delta file; "
                   "when its folder holds the training run's config.yaml, that run's validation steps, inversion "
                   "steps and guidance scale are the defaults (flags and --config override them)")
    p.add_argument("--no_check_base", dest="check_base", action="store_false", default=None,
                   help="apply a --unet delta even when the base model's weights differ from those it was tuned on")
    p.add_argument("--prompt", action="append", dest="prompts", help="a prompt (repeat for several)")
    p.add_argument("--prompts_file", help="a text file with one prompt per line")
    p.add_argument("--video", help="source clip to invert (mp4/gif/webm)")
    p.add_argument("--source_prompt", help="the clip's caption (used for inversion with --invert_with_source_prompt)")
    p.add_argument("--invert_with_source_prompt", action="store_true",
                   help="condition DDIM inversion on --source_prompt instead of the empty prompt (official: empty)")
    p.add_argument("--inv_latents", help="inverted latents saved earlier (.safetensors or .npy)")
    p.add_argument("--config", help="an official Tune-A-Video training YAML: its validation_data is used")
    p.add_argument("--num_inference_steps", type=int)
    p.add_argument("--num_inv_steps", type=int)
    p.add_argument("--guidance_scale", type=float)
    p.add_argument("--negative_prompt")
    p.add_argument("--num_videos_per_prompt", type=int)
    p.add_argument("--eta", type=float)
    p.add_argument("--video_length", type=int)
    p.add_argument("--window", type=int,
                   help="frames per UNet call (video frame 0 and the previous frame included): long videos are "
                        "inverted and sampled in overlapping windows fused at every step, so memory follows the "
                        "window, not --video_length (docs/long-videos.md)")
    p.add_argument("--window_overlap", type=int,
                   help="frames neighbouring windows share (default window // 3, at most window - 3)")
    p.add_argument("--height", type=int,
                   help="frame height (default: the base model's size, unet sample_size x the VAE's factor)")
    p.add_argument("--width", type=int, help="frame width (default: as --height)")
    p.add_argument("--sample_start_idx", type=int)
    p.add_argument("--sample_frame_rate", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--output_dir")
    p.add_argument("--format", action="append", dest="fmt", choices=WRITE_FORMATS,
                   help="output format (repeatable; default gif; png = one file per frame)")
    p.add_argument("--fps", type=int)
    p.add_argument("--eval_clip_model", help="a transformers CLIP folder (e.g. clip-vit-large-patch14): score every "
                                             "written video (frame consistency, text alignment) into "
                                             "OUTPUT_DIR/scores.json, as LOVEU-TGVE does (docs/evaluation.md)")
    p.add_argument("--pickscore_model", help="a PickScore CLIP folder: add PickScore to the scores")
    p.add_argument("--pickscore_processor", help="PickScore's image processor folder (default: --pickscore_model)")
    backend.add_device_arguments(p)  # --device_target (default: MindSpore's), --device_id, --jit_level, ...
    p.add_argument("--mode", type=int, default=0, choices=[0, 1], help="0 graph (default), 1 pynative")
    p.add_argument("--attention", choices=ATTENTION_BACKENDS)
    p.add_argument("--dtype", choices=["fp32", "fp16"])
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p.parse_args(argv)


def build_request(args):
    from tav import demo, generate

    prompts = list(args.prompts or [])
    if args.prompts_file:
        if not os.path.isfile(args.prompts_file):
            raise FileNotFoundError(f"--prompts_file {args.prompts_file!r} does not exist")
        with open(args.prompts_file, encoding="utf-8") as handle:  # blank lines separate prompts, they are not ones
            prompts += [line.strip() for line in handle if line.strip()]
    options = {k: v for k, v in vars(args).items() if k in generate.request_fields() and v is not None}
    options.pop("prompts", None)
    if prompts:
        options["prompts"] = prompts
    elif args.prompts_file:  # asked for prompts and got none: not a reason to fall back to the config's or demo's
        raise generate.PipelineError(generate.NO_PROMPT)
    if args.config:
        return generate.request_from_config(args.config, **options)
    if not args.pretrained_model_path:
        print("no --pretrained_model_path: using the embedded tiny model (random weights, so the videos are noise)")
        return demo.demo_sample_request(**options)
    from_run = {k: v for k, v in generate.tuned_run_defaults(args.unet).items() if k not in options}
    if from_run:
        print("settings from the tuned run's config (flags override them): "
              + ", ".join(f"{k}={v}" for k, v in from_run.items()))
    return generate.SampleRequest(**{**from_run, **options})


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    backend.configure(device_target=args.device_target, mode=args.mode, jit_level=args.jit_level,
                      device_id=args.device_id, max_device_memory=args.max_device_memory)
    from tav import generate
    from tav.memory_plan import check_run_fits

    request = build_request(args)
    check_run_fits(request.pretrained_model_path, "sample", request.window or request.video_length, request.height,
                   request.width, request.dtype, args.max_device_memory)  # before any weight is loaded
    written = generate.run_sampling(request)
    print(f"wrote {len(written)} file(s) to {os.path.abspath(request.output_dir)}:")
    for path in written:
        print("  " + str(path))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
