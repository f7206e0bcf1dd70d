#!/usr/bin/env python
"""Convert Stable Diffusion between one LDM-layout file and a diffusers folder.

    python tools/convert.py v1-5-pruned-emaonly.safetensors sd15/ --tokenizer_from clip-vit-large-patch14/
    python tools/convert.py sd_v2_768_v.ckpt sd21/ --prediction_type v_prediction --tokenizer_from sd21-tokenizer/
    python tools/convert.py sd15/ sd15.safetensors        # the inverse: a folder -> one file (PyTorch LDM names)
    python tools/convert.py sd15/ sd15_ms.ckpt            # -> a MindSpore .ckpt with mindone's names

A file is .safetensors, a PyTorch .ckpt (read without torch) or a MindSpore .ckpt (mindone's names); see
docs/checkpoints.md for what is inferred and what must be given. A bad input prints one `error: ...` line and exits 1.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="an SD single file, or a diffusers SD folder (for the inverse)")
    p.add_argument("out", help="the diffusers folder to write, or (from a folder) a .safetensors / .ckpt file")
    p.add_argument("--prediction_type", choices=("epsilon", "v_prediction", "sample"),
                   help="the scheduler's prediction type (SD 2.x 768 models: v_prediction; it is not in the tensors)")
    p.add_argument("--tokenizer_from", help="a CLIP tokenizer folder (vocab.json, merges.txt) or an SD folder")
    p.add_argument("--config_from", help="a diffusers SD folder whose unet/vae/text_encoder configs to use "
                                         "instead of inferring them (non-SD sizes)")
    p.add_argument("--layout", choices=("ldm", "mindone"), help="names of the file written by the inverse "
                                                                "(default: ldm for .safetensors, mindone for .ckpt)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from tav import ldm_checkpoint

    if os.path.exists(args.out) and not args.overwrite:
        print(f"error: {args.out!r} exists; pass --overwrite to replace it", file=sys.stderr)
        return 1
    try:
        if os.path.isdir(args.src):
            path = ldm_checkpoint.write_single_file(args.src, args.out, layout=args.layout)
        else:
            model = ldm_checkpoint.convert_single_file(args.src, config_from=args.config_from)
            path = ldm_checkpoint.write_diffusers_folder(model, args.out, args.prediction_type, args.tokenizer_from,
                                                         args.config_from)
    except (OSError, ValueError, ldm_checkpoint.CheckpointError) as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {os.path.abspath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
