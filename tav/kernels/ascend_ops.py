"""The Ascend device ops tav calls, each behind one function, and their CPU emulation (TAV_EMULATE_ASCEND).

On an Ascend device (or a GPU for the mint ops that have GPU kernels) these are the `mindspore.mint` ops and
`ops.flash_attention_score` themselves. Under the emulation (tav.backend.emulated_soc(): tav builds for Ascend while
MindSpore runs on the CPU), an op that has no CPU kernel in MindSpore 2.10 is replaced here, and only here, by a CPU
implementation of its documented semantics, and it refuses what the real op refuses with the same kind of error:

    op                       CPU kernel?            emulated by
    mint conv2d              no (Conv2DExt)         ops.conv2d + bias_add
    mint layer_norm          no (LayerNormExt)      mean / variance over the normalised axes (fp32)
    mint pad                 no in PyNative         ops.pad (constant)
    flash_attention_score    no                     flash_attention_score_emulated: softmax in fp32, the
                                                    primitive's four outputs, its dtype/shape/SoC refusals
    mint linear, group_norm, interpolate: CPU kernels exist and run as they are.

What it proves: the Ascend branches of tav's own code (layer flavours, the FlashAttention call with its layout,
scale, casts and padding, fp16 amp with loss scaling and the compiled update, SoC-dependent choices) build and run,
in graph and PyNative mode. It does not prove the NPU kernels themselves.

The choice between the real op and its emulation is a compile-time constant (ops.constexpr), so a graph compiled
for the real device never contains the emulation and vice versa.
"""
import mindspore as ms
from mindspore import mint, ops

from tav import backend

# FlashAttentionScore's documented limits (MindSpore 2.10's FlashAttentionScore docstring): B 1..2k, S1/S2 1..512k,
# N1 1..256, D at most 512, query/key/value float16 or bfloat16, Atlas A2 (910B) / A3 chips.
FLASH_DTYPES = (ms.float16, ms.bfloat16)
FLASH_MAX_BATCH = 2 * 1024
FLASH_MAX_SEQ_LEN = 512 * 1024
FLASH_MAX_HEADS = 256
FLASH_MAX_HEAD_DIM = 512
FLASH_LAYOUTS = ("BSH", "BNSD")  # the emulation's layouts; the real op also has SBH, BSND, TND (tav uses BSH)
_MASKED = -1e30  # a discarded score: exp() of it minus the row max is 0 in fp32


@ops.constexpr
def _emulating():
    return backend.emulated_soc() is not None


def emulating():
    """Whether the device ops below run as their CPU emulation (outside graphs too)."""
    return backend.emulated_soc() is not None


def conv2d(x, weight, bias, stride, padding):
    if _emulating():
        if padding > 0:
            y = ops.conv2d(x, weight, None, stride, "pad", padding)
        else:
            y = ops.conv2d(x, weight, None, stride, "valid", 0)
        return y if bias is None else ops.bias_add(y, bias)
    return mint.nn.functional.conv2d(x, weight, bias, stride, padding)


def linear(x, weight, bias):
    return mint.nn.functional.linear(x, weight, bias)


def group_norm(x, num_groups, weight, bias, eps):
    return mint.nn.functional.group_norm(x, num_groups, weight, bias, eps)


def layer_norm(x, normalized_shape, weight, bias, eps):
    if _emulating():
        axes = tuple(range(-len(normalized_shape), 0))
        mean = x.mean(axis=axes, keep_dims=True)
        centred = x - mean
        variance = (centred * centred).mean(axis=axes, keep_dims=True)
        y = centred * ops.rsqrt(variance + eps)
        return y * weight + bias
    return mint.nn.functional.layer_norm(x, normalized_shape, weight, bias, eps)


def interpolate_nearest(x, size):
    return mint.nn.functional.interpolate(x, size=size, mode="nearest")


def pad(x, padding):
    if _emulating():
        return ops.pad(x, padding)
    return mint.nn.functional.pad(x, padding)


def flash_attention_score(query, key, value, head_num, keep_prob=1.0, scalar_value=1.0, input_layout="BSH",
                          sparse_mode=0, attn_mask=None):
    """ops.flash_attention_score's call as tav makes it (its attention_out), real or emulated."""
    if _emulating():
        return flash_attention_score_emulated(query, key, value, head_num, attn_mask=attn_mask, keep_prob=keep_prob,
                                              scale_value=scalar_value, input_layout=input_layout,
                                              sparse_mode=sparse_mode)[3]
    return ops.flash_attention_score(query, key, value, head_num, attn_mask=attn_mask, keep_prob=keep_prob,
                                     scalar_value=scalar_value, input_layout=input_layout, sparse_mode=sparse_mode)


class FlashAttentionUnsupported(RuntimeError):
    """The emulated FlashAttentionScore has no kernel for this SoC (as kernel selection fails on a 910A)."""


def flash_refusal(soc, dtype, q_shape, k_shape, head_num, input_layout, keep_prob, sparse_mode, has_mask,
                  pre_tokens=2147483647, next_tokens=2147483647):
    """(exception class, message) for what FlashAttentionScore refuses, or None. Plain Python (testable)."""
    if not backend.soc_has_flash_attention(soc):
        return (FlashAttentionUnsupported,
                f"FlashAttentionScore: no kernel on {soc}; the op exists on Atlas A2 (Ascend910B) and A3 only")
    if dtype not in FLASH_DTYPES:
        return TypeError, f"FlashAttentionScore: query/key/value must be float16 or bfloat16, got {dtype}"
    if input_layout not in FLASH_LAYOUTS:
        return (NotImplementedError, f"FlashAttentionScore emulation: input_layout {input_layout!r} (the emulation "
                                     f"covers {', '.join(FLASH_LAYOUTS)})")
    if len(q_shape) != len(input_layout) or len(k_shape) != len(input_layout):
        return ValueError, f"FlashAttentionScore: {input_layout} inputs are {len(input_layout)}-D, got {q_shape}, {k_shape}"
    if input_layout == "BSH":
        batch, s1, h1 = q_shape
        s2, h2 = k_shape[1], k_shape[2]
        if h1 % head_num:
            return ValueError, f"FlashAttentionScore: head_num {head_num} does not divide H1={h1}"
        head_dim = h1 // head_num
        if h2 % head_dim:
            return ValueError, f"FlashAttentionScore: H2={h2} is not a multiple of the head dim {head_dim}"
        kv_heads = h2 // head_dim
    else:
        batch, n1, s1, head_dim = q_shape
        kv_heads, s2 = k_shape[1], k_shape[2]
        if n1 != head_num:
            return ValueError, f"FlashAttentionScore: BNSD query has {n1} heads, head_num is {head_num}"
        if k_shape[3] != head_dim:
            return ValueError, f"FlashAttentionScore: key head dim {k_shape[3]} differs from the query's {head_dim}"
    if k_shape[0] != batch:
        return ValueError, f"FlashAttentionScore: key batch {k_shape[0]} differs from the query's {batch}"
    if not 1 <= batch <= FLASH_MAX_BATCH:
        return ValueError, f"FlashAttentionScore: B={batch} outside 1..{FLASH_MAX_BATCH}"
    if not (1 <= s1 <= FLASH_MAX_SEQ_LEN and 1 <= s2 <= FLASH_MAX_SEQ_LEN):
        return ValueError, f"FlashAttentionScore: S1={s1}, S2={s2} outside 1..{FLASH_MAX_SEQ_LEN}"
    if not 1 <= head_num <= FLASH_MAX_HEADS:
        return ValueError, f"FlashAttentionScore: N1={head_num} outside 1..{FLASH_MAX_HEADS}"
    if kv_heads < 1 or head_num % kv_heads:
        return ValueError, f"FlashAttentionScore: N2={kv_heads} must divide N1={head_num}"
    if not 1 <= head_dim <= FLASH_MAX_HEAD_DIM:
        return ValueError, f"FlashAttentionScore: D={head_dim} outside 1..{FLASH_MAX_HEAD_DIM}"
    if not 0.0 < keep_prob <= 1.0:
        return ValueError, f"FlashAttentionScore: keep_prob {keep_prob} outside (0, 1]"
    if keep_prob != 1.0:
        return NotImplementedError, "FlashAttentionScore emulation: dropout (keep_prob < 1) is not emulated"
    if sparse_mode not in (0, 1, 2, 3):
        return NotImplementedError, f"FlashAttentionScore emulation: sparse_mode {sparse_mode} (covers 0-3)"
    if sparse_mode in (1, 2, 3) and not has_mask:
        return ValueError, f"FlashAttentionScore: sparse_mode {sparse_mode} needs attn_mask"
    if sparse_mode == 0 and (pre_tokens < 0 and next_tokens < 0):
        return ValueError, "FlashAttentionScore: pre_tokens and next_tokens cannot both be negative"
    return None


@ops.constexpr
def _check_flash(dtype, q_shape, k_shape, head_num, input_layout, keep_prob, sparse_mode, has_mask):
    refusal = flash_refusal(backend.ascend_soc(), dtype, tuple(q_shape), tuple(k_shape), head_num, input_layout,
                            keep_prob, sparse_mode, has_mask)
    if refusal is not None:
        error, message = refusal
        raise error(message)
    return True


@ops.constexpr
def _causal_mask(s1, s2, right_down):
    """The discard mask (True = discard) of sparse_mode 2 (left-up causal) or 3 (right-down causal)."""
    import numpy as np

    rows = np.arange(s1)[:, None]
    cols = np.arange(s2)[None, :]
    offset = (s2 - s1) if right_down else 0
    return ms.Tensor(cols > rows + offset)


def flash_attention_score_emulated(query, key, value, head_num, real_shift=None, drop_mask=None, padding_mask=None,
                                   attn_mask=None, prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None,
                                   keep_prob=1.0, scale_value=1.0, pre_tokens=2147483647, next_tokens=2147483647,
                                   inner_precise=0, input_layout="BSH", sparse_mode=0):
    """FlashAttentionScore's semantics on the CPU, in the primitive's argument order; returns its four outputs
    (softmax_max (B, N1, S1, 8) fp32, softmax_sum (B, N1, S1, 8) fp32, softmax_out (a placeholder), attention_out in
    the query's dtype and layout). y = softmax(mask(scale_value * q k^T)) v, the softmax in fp32, key/value heads
    shared by N1 // N2 query heads; attn_mask True/1 discards a score. Layouts BSH and BNSD; sparse modes 0, 1 (the
    full mask given) and 2, 3 (causal, built from S1, S2). real_shift, dropout and the TND layout are not emulated."""
    _check_flash(query.dtype, query.shape, key.shape, head_num, input_layout, keep_prob, sparse_mode,
                 attn_mask is not None)
    if input_layout == "BSH":
        b, s1, h1 = query.shape
        d = h1 // head_num
        q = query.reshape(b, s1, head_num, d).transpose(0, 2, 1, 3)
        kv_heads = key.shape[2] // d
        k = key.reshape(b, key.shape[1], kv_heads, d).transpose(0, 2, 1, 3)
        v = value.reshape(b, value.shape[1], kv_heads, d).transpose(0, 2, 1, 3)
    else:
        q, k, v = query, key, value
        kv_heads = key.shape[1]
    b, n1, s1, d = q.shape
    s2 = k.shape[2]
    q = q.astype(ms.float32)
    k = k.astype(ms.float32)
    v = v.astype(ms.float32)
    if kv_heads != n1:  # grouped heads: each key/value head serves n1 // n2 consecutive query heads
        k = ops.repeat_interleave(k, n1 // kv_heads, 1)
        v = ops.repeat_interleave(v, n1 // kv_heads, 1)
    scores = ops.matmul(q, k.swapaxes(-1, -2)) * scale_value
    if sparse_mode in (2, 3):
        scores = ops.masked_fill(scores, _causal_mask(s1, s2, sparse_mode == 3), _MASKED)
    elif attn_mask is not None:
        scores = ops.masked_fill(scores, attn_mask.astype(ms.bool_), _MASKED)
    row_max = scores.max(axis=-1, keepdims=True)
    weights = ops.exp(scores - row_max)
    row_sum = weights.sum(axis=-1, keepdims=True)
    out = ops.matmul(weights / row_sum, v)
    if input_layout == "BSH":
        out = out.transpose(0, 2, 1, 3).reshape(b, s1, n1 * d)
    softmax_max = ops.broadcast_to(row_max, (b, n1, s1, 8))
    softmax_sum = ops.broadcast_to(row_sum, (b, n1, s1, 8))
    softmax_out = ops.zeros((1,), query.dtype)
    return softmax_max, softmax_sum, softmax_out, out.astype(query.dtype)
