"""One object for a Stable Diffusion model turned into a Tune-A-Video model, and the flow that uses it:

    clip -> latents -> (ddim_invert) -> noise -> (denoise with guidance, UNet3D) -> latents -> frames

`TuneAVideoPipeline.from_pretrained(sd_folder, unet=...)` loads vae/, text_encoder/, tokenizer/, scheduler/
and the UNet: inflated from the SD 2-D UNet, a tuned Tune-A-Video UNet folder, or base + a trainable-only delta.
A single LDM-layout file is converted to such a folder first (tav.ldm_checkpoint); `fuse_loras` fuses LoRA files.
"""
import hashlib
import json
import os

import numpy as np

import mindspore as ms

from tav import checkpoint
from tav.checks import SIZE_RULE, is_pixel_size
from tav.delta import apply_delta
from tav.inversion import ddim_invert
from tav.ldm_checkpoint import check_pretrained_source, resolve_pretrained
from tav.lora import apply_loras
from tav.models import AutoencoderKL, UNet3DConditionModel
from tav.models.attention import FRAME_POLICIES, set_frame_policy
from tav.models.resnet import set_group_norm_scope
from tav.models.vae import latents_to_video, video_to_latents
from tav.sampling import denoise, prepare_latents
from tav.schedulers import DDIMScheduler
from tav.text import encode_prompts, load_text_encoder, load_tokenizer
from tav.video import load_video
from tav.windows import as_window

DTYPES = {"fp32": ms.float32, "float32": ms.float32, "fp16": ms.float16, "float16": ms.float16}
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class PipelineError(ValueError):
    """A request the pipeline cannot serve (shapes, sizes, missing prompts); raised before heavy work."""


def resolve_dtype(dtype):
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    if dtype not in (ms.float32, ms.float16):
        raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
    return dtype


SD_PIXEL_SIZE = 512  # SD 1.x's training size: the default for a single checkpoint file, whose configs come later


def default_pixel_size(pretrained_model_path):
    """The frame size (pixels, square) a base model was trained at: its UNet's sample_size times its VAE's
    downscale factor (AutoencoderKL.downscale_factor), read from the folder's configs without loading weights;
    SD_PIXEL_SIZE for anything else (a single file, a path that the request's checks will refuse)."""
    try:
        unet = checkpoint.read_json(os.path.join(pretrained_model_path, "unet", "config.json"))
        vae = checkpoint.read_json(os.path.join(pretrained_model_path, "vae", "config.json"))
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (checkpoint.CheckpointError, OSError, KeyError, TypeError, ValueError):
        return SD_PIXEL_SIZE


def check_pipeline_folder(path):
    """Every component folder must exist; the error names the folder and what is missing."""
    if not os.path.isdir(path):
        raise checkpoint.CheckpointNotFoundError(f"pretrained model folder {path!r} does not exist")
    missing = [c for c in COMPONENTS if not os.path.isdir(os.path.join(path, c))]
    if missing:
        raise checkpoint.CheckpointNotFoundError(
            f"{path!r} is not a Stable Diffusion folder in diffusers layout: missing {', '.join(m + '/' for m in missing)}"
        )
    scheduler_config = os.path.join(path, "scheduler", "scheduler_config.json")
    if not os.path.isfile(scheduler_config):
        raise checkpoint.CheckpointNotFoundError(f"scheduler folder lacks {scheduler_config}")


def is_tuned_unet_folder(folder):
    config = checkpoint.read_json(os.path.join(folder, "config.json"), what="UNet config")
    return config.get("_class_name") == "UNet3DConditionModel"


def load_unet(pretrained_model_path, unet=None, dtype=ms.float32, attention_backend="auto", check_base=True,
              init_seed=None):
    """The 3-D UNet: inflated from `<sd>/unet` (unet=None), a tuned UNet folder (its own or a pipeline folder
    with unet/), or base + delta (`unet` a .safetensors file written by training; check_base=False applies it
    even when the base weights' fingerprint differs from the one it was trained on). `init_seed` seeds the fresh
    temporal layers of an inflated UNet (UNet3DConditionModel.from_pretrained_2d)."""
    if unet is None:
        base_folder = os.path.join(pretrained_model_path, "unet")
        if is_tuned_unet_folder(base_folder):  # an exported Tune-A-Video pipeline
            return UNet3DConditionModel.from_pretrained(base_folder, dtype=dtype, attention_backend=attention_backend)
        return UNet3DConditionModel.from_pretrained_2d(base_folder, dtype=dtype, attention_backend=attention_backend,
                                                       init_seed=init_seed)
    if os.path.isfile(unet):
        model = UNet3DConditionModel.from_pretrained_2d(pretrained_model_path, attention_backend=attention_backend,
                                                        init_seed=init_seed)
        metadata = apply_delta(model, unet, check_base=check_base)
        trained = json.loads(metadata.get("tav_config") or "null") or {}
        set_frame_policy(model, FRAME_POLICIES[trained.get("frame_policy", "sparse_causal")])  # as it was tuned
        set_group_norm_scope(model, trained.get("group_norm_scope", "video"))
        return model.to_dtype(dtype) if dtype != ms.float32 else model
    return UNet3DConditionModel.from_pretrained(unet, dtype=dtype, attention_backend=attention_backend)


def load_frozen_parts(pretrained_model_path, dtype=ms.float32):
    """(vae, text_encoder, tokenizer, scheduler) of a Stable Diffusion folder: the parts tuning leaves alone
    (training loads them here too, in its compute dtype)."""
    vae = AutoencoderKL.from_pretrained(pretrained_model_path, dtype=dtype)
    tokenizer = load_tokenizer(pretrained_model_path)
    text_encoder = load_text_encoder(pretrained_model_path, dtype=dtype)
    scheduler = DDIMScheduler.from_config(pretrained_model_path)
    return vae, text_encoder, tokenizer, scheduler


def file_identity(path):
    """name, size and mtime of every file under `path`: cheap, and changes when the weights change."""
    entries = []
    if os.path.isfile(path):
        stat = os.stat(path)
        return [[os.path.abspath(path), stat.st_size, int(stat.st_mtime)]]
    for root, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            full = os.path.join(root, name)
            stat = os.stat(full)
            entries.append([os.path.relpath(full, path), stat.st_size, int(stat.st_mtime)])
    return entries


class TuneAVideoPipeline:
    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, dtype=ms.float32, vae_chunk_size=8,
                 identity=None):
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.unet = unet
        self.scheduler = scheduler
        self.dtype = dtype
        self.vae_chunk_size = vae_chunk_size
        self.identity = identity or {}

    @classmethod
    def from_pretrained(cls, pretrained_model_path, unet=None, dtype="fp32", attention_backend="auto",
                        vae_chunk_size=8, check_base=True, init_seed=None, prediction_type=None, tokenizer_from=None,
                        config_from=None, converted_cache_dir=None):
        """`pretrained_model_path`: a diffusers SD folder, or one checkpoint file in the original LDM layout
        (.safetensors, PyTorch .ckpt, mindone's MindSpore .ckpt), converted by tav.ldm_checkpoint.resolve_pretrained
        with `prediction_type`, `tokenizer_from` and `config_from` (docs/checkpoints.md) into `converted_cache_dir`
        (reused while the file is unchanged) or a temporary folder."""
        dtype = resolve_dtype(dtype)
        source = os.fspath(pretrained_model_path)
        single_file_options = (prediction_type, tokenizer_from, config_from)
        path = source
        if os.path.isfile(source) or any(option is not None for option in single_file_options):
            check_pretrained_source(source, *single_file_options)  # before any weight is read
            path = resolve_pretrained(source, *single_file_options, cache_dir=converted_cache_dir)
        check_pipeline_folder(path)
        if unet is not None and not os.path.exists(unet):
            raise checkpoint.CheckpointNotFoundError(f"--unet {unet!r} does not exist")
        vae, text_encoder, tokenizer, scheduler = load_frozen_parts(path, dtype)
        unet_model = load_unet(path, unet, dtype, attention_backend, check_base, init_seed)
        base_files = file_identity(source if path != source else os.path.join(path, "unet"))
        identity = {"pretrained_model_path": os.path.abspath(source), "unet": os.path.abspath(unet) if unet else None,
                    "files": base_files + (file_identity(unet) if unet else []),
                    "dtype": str(dtype), "init_seed": init_seed}
        if path != source:  # the converted folder may be temporary: key the cache on what the conversion settled
            identity["converted"] = {name: checkpoint.read_json(os.path.join(path, name, config))
                                     for name, config in (("unet", "config.json"),
                                                          ("scheduler", "scheduler_config.json"))}
        return cls(vae, text_encoder, tokenizer, unet_model, scheduler, dtype, vae_chunk_size, identity)

    def fuse_loras(self, specs):
        """Fuse LoRA files (`PATH[:SCALE]` strings or (path, scale) pairs, in order) into the UNet and the text
        encoder (tav.lora.apply_loras: exact, so sampling keeps the base model's speed); returns the reports.
        The files become part of the identity, so inverted latents of the un-fused model are not reused."""
        reports = apply_loras(self.unet, self.text_encoder, specs)
        fused = [[os.path.abspath(r.path), r.scale, *file_identity(r.path)[0][1:]] for r in reports]
        self.identity = {**self.identity, "loras": self.identity.get("loras", []) + fused}
        return reports

    # --- the three stages ----------------------------------------------------------------------------------------
    def encode_text(self, prompts):
        if isinstance(prompts, str):
            prompts = [prompts]
        return encode_prompts(self.tokenizer, self.text_encoder, list(prompts)).astype(self.dtype)

    def encode_video(self, pixel_values, seed=0, sample=True):
        """(F, 3, H, W) or (B, 3, F, H, W) pixels in [-1, 1] -> scaled latents (B, 4, F, H/8, W/8).

        As the official training, the latent is a posterior *sample* (seeded here) unless sample=False (mean)."""
        pixels = np.asarray(pixel_values, dtype=np.float32)
        if pixels.ndim == 4:
            pixels = pixels.transpose(1, 0, 2, 3)[None]
        pixels = ms.Tensor(pixels).astype(self.dtype)
        return video_to_latents(self.vae, pixels, sample=sample, noise_seed=seed if sample else None,
                                chunk_size=self.vae_chunk_size)

    def invert(self, latents, num_inv_steps=50, prompt="", progress=False, window=None, callback=None):
        """DDIM inversion conditioned on `prompt` ("" = the official empty prompt); returns the whole walk.
        `window` (tav.windows.WindowSpec or (size, overlap)): the UNet runs on overlapping windows of frames.
        `callback(i, t, latents)` runs after every step."""
        context = self.encode_text([prompt] * latents.shape[0])
        return ddim_invert(self.unet, self.scheduler, latents, context, num_inv_steps, progress=progress,
                           window=window, callback=callback)

    def decode(self, latents):
        return latents_to_video(self.vae, latents, chunk_size=self.vae_chunk_size).asnumpy()

    def __call__(self, prompts, video_length, height=None, width=None, num_inference_steps=50, guidance_scale=7.5,
                 negative_prompt=None, num_videos_per_prompt=1, eta=0.0, latents=None, seed=None, progress=False,
                 output_type="np", window=None, callback=None):
        """Sample videos, one per prompt and per `num_videos_per_prompt`, returned as float32 (N, 3, F, H, W)
        in [0, 1] (or latents with output_type="latent").

        `latents` (1 or N, 4, F, h, w), e.g. inverted source latents, is the start for every video; otherwise each
        video starts from N(0, 1) noise drawn from `seed` (video k uses seed + k). `window` (tav.windows.WindowSpec
        or (size, overlap)): every step runs the UNet on overlapping windows of frames (docs/long-videos.md).
        `callback(index, i, t, latents)` runs after every DDIM step of video `index`.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        height, width = self.check_request(prompts, video_length, height, width, latents, num_videos_per_prompt)
        negatives = self.negative_prompts(negative_prompt, len(prompts))
        factor = self.vae.downscale_factor
        shape = (1, self.unet.config.in_channels, video_length, height // factor, width // factor)
        outputs = []
        for p, (prompt, negative) in enumerate(zip(prompts, negatives)):
            cond = self.encode_text([prompt])
            uncond = self.encode_text([negative]) if guidance_scale > 1 else None
            for k in range(num_videos_per_prompt):
                index = p * num_videos_per_prompt + k
                if latents is not None:
                    start = latents[index:index + 1] if latents.shape[0] > 1 else latents
                    start = start.astype(self.dtype)
                else:
                    start = prepare_latents(shape, None if seed is None else seed + index, self.dtype,
                                            self.scheduler.init_noise_sigma)
                final = denoise(self.unet, self.scheduler, start, cond, uncond, num_inference_steps, guidance_scale,
                                eta=eta, noise_seed=None if seed is None else seed + index, progress=progress,
                                window=window, callback=None if callback is None else
                                (lambda i, t, x, index=index: callback(index, i, t, x)))
                outputs.append(final if output_type == "latent" else self.decode(final))
        if output_type == "latent":
            return ms.ops.cat(outputs, 0)
        return np.concatenate(outputs, 0)

    # --- checks ------------------------------------------------------------------------------------------------
    def check_request(self, prompts, video_length, height, width, latents, num_videos_per_prompt):
        if not prompts or any(not isinstance(p, str) for p in prompts):
            raise PipelineError("at least one prompt (a string) is required")
        factor = self.vae.downscale_factor
        default = (self.unet.config.sample_size or 64) * factor
        height = default if height is None else int(height)
        width = default if width is None else int(width)
        if not (is_pixel_size(height) and is_pixel_size(width)):
            raise PipelineError(f"height and width must each be {SIZE_RULE}, got {height}x{width}")
        if video_length < 1:
            raise PipelineError(f"video_length must be at least 1, got {video_length}")
        if num_videos_per_prompt < 1:
            raise PipelineError(f"num_videos_per_prompt must be at least 1, got {num_videos_per_prompt}")
        if latents is not None:
            expected = (self.unet.config.in_channels, video_length, height // factor, width // factor)
            n = len(prompts) * num_videos_per_prompt
            if tuple(latents.shape[1:]) != expected or latents.shape[0] not in (1, n):
                raise PipelineError(
                    f"start latents have shape {tuple(latents.shape)}, but the request needs (1 or {n}, "
                    f"{', '.join(map(str, expected))}) for video_length={video_length}, {height}x{width}")
        return height, width

    @staticmethod
    def negative_prompts(negative_prompt, n):
        if negative_prompt is None:
            return [""] * n
        if isinstance(negative_prompt, str):
            return [negative_prompt] * n
        if len(negative_prompt) != n:
            raise PipelineError(f"{len(negative_prompt)} negative prompts for {n} prompts")
        return list(negative_prompt)


# ---------------------------------------------------------------------------------------------------------------
# Inverted latents, cached with what produced them


def inversion_request(pipeline, video_path, n_frames, start, stride, height, width, num_inv_steps, prompt, seed):
    """What determines an inversion: the clip, its sampling, the model and the steps."""
    stat = os.stat(video_path)
    return {"video": os.path.abspath(video_path), "video_size": stat.st_size, "video_mtime": int(stat.st_mtime),
            "n_sample_frames": n_frames, "sample_start_idx": start, "sample_frame_rate": stride,
            "height": height, "width": width, "num_inv_steps": num_inv_steps, "prompt": prompt, "seed": seed,
            "model": pipeline.identity}


def invert_video(pipeline, video_path, n_frames, height, width, num_inv_steps=50, start=0, stride=1, prompt="",
                 seed=0, cache_dir=None, progress=False, window=None, callback=None):
    """Inverted latents (1, 4, F, h, w) of a clip, reused from `cache_dir` when the same request was served.
    `window` (tav.windows.WindowSpec) inverts in overlapping windows of frames; it is part of the cache key.
    `callback(i, t, latents)` runs after every inversion step (not at all when the cache serves it)."""
    request = inversion_request(pipeline, video_path, n_frames, start, stride, height, width, num_inv_steps,
                                prompt, seed)
    window = as_window(window)
    if window is not None:  # absent otherwise, so the latents cached before windows existed are still found
        request["window"] = [window.size, window.overlap]
    key = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:16]
    if cache_dir is not None:
        cached = os.path.join(cache_dir, f"inv-{key}.safetensors")
        if os.path.isfile(cached):
            return ms.Tensor(checkpoint.read_state_dict(cached)["latents"]).astype(pipeline.dtype), cached
    pixels = load_video(video_path, n_frames, start, stride, height, width)
    latents = pipeline.encode_video(pixels, seed=seed)
    inverted = pipeline.invert(latents, num_inv_steps, prompt=prompt, progress=progress, window=window,
                               callback=callback)[-1]
    saved = None
    if cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
        saved = os.path.join(cache_dir, f"inv-{key}.safetensors")
        checkpoint.save_state_dict({"latents": inverted.astype(ms.float32).asnumpy()}, saved,
                                   metadata={"request": json.dumps(request)})
        checkpoint.write_json_atomic(request, os.path.join(cache_dir, f"inv-{key}.json"))
    return inverted, saved


def load_inverted_latents(path):
    """Latents saved by invert_video (safetensors 'latents'), or a .npy array."""
    if not os.path.isfile(path):
        raise checkpoint.CheckpointNotFoundError(f"inverted latents {path!r} do not exist")
    if path.endswith(".npy"):
        return ms.Tensor(np.load(path).astype(np.float32))
    state = checkpoint.read_state_dict(path)
    if "latents" not in state:
        raise checkpoint.CheckpointError(f"{path} holds no 'latents' tensor (found {sorted(state)[:5]})")
    return ms.Tensor(state["latents"].astype(np.float32))
