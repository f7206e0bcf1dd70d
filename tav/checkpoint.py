"""Checkpoint I/O for every tav model: read safetensors and PyTorch `.bin` files into numpy, load them into a
Cell name for name, and save safetensors atomically.

Parameter names in tav are the PyTorch state-dict keys, so loading is a dictionary walk with no translation
table. The `.bin` reader never imports torch: it unpickles the checkpoint with an allow-list of the handful of
globals a state dict needs, so a malicious pickle cannot run code (see `_RestrictedUnpickler`).

Over 600 lines because the torch-free pickle reader (an allow-list unpickler and the zip layout, ~200 lines) lives
here beside the safetensors path, so every weight format enters tav through one module.
"""
import _compat_pickle
import json
import os
import pickle
import shutil
import tempfile
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field

import ml_dtypes  # registers bfloat16 with numpy, which safetensors' numpy API needs for BF16 tensors
import mindspore as ms
import numpy as np
import safetensors
import safetensors.numpy

SAFETENSORS_SUFFIX = ".safetensors"
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
INDEX_SUFFIX = ".index.json"
_BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
_MS_FLOATS = (ms.float16, ms.bfloat16, ms.float32, ms.float64)
_LIST_LIMIT = 20  # names shown per category in a mismatch message; the counts are always exact


class CheckpointError(Exception):
    """A checkpoint file or folder is missing, unreadable, corrupt or does not fit the model."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The file or folder does not exist (also a FileNotFoundError, so generic handlers catch it)."""


class CheckpointMismatchError(CheckpointError):
    """The state dict's keys or shapes do not match the Cell's parameters."""


class UnsafePickleError(CheckpointError):
    """A `.bin` pickle asked for a global outside the state-dict allow-list; nothing was executed."""


# ---------------------------------------------------------------------------------------------------------
# Finding and reading weights


# model_index.json of an SD 1.x/2.x folder in diffusers layout (without the safety checker and feature extractor).
SD_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def component_folder(path, component, marker="config.json"):
    """The folder of one pipeline component: `path/component` when `path` is a pipeline folder (diffusers layout),
    else `path` itself when it holds `marker` (the component's folder given directly). Anything else raises
    CheckpointNotFoundError naming both places."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointNotFoundError(f"{component} folder {path!r} does not exist")
    nested = os.path.join(path, component)
    if os.path.isdir(nested):
        return nested
    if os.path.isfile(os.path.join(path, marker)):
        return path
    raise CheckpointNotFoundError(
        f"no {component} in {path!r}: expected a {component}/ sub-folder (pipeline layout) or {marker} in the folder"
    )


def find_weights_file(folder, stem="diffusion_pytorch_model", bin_stem=None):
    """Path of the weights in `folder`: `<stem>.safetensors`, else its sharded index, else `<bin_stem>.bin`,
    else its sharded index. Safetensors wins because reading it needs no pickle at all. `bin_stem` defaults to
    `stem`; transformers names the two differently (model.safetensors, pytorch_model.bin)."""
    folder = os.fspath(folder)
    bin_stem = stem if bin_stem is None else bin_stem
    candidates = [
        stem + SAFETENSORS_SUFFIX,
        stem + SAFETENSORS_SUFFIX + INDEX_SUFFIX,
        bin_stem + ".bin",
        bin_stem + ".bin" + INDEX_SUFFIX,
    ]
    if not os.path.isdir(folder):
        raise CheckpointNotFoundError(
            f"weights folder {folder!r} does not exist (looked for {', '.join(candidates)})"
        )
    for name in candidates:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise CheckpointNotFoundError(f"no weights in {folder!r}: looked for {', '.join(candidates)}")


def read_state_dict(path):
    """Read a checkpoint into {name: numpy array}. Understands `.safetensors`, PyTorch zip `.bin`/`.pt`/`.pth`
    and sharded `*.index.json`. bfloat16 tensors come back as float32 (see `_to_numpy_friendly`)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"checkpoint file {path!r} does not exist")
    if path.endswith(INDEX_SUFFIX):
        return _read_sharded(path)
    if path.endswith(SAFETENSORS_SUFFIX):
        return _read_safetensors(path)
    if path.endswith(TORCH_SUFFIXES):
        return _read_torch_zip(path)
    raise CheckpointError(
        f"cannot tell the format of {path!r}: expected a name ending in {SAFETENSORS_SUFFIX}, "
        f"{', '.join(TORCH_SUFFIXES)} or {INDEX_SUFFIX}"
    )


def _to_numpy_friendly(array):
    # numpy has no native bfloat16 (ml_dtypes supplies a slow emulated one) and MindSpore's CPU kernels handle
    # it patchily, so bf16 checkpoints are widened to float32 on read; this is exact. Pass dtype= when loading
    # to get half precision back.
    if array.dtype == _BFLOAT16:
        return array.astype(np.float32)
    return array


def _read_safetensors(path):
    try:
        with safetensors.safe_open(path, framework="np") as handle:
            return {name: _to_numpy_friendly(handle.get_tensor(name)) for name in handle.keys()}
    except Exception as exc:  # the Rust reader raises SafetensorError/OSError/TypeError for bad files
        raise CheckpointError(f"cannot read safetensors file {path!r}: {exc}") from exc


def _read_sharded(index_path):
    index = read_json(index_path, what="sharded checkpoint index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"sharded checkpoint index {index_path!r} has no 'weight_map' of name -> shard file")
    folder = os.path.dirname(index_path)
    by_shard = {}
    for name, shard in weight_map.items():
        # Shards are siblings of the index; refusing paths keeps an index from pointing anywhere on disk.
        if not isinstance(shard, str) or os.path.basename(shard) != shard or shard in ("", ".", ".."):
            raise CheckpointError(
                f"sharded checkpoint index {index_path!r}: shard for {name!r} must be a file name next to the "
                f"index, got {shard!r}"
            )
        by_shard.setdefault(shard, []).append(name)
    state_dict = {}
    for shard, names in by_shard.items():
        shard_path = os.path.join(folder, shard)
        if not os.path.isfile(shard_path):
            raise CheckpointNotFoundError(
                f"shard {shard_path!r} listed in {index_path!r} (for {len(names)} tensors) does not exist"
            )
        tensors = read_state_dict(shard_path)
        absent = [name for name in names if name not in tensors]
        if absent:
            raise CheckpointError(
                f"shard {shard_path!r} lacks {len(absent)} tensors that {index_path!r} places there: "
                f"{_name_list(absent)}"
            )
        for name in names:
            state_dict[name] = tensors[name]
    return state_dict


# ---------------------------------------------------------------------------------------------------------
# PyTorch zip checkpoints without torch
#
# torch.save (>= 1.6) writes a zip: `<archive>/data.pkl` is a protocol-2 pickle of the state dict in which
# every tensor is `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)` and
# every storage is a persistent id ('storage', torch.<Type>Storage, key, location, numel) whose raw
# little-endian bytes live in `<archive>/data/<key>`. Offsets, sizes and strides count elements.


class _StorageType:
    def __init__(self, name, dtype):
        self.name = name
        self.dtype = np.dtype(dtype)

    def __repr__(self):
        return f"torch.{self.name}"


_STORAGE_TYPES = {
    name: _StorageType(name, dtype)
    for name, dtype in {
        "DoubleStorage": np.float64,
        "FloatStorage": np.float32,
        "HalfStorage": np.float16,
        "BFloat16Storage": ml_dtypes.bfloat16,
        "LongStorage": np.int64,
        "IntStorage": np.int32,
        "ShortStorage": np.int16,
        "CharStorage": np.int8,
        "ByteStorage": np.uint8,
        "BoolStorage": np.bool_,
    }.items()
}


class _TensorClassMarker:
    """Stands in for torch.Tensor / torch.nn.Parameter where a pickle names the class; never instantiated."""

    def __init__(self, name):
        self.name = name


class _TorchZipReader:
    def __init__(self, path, archive, prefix):
        self.path = path
        self.archive = archive
        self.prefix = prefix
        self.storages = {}
        byteorder = prefix + "byteorder"
        names = set(archive.namelist())
        # Files from big-endian machines say so; files without the record predate it and are little-endian.
        self.big_endian = byteorder in names and archive.read(byteorder).strip() == b"big"

    def load_storage(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"{self.path!r}: unexpected persistent id {pid!r} in data.pkl")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"{self.path!r}: storage type {storage_type!r} is not supported")
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise CheckpointError(f"{self.path!r}: malformed storage reference {pid!r}")
        if key in self.storages:
            return self.storages[key]
        record = f"{self.prefix}data/{key}"
        try:
            raw = self.archive.read(record)
        except KeyError:
            raise CheckpointError(f"{self.path!r}: storage record {record!r} is missing from the archive") from None
        dtype = storage_type.dtype.newbyteorder(">") if self.big_endian else storage_type.dtype.newbyteorder("<")
        if len(raw) < numel * dtype.itemsize:
            raise CheckpointError(
                f"{self.path!r}: storage {record!r} has {len(raw)} bytes, expected {numel} x {dtype.itemsize} "
                f"(truncated file?)"
            )
        array = np.frombuffer(raw, dtype=dtype, count=numel)
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("="))
        self.storages[key] = array
        return array


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, *_rest):
    if not isinstance(storage, np.ndarray):
        raise CheckpointError(f"tensor refers to a storage of type {type(storage).__name__}, not raw data")
    size, stride = tuple(size), tuple(stride)
    ints = all(isinstance(v, int) and v >= 0 for v in (storage_offset, *size, *stride))
    if not ints or len(size) != len(stride):
        raise CheckpointError(f"malformed tensor layout: offset {storage_offset!r} size {size} stride {stride}")
    # Bounds check before as_strided, which would otherwise read past the buffer for a hostile layout.
    if 0 not in size:
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.size:
            raise CheckpointError(
                f"tensor of size {size} stride {stride} at offset {storage_offset} overruns its storage of "
                f"{storage.size} elements"
            )
    itemsize = storage.dtype.itemsize
    base = storage[storage_offset:] if storage_offset < storage.size else storage[:0]
    view = np.lib.stride_tricks.as_strided(
        base, shape=size, strides=tuple(s * itemsize for s in stride), writeable=False
    )
    return _to_numpy_friendly(view.copy())


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


def _rebuild_parameter_with_state(data, requires_grad=False, backward_hooks=None, state=None):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    # `func` itself came through find_class, so it is one of the rebuilders above; the tensor subclass and its
    # Python attributes (new_type, state) do not matter for a state dict and are dropped.
    if not callable(func) or func not in _REBUILDERS:
        raise CheckpointError(f"tensor rebuild function {func!r} is not supported")
    return func(*args)


_REBUILDERS = (_rebuild_tensor_v2, _rebuild_parameter, _rebuild_parameter_with_state)

_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch._tensor", "Tensor"): _TensorClassMarker("torch.Tensor"),
    ("torch", "Tensor"): _TensorClassMarker("torch.Tensor"),
    ("torch.nn.parameter", "Parameter"): _TensorClassMarker("torch.nn.Parameter"),
    **{("torch", name): storage_type for name, storage_type in _STORAGE_TYPES.items()},
}


def _python3_global(module, name):
    # Protocol-2 pickles may spell globals the Python 2 way (__builtin__.eval); the stock find_class translates
    # them, an override receives them raw. Translate so the allow-list and the error use today's names.
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the allow-listed globals, each to tav's own torch-free stand-in.

    Every other global (os.system, builtins.eval, subprocess.Popen, ...) raises UnsafePickleError before it is
    even looked up, so nothing in the pickle can run. Extension-registry opcodes also go through find_class.
    """

    def __init__(self, file, reader):
        super().__init__(file)
        self.reader = reader

    def find_class(self, module, name):
        module, name = _python3_global(module, name)
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            pass
        if module == "torch" and name.endswith("Storage"):
            raise CheckpointError(f"{self.reader.path!r} holds torch.{name} tensors, which tav cannot read")
        raise UnsafePickleError(
            f"{self.reader.path!r} refers to {module}.{name}, which a PyTorch state dict never needs; "
            f"refusing to load it (nothing was executed). Convert trusted files to safetensors instead."
        )

    def persistent_load(self, pid):
        return self.reader.load_storage(pid)


def _read_torch_zip(path):
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as handle:
            head = handle.read(2)
        if head[:1] == b"\x80":
            raise CheckpointError(
                f"{path!r} is a legacy (pre-1.6, non-zip) PyTorch checkpoint, which tav does not read; re-save it "
                f"with torch>=1.6 or convert it to safetensors"
            )
        raise CheckpointError(f"{path!r} is not a PyTorch zip checkpoint (corrupt or not a checkpoint)")
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise CheckpointError(
                    f"{path!r} is a zip but not a PyTorch checkpoint: expected one '<archive>/data.pkl', found "
                    f"{pickles or 'none'}"
                )
            prefix = pickles[0][: -len("data.pkl")]
            reader = _TorchZipReader(path, archive, prefix)
            with archive.open(pickles[0]) as pkl:
                obj = _RestrictedUnpickler(pkl, reader).load()
    except CheckpointError:
        raise
    except Exception as exc:  # a damaged pickle fails in many ways (EOFError, KeyError, TypeError, ...)
        raise CheckpointError(f"cannot read PyTorch checkpoint {path!r}: {type(exc).__name__}: {exc}") from exc
    return _as_flat_state_dict(obj, path)


def _as_flat_state_dict(obj, path):
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path!r} holds a {type(obj).__name__}, expected a dict of name -> tensor")
    not_tensors = [name for name, value in obj.items() if not isinstance(value, np.ndarray)]
    if not_tensors:
        hint = " (the weights may be nested under 'state_dict')" if "state_dict" in obj else ""
        raise CheckpointError(
            f"{path!r} is not a flat state dict: {len(not_tensors)} entries are not tensors: "
            f"{_name_list([str(n) for n in not_tensors])}{hint}"
        )
    return {str(name): value for name, value in obj.items()}


# ---------------------------------------------------------------------------------------------------------
# Cells


@dataclass
class LoadReport:
    """What `load_state_dict_into` did. `mismatched` holds (name, checkpoint shape, model shape)."""

    loaded: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    mismatched: list = field(default_factory=list)
    ignored: list = field(default_factory=list)  # missing, but excused by `ignore`

    @property
    def ok(self):
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self):
        lines = [
            f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, "
            f"{len(self.mismatched)} with the wrong shape ({len(self.loaded)} loadable)"
        ]
        if self.missing:
            lines.append(f"  missing from the checkpoint ({len(self.missing)}): {_name_list(self.missing)}")
        if self.unexpected:
            lines.append(f"  not in the model ({len(self.unexpected)}): {_name_list(self.unexpected)}")
        if self.mismatched:
            shown = [f"{name} checkpoint {tuple(got)} vs model {tuple(want)}" for name, got, want in self.mismatched]
            lines.append(f"  shape mismatch ({len(self.mismatched)}): {_name_list(shown)}")
        return "\n".join(lines)


def _name_list(names, limit=_LIST_LIMIT):
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... and {len(names) - limit} more" if len(names) > limit else "")


def _param_to_numpy(param, dtype=None):
    array = (param.astype(ms.float32) if param.dtype == ms.bfloat16 else param).asnumpy()
    if dtype is not None and np.issubdtype(array.dtype, np.floating):
        array = array.astype(ms.dtype_to_nptype(dtype))
    return _to_numpy_friendly(array)


def cell_state_dict(cell, dtype=None):
    """{parameter name: numpy array} for every parameter of `cell`; names are the PyTorch state-dict keys.
    `dtype` (e.g. ms.float16) casts floating-point parameters; integer ones keep their type."""
    return {name: _param_to_numpy(param, dtype) for name, param in cell.parameters_and_names()}


def _ignore_predicate(ignore):
    if ignore is None:
        return lambda name: False
    if callable(ignore):
        return ignore
    if isinstance(ignore, str):
        ignore = [ignore]
    patterns = tuple(ignore)
    return lambda name: any(pattern in name for pattern in patterns)


def _loadable_array(name, array, source):
    array = np.asarray(array)
    if array.dtype == _BFLOAT16:
        array = array.astype(np.float32)
    if array.dtype.kind not in "biuf":
        raise CheckpointError(f"{source}: tensor {name!r} has dtype {array.dtype}, which cannot be loaded")
    return array


def load_state_dict_into(cell, state_dict, strict=True, dtype=None, ignore=None, source=None):
    """Copy `state_dict` into `cell`'s parameters name for name and return a LoadReport.

    All problems are collected first: missing keys, unexpected keys and shape mismatches. With strict=True any
    of them raises one CheckpointMismatchError listing all of them and the cell is left untouched. With
    strict=False the matching tensors load and the rest is reported in a warning.
    `dtype` (ms.float32/ms.float16/...) casts floating-point parameters on load; None keeps each parameter's
    dtype. `ignore` (predicate, or key substrings such as ["_temp."]) excuses keys from the missing check.
    `source` names the checkpoint in messages.
    """
    source = source or "checkpoint"
    excused = _ignore_predicate(ignore)
    params = dict(cell.parameters_and_names())
    report = LoadReport()
    arrays = {}
    for name, param in params.items():
        if name not in state_dict:
            (report.ignored if excused(name) else report.missing).append(name)
            continue
        array = arrays[name] = _loadable_array(name, state_dict[name], source)
        if tuple(array.shape) != tuple(param.shape):
            report.mismatched.append((name, tuple(array.shape), tuple(param.shape)))
        else:
            report.loaded.append(name)
    report.unexpected = [name for name in state_dict if name not in params]

    if not report.ok:
        message = f"{source} does not match {type(cell).__name__}: {report.describe()}"
        if strict:
            raise CheckpointMismatchError(message)
        warnings.warn(message + "\n  (strict=False: loaded the matching tensors only)", stacklevel=2)

    for name in report.loaded:
        param = params[name]
        target = dtype if dtype is not None and param.dtype in _MS_FLOATS else param.dtype
        if target != param.dtype:
            # set_data casts to the parameter's current dtype, so the parameter's dtype must change first.
            param.set_dtype(target)
        param.set_data(ms.Tensor(arrays[name], target))
    return report


# ---------------------------------------------------------------------------------------------------------
# Saving


def write_file_atomic(path, write_to):
    """Run `write_to(tmp_path)` on a temporary file next to `path`, fsync it, then rename it over `path`.

    A crash or exception at any point leaves `path` as it was (old content or absent) and removes the temp
    file; `os.replace` is atomic on POSIX and Windows when both names are on one filesystem, hence same folder.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CheckpointNotFoundError(f"cannot write {path!r}: folder {folder!r} does not exist")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        write_to(tmp)
        with open(tmp, "rb+") as handle:
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp makes the file 0600; give it the mode an ordinary open() would (umask), or keep the old file's.
        mode = os.stat(path).st_mode & 0o777 if os.path.exists(path) else default_file_mode()
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable; not possible on every platform (e.g. Windows)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def default_directory_mode():
    """The mode os.mkdir would give a new folder (0o777 less the umask): mkdtemp's folders are private (0o700),
    but a checkpoint or an exported pipeline is an ordinary output folder."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def default_file_mode():
    """The mode open() would give a new file (0o666 less the umask): mkstemp's files are private (0o600), but a
    written video or frame is an ordinary output file."""
    return default_directory_mode() & 0o666


def replace_directory_atomically(final_path, fill):
    """Fill a new folder and put it at `final_path` in one rename, replacing any folder there.

    `fill(tmp)` writes the content into a hidden temporary folder `.<name>.XXXX.tmp` beside `final_path`. An
    existing folder is first moved aside (`.<name>.XXXX.old`) and deleted only once the new one is in place, so a
    crash at any point leaves either the old folder, the new one, or (between the two renames) the old one under
    the aside name -- never a half-written folder under `final_path`. A failing `fill` removes the temporary
    folder, restores nothing it did not move and re-raises. Returns `final_path`."""
    final_path = os.fspath(final_path)
    parent, name = os.path.split(os.path.abspath(final_path))
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{name}.", suffix=".tmp")
    aside = None
    try:
        os.chmod(tmp, default_directory_mode())
        fill(tmp)
        if os.path.exists(final_path):
            aside = tempfile.mkdtemp(dir=parent, prefix=f".{name}.", suffix=".old")
            os.replace(final_path, os.path.join(aside, name))
        os.replace(tmp, final_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if aside is not None and not os.path.exists(final_path) and os.path.exists(os.path.join(aside, name)):
            os.replace(os.path.join(aside, name), final_path)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return final_path


def save_state_dict(state_dict, path, metadata=None):
    """Write {name: array} to `path` as safetensors, atomically. `metadata` (str -> str) goes in the header;
    {"format": "pt"} is added unless given, because diffusers/transformers refuse files without it."""
    header = {"format": "pt"}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise CheckpointError(f"safetensors metadata must map str -> str; got {key!r}: {value!r} for {path!r}")
        header[key] = value
    tensors = {}
    for name, value in state_dict.items():
        if isinstance(value, (ms.Tensor, ms.Parameter)):
            value = _param_to_numpy(value)
        tensors[name] = np.ascontiguousarray(value)

    def write_to(tmp):
        safetensors.numpy.save_file(tensors, tmp, metadata=header)

    write_file_atomic(path, write_to)


def save_cell(cell, path, metadata=None, dtype=None):
    """Save every parameter of `cell` to safetensors at `path` (see cell_state_dict, save_state_dict)."""
    save_state_dict(cell_state_dict(cell, dtype=dtype), path, metadata=metadata)


def write_text_atomic(text, path):
    """Write the string `text` (UTF-8) to `path`, atomically."""
    def write_to(tmp):
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)

    write_file_atomic(path, write_to)


def write_json_atomic(obj, path):
    """Write `obj` as indented JSON to `path`, atomically."""
    write_text_atomic(json.dumps(obj, indent=2) + "\n", path)


def read_json(path, what="JSON file"):
    """Parse the JSON file at `path`; `what` names it in errors ("UNet config", "sharded index", ...)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{what} {path!r} does not exist") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(
            f"{what} {path!r} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read {what} {path!r}: {exc}") from exc
