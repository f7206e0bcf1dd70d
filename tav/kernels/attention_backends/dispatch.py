"""attention(): one entry point for attn1, attn2, attn_temp and the VAE mid-block, and the choice of backend.

Each backend is registered below with what it needs: the devices it has kernels for and a reason function for
its other limits (dtype, shapes), and whether `auto` may pick it. resolve_backend is a lookup over that registry
(as diffusers' attention_dispatch), a pure function of Python constants (backend name, dtype, static shapes,
upcast) and of tav.backend's device answer. Inside a Cell's construct in GRAPH_MODE it runs once at compile time
(ops.constexpr), so the compiled graph holds only the chosen branch: on CPU the flash branch never reaches kernel
selection, which matters because FlashAttentionScore has no CPU kernel.
"""
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import mindspore as ms
from mindspore import nn, ops

from tav import backend as tav_backend

from . import chunked
from .chunked import BlockedAttention, chunked_attention
from .flash import flash_attention, flash_unsupported_reason
from .math import math_attention
from .native import NativeAttentionWithLse, native_attention, native_unsupported_reason

_warned = set()


def _warn_once(message):
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def current_device():
    """The device name the backends' constraints are checked against, as tav.backend reports it."""
    return "Ascend" if tav_backend.is_ascend() else tav_backend.device_target()


def check_attention_shapes(q_shape, k_shape, v_shape, num_heads):
    """Raise ValueError unless q (B, Nq, H*D) and k, v (B, Nk, H*D) fit together with num_heads heads."""
    if len(q_shape) != 3 or len(k_shape) != 3 or tuple(k_shape) != tuple(v_shape):
        raise ValueError(
            f"attention expects q (B, Nq, H*D) and k, v of one shape (B, Nk, H*D); got q {tuple(q_shape)}, "
            f"k {tuple(k_shape)}, v {tuple(v_shape)}"
        )
    if q_shape[0] != k_shape[0] or q_shape[2] != k_shape[2]:
        raise ValueError(f"attention: q {tuple(q_shape)} and k {tuple(k_shape)} differ in batch or H*D")
    if num_heads < 1 or q_shape[2] % num_heads:
        raise ValueError(f"attention: num_heads={num_heads} does not divide the hidden size {q_shape[2]}")


@dataclass(frozen=True)
class AttentionCall:
    """What a backend's constraints are checked against: one call's device, dtype, static shapes and options.
    `explicit`: the backend was asked for by name (flash may then cast fp32 to fp16; auto never does)."""

    device: str
    dtype: object
    q_shape: tuple
    k_shape: tuple
    num_heads: int
    upcast: bool = False
    native_allowed: bool = True
    explicit: bool = False
    flash_cast: bool = False  # auto may cast fp32/upcast layers to fp16 for flash (tav.backend.allow_flash_cast)

    @property
    def scores(self):
        return self.q_shape[0] * self.num_heads * self.q_shape[1] * self.k_shape[1]


def _always(call):
    return None


@dataclass(frozen=True)
class AttentionBackend:
    """One attention backend and its constraints.

    devices: the devices it has kernels for (None: every device). unsupported(call): why it cannot run this call
    beyond the device (None when it can). auto(call): whether `auto` picks it when it can run (the registry's
    order is auto's preference). fallback: what an explicit request runs where it cannot, with a one-time warning
    ("auto" or another backend; warning rather than raising lets a config written for Ascend run unchanged on
    CPU)."""

    name: str
    devices: Optional[Tuple[str, ...]] = None
    unsupported: Callable = _always
    auto: Callable = lambda call: True
    fallback: Optional[str] = None

    def unavailable_reason(self, call):
        if self.devices is not None and call.device not in self.devices:
            return f"device is {call.device}; {self.name} runs on {', '.join(self.devices)} only"
        return self.unsupported(call)


def _native_unsupported(call):
    if not call.native_allowed:
        return "this layer was built without native kernels"
    return native_unsupported_reason(call.device, call.dtype, call.q_shape, call.k_shape, call.num_heads)


def _flash_unsupported(call):
    return flash_unsupported_reason(call.device, call.dtype, call.q_shape, call.k_shape, call.num_heads,
                                    call.upcast, allow_cast=call.explicit or call.flash_cast)


# auto's order of preference. native: the fused CPU kernel for fp32 where it builds (same numbers as math, no
# score tensor, several times faster; fp32 throughout, so `upcast` changes nothing for it). flash: Ascend 910B/A3,
# fp16/bf16 within flash_unsupported_reason's limits (fp32 and upcast layers too where allow_flash_cast is on).
# chunked: math in blocks, which auto picks on every device when the (B*H, Nq, Nk) scores exceed that device's
# budget (chunked.score_budget): the full score tensor of a 512 px sparse-causal attn1 is tens of GB. math: exact,
# everywhere.
BACKENDS = {
    backend.name: backend
    for backend in (
        AttentionBackend("native", devices=("CPU",), unsupported=_native_unsupported, fallback="auto"),
        AttentionBackend("flash", devices=("Ascend",), unsupported=_flash_unsupported, fallback="math"),
        AttentionBackend("chunked", auto=lambda call: call.scores > chunked.score_budget(call.device)),
        AttentionBackend("math"),
    )
}

# The names a user may pass (configs, tools' --attention), "auto" first; the one list every other module imports.
ATTENTION_BACKENDS = ("auto", "math", "chunked", "flash", "native")
assert set(ATTENTION_BACKENDS) == {"auto", *BACKENDS}, "every registered backend is a name users may pass"


def resolve_backend(requested, dtype, q_shape, k_shape, num_heads, upcast=False, native_allowed=True):
    """The backend attention() will actually run: "math", "chunked", "flash" or "native".

    auto    -> the first backend of BACKENDS that can run the call and that auto may pick: native on CPU for
               fp32 when it builds here, flash on Ascend 910B when flash_unsupported_reason finds nothing (fp16/bf16;
               fp32/upcast too where tav.backend.flash_cast_allowed()), chunked on any device for score tensors
               over chunked.score_budget(device), else math.
    flash   -> flash, with fp32 inputs cast to fp16; where the kernel cannot run (any non-Ascend device,
               upcast=True, shapes out of range) math, with a one-time warning.
    native  -> native; where it cannot run (not CPU, not fp32, no compiler) what auto picks, with a one-time
               warning.
    math, chunked -> themselves.
    native_allowed=False treats native as unavailable (a layer built without it, e.g. under force_native(False)).
    """
    if requested not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(ATTENTION_BACKENDS)}; got {requested!r}")
    call = AttentionCall(current_device(), dtype, tuple(q_shape), tuple(k_shape), num_heads, upcast,
                         native_allowed, explicit=requested != "auto",
                         flash_cast=tav_backend.flash_cast_allowed())
    if requested == "auto":
        for candidate in BACKENDS.values():
            if candidate.unavailable_reason(call) is None and candidate.auto(call):
                return candidate.name
        return "math"
    chosen = BACKENDS[requested]
    reason = chosen.unavailable_reason(call)
    if reason is None:
        return requested
    _warn_once(f"attention backend '{requested}' unavailable ({reason}); using '{chosen.fallback}'")
    if chosen.fallback == "auto":
        return resolve_backend("auto", dtype, q_shape, k_shape, num_heads, upcast, native_allowed)
    return chosen.fallback


@ops.constexpr
def _plan(requested, dtype, q_shape, k_shape, v_shape, num_heads, upcast, chunk_size, native_allowed=True):
    # Runs in Python at graph compile time (and plainly in PyNative): returns (backend, chunk size).
    check_attention_shapes(q_shape, k_shape, v_shape, num_heads)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"attention chunk_size must be a positive int or None; got {chunk_size!r}")
    chosen = resolve_backend(requested, dtype, q_shape, k_shape, num_heads, upcast, native_allowed)
    return chosen, chunk_size


def attention(q, k, v, num_heads, backend="auto", upcast=False, chunk_size=None):
    """Multi-head softmax attention. q (B, Nq, H*D), k/v (B, Nk, H*D) -> (B, Nq, H*D) in q's dtype.

    backend: one of ATTENTION_BACKENDS (see resolve_backend). upcast: q.k^T and softmax in fp32 (SD 2.1).
    chunk_size: queries per chunk for backend="chunked" (default: chunked.block_plan's blocks of whole rows under
    chunked.SCORE_BLOCK_ELEMENTS); ignored by the other backends.
    """
    chosen, chunk = _plan(backend, q.dtype, q.shape, k.shape, v.shape, num_heads, upcast, chunk_size)
    # A branch per backend rather than a call through the registry: graph mode compiles only the branch whose
    # constant condition holds, and needs each callee spelled out.
    if chosen == "flash":
        return flash_attention(q, k, v, num_heads)
    if chosen == "native":
        return native_attention(q, k, v, num_heads)
    if chosen == "chunked":
        return chunked_attention(q, k, v, num_heads, upcast, chunk)
    return math_attention(q, k, v, num_heads, upcast)


class AttentionKernel(nn.Cell):
    """attention() as a Cell, for models that are trained: when the plan is "chunked" it runs BlockedAttention,
    whose backward recomputes one block at a time instead of keeping every block's probabilities; "native" runs
    NativeAttentionWithLse, whose backward is the compiled flash-attention backward. Other backends are the plain
    functions (autodiff). No parameters, so it adds nothing to a state dict.

    `attention_backend` may be changed before compiling (UNet3DConditionModel.set_attention_backend does)."""

    def __init__(self, num_heads, attention_backend="auto", upcast=False):
        super().__init__()
        self.num_heads = num_heads
        self.attention_backend = attention_backend
        self.upcast = upcast
        self.blocked = BlockedAttention(num_heads, upcast)
        # Built only where it may run: creating it compiles the kernel library (kernels/cpu/build.py).
        self.native_built = native_unsupported_reason(
            current_device(), ms.float32, (1, 1, num_heads), (1, 1, num_heads), num_heads) is None
        # The variant that keeps the forward's row log-sum-exp for the backward: 10-25% faster training than
        # recomputing it, for (B, H, Nq) floats.
        self.native = NativeAttentionWithLse(num_heads) if self.native_built else None

    def construct(self, q, k, v):
        chosen, _ = _plan(self.attention_backend, q.dtype, q.shape, k.shape, v.shape, self.num_heads, self.upcast,
                          None, self.native_built)
        if chosen == "chunked":
            return self.blocked(q, k, v)
        if chosen == "native":
            return self.native(q, k, v)
        if chosen == "math":
            return math_attention(q, k, v, self.num_heads, self.upcast)
        return attention(q, k, v, self.num_heads, self.attention_backend, self.upcast)
