#!/usr/bin/env python
"""A library user's own training loop against tav's TrainStep, on a bench config's UNet (issue 11 section 8).

    python bench/user_loop.py --config small --steps 3           # every variant, one process each, then a table
    python bench/user_loop.py --config tiny --variant user_jit    # one variant

Variants (each times the loss + gradients of the official trainable set; train_step also runs its AdamW update):
  train_step         tav.train_step.TrainStep in GRAPH_MODE, what tools/train.py runs
  user_jit           select_trainable, then ms.jit(ms.value_and_grad(loss, None, params)) over the UNet, in the
                     process's default execution mode (PYNATIVE_MODE): the loop a MindSpore user writes first
  user_jit_graph     the same function under ms.jit, with GRAPH_MODE set first
  user_jit_tuple     as user_jit_graph with the weights as a ParameterTuple instead of a list
  user_cell          the same loss and value_and_grad as Cells (weights a ParameterTuple), called in GRAPH_MODE
  user_cell_jit      user_cell with ms.jit on its construct, in PYNATIVE_MODE
  loss_and_gradients the user's loss Cell through tav.train_step.LossAndGradients (the documented way), GRAPH_MODE
  user_jit_frozen_wgrad  as user_jit_graph, but requires_grad set by hand instead of select_trainable: the frozen
                     layers' native kernels still compute their weight gradients
Prints seconds for the first call (compile included) and the mean of the following steps. The numbers are for one
machine at one moment; rerun both sides together when comparing.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

VARIANTS = ("train_step", "loss_and_gradients", "user_jit", "user_jit_graph", "user_jit_tuple", "user_cell",
            "user_cell_jit", "user_jit_frozen_wgrad")


def run_variant(variant, config_name, steps, threads):
    import mindspore as ms
    from mindspore import ops

    from bench.configs import TEXT_TOKENS, get_config
    from tav.config import DEFAULT_TRAINABLE_MODULES
    from tav.models.unet3d import UNet3DConditionModel
    from tav.train_step import is_trainable, select_trainable

    ms.set_device("CPU")
    ms.device_context.cpu.op_tuning.threads_num(threads)
    if variant not in ("user_jit", "user_cell_jit"):
        ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_seed(0)
    config = get_config(config_name)
    unet = UNet3DConditionModel(dict(config.unet))
    unet.set_train(True)
    if variant == "user_jit_frozen_wgrad":
        trainable = []
        for name, param in unet.parameters_and_names():
            param.requires_grad = is_trainable(name, DEFAULT_TRAINABLE_MODULES)
            if param.requires_grad:
                trainable.append((name, param))
    else:
        trainable = select_trainable(unet, DEFAULT_TRAINABLE_MODULES)

    rng = np.random.default_rng(0)
    latent = (config.batch, 4, config.frames, config.latent, config.latent)
    context = ms.Tensor(rng.standard_normal((config.batch, TEXT_TOKENS, config.cross_attention_dim), dtype=np.float32))
    if variant == "train_step":
        from tav.optim import AdamW
        from tav.schedulers import SD_V1_SCHEDULE, DDIMScheduler
        from tav.train_step import TrainStep

        step_fn = TrainStep(unet, AdamW(trainable), DDIMScheduler(**SD_V1_SCHEDULE), 0.18215)
        mean = ms.Tensor(rng.standard_normal((1,) + latent[1:], dtype=np.float32))
        std = ms.Tensor(np.full((1,) + latent[1:], 0.1, np.float32))
        posterior_noise = ms.Tensor(rng.standard_normal((1,) + latent, dtype=np.float32))
        noise = ms.Tensor(rng.standard_normal((1,) + latent, dtype=np.float32))
        timesteps = ms.Tensor(rng.integers(0, 1000, (1, config.batch)).astype(np.int64))
        lr, scale = ms.Tensor(3e-5, ms.float32), ms.Tensor(1.0, ms.float32)

        def step():
            return float(step_fn(mean, std, posterior_noise, noise, timesteps, context, lr, scale)[0].asnumpy())
    else:
        noisy = ms.Tensor(rng.standard_normal(latent, dtype=np.float32))
        target = ms.Tensor(rng.standard_normal(latent, dtype=np.float32))
        timesteps = ms.Tensor(rng.integers(0, 1000, (config.batch,)).astype(np.int64))

        def loss_fn(x, t, ctx, y):
            return ops.mean(ops.square(unet(x, t, ctx) - y))

        params = [param for _, param in trainable]
        if variant == "user_jit_tuple":
            grad_fn = ms.jit(ms.value_and_grad(loss_fn, None, ms.ParameterTuple(params)))
        elif variant == "loss_and_gradients":
            from tav.train_step import LossAndGradients

            class UserLoss(ms.nn.Cell):
                def __init__(self):
                    super().__init__()
                    self.unet = unet

                def construct(self, x, t, ctx, y):
                    return ops.mean(ops.square(self.unet(x, t, ctx) - y))

            grad_fn = LossAndGradients(UserLoss(), trainable)
        elif variant in ("user_cell", "user_cell_jit"):
            class Loss(ms.nn.Cell):
                def __init__(self):
                    super().__init__()
                    self.unet = unet

                def construct(self, x, t, ctx, y):
                    return ops.mean(ops.square(self.unet(x, t, ctx) - y))

            class Grads(ms.nn.Cell):
                def __init__(self):
                    super().__init__()
                    self.grad_fn = ms.value_and_grad(Loss(), None, ms.ParameterTuple(params))

                def construct(self, x, t, ctx, y):
                    return self.grad_fn(x, t, ctx, y)

            grad_fn = Grads()
            if variant == "user_cell_jit":
                grad_fn.construct = ms.jit(grad_fn.construct)
        else:
            jit_level = os.environ.get("USER_LOOP_JIT_LEVEL")
            options = {"jit_level": jit_level} if jit_level else {}
            grad_fn = ms.jit(ms.value_and_grad(loss_fn, None, params), **options)

        def step():
            loss, grads = grad_fn(noisy, timesteps, context, target)
            return float(loss.asnumpy())

    started = time.perf_counter()
    step()
    first = time.perf_counter() - started
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return {"variant": variant, "config": config_name, "first_s": round(first, 2),
            "step_s": round(float(np.mean(times)), 3), "steps": steps, "threads": threads}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="small")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variant", choices=VARIANTS, help="run one variant in this process")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variants to run, one process each")
    args = p.parse_args(argv)
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.config, args.steps, args.threads)))
        return
    rows = []
    for variant in args.variants.split(","):
        run = subprocess.run([sys.executable, os.path.abspath(__file__), "--variant", variant, "--config", args.config,
                              "--steps", str(args.steps), "--threads", str(args.threads)],
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        if run.returncode != 0:
            print(f"{variant}: failed\n{run.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'variant':<24}{'first call s':>14}{'s/step':>10}   ({args.config}, {args.steps} steps, "
          f"{args.threads} threads)")
    for row in rows:
        print(f"{row['variant']:<24}{row['first_s']:>14}{row['step_s']:>10}")


if __name__ == "__main__":
    main()
