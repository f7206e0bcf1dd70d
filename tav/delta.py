"""The trainable-only delta: the tensors tuning changed, stored on top of a named base model.

    save_delta(path, tensors, base_identity(unet, keys), config, step, ...)   # training writes it
    apply_delta(unet, path)                                                   # the pipeline loads it

A delta is one safetensors file holding the trained tensors plus every temporal tensor (attn_temp.*, norm_temp.*:
they are not in the Stable Diffusion checkpoint and start from a random init, so storing them all makes the delta
reproduce the tuned model whatever trained). Its header records the format, the base UNet's identity (a hash of
its architecture and a fingerprint of its weights), the trainable modules, the step and the training config.
Loading checks all of that before it assigns anything.

A LoRA delta (tav.lora_tuning) holds only the adapters, `<layer>.lora_down.weight` (rank, in) and
`<layer>.lora_up.weight` (out, rank), a few MB; its header adds `tav_lora` (rank, alpha, modules) and the seed the
temporal layers were initialised from (they stay at that init, so the seed replaces their ~200 MB for SD 1.5).
Loading re-draws the temporal layers from the seed and fuses W + (alpha / rank) up @ down into each layer; a UNet
that has the adapters itself (training, resuming) takes them as they are.

Imports nothing from training: inference (tav.pipeline) reads deltas without the training code.
"""
import hashlib
import json
import os

import numpy as np

import mindspore as ms

from tav import checkpoint
from tav.models.unet3d import init_temporal_layers, is_temporal_key

LORA_DOWN, LORA_UP = ".lora_down.weight", ".lora_up.weight"

DELTA_FORMAT = "tav-unet-delta/1"
DELTA_NAME = "unet_delta.safetensors"


def delta_keys(unet, trainable_names):
    """What a delta stores: the trained tensors plus every temporal tensor, in the UNet's parameter order."""
    keep = set(trainable_names)
    return [name for name, _ in unet.parameters_and_names() if name in keep or is_temporal_key(name)]


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
    """The header entries naming the base a delta of `keys` applies to."""
    return {"tav_base_unet_config_sha256": unet_config_sha256(unet),
            "tav_base_weights_fingerprint": weights_fingerprint(unet, exclude=keys)}


def lora_identity(unet, rank, alpha, modules, temporal_init_seed):
    """The header entries of a LoRA delta: the base (every non-temporal weight, adapters excluded) and how to
    rebuild the rest (the adapters' rank and alpha, the temporal layers' init seed)."""
    excluded = [name for name, _ in unet.parameters_and_names() if is_temporal_key(name) or ".lora_" in name]
    return {"tav_base_unet_config_sha256": unet_config_sha256(unet),
            "tav_base_weights_fingerprint": weights_fingerprint(unet, exclude=excluded),
            "tav_lora": json.dumps({"rank": int(rank), "alpha": float(rank if alpha is None else alpha),
                                    "modules": list(modules)}),
            "tav_temporal_init_seed": json.dumps(int(temporal_init_seed))}


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
    apply_delta_tensors(unet, tensors, metadata, path, check_base)
    return metadata


def apply_delta_tensors(unet, tensors, metadata, path, check_base=True):
    """apply_delta on a delta already read (read_delta); `path` names it in errors."""
    config_sha = unet_config_sha256(unet)
    base_model = json.loads(metadata.get("tav_base_model_path", "null"))
    if metadata.get("tav_base_unet_config_sha256") != config_sha:
        raise checkpoint.CheckpointMismatchError(
            f"delta {path!r} was trained on a different UNet architecture (config sha256 "
            f"{metadata.get('tav_base_unet_config_sha256')}, this UNet {config_sha}); base model used for training: "
            f"{base_model}")
    params = dict(unet.parameters_and_names())
    if "tav_lora" in metadata:
        return _apply_lora_delta(unet, tensors, metadata, path, check_base, params, base_model)
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
                f"it was trained on {base_model}. Load the same Stable Diffusion folder, or, to apply it anyway, "
                f"pass --no_check_base to tools/sample.py (check_base=False in code)")
    checkpoint.load_state_dict_into(unet, tensors, strict=False, source=path, ignore=lambda name: True)


def _apply_lora_delta(unet, tensors, metadata, path, check_base, params, base_model):
    """apply_delta_tensors for a LoRA delta (module docstring): every check first, then the temporal re-draw and the
    adapters (loaded into a UNet that has them, else fused into the layers' weights)."""
    lora = json.loads(metadata["tav_lora"])
    scale = float(lora["alpha"]) / int(lora["rank"])
    layers = sorted(name[: -len(LORA_DOWN)] for name in tensors if name.endswith(LORA_DOWN))
    has_adapters = all(name in params for name in tensors)
    problems = [name for name in tensors if not name.endswith((LORA_DOWN, LORA_UP))]
    for layer in layers:
        down, up, weight = tensors[layer + LORA_DOWN], tensors.get(layer + LORA_UP), params.get(layer + ".weight")
        if up is None or weight is None or tuple(weight.shape) != (up.shape[0], down.shape[1]) \
                or up.shape[1] != down.shape[0]:
            problems.append(layer)
    if problems or len(layers) * 2 != len(tensors):
        raise checkpoint.CheckpointMismatchError(
            f"LoRA delta {path!r} does not fit this UNet: {len(problems)} tensors or layers that are not a matching "
            f"lora_down/lora_up pair of one of its Linears, e.g. {problems[:3]}")
    if check_base:
        excluded = [name for name in params if is_temporal_key(name) or ".lora_" in name]
        if metadata.get("tav_base_weights_fingerprint") != weights_fingerprint(unet, exclude=excluded):
            raise checkpoint.CheckpointMismatchError(
                f"LoRA delta {path!r} was trained on other base weights than this UNet's (fingerprint mismatch); "
                f"it was trained on {base_model}. Load the same Stable Diffusion folder, or, to apply it anyway, "
                f"pass --no_check_base to tools/sample.py (check_base=False in code)")
    init_temporal_layers(unet, json.loads(metadata["tav_temporal_init_seed"]))
    if has_adapters:
        checkpoint.load_state_dict_into(unet, tensors, strict=False, source=path, ignore=lambda name: True)
        return
    for layer in layers:
        weight = params[layer + ".weight"]
        fused = weight.astype(ms.float32).asnumpy() + scale * (tensors[layer + LORA_UP].astype(np.float32)
                                                             @ tensors[layer + LORA_DOWN].astype(np.float32))
        weight.set_data(ms.Tensor(fused.astype(np.float32)).astype(weight.dtype))
