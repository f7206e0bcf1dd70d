"""Attention layers of the inflated UNet: sparse-causal self-attention (attn1), cross-attention to the text
(attn2), temporal attention over frames (attn_temp), and the transformer block/model that holds them.

Token layouts follow the official model (reference 1.1): spatial tokens are ((b f), h*w, c) with frames folded
batch-major/frame-minor; the temporal attention sees ((b h*w), f, c).
"""
import mindspore as ms
from mindspore import nn, ops

from tav import backend
from tav.kernels import AttentionKernel
from tav.kernels.native_ops import SparseCausalContextFunction
from tav.nn import NORMS_LIBRARY, Conv2d, Dropout, GatedGELU, GroupNorm, LayerNorm, Linear, SwapMiddleAxes, gelu


class Attention(nn.Cell):
    """diffusers' CrossAttention: to_q/to_k/to_v without bias (by default), to_out = [Linear + bias, Dropout].

    Self-attention when `context` is None; `heads` heads of width `dim_head`, scale dim_head^-0.5.
    """

    def __init__(self, query_dim, cross_attention_dim=None, heads=8, dim_head=64, bias=False,
                 upcast_attention=False, dropout=0.0, attention_backend="auto"):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = cross_attention_dim if cross_attention_dim is not None else query_dim
        self.heads = heads
        self.dim_head = dim_head
        self.upcast_attention = upcast_attention
        # The softmax attention itself (no parameters). Its `attention_backend` is what set_attention_backend sets.
        self.kernel = AttentionKernel(heads, attention_backend, upcast_attention)
        self.to_q = Linear(query_dim, inner_dim, bias=bias)
        self.to_k = Linear(context_dim, inner_dim, bias=bias)
        self.to_v = Linear(context_dim, inner_dim, bias=bias)
        self.to_out = nn.CellList([Linear(inner_dim, query_dim), Dropout(dropout)])

    def attend(self, q, k, v):
        out = self.kernel(q, k, v)
        return self.to_out[1](self.to_out[0](out))

    def construct(self, x, context=None):
        if context is None:
            context = x
        return self.attend(self.to_q(x), self.to_k(context), self.to_v(context))


def sparse_causal_context(tokens, video_length):
    """((b f), d, c) -> ((b f), 2d, c): for frame i, the tokens of frame 0 followed by those of frame max(i-1, 0).

    Built from two slices instead of an index gather: [0]*f is a broadcast of frame 0 and [0, 0, 1, ..., f-2]
    is frame 0 followed by frames 0..f-2 (reference 1.10).
    """
    bf, d, c = tokens.shape
    frames = tokens.reshape(bf // video_length, video_length, d, c)
    first = frames[:, 0:1]
    first_repeated = ops.broadcast_to(first, frames.shape)
    if video_length > 1:
        previous = ops.cat([first, frames[:, : video_length - 1]], 1)
    else:
        previous = first
    return ops.cat([first_repeated, previous], 2).reshape(bf, 2 * d, c)


class SparseCausalContext(nn.Cell):
    """sparse_causal_context as a layer: on CPU one compiled copy (and one in the backward) in place of the two
    slices, broadcast and two concatenations, whose MindSpore CPU kernels keep their workspace for the graph's
    life (kernels/cpu/norms.cc)."""

    def __init__(self):
        super().__init__()
        self.native = SparseCausalContextFunction() if backend.use_native_kernel(NORMS_LIBRARY) else None

    def construct(self, tokens, video_length):
        if self.native is not None and tokens.dtype == ms.float32:
            return self.native(tokens, ms.Tensor([video_length], ms.float32))
        return sparse_causal_context(tokens, video_length)


class SparseCausalAttention(Attention):
    """attn1: each frame's queries attend to the keys/values of frame 0 and of the previous frame."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.context = SparseCausalContext()

    def construct(self, x, video_length):
        q = self.to_q(x)
        k = self.context(self.to_k(x), video_length)
        v = self.context(self.to_v(x), video_length)
        return self.attend(q, k, v)


class GEGLU(nn.Cell):
    """proj to 2*inner, split into (hidden, gate), hidden * gelu(gate) with exact GELU."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = Linear(dim_in, dim_out * 2)
        self.gated_gelu = GatedGELU()

    def construct(self, x):
        return self.gated_gelu(self.proj(x))


class GELUProjection(nn.Cell):
    """activation_fn "gelu": Linear then exact GELU (diffusers' GELU module, key `proj`)."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = Linear(dim_in, dim_out)

    def construct(self, x):
        return gelu(self.proj(x))


FEED_FORWARD_ACTIVATIONS = {"geglu": GEGLU, "gelu": GELUProjection}


class FeedForward(nn.Cell):
    """net.0 (GEGLU), net.1 (Dropout), net.2 (Linear inner -> dim); inner = mult * dim."""

    def __init__(self, dim, mult=4, dropout=0.0, activation_fn="geglu"):
        super().__init__()
        if activation_fn not in FEED_FORWARD_ACTIVATIONS:
            raise ValueError(f"activation_fn {activation_fn!r} is not supported; use one of {sorted(FEED_FORWARD_ACTIVATIONS)}")
        inner = dim * mult
        self.net = nn.CellList([FEED_FORWARD_ACTIVATIONS[activation_fn](dim, inner), Dropout(dropout), Linear(inner, dim)])

    def construct(self, x):
        return self.net[2](self.net[1](self.net[0](x)))


class BasicTransformerBlock(nn.Cell):
    """Sparse-causal self-attention, cross-attention, feed-forward, then temporal attention; pre-norm, residuals."""

    def __init__(self, dim, num_attention_heads, attention_head_dim, cross_attention_dim=None,
                 activation_fn="geglu", attention_bias=False, only_cross_attention=False,
                 upcast_attention=False, attention_backend="auto"):
        super().__init__()
        self.only_cross_attention = only_cross_attention
        common = dict(heads=num_attention_heads, dim_head=attention_head_dim, bias=attention_bias,
                      upcast_attention=upcast_attention, attention_backend=attention_backend)
        if only_cross_attention:
            # The official attn1 then attends to the text; its frame gather only duplicates identical text
            # keys, which leaves softmax attention unchanged, so plain cross-attention is the same function.
            self.attn1 = Attention(dim, cross_attention_dim=cross_attention_dim, **common)
        else:
            self.attn1 = SparseCausalAttention(dim, **common)
        self.norm1 = LayerNorm(dim)
        self.has_cross_attention = cross_attention_dim is not None
        if self.has_cross_attention:
            self.attn2 = Attention(dim, cross_attention_dim=cross_attention_dim, **common)
            self.norm2 = LayerNorm(dim)
        self.ff = FeedForward(dim, activation_fn=activation_fn)
        self.norm3 = LayerNorm(dim)
        self.attn_temp = Attention(dim, **common)
        # Zero output weight (not bias) as the official model: the new layer starts close to an identity.
        out_weight = self.attn_temp.to_out[0].weight
        out_weight.set_data(ops.zeros(out_weight.shape, out_weight.dtype))
        self.norm_temp = LayerNorm(dim)
        self.swap = SwapMiddleAxes()

    def construct(self, x, encoder_hidden_states, video_length):
        if self.only_cross_attention:
            x = self.attn1(self.norm1(x), encoder_hidden_states) + x
        else:
            x = self.attn1(self.norm1(x), video_length) + x
        if self.has_cross_attention:
            x = self.attn2(self.norm2(x), encoder_hidden_states) + x
        x = self.ff(self.norm3(x)) + x
        # Temporal attention: every spatial position becomes a sequence over the frames.
        bf, d, c = x.shape
        b = bf // video_length
        temporal = self.swap(x.reshape(b, video_length, d, c)).reshape(b * d, video_length, c)
        temporal = self.attn_temp(self.norm_temp(temporal)) + temporal
        return self.swap(temporal.reshape(b, d, video_length, c)).reshape(bf, d, c)


class Transformer3DModel(nn.Cell):
    """Per-frame GroupNorm (eps 1e-6), proj_in, one BasicTransformerBlock, proj_out, residual; on ((B F), C, H, W)."""

    def __init__(self, num_attention_heads, attention_head_dim, in_channels, cross_attention_dim=None,
                 norm_num_groups=32, use_linear_projection=False, only_cross_attention=False,
                 upcast_attention=False, attention_bias=False, activation_fn="geglu", attention_backend="auto"):
        super().__init__()
        inner_dim = num_attention_heads * attention_head_dim
        self.use_linear_projection = use_linear_projection
        self.norm = GroupNorm(norm_num_groups, in_channels, eps=1e-6)
        if use_linear_projection:
            self.proj_in = Linear(in_channels, inner_dim)
            self.proj_out = Linear(inner_dim, in_channels)
        else:
            self.proj_in = Conv2d(in_channels, inner_dim, 1)
            self.proj_out = Conv2d(inner_dim, in_channels, 1)
        self.transformer_blocks = nn.CellList([
            BasicTransformerBlock(inner_dim, num_attention_heads, attention_head_dim, cross_attention_dim,
                                  activation_fn=activation_fn, attention_bias=attention_bias,
                                  only_cross_attention=only_cross_attention, upcast_attention=upcast_attention,
                                  attention_backend=attention_backend)
        ])
        self.swap = SwapMiddleAxes()

    def construct(self, x, encoder_hidden_states, frames):
        """x: ((B F), C, H, W), frames folded batch-major; encoder_hidden_states: (B, L, D), one per video."""
        bf, c, h, w = x.shape
        b = bf // frames
        # Each video's text repeated for its frames, consecutively, matching the (b f) order.
        context = ops.broadcast_to(encoder_hidden_states[:, None], (b, frames) + encoder_hidden_states.shape[1:])
        context = context.reshape((bf,) + encoder_hidden_states.shape[1:])
        hidden = self.norm(x)  # per frame: the official norm runs after folding the frames (reference 1.8)
        if self.use_linear_projection:
            hidden = self.proj_in(self.to_tokens(hidden))
        else:
            hidden = self.to_tokens(self.proj_in(hidden))
        for block in self.transformer_blocks:
            hidden = block(hidden, context, frames)
        if self.use_linear_projection:
            hidden = self.to_planes(self.proj_out(hidden), h, w)
        else:
            hidden = self.proj_out(self.to_planes(hidden, h, w))
        return hidden + x

    def to_tokens(self, planes):
        """(N, C, H, W) -> (N, H*W, C)."""
        n, c, h, w = planes.shape
        return self.swap(planes.reshape(n, c, h * w, 1)).reshape(n, h * w, c)

    def to_planes(self, tokens, h, w):
        """(N, H*W, C) -> (N, C, H, W)."""
        n, _, c = tokens.shape
        return self.swap(tokens.reshape(n, h * w, c, 1)).reshape(n, c, h, w)
