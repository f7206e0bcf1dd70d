"""Pretraining the world model: a Stable-Diffusion-1.x-shaped text-to-image pipeline of the world (tav.world).

The pipeline has SD's parts and block types at toy widths (the tokenizer and frozen random CLIP text encoder of
tav.tiny, an AutoencoderKL with SD's 8x downscale or, at `latent_downscale=4`, one downsampler fewer, a UNet of
CrossAttnDown/Up blocks around a UNetMidBlock2DCrossAttn, the DDIM scheduler with SD's noise schedule), trained
by tav's own models on single frames of the world drawn at random positions:

1. the VAE to reconstruct frames (L1 + MSE, the object's pixels weighted up, a small KL term; with
   `presence_weight` > 0 also a presence channel, below); its scaling_factor is then set to 1 / the latents'
   standard deviation, as SD's 0.18215 was;
2. the UNet on captioned frames (epsilon prediction, timesteps uniform over the scheduler's DDPM schedule, 10% of
   captions dropped to "" so classifier-free guidance has an unconditional model). It is tav's 3-D
   UNet3DConditionModel run on 1-frame videos: sparse-causal attention over one frame is self-attention, and the
   temporal layers, excluded from training with their output projection (weight and bias) at zero, add nothing;
   it is saved in the 2-D layout without them, as the real SD UNet is.

The presence channel: left to itself the VAE encodes a red and a blue object on white as latents that differ in
sign in some channels, so the inverted noise of a red square says "no blue object here" where the square is,
and an edit to a blue object draws it somewhere else. With `presence_weight` the encoder's mean in latent channel
PRESENCE_CHANNEL is pulled to PRESENCE_LEVEL x the fraction of each latent cell the object covers, the same for
every color and background, so where the object is and what outline it has are written the same way for every
caption, and an edit of color keeps the place. With `presence_region="box"` the channel marks the object's 16x16 box
instead of its own pixels: the same for a square, a circle and a triangle at one place, so the inverted noise of a
square does not say "no triangle here" either.

`train_world_model(output_dir, seed)` writes the whole pipeline folder plus `world_model.json` (seed, steps, the
command, the measured quality); `train_recipe` runs several of those, each going on from earlier ones, as the
shipped weights were made (SHIPPED_RECIPE). Everything is drawn from numpy Generators and MindSpore's seed, so one
seed gives one model (up to the CPU kernels' float summation order).
"""
import contextlib
import logging
import math
import os
import time

import numpy as np

import mindspore as ms
from mindspore import nn, ops

from tav import world
from tav.checkpoint import cell_state_dict, read_json, save_state_dict, write_json_atomic
from tav.world_model import RECORD

logger = logging.getLogger(__name__)

WORLD_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [64, 96, 128],
    "layers_per_block": 1,
    "attention_head_dim": 8,
    "cross_attention_dim": 32,
    "norm_num_groups": 16,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "center_input_sample": False,
    "use_linear_projection": False,
    "upcast_attention": False,
}

WORLD_VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [16, 32, 32, 64],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 64,
    "scaling_factor": 0.18215,  # replaced by the measured 1 / std of the trained VAE's latents
}

LATENT_DOWNSCALES = (8, 4)


def check_latent_downscale(latent_downscale):
    if latent_downscale not in LATENT_DOWNSCALES:
        raise ValueError(f"latent_downscale must be one of {LATENT_DOWNSCALES}, got {latent_downscale!r}")


def world_vae_config(latent_downscale=8):
    """WORLD_VAE_CONFIG, or at latent_downscale 4 its last (deepest) block dropped: 16x16 latents, so a 16-pixel
    object covers 4x4 latent cells instead of 2x2 (SD's objects cover tens of cells of its 64x64 latents)."""
    check_latent_downscale(latent_downscale)
    config = dict(WORLD_VAE_CONFIG)
    if latent_downscale == 4:
        config.update(down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                      block_out_channels=[16, 32, 64])
    return config


def world_unet_config(latent_downscale=8):
    """WORLD_UNET_CONFIG with its sample_size the latent size of a 64-pixel frame at that downscale."""
    check_latent_downscale(latent_downscale)
    return dict(WORLD_UNET_CONFIG, sample_size=world.FRAME_SIZE // latent_downscale)


TEXT_HIDDEN_SIZE = 32
CAPTION_DROPOUT = 0.1


PRESENCE_CHANNEL = 3
PRESENCE_LEVEL = 6.0  # about the size of an object's own latent deviation from its background's


def object_coverage(frame, scene):
    """(64, 64) float32 in [0, 1]: how much of each pixel the object covers, read back from the anti-aliased frame
    as the fraction of the way from the background's color to the object's."""
    background = np.array(world.BACKGROUNDS[scene.background], np.float32)
    colour = np.array(world.COLORS[scene.color], np.float32)
    channel = int(np.argmax(np.abs(colour - background)))
    covered = (frame[..., channel].astype(np.float32) - background[channel]) / (colour[channel] - background[channel])
    return np.clip(covered, 0.0, 1.0)


def presence_targets(coverage, downscale):
    """(n, 1, h, w): PRESENCE_LEVEL x the mean coverage of each downscale x downscale latent cell."""
    n, size = coverage.shape[0], coverage.shape[-1] // downscale
    cells = coverage.reshape(n, size, downscale, size, downscale).mean(axis=(2, 4))
    return (PRESENCE_LEVEL * cells)[:, None].astype(np.float32)


PRESENCE_REGIONS = ("object", "box")


def check_presence_region(presence_region):
    if presence_region not in PRESENCE_REGIONS:
        raise ValueError(f"presence_region={presence_region!r}; expected one of {', '.join(PRESENCE_REGIONS)}")


def frame_batch(rng, n, presence_region="object"):
    """(pixels (n, 3, 64, 64) in [-1, 1] float32, object weights (n, 1, 64, 64), coverage (n, 64, 64), scenes).
    The coverage is the presence channel's region: the object's own pixels ("object") or its 16x16 box ("box")."""
    check_presence_region(presence_region)
    frames, weights, coverage, scenes = [], [], [], []
    for _ in range(n):
        frame, scene, center = world.random_frame(rng)
        background = np.array(world.BACKGROUNDS[scene.background], np.float32)
        near_object = np.abs(frame.astype(np.float32) - background).max(axis=-1) > 8
        frames.append(frame)
        weights.append(1.0 + 4.0 * near_object)
        coverage.append(object_coverage(frame, scene) if presence_region == "object" else world.box_coverage(center))
        scenes.append(scene)
    pixels = np.stack(frames).astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0
    return pixels, np.stack(weights)[:, None].astype(np.float32), np.stack(coverage), scenes


class VAELoss(nn.Cell):
    def __init__(self, vae, kl_weight, presence_weight=0.0):
        super().__init__()
        self.vae = vae
        self.kl_weight = kl_weight
        self.presence_weight = presence_weight

    def construct(self, pixels, weights, presence, noise):
        moments = self.vae.encode_moments(pixels)
        mean, logvar = ops.chunk(moments, 2, 1)
        logvar = ops.clamp(logvar, -30.0, 20.0)
        z = mean + ops.exp(0.5 * logvar) * noise
        recon = self.vae.decode(z)
        error = recon - pixels
        rec = (weights * (ops.abs(error) + error * error)).mean()
        kl = 0.5 * (mean * mean + ops.exp(logvar) - 1.0 - logvar).sum(axis=(1, 2, 3)).mean()
        presence_error = mean[:, PRESENCE_CHANNEL:PRESENCE_CHANNEL + 1] - presence
        return rec + self.kl_weight * kl + self.presence_weight * (presence_error * presence_error).mean()


class UNetLoss(nn.Cell):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def construct(self, noisy, timesteps, context, noise):
        pred = self.unet(noisy, timesteps, context)
        return ((pred - noise) ** 2).mean()


class GradStep(nn.Cell):
    """Loss and gradients as one compiled graph (GRAPH_MODE); the optimiser then runs as its own graph."""

    def __init__(self, loss, weights):
        super().__init__()
        self.loss = loss
        self.weights = ms.ParameterTuple(weights)
        self.grad_fn = ms.value_and_grad(loss, None, self.weights)

    def construct(self, *inputs):
        loss, grads = self.grad_fn(*inputs)
        grads = ops.clip_by_global_norm(grads, 1.0)
        return loss, grads


def cosine_lr(step, steps, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _optimizer(weights, steps, lr, warmup):
    schedule = [cosine_lr(s, steps, lr, warmup) for s in range(steps)]
    return nn.Adam(weights, learning_rate=schedule, weight_decay=0.0)


def _log_every(step, steps, loss, started, what, log_every):
    if step < 3 or step % log_every == 0 or step == steps - 1:
        elapsed = time.time() - started
        logger.info(f"{what} step {step + 1}/{steps} loss {loss:.5f} ({elapsed:.0f}s, "
                    f"{elapsed / (step + 1):.2f}s/step)")


@contextlib.contextmanager
def vae_training_ops():
    """The ops the VAE's training graph is built and compiled with, for a with-block (restored after): the portable
    ops, not tav's native CPU kernels (some are inference-only: "Custom's bprop not defined"), chosen both when the
    layers are built and when the graph compiles."""
    from tav import backend

    previous = os.environ.get(backend.NATIVE_KERNELS_ENV)
    os.environ[backend.NATIVE_KERNELS_ENV] = "0"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[backend.NATIVE_KERNELS_ENV]
        else:
            os.environ[backend.NATIVE_KERNELS_ENV] = previous


def train_vae(steps, batch_size=16, lr=1e-3, kl_weight=1e-6, seed=0, log_every=10, vae=None, latent_downscale=8,
              presence_weight=0.0, presence_region="object"):
    """Train a fresh VAE (or go on training `vae`, with its own warmup and cosine schedule) for `steps` steps;
    `presence_weight` > 0 adds the presence channel's loss over `presence_region` (the module docstring)."""
    check_presence_region(presence_region)
    with vae_training_ops():
        return _train_vae(steps, batch_size, lr, kl_weight, seed, log_every, vae, latent_downscale, presence_weight,
                          presence_region)


def _train_vae(steps, batch_size, lr, kl_weight, seed, log_every, vae, latent_downscale, presence_weight,
               presence_region):
    from tav.models.vae import AutoencoderKL

    ms.set_seed(seed)
    if vae is None:
        vae = AutoencoderKL(world_vae_config(latent_downscale))
    latent = world.FRAME_SIZE // vae.downscale_factor
    weights = list(vae.trainable_params())
    step_fn = GradStep(VAELoss(vae, kl_weight, presence_weight), weights)
    optimizer = _optimizer(weights, steps, lr, warmup=min(100, steps // 10 + 1))
    rng = np.random.default_rng(seed)
    started = time.time()
    for step in range(steps):
        pixels, object_weights, coverage, _ = frame_batch(rng, batch_size, presence_region)
        noise = rng.standard_normal((batch_size, 4, latent, latent)).astype(np.float32)
        presence = presence_targets(coverage, vae.downscale_factor)
        loss, grads = step_fn(ms.Tensor(pixels), ms.Tensor(object_weights), ms.Tensor(presence), ms.Tensor(noise))
        optimizer(grads)
        _log_every(step, steps, float(loss.asnumpy()), started, "vae", log_every)
    return vae


def encode_bank(vae, n, seed, batch_size=64):
    """A bank of n random captioned frames: (means, stds) (n, 4, h, w) of the VAE posterior, caption indices."""
    rng = np.random.default_rng(seed)
    captions = [s.caption for s in world.all_scenes()]
    means, stds, labels = [], [], []
    for start in range(0, n, batch_size):
        pixels, _, _, scenes = frame_batch(rng, min(batch_size, n - start))
        moments = vae.encode_moments(ms.Tensor(pixels)).asnumpy()
        mean, logvar = np.split(moments, 2, axis=1)
        means.append(mean)
        stds.append(np.exp(0.5 * np.clip(logvar, -30, 20)))
        labels.extend(captions.index(s.caption) for s in scenes)
    return np.concatenate(means), np.concatenate(stds), np.array(labels)


def caption_embeddings(pipeline_dir):
    """(37, 77, D): the frozen text encoder's states for the 36 captions, then for "" (the unconditional one)."""
    from tav.text import encode_prompts, load_text_encoder, load_tokenizer

    tokenizer = load_tokenizer(os.path.join(pipeline_dir, "tokenizer"))
    encoder = load_text_encoder(os.path.join(pipeline_dir, "text_encoder"))
    captions = [s.caption for s in world.all_scenes()] + [""]
    return encode_prompts(tokenizer, encoder, captions).asnumpy()


def build_unet(seed, latent_downscale=8, unet_from=None):
    """The 3-D UNet for 1-frame training: temporal output projections zeroed (weight and bias), so a 1-frame
    temporal attention adds exactly nothing and the trained function is the 2-D UNet's. `unet_from`: a unet/
    folder (or pipeline folder) save_unet_2d wrote, whose weights it starts from instead of a fresh init."""
    from tav.models.unet3d import UNet3DConditionModel, is_temporal_key

    ms.set_seed(seed)
    if unet_from:
        unet = UNet3DConditionModel.from_pretrained_2d(unet_from)
        if unet.config.sample_size * latent_downscale != world.FRAME_SIZE:
            raise ValueError(f"--unet_from {unet_from}: its UNet takes {unet.config.sample_size}x"
                             f"{unet.config.sample_size} latents, the VAE writes "
                             f"{world.FRAME_SIZE // latent_downscale}x{world.FRAME_SIZE // latent_downscale}")
    else:
        unet = UNet3DConditionModel(world_unet_config(latent_downscale))
    for name, param in unet.parameters_and_names():
        if is_temporal_key(name) and ".to_out." in name:
            param.set_data(ops.zeros(param.shape, param.dtype))
    weights = [p for n, p in unet.parameters_and_names() if not is_temporal_key(n) and p.requires_grad]
    return unet, weights


def train_unet(bank, embeddings, scaling_factor, alphas_cumprod, steps, batch_size=32, lr=1e-3, seed=0,
               log_every=10, unet_from=None):
    means, stds, labels = bank
    alphas = np.asarray(alphas_cumprod, np.float64)
    unet, weights = build_unet(seed, world.FRAME_SIZE // means.shape[-1], unet_from)
    step_fn = GradStep(UNetLoss(unet), weights)
    optimizer = _optimizer(weights, steps, lr, warmup=min(200, steps // 10 + 1))
    rng = np.random.default_rng(seed + 1)
    uncond = len(embeddings) - 1
    started = time.time()
    for step in range(steps):
        idx = rng.integers(0, len(labels), batch_size)
        latents = (means[idx] + stds[idx] * rng.standard_normal(means[idx].shape)) * scaling_factor
        t = rng.integers(0, len(alphas), batch_size)
        noise = rng.standard_normal(latents.shape)
        a = alphas[t][:, None, None, None]
        noisy = np.sqrt(a) * latents + np.sqrt(1 - a) * noise
        text = np.where(rng.random(batch_size) < CAPTION_DROPOUT, uncond, labels[idx])
        loss, grads = step_fn(ms.Tensor(noisy[:, :, None].astype(np.float32)), ms.Tensor(t.astype(np.int64)),
                              ms.Tensor(embeddings[text]), ms.Tensor(noise[:, :, None].astype(np.float32)))
        optimizer(grads)
        _log_every(step, steps, float(loss.asnumpy()), started, "unet", log_every)
    return unet


def write_text_parts(pipeline_dir, seed):
    """tokenizer/, text_encoder/ (tav.tiny's BPE tokenizer and a frozen random CLIP text encoder), scheduler/,
    model_index.json."""
    from tav import tiny

    vocab = tiny.write_tiny_tokenizer(os.path.join(pipeline_dir, "tokenizer"))
    tiny.write_tiny_text_encoder(os.path.join(pipeline_dir, "text_encoder"), vocab_size=vocab,
                                 hidden_size=TEXT_HIDDEN_SIZE, seed=seed)
    tiny.write_tiny_scheduler(os.path.join(pipeline_dir, "scheduler"))
    tiny.write_model_index(pipeline_dir)


def save_vae(vae, folder, scaling_factor):
    os.makedirs(folder, exist_ok=True)
    config = dict(world_vae_config(vae.downscale_factor), scaling_factor=float(scaling_factor))
    state = {k: v.astype(np.float16) for k, v in cell_state_dict(vae).items()}
    save_state_dict(state, os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    write_json_atomic(config, os.path.join(folder, "config.json"))


def save_unet_2d(unet, folder):
    from tav.models.unet3d import is_temporal_key

    os.makedirs(folder, exist_ok=True)
    state = {k: v.astype(np.float16) for k, v in cell_state_dict(unet).items() if not is_temporal_key(k)}
    save_state_dict(state, os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    config = world_unet_config(world.FRAME_SIZE // unet.config.sample_size)
    write_json_atomic(config, os.path.join(folder, "config.json"))


def earlier_record(part_dir):
    """The training record of the pipeline folder a reused `unet/` or `vae/` folder sits in, or None."""
    if not part_dir:
        return None
    path = os.path.join(os.path.dirname(os.path.abspath(part_dir)), RECORD)
    return read_json(path, "world model training record") if os.path.isfile(path) else None


# The shipped weights (tav/assets/world_model/, the sixth retrain in docs/world.md) came from three runs of
# train_world_model, each going on from the one before: the box presence VAE and a UNet from scratch, the UNet on
# for 2400 steps, then the VAE refined (its decoder gave yellow on black back red) and the UNet on again on the
# refined VAE's latents. An int under vae_from / unet_from is the number of the stage whose folder it reuses.
SHIPPED_RECIPE = (
    {"latent_downscale": 4, "vae_steps": 800, "unet_steps": 3600, "unet_batch": 24, "presence_weight": 0.5,
     "presence_region": "box"},
    {"vae_from": 1, "unet_from": 1, "unet_steps": 2400, "unet_batch": 24, "unet_lr": 3e-4},
    {"vae_from": 1, "vae_refine_steps": 800, "presence_weight": 0.5, "presence_region": "box", "unet_from": 2,
     "unet_steps": 2400, "unet_batch": 24, "unet_lr": 3e-4},
)
STAGES_DIR = "stages"  # inside the output folder: the recipe's earlier runs, kept so the record's chain resolves


def train_recipe(output_dir, recipe=SHIPPED_RECIPE, seed=0, command=None, **overrides):
    """Run `recipe`'s stages with train_world_model: stage N < last into output_dir/stages/N, the last into
    output_dir, so output_dir ends as the pipeline folder whose record chains back through every stage.
    `overrides` (the tests' toy sizes) replace a stage's own values of the same name, and a name no stage sets
    (bank_size, vae_batch) applies to every stage. Returns the last record."""
    stage_dirs = [os.path.join(output_dir, STAGES_DIR, str(n)) for n in range(1, len(recipe))] + [output_dir]
    stages = []  # every stage's arguments, resolved before the first one trains: a bad reference costs no hours
    for number, stage in enumerate(recipe, 1):
        kwargs = dict(stage)
        for key, part in (("vae_from", "vae"), ("unet_from", "unet")):
            if key in kwargs:
                if not 1 <= kwargs[key] < number:
                    raise ValueError(f"recipe stage {number}: {key}={kwargs[key]!r} names no earlier stage")
                kwargs[key] = os.path.join(stage_dirs[kwargs[key] - 1], part)
        kwargs.update({k: v for k, v in overrides.items() if k in stage or not any(k in s for s in recipe)})
        stages.append(kwargs)
    for number, (stage_dir, kwargs) in enumerate(zip(stage_dirs, stages), 1):
        logger.info(f"recipe stage {number} of {len(recipe)} -> {stage_dir}")
        record = train_world_model(stage_dir, seed=seed, command=command and f"{command} [stage {number} of "
                                   f"{len(recipe)}]", **kwargs)
    return record


def train_world_model(output_dir, seed=0, vae_steps=1500, unet_steps=4000, bank_size=20000, command=None,
                      vae_batch=16, unet_batch=32, vae_from=None, vae_refine_steps=0, vae_refine_lr=3e-4,
                      latent_downscale=8, presence_weight=0.0, presence_region="object", unet_from=None,
                      unet_lr=1e-3):
    """Write a trained world pipeline folder into `output_dir` (see the module docstring); returns its record.
    `vae_from`: a VAE folder this function wrote before (same seed and steps), reused instead of stage 1.
    `vae_refine_steps`: then go on training the VAE that many steps at the lower peak `vae_refine_lr` (a second
    cosine schedule; the L1 + MSE loss was still falling, and sharper corners are what tell squares from circles).
    `latent_downscale`: 8 (SD's) or 4 (world_vae_config); a reused VAE brings its own.
    `presence_weight`: the presence channel's loss weight in the VAE's training and refine (0: none);
    `presence_region`: what it marks, the object's own pixels ("object") or its box ("box", the same for every shape).
    `unet_from`: a UNet folder this function wrote (for the same VAE: pass its folder as `vae_from`), trained on for
    `unet_steps` more steps at peak `unet_lr` (a new cosine schedule) instead of a new UNet."""
    from tav.models.vae import AutoencoderKL
    from tav.schedulers import DDIMScheduler

    check_latent_downscale(latent_downscale)  # before anything is written
    check_presence_region(presence_region)
    if unet_from and not vae_from:
        raise ValueError(f"unet_from={unet_from!r} needs vae_from: a UNet learned one VAE's latents, so it trains on "
                         "only with that VAE")
    started = time.time()
    os.makedirs(output_dir, exist_ok=True)
    write_text_parts(output_dir, seed)
    embeddings = caption_embeddings(output_dir)
    alphas_cumprod = DDIMScheduler.from_config(os.path.join(output_dir, "scheduler")).alphas_cumprod

    if vae_from:
        with vae_training_ops():  # built with the ops a refine's training graph needs
            vae = AutoencoderKL.from_pretrained(vae_from)
    else:
        vae = train_vae(vae_steps, batch_size=vae_batch, seed=seed, latent_downscale=latent_downscale,
                        presence_weight=presence_weight, presence_region=presence_region)
    vae_trained_here = bool(vae_refine_steps or not vae_from)
    if vae_refine_steps:
        vae = train_vae(vae_refine_steps, batch_size=vae_batch, lr=vae_refine_lr, seed=seed + 3, vae=vae,
                        presence_weight=presence_weight, presence_region=presence_region)
    vae_seconds = time.time() - started
    bank = encode_bank(vae, bank_size, seed + 2)
    scaling_factor = 1.0 / float(np.sqrt((bank[0] ** 2).mean() + (bank[1] ** 2).mean()))
    save_vae(vae, os.path.join(output_dir, "vae"), scaling_factor)
    logger.info(f"vae trained in {vae_seconds:.0f}s; scaling_factor {scaling_factor:.4f}")

    unet = train_unet(bank, embeddings, scaling_factor, alphas_cumprod, unet_steps, batch_size=unet_batch,
                      lr=unet_lr, seed=seed + 5 if unet_from else seed, unet_from=unet_from)
    save_unet_2d(unet, os.path.join(output_dir, "unet"))
    record = {
        "seed": seed,
        "command": command,
        "vae_steps": None if vae_from else vae_steps,  # a reused VAE was trained by the run it came from
        "vae_batch_size": vae_batch,
        "unet_steps": unet_steps,
        "unet_batch_size": unet_batch,
        "bank_size": bank_size,
        "latent_downscale": vae.downscale_factor,
        "vae_reused_from": vae_from,
        "vae_refine_steps": vae_refine_steps,
        "vae_refine_lr": vae_refine_lr,
        "unet_from": unet_from,
        "unet_lr": unet_lr,
        # a reused VAE's presence channel was set by the run that trained it, unless refined here
        "presence_weight": presence_weight if vae_trained_here else None,
        "presence_region": presence_region if vae_trained_here else None,
        "scaling_factor": scaling_factor,
        "train_seconds": round(time.time() - started, 1),
    }
    earlier = earlier_record(unet_from or vae_from)
    if earlier is not None:  # the weights went on from another run: keep how that one was made
        record["continued_from"] = earlier
    write_json_atomic(record, os.path.join(output_dir, RECORD))
    return record
