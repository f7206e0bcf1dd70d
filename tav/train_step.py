"""One optimiser update of the tuned UNet: the diffusion loss, its gradients as one compiled graph, then the update.

    step = TrainStep(unet, optimizer, scheduler, vae.scaling_factor)       # optimizer: tav.optim.AdamW
    loss, applied, grad_norm = step(mean, std, posterior_noise, noise, timesteps, context, lr, loss_scale)

Where the update runs (decided in `TrainStep.__init__`, nowhere else):
  host      CPU with fp32 weights and the native kernels: the gradients' and weights' numpy views (Tensor.asnumpy
            shares a CPU tensor's storage) go to optim.cc's norm and in-place AdamW kernels (~8 ms a step).
  compiled  Ascend/GPU (tav.backend.compile_optimizer_update): the update as a second compiled graph, one launch
            sequence instead of ~10 small ops per tensor.
  eager     everything else (fp16 weights with fp32 masters on CPU, native kernels off): the same update op by op
            (~78 ms a step at the small bench config).
The update is never compiled into the gradient graph: on CPU that cost ~400 MiB of host memory (MindSpore keeps
memory per graph node). All three paths unscale, check finiteness, clip and step with the same arithmetic
(tests/test_training.py checks they agree).

Data parallel (msrun, `DataParallel`): every rank computes its own videos' summed loss and gradients, one all-reduce
sums them over ranks, and the update divides by ranks x micro-steps x loss scale: the mean over all ranks' videos,
so the ranks' weights stay identical and equal a single process's with train_batch_size = ranks x batch.
"""
import logging
import math

import numpy as np

import mindspore as ms
from mindspore import nn, ops

from tav import backend
from tav.config import ConfigError
from tav.nn import match_weight_gradients
from tav.optim import clip_by_global_norm, global_norm

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------
# What trains: the official rule, and the weights a step differentiates


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
    """[(name, Parameter)] of the tensors that train; every other UNet parameter gets requires_grad=False, and the
    frozen layers' native backward kernels are told to skip their weight gradients (tav.nn.match_weight_gradients).
    Call it before building a TrainStep (or your own value_and_grad) over the UNet."""
    selected = []
    for name, param in unet.parameters_and_names():
        param.requires_grad = is_trainable(name, trainable_modules)
        if param.requires_grad:
            selected.append((name, param))
    if not selected:
        raise ConfigError(f"trainable_modules {list(trainable_modules)} match no UNet module; expected suffixes of "
                          f"module names such as attn1.to_q, attn2.to_q, attn_temp")
    match_weight_gradients(unet)
    return selected


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


class LossAndGradients(nn.Cell):
    """`loss`'s value and its gradients with respect to `weights`, as one Cell:

        loss_and_grads = LossAndGradients(loss_cell, select_trainable(unet, modules))
        loss, grads = loss_and_grads(*inputs)     # grads in the weights' order and dtypes

    The fast way to differentiate the UNet, for TrainStep and for a loop of your own. `weights` are Parameters or
    the (name, Parameter) pairs select_trainable returns (which also lets the frozen layers skip their weight
    gradients). Call it in GRAPH_MODE: the Cell then compiles whole on its first call. Measured on CPU
    (bench/user_loop.py, docs/training.md), the same loss and gradients as `ms.jit` over a Python function ran 2-3x
    slower in GRAPH_MODE and ~6x slower in PYNATIVE_MODE; without select_trainable, ~5x slower.
    (Casting the gradients to fp32 here, as a generator over the tuple, added ~90 MiB to the CPU graph's compile
    memory at the small bench config: TrainStep casts the non-fp32 ones in its compiled update on Ascend/GPU and
    eagerly on the CPU.)"""

    def __init__(self, loss, weights):
        super().__init__()
        if not isinstance(weights, ms.ParameterTuple):  # a list of Parameters as weights ran slower (docs/training.md)
            weights = ms.ParameterTuple([w[1] if isinstance(w, tuple) else w for w in weights])
        self.loss = loss
        self.grad_fn = ms.value_and_grad(loss, None, weights)
        _warn_if_pynative()

    def construct(self, *inputs):
        return self.grad_fn(*inputs)


_pynative_warned = False


def _warn_if_pynative():
    global _pynative_warned
    if ms.get_context("mode") == ms.PYNATIVE_MODE and not _pynative_warned:
        _pynative_warned = True
        logger.warning("the gradient graph runs in PYNATIVE_MODE, op by op (several times slower on CPU); call "
                       "mindspore.set_context(mode=mindspore.GRAPH_MODE) first (tools/train.py does)")


class DataParallel:
    """Where this process sits among the data-parallel ranks: rank, world_size (0, 1 alone).

        parallel = DataParallel.from_launcher()    # under msrun: init() the communication group first

    `sum_over_ranks` adds every rank's loss and gradients in one all-reduce (a flat buffer, not one collective per
    tensor); `all_agree` is a barrier that also tells every rank whether all of them got there without an error,
    so one rank refusing its inputs stops the others instead of leaving them waiting in a collective."""

    def __init__(self, rank=0, world_size=1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.rank, self.world_size = int(rank), int(world_size)

    @classmethod
    def from_launcher(cls):
        from mindspore.communication import get_group_size, get_rank, init

        init()
        return cls(get_rank(), get_group_size())

    @property
    def is_main(self):
        """Rank 0: the one that writes checkpoints, logs, samples and exports."""
        return self.rank == 0

    def rows(self, batch):
        """This rank's rows of a draw made for all ranks' videos (ranks x batch rows)."""
        return slice(self.rank * batch, (self.rank + 1) * batch)

    def sum_over_ranks(self, loss, grads):
        if self.world_size == 1:
            return loss, grads
        flat = ops.cat([loss.reshape(-1).astype(ms.float32)] + [g.reshape(-1) for g in to_float32(grads)])
        flat = ops.AllReduce()(flat)
        sizes = [1] + [int(np.prod(g.shape)) for g in grads]
        parts = ops.split(flat, sizes)
        return parts[0].reshape(loss.shape), tuple(p.reshape(g.shape) for p, g in zip(parts[1:], grads))

    def from_main(self, value):
        """Rank 0's integer `value`, on every rank (every rank must call it)."""
        if self.world_size == 1:
            return int(value)
        mine = ms.Tensor([int(value) if self.is_main else 0], ms.int32)
        return int(ops.AllReduce()(mine).asnumpy()[0])

    def all_agree(self, ok):
        """True when every rank passes ok=True; every rank must call it (a barrier)."""
        if self.world_size == 1:
            return bool(ok)
        count = ops.AllReduce()(ms.Tensor([1.0 if ok else 0.0], ms.float32))
        return int(round(float(count.asnumpy()[0]))) == self.world_size


class TrainStep:
    """One optimiser update, what `train` calls every step:

        train_step(mean, std, posterior_noise, noise, timesteps, context, lr, loss_scale) -> (loss, finite, norm)

    mean, std: the frozen VAE's posterior of the clip (1, 4, F, h, w), fp32, computed once. Per update, with A
    accumulation micro-steps and B videos per micro-step: posterior_noise and noise (A, B, 4, F, h, w), timesteps
    (A, B) int64, context (B, 77, D). Each micro-step's loss and gradients come from one compiled graph
    (`LossAndGradients` over `DiffusionLoss`); their sums are then averaged, unscaled by loss_scale, checked
    for finiteness, clipped to max_grad_norm and given to AdamW with learning rate `lr` -- all skipped when a
    gradient is not finite (fp16 overflow). Returns the unscaled mean loss, whether the update was applied, and
    the pre-clip gradient norm. With `parallel` (DataParallel) the sums are over every rank's videos first.

    Where the update runs (host, compiled or eager) is chosen once, here, as the module docstring explains;
    `update_path` says which. In GRAPH_MODE the gradient graph is compiled before its first run and the heap's
    freed pages go back to the OS (tav.backend.compile_ahead).
    """

    def __init__(self, unet, optimizer, scheduler, scaling_factor, shift_factor=None, max_grad_norm=1.0,
                 compute_dtype=ms.float32, parallel=None):
        self.optimizer = optimizer
        self.parallel = parallel or DataParallel()
        self.max_grad_norm = float(max_grad_norm)
        loss = DiffusionLoss(unet, scheduler, scaling_factor, shift_factor, compute_dtype)
        self.gradients = LossAndGradients(loss, optimizer.model_params)
        self.compiled_update = backend.compile_optimizer_update()
        self.host_update = not self.compiled_update and optimizer.host_kernels is not None
        self.update_path = "compiled" if self.compiled_update else "host" if self.host_update else "eager"
        self.update = backend.jit(self._make_update()) if self.compiled_update else self._make_update()
        self.accumulate = backend.jit(accumulate) if self.compiled_update else None

    def __call__(self, mean, std, posterior_noise, noise, timesteps, context, lr, loss_scale):
        loss, finite, norm, _ = self._step(mean, std, posterior_noise, noise, timesteps, context, lr, loss_scale)
        return loss, finite, norm

    def report(self, mean, std, posterior_noise, noise, timesteps, context, lr, loss_scale):
        """The same update as calling the step, returning (loss, applied, grad_norm) as Python values read from the
        device in one transfer (the loop logs them every step; three reads would be three device syncs)."""
        *_, packed = self._step(mean, std, posterior_noise, noise, timesteps, context, lr, loss_scale)
        loss, finite, norm = packed.asnumpy().tolist()
        return loss, finite > 0.5, norm

    def _step(self, mean, std, posterior_noise, noise, timesteps, context, lr, loss_scale):
        micro_steps = posterior_noise.shape[0]
        loss, grads = None, None
        for i in range(micro_steps):
            args = (mean, std, posterior_noise[i], noise[i], timesteps[i], context, loss_scale)
            backend.compile_ahead(self.gradients, *args)
            micro_loss, micro_grads = self.gradients(*args)
            if self.compiled_update:
                # The fp16 gradients go to the compiled graphs as they are: their fp32 casts run there, not as
                # one eager launch per tensor (112 for SD).
                loss, grads = (micro_loss, micro_grads) if grads is None else self.accumulate(
                    loss, micro_loss, ms.mutable(grads), ms.mutable(micro_grads))
                continue
            micro_grads = to_float32(micro_grads)
            if grads is None:
                loss, grads = micro_loss, micro_grads
            else:
                loss = loss + micro_loss
                grads = tuple(g + h for g, h in zip(grads, micro_grads))
        loss, grads = self.parallel.sum_over_ranks(loss, grads)
        summed = micro_steps * self.parallel.world_size
        if self.host_update:
            return self._update_on_host(grads, loss, np.float32(loss_scale.asnumpy()) * np.float32(summed), lr)
        denominator = loss_scale * summed
        if self.compiled_update:
            return self.update(ms.mutable(grads), loss, denominator, lr)
        return self.update(grads, loss, denominator, lr)

    def _update_on_host(self, grads, loss, denominator, lr):
        finite, norm = update_on_host(self.optimizer, [g.asnumpy() for g in grads], denominator, float(lr.asnumpy()),
                                      self.max_grad_norm)
        with np.errstate(invalid="ignore", divide="ignore"):  # an overflowed step's loss is inf/inf, reported as is
            mean_loss = np.float32(loss.asnumpy()) / np.float32(denominator)
        packed = ms.Tensor(np.array([mean_loss, float(finite), norm], np.float32))
        return ms.Tensor(mean_loss), ms.Tensor(finite), ms.Tensor(norm, ms.float32), packed

    def _make_update(self):
        """update(grads, loss_sum, denominator, lr) -> (loss, finite, norm, [loss, finite, norm] as one fp32
        tensor); the same function runs eagerly or compiled (ms.jit), where optimizer.update is inlined. The
        gradients may be fp16: the fp32 casts are part of it (inside the compiled graph on Ascend/GPU)."""
        optimizer, max_grad_norm = self.optimizer, self.max_grad_norm

        def update(grads, loss, denominator, lr):
            grads = tuple(g.astype(ms.float32) / denominator for g in grads)
            finite = ms.amp.all_finite(grads)
            norm = global_norm(grads)
            if finite:
                optimizer.update(clip_by_global_norm(grads, max_grad_norm, norm), lr)
            mean_loss = loss / denominator
            packed = ops.stack([mean_loss.astype(ms.float32), finite.astype(ms.float32), norm.astype(ms.float32)])
            return mean_loss, finite, norm, packed

        return update


def to_float32(tensors):
    return tuple(t if t.dtype == ms.float32 else t.astype(ms.float32) for t in tensors)


def accumulate(loss, micro_loss, grads, micro_grads):
    """The running sums of gradient accumulation, in fp32 (compiled on the compiled-update path)."""
    return loss + micro_loss, tuple(g.astype(ms.float32) + h.astype(ms.float32) for g, h in zip(grads, micro_grads))


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
