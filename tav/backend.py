"""The one place that knows Ascend from CPU/GPU. A leaf: it imports nothing from tav.

Everything device-dependent asks this module: which device target MindSpore runs on, which op flavour the
portable layer (tav/nn.py) should build with, whether the native CPU kernels are switched on, and how a train
step's update and graph compilation should run here. What each attention backend needs of the device is declared
by the backend itself (tav/kernels/attention_backends/dispatch.py); whether a native kernel also builds is
tav.kernels.cpu.use_native_kernel's question. Model code never branches on the device itself.
"""
import contextlib
import ctypes
import os
import sys
import weakref

import mindspore as ms

DEVICE_TARGETS = ("CPU", "GPU", "Ascend")
MODES = {0: ms.GRAPH_MODE, 1: ms.PYNATIVE_MODE, "graph": ms.GRAPH_MODE, "pynative": ms.PYNATIVE_MODE}

# Op flavours. "mint" = the Ascend-first `mindspore.mint` ops (fast there, many lack CPU kernels);
# "classic" = the `nn`/`ops` ops that have CPU and GPU kernels in MindSpore 2.10.
FLAVOUR_MINT = "mint"
FLAVOUR_CLASSIC = "classic"

_forced_flavour = None
_forced_native = None

# TAV_NATIVE_KERNELS=0 switches the compiled CPU kernels (tav/kernels/cpu) off: the portable ops run instead.
NATIVE_KERNELS_ENV = "TAV_NATIVE_KERNELS"


def configure(device_target=None, mode=None, jit_level=None, device_id=None, max_threads=None):
    """Set MindSpore's device and execution mode. Accepts "CPU"/"GPU"/"Ascend" and 0/1 (graph/pynative)."""
    kwargs = {}
    if device_target is not None:
        target = normalise_device_target(device_target)
        if device_id is not None:
            ms.set_device(target, int(device_id))
        else:
            ms.set_device(target)
    if mode is not None:
        if mode not in MODES:
            raise ValueError(f"mode must be 0 (graph) or 1 (pynative), got {mode!r}")
        kwargs["mode"] = MODES[mode]
    if kwargs:
        ms.set_context(**kwargs)
    if jit_level is not None:
        if jit_level not in ("O0", "O1", "O2"):
            raise ValueError(f"jit_level must be O0, O1 or O2, got {jit_level!r}")
        ms.set_context(jit_config={"jit_level": jit_level})
    if max_threads is not None:
        try:
            ms.set_cpu_affinity(False)
        except Exception:  # older MindSpore: no such switch; thread count below still applies
            pass
        os.environ.setdefault("OMP_NUM_THREADS", str(max_threads))


def normalise_device_target(name):
    for target in DEVICE_TARGETS:
        if str(name).lower() == target.lower():
            return target
    raise ValueError(f"device_target must be one of {', '.join(DEVICE_TARGETS)}, got {name!r}")


def device_target():
    return ms.get_context("device_target")


def is_ascend():
    return device_target() == "Ascend"


def op_flavour():
    """Which op family the portable layers build with: mint on Ascend, classic elsewhere."""
    if _forced_flavour is not None:
        return _forced_flavour
    return FLAVOUR_MINT if is_ascend() else FLAVOUR_CLASSIC


def use_mint_ops():
    return op_flavour() == FLAVOUR_MINT


@contextlib.contextmanager
def _overriding(name, value):
    """Set the module global `name` to `value` for a with-block, restoring it after (the test switches below)."""
    previous = globals()[name]
    globals()[name] = value
    try:
        yield
    finally:
        globals()[name] = previous


def force_flavour(flavour):
    """Context manager for tests: build layers with a given flavour regardless of the device.

    Only for checking the dispatch itself; mint layers built on CPU must not be *run* there.
    """
    if flavour not in (FLAVOUR_MINT, FLAVOUR_CLASSIC):
        raise ValueError(f"unknown op flavour {flavour!r}")
    return _overriding("_forced_flavour", flavour)


def native_kernels_enabled():
    """Whether layers may use the compiled CPU kernels: CPU device, not switched off by TAV_NATIVE_KERNELS=0 (or a
    force_native(False) block). Whether a given kernel also *builds* here is tav.kernels.cpu.use_native_kernel's
    question."""
    if _forced_native is not None:
        return _forced_native
    if os.environ.get(NATIVE_KERNELS_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return device_target() == "CPU" and not use_mint_ops()


def force_native(enabled):
    """Context manager for tests: build layers with (True) or without (False) the native CPU kernels."""
    return _overriding("_forced_native", bool(enabled))


def supports_dtype(dtype):
    """bf16 matmul/conv have no CPU kernels; fp16 and fp32 run everywhere."""
    if dtype == ms.bfloat16:
        return is_ascend()
    return dtype in (ms.float16, ms.float32)


def compile_optimizer_update():
    """Whether a train step's update (unscale, finiteness check, global norm, clipping, AdamW) runs as its own
    compiled graph (Ascend, GPU: one launch sequence instead of ~10 small ops per tensor) or eagerly (CPU: there
    a compiled graph holds host memory per node from compilation on -- ~190 MiB for this update at the small
    bench config, more than the whole update's data -- while running it op by op costs a few ms per step)."""
    return device_target() != "CPU"


def release_free_host_memory():
    """Give the C heap's free pages back to the OS (glibc's malloc_trim); True when it could.

    Compiling a graph allocates and frees a few hundred MiB of small objects; glibc keeps the freed pages, so
    without this they stay in the process's resident memory beside everything the graph then runs. Call it right
    after a large compile. A no-op (False) where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True


_compiled_signatures = weakref.WeakKeyDictionary()


def compile_ahead(cell, *args):
    """In GRAPH_MODE, compile `cell` for these arguments before it first runs on them, then give the compiler's
    freed heap pages back (release_free_host_memory), so they are not resident beside the activations of the run
    that follows (~60-80 MiB at the small bench config). Once per cell and argument shapes/dtypes; a no-op in
    PYNATIVE_MODE and for anything that is not a Cell. The following call reuses the compiled graph."""
    if ms.get_context("mode") != ms.GRAPH_MODE or not isinstance(cell, ms.nn.Cell):
        return False
    signature = tuple((tuple(a.shape), str(a.dtype)) if isinstance(a, ms.Tensor) else repr(a) for a in args)
    seen = _compiled_signatures.setdefault(cell, set())
    if signature in seen:
        return False
    cell.compile(*args)
    release_free_host_memory()
    seen.add(signature)
    return True
