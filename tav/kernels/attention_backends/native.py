"""The "native" attention backend: the fused CPU kernel of kernels/cpu/attention.cc (wrapped in
kernels/cpu/attention.py), fp32, forward and backward."""
from tav import backend

from ..cpu.attention import NativeAttention, NativeAttentionWithLse, native_attention, native_attention_supported

__all__ = ["NativeAttention", "NativeAttentionWithLse", "native_attention", "native_attention_supported",
           "native_unsupported_reason"]


def native_unsupported_reason(device, dtype, q_shape, k_shape, num_heads):
    """Why the compiled CPU kernel cannot run this attention on `device`, or None."""
    if not backend.native_kernels_enabled():
        return f"native kernels are off on {device} (CPU only; {backend.NATIVE_KERNELS_ENV}=0 disables)"
    return native_attention_supported(dtype, q_shape, k_shape, num_heads)
