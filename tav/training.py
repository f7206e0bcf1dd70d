"""One-shot tuning of the inflated UNet on one clip, as the official `train_tuneavideo.py`.

    config = tav.config.load_train_config("configs/man-skiing.yaml")
    result = tav.training.train(config)          # result.losses, result.delta_path, result.output_dir

This file is the loop; each concern it calls lives in its own module:
    tav.optim        precision plan, learning-rate schedules, dynamic loss scale, AdamW, gradient clipping
    tav.train_step   the diffusion loss, its compiled gradient graph and the update (TrainStep)
    tav.train_state  checkpoint-N/ folders (write, list, prune, resume), the per-step random draws
    tav.delta        the trainable-only delta file the pipeline loads
    tav.pipeline     loading the Stable Diffusion parts, and validation sampling (the same sampler as tools/sample.py)

`train()` trains and writes outputs; it leaves process state to its caller: the device, the execution mode and the
console logging are set by tools/train.py (or whoever calls it). It attaches a file handler for train.log for its
own duration. Everything it can check is checked before anything is written into output_dir. (About 600 lines:
the loop with its resume, NaN stop and data parallel, and the checks before it that name the config key at fault,
belong to the run rather than to any one part.)

Randomness: the per-step draws (VAE posterior noise, one timestep per video, the diffusion noise) come from a numpy
Generator seeded with config.seed and enter the compiled step as Tensors. Its state is saved in every checkpoint,
so a resumed run draws the same numbers as an uninterrupted one.

Data parallel (`parallel=DataParallel(rank, world_size)`, tools/train.py --use_parallel True under msrun): every
rank draws the update's numbers for all ranks x train_batch_size videos from the same seeded Generator and trains
on its own rows of them, so each rank's videos get their own timesteps and noise, and the run draws exactly what
one process with train_batch_size = ranks x batch draws; the gradients are averaged over ranks inside TrainStep.
Only rank 0 writes into output_dir (config, train.log, checkpoints, samples, the delta); every rank reads the same
inputs and checkpoint, and all ranks agree that their inputs are valid before rank 0 writes anything.
"""
import dataclasses
import logging
import math
import os
import shutil
import time

import numpy as np

import mindspore as ms
from mindspore import ops

from tav import backend, checkpoint
from tav import train_state as state
from tav.config import RUN_CONFIG_NAME, ConfigError, check_input_paths
from tav.delta import DELTA_NAME, base_identity, delta_keys, lora_identity
from tav.lora_tuning import LORA_TRAINABLE_MODULES, add_lora_adapters
from tav.loss_plot import write_loss_plot
from tav.optim import AdamW, DynamicLossScale, learning_rate_at, precision_plan
from tav.train_step import DataParallel, TrainStep, select_trainable

logger = logging.getLogger("tav.train")

PIPELINE_PARTS = ("vae", "text_encoder", "tokenizer", "scheduler")
LOSS_PLOT_NAME = "loss.png"  # beside train.log, rewritten at every checkpoint


class TrainingError(RuntimeError):
    """Training cannot go on (NaN loss, ...); the message says why and what was kept."""


# ---------------------------------------------------------------------------------------------------------------
# Inputs: checked before anything is written


def check_run_inputs(config):
    """Every check that needs no model: the paths, the base model folder's layout, output_dir (writable; holding
    another run only with resume or overwrite), the resume request. Returns the checkpoint folder to resume from,
    or None. Raises ConfigError; writes nothing (output_dir is created when missing)."""
    from tav.video import VideoError, check_writable_dir

    check_input_paths(config)
    check_model_source(config)
    try:
        check_writable_dir(config.output_dir)
    except VideoError as exc:
        raise ConfigError(f"{config.where('output_dir')}: output_dir {config.output_dir!r} is not writable: "
                          f"{exc}") from None
    resume_path = resolve_resume(config)
    # Resuming a checkpoint of output_dir continues the run there; anything else would mix with what is there.
    continues_here = resume_path is not None and os.path.dirname(os.path.abspath(resume_path)) == config.output_dir
    if not continues_here and not config.overwrite_output_dir:
        found = state.previous_run_outputs(config.output_dir)
        if found:
            shown = ", ".join(found[:6]) + (f" and {len(found) - 6} more" if len(found) > 6 else "")
            raise ConfigError(
                f"{config.source}: output_dir {config.output_dir} holds another run's outputs ({shown}). To continue "
                f"that run pass --resume_from_checkpoint latest (resume_from_checkpoint: latest); to start over and "
                f"delete its checkpoints, delta, samples and log pass --overwrite_output_dir "
                f"(overwrite_output_dir: true); or choose another output_dir")
    return resume_path


def check_model_source(config):
    """pretrained_model_path is a diffusers SD folder with every part, or one checkpoint file with the single-file
    keys it needs (prediction_type, tokenizer_from, config_from); nothing is read beyond the folder's configs."""
    from tav.ldm_checkpoint import check_pretrained_source
    from tav.pipeline import check_pipeline_folder

    try:
        kind = check_pretrained_source(config.pretrained_model_path, config.prediction_type, config.tokenizer_from,
                                       config.config_from, option="pretrained_model_path")
        if kind == "folder":
            check_pipeline_folder(config.pretrained_model_path)
    except checkpoint.CheckpointError as exc:
        raise ConfigError(f"{config.where('pretrained_model_path')}: pretrained_model_path: {exc}") from None


def base_model_folder(config):
    """The diffusers folder to load: pretrained_model_path itself, or its single checkpoint file converted by
    tav.ldm_checkpoint.resolve_pretrained into converted_cache_dir (reused while the file is unchanged) or a
    temporary folder. The delta still records pretrained_model_path, the file the user named."""
    from tav.ldm_checkpoint import resolve_pretrained

    if os.path.isdir(config.pretrained_model_path):
        return config.pretrained_model_path
    try:
        return resolve_pretrained(config.pretrained_model_path, config.prediction_type, config.tokenizer_from,
                                  config.config_from, cache_dir=config.converted_cache_dir)
    except checkpoint.CheckpointError as exc:
        raise ConfigError(f"{config.where('pretrained_model_path')}: cannot convert the checkpoint file "
                          f"{config.pretrained_model_path!r}: {exc}") from exc


def resolve_resume(config):
    """The checkpoint folder to resume from, or None ('latest' with no checkpoint in output_dir). The checkpoint
    must have been written under a compatible config (tav.train_state.RESUMABLE_CHANGES lists what may differ)."""
    request = config.resume_from_checkpoint
    if not request:
        return None
    if request == "latest":
        found = state.list_checkpoints(config.output_dir)
        if not found:
            if state.previous_run_outputs(config.output_dir):
                raise ConfigError(
                    f"{config.source}: resume_from_checkpoint: latest: output_dir {config.output_dir} holds another "
                    f"run's outputs ({', '.join(state.previous_run_outputs(config.output_dir))}) but no "
                    f"{state.CHECKPOINT_PREFIX}N folder to resume; pass --overwrite_output_dir to start over")
            return None
        path = found[-1][1]
    else:
        path = request
        if not os.path.isfile(os.path.join(path, state.STATE_NAME)):
            raise ConfigError(f"{config.where('resume_from_checkpoint')}: resume_from_checkpoint points to {path!r}, "
                              f"which is not a checkpoint folder (no {state.STATE_NAME}); use 'latest' or a "
                              f"{state.CHECKPOINT_PREFIX}N folder")
    try:
        recorded = state.recorded_config(path)
    except checkpoint.CheckpointError as exc:
        raise ConfigError(f"{config.where('resume_from_checkpoint')}: resume_from_checkpoint: {exc}") from None
    if recorded is not None:
        refused, _ = state.config_differences(recorded, config.to_dict())
        if refused:
            raise ConfigError(
                f"{config.source}: cannot resume {path}: it was trained with a different "
                f"{', '.join(refused)} ({'; '.join(_describe_change(recorded, config.to_dict(), k) for k in refused[:4])}"
                f"). Resume with the checkpoint's values, or start over with --overwrite_output_dir")
    return path


def _describe_change(recorded, current, key):
    def get(values):
        for part in key.split("."):
            values = values.get(part) if isinstance(values, dict) else None
        return values

    return f"{key}: {get(recorded)!r} in the checkpoint, {get(current)!r} now"


# ---------------------------------------------------------------------------------------------------------------
# Loading the parts and the clip


def load_models(config, plan, seed, folder=None):
    """(unet, vae, tokenizer, text_encoder, scheduler) of `folder` (base_model_folder(config) when None), through
    the pipeline's loaders; the UNet in fp32 (its trainable tensors' fp32 values become the optimiser's masters)
    with config.frame_policy and config.group_norm_scope, the frozen parts in the compute dtype."""
    from tav.models.attention import FRAME_POLICIES, set_frame_policy
    from tav.models.resnet import set_group_norm_scope
    from tav.pipeline import load_frozen_parts, load_unet

    folder = folder or base_model_folder(config)
    try:
        # The fresh temporal layers are drawn from `seed` (the official seeds torch before from_pretrained_2d),
        # not from MindSpore's global RNG: the same config gives the same start in any process.
        unet = load_unet(folder, attention_backend=config.resolved_attention_backend(), init_seed=seed)
        set_frame_policy(unet, FRAME_POLICIES[config.frame_policy])
        set_group_norm_scope(unet, config.group_norm_scope)
        vae, text_encoder, tokenizer, scheduler = load_frozen_parts(folder, plan.compute_dtype)
    except checkpoint.CheckpointError as exc:
        raise ConfigError(f"{config.where('pretrained_model_path')}: cannot load the base model from "
                          f"pretrained_model_path {config.pretrained_model_path!r}: {exc}") from exc
    return unet, vae, tokenizer, text_encoder, scheduler


def read_clip(config):
    """The training clip's pixels (1, 3, F, H, W) in [-1, 1]; ConfigError when it cannot be decoded or is short."""
    from tav.video import VideoError, load_video

    data = config.train_data
    try:
        pixels = load_video(data.video_path, data.n_sample_frames, data.sample_start_idx, data.sample_frame_rate,
                            data.height, data.width)
    except VideoError as exc:
        raise ConfigError(f"{config.where('train_data.video_path')}: train_data.video_path: {exc}") from None
    return pixels.transpose(1, 0, 2, 3)[None]


def encode_clip(vae, pixels):
    """The clip's VAE posterior (mean, std), each fp32 (1, 4, F, h, w). The VAE is frozen, so this is computed
    once; every step samples it afresh (the official re-encodes the clip each step to the same posterior)."""
    from tav.models.vae import encode_video

    posterior = encode_video(vae, ms.Tensor(pixels))
    return posterior.mean.astype(ms.float32), posterior.std.astype(ms.float32)


def scaled_latents(vae, mean, std, posterior_noise):
    """(mean + std * noise - shift) * scaling_factor, on the host: the latents the step trained on."""
    shift = 0.0 if vae.shift_factor is None else vae.shift_factor
    z = mean.asnumpy() + std.asnumpy() * posterior_noise
    return ((z - shift) * vae.scaling_factor).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Validation: the library pipeline over the modules being trained


def validation_window(config):
    """With train_data.frames_per_step the UNet was tuned on windows of that many frames: validation inverts and
    samples the clip in such windows too (tav.windows, the default overlap), so its memory is a window's."""
    from tav.windows import WindowSpec, default_overlap

    size = config.train_data.frames_per_step
    length = config.validation_data.video_length or config.train_data.n_sample_frames
    if size is None or size >= length:
        return None
    return WindowSpec(size, default_overlap(size))


def run_validation(config, step, unet, vae, tokenizer, text_encoder, latents, compute_dtype=ms.float32, source=None,
                   folder=None):
    """DDIM-invert `latents` (1, 4, F, h, w; the clip's latents of this step) with the empty prompt, then sample each
    validation prompt from the inverted noise (or from seeded noise when use_inv_latent is false), as
    TuneAVideoPipeline does for tools/sample.py, and write samples/step-N/<name>.<fmt> (tav.video.output_name),
    samples/step-N.<fmt> (all prompts in one grid) and, given the source clip's pixels `source` (1, 3, F, H, W) in
    [-1, 1] of the samples' shape, samples/step-N-source_edit.<fmt>: the source, then each edit, in one row.
    Returns the paths."""
    from tav.pipeline import TuneAVideoPipeline
    from tav.schedulers import DDIMScheduler
    from tav.video import save_videos_grid, write_prompt_videos

    val = config.validation_data
    if not val.prompts:
        return []
    seed = val.seed if val.seed is not None else (config.seed or 0)
    scheduler = DDIMScheduler.from_config(folder or base_model_folder(config))
    pipe = TuneAVideoPipeline(vae, text_encoder, tokenizer, unet, scheduler, dtype=compute_dtype)
    window = validation_window(config)
    start = None
    if val.use_inv_latent:
        start = pipe.invert(ms.Tensor(latents).astype(compute_dtype), val.num_inv_steps, window=window)[-1]
        os.makedirs(os.path.join(config.output_dir, "inv_latents"), exist_ok=True)
        checkpoint.save_state_dict({"latents": start.astype(ms.float32).asnumpy()},
                                   os.path.join(config.output_dir, "inv_latents", f"ddim_latent-{step}.safetensors"))
    height = val.height or config.train_data.height
    width = val.width or config.train_data.width
    length = val.video_length or config.train_data.n_sample_frames
    out_dir = os.path.join(config.output_dir, "samples")
    videos, written = [], []
    for i, prompt in enumerate(val.prompts):
        video = pipe(prompt, length, height, width, val.num_inference_steps, val.guidance_scale, val.negative_prompt,
                     eta=val.eta, latents=start, seed=seed + i, window=window)
        videos.append(video)
        written += write_prompt_videos(video, prompt, os.path.join(out_dir, f"step-{step}"), [val.format], val.fps)
    grid = os.path.join(out_dir, f"step-{step}.{val.format}")
    written.append(str(save_videos_grid(np.concatenate(videos), grid, fps=val.fps, fmt=val.format)))
    if source is not None and tuple(source.shape[2:]) == tuple(videos[0].shape[2:]):
        row = np.concatenate([(np.asarray(source, np.float32) + 1.0) / 2.0] + videos)
        source_edit = os.path.join(out_dir, f"step-{step}-source_edit.{val.format}")
        written.append(str(save_videos_grid(row, source_edit, n_rows=row.shape[0], fps=val.fps, fmt=val.format)))
    return written


# ---------------------------------------------------------------------------------------------------------------
# The official final export: the tuned pipeline in diffusers layout


def save_full_pipeline(config, unet, folder=None):
    """output_dir/{unet, vae, text_encoder, tokenizer, scheduler, model_index.json}: the tuned UNet (config +
    safetensors) and the base model's other parts copied unchanged; each part is replaced atomically."""
    out = config.output_dir
    folder = folder or base_model_folder(config)
    checkpoint.replace_directory_atomically(os.path.join(out, "unet"), unet.save_pretrained)
    for part in PIPELINE_PARTS:
        source = os.path.join(folder, part)
        checkpoint.replace_directory_atomically(
            os.path.join(out, part), lambda tmp, source=source: shutil.copytree(source, tmp, dirs_exist_ok=True))
    base_index_path = os.path.join(folder, "model_index.json")
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


def cast_to_fp32_in_place(unet, optimizer):
    """Cast the UNet to fp32 in place, with the optimiser's fp32 masters in its trainable tensors (mixed precision:
    the export holds the tuned values, not their fp16 copies); a no-op in fp32 training. Returns the UNet."""
    if optimizer.use_master:
        masters = optimizer.master_state()
        unet.to_dtype(ms.float32)
        optimizer.load_master(masters)
    return unet


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


class _RunLog:
    """train.log for the duration of one train() call: a file handler on the `tav.train` logger, removed after.
    output_dir None (a data-parallel rank other than 0, which never writes there): no file; the per-step lines go
    to the rank's console (msrun's log of that rank) instead."""

    def __init__(self, output_dir):
        self.path = os.path.join(output_dir, "train.log") if output_dir is not None else None
        self.handler = logging.FileHandler(self.path, encoding="utf-8") if self.path else None
        if self.handler is not None:
            self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self.previous_level = logger.level

    def __enter__(self):
        if self.handler is not None:
            logger.addHandler(self.handler)
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
        return self

    def __exit__(self, kind, error, trace):
        if self.handler is not None:
            if isinstance(error, TrainingError):  # the caller shows it on the console; the log keeps it too
                self.handler.handle(logger.makeRecord(logger.name, logging.ERROR, __file__, 0, f"error: {error}",
                                                      None, None))
            logger.removeHandler(self.handler)
            self.handler.close()
        logger.setLevel(self.previous_level)

    def to_file(self, message):
        """Per-step lines go to the log file only (the progress bar shows them on the console)."""
        if self.handler is None:
            logger.info(message)
        else:
            self.handler.handle(logger.makeRecord(logger.name, logging.INFO, __file__, 0, message, None, None))


def check_rank_inputs(config, parallel):
    """check_run_inputs on rank 0; on the other ranks only what reads (they never write into output_dir): the
    input paths, the base model folder and the checkpoint to resume. Returns the checkpoint folder or None."""
    if parallel.is_main:
        return check_run_inputs(config)
    check_input_paths(config)
    check_model_source(config)
    return resolve_resume(config)


def _prepare(config, parallel, seed):
    """Step 1 of train(): check and load everything; nothing is written into output_dir until all of it has worked
    (on every rank)."""
    from tav.text import encode_prompts

    resume_path = check_rank_inputs(config, parallel)
    pixels = read_clip(config)
    plan = precision_plan(config.mixed_precision, backend.device_target())
    notices = config.notices() + ([plan.notice] if plan.notice else [])
    if config.seed is None:
        notices.append(f"no seed in the config; using seed {seed}")
    folder = base_model_folder(config)
    unet, vae, tokenizer, text_encoder, scheduler = load_models(config, plan, seed, folder)
    mean, std = encode_clip(vae, pixels.astype(np.float32))
    context = encode_prompts(tokenizer, text_encoder, [config.train_data.prompt]).astype(ms.float32)
    context = ops.broadcast_to(context, (config.train_batch_size,) + tuple(context.shape[1:]))

    if config.lora_rank is not None:  # only the adapters train; the delta holds them alone (tav.lora_tuning)
        try:
            add_lora_adapters(unet, config.lora_rank, config.lora_modules, config.lora_alpha, seed)
        except ValueError as exc:
            raise ConfigError(f"{config.where('lora_modules')}: {exc}") from None
        trainable = select_trainable(unet, LORA_TRAINABLE_MODULES)
        keys = [name for name, _ in trainable]
        identity = lora_identity(unet, config.lora_rank, config.lora_alpha, config.lora_modules, seed)
    else:
        trainable = select_trainable(unet, config.trainable_modules)
        keys = delta_keys(unet, [name for name, _ in trainable])
        identity = base_identity(unet, keys)
    initial = {name: param.asnumpy() for name, param in trainable}
    unet.to_dtype(plan.compute_dtype)  # fp16/bf16: the optimiser keeps fp32 masters of the trainable tensors
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    optimizer = AdamW(trainable, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
                      weight_decay=config.adam_weight_decay, master_dtype=ms.float32)
    optimizer.load_master(initial)
    noise = state.StepNoise(seed)
    loss_scale = DynamicLossScale(enabled=plan.loss_scaling)
    global_step, losses = 0, []
    if resume_path:
        try:
            global_step, losses = state.load_checkpoint(resume_path, unet, optimizer, noise, loss_scale)
        except checkpoint.CheckpointError as exc:
            raise ConfigError(f"{config.source}: cannot resume from {resume_path}: {exc}") from exc
    return (folder, resume_path, plan, notices, unet, vae, tokenizer, text_encoder, scheduler, pixels, mean, std,
            context, trainable, keys, identity, optimizer, noise, loss_scale, global_step, losses)


def train(config, step_callback=None, parallel=None):
    """Tune the UNet of config.pretrained_model_path on config.train_data; see the module docstring.

    `step_callback(step, loss)` runs after every update (tests). `parallel`: this process's DataParallel rank
    (None: one process). Returns a TrainResult (on ranks other than 0 with no paths: they write nothing). Raises
    ConfigError for bad input (before anything is written; on every rank when one rank's check fails) and
    TrainingError when the loss stops being finite (the last good checkpoint stays on disk; the error is in
    train.log too)."""
    from tqdm.auto import tqdm

    parallel = parallel or DataParallel()
    seed = config.seed
    if seed is None:  # one seed for all ranks: rank 0's
        seed = parallel.from_main(int(np.random.SeedSequence().entropy % (2 ** 31)))
    refused = None
    try:
        prepared = _prepare(config, parallel, seed)
    except ConfigError as exc:
        refused = exc
    if not parallel.all_agree(refused is None):
        raise refused or ConfigError(f"{config.source}: another data-parallel rank refused the inputs (rank 0's "
                                     f"console and log say why); rank {parallel.rank} stops too")
    (folder, resume_path, plan, notices, unet, vae, tokenizer, text_encoder, scheduler, pixels, mean, std, context,
     trainable, keys, identity, optimizer, noise, loss_scale, global_step, losses) = prepared
    main = parallel.is_main
    train_step = TrainStep(unet, optimizer, scheduler, vae.scaling_factor, vae.shift_factor, config.max_grad_norm,
                           plan.compute_dtype, parallel)
    latent_shape = tuple(mean.shape[1:])
    frames_per_step = config.train_data.frames_per_step
    if frames_per_step is not None:  # a long clip: each update sees a window of it (tav.windows layout)
        clip_mean, clip_std = mean.asnumpy(), std.asnumpy()
        latent_shape = (latent_shape[0], frames_per_step) + latent_shape[2:]
    micro_steps, batch = config.gradient_accumulation_steps, config.train_batch_size
    num_train_timesteps = scheduler.config.num_train_timesteps

    def save(step):
        values = optimizer.master_state()  # the trained tensors' fp32 values, then the rest of the delta's keys
        params = dict(unet.parameters_and_names())
        values.update({name: params[name].astype(ms.float32).asnumpy() for name in keys if name not in values})
        path = state.write_checkpoint(config.output_dir, step, values, identity, optimizer, noise, loss_scale,
                                      losses, config)
        steps = [s for s, _ in losses]
        if steps:  # a run resumed at its end may have none of its own, but always has the resumed ones
            write_loss_plot(os.path.join(config.output_dir, LOSS_PLOT_NAME), steps, [loss for _, loss in losses],
                            [learning_rate_at(config, s - 1, parallel.world_size) for s in steps])
        for removed in state.prune_checkpoints(config.output_dir, config.checkpoints_total_limit):
            logger.info(f"removed old checkpoint {removed}")
        logger.info(f"saved checkpoint {path}")
        return path

    # 2. Clear what the user asked to clear, then write the config and the log (rank 0 only).
    cleared = state.clear_previous_run(config.output_dir) if main and config.overwrite_output_dir else []
    interrupted = state.remove_interrupted_writes(config.output_dir) if main else []
    if main:
        checkpoint.write_text_atomic(config.to_yaml(), os.path.join(config.output_dir, RUN_CONFIG_NAME))
    with _RunLog(config.output_dir if main else None) as run_log:
        for notice in notices:
            logger.info(f"notice: {notice}")
        if cleared:
            logger.info(f"overwrite_output_dir: removed the previous run's {', '.join(cleared)}")
        for path in interrupted:
            logger.info(f"removed {path}, left by an interrupted checkpoint write")
        n_params = sum(int(np.prod(p.shape)) for _, p in trainable)
        total_params = sum(int(np.prod(p.shape)) for p in unet.get_parameters())
        tuned = (f"rank-{config.lora_rank} adapters on {', '.join(config.lora_modules)}" if config.lora_rank is not None
                 else f"modules ending with {', '.join(config.trainable_modules)}")
        logger.info(f"trainable: {len(trainable)} tensors, {n_params:,} parameters of {total_params:,} ({tuned})")
        if parallel.world_size > 1:
            logger.info(f"data parallel: rank {parallel.rank} of {parallel.world_size}, {batch} video(s) per rank "
                        f"per micro-step ({batch * parallel.world_size} in all)")
        if resume_path:
            logger.info(f"resumed from {resume_path} at step {global_step}")

        # 3. The loop.
        last_checkpoint, samples, skipped_in_a_row = resume_path, [], 0
        with tqdm(total=config.max_train_steps, initial=global_step, desc="Steps", unit="step",
                  dynamic_ncols=True, disable=not main) as bar:
            while global_step < config.max_train_steps:
                lr = learning_rate_at(config, global_step, parallel.world_size)
                step_mean, step_std = mean, std
                if frames_per_step is not None:
                    frames = noise.draw_frames(clip_mean.shape[2], frames_per_step)
                    step_mean, step_std = ms.Tensor(clip_mean[:, :, frames]), ms.Tensor(clip_std[:, :, frames])
                posterior_noise, step_noise, timesteps = noise.draw(micro_steps, batch * parallel.world_size,
                                                                    latent_shape, num_train_timesteps)
                rows = parallel.rows(batch)
                posterior_noise, step_noise, timesteps = (np.ascontiguousarray(draw[:, rows]) for draw in
                                                          (posterior_noise, step_noise, timesteps))
                started = time.perf_counter()
                loss, finite, norm = train_step.report(step_mean, step_std, ms.Tensor(posterior_noise),
                                                       ms.Tensor(step_noise), ms.Tensor(timesteps), context,
                                                       ms.Tensor(lr, ms.float32),
                                                       ms.Tensor(loss_scale.scale, ms.float32))
                seconds = time.perf_counter() - started
                if not math.isfinite(loss) or not finite:
                    skipped_in_a_row += 1
                    if not plan.loss_scaling or skipped_in_a_row >= 20:
                        raise TrainingError(non_finite_message(config, plan, loss, finite, global_step + 1,
                                                               last_checkpoint))
                    loss_scale.update(False)
                    logger.info(f"step {global_step + 1}: gradient overflow at loss scale {loss_scale.scale * 2:g}; "
                                f"update skipped, scale now {loss_scale.scale:g}")
                    continue
                skipped_in_a_row = 0
                loss_scale.update(True)
                global_step += 1
                losses.append([global_step, loss])
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", s_step=f"{seconds:.2f}")
                if global_step == config.max_train_steps:
                    bar.close()  # so the bar's rate and time are the training's, not the final validation's
                run_log.to_file(f"step {global_step} loss {loss:.6f} lr {lr:.3e} grad_norm {norm:.4f} "
                                f"time {seconds:.3f}s")
                if step_callback is not None:
                    step_callback(global_step, loss)

                if not main:
                    continue
                if global_step % config.checkpointing_steps == 0 or global_step == config.max_train_steps:
                    last_checkpoint = save(global_step)
                if global_step % config.validation_steps == 0 and config.validation_data.prompts:
                    # The step's posterior sample, as the official validation inverts; with frames_per_step the
                    # whole clip's posterior mean (the step's sample covers a window only).
                    latents = scaled_latents(vae, mean, std, np.zeros(mean.shape, np.float32)
                                             if frames_per_step is not None else posterior_noise[-1, :1])
                    written = run_validation(config, global_step, unet, vae, tokenizer, text_encoder, latents,
                                             plan.compute_dtype, pixels, folder)
                    samples.extend(written)
                    logger.info(f"step {global_step}: wrote {len(written)} sample videos under "
                                f"{os.path.join(config.output_dir, 'samples')}")

        # 4. The final state and exports.
        if not main:
            logger.info(f"done: {global_step} steps (rank {parallel.rank}; rank 0 wrote the outputs)")
            return TrainResult(config.output_dir, global_step, losses, None, None, [], None, unet)
        if last_checkpoint is None or state.checkpoint_step(os.path.basename(last_checkpoint)) != global_step:
            last_checkpoint = save(global_step)  # a run resumed at its end still leaves its final state
        delta_path = os.path.join(config.output_dir, DELTA_NAME)
        shutil.copyfile(os.path.join(last_checkpoint, DELTA_NAME), delta_path + ".tmp")
        os.replace(delta_path + ".tmp", delta_path)
        if config.save_full_pipeline:
            save_full_pipeline(config, cast_to_fp32_in_place(unet, optimizer), folder)
            logger.info(f"wrote the tuned pipeline (diffusers layout) to {config.output_dir}")
        logger.info(f"done: {global_step} steps. Outputs in {config.output_dir}: delta {delta_path} "
                    f"(tools/sample.py --unet), checkpoints {state.CHECKPOINT_PREFIX}N/, samples/, log {run_log.path}")
    return TrainResult(config.output_dir, global_step, losses, delta_path, last_checkpoint, samples, run_log.path, unet)


def non_finite_message(config, plan, loss, finite, step, last_checkpoint):
    """What a run that stops on a non-finite loss says: where, what was kept, and what to change (mixed precision
    only when the run used it)."""
    kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint had been written yet"
    advice = f"Try a lower learning_rate (now {config.learning_rate})"
    if plan.compute_dtype != ms.float32:
        advice += " or mixed_precision: no"
    return (f"loss is {loss} (gradients {'finite' if finite else 'not finite'}) at step {step}; stopping without "
            f"updating the weights. {kept}. {advice}")
