"""Stable Diffusion as one file in the original LDM layout <-> the diffusers folder tav loads.

    folder = resolve_pretrained("v1-5-pruned-emaonly.safetensors", tokenizer_from="clip-tokenizer/")
    pipeline = TuneAVideoPipeline.from_pretrained(folder)

One file holds the whole model under three prefixes: `model.diffusion_model.` (UNet), `first_stage_model.` (VAE) and
`cond_stage_model.` (text encoder: `transformer.` = transformers' CLIPTextModel for SD 1.x, `model.` = OpenCLIP's
text tower for SD 2.x). Three containers are read: `.safetensors`, a PyTorch zip `.ckpt` (tav.checkpoint's
torch-free unpickler, weights nested under `state_dict` as Lightning saves them), and a MindSpore `.ckpt` as
mindone writes it (its names wrap convolutions in `.conv.`, call norm parameters gamma/beta and keep the text
encoder in OpenCLIP's fused layout; `MINDONE_RENAMES` undoes this).

Why one ~900-line module: the prefix table is read in both directions (LDM -> diffusers on load, diffusers -> LDM
for tools/convert.py) and the configuration inference reads the same key names; split apart, each piece would
have to re-spell the table's conventions. The three containers are the only independent part (~100 lines).

The key mapping is a table of (LDM prefix, diffusers prefix, inner renames) built from the configuration
(`unet_prefix_table`, `vae_prefix_table`): the same table read backwards writes the LDM layout (`to_ldm`).
What the shapes cannot tell (head counts, GroupNorm groups, prediction type) comes from an LDM `.yaml` beside the
file, a diffusers folder (`config_from`), an argument, or SD's published values; docs/checkpoints.md lists which.
"""
import atexit
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
import zipfile
from collections import OrderedDict

import numpy as np

from tav import checkpoint
from tav.checkpoint import CheckpointError, CheckpointNotFoundError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x: transformers' CLIPTextModel (and mindone's CLIP)
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: OpenCLIP's text tower
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SOURCE_RECORD = "tav_single_file.json"  # beside a converted folder's model_index.json: which file it came from
TORCH_CKPT_WRAPPERS = ("state_dict", "model", "module")  # where trainers nest the weights


class SingleFileError(CheckpointError):
    """A single file that is not a Stable Diffusion checkpoint tav can convert (names what it found)."""


# ---------------------------------------------------------------------------------------------------------------
# SD's published configuration, tav's own copy (the diffusers folders' config files; nothing is downloaded)

SD_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "skip_prk_steps": True,
}

SD_VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "norm_num_groups": 32,
    "scaling_factor": 0.18215,
}

SD_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "center_input_sample": False,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
}

# Per family: what the weights cannot say. SD 1.x uses 8 heads at every level (diffusers calls the head count
# attention_head_dim); SD 2.x uses 64-wide heads (num_head_channels: 64 in its yaml).
FAMILIES = {
    "sd1": {"heads": 8, "head_channels": None, "text_act": "quick_gelu", "text_projection_dim": 768},
    "sd2": {"heads": None, "head_channels": 64, "text_act": "gelu", "text_projection_dim": 1024},
}

# transformers' CLIPTextModel config fields SD's text_encoder/config.json carries (ids as SD's files have them).
CLIP_TEXT_BASE = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-05,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
    "torch_dtype": "float32",
}

# tokenizer/ configs of SD 1.x (openai/clip-vit-large-patch14) and SD 2.x (pads with "!"); the BPE files
# (vocab.json 1.6 MB, merges.txt 0.5 MB) are not shipped and must come from a folder.
TOKENIZER_CONFIGS = {
    "sd1": {"pad_token": "<|endoftext|>"},
    "sd2": {"pad_token": "!"},
}


# ---------------------------------------------------------------------------------------------------------------
# Reading the file


class _Inert:
    """Stands in for the non-tensor objects Lightning pickles beside the weights (callback state); it accepts
    any constructor arguments and state and does nothing, so no code of the named class runs."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


# Objects found beside the weights in SD's original .ckpt files (sd-v1-x: a ModelCheckpoint callback's state with
# numpy scalars). They are replaced by _Inert and then dropped with everything outside the state dict.
_INERT_GLOBALS = {
    ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _LdmUnpickler(checkpoint._RestrictedUnpickler):
    def find_class(self, module, name):
        if (module, name) in _INERT_GLOBALS:
            return _Inert
        return super().find_class(module, name)


def _read_torch_zip_nested(path):
    """tav.checkpoint's torch-free reader, with the state dict unwrapped from `state_dict` (Lightning)."""
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise SingleFileError(f"{path!r} is a zip but not a PyTorch checkpoint (expected one '<archive>/data.pkl', "
                                  f"found {pickles or 'none'})")
        reader = checkpoint._TorchZipReader(path, archive, pickles[0][: -len("data.pkl")])
        try:
            with archive.open(pickles[0]) as pkl:
                obj = _LdmUnpickler(pkl, reader).load()
        except CheckpointError:
            raise
        except Exception as exc:  # a damaged pickle fails in many ways
            raise CheckpointError(f"cannot read PyTorch checkpoint {path!r}: {type(exc).__name__}: {exc}") from exc
    for wrapper in TORCH_CKPT_WRAPPERS:
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict) and not _has_ldm_keys(obj):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise SingleFileError(f"{path!r} holds a {type(obj).__name__}, expected a dict of name -> tensor")
    return {str(k): v for k, v in obj.items() if isinstance(v, np.ndarray)}


def _read_mindspore(path):
    import mindspore as ms

    try:
        params = ms.load_checkpoint(path)
    except Exception as exc:  # MindSpore raises ValueError/RuntimeError for anything that is not its protobuf
        raise SingleFileError(
            f"{path!r} is neither a PyTorch zip checkpoint nor a MindSpore checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    return {name: checkpoint._param_to_numpy(param) for name, param in params.items()}


def read_single_file(path):
    """(state dict of numpy arrays, container) for a `.safetensors`, PyTorch zip `.ckpt`/`.pt`/`.pth`/`.bin`, or
    MindSpore `.ckpt`; container is "safetensors", "torch" or "mindspore". The names are as stored."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"checkpoint file {path!r} does not exist")
    if path.endswith(".safetensors"):
        return checkpoint.read_state_dict(path), "safetensors"
    if not path.endswith(SINGLE_FILE_SUFFIXES):
        raise SingleFileError(f"cannot tell the format of {path!r}: expected a name ending in "
                              f"{', '.join(SINGLE_FILE_SUFFIXES)}")
    if zipfile.is_zipfile(path):
        return _read_torch_zip_nested(path), "torch"
    with open(path, "rb") as handle:
        head = handle.read(2)
    if head[:1] == b"\x80":
        raise SingleFileError(f"{path!r} is a legacy (pre-1.6, non-zip) PyTorch pickle, which tav does not read; "
                              f"re-save it with torch>=1.6 or convert it to safetensors")
    return _read_mindspore(path), "mindspore"


def _has_ldm_keys(state_dict):
    return any(str(k).startswith((UNET_PREFIX, VAE_PREFIX, "cond_stage_model.")) for k in state_dict)


def _prefix_summary(names, depth=2, limit=8):
    counts = OrderedDict()
    for name in names:
        head = ".".join(str(name).split(".")[:depth])
        counts[head] = counts.get(head, 0) + 1
    shown = [f"{head}.* ({n})" for head, n in list(counts.items())[:limit]]
    return ", ".join(shown) + (f", ... ({len(counts) - limit} more prefixes)" if len(counts) > limit else "")


# ---------------------------------------------------------------------------------------------------------------
# mindone's names -> PyTorch LDM names (applied wherever mindone's markers appear, whatever the container)

# (pattern, replacement) in order; mindone's SD keeps PyTorch's module tree but wraps each conv in a `.conv` Cell
# and names nn.GroupNorm/LayerNorm parameters gamma/beta.
MINDONE_RENAMES = (
    (r"\.in_layers_norm\.", ".in_layers.0."),
    (r"\.in_layers_conv\.conv\.", ".in_layers.2."),
    (r"\.out_layers_norm\.", ".out_layers.0."),
    (r"\.out_layers_conv\.conv\.", ".out_layers.3."),
    (r"\.skip_connection\.conv\.", ".skip_connection."),
    (r"^(model\.diffusion_model\.input_blocks\.0\.0)\.conv\.", r"\1."),
    (r"\.op\.conv\.", ".op."),
    (r"^(model\.diffusion_model\.out\.2)\.conv\.", r"\1."),
    (r"^(model\.diffusion_model\.output_blocks\.\d+\.\d+\.conv)\.conv\.", r"\1."),
    (r"\.gamma$", ".weight"),
    (r"\.beta$", ".bias"),
)
MINDONE_MARKERS = ("in_layers_conv.conv.", "transformer_layer.resblocks.", ".gamma")

# mindone's CLIP text encoder (SD 1.x and 2.x alike): OpenCLIP's layout under cond_stage_model.transformer.
MINDONE_TEXT = (
    (r"^embedding_table$", "text_model.embeddings.token_embedding.weight"),
    (r"^positional_embedding$", "text_model.embeddings.position_embedding.weight"),
    (r"^ln_final\.", "text_model.final_layer_norm."),
    (r"^transformer_layer\.resblocks\.(\d+)\.ln_1\.", r"text_model.encoder.layers.\1.layer_norm1."),
    (r"^transformer_layer\.resblocks\.(\d+)\.ln_2\.", r"text_model.encoder.layers.\1.layer_norm2."),
    (r"^transformer_layer\.resblocks\.(\d+)\.c_fc\.", r"text_model.encoder.layers.\1.mlp.fc1."),
    (r"^transformer_layer\.resblocks\.(\d+)\.c_proj\.", r"text_model.encoder.layers.\1.mlp.fc2."),
    (r"^transformer_layer\.resblocks\.(\d+)\.attn\.attn\.out_proj\.", r"text_model.encoder.layers.\1.self_attn.out_proj."),
    (r"^transformer_layer\.resblocks\.(\d+)\.attn\.attn\.in_proj\.", r"text_model.encoder.layers.\1.self_attn.in_proj."),
)


def is_mindone_layout(state_dict):
    return any(marker in k for k in state_dict for marker in MINDONE_MARKERS)


def _rename(name, rules):
    for pattern, replacement in rules:
        name = re.sub(pattern, replacement, name)
    return name


# ---------------------------------------------------------------------------------------------------------------
# The mapping tables

RESNET_LDM = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
              "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
VAE_RESNET_LDM = {"nin_shortcut": "conv_shortcut"}  # norm1, conv1, norm2, conv2 keep their names
VAE_ATTENTION_LDM = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
NO_RENAMES = {}


def unet_prefix_table(config):
    """[(LDM prefix, diffusers prefix, inner renames)] for a UNet2DConditionModel config: LDM numbers its blocks
    input_blocks.i / output_blocks.i, (layers_per_block + 1) per level, a resnet at .0 and attention at .1."""
    per = config["layers_per_block"]
    levels = len(config["block_out_channels"])
    table = [("time_embed.0", "time_embedding.linear_1", NO_RENAMES), ("time_embed.2", "time_embedding.linear_2", NO_RENAMES),
             ("input_blocks.0.0", "conv_in", NO_RENAMES), ("out.0", "conv_norm_out", NO_RENAMES),
             ("out.2", "conv_out", NO_RENAMES)]
    for b, block_type in enumerate(config["down_block_types"]):
        for layer in range(per):
            i = 1 + b * (per + 1) + layer
            table.append((f"input_blocks.{i}.0", f"down_blocks.{b}.resnets.{layer}", RESNET_LDM))
            if "CrossAttn" in block_type:
                table.append((f"input_blocks.{i}.1", f"down_blocks.{b}.attentions.{layer}", NO_RENAMES))
        if b < levels - 1:
            table.append((f"input_blocks.{1 + b * (per + 1) + per}.0.op", f"down_blocks.{b}.downsamplers.0.conv", NO_RENAMES))
    table += [("middle_block.0", "mid_block.resnets.0", RESNET_LDM), ("middle_block.1", "mid_block.attentions.0", NO_RENAMES),
              ("middle_block.2", "mid_block.resnets.1", RESNET_LDM)]
    for b, block_type in enumerate(config["up_block_types"]):
        attention = "CrossAttn" in block_type
        for layer in range(per + 1):
            i = b * (per + 1) + layer
            table.append((f"output_blocks.{i}.0", f"up_blocks.{b}.resnets.{layer}", RESNET_LDM))
            if attention:
                table.append((f"output_blocks.{i}.1", f"up_blocks.{b}.attentions.{layer}", NO_RENAMES))
        if b < levels - 1:
            i = b * (per + 1) + per
            table.append((f"output_blocks.{i}.{2 if attention else 1}.conv", f"up_blocks.{b}.upsamplers.0.conv", NO_RENAMES))
    return table


def vae_prefix_table(config):
    """[(LDM prefix, diffusers prefix, inner renames)] for an AutoencoderKL config. The LDM decoder numbers its
    levels from the narrowest (up.0 is the last to run); diffusers numbers them in running order."""
    levels = len(config["block_out_channels"])
    per = config["layers_per_block"]
    table = [("quant_conv", "quant_conv", NO_RENAMES), ("post_quant_conv", "post_quant_conv", NO_RENAMES)]
    for part in ("encoder", "decoder"):
        table += [(f"{part}.conv_in", f"{part}.conv_in", NO_RENAMES), (f"{part}.conv_out", f"{part}.conv_out", NO_RENAMES),
                  (f"{part}.norm_out", f"{part}.conv_norm_out", NO_RENAMES),
                  (f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", VAE_RESNET_LDM),
                  (f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", VAE_RESNET_LDM),
                  (f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", VAE_ATTENTION_LDM)]
    for b in range(levels):
        for layer in range(per):
            table.append((f"encoder.down.{b}.block.{layer}", f"encoder.down_blocks.{b}.resnets.{layer}", VAE_RESNET_LDM))
        if b < levels - 1:
            table.append((f"encoder.down.{b}.downsample.conv", f"encoder.down_blocks.{b}.downsamplers.0.conv", NO_RENAMES))
        ldm = levels - 1 - b
        for layer in range(per + 1):
            table.append((f"decoder.up.{ldm}.block.{layer}", f"decoder.up_blocks.{b}.resnets.{layer}", VAE_RESNET_LDM))
        if b < levels - 1:
            table.append((f"decoder.up.{ldm}.upsample.conv", f"decoder.up_blocks.{b}.upsamplers.0.conv", NO_RENAMES))
    return table


def _apply_table(state_dict, table, source, what, forward=True):
    """Rename every key by the table's longest matching prefix (forward: LDM -> diffusers). A key no entry covers
    is an error naming it: a silently dropped tensor would be a wrong model."""
    pairs = [(a, b, inner) if forward else (b, a, {v: k for k, v in inner.items()}) for a, b, inner in table]
    pairs.sort(key=lambda p: -len(p[0]))
    out, unmatched = {}, []
    for key, value in state_dict.items():
        for src, dst, inner in pairs:
            if key.startswith(src + "."):
                rest = key[len(src) + 1:]
                for old, new in sorted(inner.items(), key=lambda kv: -len(kv[0])):
                    if rest.startswith(old + "."):
                        rest = new + rest[len(old):]
                        break
                out[f"{dst}.{rest}"] = value
                break
        else:
            unmatched.append(key)
    if unmatched:
        raise SingleFileError(f"{source}: {len(unmatched)} {what} tensors fit no block of the inferred configuration: "
                              f"{checkpoint._name_list(unmatched)}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Configuration from the tensors


def _count(state_dict, pattern):
    return {int(m.group(1)) for k in state_dict for m in [re.match(pattern, k)] if m}


def infer_unet_config(unet, family, heads=None, head_channels=None, source="checkpoint"):
    """diffusers' unet/config.json from LDM UNet tensors (prefix removed). Head counts come from `heads`/
    `head_channels` (an LDM yaml's num_heads / num_head_channels) or the family's published value."""
    inputs = _count(unet, r"input_blocks\.(\d+)\.")
    downsamplers = _count(unet, r"input_blocks\.(\d+)\.0\.op\.weight")
    if not inputs or "input_blocks.0.0.weight" not in unet:
        raise SingleFileError(f"{source}: the UNet has no input_blocks.0.0.weight (found {_prefix_summary(unet)})")
    levels = len(downsamplers) + 1
    per = len(inputs) // levels - 1
    if per < 1 or len(inputs) != levels * (per + 1):
        raise SingleFileError(f"{source}: {len(inputs)} input blocks with {len(downsamplers)} downsamplers fit no "
                              f"(levels x layers_per_block) layout")
    if any(".transformer_blocks.1." in k for k in unet):
        raise SingleFileError(f"{source}: transformer depth > 1 (SDXL-style) is not supported by tav's UNet")
    channels = [int(unet[f"input_blocks.{1 + b * (per + 1)}.0.out_layers.3.weight"].shape[0]) for b in range(levels)]
    attention = [any(k.startswith(f"input_blocks.{1 + b * (per + 1)}.1.") for k in unet) for b in range(levels)]
    up_attention = [any(k.startswith(f"output_blocks.{b * (per + 1)}.1.") and ".conv." not in k for k in unet)
                    for b in range(levels)]
    to_k = [k for k in unet if k.endswith("attn2.to_k.weight")]
    proj_in = [k for k in unet if k.endswith(".proj_in.weight")]
    if not to_k:
        raise SingleFileError(f"{source}: the UNet has no cross-attention (attn2.to_k) tensors")
    if heads is None and head_channels is None:
        heads, head_channels = FAMILIES[family]["heads"], FAMILIES[family]["head_channels"]
    head_count = heads if heads is not None else [c // head_channels for c in channels]
    return {
        **SD_UNET,
        "sample_size": 64,
        "in_channels": int(unet["input_blocks.0.0.weight"].shape[1]),
        "out_channels": int(unet["out.2.weight"].shape[0]),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attention],
        "block_out_channels": channels,
        "layers_per_block": per,
        "attention_head_dim": head_count,
        "cross_attention_dim": int(unet[to_k[0]].shape[1]),
        "use_linear_projection": bool(proj_in) and unet[proj_in[0]].ndim == 2,
        "upcast_attention": False,
    }


def infer_vae_config(vae, source="checkpoint"):
    """diffusers' vae/config.json from LDM VAE tensors (prefix removed)."""
    levels = len(_count(vae, r"encoder\.down\.(\d+)\."))
    per = len(_count(vae, r"encoder\.down\.0\.block\.(\d+)\."))
    if not levels or "decoder.conv_in.weight" not in vae:
        raise SingleFileError(f"{source}: the VAE has no encoder.down.* / decoder.conv_in (found {_prefix_summary(vae)})")
    return {
        **SD_VAE,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "in_channels": int(vae["encoder.conv_in.weight"].shape[1]),
        "out_channels": int(vae["decoder.conv_out.weight"].shape[0]),
        "block_out_channels": [int(vae[f"encoder.down.{b}.block.{per - 1}.conv2.weight"].shape[0]) for b in range(levels)],
        "layers_per_block": per,
        "latent_channels": int(vae["decoder.conv_in.weight"].shape[1]),
        "sample_size": 512,
    }


def infer_text_config(text, family, heads=None):
    """transformers' CLIPTextModel config.json from the converted (diffusers-named) text-encoder tensors."""
    vocab, width = text["text_model.embeddings.token_embedding.weight"].shape
    layers = len(_count(text, r"text_model\.encoder\.layers\.(\d+)\."))
    return {
        **CLIP_TEXT_BASE,
        "hidden_act": FAMILIES[family]["text_act"],
        "hidden_size": int(width),
        "intermediate_size": int(text["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
        "max_position_embeddings": int(text["text_model.embeddings.position_embedding.weight"].shape[0]),
        "num_attention_heads": heads or max(1, int(width) // 64),
        "num_hidden_layers": layers,
        "projection_dim": FAMILIES[family]["text_projection_dim"],
        "vocab_size": int(vocab),
    }


# ---------------------------------------------------------------------------------------------------------------
# Text encoders


def _split_in_proj(text, source):
    """OpenCLIP fuses q, k, v into in_proj (rows q, then k, then v); CLIPTextModel keeps three projections."""
    out = {}
    for key, value in text.items():
        m = re.match(r"(.*\.self_attn)\.in_proj\.(weight|bias)$", key)
        if not m:
            out[key] = value
            continue
        if value.shape[0] % 3:
            raise SingleFileError(f"{source}: fused in_proj {key} has {value.shape[0]} rows, not 3 x width")
        for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(value, 3, axis=0)):
            out[f"{m.group(1)}.{name}.{m.group(2)}"] = np.ascontiguousarray(part)
    return out


# (OpenCLIP text-tower name, CLIPTextModel name); "{n}" stands for a block index, and a name that ends in "."
# renames a prefix. Read left to right on load and right to left for tools/convert.py: one table, both directions.
OPENCLIP_TEXT_NAMES = (
    ("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
    ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
    ("ln_final.", "text_model.final_layer_norm."),
    ("transformer.resblocks.{n}.ln_1.", "text_model.encoder.layers.{n}.layer_norm1."),
    ("transformer.resblocks.{n}.ln_2.", "text_model.encoder.layers.{n}.layer_norm2."),
    ("transformer.resblocks.{n}.mlp.c_fc.", "text_model.encoder.layers.{n}.mlp.fc1."),
    ("transformer.resblocks.{n}.mlp.c_proj.", "text_model.encoder.layers.{n}.mlp.fc2."),
    ("transformer.resblocks.{n}.attn.out_proj.", "text_model.encoder.layers.{n}.self_attn.out_proj."),
    ("transformer.resblocks.{n}.attn.in_proj_weight", "text_model.encoder.layers.{n}.self_attn.in_proj.weight"),
    ("transformer.resblocks.{n}.attn.in_proj_bias", "text_model.encoder.layers.{n}.self_attn.in_proj.bias"),
)


def _rename_rules(pairs):
    """(regex, replacement) rules for _rename from (source name, target name) pairs of OPENCLIP_TEXT_NAMES' form."""
    rules = []
    for source, target in pairs:
        pattern = "^" + re.escape(source).replace(r"\{n\}", r"(\d+)") + ("" if source.endswith(".") else "$")
        rules.append((pattern, target.replace("{n}", r"\1")))
    return tuple(rules)


OPENCLIP_TEXT = _rename_rules(OPENCLIP_TEXT_NAMES)
OPENCLIP_UNUSED = ("text_projection", "logit_scale", "attn_mask")


def convert_openclip_text(text, source="checkpoint", rules=OPENCLIP_TEXT):
    """OpenCLIP text tower (prefix removed) -> CLIPTextModel names. SD 2.x conditions on the penultimate layer, so
    when the file holds the full tower (text_projection present) its last block is dropped, as diffusers does."""
    text = {k: v for k, v in text.items() if k not in OPENCLIP_UNUSED}
    renamed = {_rename(k, rules): v for k, v in text.items()}
    unmatched = [k for k in renamed if not k.startswith("text_model.")]
    if unmatched:
        raise SingleFileError(f"{source}: text-encoder tensors with no CLIPTextModel name: {checkpoint._name_list(unmatched)}")
    return _split_in_proj(renamed, source)


def _drop_last_layer(text):
    last = max(_count(text, r"text_model\.encoder\.layers\.(\d+)\."))
    return {k: v for k, v in text.items() if not k.startswith(f"text_model.encoder.layers.{last}.")}


# ---------------------------------------------------------------------------------------------------------------
# The whole file


class ConvertedModel:
    """A single file converted in memory: diffusers-named state dicts and configs for unet, vae, text_encoder,
    plus the family ("sd1"/"sd2"), the layout read ("ldm"/"mindone") and the container."""

    def __init__(self, state_dicts, configs, family, layout, container, source):
        self.state_dicts, self.configs = state_dicts, configs
        self.family, self.layout, self.container, self.source = family, layout, container, source


def _ldm_yaml(path):
    """Values an original LDM config (`<stem>.yaml` beside the file) settles: heads, parameterization, sizes."""
    yaml_path = os.path.splitext(path)[0] + ".yaml"
    if not os.path.isfile(yaml_path):
        return {}
    from omegaconf import OmegaConf

    try:
        params = OmegaConf.to_container(OmegaConf.load(yaml_path)).get("model", {}).get("params", {})
    except Exception as exc:
        raise SingleFileError(f"cannot read the LDM config {yaml_path!r} beside {path!r}: {exc}") from exc
    unet = params.get("unet_config", {}).get("params", {})
    values = {"yaml": yaml_path}
    if unet.get("num_head_channels", -1) not in (-1, None):
        values["head_channels"] = unet["num_head_channels"]
    elif unet.get("num_heads", -1) not in (-1, None):
        values["heads"] = unet["num_heads"]
    if "parameterization" in params:
        values["prediction_type"] = {"v": "v_prediction", "eps": "epsilon", "x0": "sample"}.get(params["parameterization"])
    if "scale_factor" in params:
        values["scaling_factor"] = params["scale_factor"]
    if "image_size" in unet:
        values["sample_size"] = unet["image_size"]
    return values


def split_ldm(state_dict, source="checkpoint"):
    """{"unet", "vae", "clip" or "openclip" or "mindone_clip": tensors with the prefix removed}; EMA copies and
    anything else in the file are left out."""
    parts = {"unet": {}, "vae": {}, "text": {}}
    text_kind = None
    for key, value in state_dict.items():
        if key.startswith(UNET_PREFIX):
            parts["unet"][key[len(UNET_PREFIX):]] = value
        elif key.startswith(VAE_PREFIX):
            parts["vae"][key[len(VAE_PREFIX):]] = value
        elif key.startswith(OPENCLIP_PREFIX):
            parts["text"][key[len(OPENCLIP_PREFIX):]] = value
            text_kind = "openclip"
        elif key.startswith(CLIP_PREFIX):
            rest = key[len(CLIP_PREFIX):]
            parts["text"][rest] = value
            text_kind = text_kind or ("mindone_clip" if rest.startswith(("transformer_layer.", "embedding_table",
                                                                           "positional_embedding", "ln_final"))
                                      else "clip")
    missing = [name for name, prefix in (("unet", UNET_PREFIX), ("vae", VAE_PREFIX), ("text", "cond_stage_model."))
               if not parts[name]]
    if missing:
        found = _prefix_summary(state_dict) if state_dict else "no tensors"
        raise SingleFileError(
            f"{source} is not a Stable Diffusion checkpoint in the original (LDM) layout: no tensors under "
            f"{', '.join({'unet': UNET_PREFIX, 'vae': VAE_PREFIX, 'text': 'cond_stage_model.'}[m] + '*' for m in missing)}"
            f"; found {found}. Expected SD 1.x/2.x single files (model.diffusion_model.*, first_stage_model.*, "
            f"cond_stage_model.transformer.* or cond_stage_model.model.*), or pass a diffusers folder instead")
    return parts["unet"], parts["vae"], parts["text"], text_kind


def convert_single_file(path, config_from=None):
    """Read `path` and convert it to diffusers names and configs in memory (a ConvertedModel).

    `config_from` (a diffusers pipeline folder) supplies unet/vae/text_encoder configs instead of inference (needed
    for non-SD sizes: head counts and GroupNorm groups are not in the tensors). An LDM `<stem>.yaml` beside the file
    supplies head counts, the prediction type, the latent size and the VAE scale."""
    path = os.fspath(path)
    raw, container = read_single_file(path)
    return convert_state_dict(raw, path, config_from=config_from, hints=_ldm_yaml(path), container=container)


def convert_state_dict(raw, source="checkpoint", config_from=None, hints=None, container=None):
    """An LDM-layout state dict (PyTorch or mindone names) -> ConvertedModel; see convert_single_file."""
    hints = hints or {}
    layout = "mindone" if is_mindone_layout(raw) else "ldm"
    if layout == "mindone":
        raw = {(_rename(k, MINDONE_RENAMES) if not k.startswith(CLIP_PREFIX) else k): v for k, v in raw.items()}
    unet, vae, text, text_kind = split_ldm(raw, source=source)
    if text_kind == "clip":
        text = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in text.items()
                if not k.endswith("position_ids")}
    elif text_kind == "mindone_clip":
        text = {(k[:-len(".gamma")] + ".weight" if k.endswith(".gamma") else
                 k[:-len(".beta")] + ".bias" if k.endswith(".beta") else k): v for k, v in text.items()}
        text = convert_openclip_text(text, source, MINDONE_TEXT)
    else:
        full_tower = "text_projection" in text
        text = convert_openclip_text(text, source)
        if full_tower:
            text = _drop_last_layer(text)
    width = int(text["text_model.embeddings.token_embedding.weight"].shape[1])
    family = "sd2" if text_kind == "openclip" or (text_kind == "mindone_clip" and width == 1024) else "sd1"
    if config_from is not None:
        configs = {name: _read_component_config(config_from, name) for name in ("unet", "vae", "text_encoder")}
    else:
        configs = {"unet": infer_unet_config(unet, family, hints.get("heads"), hints.get("head_channels"), source),
                   "vae": infer_vae_config(vae, source),
                   "text_encoder": infer_text_config(text, family)}
        if "sample_size" in hints:
            configs["unet"]["sample_size"] = hints["sample_size"]
        if "scaling_factor" in hints:
            configs["vae"]["scaling_factor"] = hints["scaling_factor"]
    state_dicts = {"unet": _apply_table(unet, unet_prefix_table(configs["unet"]), source, "UNet"),
                   "vae": _vae_to_linear(_apply_table(vae, vae_prefix_table(configs["vae"]), source, "VAE")),
                   "text_encoder": text}
    model = ConvertedModel(state_dicts, configs, family, layout, container, source)
    model.hints = hints
    return model


def _vae_to_linear(vae):
    # LDM's VAE attention projects with 1x1 convs; diffusers' with linear layers: the same matrix.
    return {k: (v[:, :, 0, 0] if ".mid_block.attentions.0.to_" in k and k.endswith(".weight") and v.ndim == 4 else v)
            for k, v in vae.items()}


def _read_component_config(folder, name):
    stem = "config.json"
    return checkpoint.read_json(os.path.join(folder, name, stem), what=f"{name} config (from config_from)")


# ---------------------------------------------------------------------------------------------------------------
# Writing the diffusers folder


def _tokenizer_folder(tokenizer_from):
    if tokenizer_from is None:
        return None
    nested = os.path.join(tokenizer_from, "tokenizer")
    folder = nested if os.path.isdir(nested) else tokenizer_from
    missing = [n for n in ("vocab.json", "merges.txt") if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise CheckpointNotFoundError(f"tokenizer_from {tokenizer_from!r}: {folder!r} lacks {', '.join(missing)} "
                                      f"(give a CLIP tokenizer folder, or an SD pipeline folder with tokenizer/)")
    return folder


def _check_tokenizer_source(tokenizer_from):
    source = _tokenizer_folder(tokenizer_from)
    if source is None:
        raise CheckpointNotFoundError(
            "a single-file checkpoint carries no tokenizer, and tav does not ship CLIP's 2 MB BPE vocabulary: pass "
            "--tokenizer_from DIR (tokenizer_from=DIR): a diffusers SD folder with tokenizer/, or a folder with "
            "CLIP's vocab.json and merges.txt (e.g. openai/clip-vit-large-patch14 downloaded by you)")
    return source


def write_tokenizer(folder, tokenizer_from, family):
    """tokenizer/: the BPE files from `tokenizer_from`; its configs when it has them, else SD's published ones."""
    source = _check_tokenizer_source(tokenizer_from)
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(source):
        if name.endswith((".json", ".txt")):
            shutil.copyfile(os.path.join(source, name), os.path.join(folder, name))
    if not os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                   **TOKENIZER_CONFIGS[family]}
        checkpoint.write_json_atomic(special, os.path.join(folder, "special_tokens_map.json"))
        checkpoint.write_json_atomic({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
                                      "errors": "replace", "add_prefix_space": False, **special},
                                     os.path.join(folder, "tokenizer_config.json"))


def resolve_prediction_type(model, prediction_type=None, config_from=None):
    """The explicit argument, else an LDM yaml beside the file, else config_from's scheduler, else epsilon."""
    if prediction_type is not None:
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
        return prediction_type
    if model.hints.get("prediction_type"):
        return model.hints["prediction_type"]
    if config_from is not None:
        scheduler = os.path.join(config_from, "scheduler", "scheduler_config.json")
        if os.path.isfile(scheduler):
            return checkpoint.read_json(scheduler, what="scheduler config").get("prediction_type", "epsilon")
    if model.family == "sd2":
        warnings.warn(f"{model.source}: SD 2.x checkpoint and no prediction type given: using epsilon (SD 2.x base). "
                      f"The 768 models (v2-0/v2-1 768-v) need --prediction_type v_prediction; the tensors cannot tell")
    return "epsilon"


def write_diffusers_folder(model, out_dir, prediction_type=None, tokenizer_from=None, config_from=None,
                           upcast_attention=None):
    """Write `model` (a ConvertedModel) as an SD pipeline folder that TuneAVideoPipeline.from_pretrained loads."""
    prediction = resolve_prediction_type(model, prediction_type, config_from)
    unet_config = dict(model.configs["unet"])
    if upcast_attention is not None:
        unet_config["upcast_attention"] = bool(upcast_attention)
    elif config_from is None and model.family == "sd2" and prediction == "v_prediction":
        unet_config["upcast_attention"] = True  # as SD 2.1-768's published config (fp16 overflow otherwise)
        unet_config["sample_size"] = model.hints.get("sample_size", 96)
    tokenizer_source = tokenizer_from
    if tokenizer_source is None and config_from is not None and os.path.isdir(os.path.join(config_from, "tokenizer")):
        tokenizer_source = config_from

    def fill(folder):
        for name, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                           ("text_encoder", "model")):
            os.makedirs(os.path.join(folder, name))
            config = unet_config if name == "unet" else model.configs[name]
            checkpoint.write_json_atomic(config, os.path.join(folder, name, "config.json"))
            checkpoint.save_state_dict(model.state_dicts[name], os.path.join(folder, name, stem + ".safetensors"))
        write_tokenizer(os.path.join(folder, "tokenizer"), tokenizer_source, model.family)
        os.makedirs(os.path.join(folder, "scheduler"))
        checkpoint.write_json_atomic({**SD_SCHEDULER, "prediction_type": prediction},
                                     os.path.join(folder, "scheduler", "scheduler_config.json"))
        checkpoint.write_json_atomic(checkpoint.SD_MODEL_INDEX, os.path.join(folder, "model_index.json"))
        checkpoint.write_json_atomic({"source": os.path.abspath(model.source), "container": model.container,
                                      "layout": model.layout, "family": model.family},
                                     os.path.join(folder, SOURCE_RECORD))

    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise CheckpointError(f"output {out_dir!r} exists and is not a folder")
    _check_tokenizer_source(tokenizer_source)  # before any weight is written
    return checkpoint.replace_directory_atomically(out_dir, fill)


def is_single_file(path):
    return os.path.isfile(os.fspath(path))


def check_pretrained_source(path, prediction_type=None, tokenizer_from=None, config_from=None,
                            option="--pretrained_model_path"):
    """What can be checked about a model source before any weight is read (the errors name `option`): a folder
    takes none of the single-file options (its own config files settle them); a file needs a known suffix, a
    tokenizer source, a known prediction type and an existing config_from folder."""
    path = os.fspath(path) if path is not None else ""
    if os.path.isdir(path):
        given = [name for name, value in (("prediction_type", prediction_type), ("tokenizer_from", tokenizer_from),
                                          ("config_from", config_from)) if value is not None]
        if given:
            raise SingleFileError(f"{option} {path!r} is a folder, whose own config files set what "
                                  f"{', '.join('--' + g for g in given)} would; those options apply to a single-file "
                                  f"checkpoint only")
        return "folder"
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"{option} {path!r} does not exist (expected a diffusers folder or one "
                                      f"checkpoint file: {', '.join(SINGLE_FILE_SUFFIXES)})")
    if not path.endswith(SINGLE_FILE_SUFFIXES):
        raise SingleFileError(f"{option} {path!r} is a file but not a checkpoint tav reads: expected a diffusers "
                              f"folder or a name ending in {', '.join(SINGLE_FILE_SUFFIXES)}")
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise SingleFileError(f"--prediction_type must be one of {', '.join(PREDICTION_TYPES)}, "
                              f"got {prediction_type!r}")
    if config_from is not None and not os.path.isdir(os.fspath(config_from)):
        raise CheckpointNotFoundError(f"--config_from {config_from!r} is not a folder (expected a diffusers SD "
                                      f"folder whose unet/vae/text_encoder configs to use)")
    tokenizer_source = tokenizer_from
    if tokenizer_source is None and config_from is not None and os.path.isdir(os.path.join(config_from, "tokenizer")):
        tokenizer_source = config_from
    _check_tokenizer_source(tokenizer_source)
    return "file"



def single_file_source(folder):
    """The single file a folder written by resolve_pretrained came from, or None: the pipeline's identity (the
    inversion cache key) can name the file, which stays put, rather than a temporary folder, which does not."""
    record = os.path.join(os.fspath(folder), SOURCE_RECORD)
    return checkpoint.read_json(record, what="single-file record")["source"] if os.path.isfile(record) else None


_PROCESS_CACHE = []  # the temporary cache folder of this process, made on first use and removed at exit


def _process_cache_dir():
    if not _PROCESS_CACHE:
        _PROCESS_CACHE.append(tempfile.mkdtemp(prefix="tav-single-file-"))
    return _PROCESS_CACHE[0]


def _remove_process_cache():
    for folder in _PROCESS_CACHE:
        shutil.rmtree(folder, ignore_errors=True)
    _PROCESS_CACHE.clear()


atexit.register(_remove_process_cache)


def resolve_pretrained(path, prediction_type=None, tokenizer_from=None, config_from=None, cache_dir=None):
    """The diffusers folder to load for `path`: a folder is returned unchanged; a single file is converted into
    `cache_dir/<file stem>-<hash of the file and options>/` and reused while the file is unchanged. Without
    `cache_dir` the cache is a temporary folder of this process, removed when it exits."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return path
    check_pretrained_source(path, prediction_type, tokenizer_from, config_from, option="pretrained model")
    stat = os.stat(path)
    request = [os.path.abspath(path), stat.st_size, int(stat.st_mtime), prediction_type,
               tokenizer_from and os.path.abspath(tokenizer_from), config_from and os.path.abspath(config_from)]
    key = hashlib.sha256(json.dumps(request).encode()).hexdigest()[:16]
    cache_dir = _process_cache_dir() if cache_dir is None else cache_dir
    out_dir = os.path.join(cache_dir, f"{os.path.splitext(os.path.basename(path))[0]}-{key}")
    if os.path.isfile(os.path.join(out_dir, "model_index.json")):
        return out_dir
    os.makedirs(cache_dir, exist_ok=True)
    model = convert_single_file(path, config_from=config_from)
    return write_diffusers_folder(model, out_dir, prediction_type, tokenizer_from, config_from)


# ---------------------------------------------------------------------------------------------------------------
# The inverse: a diffusers folder -> one LDM file


def to_ldm(unet, vae, text, unet_config, vae_config, family="sd1"):
    """Diffusers-named state dicts -> one LDM-layout state dict with PyTorch names (to_mindone_names gives
    mindone's). The temporal layers of a tuned Tune-A-Video UNet have no LDM name and are refused."""
    temporal = [k for k in unet if "_temp." in k]
    if temporal:
        raise SingleFileError(f"the UNet holds Tune-A-Video's temporal layers ({checkpoint._name_list(temporal)}), "
                              f"which the 2-D LDM layout cannot express")
    out = {UNET_PREFIX + k: v for k, v in _apply_table(unet, unet_prefix_table(unet_config), "diffusers UNet", "UNet",
                                                       forward=False).items()}
    vae = {k: (v[:, :, None, None] if ".mid_block.attentions.0.to_" in k and k.endswith(".weight") and v.ndim == 2
               else v) for k, v in vae.items()}
    out.update({VAE_PREFIX + k: v for k, v in _apply_table(vae, vae_prefix_table(vae_config), "diffusers VAE", "VAE",
                                                           forward=False).items()})
    if family == "sd2":
        fused = _text_to_fused(text, OPENCLIP_TEXT_INVERSE)
        # LDM's OpenCLIP tower has one block more than SD 2.x uses (it conditions on the penultimate one) and a
        # projection; neither affects SD. They are written as zeros so that LDM code loads the file strictly.
        last = len(_count(text, r"text_model\.encoder\.layers\.(\d+)\.")) - 1
        for key in [k for k in fused if k.startswith(f"transformer.resblocks.{last}.")]:
            fused[key.replace(f"resblocks.{last}.", f"resblocks.{last + 1}.")] = np.zeros_like(fused[key])
        width = text["text_model.embeddings.token_embedding.weight"].shape[1]
        fused["text_projection"] = np.zeros((width, width), np.float32)
        out.update({OPENCLIP_PREFIX + k: v for k, v in fused.items()})
    else:
        out.update({CLIP_PREFIX + k: v for k, v in text.items()})
    return out


MINDONE_INVERSE = (
    (r"\.in_layers\.0\.", ".in_layers_norm."),
    (r"\.in_layers\.2\.", ".in_layers_conv.conv."),
    (r"\.out_layers\.0\.", ".out_layers_norm."),
    (r"\.out_layers\.3\.", ".out_layers_conv.conv."),
    (r"\.skip_connection\.", ".skip_connection.conv."),
    (r"^(model\.diffusion_model\.input_blocks\.0\.0)\.", r"\1.conv."),
    (r"\.op\.", ".op.conv."),
    (r"^(model\.diffusion_model\.out\.2)\.", r"\1.conv."),
    (r"^(model\.diffusion_model\.output_blocks\.\d+\.\d+\.conv)\.", r"\1.conv."),
)
def _mindone_norm_names(out):
    renamed = {}
    for key, value in out.items():
        m = (re.search(r"\.(norm\d?|norm_out|in_layers_norm|out_layers_norm)\.(weight|bias)$", key)
             or re.search(r"^model\.diffusion_model\.out\.(0)\.(weight|bias)$", key))
        if m:
            key = key[: -len(m.group(2))] + ("gamma" if m.group(2) == "weight" else "beta")
        renamed[key] = value
    return renamed


def _text_to_fused(text, rules, weight_suffix=".weight", bias_suffix=".bias"):
    fused, parts = {}, {}
    for key, value in text.items():
        m = re.match(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)$", key)
        if m:
            parts.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
            continue
        fused[key] = value
    for (layer, kind), qkv in parts.items():
        fused[f"text_model.encoder.layers.{layer}.self_attn.in_proj.{kind}"] = np.concatenate(
            [qkv["q"], qkv["k"], qkv["v"]], 0)
    out = {}
    for key, value in fused.items():
        new = _rename(key, rules)
        if weight_suffix != ".weight" and re.search(r"(ln_\d|ln_final)\.weight$", new):
            new = new[: -len(".weight")] + weight_suffix
        if bias_suffix != ".bias" and re.search(r"(ln_\d|ln_final)\.bias$", new):
            new = new[: -len(".bias")] + bias_suffix
        out[new] = value
    return out


OPENCLIP_TEXT_INVERSE = _rename_rules((clip, openclip) for openclip, clip in OPENCLIP_TEXT_NAMES)
MINDONE_TEXT_INVERSE = (
    (r"^text_model\.embeddings\.token_embedding\.weight$", "embedding_table"),
    (r"^text_model\.embeddings\.position_embedding\.weight$", "positional_embedding"),
    (r"^text_model\.final_layer_norm\.", "ln_final."),
    (r"^text_model\.encoder\.layers\.(\d+)\.layer_norm1\.", r"transformer_layer.resblocks.\1.ln_1."),
    (r"^text_model\.encoder\.layers\.(\d+)\.layer_norm2\.", r"transformer_layer.resblocks.\1.ln_2."),
    (r"^text_model\.encoder\.layers\.(\d+)\.mlp\.fc1\.", r"transformer_layer.resblocks.\1.c_fc."),
    (r"^text_model\.encoder\.layers\.(\d+)\.mlp\.fc2\.", r"transformer_layer.resblocks.\1.c_proj."),
    (r"^text_model\.encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"transformer_layer.resblocks.\1.attn.attn.out_proj."),
    (r"^text_model\.encoder\.layers\.(\d+)\.self_attn\.in_proj\.", r"transformer_layer.resblocks.\1.attn.attn.in_proj."),
)


def folder_to_ldm(folder, layout="ldm", family=None):
    """An SD pipeline folder in diffusers layout -> one LDM-layout state dict (see to_ldm). The family (OpenCLIP
    text layout or not) follows the text encoder's activation unless given."""
    parts, configs = {}, {}
    for name, stem, bin_stem in (("unet", "diffusion_pytorch_model", None), ("vae", "diffusion_pytorch_model", None),
                                 ("text_encoder", "model", "pytorch_model")):
        sub = os.path.join(folder, name)
        configs[name] = checkpoint.read_json(os.path.join(sub, "config.json"), what=f"{name} config")
        parts[name] = checkpoint.read_state_dict(checkpoint.find_weights_file(sub, stem, bin_stem))
    parts["text_encoder"].pop("text_model.embeddings.position_ids", None)
    if family is None:
        family = "sd2" if configs["text_encoder"].get("hidden_act") == "gelu" else "sd1"
    out = to_ldm(parts["unet"], parts["vae"], parts["text_encoder"], configs["unet"], configs["vae"], family)
    return to_mindone_names(out) if layout == "mindone" else out


def to_mindone_names(ldm):
    """A PyTorch-named LDM state dict -> the names mindone's MindSpore SD uses (`.conv`-wrapped convolutions,
    gamma/beta norms, the text encoder fused as OpenCLIP under cond_stage_model.transformer.). SD 2.x's OpenCLIP
    tower is written with the blocks the diffusers text encoder has, as mindone's own conversion does."""
    out, text = {}, {}
    for key, value in ldm.items():
        if key.startswith(CLIP_PREFIX):
            text[key[len(CLIP_PREFIX):]] = value
        elif key.startswith(OPENCLIP_PREFIX):
            continue
        else:
            out[_rename(key, MINDONE_INVERSE)] = value
    openclip = {k[len(OPENCLIP_PREFIX):]: v for k, v in ldm.items() if k.startswith(OPENCLIP_PREFIX)}
    if openclip:
        text = _drop_last_layer(convert_openclip_text(openclip, "OpenCLIP text encoder"))
    out = _mindone_norm_names(out)
    out.update({CLIP_PREFIX + k: v for k, v in _text_to_fused(text, MINDONE_TEXT_INVERSE, ".gamma", ".beta").items()})
    return out


def write_single_file(folder, out_path, layout=None, family=None):
    """Write the diffusers folder as one LDM file: `.safetensors` (PyTorch names; layout="mindone" for mindone's)
    or `.ckpt` (a MindSpore checkpoint with mindone's names, as mindone's SD loads it)."""
    out_path = os.fspath(out_path)
    if out_path.endswith(".safetensors"):
        state = folder_to_ldm(folder, layout or "ldm", family)
        checkpoint.save_state_dict(state, out_path)
    elif out_path.endswith(".ckpt"):
        import mindspore as ms

        state = folder_to_ldm(folder, layout or "mindone", family)
        ms.save_checkpoint([{"name": k, "data": ms.Tensor(np.ascontiguousarray(v))} for k, v in state.items()], out_path)
    else:
        raise SingleFileError(f"cannot tell what to write for {out_path!r}: expected a name ending in .safetensors "
                              f"or .ckpt (MindSpore)")
    return out_path
