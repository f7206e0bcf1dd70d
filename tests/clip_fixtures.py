"""Tiny random CLIP folders written by transformers (the PyTorch original), and frames that look like video."""
import numpy as np

from tav.tiny import TINY_VOCAB_SIZE, write_tiny_tokenizer
from tests.helpers import import_parity_extra

# Two shapes: OpenAI CLIP's (quick_gelu, the legacy eos_token_id 2 of its published config) and the laion /
# PickScore ViT-H one (gelu, the real <|endoftext|> id).
TINY_CLIP_KINDS = {
    "openai": dict(hidden_act="quick_gelu", eos_token_id=2),
    "laion": dict(hidden_act="gelu", eos_token_id=TINY_VOCAB_SIZE - 1),
}


def write_clip_folder(folder, kind="openai", seed=0, safe_serialization=True, logit_scale=3.2,
                      shortest_edge=33, crop=30):
    """A CLIPModel folder as published: config.json, weights, tokenizer files, preprocessor_config.json."""
    torch, _ = import_parity_extra()
    import transformers

    act = TINY_CLIP_KINDS[kind]
    text = dict(vocab_size=TINY_VOCAB_SIZE, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, hidden_act=act["hidden_act"],
                bos_token_id=TINY_VOCAB_SIZE - 2, eos_token_id=act["eos_token_id"], pad_token_id=TINY_VOCAB_SIZE - 1)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  image_size=crop, patch_size=6, hidden_act=act["hidden_act"])
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    torch.manual_seed(seed)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(logit_scale)
    model.save_pretrained(folder, safe_serialization=safe_serialization)
    write_tiny_tokenizer(folder)
    transformers.CLIPImageProcessor(size={"shortest_edge": shortest_edge},
                                    crop_size={"height": crop, "width": crop}).save_pretrained(folder)
    return folder


def synthetic_frames(n=4, height=48, width=64, seed=0):
    """uint8 (n, H, W, 3) frames with smooth gradients, edges and a moving square: what a real clip has that
    noise lacks (the bicubic resize sees structure at every scale)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = []
    for t in range(n):
        r = 127 + 100 * np.sin(x / width * 6.28 + t * 0.4)
        g = 127 + 100 * np.cos(y / height * 3.14 + t * 0.3)
        b = np.full_like(x, 60.0 + 20 * t)
        frame = np.stack([r, g, b], -1)
        top, left = 4 + 3 * t, 6 + 5 * t
        frame[top:top + height // 4, left:left + width // 4] = (240, 30, 30)
        frame += rng.normal(0, 6, frame.shape)
        frames.append(np.clip(frame, 0, 255).astype(np.uint8))
    return np.stack(frames)


def write_jpg_folder(folder, frames):
    """Frames as 00000.jpg, 00001.jpg ... (PIL's JPEG, quality 95), as the benchmark's frame folders are."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{i:05d}.jpg", quality=95)
    return folder
