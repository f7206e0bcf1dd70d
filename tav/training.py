"""One-shot tuning of the inflated UNet on one clip, as the official `train_tuneavideo.py` (reference section 2).

    config = tav.config.load_train_config("configs/man-skiing.yaml")
    result = tav.training.train(config)          # result.losses, result.delta_path, result.output_dir

Read top to bottom: which tensors train (`select_trainable`), the numbers that steer a step (`precision_plan`,
`learning_rate_at`, `DynamicLossScale`), the optimiser (`AdamW`, torch.optim.AdamW's arithmetic), the train step
(`TrainStep`: the compiled loss-and-gradients graph, then the update), the trainable-only delta checkpoint
(`save_delta` / `apply_delta`), resumable checkpoints, validation, and the loop (`train`).

Randomness: the per-step draws (VAE posterior noise, one timestep per video, the diffusion noise) come from a numpy
Generator seeded with config.seed and enter the compiled step as Tensors. Its state is saved in every checkpoint,
so a resumed run draws the same numbers as an uninterrupted one.
"""
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time

import numpy as np

import mindspore as ms
from mindspore import nn, ops

from tav import backend, checkpoint
from tav.config import ConfigError, check_input_paths
from tav.kernels.native_ops import HostOptimizerKernels, adamw_update_op
from tav.nn import match_weight_gradients

logger = logging.getLogger("tav.train")

DELTA_FORMAT = "tav-unet-delta/1"
DELTA_NAME = "unet_delta.safetensors"
OPTIMIZER_NAME = "optimizer.safetensors"
STATE_NAME = "training_state.json"
CHECKPOINT_PREFIX = "checkpoint-"
PIPELINE_PARTS = ("vae", "text_encoder", "tokenizer", "scheduler")


class TrainingError(RuntimeError):
    """Training cannot go on (bad input, NaN loss, ...); the message says why and what was kept."""


# ---------------------------------------------------------------------------------------------------------------
# What trains


def module_paths(parameter_name):
    """The module paths that contain a parameter: 'a.b.c.weight' -> ['a', 'a.b', 'a.b.c']."""
    parts = parameter_name.split(".")[:-1]
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def is_trainable(parameter_name, trainable_modules):
    """The official rule: a parameter trains iff the qualified name of a module containing it ends with one of
    `trainable_modules` (plain string suffix, as `name.endswith(tuple(trainable_modules))`). So "attn_temp"
    selects every tensor of attn_temp but not norm_temp, and "attn1.to_q" selects attn1.to_q.weight."""
    suffixes = tuple(trainable_modules)
    return any(path.endswith(suffixes) for path in module_paths(parameter_name))


def select_trainable(unet, trainable_modules):
    """[(name, Parameter)] of the tensors that train; every other UNet parameter gets requires_grad=False."""
    selected = []
    for name, param in unet.parameters_and_names():
        param.requires_grad = is_trainable(name, trainable_modules)
        if param.requires_grad:
            selected.append((name, param))
    if not selected:
        raise ConfigError(f"trainable_modules {list(trainable_modules)} match no UNet module; expected suffixes of "
                          f"module names such as attn1.to_q, attn2.to_q, attn_temp")
    match_weight_gradients(unet)  # frozen layers' native backward kernels skip their weight gradients
    return selected


def delta_keys(unet, trainable_names):
    """What a delta checkpoint stores: the trained tensors plus every temporal tensor (attn_temp.*, norm_temp.*).
    The temporal layers are not in the base SD checkpoint and start from a random init, so storing them all makes
    the delta reproduce the tuned model exactly whatever trains."""
    keep = set(trainable_names)
    return [name for name, _ in unet.parameters_and_names() if name in keep or "_temp." in name]


# ---------------------------------------------------------------------------------------------------------------
# Precision, learning rate, loss scale


@dataclasses.dataclass(frozen=True)
class PrecisionPlan:
    compute_dtype: object  # ms.float32 / ms.float16 / ms.bfloat16: the UNet's weights and activations
    loss_scaling: bool  # dynamic loss scaling (fp16 only)
    notice: str = ""


def precision_plan(mixed_precision, device_target):
    """What `mixed_precision` means on `device_target`: fp16 on Ascend/GPU with dynamic loss scaling, bf16 on
    Ascend; fp32 otherwise (CPU always), with a one-line notice when the request is not honoured. In fp16/bf16 the
    trainable tensors keep fp32 master copies in the optimiser and the loss is computed in fp32."""
    requested = mixed_precision or "no"
    device = backend.normalise_device_target(device_target)
    if requested == "fp16" and device in ("Ascend", "GPU"):
        return PrecisionPlan(ms.float16, True)
    if requested == "bf16" and device == "Ascend":
        return PrecisionPlan(ms.bfloat16, False)
    if requested == "no":
        return PrecisionPlan(ms.float32, False)
    where = "Ascend or GPU" if requested == "fp16" else "Ascend"
    return PrecisionPlan(ms.float32, False, f"mixed_precision: {requested} runs on {where} only; training in fp32 "
                                            f"on {device}")


def lr_multiplier(name, step, warmup_steps, total_steps):
    """diffusers' get_scheduler schedules as a multiplier of the base learning rate for 0-based update `step`
    (torch LambdaLR stepped after each optimizer.step, so update 0 uses lambda(0))."""
    if name == "constant":
        return 1.0
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if name == "constant_with_warmup":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if name == "linear":
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    if name == "cosine":  # num_cycles 0.5
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))
    if name == "cosine_with_restarts":  # num_cycles 1
        if progress >= 1.0:
            return 0.0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((1.0 * progress) % 1.0))))
    if name == "polynomial":  # lr_end 1e-7, power 1.0, relative to the base lr
        raise ValueError("use polynomial_lr for the polynomial schedule (it depends on the base learning rate)")
    raise ValueError(f"unknown lr_scheduler {name!r}")


def learning_rate_at(config, step):
    """The learning rate of 0-based optimiser update `step`."""
    base = config.effective_learning_rate()
    warmup, total = config.lr_warmup_steps, config.max_train_steps
    if config.lr_scheduler == "polynomial":
        lr_end, power = 1e-7, 1.0
        if step < warmup:
            return base * step / max(1, warmup)
        if step > total:
            return lr_end
        remaining = 1 - (step - warmup) / max(1, total - warmup)
        return (base - lr_end) * remaining ** power + lr_end
    return base * lr_multiplier(config.lr_scheduler, step, warmup, total)


class DynamicLossScale:
    """torch.cuda.amp.GradScaler's schedule (accelerate's fp16 default): start at 2**16, halve on a non-finite
    gradient (that step is skipped), double after 2000 finite steps in a row. Kept on the host; the compiled step
    only multiplies by it and reports whether the gradients were finite."""

    def __init__(self, scale=2.0 ** 16, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000, enabled=True):
        self.scale = float(scale) if enabled else 1.0
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.enabled = enabled
        self.good_steps = 0

    def update(self, finite):
        if not self.enabled:
            return
        if finite:
            self.good_steps += 1
            if self.good_steps == self.growth_interval:
                self.scale *= self.growth_factor
                self.good_steps = 0
        else:
            self.scale = max(self.scale * self.backoff_factor, 1.0)
            self.good_steps = 0

    def state_dict(self):
        return {"scale": self.scale, "good_steps": self.good_steps, "enabled": self.enabled}

    def load_state_dict(self, state):
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])


# ---------------------------------------------------------------------------------------------------------------
# The optimiser


class AdamW(nn.Cell):
    """torch.optim.AdamW, step for step: decoupled weight decay p *= 1 - lr*wd, bias-corrected moments,
    p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps).

    `named_params` are the model's trainable Parameters. With `master_dtype` differing from their dtype (fp16/bf16
    training) the optimiser keeps fp32 master copies, updates those and writes them back cast to the model's
    dtype. Moments are fp32 and named `exp_avg.<param>` / `exp_avg_sq.<param>`; `step` counts updates.
    Written here rather than taken from MindSpore: nn.AdamWeightDecay has no bias correction, mint.optim.AdamW has
    no CPU kernel, and mindspore.experimental.optim.AdamW bakes a float lr into the graph and allocates an amsgrad
    buffer per parameter.
    """

    def __init__(self, named_params, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, master_dtype=ms.float32):
        super().__init__()
        self.names = [name for name, _ in named_params]
        self.model_params = ms.ParameterTuple([param for _, param in named_params])
        self.use_master = any(param.dtype != master_dtype for _, param in named_params)
        if self.use_master:
            self.master = ms.ParameterTuple([
                ms.Parameter(param.astype(master_dtype), name=f"master.{name}", requires_grad=False)
                for name, param in named_params])
        else:
            self.master = self.model_params
        self.exp_avg = ms.ParameterTuple([
            ms.Parameter(ops.zeros(param.shape, ms.float32), name=f"exp_avg.{name}", requires_grad=False)
            for name, param in named_params])
        self.exp_avg_sq = ms.ParameterTuple([
            ms.Parameter(ops.zeros(param.shape, ms.float32), name=f"exp_avg_sq.{name}", requires_grad=False)
            for name, param in named_params])
        self.step = ms.Parameter(ms.Tensor(0, ms.int32), name="adamw.step", requires_grad=False)
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        # 1 - beta in Python's double, as torch computes it: written as `1.0 - self.beta2` inside a compiled graph
        # MindSpore subtracts in fp32 (0.00099998713 instead of 0.001, a 1.3e-5 relative error in exp_avg_sq).
        self.one_minus_beta1, self.one_minus_beta2 = 1.0 - self.beta1, 1.0 - self.beta2
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        # On CPU one fused op per tensor (kernels/cpu/optim.cc, the same arithmetic in the same order) instead of
        # ~15: MindSpore's graph keeps memory per op, ~300 MiB for this step at the small bench config.
        self.fused_update = None
        if master_dtype == ms.float32 and backend.use_native_kernel("optim"):
            self.fused_update = adamw_update_op()
        # CPU, fp32 weights: host_update runs optim.cc's in-place step on the tensors' own storage (TrainStep).
        self.host_kernels = None
        if not self.use_master and backend.use_native_kernel("optim") and all(
                HostOptimizerKernels.shares_storage(t) for t in (*self.master, *self.exp_avg, *self.exp_avg_sq)):
            self.host_kernels = HostOptimizerKernels()

    def construct(self, grads, lr):
        return self.update(grads, lr)

    def update(self, grads, lr):
        """One step on `grads` (one per trainable tensor, in order). Inside a compiled function call the Cell;
        call this method to run the update eagerly (calling the Cell in GRAPH_MODE compiles it on its own)."""
        step = self.step + 1
        ops.assign(self.step, step)
        t = step.astype(ms.float32)
        bias_correction1 = 1.0 - ops.pow(ms.Tensor(self.beta1, ms.float32), t)
        bias_correction2_sqrt = ops.sqrt(1.0 - ops.pow(ms.Tensor(self.beta2, ms.float32), t))
        step_size = lr / bias_correction1
        decay = 1.0 - lr * self.weight_decay
        scalars = None
        if self.fused_update is not None:
            scalars = ops.stack([step_size.astype(ms.float32), decay.astype(ms.float32),
                                 bias_correction2_sqrt.astype(ms.float32), ms.Tensor(self.one_minus_beta1, ms.float32),
                                 ms.Tensor(self.beta2, ms.float32), ms.Tensor(self.one_minus_beta2, ms.float32),
                                 ms.Tensor(self.eps, ms.float32)])
        for i in range(len(self.master)):
            grad = grads[i].astype(ms.float32)
            master = self.master[i]
            if self.fused_update is not None:
                updated, exp_avg, exp_avg_sq = self.fused_update(master, grad, self.exp_avg[i], self.exp_avg_sq[i],
                                                                  scalars)
            else:
                exp_avg = self.exp_avg[i] + self.one_minus_beta1 * (grad - self.exp_avg[i])  # torch: lerp_
                exp_avg_sq = self.beta2 * self.exp_avg_sq[i] + self.one_minus_beta2 * grad * grad
                denom = ops.sqrt(exp_avg_sq) / bias_correction2_sqrt + self.eps
                updated = master * decay - step_size * exp_avg / denom
            ops.assign(self.exp_avg[i], exp_avg)
            ops.assign(self.exp_avg_sq[i], exp_avg_sq)
            ops.assign(master, updated)
            if self.use_master:
                ops.assign(self.model_params[i], updated.astype(self.model_params[i].dtype))
        return step

    def host_update(self, grads, lr, denominator=1.0, clip_coef=1.0):
        """The same step on CPU, in place on the tensors' storage (needs self.host_kernels): `grads` are float32
        numpy arrays, the step's gradient is (grad / denominator) * clip_coef (unscale, then clip). Step size,
        decay and bias corrections are computed in double, as torch's AdamW computes them."""
        step = int(self.step.asnumpy()) + 1
        self.step.set_data(ms.Tensor(step, ms.int32))
        lr = float(lr)
        scalars = np.array([denominator, clip_coef, lr / (1.0 - self.beta1 ** step), 1.0 - lr * self.weight_decay,
                            math.sqrt(1.0 - self.beta2 ** step), self.one_minus_beta1, self.beta2,
                            self.one_minus_beta2, self.eps], np.float32)
        for grad, param, exp_avg, exp_avg_sq in zip(grads, self.master, self.exp_avg, self.exp_avg_sq):
            self.host_kernels.adamw_step(param.asnumpy(), grad, exp_avg.asnumpy(), exp_avg_sq.asnumpy(), scalars)
        return step

    # -- state for checkpoints (host side)
    def master_state(self):
        """{name: fp32 array}: the tuned values (the fp32 masters in mixed precision)."""
        return {name: param.asnumpy().astype(np.float32) if param.dtype != ms.bfloat16
                else param.astype(ms.float32).asnumpy() for name, param in zip(self.names, self.master)}

    def state_arrays(self):
        out = {}
        for name, m, v in zip(self.names, self.exp_avg, self.exp_avg_sq):
            out[f"exp_avg.{name}"] = m.asnumpy()
            out[f"exp_avg_sq.{name}"] = v.asnumpy()
        return out

    def load_state_arrays(self, arrays, step, source):
        expected = set(self.state_arrays_names())
        got = set(arrays)
        if expected != got:
            missing, extra = sorted(expected - got), sorted(got - expected)
            raise checkpoint.CheckpointMismatchError(
                f"{source}: optimizer state does not match the trainable tensors: {len(missing)} missing "
                f"{missing[:5]}, {len(extra)} unexpected {extra[:5]} (was trainable_modules changed?)")
        for name, m, v in zip(self.names, self.exp_avg, self.exp_avg_sq):
            for param, key in ((m, f"exp_avg.{name}"), (v, f"exp_avg_sq.{name}")):
                if tuple(arrays[key].shape) != tuple(param.shape):
                    raise checkpoint.CheckpointMismatchError(
                        f"{source}: {key} has shape {arrays[key].shape}, expected {tuple(param.shape)}")
                param.set_data(ms.Tensor(arrays[key].astype(np.float32)))
        self.step.set_data(ms.Tensor(int(step), ms.int32))

    def load_master(self, arrays):
        """Set the fp32 masters (and the model copies) from {name: array}."""
        for name, master, param in zip(self.names, self.master, self.model_params):
            master.set_data(ms.Tensor(arrays[name].astype(np.float32), master.dtype))
            if self.use_master:
                param.set_data(ms.Tensor(arrays[name].astype(np.float32)).astype(param.dtype))

    def state_arrays_names(self):
        return [f"{kind}.{name}" for name in self.names for kind in ("exp_avg", "exp_avg_sq")]


def global_norm(grads):
    """sqrt of the sum of squares of every gradient, in fp32 (torch.nn.utils.clip_grad_norm_'s total norm)."""
    squares = [ops.sum(ops.square(g.astype(ms.float32))) for g in grads]
    return ops.sqrt(ops.addn(squares))


def clip_by_global_norm(grads, max_norm, total_norm):
    """torch's clip_grad_norm_: multiply every gradient by min(1, max_norm / (total_norm + 1e-6))."""
    coef = ops.minimum(max_norm / (total_norm + 1e-6), 1.0)
    return tuple(g * coef.astype(g.dtype) for g in grads)


# ---------------------------------------------------------------------------------------------------------------
# The compiled train step


class DiffusionLoss(nn.Cell):
    """The noise-prediction loss of one micro-step, times the loss scale:

        construct(mean, std, posterior_noise, noise, timesteps, context, loss_scale) -> loss * loss_scale

    mean, std (1, 4, F, h, w): the clip's VAE posterior; posterior_noise, noise (B, 4, F, h, w); timesteps (B,)
    int64; context (B, 77, D). latents = (mean + std * posterior_noise - shift) * scaling_factor, noisy =
    add_noise(latents, noise, t), target = noise (epsilon) or the velocity (v_prediction), fp32 MSE."""

    def __init__(self, unet, scheduler, scaling_factor, shift_factor=None, compute_dtype=ms.float32):
        super().__init__()
        prediction_type = scheduler.config.prediction_type
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"cannot train a {prediction_type!r} model: prediction_type must be epsilon or "
                             "v_prediction")
        self.unet = unet
        self.alphas_cumprod = ms.Tensor(np.asarray(scheduler.alphas_cumprod, np.float32))
        self.scaling_factor = float(scaling_factor)
        self.shift = 0.0 if shift_factor is None else float(shift_factor)
        self.use_velocity = prediction_type == "v_prediction"
        self.compute_dtype = compute_dtype

    def construct(self, mean, std, posterior_noise, noise, timesteps, context, loss_scale):
        latents = (mean + std * posterior_noise - self.shift) * self.scaling_factor
        alphas = ops.gather(self.alphas_cumprod, timesteps, 0).reshape(-1, 1, 1, 1, 1)
        sqrt_alpha, sqrt_one_minus_alpha = ops.sqrt(alphas), ops.sqrt(1.0 - alphas)
        noisy = sqrt_alpha * latents + sqrt_one_minus_alpha * noise
        target = sqrt_alpha * noise - sqrt_one_minus_alpha * latents if self.use_velocity else noise
        prediction = self.unet(noisy.astype(self.compute_dtype), timesteps, context.astype(self.compute_dtype))
        loss = ops.mean(ops.square(prediction.astype(ms.float32) - target.astype(ms.float32)))
        return loss * loss_scale


class MicroStepGradients(nn.Cell):
    """The compiled part of a train step: the (scaled) loss of one micro-step and its gradients with respect to
    `weights`, in their order and dtypes. (Casting them to fp32 here, as a generator over the tuple, added ~90
    MiB to the CPU graph's compile memory at the small bench config: TrainStep casts the non-fp32 ones eagerly.)"""

    def __init__(self, loss, weights):
        super().__init__()
        self.loss = loss
        self.grad_fn = ms.value_and_grad(loss, None, weights)

    def construct(self, mean, std, posterior_noise, noise, timesteps, context, loss_scale):
        loss, grads = self.grad_fn(mean, std, posterior_noise, noise, timesteps, context, loss_scale)
        return loss, grads


class TrainStep:
    """One optimiser update, what `train` calls every step:

        train_step(mean, std, posterior_noise, noise, timesteps, context, lr, loss_scale) -> (loss, finite, norm)

    mean, std: the frozen VAE's posterior of the clip (1, 4, F, h, w), fp32, computed once. Per update, with A
    accumulation micro-steps and B videos per micro-step: posterior_noise and noise (A, B, 4, F, h, w), timesteps
    (A, B) int64, context (B, 77, D). Each micro-step's loss and gradients come from one compiled graph
    (`MicroStepGradients` over `DiffusionLoss`); their sums are then averaged, unscaled by loss_scale, checked
    for finiteness, clipped to max_grad_norm and given to AdamW with learning rate `lr` -- all skipped when a
    gradient is not finite (fp16 overflow). Returns the unscaled mean loss, whether the update was applied, and
    the pre-clip gradient norm.

    Why two parts: the gradient graph is the expensive one; the update is ~10 small ops per trainable tensor.
    Compiled into the same graph it cost ~400 MiB of host memory on CPU (MindSpore keeps memory per graph node).
    So on Ascend/GPU it is a second compiled graph (tav.backend.compile_optimizer_update); on CPU it runs on the
    host: the gradients' and weights' numpy views (Tensor.asnumpy shares a CPU tensor's storage) go to optim.cc's
    norm and in-place AdamW kernels, ~8 ms a step where the same ops run eagerly took ~78 ms (the eager form remains
    for fp16 weights with fp32 masters, or without the native kernels). After the gradient graph compiles, the
    heap's freed pages go back to the OS (tav.backend.compile_ahead).
    """

    def __init__(self, unet, optimizer, scheduler, scaling_factor, shift_factor=None, max_grad_norm=1.0,
                 compute_dtype=ms.float32):
        self.optimizer = optimizer
        self.max_grad_norm = float(max_grad_norm)
        loss = DiffusionLoss(unet, scheduler, scaling_factor, shift_factor, compute_dtype)
        self.gradients = MicroStepGradients(loss, optimizer.model_params)
        self.compiled_update = backend.compile_optimizer_update()
        self.host_update = not self.compiled_update and optimizer.host_kernels is not None
        self.update = ms.jit(self._make_update()) if self.compiled_update else self._make_update()

    def __call__(self, mean, std, posterior_noise, noise, timesteps, context, lr, loss_scale):
        micro_steps = posterior_noise.shape[0]
        loss, grads = None, None
        for i in range(micro_steps):
            args = (mean, std, posterior_noise[i], noise[i], timesteps[i], context, loss_scale)
            backend.compile_ahead(self.gradients, *args)
            micro_loss, micro_grads = self.gradients(*args)
            micro_grads = tuple(g if g.dtype == ms.float32 else g.astype(ms.float32) for g in micro_grads)
            if grads is None:
                loss, grads = micro_loss, micro_grads
            else:
                loss = loss + micro_loss
                grads = tuple(g + h for g, h in zip(grads, micro_grads))
        if self.host_update:
            return self._update_on_host(grads, loss, np.float32(loss_scale.asnumpy()) * np.float32(micro_steps), lr)
        denominator = loss_scale * micro_steps
        if self.compiled_update:
            return self.update(ms.mutable(grads), loss, denominator, lr)
        return self.update(grads, loss, denominator, lr)

    def _update_on_host(self, grads, loss, denominator, lr):
        finite, norm = update_on_host(self.optimizer, [g.asnumpy() for g in grads], denominator, float(lr.asnumpy()),
                                      self.max_grad_norm)
        return loss / ms.Tensor(denominator), ms.Tensor(finite), ms.Tensor(norm, ms.float32)

    def _make_update(self):
        """update(grads, loss_sum, denominator, lr) -> (loss, finite, norm); the same function runs eagerly or
        compiled (ms.jit), where optimizer.update is inlined."""
        optimizer, max_grad_norm = self.optimizer, self.max_grad_norm

        def update(grads, loss, denominator, lr):
            grads = tuple(g / denominator for g in grads)
            finite = ms.amp.all_finite(grads)
            norm = global_norm(grads)
            if finite:
                optimizer.update(clip_by_global_norm(grads, max_grad_norm, norm), lr)
            return loss / denominator, finite, norm

        return update


def update_on_host(optimizer, grads, denominator, lr, max_grad_norm):
    """A CPU train step's update on the host: grads are float32 numpy arrays (the summed, still scaled gradients,
    in the optimiser's order), denominator the loss scale times the micro-steps. Computes the norm of grads /
    denominator and whether all are finite (optim.cc, one pass each), then -- when finite -- clip_grad_norm_'s
    coefficient (fp32, as torch) and the AdamW step in place (AdamW.host_update). Returns (finite, norm)."""
    kernels = optimizer.host_kernels
    total, finite = 0.0, True
    for grad in grads:
        squares, grad_finite = kernels.unscaled_sum_squares(grad, denominator)
        total, finite = total + squares, finite and grad_finite
    norm = np.float32(math.sqrt(total))
    if finite:
        clip_coef = min(np.float32(max_grad_norm) / (norm + np.float32(1e-6)), np.float32(1.0))
        optimizer.host_update(grads, lr, denominator, clip_coef)
    return finite, norm


def build_train_step(unet, optimizer, scheduler, scaling_factor, shift_factor=None, max_grad_norm=1.0,
                     compute_dtype=ms.float32):
    """The TrainStep that `train` runs (see TrainStep for its inputs and outputs)."""
    return TrainStep(unet, optimizer, scheduler, scaling_factor, shift_factor, max_grad_norm, compute_dtype)


class StepNoise:
    """The per-update random draws, from a numpy Generator whose state goes into checkpoints."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)

    def draw(self, micro_steps, batch, latent_shape, num_train_timesteps):
        """(posterior_noise, noise, timesteps) for one update; latent_shape = (4, F, h, w). Per micro-step the
        order is posterior noise, timesteps, noise (the official order: VAE sample, randn_like, randint)."""
        posterior, noise, timesteps = [], [], []
        for _ in range(micro_steps):
            posterior.append(self.rng.standard_normal((batch,) + tuple(latent_shape), dtype=np.float32))
            timesteps.append(self.rng.integers(0, num_train_timesteps, size=(batch,), dtype=np.int64))
            noise.append(self.rng.standard_normal((batch,) + tuple(latent_shape), dtype=np.float32))
        return np.stack(posterior), np.stack(noise), np.stack(timesteps)

    def state(self):
        return self.rng.bit_generator.state

    def set_state(self, state):
        self.rng.bit_generator.state = state


# ---------------------------------------------------------------------------------------------------------------
# Delta checkpoints: the tuned tensors on top of a named base model


def unet_config_sha256(unet):
    """sha256 of the UNet's normalised config (what the architecture is), independent of the file's spelling."""
    config = unet.config.to_dict()
    config.pop("_diffusers_version", None)
    config.pop("sample_size", None)
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def weights_fingerprint(unet, exclude=()):
    """A cheap fingerprint of the base weights: name, shape and 64 evenly spaced values (rounded to fp16, so an fp16
    copy of the same model matches) of every parameter not in `exclude`. Any fine-tune of the base changes it."""
    skip = set(exclude)
    digest = hashlib.sha256()
    for name, param in sorted(unet.parameters_and_names(), key=lambda item: item[0]):
        if name in skip:
            continue
        values = param.astype(ms.float32).asnumpy().ravel() if param.dtype == ms.bfloat16 else param.asnumpy().ravel()
        picks = values[np.linspace(0, values.size - 1, min(values.size, 64)).astype(np.int64)]
        digest.update(f"{name}{tuple(param.shape)}".encode())
        digest.update(np.ascontiguousarray(picks.astype(np.float16)).tobytes())
    return digest.hexdigest()


def base_identity(unet, keys):
    return {"tav_base_unet_config_sha256": unet_config_sha256(unet),
            "tav_base_weights_fingerprint": weights_fingerprint(unet, exclude=keys)}


def save_delta(path, tensors, identity, config=None, step=None, base_model_path=None, trainable_modules=()):
    """Write the delta safetensors: `tensors` {name: fp32 array} plus, in the header (JSON strings), the format,
    the base identity, the trainable modules, the step and the training config."""
    metadata = {
        "tav_format": DELTA_FORMAT,
        "tav_keys": json.dumps(sorted(tensors)),
        "tav_trainable_modules": json.dumps(list(trainable_modules)),
        "tav_step": json.dumps(step),
        "tav_base_model_path": json.dumps(base_model_path),
        "tav_config": json.dumps(config.to_dict() if config is not None else None),
        **identity,
    }
    checkpoint.save_state_dict(tensors, path, metadata=metadata)


def read_delta(path):
    """(tensors, metadata) of a delta file; raises CheckpointError if it is not one."""
    import safetensors

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise checkpoint.CheckpointNotFoundError(f"delta checkpoint {path!r} does not exist")
    try:
        with safetensors.safe_open(path, framework="np") as handle:
            metadata = handle.metadata() or {}
    except Exception as exc:
        raise checkpoint.CheckpointError(f"cannot read delta checkpoint {path!r}: {exc}") from exc
    if metadata.get("tav_format") != DELTA_FORMAT:
        raise checkpoint.CheckpointError(
            f"{path!r} is not a tav UNet delta (header tav_format={metadata.get('tav_format')!r}, expected "
            f"{DELTA_FORMAT!r}); a full UNet folder is loaded with UNet3DConditionModel.from_pretrained")
    return checkpoint.read_state_dict(path), metadata


def apply_delta(unet, path, check_base=True):
    """Load a delta written by training into `unet` (built from the same base model with from_pretrained_2d).

    Checks first, loads after: the architecture hash, the key set and shapes, and (check_base) the fingerprint of
    the base weights; any mismatch raises CheckpointMismatchError saying what differs and leaves `unet` untouched.
    Tensors are cast to the parameters' dtype. Returns the header metadata (step, config, ...)."""
    tensors, metadata = read_delta(path)
    _apply_delta_tensors(unet, tensors, metadata, path, check_base)
    return metadata


def _apply_delta_tensors(unet, tensors, metadata, path, check_base):
    config_sha = unet_config_sha256(unet)
    if metadata.get("tav_base_unet_config_sha256") != config_sha:
        raise checkpoint.CheckpointMismatchError(
            f"delta {path!r} was trained on a different UNet architecture (config sha256 "
            f"{metadata.get('tav_base_unet_config_sha256')}, this UNet {config_sha}); base model used for training: "
            f"{json.loads(metadata.get('tav_base_model_path', 'null'))}")
    params = dict(unet.parameters_and_names())
    unknown = sorted(set(tensors) - set(params))
    wrong = [(n, tensors[n].shape, tuple(params[n].shape)) for n in tensors
             if n in params and tuple(tensors[n].shape) != tuple(params[n].shape)]
    if unknown or wrong:
        raise checkpoint.CheckpointMismatchError(
            f"delta {path!r} does not fit this UNet: {len(unknown)} unknown tensors {unknown[:5]}, "
            f"{len(wrong)} with the wrong shape {wrong[:5]}")
    if check_base:
        fingerprint = weights_fingerprint(unet, exclude=tensors)
        if metadata.get("tav_base_weights_fingerprint") != fingerprint:
            raise checkpoint.CheckpointMismatchError(
                f"delta {path!r} was trained on other base weights than this UNet's (fingerprint mismatch); "
                f"it was trained on {json.loads(metadata.get('tav_base_model_path', 'null'))}. "
                f"Load the same Stable Diffusion folder, or pass check_base=False to apply it anyway")
    checkpoint.load_state_dict_into(unet, tensors, strict=False, source=path, ignore=lambda name: True)


# ---------------------------------------------------------------------------------------------------------------
# Resumable checkpoints: checkpoint-N/{unet_delta, optimizer}.safetensors + training_state.json


def checkpoint_step(name):
    match = re.fullmatch(re.escape(CHECKPOINT_PREFIX) + r"(\d+)", name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir):
    """[(step, path)] of the complete checkpoint-N folders in output_dir, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        step = checkpoint_step(name)
        path = os.path.join(output_dir, name)
        if step is not None and os.path.isfile(os.path.join(path, STATE_NAME)):
            found.append((step, path))
    return sorted(found)


def write_checkpoint(output_dir, step, delta, identity, optimizer, noise, loss_scale, losses, config):
    """Write checkpoint-<step>/ atomically: into a hidden temporary folder, then renamed into place."""
    final = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")
    tmp = tempfile.mkdtemp(dir=output_dir, prefix=f".{CHECKPOINT_PREFIX}{step}.", suffix=".tmp")
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the checkpoint is an ordinary output folder
    try:
        save_delta(os.path.join(tmp, DELTA_NAME), delta, identity, config, step, config.pretrained_model_path,
                   config.trainable_modules)
        checkpoint.save_state_dict(optimizer.state_arrays(), os.path.join(tmp, OPTIMIZER_NAME),
                                   metadata={"tav_adamw_step": str(int(optimizer.step.asnumpy()))})
        state = {"global_step": step, "rng_state": noise.state(), "loss_scale": loss_scale.state_dict(),
                 "losses": losses, "adamw_step": int(optimizer.step.asnumpy())}
        checkpoint.write_json_atomic(state, os.path.join(tmp, STATE_NAME))
        if os.path.exists(final):
            aside = tempfile.mkdtemp(dir=output_dir, prefix=f".{CHECKPOINT_PREFIX}{step}.", suffix=".old")
            os.replace(final, os.path.join(aside, "old"))
            os.replace(tmp, final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def prune_checkpoints(output_dir, keep):
    """Delete all but the newest `keep` checkpoint-N folders (keep=None keeps all)."""
    if keep is None:
        return []
    removed = []
    for _, path in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def resolve_resume(config):
    """The checkpoint folder to resume from, or None. 'latest' with no checkpoint starts afresh (with a notice)."""
    request = config.resume_from_checkpoint
    if not request:
        return None
    if request == "latest":
        found = list_checkpoints(config.output_dir)
        if not found:
            logger.info(f"resume_from_checkpoint: latest: no checkpoint-N in {config.output_dir}; starting afresh")
            return None
        return found[-1][1]
    if not os.path.isfile(os.path.join(request, STATE_NAME)):
        raise ConfigError(f"{config.source}: resume_from_checkpoint points to {request!r}, which is not a checkpoint "
                          f"folder (no {STATE_NAME}); use 'latest' or a {CHECKPOINT_PREFIX}N folder")
    return request


def load_checkpoint(path, unet, optimizer, noise, loss_scale):
    """Restore weights, optimiser moments, RNG state and loss scale; returns (global_step, losses)."""
    state = checkpoint.read_json(os.path.join(path, STATE_NAME), what="training state")
    delta_path = os.path.join(path, DELTA_NAME)
    tensors, metadata = read_delta(delta_path)
    _apply_delta_tensors(unet, tensors, metadata, delta_path, check_base=True)
    optimizer.load_master({name: tensors[name] for name in optimizer.names})
    optimizer.load_state_arrays(checkpoint.read_state_dict(os.path.join(path, OPTIMIZER_NAME)),
                                state["adamw_step"], source=path)
    noise.set_state(state["rng_state"])
    loss_scale.load_state_dict(state["loss_scale"])
    return int(state["global_step"]), list(state.get("losses", []))


# ---------------------------------------------------------------------------------------------------------------
# Loading the parts


def load_models(config, plan):
    """(unet, vae, tokenizer, text_encoder, scheduler) from config.pretrained_model_path."""
    from tav.models.unet3d import UNet3DConditionModel
    from tav.models.vae import AutoencoderKL
    from tav.schedulers import DDIMScheduler
    from tav.text import load_text_encoder, load_tokenizer

    root = config.pretrained_model_path
    missing = [part for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
               if not os.path.isdir(os.path.join(root, part))]
    if missing:
        raise ConfigError(f"{config.source}: pretrained_model_path {root!r} is not a Stable Diffusion folder in "
                          f"diffusers layout: missing {', '.join(p + '/' for p in missing)}")
    frozen_dtype = plan.compute_dtype
    # The temporal layers start from MindSpore's RNG (the official seeds torch before from_pretrained_2d).
    unet = UNet3DConditionModel.from_pretrained_2d(root, attention_backend=config.resolved_attention_backend())
    vae = AutoencoderKL.from_pretrained(root, dtype=frozen_dtype)
    tokenizer = load_tokenizer(root)
    text_encoder = load_text_encoder(root, dtype=frozen_dtype)
    scheduler = DDIMScheduler.from_config(root)
    return unet, vae, tokenizer, text_encoder, scheduler


def encode_clip(config, vae):
    """The clip's VAE posterior (mean, std), each fp32 (1, 4, F, h, w). The VAE is frozen, so this is computed
    once; every step samples it afresh (the official re-encodes the clip each step to the same posterior)."""
    from tav.models.vae import encode_video
    from tav.video import load_video

    data = config.train_data
    pixels = load_video(data.video_path, data.n_sample_frames, data.sample_start_idx, data.sample_frame_rate,
                        data.height, data.width)
    pixels = ms.Tensor(pixels.transpose(1, 0, 2, 3)[None])  # (1, 3, F, H, W)
    posterior = encode_video(vae, pixels)
    return posterior.mean.astype(ms.float32), posterior.std.astype(ms.float32)


def scaled_latents(vae, mean, std, posterior_noise):
    """(mean + std * noise - shift) * scaling_factor, on the host: the latents the step trained on."""
    shift = 0.0 if vae.shift_factor is None else vae.shift_factor
    z = mean.asnumpy() + std.asnumpy() * posterior_noise
    return ((z - shift) * vae.scaling_factor).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Validation: invert the training latents, sample every prompt, write videos


def _file_stem(prompt):
    stem = re.sub(r"[\\/:*?\"<>|\x00-\x1f]", "_", prompt).strip() or "prompt"
    return stem[:120]


def run_validation(config, step, unet, vae, tokenizer, text_encoder, latents, compute_dtype=ms.float32):
    """DDIM-invert `latents` (1, 4, F, h, w; the clip's latents of this step) with the empty prompt, then sample each
    validation prompt from the inverted noise (or from seeded noise when use_inv_latent is false) and write
    samples/step-N/<prompt>.<fmt> and samples/step-N.<fmt> (all prompts in one grid). Returns the paths."""
    from tav.inversion import ddim_invert
    from tav.models.vae import latents_to_video
    from tav.sampling import denoise, prepare_latents
    from tav.schedulers import DDIMScheduler
    from tav.text import encode_prompt_with_guidance, encode_prompts
    from tav.video import save_videos_grid

    val = config.validation_data
    if not val.prompts:
        return []
    seed = val.seed if val.seed is not None else (config.seed or 0)
    scheduler = DDIMScheduler.from_config(config.pretrained_model_path)
    out_dir = os.path.join(config.output_dir, "samples")
    start = None
    latents = ms.Tensor(latents).astype(compute_dtype)
    if val.use_inv_latent:
        empty = encode_prompts(tokenizer, text_encoder, [""]).astype(compute_dtype)
        start = ddim_invert(unet, scheduler, latents, empty, val.num_inv_steps)[-1]
        os.makedirs(os.path.join(config.output_dir, "inv_latents"), exist_ok=True)
        checkpoint.save_state_dict({"latents": start.astype(ms.float32).asnumpy()},
                                   os.path.join(config.output_dir, "inv_latents", f"ddim_latent-{step}.safetensors"))
    height = val.height or config.train_data.height
    width = val.width or config.train_data.width
    length = val.video_length or config.train_data.n_sample_frames
    factor = vae.downscale_factor
    videos, written = [], []
    for i, prompt in enumerate(val.prompts):
        cond, uncond = encode_prompt_with_guidance(tokenizer, text_encoder, [prompt], val.negative_prompt)
        if start is None:
            start_i = prepare_latents((1, unet.config.in_channels, length, height // factor, width // factor),
                                      seed + i, dtype=compute_dtype)
        else:
            start_i = start
        final = denoise(unet, scheduler, start_i, cond.astype(compute_dtype), uncond.astype(compute_dtype),
                        val.num_inference_steps, val.guidance_scale, eta=val.eta, noise_seed=seed + i)
        video = latents_to_video(vae, final).asnumpy()
        videos.append(video)
        path = os.path.join(out_dir, f"step-{step}", f"{_file_stem(prompt)}.{val.format}")
        written.append(str(save_videos_grid(video, path, fps=val.fps, fmt=val.format)))
    grid = os.path.join(out_dir, f"step-{step}.{val.format}")
    written.append(str(save_videos_grid(np.concatenate(videos), grid, fps=val.fps, fmt=val.format)))
    return written


# ---------------------------------------------------------------------------------------------------------------
# The official final export: the tuned pipeline in diffusers layout


def save_full_pipeline(config, unet):
    """output_dir/{unet, vae, text_encoder, tokenizer, scheduler, model_index.json}: the tuned UNet (config +
    safetensors) and the base model's other parts copied unchanged; each part is replaced atomically."""
    out = config.output_dir

    def replace_dir(name, fill):
        tmp = tempfile.mkdtemp(dir=out, prefix=f".{name}.", suffix=".tmp")
        os.chmod(tmp, 0o755)
        try:
            fill(tmp)
            final = os.path.join(out, name)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    replace_dir("unet", lambda tmp: unet.save_pretrained(tmp))
    for part in PIPELINE_PARTS:
        source = os.path.join(config.pretrained_model_path, part)
        replace_dir(part, lambda tmp, source=source: shutil.copytree(source, tmp, dirs_exist_ok=True))
    base_index_path = os.path.join(config.pretrained_model_path, "model_index.json")
    index = checkpoint.read_json(base_index_path) if os.path.isfile(base_index_path) else {}
    index = {
        "_class_name": "TuneAVideoPipeline",
        "_diffusers_version": "0.11.1",
        "scheduler": index.get("scheduler", ["diffusers", "DDIMScheduler"]),
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["tuneavideo.models.unet", "UNet3DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    checkpoint.write_json_atomic(index, os.path.join(out, "model_index.json"))
    return out


# ---------------------------------------------------------------------------------------------------------------
# The loop


@dataclasses.dataclass
class TrainResult:
    output_dir: str
    global_step: int
    losses: list  # (step, loss) for every update of this run and the run it resumed
    delta_path: str
    checkpoint_dir: str
    samples: list
    log_path: str
    unet: object = dataclasses.field(repr=False, default=None)


def _setup_logging(output_dir):
    log_path = os.path.join(output_dir, "train.log")
    for handler in list(logger.handlers):
        if getattr(handler, "_tav_train", False):
            logger.removeHandler(handler)
            handler.close()
    file_handler = logging.FileHandler(log_path, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    file_handler._tav_train = True

    class TqdmHandler(logging.Handler):
        def emit(self, record):
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=sys.stdout)

    console = TqdmHandler()
    console.setFormatter(logging.Formatter("%(message)s"))
    console._tav_train = True
    logger.addHandler(file_handler)
    logger.addHandler(console)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return log_path


def _check_output_dir(config):
    from tav.video import VideoError, check_writable_dir

    try:
        check_writable_dir(config.output_dir)
    except VideoError as exc:
        raise ConfigError(f"{config.source}: output_dir {config.output_dir!r} is not writable: {exc}") from None


def train(config, step_callback=None):
    """Tune the UNet of config.pretrained_model_path on config.train_data; see the module docstring.

    `step_callback(step, loss)` runs after every update (tests). Returns a TrainResult. Raises ConfigError for bad
    input and TrainingError when the loss stops being finite (the last good checkpoint stays on disk)."""
    from tqdm.auto import tqdm

    target = config.device_target
    if target is not None and backend.normalise_device_target(target) == backend.device_target():
        target = None  # already set (MindSpore refuses to set the device again once kernels have run)
    backend.configure(device_target=target, mode=config.mode, jit_level=config.jit_level)
    check_input_paths(config)
    _check_output_dir(config)
    log_path = _setup_logging(config.output_dir)
    plan = precision_plan(config.mixed_precision, backend.device_target())
    for notice in config.notices() + ([plan.notice] if plan.notice else []):
        logger.info(f"notice: {notice}")
    seed = config.seed if config.seed is not None else int(np.random.SeedSequence().entropy % (2 ** 31))
    if config.seed is None:
        logger.info(f"notice: no seed in the config; using seed {seed}")
    with open(os.path.join(config.output_dir, "config.yaml"), "w", encoding="utf-8") as handle:
        handle.write(config.to_yaml())
    resume_path = resolve_resume(config)

    ms.set_seed(seed)
    try:
        unet, vae, tokenizer, text_encoder, scheduler = load_models(config, plan)
    except checkpoint.CheckpointError as exc:
        raise ConfigError(f"{config.source}: cannot load the base model from pretrained_model_path "
                          f"{config.pretrained_model_path!r}: {exc}") from exc
    from tav.video import VideoError

    try:
        mean, std = encode_clip(config, vae)
    except VideoError as exc:
        raise ConfigError(f"{config.source}: train_data.video_path: {exc}") from None
    from tav.text import encode_prompts

    context = encode_prompts(tokenizer, text_encoder, [config.train_data.prompt]).astype(ms.float32)
    context = ops.broadcast_to(context, (config.train_batch_size,) + tuple(context.shape[1:]))

    trainable = select_trainable(unet, config.trainable_modules)
    n_tensors, n_params = len(trainable), sum(int(np.prod(p.shape)) for _, p in trainable)
    total_params = sum(int(np.prod(p.shape)) for p in unet.get_parameters())
    logger.info(f"trainable: {n_tensors} tensors, {n_params:,} parameters of {total_params:,} "
                f"(modules ending with {', '.join(config.trainable_modules)})")
    keys = delta_keys(unet, [name for name, _ in trainable])
    identity = base_identity(unet, keys)
    initial = {name: param.asnumpy() for name, param in trainable}
    cast_parameters(unet, plan.compute_dtype)  # fp16/bf16: the optimiser keeps fp32 masters of the trainable tensors
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    optimizer = AdamW(trainable, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
                      weight_decay=config.adam_weight_decay, master_dtype=ms.float32)
    optimizer.load_master(initial)
    noise = StepNoise(seed)
    loss_scale = DynamicLossScale(enabled=plan.loss_scaling)
    global_step, losses = 0, []
    if resume_path:
        global_step, losses = load_checkpoint(resume_path, unet, optimizer, noise, loss_scale)
        logger.info(f"resumed from {resume_path} at step {global_step}")

    train_step = build_train_step(unet, optimizer, scheduler, vae.scaling_factor, vae.shift_factor,
                                  config.max_grad_norm, plan.compute_dtype)
    latent_shape = tuple(mean.shape[1:])
    micro_steps, batch = config.gradient_accumulation_steps, config.train_batch_size
    num_train_timesteps = scheduler.config.num_train_timesteps

    def tuned_values():
        values = optimizer.master_state()
        params = dict(unet.parameters_and_names())
        for name in keys:
            if name not in values:
                values[name] = params[name].astype(ms.float32).asnumpy()
        return values

    def save(step):
        path = write_checkpoint(config.output_dir, step, tuned_values(), identity, optimizer, noise, loss_scale,
                                losses, config)
        for removed in prune_checkpoints(config.output_dir, config.checkpoints_total_limit):
            logger.info(f"removed old checkpoint {removed}")
        logger.info(f"saved checkpoint {path}")
        return path

    last_checkpoint = resume_path
    samples, last_latents = [], None
    skipped_in_a_row = 0
    bar = tqdm(total=config.max_train_steps, initial=global_step, desc="Steps", unit="step", dynamic_ncols=True)
    try:
        while global_step < config.max_train_steps:
            lr = learning_rate_at(config, global_step)
            posterior_noise, step_noise, timesteps = noise.draw(micro_steps, batch, latent_shape, num_train_timesteps)
            started = time.perf_counter()
            loss, finite, norm = train_step(mean, std, ms.Tensor(posterior_noise), ms.Tensor(step_noise),
                                            ms.Tensor(timesteps), context, ms.Tensor(lr, ms.float32),
                                            ms.Tensor(loss_scale.scale, ms.float32))
            loss, finite, norm = float(loss.asnumpy()), bool(finite.asnumpy()), float(norm.asnumpy())
            seconds = time.perf_counter() - started
            if not math.isfinite(loss) or not finite:
                skipped_in_a_row += 1
                if not plan.loss_scaling or skipped_in_a_row >= 20:
                    kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else \
                        "no checkpoint had been written yet"
                    raise TrainingError(
                        f"loss is {loss} (gradients {'finite' if finite else 'not finite'}) at step "
                        f"{global_step + 1}; stopping without updating the weights. {kept}. Try a lower "
                        f"learning_rate (now {config.learning_rate}) or mixed_precision: no")
                loss_scale.update(False)
                logger.info(f"step {global_step + 1}: gradient overflow at loss scale {loss_scale.scale * 2:g}; "
                            f"update skipped, scale now {loss_scale.scale:g}")
                continue
            skipped_in_a_row = 0
            loss_scale.update(True)
            global_step += 1
            losses.append([global_step, loss])
            last_latents = posterior_noise[-1, :1]
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", s_step=f"{seconds:.2f}")
            if global_step == config.max_train_steps:
                bar.close()  # so the bar's rate and time are the training's, not the final validation's
            _log_to_file(f"step {global_step} loss {loss:.6f} lr {lr:.3e} grad_norm {norm:.4f} time {seconds:.3f}s")
            if step_callback is not None:
                step_callback(global_step, loss)

            if global_step % config.checkpointing_steps == 0 or global_step == config.max_train_steps:
                last_checkpoint = save(global_step)
            if global_step % config.validation_steps == 0 or global_step == config.max_train_steps:
                if config.validation_data.prompts:
                    latents = scaled_latents(vae, mean, std, last_latents)
                    written = run_validation(config, global_step, unet, vae, tokenizer, text_encoder, latents,
                                             plan.compute_dtype)
                    samples.extend(written)
                    logger.info(f"step {global_step}: wrote {len(written)} sample videos under "
                                f"{os.path.join(config.output_dir, 'samples')}")
    finally:
        bar.close()

    if last_checkpoint is None or checkpoint_step(os.path.basename(last_checkpoint)) != global_step:
        last_checkpoint = save(global_step)  # a run resumed at its end still leaves its final state
    delta_path = os.path.join(config.output_dir, DELTA_NAME)
    shutil.copyfile(os.path.join(last_checkpoint, DELTA_NAME), delta_path + ".tmp")
    os.replace(delta_path + ".tmp", delta_path)
    if config.save_full_pipeline:
        save_full_pipeline(config, _fp32_copy_for_export(unet, optimizer))
        logger.info(f"wrote the tuned pipeline (diffusers layout) to {config.output_dir}")
    logger.info(f"done: {global_step} steps. Outputs in {config.output_dir}: delta {delta_path} "
                f"(tools/sample.py --unet), checkpoints {CHECKPOINT_PREFIX}N/, samples/, log {log_path}")
    return TrainResult(config.output_dir, global_step, losses, delta_path, last_checkpoint, samples, log_path, unet)


def _log_to_file(message):
    """Per-step lines go to the log file only (the progress bar shows them on the console)."""
    record = logger.makeRecord(logger.name, logging.INFO, __file__, 0, message, None, None)
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def cast_parameters(cell, dtype):
    """Change the dtype of every floating-point parameter of `cell` (values converted)."""
    for param in cell.get_parameters():
        if param.dtype != dtype and param.dtype in (ms.float16, ms.bfloat16, ms.float32):
            param.set_dtype(dtype)


def _fp32_copy_for_export(unet, optimizer):
    """The UNet with the fp32 master values in its trainable tensors (a no-op in fp32 training)."""
    if optimizer.use_master:
        masters = optimizer.master_state()
        cast_parameters(unet, ms.float32)
        optimizer.load_master(masters)
    return unet
