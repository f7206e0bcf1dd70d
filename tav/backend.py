"""The one place that knows Ascend from CPU/GPU. A leaf: it imports nothing from tav.

Everything device-dependent asks this module: which device tav builds for (MindSpore's device target, or an
Ascend SoC emulated on the CPU under TAV_EMULATE_ASCEND), which Ascend chip it is (FlashAttention exists on 910B
only), which op flavour the portable layer (tav/nn.py) should build with, whether the native CPU kernels are
switched on, and how a train step's update and graph compilation (jit level, card) should run here. What each attention backend needs of the device is declared
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


def configure(device_target=None, mode=None, jit_level=None, device_id=None, max_threads=None,
              max_device_memory=None, cpu_threads=None):
    """Set MindSpore's device and execution mode. Accepts "CPU"/"GPU"/"Ascend" and 0/1 (graph/pynative).

    device_id: the card (None: the DEVICE_ID environment variable, as Ascend/GPU launch scripts set it, else
    MindSpore's default, card 0). jit_level: "O0" or "O1" (what MindSpore 2.10's ms.jit accepts; see
    check_jit_level), applied to every graph tav compiles (compile_ahead, jit). Under TAV_EMULATE_ASCEND the
    runtime device is the CPU whatever `device_target` says (see emulated_soc). A device whose MindSpore backend
    cannot load here (no CUDA 11 runtime, no CANN) is refused with MindSpore's own load error
    (DeviceUnavailableError). max_device_memory ("30GB"): MindSpore's memory pool limit on a card.
    cpu_threads: MindSpore's CPU op thread pool when the runtime device is the CPU (None: the cores this process may
    run on; see set_cpu_threads).
    Call it before building models: layers choose their op flavour when they are constructed."""
    kwargs = {}
    if device_target is None and (device_id is not None or os.environ.get(DEVICE_ID_ENV, "").strip()):
        device_target = ms.get_context("device_target")  # MindSpore's own default device, on the chosen card
    if device_target is not None:
        target = normalise_device_target(device_target)
        if emulated_soc() is not None:
            if target == "GPU":
                raise DeviceConfigError(f"{EMULATE_ENV}={os.environ.get(EMULATE_ENV)} emulates an Ascend device on the CPU; "
                                 "device_target GPU contradicts it")
            target, device_id = "CPU", None
        check_device_available(target)
        device_id = resolve_device_id(device_id) if target != "CPU" else None
        if device_id is not None:
            ms.set_device(target, device_id)
        else:
            ms.set_device(target)
    if mode is not None:
        if mode not in MODES:
            raise ValueError(f"mode must be 0 (graph) or 1 (pynative), got {mode!r}")
        kwargs["mode"] = MODES[mode]
    if kwargs:
        ms.set_context(**kwargs)
    if jit_level is not None:
        global _jit_level
        _jit_level = check_jit_level(jit_level)
    if max_device_memory is not None and runtime_device_target() != "CPU":
        # MindSpore's memory pool limit on the card (the planner's budget is the same figure).
        ms.runtime.set_memory(max_size=str(max_device_memory).upper().replace("GIB", "GB"))
    if runtime_device_target() == "CPU":
        set_cpu_threads(cpu_threads)
    if max_threads is not None:
        try:
            ms.set_cpu_affinity(False)
        except Exception:  # older MindSpore: no such switch; thread count below still applies
            pass
        os.environ.setdefault("OMP_NUM_THREADS", str(max_threads))


def available_cores():
    """The CPU cores this process may run on (its affinity mask, which containers narrow), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def set_cpu_threads(threads=None):
    """Size MindSpore's CPU op thread pool: `threads`, or the cores available (MindSpore's own default is 25
    threads whatever the machine has, which oversubscribes a small machine). MindSpore accepts this once per
    process; a second call keeps the first size. Returns the size set, or None when it was set already."""
    from mindspore.device_context.cpu import op_tuning

    threads = available_cores() if threads is None else int(threads)
    if threads < 1:
        raise ValueError(f"CPU threads must be >= 1, got {threads}")
    try:
        op_tuning.threads_num(threads)
    except RuntimeError as error:  # "can not be set repeatedly": an earlier configure (or caller) chose it
        if "repeatedly" not in str(error):
            raise
        return None
    return threads


def add_device_arguments(parser, device_default_help="MindSpore's default: the device its installed backend provides"):
    """The device flags both tools take: --device_target (default None: `device_default_help`), --device_id,
    --jit_level, --max_device_memory. Pass the parsed values to configure() (and max_device_memory to
    tav.memory_plan.check_run_fits)."""
    parser.add_argument("--device_target", choices=list(DEVICE_TARGETS), default=None,
                        help=f"CPU, GPU or Ascend (default: {device_default_help}); under {EMULATE_ENV}=910B|910A "
                             "tav builds for that Ascend chip while MindSpore runs on the CPU")
    parser.add_argument("--device_id", type=int, default=None,
                        help=f"the card to run on (default: ${DEVICE_ID_ENV}, else card 0)")
    parser.add_argument("--jit_level", choices=["O0", "O1", "O2"], default=None,
                        help="graph compilation level: O0 (default) or O1 (operator fusion); O2 is refused "
                             "(deprecated in MindSpore 2.10)")
    parser.add_argument("--max_device_memory", default=None, metavar="SIZE",
                        help="e.g. 30GB: refuse, before loading weights, a run predicted not to fit in it "
                             "(python tools/plan.py shows the prediction)")
    return parser


class DeviceUnavailableError(RuntimeError):
    """The requested device's MindSpore backend cannot load on this machine."""


class DeviceConfigError(ValueError):
    """A device setting that cannot be honoured: jit level, card number, emulation value."""


def check_device_available(target):
    """Raise DeviceUnavailableError unless MindSpore's backend for `target` loaded (import mindspore tries to
    load the GPU and Ascend plugins and records why one failed; without this check the failure surfaces later as
    an unrelated-looking kernel or context error)."""
    if target == "CPU":
        return
    from mindspore._c_expression import MSContext

    context = MSContext.get_instance()
    if context.is_pkg_support_device(target):
        return
    # The load errors of this target's plugin only (the record lists every plugin that failed).
    lines = [line.strip() for line in context.load_plugin_error().splitlines() if target.lower() in line.lower()]
    detail = " | ".join(lines) if lines else f"no {target} plugin was loaded by this MindSpore installation"
    needs = (GPU_RUNTIME_NOTE if target == "GPU" else
             "the CANN toolkit matching MindSpore 2.10 (CANN 8.x; source its set_env.sh) and an Ascend driver")
    raise DeviceUnavailableError(
        f"device_target {target}: MindSpore's {target} backend could not load on this machine ({needs})."
        + f" MindSpore reported: {detail}")


# MindSpore 2.10's wheel: its GPU plugin is built for CUDA 11 (it loads libcudart.so.11.0, cuDNN 8, cuBLAS 11).
GPU_RUNTIME_NOTE = ("its GPU plugin needs the CUDA 11.1/11.6 runtime: libcudart.so.11.0, cuDNN 8 and cuBLAS 11 on "
                    "LD_LIBRARY_PATH, and an NVIDIA driver; see tools/gpu_check.py")

DEVICE_ID_ENV = "DEVICE_ID"


def resolve_device_id(device_id=None):
    """The card to use: `device_id` when given, else $DEVICE_ID (Ascend/GPU launch scripts set it per process),
    else None (MindSpore's default, card 0). Raises ValueError for a negative or non-integer id."""
    source = "device_id"
    if device_id is None:
        device_id = os.environ.get(DEVICE_ID_ENV)
        source = DEVICE_ID_ENV
        if device_id is None or not str(device_id).strip():
            return None
    try:
        value = int(str(device_id).strip())
    except ValueError:
        raise DeviceConfigError(f"{source} must be a card number (0, 1, ...), got {device_id!r}") from None
    if value < 0:
        raise DeviceConfigError(f"{source} must be a card number (0, 1, ...), got {device_id!r}")
    return value


JIT_LEVELS = ("O0", "O1")
_jit_level = None


def check_jit_level(level):
    """"O0" or "O1": the levels MindSpore 2.10's ms.jit takes. O2 (the GE whole-graph backend) is deprecated since
    2.9, is not accepted by ms.jit, and turns off the AllFinite overflow check fp16 loss scaling relies on, so it
    is refused rather than silently mapped."""
    level = str(level).strip().upper()
    if level == "O2":
        raise DeviceConfigError("jit_level O2 is not supported: MindSpore 2.10 deprecates it (the GE backend) and ms.jit "
                         "accepts O0 or O1 only; O2 also disables the AllFinite check that fp16 loss scaling needs. "
                         "Use O0 (default) or O1")
    if level not in JIT_LEVELS:
        raise DeviceConfigError(f"jit_level must be O0 or O1, got {level!r}")
    return level


def jit_level():
    """The jit level configure() was given (None: MindSpore's default, O0)."""
    return _jit_level


def jit(function):
    """ms.jit with the configured jit level: the current API (set_context(jit_config=...) is deprecated in 2.10)."""
    if _jit_level is None:
        return ms.jit(function)
    return ms.jit(function, jit_level=_jit_level)


def apply_jit_level(cell):
    """Give a Cell the configured jit level before it compiles (Cell.set_jit_config); a no-op when none is set."""
    # A Cell takes one jit config (MindSpore warns and ignores a second).
    if _jit_level is not None and isinstance(cell, ms.nn.Cell) and not getattr(cell, "_jit_config_dict", None):
        cell.set_jit_config(ms.JitConfig(jit_level=_jit_level))
    return cell


def normalise_device_target(name):
    for target in DEVICE_TARGETS:
        if str(name).lower() == target.lower():
            return target
    raise ValueError(f"device_target must be one of {', '.join(DEVICE_TARGETS)}, got {name!r}")


def device_target():
    """The device tav builds for: MindSpore's device target, or "Ascend" under TAV_EMULATE_ASCEND (then MindSpore
    itself runs on the CPU: runtime_device_target), or the device an assume_device block plans for."""
    if _assumed_device is not None:
        return _assumed_device[0]
    if emulated_soc() is not None:
        return "Ascend"
    return ms.get_context("device_target")


_assumed_device = None


@contextlib.contextmanager
def assume_device(target, soc=None):
    """Answer device_target()/ascend_soc() as if on `target` (and Ascend chip `soc`, e.g. "Ascend910A") for a
    with-block, without touching MindSpore: the memory planner asks the same dispatch code the model runs what it
    would choose there (tav/memory_plan.py). Nothing built inside may be run."""
    global _assumed_device
    target = normalise_device_target(target)
    previous = _assumed_device
    _assumed_device = (target, normalise_soc(soc) if soc else ("Ascend910B" if target == "Ascend" else None))
    try:
        yield
    finally:
        _assumed_device = previous


def runtime_device_target():
    """The device MindSpore actually runs kernels on ("CPU" under the emulation)."""
    return ms.get_context("device_target")


def is_ascend():
    return device_target() == "Ascend"


# TAV_EMULATE_ASCEND=910B (or 910A) builds and runs tav's Ascend code paths on the CPU: tav reports an Ascend
# device of that SoC (mint-flavoured layers, FlashAttention where the SoC has it, fp16 amp with the compiled update)
# while MindSpore runs on the CPU, and the device ops without CPU kernels are replaced by CPU implementations of
# their documented semantics (tav/kernels/ascend_ops.py). It proves tav's own Ascend code runs, not the real kernels.
EMULATE_ENV = "TAV_EMULATE_ASCEND"
EMULATED_SOCS = {"910B": "Ascend910B", "910A": "Ascend910A"}
_forced_emulation = None


def _parse_emulated(value):
    text = str(value).strip()
    if not text or text.lower() in ("0", "no", "off", "false"):
        return None
    key = text.upper().replace("ASCEND", "")
    if key not in EMULATED_SOCS:
        raise DeviceConfigError(f"{EMULATE_ENV} must be one of {', '.join(EMULATED_SOCS)} (or unset), got {value!r}")
    return EMULATED_SOCS[key]


def emulated_soc():
    """The Ascend SoC emulated on the CPU ("Ascend910B" / "Ascend910A"), or None when not emulating."""
    if _forced_emulation is not None:
        return _forced_emulation or None
    return _parse_emulated(os.environ.get(EMULATE_ENV, ""))


def emulate_ascend(soc):
    """Context manager for tests: emulate `soc` ("910B", "910A"; None: no emulation) for layers built inside it.
    Layers choose their ops at construction, and graphs at compile time: build and compile inside the block."""
    return _overriding("_forced_emulation", _parse_emulated(soc) if soc else "")


def ascend_soc():
    """The Ascend chip, normalised: "Ascend910B" (Atlas A2), "Ascend910_93xx" (A3), "Ascend910A", "Ascend310P", ...;
    None off Ascend. From MindSpore's runtime (MSContext.get_ascend_soc_version, as mindspore/train/model.py uses
    it), or the emulated SoC."""
    if _assumed_device is not None:
        return _assumed_device[1]
    soc = emulated_soc()
    if soc is not None:
        return soc
    if not is_ascend():
        return None
    from mindspore._c_expression import MSContext

    return normalise_soc(MSContext.get_instance().get_ascend_soc_version())


def normalise_soc(raw):
    """MindSpore's lower-case SoC names ("ascend910b", "ascend910_9391", "ascend910") -> "Ascend910B", ... The
    first-generation 910 reports "ascend910" (or "Ascend910A"/"Ascend910ProA"...): it is the 910A here."""
    text = str(raw or "").strip()
    low = text.lower()
    if not low:
        return None
    if low in ("ascend910", "ascend910a") or low.startswith("ascend910pro") or low.startswith("ascend910premium"):
        return "Ascend910A"
    if low.startswith("ascend910b"):
        return "Ascend910B" + text[len("ascend910b"):]
    if low.startswith("ascend"):
        return "Ascend" + text[len("ascend"):]
    return text


def soc_has_flash_attention(soc):
    """FlashAttentionScore has kernels on Atlas A2 (910B) and A3 (910_93) only; not on the 910A or 310P."""
    low = str(soc or "").lower()
    return low.startswith("ascend910b") or low.startswith("ascend910_93")


def has_flash_attention():
    return is_ascend() and soc_has_flash_attention(ascend_soc())


# Whether `auto` attention may run fp32 (and upcast_attention) layers through fp16 FlashAttention on Ascend (its
# softmax accumulates in fp32, as mindone's SD pipelines run it). Off by default: it changes the precision of
# q.k^T; TAV_FLASH_CAST=1 or allow_flash_cast(True) turns it on.
FLASH_CAST_ENV = "TAV_FLASH_CAST"
_forced_flash_cast = None


def flash_cast_allowed():
    if _forced_flash_cast is not None:
        return _forced_flash_cast
    return os.environ.get(FLASH_CAST_ENV, "0").strip().lower() in ("1", "true", "yes", "on")


def allow_flash_cast(enabled=True):
    """Set (for the process) whether auto attention may cast fp32 layers to fp16 for FlashAttention on Ascend.
    Layers read it when their graph compiles. Returns the previous setting."""
    global _forced_flash_cast
    previous = flash_cast_allowed()
    _forced_flash_cast = bool(enabled)
    return previous


def force_flash_cast(enabled):
    """Context manager for tests: allow_flash_cast for a with-block."""
    return _overriding("_forced_flash_cast", bool(enabled))


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
    return runtime_device_target() == "CPU" and not use_mint_ops()


def force_native(enabled):
    """Context manager for tests: build layers with (True) or without (False) the native CPU kernels."""
    return _overriding("_forced_native", bool(enabled))


def supports_dtype(dtype):
    """bf16 matmul/conv have no CPU kernels; fp16 and fp32 run everywhere."""
    if dtype == ms.bfloat16:
        return is_ascend() and emulated_soc() is None  # the CPU under the emulation has no bf16 matmul
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
    apply_jit_level(cell)
    cell.compile(*args)
    release_free_host_memory()
    seen.add(signature)
    return True
