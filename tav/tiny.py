"""The embedded tiny model: a complete Stable-Diffusion-1.x-shaped pipeline folder, built by code.

The project ships no weights and cannot download any. `make demo` and the tests instead write a tiny pipeline in
the diffusers layout (`model_index.json`, `tokenizer/`, `text_encoder/`, `unet/`, `vae/`, `scheduler/`) with the
same file names, config fields and parameter names as the real SD v1.x checkpoints, so every line of the real
loading code runs on it.

The weights are RANDOM: the tiny pipeline's videos are noise. It exists to exercise loading, inversion, sampling
and training end to end, and to compare tav against the PyTorch originals on identical weights.

Each part is one small function writing one sub-folder; all of them are deterministic (seeded numpy, no downloads).
`make_demo_clip` writes the synthetic clip the demo and the tests invert and tune on.

A fixture-writing module: it imports the models, checkpoint and video I/O it writes for, never the pipeline,
training or the demo job (tav.demo).
"""
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np

from tav.checkpoint import SD_MODEL_INDEX, save_state_dict, write_json_atomic
from tav.checks import is_int

# ---------------------------------------------------------------------------------------------------------------
# tokenizer/: a real (small) CLIP byte-level BPE
# ---------------------------------------------------------------------------------------------------------------

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77
TINY_VOCAB_SIZE = 1000

# The merges are learned from this text, so the official Tune-A-Video prompts and everyday English words split into
# few tokens. Anything else still tokenizes: every byte is in the vocabulary on its own.
_MERGE_CORPUS = """
a man is skiing. spider man is skiing on the beach, cartoon style. wonder woman, wearing a cowboy hat, is skiing.
a man, wearing pink clothes, is skiing at sunset. a jeep car is moving on the road. a car is moving on the beach.
a jeep car is moving on the snow. a porsche car is moving on the desert. a jeep car is moving on the road, cartoon
style. a bear is playing guitar. a rabbit is playing guitar, modern disney style. a handsome prince is playing
guitar. a magic princess with sunglasses is playing guitar on the stage. a man is surfing. a panda is surfing.
iron man is surfing in the desert. a raccoon is surfing, cartoon style. a cat is surfing on the sea. a man is
dribbling a basketball. trump is dribbling a basketball. an astronaut is dribbling a basketball, cartoon style.
a lego man in a black suit is dribbling a basketball. a puppy is running on the grass. a dog is walking in the park.
a horse is running on the field. a bird is flying in the sky. a boy is riding a bike on the street at night.
a girl is dancing in the rain. a woman is swimming in the lake. a tiger is walking in the forest, oil painting.
a white swan is swimming in the water, van gogh style. a red sports car is driving through the city in winter.
a photo of a cat. a photo of a dog. a painting of a mountain under the stars. high quality, detailed, realistic.
the of and to in is was he for it with as his on be at by i this had not are but from or have an they which one you
were her all she there would their we him been has when who will more no if out so said what up its about into
than them can only other new some could time these two may then do first any my now such like our over me even
most made after also did many before must through back years where much your way well down should because each just
those people how too little state good very make world still own see men work long get here between both life being
under never day same another know while last might us great old year off come since against go came right used take
three states himself few house use during without again place around however home small found thought went say part
once general high upon school every don does got united left number course war until always away something fact
though water less public put think almost hand enough far took head yet government system better set told nothing
night end why called didn eyes find going look asked later knew point next program city business give group toward
young days let room president side social given present several order national possible rather second face per
among form important often things looking early white case john become large big need four within felt along
children saw best church ever least power development light thing seemed family interest want members mind country
area others done turned although open god service problem certain kind different thus began door help sense means
whole matter perhaps itself york times law human line above name example action company hands local show whether
five history gave today either act feet across taken past quite anything having seen death experience body word half
really week field money words change brown blue green yellow black gold silver orange purple dark bright beautiful
happy running jumping walking flying sitting standing smiling playing dancing singing cooking reading painting
video frame motion camera scene cinematic sunny cloudy snowy rainy morning evening sunrise autumn spring summer
ocean river mountain mountains forest street garden kitchen castle space moon planet robot dragon monster
""".strip()


def bytes_to_unicode():
    """CLIP's (and GPT-2's) reversible map from the 256 byte values to printable unicode characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    byte_values = printable[:]
    code_points = printable[:]
    shift = 0
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            code_points.append(256 + shift)
            shift += 1
    return dict(zip(byte_values, (chr(c) for c in code_points)))


def _corpus_words(text):
    """Word -> count, split like CLIP's pre-tokenizer (letters runs, single digits, punctuation runs)."""
    byte_encoder = bytes_to_unicode()
    counts = Counter()
    for word in re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", text.lower()):
        counts["".join(byte_encoder[b] for b in word.encode("utf-8"))] += 1
    return counts


def _merge_word(symbols, pair):
    merged, i = [], 0
    while i < len(symbols):
        if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return tuple(merged)


def learn_bpe_merges(text, num_merges):
    """Classic BPE training on `text`: repeatedly merge the most frequent adjacent pair (ties: smallest pair).

    Words carry CLIP's `</w>` end-of-word marker on their last symbol. Pairs whose merged string is already a token
    are skipped so every merge adds exactly one new vocabulary entry.
    """
    words = {}
    for word, count in _corpus_words(text).items():
        words[tuple(word[:-1]) + (word[-1] + "</w>",)] = count
    known = set(bytes_to_unicode().values())
    known |= {c + "</w>" for c in known}
    merges = []
    while len(merges) < num_merges:
        pair_counts = Counter()
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:]):
                pair_counts[pair] += count
        candidates = [(-c, pair) for pair, c in pair_counts.items() if pair[0] + pair[1] not in known]
        if not candidates:
            raise ValueError(
                f"the tiny tokenizer's corpus supports only {len(merges)} merges, {num_merges} were asked for "
                f"(vocab_size at most {len(merges) + 514})"
            )
        _, best = min(candidates)
        merges.append(best)
        known.add(best[0] + best[1])
        words = {
            (_merge_word(symbols, best) if best[0] in symbols and best[1] in symbols else symbols): count
            for symbols, count in words.items()
        }
    return merges


def write_tiny_tokenizer(folder, vocab_size=TINY_VOCAB_SIZE):
    """Write a small but real CLIP BPE tokenizer (vocab.json, merges.txt, configs) into `folder`.

    Layout of the vocabulary is CLIP's: 256 byte symbols, the same with `</w>`, one entry per merge, then
    `<|startoftext|>` and `<|endoftext|>` (the highest id, as in CLIP). Padding uses `<|endoftext|>` like SD 1.x.
    Returns the vocabulary size (pass it to write_tiny_text_encoder).
    """
    num_merges = vocab_size - 512 - 2
    if num_merges < 0:
        raise ValueError(f"vocab_size must be at least 514 (256 bytes x 2 + 2 special tokens), got {vocab_size}")
    merges = learn_bpe_merges(_MERGE_CORPUS, num_merges)
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    assert len(vocab) == vocab_size

    os.makedirs(folder, exist_ok=True)
    write_json_atomic(vocab, os.path.join(folder, "vocab.json"))
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        # CLIPTokenizer skips the first line (the version header).
        f.write("#version: 0.2 - tiny random tav tokenizer\n")
        f.writelines(f"{a} {b}\n" for a, b in merges)
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "unk_token": EOS_TOKEN}
    write_json_atomic(special, os.path.join(folder, "special_tokens_map.json"))
    write_json_atomic(
        {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": MODEL_MAX_LENGTH,
            "do_lower_case": True,
            "errors": "replace",
            "add_prefix_space": False,
            **special,
        },
        os.path.join(folder, "tokenizer_config.json"),
    )
    return vocab_size


# ---------------------------------------------------------------------------------------------------------------
# text_encoder/: a random CLIPTextModel with the checkpoint's key names
# ---------------------------------------------------------------------------------------------------------------


def tiny_text_encoder_config(
    vocab_size, hidden_size=32, layers=2, heads=2, intermediate=37, max_position_embeddings=MODEL_MAX_LENGTH
):
    """SD v1.x's text_encoder/config.json (openai/clip-vit-large-patch14's text tower), shrunk."""
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "hidden_act": "quick_gelu",
        "hidden_size": hidden_size,
        "intermediate_size": intermediate,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": max_position_embeddings,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "projection_dim": hidden_size,
        "vocab_size": vocab_size,
        # The tiny tokenizer puts <|startoftext|>, <|endoftext|> last, as CLIP does; pad is <|endoftext|>.
        "bos_token_id": vocab_size - 2,
        "eos_token_id": vocab_size - 1,
        "pad_token_id": vocab_size - 1,
        "torch_dtype": "float32",
    }


def text_encoder_shapes(config):
    """Every tensor of a transformers CLIPTextModel state dict, by its checkpoint key, with its shape."""
    d, inner = config["hidden_size"], config["intermediate_size"]
    shapes = {
        "text_model.embeddings.token_embedding.weight": (config["vocab_size"], d),
        "text_model.embeddings.position_embedding.weight": (config["max_position_embeddings"], d),
    }
    for i in range(config["num_hidden_layers"]):
        layer = f"text_model.encoder.layers.{i}"
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            shapes[f"{layer}.self_attn.{proj}.weight"] = (d, d)
            shapes[f"{layer}.self_attn.{proj}.bias"] = (d,)
        shapes[f"{layer}.layer_norm1.weight"] = (d,)
        shapes[f"{layer}.layer_norm1.bias"] = (d,)
        shapes[f"{layer}.mlp.fc1.weight"] = (inner, d)
        shapes[f"{layer}.mlp.fc1.bias"] = (inner,)
        shapes[f"{layer}.mlp.fc2.weight"] = (d, inner)
        shapes[f"{layer}.mlp.fc2.bias"] = (d,)
        shapes[f"{layer}.layer_norm2.weight"] = (d,)
        shapes[f"{layer}.layer_norm2.bias"] = (d,)
    shapes["text_model.final_layer_norm.weight"] = (d,)
    shapes["text_model.final_layer_norm.bias"] = (d,)
    return shapes


def random_text_encoder_weights(config, seed=0):
    """Seeded weights at HF's init scale (normal, std 0.02).

    LayerNorms are 1 + N(0, 0.02) and N(0, 0.02) instead of exactly 1 and 0, and biases are non-zero: a loader that
    silently skipped them would then change the output, so parity tests can catch it.
    """
    rng = np.random.default_rng(seed)
    weights = {}
    for key, shape in text_encoder_shapes(config).items():
        values = rng.normal(0.0, 0.02, size=shape)
        if "layer_norm" in key and key.endswith(".weight"):
            values += 1.0
        weights[key] = values.astype(np.float32)
    return weights


def write_tiny_text_encoder(
    folder,
    vocab_size=TINY_VOCAB_SIZE,
    hidden_size=32,
    layers=2,
    heads=2,
    intermediate=37,
    max_position_embeddings=MODEL_MAX_LENGTH,
    seed=0,
    fmt="safetensors",
):
    """Write config.json + model.safetensors (or pytorch_model.bin) of a random CLIPTextModel into `folder`.

    fmt="bin" writes the old PyTorch format, with the `position_ids` buffer old checkpoints carry; it needs torch
    (the test-only extra), since nothing at runtime writes .bin files.
    """
    if fmt not in ("safetensors", "bin"):
        raise ValueError(f"fmt must be 'safetensors' or 'bin', got {fmt!r}")
    config = tiny_text_encoder_config(vocab_size, hidden_size, layers, heads, intermediate, max_position_embeddings)
    weights = random_text_encoder_weights(config, seed)
    os.makedirs(folder, exist_ok=True)
    if fmt == "safetensors":
        save_state_dict(weights, os.path.join(folder, "model.safetensors"))
    else:
        weights["text_model.embeddings.position_ids"] = np.arange(max_position_embeddings, dtype=np.int64)[None]
        _torch_save(weights, os.path.join(folder, "pytorch_model.bin"))
    write_json_atomic(config, os.path.join(folder, "config.json"))
    return config


def _torch_save(weights, path):
    try:
        import torch
    except ImportError as e:
        raise RuntimeError(f"writing {path} (PyTorch .bin format) needs torch, the test-only extra") from e
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}, path)


# ---------------------------------------------------------------------------------------------------------------
# scheduler/ and model_index.json
# ---------------------------------------------------------------------------------------------------------------


def write_tiny_scheduler(folder):
    """SD v1.x's scheduler_config.json (the noise schedule is the real one; nothing here is tiny)."""
    from tav.schedulers import SD_V1_SCHEDULE

    config = {"_class_name": "DDIMScheduler", **SD_V1_SCHEDULE, "trained_betas": None, "skip_prk_steps": True,
              "prediction_type": "epsilon"}
    os.makedirs(folder, exist_ok=True)
    write_json_atomic(config, os.path.join(folder, "scheduler_config.json"))
    return config


def write_model_index(folder):
    """model_index.json as SD v1.x ships it (without the safety checker and feature extractor)."""
    os.makedirs(folder, exist_ok=True)
    write_json_atomic(SD_MODEL_INDEX, os.path.join(folder, "model_index.json"))
    return dict(SD_MODEL_INDEX)




# ---------------------------------------------------------------------------------------------------------------
# unet/ and vae/: SD 1.x's block layout at toy widths, written as a 2-D SD checkpoint
# ---------------------------------------------------------------------------------------------------------------

TINY_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 32, 64, 64],
    "layers_per_block": 1,
    "attention_head_dim": 2,
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
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

TINY_VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [16, 16, 32, 32],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 64,
    "scaling_factor": 0.18215,
}


def _seeded_cell(build, seed):
    import mindspore as ms

    ms.set_seed(seed)
    return build()


def write_tiny_unet(folder, cross_attention_dim=32, seed=0):
    """unet/: a random 2-D SD UNet (the inflated model's weights minus the temporal layers, 2-D block names)."""
    from tav.checkpoint import cell_state_dict
    from tav.models.unet3d import UNet3DConditionModel, is_temporal_key

    config = dict(TINY_UNET_CONFIG, cross_attention_dim=cross_attention_dim)
    model = _seeded_cell(lambda: UNet3DConditionModel(config), seed)
    weights = {k: v for k, v in cell_state_dict(model).items() if not is_temporal_key(k)}
    os.makedirs(folder, exist_ok=True)
    write_json_atomic(config, os.path.join(folder, "config.json"))
    save_state_dict(weights, os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    return config


def write_tiny_vae(folder, seed=0):
    """vae/: a random AutoencoderKL with SD's 8x downscale (four levels) at toy widths."""
    from tav.models.vae import AutoencoderKL

    model = _seeded_cell(lambda: AutoencoderKL(dict(TINY_VAE_CONFIG)), seed)
    model.save_pretrained(folder)
    return dict(TINY_VAE_CONFIG)


def write_tiny_pipeline(output_dir, seed=0):
    """A complete tiny SD 1.x-shaped pipeline folder in diffusers layout; returns its path."""
    text_config = write_tiny_text_encoder(os.path.join(output_dir, "text_encoder"), seed=seed)
    write_tiny_tokenizer(os.path.join(output_dir, "tokenizer"))
    write_tiny_unet(os.path.join(output_dir, "unet"), cross_attention_dim=text_config["hidden_size"], seed=seed)
    write_tiny_vae(os.path.join(output_dir, "vae"), seed=seed)
    write_tiny_scheduler(os.path.join(output_dir, "scheduler"))
    write_model_index(output_dir)
    return output_dir


def ensure_tiny_pipeline(output_dir, seed=0):
    """Write the tiny pipeline unless a complete one is already there."""
    if not os.path.isfile(os.path.join(output_dir, "model_index.json")):
        write_tiny_pipeline(output_dir, seed)
    return output_dir


# ---------------------------------------------------------------------------------------------------------------
# a synthetic clip for the demo and the tests
# ---------------------------------------------------------------------------------------------------------------
def make_demo_clip(path, n_frames=16, height=64, width=64, seed=0, fps=8):
    """Write a small deterministic clip -- a coloured disc moving over a drifting gradient -- and return its path.

    mp4 unless the extension (or a png folder path) says otherwise; same ``seed``, same pixels.
    """
    # Imported here, not at the top: importing this module for its configs (bench/configs.py) should not load
    # OpenCV (~20 MiB of resident memory a benchmark would count as the model's).
    from tav.video import VideoError, write_video

    if not is_int(n_frames) or n_frames < 1 or not is_int(height) or height < 8 or not is_int(width) or width < 8:
        raise VideoError(f"demo clip {path}: need n_frames >= 1 and height, width >= 8; got "
                         f"{n_frames!r}, {height!r}, {width!r}")
    rng = np.random.default_rng(seed)
    disc_rgb = rng.integers(160, 256, size=3).astype(np.float32)
    base_blue = float(rng.integers(40, 120))
    phase = float(rng.uniform(0, 2 * np.pi))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    radius = max(2.0, min(height, width) / 6)
    frames = np.empty((n_frames, height, width, 3), np.uint8)
    for t in range(n_frames):
        s = t / max(n_frames - 1, 1)
        drift = 40.0 * s
        bg = np.stack([200.0 * xx / max(width - 1, 1) + drift,
                       200.0 * yy / max(height - 1, 1),
                       np.full_like(xx, base_blue + drift)], axis=-1)
        cx = radius + s * (width - 1 - 2 * radius)
        cy = height / 2 + (height / 4) * np.sin(phase + 2 * np.pi * s)
        inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius ** 2
        bg[inside] = disc_rgb
        frames[t] = np.clip(bg, 0, 255).astype(np.uint8)
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "mp4"
    if not path.suffix:
        path = path.with_suffix(".mp4")
    return write_video(frames, path, fps=fps, fmt=fmt)

