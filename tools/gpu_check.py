#!/usr/bin/env python
"""Check tav on an NVIDIA GPU: the tiny UNet's forward and one train step on the GPU against the CPU.

MindSpore 2.10's wheel runs its GPU backend on the CUDA 11 runtime (it loads libcudart.so.11.0, cuDNN 8 and
cuBLAS 11; built for CUDA 11.1/11.6), and has no FlashAttention there: tav uses chunked attention on GPUs for large
score tensors. This script installs nothing. On a machine with an NVIDIA driver, the runtime libraries can come from
the package index:

    pip install nvidia-cuda-runtime-cu11 nvidia-cudnn-cu11 nvidia-cublas-cu11 nvidia-cufft-cu11 \
                nvidia-curand-cu11 nvidia-cusolver-cu11 nvidia-cusparse-cu11
    export LD_LIBRARY_PATH=$(python -c "import nvidia, os; d = os.path.dirname(nvidia.__path__[0]); \
        print(':'.join(os.path.join(d, 'nvidia', p, 'lib') for p in os.listdir(os.path.join(d, 'nvidia'))))"):$LD_LIBRARY_PATH
    python tools/gpu_check.py [--device_id 0]

It runs each part in its own process (MindSpore's device is fixed per process): the CPU reference first, then the
GPU, and prints the comparison: the UNet forward's max |GPU - CPU| relative to the output's scale, and the train
step's loss and the first trainable tensor's update. Exit status 0 when both agree (fp32: 1e-3 of the scale),
1 when they do not, 2 when the GPU backend cannot load (the message says what it needs).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TOLERANCE = 1e-3


def run_part(device, device_id, out_path):
    """In this process: configure `device`, run the tiny UNet forward and one train step, save the numbers."""
    import numpy as np

    import mindspore as ms

    from tav import backend

    backend.configure(device_target=device, mode=0, device_id=device_id if device == "GPU" else None)
    from tav.models.unet3d import UNet3DConditionModel
    from tav.optim import AdamW
    from tav.schedulers import SD_V1_SCHEDULE, DDIMScheduler
    from tav.tiny import TINY_UNET_CONFIG
    from tav.train_step import TrainStep, select_trainable

    rng = np.random.default_rng(0)
    frames = 4
    x = rng.standard_normal((1, 4, frames, 8, 8)).astype(np.float32)
    context = rng.standard_normal((1, 77, 32)).astype(np.float32)
    ms.set_seed(0)
    unet = UNet3DConditionModel(dict(TINY_UNET_CONFIG))
    weights = np.random.default_rng(1)
    for _, param in unet.parameters_and_names():  # the same weights on both devices
        param.set_data(ms.Tensor((weights.standard_normal(param.shape) * 0.05).astype(np.float32)))
    forward = unet(ms.Tensor(x), ms.Tensor(np.array([10], np.int64)), ms.Tensor(context)).asnumpy()

    trainable = select_trainable(unet, ["attn1.to_q", "attn2.to_q", "attn_temp"])
    before = trainable[0][1].asnumpy().copy()
    optimizer = AdamW(trainable, master_dtype=ms.float32)
    step = TrainStep(unet, optimizer, DDIMScheduler.from_config(SD_V1_SCHEDULE), 0.18215, None, 1.0, ms.float32)
    shape = (1, 4, frames, 8, 8)
    loss, finite, _ = step(ms.Tensor(rng.standard_normal(shape).astype(np.float32)),
                           ms.Tensor(np.full(shape, 0.1, np.float32)),
                           ms.Tensor(rng.standard_normal((1,) + shape).astype(np.float32)),
                           ms.Tensor(rng.standard_normal((1,) + shape).astype(np.float32)),
                           ms.Tensor(np.array([[500]], np.int64)), ms.Tensor(context),
                           ms.Tensor(1e-3, ms.float32), ms.Tensor(1.0, ms.float32))
    update = trainable[0][1].asnumpy() - before
    np.savez(out_path, forward=forward, loss=float(loss.asnumpy()), finite=bool(finite.asnumpy()), update=update,
             update_path=step.update_path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device_id", type=int, default=None)
    parser.add_argument("--part", choices=["CPU", "GPU"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part:
        run_part(args.part, args.device_id, args.out)
        return 0

    import numpy as np

    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for device in ("CPU", "GPU"):
            out = os.path.join(folder, f"{device}.npz")
            command = [sys.executable, os.path.abspath(__file__), "--part", device, "--out", out]
            if args.device_id is not None:
                command += ["--device_id", str(args.device_id)]
            proc = subprocess.run(command, capture_output=True, text=True)
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
                print(f"{device} part failed:\n  " + "\n  ".join(tail))
                return 2 if device == "GPU" and "could not load" in proc.stderr else 1
            with np.load(out) as data:
                results[device] = {k: data[k] for k in data.files}
    cpu, gpu = results["CPU"], results["GPU"]
    scale = float(np.abs(cpu["forward"]).max())
    forward_error = float(np.abs(gpu["forward"] - cpu["forward"]).max()) / scale
    update_scale = float(np.abs(cpu["update"]).max()) or 1.0
    update_error = float(np.abs(gpu["update"] - cpu["update"]).max()) / update_scale
    report = {"forward_max_rel_error": forward_error, "loss_cpu": float(cpu["loss"]), "loss_gpu": float(gpu["loss"]),
              "update_max_rel_error": update_error, "update_path_gpu": str(gpu["update_path"]),
              "finite_gpu": bool(gpu["finite"])}
    print(json.dumps(report, indent=1))
    ok = forward_error < TOLERANCE and update_error < 10 * TOLERANCE and bool(gpu["finite"])
    print("GPU agrees with CPU" if ok else "GPU and CPU DISAGREE")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
