"""The build of the native CPU kernel library: C++ sources in tav/kernels/cpu/, compiled once per machine.

Why: on CPU, MindSpore 2.10's own kernels for the UNet's memory-bound steps are several times slower than the
arithmetic needs (GroupNorm 7 ms where PyTorch takes 0.1 ms; Erf 12 ms vs 2 ms; attention as matmul + softmax +
matmul writes and re-reads a score tensor that a fused kernel keeps in cache). A fused loop in C++ removes that.

How: `library(name)` compiles kernels/cpu/<name>.cc with the system C++ compiler (g++ by default, `CXX`
overrides) into a cache directory keyed by the source, the compiler and the CPU (the build uses -march=native),
and returns the .so path, which aot.py turns into `ops.Custom("<so>:<function>", ..., func_type="aot")` ops.
Compilation happens once;
later processes reuse the file. The build is atomic (temp file + rename), so parallel test workers cannot see a
half-written library.

When: tav.kernels.cpu.use_native_kernel decides: tav.backend.native_kernels_enabled() (CPU device, not switched off
by TAV_NATIVE_KERNELS=0) and a compiler that builds the sources here. Every native kernel has a portable twin made of MindSpore ops, which is what
Ascend/GPU and CPU machines without a compiler run, and what the tests compare the native kernels against.
"""
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile

# libgomp's threads otherwise spin for a while after every parallel region, taking the cores from MindSpore's own
# CPU thread pool running the next op. Read once, when libgomp loads (with the first kernel library, unless
# another package loaded it earlier); an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

SOURCE_DIR = os.path.dirname(os.path.abspath(__file__))
CXX_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")

_built = {}
_failures = {}


def _mindspore_lib_dir():
    import mindspore

    return os.path.join(os.path.dirname(os.path.abspath(mindspore.__file__)), "lib")


SGEMM_LIBRARIES = ("conv", "linear")


def link_flags(name):
    """Extra link flags of kernels/cpu/<name>.cc. `conv` and `linear` call oneDNN's single-threaded dnnl_sgemm from the
    libdnnl.so.3 that MindSpore's CPU build ships (and has loaded already), so the GEMMs are MKL-class without
    a new dependency; the rpath points the library at that copy."""
    if name in SGEMM_LIBRARIES:
        lib_dir = _mindspore_lib_dir()
        if not os.path.isfile(os.path.join(lib_dir, "libdnnl.so.3")):
            raise NativeKernelError(f"kernels/cpu/{name}.cc needs MindSpore's libdnnl.so.3, not found in {lib_dir}")
        return ("-L" + lib_dir, "-l:libdnnl.so.3", "-Wl,-rpath," + lib_dir)
    return ()


class NativeKernelError(RuntimeError):
    pass


def cache_dir():
    """Where compiled kernels live: $TAV_KERNEL_CACHE, else $XDG_CACHE_HOME/tav/kernels, else ~/.cache/tav/kernels."""
    explicit = os.environ.get("TAV_KERNEL_CACHE")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "tav", "kernels")


def compiler():
    """The C++ compiler command, or None when there is none."""
    name = os.environ.get("CXX", "g++")
    return shutil.which(name)


def _cpu_signature():
    # -march=native code must not be reused on another CPU model sharing the cache (a network home, a copied image).
    flags = ""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith(("flags", "model name", "Features")):
                    flags += line
    except OSError:
        flags = platform.processor()
    return platform.machine() + flags


def _header_text():
    """kernels/cpu/*.h, which the sources include: their text is part of every library's build key."""
    parts = []
    for name in sorted(os.listdir(SOURCE_DIR)):
        if name.endswith(".h"):
            with open(os.path.join(SOURCE_DIR, name)) as handle:
                parts.append(f"{name}\n{handle.read()}")
    return "\n".join(parts)


def _build_key(source_text, cxx):
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256()
    for part in (source_text, cxx, version, " ".join(CXX_FLAGS), _cpu_signature()):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _check_white_list(path):
    # MindSpore refuses AOT libraries outside MS_CUSTOM_AOT_WHITE_LIST when that variable is set.
    allowed = os.environ.get("MS_CUSTOM_AOT_WHITE_LIST")
    if allowed and not os.path.realpath(path).startswith(os.path.realpath(allowed)):
        raise NativeKernelError(f"{path} is outside MS_CUSTOM_AOT_WHITE_LIST={allowed}; set TAV_KERNEL_CACHE "
                                "to a folder inside it")


def library(name):
    """Path of the compiled kernels/cpu/<name>.cc, building it on first use. Raises NativeKernelError."""
    if name in _built:
        return _built[name]
    if name in _failures:
        raise NativeKernelError(_failures[name])
    try:
        path = _build(name)
    except NativeKernelError as exc:
        _failures[name] = str(exc)
        raise
    _built[name] = path
    return path


def _build(name):
    source = os.path.join(SOURCE_DIR, name + ".cc")
    if not os.path.isfile(source):
        raise NativeKernelError(f"no native kernel source {source}")
    cxx = compiler()
    if cxx is None:
        raise NativeKernelError(f"no C++ compiler ({os.environ.get('CXX', 'g++')}) on PATH")
    with open(source) as handle:
        text = handle.read()
    extra = link_flags(name)
    folder = cache_dir()
    target = os.path.join(folder, f"{name}-{_build_key(text + _header_text() + ' '.join(extra), cxx)}.so")
    _check_white_list(target)
    if os.path.isfile(target):
        return target
    os.makedirs(folder, exist_ok=True)
    handle, partial = tempfile.mkstemp(prefix=name + "-", suffix=".so.part", dir=folder)
    os.close(handle)
    try:
        result = subprocess.run([cxx, *CXX_FLAGS, "-o", partial, source, *extra], capture_output=True, text=True)
        if result.returncode != 0:
            raise NativeKernelError(f"compiling {source} failed:\n{result.stderr[-2000:]}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return target


def function(name, symbol):
    """The `func` string ops.Custom takes for kernels/cpu/<name>.cc's extern "C" function `symbol`."""
    return f"{library(name)}:{symbol}"


def available(name):
    """True when kernels/cpu/<name>.cc builds here (the result is remembered for the process)."""
    try:
        library(name)
        return True
    except NativeKernelError:
        return False


def unavailable_reason(name):
    try:
        library(name)
        return None
    except NativeKernelError as exc:
        return str(exc)
