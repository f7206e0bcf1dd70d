"""One tav (MindSpore) case: build the UNet3D of a bench config, time its sampling or train step.

sample  one UNet call on the classifier-free-guidance batch (2B videos, one timestep), as tav.sampling.denoise
        makes it (tav.inversion.call_unet): the UNet Cell, compiled whole in GRAPH_MODE.
train   tav.train_step.TrainStep (what tools/train.py runs): noise the latents, UNet forward, fp32 MSE,
        backward over the official trainable set (attn1.to_q, attn2.to_q, attn_temp) as one compiled graph, then
        unscale, clip and AdamW (on the host on CPU, see tav.train_step). In PYNATIVE mode the same step runs
        op by op.
        If tav.training cannot be imported, a stand-in (value_and_grad + nn.AdamWeightDecay) is timed and the
        result says so.
attn1   the sparse-causal self-attention of the config's first block alone (forward, CFG batch): the part whose
        cost must stay linear in frames.
"""
import numpy as np

from bench.configs import TEXT_TOKENS, trainable_module_suffixes
from bench.measure import measure_case

VAE_SCALING_FACTOR = 0.18215


def configure(case):
    """Device, mode and thread counts, before any Cell is built. OMP_NUM_THREADS is set by the parent."""
    import mindspore as ms

    ms.set_device("CPU")
    # MindSpore 2.10: the CPU kernels' thread pool (default 25 threads); set once per process.
    ms.device_context.cpu.op_tuning.threads_num(case["threads"])
    ms.set_context(mode=ms.GRAPH_MODE if case["mode"] == "graph" else ms.PYNATIVE_MODE)
    ms.set_seed(0)
    if case.get("chunk_budget"):
        import tav.kernels.attention_backends.chunked as chunked

        chunked.SCORE_BLOCK_ELEMENTS = int(case["chunk_budget"])
    return {"ms_op_threads": case["threads"], "mindspore": ms.__version__}


def build_unet(case, config):
    from tav import checkpoint
    from tav.models.unet3d import UNet3DConditionModel, is_temporal_key

    unet = UNet3DConditionModel(dict(config.unet), attention_backend=case["attention"])
    if case.get("weights"):
        state = checkpoint.read_state_dict(case["weights"])
        has_temporal = any(is_temporal_key(key) for key in state)
        checkpoint.load_state_dict_into(unet, state, strict=True, ignore=None if has_temporal else is_temporal_key,
                                        source=case["weights"])
    return unet


def inputs(config, batch, seed=0):
    import mindspore as ms

    rng = np.random.default_rng(seed)
    shape = (batch, 4, config.frames, config.latent, config.latent)
    sample = ms.Tensor(rng.standard_normal(shape, dtype=np.float32))
    context = ms.Tensor(rng.standard_normal((batch, TEXT_TOKENS, config.cross_attention_dim), dtype=np.float32))
    return sample, context


def sample_step(case, config):
    from tav.inversion import call_unet

    unet = build_unet(case, config)
    unet.set_train(False)
    batch = 2 * config.batch
    sample, context = inputs(config, batch)

    def step():
        # as tav.sampling.denoise calls it (GRAPH_MODE: compiled ahead of the first run, then the heap trimmed)
        return call_unet(unet, sample, 500, context).asnumpy()

    return step, {}


def _trainable(unet):
    try:
        from tav.train_step import select_trainable

        return select_trainable(unet, trainable_module_suffixes())
    except ImportError:
        # The official rule: a tensor trains iff a module path containing it ends with one of the suffixes.
        suffixes = trainable_module_suffixes()
        selected = []
        for name, param in unet.parameters_and_names():
            parts = name.split(".")[:-1]
            paths = [".".join(parts[: i + 1]) for i in range(len(parts))]
            param.requires_grad = any(path.endswith(suffixes) for path in paths)
            if param.requires_grad:
                selected.append((name, param))
        return selected


def train_step(case, config):
    import mindspore as ms

    unet = build_unet(case, config)
    unet.set_train(True)
    trainable = _trainable(unet)
    if case.get("recompute"):  # gradient_checkpointing: true (every down/up resnet and transformer recomputed)
        unet.enable_gradient_checkpointing()
    rng = np.random.default_rng(0)
    latent_shape = (config.batch, 4, config.frames, config.latent, config.latent)
    context = ms.Tensor(rng.standard_normal((config.batch, TEXT_TOKENS, config.cross_attention_dim), dtype=np.float32))
    info = {"trainable_tensors": len(trainable),
            "trainable_params": int(sum(np.prod(p.shape) for _, p in trainable))}
    try:
        from tav.schedulers import SD_V1_SCHEDULE, DDIMScheduler
        from tav.optim import AdamW
        from tav.train_step import TrainStep
    except ImportError as exc:
        info["train_impl"] = f"bench stand-in (tav.training not importable: {exc})"
        return _stand_in_train_step(case, unet, trainable, latent_shape, context), info

    optimizer = AdamW(trainable, weight_decay=1e-2)
    scheduler = DDIMScheduler(**SD_V1_SCHEDULE)
    step_fn = TrainStep(unet, optimizer, scheduler, VAE_SCALING_FACTOR, None, 1.0, ms.float32)
    info["train_impl"] = "tav.train_step.TrainStep"
    mean = ms.Tensor(rng.standard_normal((1,) + latent_shape[1:], dtype=np.float32))
    std = ms.Tensor(np.full((1,) + latent_shape[1:], 0.1, np.float32))
    posterior_noise = ms.Tensor(rng.standard_normal((1,) + latent_shape, dtype=np.float32))
    noise = ms.Tensor(rng.standard_normal((1,) + latent_shape, dtype=np.float32))
    timesteps = ms.Tensor(rng.integers(0, 1000, (1, config.batch)).astype(np.int64))
    lr = ms.Tensor(3e-5, ms.float32)
    loss_scale = ms.Tensor(1.0, ms.float32)

    def step():
        loss, _, _ = step_fn(mean, std, posterior_noise, noise, timesteps, context, lr, loss_scale)
        return float(loss.asnumpy())

    return step, info


def _stand_in_train_step(case, unet, trainable, latent_shape, context):
    """MSE on a fixed noisy latent, value_and_grad over the trainable set, nn.AdamWeightDecay; ms.jit in graph."""
    import mindspore as ms
    from mindspore import nn, ops

    params = ms.ParameterTuple([p for _, p in trainable])
    optimizer = nn.AdamWeightDecay(params, learning_rate=3e-5, weight_decay=1e-2)
    rng = np.random.default_rng(1)
    noisy = ms.Tensor(rng.standard_normal(latent_shape, dtype=np.float32))
    noise = ms.Tensor(rng.standard_normal(latent_shape, dtype=np.float32))
    timesteps = ms.Tensor(rng.integers(0, 1000, (latent_shape[0],)).astype(np.int64))

    def forward(x, t, ctx, target):
        return ops.mean(ops.square(unet(x, t, ctx) - target))

    grad_fn = ms.value_and_grad(forward, None, params)

    def update(x, t, ctx, target):
        loss, grads = grad_fn(x, t, ctx, target)
        optimizer(grads)
        return loss

    run = ms.jit(update) if case["mode"] == "graph" else update

    def step():
        return float(run(noisy, timesteps, context, noise).asnumpy())

    return step


def attn1_step(case, config):
    """The first down block's sparse-causal attention on its (2B f, h*w, c) tokens, forward only."""
    import mindspore as ms

    from tav.models.attention import SparseCausalAttention

    heads = config.unet["attention_head_dim"]
    heads = heads[0] if isinstance(heads, (list, tuple)) else heads
    channels = config.unet["block_out_channels"][0]
    layer = SparseCausalAttention(channels, heads=heads, dim_head=channels // heads,
                                  attention_backend=case["attention"])
    layer.set_train(False)
    frames, batch = config.frames, 2 * config.batch
    tokens = ms.Tensor(np.random.default_rng(0).standard_normal(
        (batch * frames, config.latent * config.latent, channels), dtype=np.float32))

    def step():
        return layer(tokens, frames).asnumpy()  # a Cell call: compiled whole in GRAPH_MODE

    return step, {}


STEPS = {"sample": sample_step, "train": train_step, "attn1": attn1_step}


def run(case, config):
    return measure_case(configure(case), STEPS, case, config)
