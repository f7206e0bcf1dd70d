"""The numbers that steer an update: the precision plan, the learning-rate schedules, the dynamic loss scale,
the AdamW optimiser (torch.optim.AdamW's arithmetic) and clip_grad_norm_'s global-norm clipping.

Nothing here runs the model: tav.train_step computes the gradients and calls these; tav.training steps the loop.
"""
import dataclasses
import math

import numpy as np

import mindspore as ms
from mindspore import nn, ops

from tav import backend, checkpoint
from tav.kernels.cpu import use_native_kernel
from tav.kernels.cpu.optim import HostOptimizerKernels, adamw_update_op


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
        raise ValueError("the polynomial schedule ends at an absolute rate (1e-7), not a multiple of the base one: "
                         "use learning_rate_at")
    raise ValueError(f"unknown lr_scheduler {name!r}")


def learning_rate_at(config, step, ranks=1):
    """The learning rate of 0-based optimiser update `step` (`ranks`: data-parallel processes, for scale_lr)."""
    base = config.effective_learning_rate(ranks)
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
        if master_dtype == ms.float32 and use_native_kernel("optim"):
            self.fused_update = adamw_update_op()
        # CPU, fp32 weights: host_update runs optim.cc's in-place step on the tensors' own storage (TrainStep).
        self.host_kernels = None
        if not self.use_master and use_native_kernel("optim") and all(
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
