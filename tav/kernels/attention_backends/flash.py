"""Ascend FlashAttention (`ops.flash_attention_score`): its documented limits, head-dim padding, and the call.

Limits, from the `mindspore.ops.flash_attention_score` docstring of the pinned MindSpore 2.10.0 (same text on
mindspore.cn/docs/en/r2.5.0 and .../stable/api_python/ops/mindspore.ops.flash_attention_score.html):
  - Atlas A2 training series (910B) only; "Supported Platforms: Ascend". No CPU or GPU kernel.
  - query/key/value dtype float16 or bfloat16 (TypeError otherwise).
  - B 1..2k, S1 (queries) and S2 (keys) 1..512k, N1 (heads) 1..256.
  - D (head dim) a multiple of 16, at most 512.
  - layouts BSH, BNSD, SBH, BSND, TND.
We use layout BSH: attention() receives (B, N, H*D) already, so BSH needs no transpose (BNSD would cost two
transposes per tensor per call) and padding D is a reshape + pad of the last axis.

SD 1.x has D = 40 (padded to 48), 80 and 160; SD 2.x has D = 64. Zero columns appended to q and k leave q.k
unchanged, zero columns of v produce zero output columns that are sliced off, and the softmax scale stays the true
D's D^-0.5 (the kernel's `scalar_value`), so the padded call computes the unpadded attention.
mindone 0.5.0's diffusers port (models/attention_processor.py) still pads D to one of {64, 80, 96, 120, 128, 256}
and asserts Nq % 16 == 0, limits of older CANN releases that the MindSpore 2.10 docs no longer state. Not verified
on an NPU here: if one rejects a shape these checks admit, tighten them in this file.
"""
import mindspore as ms
from mindspore import ops

FLASH_DTYPES = (ms.float16, ms.bfloat16)
FLASH_HEAD_DIM_ALIGN = 16
FLASH_MAX_HEAD_DIM = 512
FLASH_MAX_BATCH = 2 * 1024
FLASH_MAX_SEQ_LEN = 512 * 1024
FLASH_MAX_HEADS = 256
# fp32 inputs are cast to this for an explicit backend="flash" (fp16 keeps 3 more mantissa bits than bf16).
FLASH_CAST_DTYPE = ms.float16


def padded_head_dim(head_dim):
    """Smallest head dim >= head_dim the kernel accepts (a multiple of FLASH_HEAD_DIM_ALIGN)."""
    align = FLASH_HEAD_DIM_ALIGN
    return -(-head_dim // align) * align


def flash_unsupported_reason(device, dtype, q_shape, k_shape, num_heads, upcast=False, allow_cast=False):
    """Why ops.flash_attention_score cannot compute this attention, or None when it can.

    Pure Python on (device, dtype, shapes, heads, upcast) so it is testable without an NPU. `allow_cast`: fp32
    inputs may be cast to fp16 (explicit backend="flash"); `auto` never changes the precision behind the user's
    back, so it passes allow_cast=False.
    """
    if device != "Ascend":
        return f"device is {device}; FlashAttentionScore has Ascend (Atlas A2) kernels only"
    if upcast:
        return "upcast=True asks for fp32 q.k^T and softmax; FlashAttentionScore takes fp16/bf16 inputs only"
    if dtype not in FLASH_DTYPES and not (allow_cast and dtype == ms.float32):
        return f"dtype {dtype} is not float16/bfloat16" + ("" if allow_cast else " (auto does not cast)")
    batch, nq, inner = q_shape
    nk = k_shape[1]
    head_dim = inner // num_heads
    if not 1 <= batch <= FLASH_MAX_BATCH:
        return f"batch {batch} outside 1..{FLASH_MAX_BATCH}"
    if not (1 <= nq <= FLASH_MAX_SEQ_LEN and 1 <= nk <= FLASH_MAX_SEQ_LEN):
        return f"sequence lengths Nq={nq}, Nk={nk} outside 1..{FLASH_MAX_SEQ_LEN}"
    if not 1 <= num_heads <= FLASH_MAX_HEADS:
        return f"num_heads {num_heads} outside 1..{FLASH_MAX_HEADS}"
    if padded_head_dim(head_dim) > FLASH_MAX_HEAD_DIM:
        return f"head dim {head_dim} pads to {padded_head_dim(head_dim)} > {FLASH_MAX_HEAD_DIM}"
    return None


def pad_head_dim(x, num_heads, padded_dim):
    """(B, N, H*D) -> (B, N, H*Dp): zeros appended to each head's D features."""
    b, n, inner = x.shape
    head_dim = inner // num_heads
    if padded_dim == head_dim:
        return x
    per_head = x.reshape(b, n, num_heads, head_dim)
    return ops.pad(per_head, (0, padded_dim - head_dim)).reshape(b, n, num_heads * padded_dim)


def unpad_head_dim(x, num_heads, head_dim):
    """(B, N, H*Dp) -> (B, N, H*D): each head's first D features, the inverse of pad_head_dim."""
    b, n, inner = x.shape
    padded_dim = inner // num_heads
    if padded_dim == head_dim:
        return x
    return x.reshape(b, n, num_heads, padded_dim)[:, :, :, :head_dim].reshape(b, n, num_heads * head_dim)


def flash_attention(q, k, v, num_heads):
    """Same result as math_attention (no upcast) via the Ascend kernel. Callers check flash_unsupported_reason."""
    head_dim = q.shape[-1] // num_heads
    padded = padded_head_dim(head_dim)
    compute_dtype = FLASH_CAST_DTYPE if q.dtype == ms.float32 else q.dtype
    qp = pad_head_dim(q.astype(compute_dtype), num_heads, padded)
    kp = pad_head_dim(k.astype(compute_dtype), num_heads, padded)
    vp = pad_head_dim(v.astype(compute_dtype), num_heads, padded)
    out = ops.flash_attention_score(
        qp, kp, vp, num_heads, keep_prob=1.0, scalar_value=head_dim**-0.5, input_layout="BSH"
    )
    return unpad_head_dim(out, num_heads, head_dim).astype(q.dtype)
