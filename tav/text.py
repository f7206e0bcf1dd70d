"""Prompts to embeddings: SD 1.x's CLIP tokenizer and text encoder.

The tokenizer is transformers' `CLIPTokenizer`; the encoder is `mindone.transformers.CLIPTextModel`, which has the
same structure as transformers' and runs on CPU in both execution modes (mindone 0.5.0, MindSpore 2.10): in
GRAPH_MODE the first call compiles (about 20 s for SD's 12-layer encoder on a busy 2-core machine) and later calls
with the same batch shape reuse the graph at about 1 s, against about 6 s per call in PyNative. So there is no mode
fallback: the encoder runs in whatever mode the context is set to, and encode_prompt_with_guidance sends prompts and
negative prompts as one batch so that graph mode compiles once.

Loading is local only: a path is a pipeline folder (with `tokenizer/`, `text_encoder/`) or the component folder
itself, never a hub id.
"""
import contextlib
import io
import logging
import os
import re
import sys
import warnings

import mindspore as ms
from mindspore import nn, ops

from tav.checkpoint import (CheckpointError, CheckpointMismatchError, CheckpointNotFoundError, component_folder,
                            read_state_dict)
from tav.nn import gelu

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("vocab.json", "merges.txt")
TEXT_ENCODER_CONFIG = "config.json"
# What SD 1.x folders contain: safetensors in newer snapshots, only the PyTorch pickle in older ones.
TEXT_ENCODER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# Older transformers saved this buffer in the state dict; the model computes it instead.
_BUFFER_KEYS = ("text_model.embeddings.position_ids",)


# Importing mindone.transformers (it imports every model it ships) says two things that are not about this run:
# a FutureWarning from its image-processor registry and transformers' docstring builder printing
# "🚨 Config not found for parakeet ..." to stdout. Exactly those are dropped; anything else passes through.
_IMPORT_WARNINGS = (r"The image_processor_class argument is deprecated",)
_IMPORT_PRINTS = re.compile(r"^🚨 Config not found for \w+\. You can manually add it to HARDCODED_CONFIG_FOR_MODELS")


def import_clip_text_model():
    """mindone's CLIPTextModel, imported without the import-time noise above."""
    if "mindone.transformers" in sys.modules:
        from mindone.transformers import CLIPTextModel
        return CLIPTextModel
    printed = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(printed):
            for message in _IMPORT_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=FutureWarning)
            from mindone.transformers import CLIPTextModel
    finally:
        sys.stdout.write("".join(line for line in printed.getvalue().splitlines(keepends=True)
                                 if not _IMPORT_PRINTS.match(line)))
    return CLIPTextModel


# ---------------------------------------------------------------------------------------------------------------
# Loading


def load_tokenizer(path):
    """CLIPTokenizer from `<pipeline>/tokenizer/` or from the tokenizer folder itself (vocab.json + merges.txt)."""
    from transformers import CLIPTokenizer

    folder = component_folder(path, "tokenizer", TOKENIZER_FILES[0])
    missing = [name for name in TOKENIZER_FILES if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise CheckpointNotFoundError(
            f"tokenizer folder {folder!r} lacks {', '.join(missing)} "
            f"(a CLIP tokenizer needs {', '.join(TOKENIZER_FILES)})"
        )
    return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def find_text_encoder_weights(folder):
    """model.safetensors, else pytorch_model.bin, in `folder`."""
    for name in TEXT_ENCODER_WEIGHTS:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise CheckpointNotFoundError(
        f"no text encoder weights in {folder!r}: looked for {', '.join(TEXT_ENCODER_WEIGHTS)}"
    )


def load_text_encoder(path, dtype=ms.float32):
    """mindone CLIPTextModel from `<pipeline>/text_encoder/` or the folder itself, in eval mode, cast to `dtype`.

    The weights are read by tav.checkpoint (safetensors, or a `.bin` read without torch, which mindone's own
    from_pretrained refuses) and handed to mindone as a state dict, so both formats take the same path; mindone
    maps the checkpoint names to its own (`*.weight` of embeddings -> `embedding_table`, LayerNorm -> gamma/beta).
    Every checkpoint tensor must match a parameter and vice versa.
    """
    CLIPTextModel = import_clip_text_model()

    folder = component_folder(path, "text_encoder", TEXT_ENCODER_CONFIG)
    config_path = os.path.join(folder, TEXT_ENCODER_CONFIG)
    if not os.path.isfile(config_path):
        raise CheckpointNotFoundError(f"text encoder folder {folder!r} has no {TEXT_ENCODER_CONFIG}")
    weights_path = find_text_encoder_weights(folder)
    arrays = read_state_dict(weights_path)
    for key in _BUFFER_KEYS:
        arrays.pop(key, None)
    state_dict = {name: ms.Parameter(ms.Tensor(array), name=name) for name, array in arrays.items()}
    try:
        model, info = CLIPTextModel.from_pretrained(
            folder, state_dict=state_dict, dtype=dtype, local_files_only=True, output_loading_info=True
        )
    except RuntimeError as exc:  # mindone's size-mismatch report
        raise CheckpointMismatchError(f"{weights_path!r} does not fit the model of {config_path!r}: {exc}") from exc
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot build a CLIPTextModel from {config_path!r}, {weights_path!r}: {exc}") from exc
    problems = {kind: names for kind, names in info.items() if names}
    if problems:
        details = "; ".join(
            f"{kind.replace('_', ' ')}: {', '.join(_checkpoint_name(str(n)) for n in names)}"
            for kind, names in problems.items()
        )
        raise CheckpointMismatchError(f"{weights_path!r} does not match the model of {config_path!r}: {details}")
    if getattr(model.config, "hidden_act", None) == "gelu":
        _use_exact_gelu(model)
    model.set_train(False)
    return model


class _ExactGELU(nn.Cell):
    def construct(self, x):
        return gelu(x)


def _use_exact_gelu(model):
    """SD 2.x's OpenCLIP text tower uses exact GELU, which mindone runs as the GeluExt op: MindSpore 2.10 has no
    CPU kernel for it. tav.nn.gelu is the same function (erf form) in ops every device has."""
    for layer in model.text_model.encoder.layers:
        layer.mlp.activation_fn = _ExactGELU()


def _checkpoint_name(mindone_name):
    """mindone's parameter name back to the checkpoint key, for messages."""
    for ms_suffix, pt_suffix in ((".embedding_table", ".weight"), (".gamma", ".weight"), (".beta", ".bias")):
        if mindone_name.endswith(ms_suffix):
            return mindone_name[: -len(ms_suffix)] + pt_suffix
    return mindone_name


# ---------------------------------------------------------------------------------------------------------------
# Encoding


def tokenize(tokenizer, prompts):
    """(B, 77) int64 ids, padded with <|endoftext|> and truncated as SD does; warns naming what was cut off."""
    max_length = tokenizer.model_max_length
    ids = tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="np"
    ).input_ids
    full = tokenizer(prompts, padding="longest", return_tensors="np").input_ids
    if full.shape[-1] > max_length:
        removed = tokenizer.batch_decode(full[:, max_length - 1 : -1], skip_special_tokens=True)
        removed = [text for text in removed if text]
        logger.warning(
            f"The following part of your input was truncated because CLIP can only handle sequences up to "
            f"{max_length} tokens: {removed}"
        )
    return ids


def encode_prompts(tokenizer, text_encoder, prompts):
    """(B, 77, D) last hidden states of the CLIP text encoder, one row per prompt. No attention mask: SD's text
    conditioning attends over the padding tokens too."""
    if isinstance(prompts, str):
        prompts = [prompts]
    ids = tokenize(tokenizer, list(prompts))
    return text_encoder(ms.Tensor(ids))[0]


def encode_prompt_with_guidance(tokenizer, text_encoder, prompts, negative_prompt=None, num_videos_per_prompt=1):
    """(cond, uncond), each (B * num_videos_per_prompt, 77, D), rows grouped per prompt as diffusers orders them.

    uncond encodes `negative_prompt` (one string for all prompts, or one per prompt), or "" when it is None.
    Both go through the encoder in one batch, so GRAPH_MODE compiles one graph.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if negative_prompt is None:
        negatives = [""] * len(prompts)
    elif isinstance(negative_prompt, str):
        negatives = [negative_prompt] * len(prompts)
    else:
        negatives = list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(
                f"negative_prompt has {len(negatives)} entries but there are {len(prompts)} prompts; "
                "give one string, or one per prompt"
            )
    if num_videos_per_prompt < 1:
        raise ValueError(f"num_videos_per_prompt must be at least 1, got {num_videos_per_prompt}")
    embeds = encode_prompts(tokenizer, text_encoder, prompts + negatives)
    if num_videos_per_prompt > 1:
        embeds = ops.repeat_interleave(embeds, num_videos_per_prompt, 0)
    split = len(prompts) * num_videos_per_prompt
    return embeds[:split], embeds[split:]
