"""Resumable training state: checkpoint-N/ folders in output_dir, the per-step random draws, and which run a folder
holds.

    checkpoint-N/unet_delta.safetensors   the tuned tensors (tav.delta format; its header records the config)
    checkpoint-N/optimizer.safetensors    AdamW's moments (exp_avg.<name>, exp_avg_sq.<name>)
    checkpoint-N/training_state.json      global step, the numpy Generator's state, loss scale, the losses so far

A checkpoint is written into a hidden `.checkpoint-N.XXXX.tmp/` folder and renamed into place
(tav.checkpoint.replace_directory_atomically); a write killed half-way leaves only such a hidden folder, which
`remove_interrupted_writes` deletes on the next start. Resuming restores weights, moments, the RNG state and the
loss scale, so a resumed run draws the same numbers and reproduces the uninterrupted run's losses exactly.
"""
import json
import os
import re
import shutil

import numpy as np

from tav import checkpoint
from tav.config import RUN_CONFIG_NAME
from tav.delta import DELTA_NAME, apply_delta_tensors, read_delta, save_delta
from tav.windows import random_window_frames

OPTIMIZER_NAME = "optimizer.safetensors"
STATE_NAME = "training_state.json"
CHECKPOINT_PREFIX = "checkpoint-"
# What a run leaves in output_dir besides its checkpoints; a new run refuses to mix with them.
RUN_OUTPUTS = (DELTA_NAME, RUN_CONFIG_NAME, "train.log", "loss.png", "samples", "inv_latents")
# Config keys a resumed run may change: cadence, outputs, where and how it runs. Every other key decides what the
# weights become (model, trainable set, data, shapes, optimiser, precision, seed) and must match the checkpoint's.
RESUMABLE_CHANGES = ("max_train_steps", "checkpointing_steps", "validation_steps", "checkpoints_total_limit",
                     "resume_from_checkpoint", "overwrite_output_dir", "save_full_pipeline", "output_dir",
                     "validation_data", "device_target", "mode", "jit_level", "attention_backend",
                     "enable_xformers_memory_efficient_attention", "gradient_checkpointing", "use_8bit_adam",
                     "converted_cache_dir")


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

    def draw_frames(self, video_length, frames_per_step):
        """The clip frames one update tunes on (train_data.frames_per_step): tav.windows.random_window_frames,
        drawn before the update's noise."""
        return random_window_frames(self.rng, frames_per_step, video_length)

    def state(self):
        return self.rng.bit_generator.state

    def set_state(self, state):
        self.rng.bit_generator.state = state


# ---------------------------------------------------------------------------------------------------------------
# Writing, listing, pruning


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
    """Write checkpoint-<step>/ atomically (replacing one of the same step); returns its path."""

    def fill(tmp):
        save_delta(os.path.join(tmp, DELTA_NAME), delta, identity, config, step, config.pretrained_model_path,
                   config.trainable_modules)
        checkpoint.save_state_dict(optimizer.state_arrays(), os.path.join(tmp, OPTIMIZER_NAME),
                                   metadata={"tav_adamw_step": str(int(optimizer.step.asnumpy()))})
        state = {"global_step": step, "rng_state": noise.state(), "loss_scale": loss_scale.state_dict(),
                 "losses": losses, "adamw_step": int(optimizer.step.asnumpy())}
        checkpoint.write_json_atomic(state, os.path.join(tmp, STATE_NAME))

    return checkpoint.replace_directory_atomically(os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}"), fill)


def prune_checkpoints(output_dir, keep):
    """Delete all but the newest `keep` checkpoint-N folders (keep=None keeps all); returns the removed paths."""
    if keep is None:
        return []
    removed = []
    for _, path in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def interrupted_writes(output_dir):
    """The hidden folders a killed checkpoint (or export) write leaves: .<name>.XXXX.tmp/ and .<name>.XXXX.old/."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(os.path.join(output_dir, name) for name in os.listdir(output_dir)
                  if name.startswith(".") and name.endswith((".tmp", ".old"))
                  and os.path.isdir(os.path.join(output_dir, name)))


def remove_interrupted_writes(output_dir):
    """Delete what interrupted_writes finds; returns the removed paths (the caller says so in the log)."""
    removed = interrupted_writes(output_dir)
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


# ---------------------------------------------------------------------------------------------------------------
# Which run a folder holds


def previous_run_outputs(output_dir):
    """The names of another run's outputs in output_dir (checkpoint-N folders first), [] if there are none."""
    if not os.path.isdir(output_dir):
        return []
    names = [os.path.basename(path) for _, path in list_checkpoints(output_dir)]
    return names + [name for name in RUN_OUTPUTS if os.path.exists(os.path.join(output_dir, name))]


def clear_previous_run(output_dir):
    """Delete another run's checkpoints, delta, samples and log from output_dir (overwrite_output_dir); returns
    the removed names. Anything else in the folder is left alone."""
    removed = previous_run_outputs(output_dir)
    for name in removed:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    return removed


def recorded_config(checkpoint_path):
    """The training config (a dict, as TrainConfig.to_dict) a checkpoint was written under, or None if unknown."""
    import safetensors

    try:
        with safetensors.safe_open(os.path.join(checkpoint_path, DELTA_NAME), framework="np") as handle:
            metadata = handle.metadata() or {}
    except Exception as exc:
        raise checkpoint.CheckpointError(f"cannot read the checkpoint {checkpoint_path!r}: {exc}") from exc
    return json.loads(metadata.get("tav_config", "null"))


def config_differences(recorded, current):
    """(refused, allowed): the dotted keys whose values differ between two config dicts, split by whether a
    resumed run may change them (RESUMABLE_CHANGES)."""
    refused, allowed = [], []

    def walk(a, b, prefix):
        for key in sorted(set(a) | set(b)):
            name = prefix + key
            left, right = a.get(key), b.get(key)
            if isinstance(left, dict) and isinstance(right, dict):
                walk(left, right, name + ".")
            elif left != right:
                top = name.split(".")[0]
                (allowed if top in RESUMABLE_CHANGES else refused).append(name)

    walk(recorded, current, "")
    return refused, allowed


def load_checkpoint(path, unet, optimizer, noise, loss_scale):
    """Restore weights, optimiser moments, RNG state and loss scale; returns (global_step, losses)."""
    state = checkpoint.read_json(os.path.join(path, STATE_NAME), what="training state")
    delta_path = os.path.join(path, DELTA_NAME)
    tensors, metadata = read_delta(delta_path)
    apply_delta_tensors(unet, tensors, metadata, delta_path, check_base=True)
    optimizer.load_master({name: tensors[name] for name in optimizer.names})
    optimizer.load_state_arrays(checkpoint.read_state_dict(os.path.join(path, OPTIMIZER_NAME)),
                                state["adamw_step"], source=path)
    noise.set_state(state["rng_state"])
    loss_scale.load_state_dict(state["loss_scale"])
    return int(state["global_step"]), list(state.get("losses", []))
