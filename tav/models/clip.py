"""CLIP (Radford et al. 2021) as transformers' `CLIPModel` lays it out: a ViT image tower and a causal text
transformer, each pooled to one vector and projected into a shared space, and a learned `logit_scale`.

Built from tav.nn only, so it runs wherever the UNet runs. Parameter names are the checkpoint's
(`vision_model.encoder.layers.0.self_attn.q_proj.weight`, `logit_scale`, ...), so a published folder loads
name for name. The configs take the field names of the folder's `config.json` (`text_config`, `vision_config`).

Inputs that decide shapes or indices (the causal mask, which token pools the text) are made on the host and
passed in, so the Cells' graphs hold no data-dependent indexing.
"""
import dataclasses
import math

import numpy as np

import mindspore as ms
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import Normal, initializer

from tav import nn as tnn

# Large enough to zero a softmax weight, finite so that adding it to a score never makes NaN.
MASK_VALUE = float(np.finfo(np.float32).min)
# transformers' CLIPTextModel: a config whose eos_token_id is 2 predates the fix that made it the real
# <|endoftext|> id; for those the pooled token is the one with the highest id (which is <|endoftext|>).
LEGACY_EOS_TOKEN_ID = 2


@dataclasses.dataclass
class ClipTextConfig:
    """transformers' CLIPTextConfig fields that shape the model, with its defaults."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407


@dataclasses.dataclass
class ClipVisionConfig:
    """transformers' CLIPVisionConfig fields that shape the model, with its defaults."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


@dataclasses.dataclass
class ClipConfig:
    text: ClipTextConfig
    vision: ClipVisionConfig
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592

    @classmethod
    def from_dict(cls, raw):
        """From a `CLIPModel` config.json's contents: keys the model does not use are ignored, missing ones take
        transformers' defaults."""

        def pick(section_cls, section):
            names = {field.name for field in dataclasses.fields(section_cls)}
            return section_cls(**{k: v for k, v in (section or {}).items() if k in names})

        # Older published configs (openai/clip-vit-large-patch14's among them) also carry `text_config_dict` /
        # `vision_config_dict`; transformers then builds each tower from that dict and the defaults alone.
        text = raw.get("text_config_dict") or raw.get("text_config")
        vision = raw.get("vision_config_dict") or raw.get("vision_config")
        return cls(
            text=pick(ClipTextConfig, text),
            vision=pick(ClipVisionConfig, vision),
            projection_dim=raw.get("projection_dim", 512),
            logit_scale_init_value=raw.get("logit_scale_init_value", 2.6592),
        )


def quick_gelu(x):
    """OpenAI CLIP's activation: x * sigmoid(1.702 x)."""
    return x * ops.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": tnn.gelu}


def activation(name):
    if name not in ACTIVATIONS:
        raise ValueError(f"CLIP hidden_act {name!r} is not supported; expected one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class Embedding(nn.Cell):
    """A lookup table with PyTorch's name (`weight`, shape (num, dim))."""

    def __init__(self, num_embeddings, embedding_dim, dtype=ms.float32):
        super().__init__()
        self.weight = Parameter(initializer(Normal(1.0), (num_embeddings, embedding_dim), dtype))

    def construct(self, ids):
        return ops.gather(self.weight, ids, 0)


class ClipAttention(nn.Cell):
    """Multi-head self-attention over all tokens, plus an additive mask when one is given (the text's causal
    mask)."""

    def __init__(self, hidden_size, num_heads):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"CLIP hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.scale = self.head_dim ** -0.5
        self.q_proj = tnn.Linear(hidden_size, hidden_size)
        self.k_proj = tnn.Linear(hidden_size, hidden_size)
        self.v_proj = tnn.Linear(hidden_size, hidden_size)
        self.out_proj = tnn.Linear(hidden_size, hidden_size)

    def heads(self, x):
        b, n, _ = x.shape
        return x.reshape(b, n, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)

    def construct(self, x, mask=None):
        b, n, c = x.shape
        q, k, v = self.heads(self.q_proj(x)), self.heads(self.k_proj(x)), self.heads(self.v_proj(x))
        scores = ops.matmul(q, k.transpose(0, 1, 3, 2)) * self.scale
        if mask is not None:
            scores = scores + mask
        weights = ops.softmax(scores, -1)
        out = ops.matmul(weights, v).transpose(0, 2, 1, 3).reshape(b, n, c)
        return self.out_proj(out)


class ClipMLP(nn.Cell):
    def __init__(self, hidden_size, intermediate_size, hidden_act):
        super().__init__()
        self.fc1 = tnn.Linear(hidden_size, intermediate_size)
        self.fc2 = tnn.Linear(intermediate_size, hidden_size)
        self.act = activation(hidden_act)

    def construct(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ClipEncoderLayer(nn.Cell):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config):
        super().__init__()
        self.self_attn = ClipAttention(config.hidden_size, config.num_attention_heads)
        self.layer_norm1 = tnn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = ClipMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.layer_norm2 = tnn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def construct(self, x, mask=None):
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class ClipEncoder(nn.Cell):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.CellList([ClipEncoderLayer(config) for _ in range(config.num_hidden_layers)])

    def construct(self, x, mask=None):
        for layer in self.layers:
            x = layer(x, mask)
        return x


class ClipVisionEmbeddings(nn.Cell):
    """[class token; patches] + learned positions. Images must be image_size square (no interpolation)."""

    def __init__(self, config):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.class_embedding = Parameter(initializer(Normal(1.0), (config.hidden_size,), ms.float32))
        self.patch_embedding = tnn.Conv2d(
            config.num_channels, config.hidden_size, config.patch_size, stride=config.patch_size, bias=False
        )
        num_positions = (config.image_size // config.patch_size) ** 2 + 1
        self.position_embedding = Embedding(num_positions, config.hidden_size)
        self.position_ids = ms.Tensor(np.arange(num_positions)[None], ms.int32)

    def construct(self, pixel_values):
        b = pixel_values.shape[0]
        patches = self.patch_embedding(pixel_values).reshape(b, self.hidden_size, -1).transpose(0, 2, 1)
        cls = ops.broadcast_to(self.class_embedding.reshape(1, 1, -1), (b, 1, self.hidden_size))
        return ops.concat((cls, patches), 1) + self.position_embedding(self.position_ids)


class ClipVisionTransformer(nn.Cell):
    def __init__(self, config):
        super().__init__()
        self.embeddings = ClipVisionEmbeddings(config)
        self.pre_layrnorm = tnn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # sic: the checkpoint's name
        self.encoder = ClipEncoder(config)
        self.post_layernorm = tnn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def construct(self, pixel_values):
        x = self.encoder(self.pre_layrnorm(self.embeddings(pixel_values)))
        return self.post_layernorm(x[:, 0])


class ClipTextEmbeddings(nn.Cell):
    def __init__(self, config):
        super().__init__()
        self.token_embedding = Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = Embedding(config.max_position_embeddings, config.hidden_size)

    def construct(self, input_ids, position_ids):
        return self.token_embedding(input_ids) + self.position_embedding(position_ids)


class ClipTextTransformer(nn.Cell):
    """Causal transformer over the tokens; the pooled vector is the final-norm state at each row's
    <|endoftext|> (given as flat indices into the (B*N) token rows, see `text_pooling_indices`)."""

    def __init__(self, config):
        super().__init__()
        self.embeddings = ClipTextEmbeddings(config)
        self.encoder = ClipEncoder(config)
        self.final_layer_norm = tnn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def construct(self, input_ids, position_ids, causal_mask, pooled_rows):
        x = self.final_layer_norm(self.encoder(self.embeddings(input_ids, position_ids), causal_mask))
        return ops.gather(x.reshape(-1, x.shape[-1]), pooled_rows, 0)


def causal_mask(n):
    """(1, 1, n, n) additive mask: 0 on and below the diagonal, MASK_VALUE above (token i sees tokens <= i)."""
    return np.triu(np.full((n, n), MASK_VALUE, np.float32), 1)[None, None]


def text_pooling_indices(input_ids, eos_token_id):
    """Flat row index (b * N + position) of the token each sequence pools, as transformers chooses it: the
    first `eos_token_id`, or for legacy configs (eos_token_id 2) the highest token id."""
    ids = np.asarray(input_ids)
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        positions = ids.argmax(-1)
    else:
        hits = ids == eos_token_id
        if not hits.any(-1).all():
            raise ValueError(f"every token sequence must contain the end-of-text id {eos_token_id}")
        positions = hits.argmax(-1)
    return (np.arange(ids.shape[0]) * ids.shape[1] + positions).astype(np.int32)


class ClipModel(nn.Cell):
    """The two towers, their bias-free projections and `logit_scale` (a log temperature; logits use its exp)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.text_model = ClipTextTransformer(config.text)
        self.vision_model = ClipVisionTransformer(config.vision)
        self.visual_projection = tnn.Linear(config.vision.hidden_size, config.projection_dim, bias=False)
        self.text_projection = tnn.Linear(config.text.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = Parameter(ms.Tensor(np.float32(config.logit_scale_init_value)))

    def image_features(self, pixel_values):
        """(B, 3, S, S) float32 normalised pixels -> (B, projection_dim) unnormalised embeddings."""
        return self.visual_projection(self.vision_model(pixel_values))

    def text_features(self, input_ids, position_ids, causal_mask, pooled_rows):
        return self.text_projection(self.text_model(input_ids, position_ids, causal_mask, pooled_rows))

    def construct(self, pixel_values=None, input_ids=None, position_ids=None, causal_mask=None, pooled_rows=None):
        """One tower per call: image features of `pixel_values`, or text features when `input_ids` is given. In
        GRAPH_MODE the None inputs are constants, so each tower compiles to its own graph."""
        if input_ids is None:
            return self.image_features(pixel_values)
        return self.text_features(input_ids, position_ids, causal_mask, pooled_rows)

    def get_image_features(self, pixel_values):
        """numpy or Tensor (B, 3, S, S) -> Tensor (B, projection_dim), as transformers' get_image_features."""
        return self(ms.Tensor(np.asarray(pixel_values, np.float32)))

    def get_text_features(self, input_ids):
        """(B, N) token ids (each row holding its end-of-text token; padding after it does not change the result,
        the mask being causal) -> Tensor (B, projection_dim), as transformers' get_text_features."""
        ids = np.asarray(input_ids, np.int64)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, tokens), got shape {ids.shape}")
        n = ids.shape[1]
        if n > self.config.text.max_position_embeddings:
            raise ValueError(
                f"{n} tokens exceed the text model's {self.config.text.max_position_embeddings} positions"
            )
        return self(
            None,
            ms.Tensor(ids.astype(np.int32)),
            ms.Tensor(np.arange(n, dtype=np.int32)[None]),
            ms.Tensor(causal_mask(n)),
            ms.Tensor(text_pooling_indices(ids, self.config.text.eos_token_id)),
        )

    def scale(self):
        """exp(logit_scale) as a Python float: the factor of logits_per_image."""
        return float(math.exp(float(self.logit_scale.asnumpy())))
