"""A published CLIP folder (transformers' `CLIPModel` layout) as one object: model, tokenizer, image preprocessing.

The folder holds `config.json` (`text_config`, `vision_config`, `projection_dim`), `model.safetensors` or
`pytorch_model.bin` (read by tav.checkpoint, without torch), the tokenizer files and `preprocessor_config.json`.
The tokenizer and the preprocessing may come from another folder (the LOVEU-TGVE benchmark scores PickScore
with PickScore_v1's weights and laion/CLIP-ViT-H-14's processor).

Preprocessing is transformers' `CLIPImageProcessor` (the PIL one, which `CLIPProcessor.from_pretrained` picks when
`use_fast` is not given) step for step, with its roundings: the shortest edge to `size` with the longer one
`int(size * long / short)`, PIL's resize with the folder's `resample` (3, bicubic) on uint8, the centre crop at
`(H - h) // 2, (W - w) // 2`, `uint8 -> float64 * rescale_factor -> float32`, then `(x - mean) / std` in
float32. The tokenizer is the one `CLIPProcessor` loads (`AutoTokenizer`, the fast CLIP tokenizer).
"""
import dataclasses
import math
import os

import numpy as np

from tav.checkpoint import (
    CheckpointError,
    CheckpointNotFoundError,
    find_weights_file,
    load_state_dict_into,
    read_json,
    read_state_dict,
)
from tav.models.clip import ClipConfig, ClipModel

CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
# Buffers older transformers versions saved; the model builds them itself.
BUFFER_KEYS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")
# Frames per forward pass of the image tower. Every pass has this shape (the last one padded), and every prompt is
# padded to the text model's length, so GRAPH_MODE compiles each tower once; neither padding changes a result
# (frames are independent, and the text mask is causal).
IMAGE_BATCH = 8


def _size_dict(size, default_to_square):
    """transformers' get_size_dict for the forms preprocessor configs use."""
    if isinstance(size, dict):
        return dict(size)
    if isinstance(size, int):
        return {"height": size, "width": size} if default_to_square else {"shortest_edge": size}
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return {"height": size[0], "width": size[1]}
    raise ValueError(f"image size {size!r}: expected an int, (height, width) or a dict")


@dataclasses.dataclass
class ClipImageProcessor:
    """CLIPImageProcessor's settings (its field names and defaults) and its `preprocess`, for uint8 RGB images."""

    do_resize: bool = True
    size: dict = dataclasses.field(default_factory=lambda: {"shortest_edge": 224})
    resample: int = 3  # PIL.Image.Resampling.BICUBIC
    do_center_crop: bool = True
    crop_size: dict = dataclasses.field(default_factory=lambda: {"height": 224, "width": 224})
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple = (0.26862954, 0.26130258, 0.27577711)
    do_convert_rgb: bool = True

    @classmethod
    def from_dict(cls, raw):
        names = {field.name for field in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in names}
        processor = cls(**values)
        processor.size = _size_dict(processor.size, default_to_square=False)
        processor.crop_size = _size_dict(processor.crop_size, default_to_square=True)
        return processor

    @classmethod
    def from_folder(cls, folder):
        path = os.path.join(os.fspath(folder), PREPROCESSOR_FILE)
        if not os.path.isfile(path):
            raise CheckpointNotFoundError(f"no {PREPROCESSOR_FILE} in {os.fspath(folder)!r}")
        return cls.from_dict(read_json(path, "image processor config"))

    def resize_shape(self, height, width):
        """(height, width) after the resize, with transformers' rounding."""
        if "shortest_edge" in self.size:
            target = self.size["shortest_edge"]
            short, long = (width, height) if width <= height else (height, width)
            new_long = int(target * long / short)
            return (new_long, target) if width <= height else (target, new_long)
        if "height" in self.size and "width" in self.size:
            return self.size["height"], self.size["width"]
        raise ValueError(f"image processor size {self.size!r}: expected 'shortest_edge' or 'height' and 'width'")

    def resize(self, image):
        from PIL import Image

        height, width = self.resize_shape(*image.shape[:2])
        return np.array(Image.fromarray(image).resize((width, height), resample=self.resample))

    def center_crop(self, image):
        crop_h, crop_w = int(self.crop_size["height"]), int(self.crop_size["width"])
        h, w = image.shape[:2]
        top, left = (h - crop_h) // 2, (w - crop_w) // 2
        if top >= 0 and left >= 0:
            return image[top:top + crop_h, left:left + crop_w]
        # Smaller than the crop: transformers pads with zeros around the image, then crops.
        new_h, new_w = max(crop_h, h), max(crop_w, w)
        padded = np.zeros((new_h, new_w) + image.shape[2:], image.dtype)
        pad_top, pad_left = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
        padded[pad_top:pad_top + h, pad_left:pad_left + w] = image
        top, left = top + pad_top, left + pad_left
        return padded[max(0, top):min(new_h, top + crop_h), max(0, left):min(new_w, left + crop_w)]

    def preprocess_one(self, image):
        image = as_rgb_uint8(image, self.do_convert_rgb)
        if self.do_resize:
            image = self.resize(image)
        if self.do_center_crop:
            image = self.center_crop(image)
        if self.do_rescale:
            image = (image.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            image = image.astype(np.float32)
            mean = np.asarray(self.image_mean, np.float32)
            std = np.asarray(self.image_std, np.float32)
            image = (image - mean) / std
        return np.ascontiguousarray(image.transpose(2, 0, 1), np.float32)

    def __call__(self, images):
        """A sequence of images (uint8 (H, W, 3) arrays or PIL images) -> float32 (B, 3, h, w) pixel values."""
        return np.stack([self.preprocess_one(image) for image in images])


def as_rgb_uint8(image, convert_rgb=True):
    """A PIL image or a uint8 (H, W, 3) array -> uint8 (H, W, 3) array (PIL images converted to RGB first)."""
    if hasattr(image, "convert"):  # PIL
        image = image.convert("RGB") if convert_rgb else image
        image = np.array(image)
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected a uint8 RGB image (H, W, 3), got {image.dtype} {image.shape}")
    return image


def load_tokenizer(folder):
    """The tokenizer CLIPProcessor would load from `folder`: the fast CLIP tokenizer, else the slow one."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(os.fspath(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointNotFoundError(f"no CLIP tokenizer in {os.fspath(folder)!r}: {exc}") from exc


def load_clip_model(folder):
    """ClipModel from a CLIPModel folder (config.json + model.safetensors / pytorch_model.bin), in eval mode.
    Every checkpoint tensor must fit a parameter and every parameter must be in the checkpoint."""
    folder = os.fspath(folder)
    config_path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise CheckpointNotFoundError(f"no {CONFIG_FILE} in CLIP folder {folder!r}")
    raw = read_json(config_path, "CLIP config")
    if "text_config" not in raw or "vision_config" not in raw:
        raise CheckpointError(
            f"{config_path}: not a CLIPModel config (expected text_config and vision_config; "
            f"model_type is {raw.get('model_type')!r})"
        )
    model = ClipModel(ClipConfig.from_dict(raw))
    weights = find_weights_file(folder, stem="model", bin_stem="pytorch_model")
    state = {k: v for k, v in read_state_dict(weights).items() if k not in BUFFER_KEYS}
    load_state_dict_into(model, state, strict=True, source=weights)
    model.set_train(False)
    return model


def l2_normalise(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class Clip:
    """A CLIP model with its tokenizer and image processor; embeddings come back as float64 numpy, unit length."""

    def __init__(self, model, tokenizer, image_processor, name=""):
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.name = name

    @classmethod
    def from_folder(cls, model_folder, processor_folder=None):
        """Weights from `model_folder`; tokenizer and preprocessing from `processor_folder` (default: the same)."""
        processor_folder = model_folder if processor_folder is None else processor_folder
        return cls(
            load_clip_model(model_folder),
            load_tokenizer(processor_folder),
            ClipImageProcessor.from_folder(processor_folder),
            name=os.fspath(model_folder),
        )

    @property
    def logit_scale(self):
        """exp(logit_scale), the model's own temperature."""
        return self.model.scale()

    def pixel_values(self, images):
        return self.image_processor(images)

    def image_embeddings(self, images):
        """(F, D) unit image embeddings of a sequence of images."""
        pixels = self.pixel_values(images)
        chunks = []
        for start in range(0, len(pixels), IMAGE_BATCH):
            chunk = pixels[start:start + IMAGE_BATCH]
            padded = np.concatenate([chunk, np.zeros((IMAGE_BATCH - len(chunk),) + chunk.shape[1:], chunk.dtype)])
            chunks.append(self.model.get_image_features(padded).asnumpy()[:len(chunk)])
        return l2_normalise(np.concatenate(chunks))

    def token_ids(self, prompt, pad=False):
        """(1, N) ids of one prompt, truncated to the text model's positions (77 for the published models), and
        with `pad` padded to that length."""
        max_length = self.model.config.text.max_position_embeddings
        padding = "max_length" if pad else False
        return np.asarray(self.tokenizer([prompt], truncation=True, max_length=max_length, padding=padding,
                                         return_tensors="np").input_ids)

    def text_embeddings(self, prompts):
        """(P, D) unit text embeddings, one prompt per pass."""
        rows = [self.model.get_text_features(self.token_ids(prompt, pad=True)).asnumpy() for prompt in prompts]
        return l2_normalise(np.concatenate(rows))
