"""Ascend FlashAttention (`ops.flash_attention_score`): its documented limits, the SoC gate, casts, head-dim
padding as a fallback, and the call (through tav.kernels.ascend_ops, so TAV_EMULATE_ASCEND runs this very code).

Limits, from the FlashAttentionScore docstring of the pinned MindSpore 2.10.0:
  - Atlas A2 (910B) and A3 chips only: the 910A has no FlashAttentionScore kernel (kernel selection fails), so
    the SoC is checked (tav.backend.has_flash_attention), not just "Ascend". No CPU or GPU kernel.
  - query/key/value dtype float16 or bfloat16 (TypeError otherwise); the softmax accumulates in fp32.
  - B 1..2k, S1 (queries) and S2 (keys) 1..512k, N1 (heads) 1..256, D (head dim) at most 512.
  - layouts BSH, BNSD, SBH, BSND, TND.
We use layout BSH: attention() receives (B, N, H*D) already, so BSH needs no transpose (BNSD would cost two
transposes per tensor per call).

Head dim: the docstring also says "a multiple of 16", a limit of older CANN releases; current CANN takes SD 1.x's
D = 40 as it is (mindone's SD pipelines pass 40 to FlashAttentionScore), so tav passes D unpadded. The zero-padding
to the next multiple of 16 (40 -> 48) is kept as a fallback for an older CANN that refuses it:
TAV_FLASH_PAD_HEAD_DIM=1. Zero columns appended to q and k leave q.k unchanged, zero columns of v produce zero
output columns that are sliced off, and the scale stays the true D's D^-0.5 (`scalar_value`), so the padded call
computes the unpadded attention. Neither has been run on an NPU here (only under the emulation).

fp32 inputs: an explicit backend="flash" casts them to fp16; `auto` does so only where the user allowed it
(tav.backend.allow_flash_cast / TAV_FLASH_CAST=1), and then also for upcast_attention layers (SD 2.1), since
the kernel's softmax is fp32 whatever its inputs.
"""
import os

import mindspore as ms
from mindspore import ops

from tav import backend

from .. import ascend_ops

FLASH_DTYPES = ascend_ops.FLASH_DTYPES
FLASH_HEAD_DIM_ALIGN = 16
FLASH_MAX_HEAD_DIM = ascend_ops.FLASH_MAX_HEAD_DIM
FLASH_MAX_BATCH = ascend_ops.FLASH_MAX_BATCH
FLASH_MAX_SEQ_LEN = ascend_ops.FLASH_MAX_SEQ_LEN
FLASH_MAX_HEADS = ascend_ops.FLASH_MAX_HEADS
# fp32 inputs are cast to this (fp16 keeps 3 more mantissa bits than bf16).
FLASH_CAST_DTYPE = ms.float16
PAD_HEAD_DIM_ENV = "TAV_FLASH_PAD_HEAD_DIM"


def pads_head_dim():
    """Whether the head dim is zero-padded to a multiple of 16 before the call (the fallback; default off)."""
    return os.environ.get(PAD_HEAD_DIM_ENV, "0").strip().lower() in ("1", "true", "yes", "on")


def call_head_dim(head_dim):
    """The head dim the kernel is called with: head_dim, or padded_head_dim(head_dim) under the fallback."""
    return padded_head_dim(head_dim) if pads_head_dim() else head_dim


def padded_head_dim(head_dim):
    """Smallest head dim >= head_dim the kernel accepts (a multiple of FLASH_HEAD_DIM_ALIGN)."""
    align = FLASH_HEAD_DIM_ALIGN
    return -(-head_dim // align) * align


def flash_unsupported_reason(device, dtype, q_shape, k_shape, num_heads, upcast=False, allow_cast=False,
                             soc=None):
    """Why ops.flash_attention_score cannot compute this attention, or None when it can.

    Pure Python on (device, SoC, dtype, shapes, heads, upcast) so it is testable without an NPU. `soc`: the Ascend
    chip (default: tav.backend.ascend_soc()); FlashAttentionScore exists on 910B/A3 only. `allow_cast`: fp32
    inputs may be cast to fp16, and upcast layers run through the kernel (whose softmax is fp32) -- an explicit
    backend="flash", or auto where the user allowed it (tav.backend.flash_cast_allowed)."""
    if device != "Ascend":
        return f"device is {device}; FlashAttentionScore has Ascend (Atlas A2) kernels only"
    if soc is None:
        soc = backend.ascend_soc()
    if not backend.soc_has_flash_attention(soc):
        return f"the chip is {soc}; FlashAttentionScore exists on Atlas A2 (Ascend910B) and A3 only"
    if upcast and not allow_cast:
        return ("upcast=True asks for fp32 q.k^T and softmax; FlashAttentionScore takes fp16/bf16 inputs only "
                "(allow_flash_cast lets it run them)")
    if dtype not in FLASH_DTYPES and not (allow_cast and dtype == ms.float32):
        return f"dtype {dtype} is not float16/bfloat16" + ("" if allow_cast else " (auto casts only with allow_flash_cast)")
    batch, nq, inner = q_shape
    nk = k_shape[1]
    head_dim = inner // num_heads
    if not 1 <= batch <= FLASH_MAX_BATCH:
        return f"batch {batch} outside 1..{FLASH_MAX_BATCH}"
    if not (1 <= nq <= FLASH_MAX_SEQ_LEN and 1 <= nk <= FLASH_MAX_SEQ_LEN):
        return f"sequence lengths Nq={nq}, Nk={nk} outside 1..{FLASH_MAX_SEQ_LEN}"
    if not 1 <= num_heads <= FLASH_MAX_HEADS:
        return f"num_heads {num_heads} outside 1..{FLASH_MAX_HEADS}"
    if call_head_dim(head_dim) > FLASH_MAX_HEAD_DIM:
        return f"head dim {head_dim} (called as {call_head_dim(head_dim)}) > {FLASH_MAX_HEAD_DIM}"
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
    padded = call_head_dim(head_dim)
    compute_dtype = FLASH_CAST_DTYPE if q.dtype == ms.float32 else q.dtype
    qp = pad_head_dim(q.astype(compute_dtype), num_heads, padded)
    kp = pad_head_dim(k.astype(compute_dtype), num_heads, padded)
    vp = pad_head_dim(v.astype(compute_dtype), num_heads, padded)
    out = ascend_ops.flash_attention_score(qp, kp, vp, num_heads, keep_prob=1.0, scalar_value=head_dim**-0.5,
                                           input_layout="BSH")
    return unpad_head_dim(out, num_heads, head_dim).astype(q.dtype)
