"""Attention layers of the inflated UNet: sparse-causal self-attention (attn1), cross-attention to the text
(attn2), temporal attention over frames (attn_temp), and the transformer block/model that holds them.

Which frames attn1 attends to is the frame policy, stated once (sparse_causal_frame_table) and used by every
path. Token layouts follow the official model: spatial tokens are ((b f), h*w, c) with frames folded
batch-major/frame-minor; the temporal attention sees ((b h*w), f, c).
"""
import numpy as np

import mindspore as ms
from mindspore import nn, ops

from tav.kernels import AttentionKernel
from tav.kernels.cpu import layout, use_native_kernel
from tav.nn import Conv2d, Dropout, GatedGELU, GroupNorm, LayerNorm, Linear, SwapMiddleAxes, gelu


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


def sparse_causal_frame_table(video_length):
    """Tune-A-Video's frame policy: for every frame i the frames its attn1 keys/values come from, an int32 table
    (video_length, 2) = [[0, max(i-1, 0)] for each i]. Frame 0 attends to frame 0 twice, as the official code
    does (`former_frame_index = arange(f) - 1; former_frame_index[0] = 0`, then k[:, [0] * f] beside
    k[:, former_frame_index]). The one statement of the policy: every path (portable ops, the CPU kernel, forward
    and backward) gathers by this table."""
    frames = np.arange(video_length)
    return np.stack([np.zeros_like(frames), np.maximum(frames - 1, 0)], axis=1).astype(np.int32)


def full_frame_table(video_length):
    """Every frame's attn1 attends to every frame of the video (the paper's "full attention" ablation): an int32
    table (video_length, video_length); its cost grows with the square of the frames."""
    return np.tile(np.arange(video_length, dtype=np.int32), (video_length, 1))


# The policy every SparseCausalAttention uses unless given another (set_frame_policy changes a built model's).
DEFAULT_FRAME_POLICY = sparse_causal_frame_table
# The policies a training config may name (its frame_policy key; the delta records it for loading).
FRAME_POLICIES = {"sparse_causal": sparse_causal_frame_table, "full": full_frame_table}


def checked_frame_table(policy, video_length):
    """policy(video_length) as an int32 (video_length, S) array, S >= 1, every entry a frame of the video."""
    table = np.asarray(policy(video_length))
    if table.ndim != 2 or table.shape[0] != video_length or table.shape[1] < 1:
        raise ValueError(f"frame policy {getattr(policy, '__name__', policy)!r} returned shape {table.shape} for "
                         f"{video_length} frames; expected ({video_length}, S) with S >= 1")
    if table.size and (table.min() < 0 or table.max() >= video_length):
        raise ValueError(f"frame policy {getattr(policy, '__name__', policy)!r} names frames outside "
                         f"0..{video_length - 1}: {table.tolist()}")
    return table.astype(np.int32)


def gather_frames(tokens, video_length, table):
    """((b f), d, c) -> ((b f), S d, c): for frame i the tokens of frames table[i, 0..S-1] of the same video,
    side by side; table an int32 Tensor (f, S). The portable path (MindSpore ops) of layout.FrameGatherFunction."""
    bf, d, c = tokens.shape
    sources = table.shape[1]
    frames = tokens.reshape(bf // video_length, video_length, d, c)
    gathered = ops.gather(frames, table.reshape(-1), 1)
    return gathered.reshape(bf, sources * d, c)


def sparse_causal_context(tokens, video_length, frame_policy=None):
    """((b f), d, c) -> ((b f), S d, c) by the frame policy (default sparse_causal_frame_table: S = 2, frame 0
    then frame max(i-1, 0))."""
    policy = DEFAULT_FRAME_POLICY if frame_policy is None else frame_policy
    table = ms.Tensor(checked_frame_table(policy, video_length), ms.int32)
    return gather_frames(tokens, video_length, table)


def _table_constant(policy):
    """A compile-time constant maker for `policy`'s table: graph mode cannot run numpy, so the table is made in
    Python when the graph compiles (once per video length) and enters the graph as a constant."""

    @ops.constexpr
    def frame_table(video_length):
        return ms.Tensor(checked_frame_table(policy, video_length), ms.int32)

    return frame_table


class SparseCausalContext(nn.Cell):
    """The keys/values a frame attends to, gathered by the frame policy: on CPU one compiled copy (and one in
    the backward, kernels/cpu/layout.cc) in place of MindSpore's gather, whose CPU kernels keep their workspace
    for the graph's life; elsewhere gather_frames."""

    def __init__(self, frame_policy=None):
        super().__init__()
        self.native = layout.FrameGatherFunction() if use_native_kernel(layout.LIBRARY) else None
        self.set_policy(DEFAULT_FRAME_POLICY if frame_policy is None else frame_policy)

    def set_policy(self, frame_policy):
        """Change the frame policy (a function video_length -> (F, S) table); before compiling."""
        self.frame_policy = frame_policy
        self.frame_table = _table_constant(frame_policy)

    def construct(self, tokens, video_length):
        table = self.frame_table(video_length)
        if self.native is not None and tokens.dtype == ms.float32:
            return self.native(tokens, table)
        return gather_frames(tokens, video_length, table)


class SparseCausalAttention(Attention):
    """attn1: each frame's queries attend to the keys/values of the frames its frame policy names (by default
    frame 0 and the previous frame, sparse_causal_frame_table)."""

    def __init__(self, *args, frame_policy=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.context = SparseCausalContext(frame_policy)

    def construct(self, x, video_length):
        q = self.to_q(x)
        k = self.context(self.to_k(x), video_length)
        v = self.context(self.to_v(x), video_length)
        return self.attend(q, k, v)


def set_frame_policy(network, frame_policy):
    """Make every sparse-causal attention in `network` use `frame_policy` (video_length -> (F, S) int32 table of
    source frames); before the network compiles. Returns the number of layers changed."""
    changed = 0
    for _, cell in network.cells_and_names():
        if isinstance(cell, SparseCausalContext):
            cell.set_policy(frame_policy)
            changed += 1
    return changed


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
        hidden = self.norm(x)  # per frame: the official norm runs after folding the frames (docs/reference.md: per-frame norms)
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
