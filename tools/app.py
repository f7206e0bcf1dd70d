#!/usr/bin/env python
"""Serve the tav web app: tune on a clip, edit it with new prompts, score the edits, from a browser.

    python tools/app.py [--host 127.0.0.1] [--port 7860] [--work_dir app_outputs] [--device_target CPU|GPU|Ascend]
                        [--eval_clip_model DIR] [--eval_pickscore_model DIR [--eval_pickscore_processor DIR]]

Needs the app extra (pip install -r requirements-app.txt; `make app` installs it and serves). Every upload, tuned
model, inversion and edit lives under --work_dir (docs/app.md). On a remote server, forward the port
(ssh -L 7860:127.0.0.1:7860 server) rather than binding 0.0.0.0. A bad option prints one `error: ...` line.
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tav.cli import run_cli  # noqa: E402


def parse_args(argv=None):
    from tav import backend

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--work_dir", default="app_outputs", help="uploads, tuned models, inversions and edits")
    p.add_argument("--eval_clip_model", help="a CLIP folder: frame consistency and text alignment of each edit")
    p.add_argument("--eval_pickscore_model", help="a PickScore folder: the PickScore of each edit")
    p.add_argument("--eval_pickscore_processor", help="the processor folder PickScore's model lacks, if it does")
    backend.add_device_arguments(p)
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine
    from tav import backend
    from tav.evaluation import Scorers

    backend.configure(device_target=args.device_target, device_id=args.device_id, jit_level=args.jit_level,
                      max_device_memory=args.max_device_memory)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for folder in (args.eval_clip_model, args.eval_pickscore_model, args.eval_pickscore_processor):
        if folder and not os.path.isdir(folder):
            raise FileNotFoundError(f"scoring model folder {folder!r} does not exist")
    scorers = Scorers.load(args.eval_clip_model, args.eval_pickscore_model, args.eval_pickscore_processor)
    work_dir = os.path.abspath(args.work_dir)
    os.makedirs(work_dir, exist_ok=True)
    from tav.app_ui import build_app

    page = build_app(work_dir, scorers if scorers else None)
    page.launch(server_name=args.host, server_port=args.port, allowed_paths=[work_dir], share=False, ssr_mode=False)


if __name__ == "__main__":
    sys.exit(run_cli(main))
