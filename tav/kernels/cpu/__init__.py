"""The native CPU kernel library: C++ sources compiled on first use and run as MindSpore AOT Custom ops.

    build.py       compiling kernels/cpu/<name>.cc into a per-machine cache (g++, -march=native, OpenMP)
    aot.py         the AOT-op calling convention and KernelFunction, the base of every wrapper below
    conv.py        conv.cc       2-D convolution, forward and backward (im2col bands + oneDNN sgemm)
    linear.py      linear.cc     y = x W^T + b, forward and backward (oneDNN sgemm)
    norms.py       norms.cc      GroupNorm (frames folded, SiLU fused), LayerNorm, GEGLU
    layout.py      layout.cc     swap of the middle axes, the frame gather of sparse-causal attention
    attention.py   attention.cc  fused (flash-style) softmax attention, forward and backward
    optim.py       optim.cc      AdamW (an AOT op and host functions through ctypes)

Every kernel has a portable twin made of MindSpore ops (tav/nn.py, tav/models, tav/kernels/attention_backends), which is
what other devices run and what the tests compare against. What each kernel does and how it was measured:
docs/kernels.md.
"""
from tav import backend

from . import build


def use_native_kernel(library_name):
    """True when layers should run kernels/cpu/<library_name>.cc: native kernels enabled on this device
    (tav.backend.native_kernels_enabled: CPU, not TAV_NATIVE_KERNELS=0) and the library compiles here (the first
    call builds it; a failure leaves the portable path)."""
    return backend.native_kernels_enabled() and build.available(library_name)
