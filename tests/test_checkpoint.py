"""tav.checkpoint: safetensors and torch-free .bin reading, strict name-for-name loading, atomic saving."""
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import zipfile

import mindspore as ms
import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy
from mindspore import nn

from tav import nn as tnn
from tav.checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    LoadReport,
    UnsafePickleError,
    cell_state_dict,
    find_weights_file,
    load_state_dict_into,
    read_json,
    read_state_dict,
    save_cell,
    save_state_dict,
    write_json_atomic,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_REASON = "torch (test-only) is needed to write reference .bin files with torch.save"


class TinyModel(nn.Cell):
    """Two Linears around a GroupNorm; parameter names blocks.{0,1,2}.{weight,bias} as in a PyTorch ModuleList."""

    def __init__(self, dtype=ms.float32):
        super().__init__()
        self.blocks = nn.CellList(
            [tnn.Linear(6, 8, dtype=dtype), tnn.GroupNorm(2, 8, dtype=dtype), tnn.Linear(8, 3, dtype=dtype)]
        )


class TinyInflated(TinyModel):
    """TinyModel plus a new temporal layer, like the UNet's `attn_temp` added on top of 2-D weights."""

    def __init__(self):
        super().__init__()
        self.attn_temp = tnn.Linear(3, 3)


NAMES = ["blocks.0.weight", "blocks.0.bias", "blocks.1.weight", "blocks.1.bias", "blocks.2.weight", "blocks.2.bias"]


def make_model(seed, dtype=ms.float32, cls=TinyModel):
    """A model whose every parameter (GroupNorm's too) is random, so a missed copy shows up."""
    model = cls(dtype=dtype) if cls is TinyModel else cls()
    rng = np.random.default_rng(seed)
    for _, param in model.parameters_and_names():
        values = rng.standard_normal(param.shape).astype(ms.dtype_to_nptype(param.dtype))
        param.set_data(ms.Tensor(values, param.dtype))
    return model


def assert_same_arrays(actual, expected):
    assert sorted(actual) == sorted(expected)
    for name in expected:
        assert actual[name].dtype == expected[name].dtype, name
        assert actual[name].shape == expected[name].shape, name
        assert actual[name].tobytes() == expected[name].tobytes(), name


def snapshot(model):
    return {name: array.copy() for name, array in cell_state_dict(model).items()}


# --- safetensors round trip ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [ms.float32, ms.float16], ids=["fp32", "fp16"])
def test_safetensors_round_trip_is_bit_exact(tmp_path, dtype):
    source, target = make_model(0, dtype), make_model(1, dtype)
    path = tmp_path / "model.safetensors"
    save_cell(source, path)
    report = load_state_dict_into(target, read_state_dict(path))
    assert report.loaded == NAMES and report.ok
    assert_same_arrays(cell_state_dict(target), cell_state_dict(source))
    assert all(p.dtype == dtype for _, p in target.parameters_and_names())


def test_cell_state_dict_uses_pytorch_key_names(tmp_path):
    state = cell_state_dict(make_model(0))
    assert list(state) == NAMES
    assert state["blocks.0.weight"].shape == (8, 6) and state["blocks.1.bias"].shape == (8,)


def test_saved_file_carries_format_pt_and_caller_metadata(tmp_path):
    path = tmp_path / "model.safetensors"
    save_cell(make_model(0), path, metadata={"tav_step": "10"})
    with safetensors.safe_open(str(path), framework="np") as handle:
        assert handle.metadata() == {"format": "pt", "tav_step": "10"}


def test_save_cell_dtype_writes_half_precision(tmp_path):
    source = make_model(0)
    path = tmp_path / "model.safetensors"
    save_cell(source, path, dtype=ms.float16)
    state = read_state_dict(path)
    assert {a.dtype for a in state.values()} == {np.dtype(np.float16)}
    expected = cell_state_dict(source)["blocks.0.weight"].astype(np.float16)
    np.testing.assert_array_equal(state["blocks.0.weight"], expected)


def test_load_with_dtype_casts_parameters(tmp_path):
    source, target = make_model(0), make_model(1)
    load_state_dict_into(target, cell_state_dict(source), dtype=ms.float16)
    assert {p.dtype for _, p in target.parameters_and_names()} == {ms.float16}
    expected = {k: v.astype(np.float16) for k, v in cell_state_dict(source).items()}
    assert_same_arrays(cell_state_dict(target), expected)


def test_bfloat16_safetensors_read_as_float32(tmp_path):
    values = np.array([1.5, -2.25, 3.0e-3], dtype=np.float32).astype(ml_dtypes.bfloat16)
    path = tmp_path / "bf16.safetensors"
    safetensors.numpy.save_file({"w": values}, str(path))
    state = read_state_dict(path)
    assert state["w"].dtype == np.float32
    np.testing.assert_array_equal(state["w"], values.astype(np.float32))


# --- PyTorch .bin without torch -------------------------------------------------------------------------


def torch_copy_of(model, torch):
    """The same weights in a torch ModuleList, so torch.save writes a genuine module state dict."""
    module = torch.nn.Module()
    module.blocks = torch.nn.ModuleList([torch.nn.Linear(6, 8), torch.nn.GroupNorm(2, 8), torch.nn.Linear(8, 3)])
    state = cell_state_dict(model)
    module.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()})
    return module


@pytest.mark.parity
def test_bin_from_torch_module_matches_safetensors(tmp_path):
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    model = make_model(0)
    torch.save(torch_copy_of(model, torch).state_dict(), tmp_path / "model.bin")
    save_cell(model, tmp_path / "model.safetensors")
    from_bin = read_state_dict(tmp_path / "model.bin")
    assert_same_arrays(from_bin, read_state_dict(tmp_path / "model.safetensors"))
    target = make_model(1)
    load_state_dict_into(target, from_bin)
    assert_same_arrays(cell_state_dict(target), cell_state_dict(model))


def special_tensors(torch):
    base = torch.arange(20, dtype=torch.float32).reshape(4, 5) * 0.5 - 3
    return {
        "base": base,
        "half": (torch.arange(6, dtype=torch.float32) / 7).to(torch.float16).reshape(2, 3),
        "transposed_view": base.t(),  # stride (1, 5), shares base's storage
        "offset_slice": base.view(-1)[7:12],  # storage offset 7, shares base's storage
        "strided_columns": base[1:, ::2],  # offset 5, stride (5, 2)
        "bf16": torch.tensor([1.5, -2.25, 1e-3]).to(torch.bfloat16),
        "int64": torch.arange(4, dtype=torch.int64) - 2,
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "param": torch.nn.Parameter(torch.ones(2, 2) * 4),
    }


def torch_reference(tensors, torch):
    """torch's own values as numpy; bfloat16 widened to float32 as read_state_dict does."""
    return {
        name: (t.detach().float() if t.dtype == torch.bfloat16 else t.detach()).contiguous().numpy()
        for name, t in tensors.items()
    }


@pytest.mark.parity
def test_bin_reads_views_offsets_and_dtypes_like_torch(tmp_path):
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    tensors = special_tensors(torch)
    path = tmp_path / "special.bin"
    torch.save(tensors, path)
    with zipfile.ZipFile(path) as archive:  # the views really were saved as views of one shared storage
        storages = [n for n in archive.namelist() if "/data/" in n]
    assert len(storages) < len(tensors)

    state = read_state_dict(path)
    assert_same_arrays(state, torch_reference(tensors, torch))
    assert state["half"].dtype == np.float16 and state["bf16"].dtype == np.float32
    assert state["transposed_view"].flags["C_CONTIGUOUS"] and state["transposed_view"].shape == (5, 4)
    np.testing.assert_array_equal(state["offset_slice"], np.arange(7, 12) * 0.5 - 3)


@pytest.mark.parity
def test_bin_reader_never_imports_torch(tmp_path):
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    tensors = special_tensors(torch)
    torch.save(tensors, tmp_path / "special.bin")
    np.savez(tmp_path / "expected.npz", **torch_reference(tensors, torch))
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        import numpy as np
        from tav.checkpoint import read_state_dict
        state = read_state_dict({str(tmp_path / "special.bin")!r})
        expected = np.load({str(tmp_path / "expected.npz")!r})
        assert sorted(state) == sorted(expected.files), (sorted(state), expected.files)
        for name in expected.files:
            assert state[name].dtype == expected[name].dtype and state[name].tobytes() == expected[name].tobytes(), name
        assert sys.modules["torch"] is None
        print("read", len(state), "tensors without torch")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"read {len(tensors)} tensors without torch" in result.stdout


# Hand-written protocol-2 pickles, so these tests need no torch at all.


def _str(text):
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _int(value):
    return b"J" + struct.pack("<i", value)


def _global(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _tuple(values):
    return b"(" + b"".join(_int(v) for v in values) + b"t"


def tensor_pickle(name, numel, offset, size, stride):
    """data.pkl for {name: tensor} laid out as torch.save writes it (FloatStorage key '0')."""
    storage = b"(" + _str("storage") + _global("torch", "FloatStorage") + _str("0") + _str("cpu") + _int(numel) + b"t"
    args = b"(" + storage + b"Q" + _int(offset) + _tuple(size) + _tuple(stride) + b"\x89" + b"}" + b"t"
    return b"\x80\x02}" + _str(name) + _global("torch._utils", "_rebuild_tensor_v2") + args + b"Rs."


def write_torch_zip(path, data_pkl, storages=None):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/version", "3\n")
        archive.writestr("archive/byteorder", "little")
        for key, raw in (storages or {}).items():
            archive.writestr(f"archive/data/{key}", raw)


def test_hand_built_bin_reads_without_torch(tmp_path):
    storage = np.arange(12, dtype="<f4")
    path = tmp_path / "hand.bin"
    write_torch_zip(path, tensor_pickle("w", 12, 2, (3, 2), (1, 3)), {"0": storage.tobytes()})
    expected = np.lib.stride_tricks.as_strided(storage[2:], shape=(3, 2), strides=(4, 12))
    np.testing.assert_array_equal(read_state_dict(path)["w"], expected)


def test_bin_layout_overrunning_its_storage_is_refused(tmp_path):
    path = tmp_path / "overrun.bin"
    write_torch_zip(path, tensor_pickle("w", 4, 2, (3,), (1,)), {"0": np.zeros(4, "<f4").tobytes()})
    with pytest.raises(CheckpointError, match="overruns its storage"):
        read_state_dict(path)


class _CallsGlobal:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _malicious_cases(marker):
    import builtins

    return {
        "os.system": (os.system, (f"touch {marker}",)),
        "builtins.eval": (builtins.eval, (f"open({str(marker)!r}, 'w').close()",)),
        "subprocess.Popen": (subprocess.Popen, (["touch", str(marker)],)),
    }


@pytest.mark.parametrize("case", ["os.system", "builtins.eval", "subprocess.Popen"])
def test_malicious_bin_is_refused_and_never_executed(tmp_path, case):
    marker = tmp_path / "pwned"
    func, args = _malicious_cases(marker)[case]
    payload = pickle.dumps({"weight": _CallsGlobal(func, args)}, protocol=2)
    path = tmp_path / "evil.bin"
    write_torch_zip(path, payload)
    refused = {"os.system": ("posix.system", "os.system", "nt.system")}.get(case, (case,))
    with pytest.raises(UnsafePickleError) as excinfo:
        read_state_dict(path)
    assert any(name in str(excinfo.value) for name in refused), str(excinfo.value)
    assert str(path) in str(excinfo.value)
    assert not marker.exists()


def test_unsupported_storage_type_is_an_error_not_a_security_refusal(tmp_path):
    path = tmp_path / "fp8.bin"
    pkl = tensor_pickle("w", 4, 0, (4,), (1,)).replace(b"FloatStorage", b"Float8_e4m3fnStorage")
    write_torch_zip(path, pkl, {"0": bytes(4)})
    with pytest.raises(CheckpointError, match="torch.Float8_e4m3fnStorage") as excinfo:
        read_state_dict(path)
    assert not isinstance(excinfo.value, UnsafePickleError)


def test_legacy_non_zip_torch_pickle_is_reported_as_unsupported(tmp_path):
    path = tmp_path / "legacy.bin"
    path.write_bytes(pickle.dumps({"w": [1.0]}, protocol=2))
    with pytest.raises(CheckpointError, match="legacy") as excinfo:
        read_state_dict(path)
    assert str(path) in str(excinfo.value)


# --- strict name-for-name loading -------------------------------------------------------------------------


def test_missing_key_is_named():
    state = cell_state_dict(make_model(0))
    del state["blocks.2.bias"]
    with pytest.raises(CheckpointMismatchError, match=r"missing from the checkpoint \(1\): blocks\.2\.bias"):
        load_state_dict_into(make_model(1), state)


def test_unexpected_key_is_named():
    state = cell_state_dict(make_model(0))
    state["blocks.3.weight"] = np.zeros((2, 2), np.float32)
    with pytest.raises(CheckpointMismatchError, match=r"not in the model \(1\): blocks\.3\.weight"):
        load_state_dict_into(make_model(1), state)


def test_wrong_shape_is_named_with_both_shapes():
    state = cell_state_dict(make_model(0))
    state["blocks.0.weight"] = np.zeros((8, 5), np.float32)
    with pytest.raises(CheckpointMismatchError, match=r"blocks\.0\.weight checkpoint \(8, 5\) vs model \(8, 6\)"):
        load_state_dict_into(make_model(1), state)


def mismatched_state():
    state = cell_state_dict(make_model(0))
    del state["blocks.2.bias"]
    state["blocks.3.weight"] = np.zeros((2, 2), np.float32)
    state["blocks.0.weight"] = np.zeros((8, 5), np.float32)
    return state


def test_all_problems_are_listed_in_one_error():
    with pytest.raises(CheckpointMismatchError) as excinfo:
        load_state_dict_into(make_model(1), mismatched_state(), source="unet/model.safetensors")
    message = str(excinfo.value)
    assert message.startswith("unet/model.safetensors does not match TinyModel")
    assert "1 missing, 1 unexpected, 1 with the wrong shape" in message
    for name in ("blocks.2.bias", "blocks.3.weight", "blocks.0.weight"):
        assert name in message


def test_failed_strict_load_leaves_the_cell_unchanged():
    target = make_model(1)
    before = snapshot(target)
    state = cell_state_dict(make_model(0))  # five of six tensors are fine and differ from the target's
    state["blocks.2.bias"] = np.zeros((4,), np.float32)
    with pytest.raises(CheckpointMismatchError):
        load_state_dict_into(target, state)
    assert_same_arrays(cell_state_dict(target), before)


def test_non_strict_load_warns_and_loads_the_rest():
    source, target = make_model(0), make_model(1)
    before = snapshot(target)
    with pytest.warns(UserWarning, match=r"blocks\.2\.bias[\s\S]*blocks\.3\.weight[\s\S]*blocks\.0\.weight"):
        report = load_state_dict_into(target, mismatched_state(), strict=False)
    assert isinstance(report, LoadReport) and not report.ok
    assert report.missing == ["blocks.2.bias"]
    assert report.unexpected == ["blocks.3.weight"]
    assert report.mismatched == [("blocks.0.weight", (8, 5), (8, 6))]
    assert report.loaded == ["blocks.0.bias", "blocks.1.weight", "blocks.1.bias", "blocks.2.weight"]
    after, wanted = cell_state_dict(target), cell_state_dict(source)
    for name in report.loaded:
        np.testing.assert_array_equal(after[name], wanted[name])
    for name in ("blocks.0.weight", "blocks.2.bias"):
        np.testing.assert_array_equal(after[name], before[name])


def test_long_problem_lists_are_truncated_but_counted():
    state = cell_state_dict(make_model(0))
    for i in range(30):
        state[f"extra.{i:02d}.weight"] = np.zeros(1, np.float32)
    with pytest.raises(CheckpointMismatchError) as excinfo:
        load_state_dict_into(make_model(1), state)
    message = str(excinfo.value)
    assert "not in the model (30)" in message and "... and 10 more" in message
    assert "extra.19.weight" in message and "extra.20.weight" not in message


@pytest.mark.parametrize(
    "ignore", [["_temp."], lambda name: name.startswith("attn_temp")], ids=["substring", "predicate"]
)
def test_ignore_excuses_new_layers_from_the_missing_check(ignore):
    target = make_model(1, cls=TinyInflated)
    temporal_before = snapshot(target)["attn_temp.weight"]
    pretrained = cell_state_dict(make_model(0))
    report = load_state_dict_into(target, pretrained, ignore=ignore)
    assert report.ignored == ["attn_temp.weight", "attn_temp.bias"] and report.missing == []
    after = cell_state_dict(target)
    np.testing.assert_array_equal(after["attn_temp.weight"], temporal_before)
    np.testing.assert_array_equal(after["blocks.0.weight"], pretrained["blocks.0.weight"])


def test_new_layers_are_missing_without_ignore():
    with pytest.raises(CheckpointMismatchError, match=r"attn_temp\.weight"):
        load_state_dict_into(make_model(1, cls=TinyInflated), cell_state_dict(make_model(0)))


# --- atomic saving ----------------------------------------------------------------------------------------


def test_failed_save_keeps_the_previous_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    save_cell(make_model(0), path)
    original = path.read_bytes()

    def crash_midway(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half a file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", crash_midway)
    with pytest.raises(RuntimeError, match="disk full"):
        save_cell(make_model(1), path)
    assert path.read_bytes() == original
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_failed_first_save_creates_nothing(tmp_path, monkeypatch):
    def crash(tensors, filename, metadata=None):
        raise RuntimeError("killed")

    monkeypatch.setattr(safetensors.numpy, "save_file", crash)
    with pytest.raises(RuntimeError):
        save_state_dict({"w": np.ones(2, np.float32)}, tmp_path / "new.safetensors")
    assert os.listdir(tmp_path) == []


def test_save_replaces_existing_file_with_an_ordinary_mode(tmp_path):
    path = tmp_path / "w.safetensors"
    save_state_dict({"w": np.ones(2, np.float32)}, path)
    save_state_dict({"w": np.full(3, 7, np.float16)}, path)
    np.testing.assert_array_equal(read_state_dict(path)["w"], np.full(3, 7, np.float16))
    assert os.stat(path).st_mode & 0o777 == 0o644
    assert os.listdir(tmp_path) == ["w.safetensors"]


def test_json_round_trip_and_failed_write_keeps_old_file(tmp_path):
    path = tmp_path / "config.json"
    write_json_atomic({"in_channels": 4, "down_block_types": ["CrossAttnDownBlock3D"]}, path)
    assert read_json(path) == {"in_channels": 4, "down_block_types": ["CrossAttnDownBlock3D"]}
    with pytest.raises(TypeError):
        write_json_atomic({"bad": object()}, path)
    assert read_json(path)["in_channels"] == 4
    assert os.listdir(tmp_path) == ["config.json"]


# --- finding weights, shards ----------------------------------------------------------------------------


def test_find_weights_prefers_safetensors(tmp_path):
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"")
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    assert find_weights_file(tmp_path) == str(tmp_path / "diffusion_pytorch_model.safetensors")


def test_find_weights_falls_back_to_bin_and_takes_a_stem(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    assert find_weights_file(tmp_path, stem="pytorch_model") == str(tmp_path / "pytorch_model.bin")


def test_find_weights_bin_stem_for_transformers_layout(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    assert find_weights_file(tmp_path, stem="model", bin_stem="pytorch_model") == str(tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert find_weights_file(tmp_path, stem="model", bin_stem="pytorch_model") == str(tmp_path / "model.safetensors")


def test_find_weights_errors_name_the_folder_and_candidates(tmp_path):
    with pytest.raises(CheckpointNotFoundError) as excinfo:
        find_weights_file(tmp_path)
    message = str(excinfo.value)
    assert str(tmp_path) in message
    assert "diffusion_pytorch_model.safetensors" in message and "diffusion_pytorch_model.bin" in message
    with pytest.raises(CheckpointError, match="does not exist") as excinfo:
        find_weights_file(tmp_path / "unet")
    assert str(tmp_path / "unet") in str(excinfo.value)


def write_shards(folder, state):
    names = list(state)
    shards = {"model-00001-of-00002.safetensors": names[:3], "model-00002-of-00002.safetensors": names[3:]}
    for shard, keys in shards.items():
        save_state_dict({k: state[k] for k in keys}, folder / shard)
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    write_json_atomic(index, folder / "diffusion_pytorch_model.safetensors.index.json")
    return weight_map


def test_sharded_safetensors_are_found_and_read(tmp_path):
    state = cell_state_dict(make_model(0))
    write_shards(tmp_path, state)
    path = find_weights_file(tmp_path)
    assert path == str(tmp_path / "diffusion_pytorch_model.safetensors.index.json")
    assert_same_arrays(read_state_dict(path), state)


def test_sharded_index_with_missing_shard_names_it(tmp_path):
    write_shards(tmp_path, cell_state_dict(make_model(0)))
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        read_state_dict(tmp_path / "diffusion_pytorch_model.safetensors.index.json")


def test_sharded_index_with_tensor_absent_from_its_shard_names_it(tmp_path):
    weight_map = write_shards(tmp_path, cell_state_dict(make_model(0)))
    weight_map["blocks.9.weight"] = "model-00001-of-00002.safetensors"
    write_json_atomic({"weight_map": weight_map}, tmp_path / "diffusion_pytorch_model.safetensors.index.json")
    with pytest.raises(CheckpointError, match=r"blocks\.9\.weight"):
        read_state_dict(tmp_path / "diffusion_pytorch_model.safetensors.index.json")


@pytest.mark.parity
def test_sharded_bin_index_is_read(tmp_path):
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    state = cell_state_dict(make_model(0))
    names = list(state)
    torch.save({k: torch.from_numpy(state[k]) for k in names[:2]}, tmp_path / "a.bin")
    torch.save({k: torch.from_numpy(state[k]) for k in names[2:]}, tmp_path / "b.bin")
    weight_map = {k: ("a.bin" if k in names[:2] else "b.bin") for k in names}
    write_json_atomic({"weight_map": weight_map}, tmp_path / "diffusion_pytorch_model.bin.index.json")
    path = find_weights_file(tmp_path)
    assert path.endswith("diffusion_pytorch_model.bin.index.json")
    assert_same_arrays(read_state_dict(path), state)


# --- damaged files ----------------------------------------------------------------------------------------


def test_missing_checkpoint_file_is_named(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="nothere.safetensors"):
        read_state_dict(tmp_path / "nothere.safetensors")


def test_truncated_safetensors_names_the_path(tmp_path):
    path = tmp_path / "model.safetensors"
    save_cell(make_model(0), path)
    path.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
    with pytest.raises(CheckpointError) as excinfo:
        read_state_dict(path)
    assert str(path) in str(excinfo.value)


def test_non_zip_bin_names_the_path(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="not a PyTorch zip checkpoint") as excinfo:
        read_state_dict(path)
    assert str(path) in str(excinfo.value)


def test_zip_without_data_pkl_names_the_path(tmp_path):
    path = tmp_path / "model.bin"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/version", "3\n")
    with pytest.raises(CheckpointError, match="data.pkl") as excinfo:
        read_state_dict(path)
    assert str(path) in str(excinfo.value)


def test_bin_with_missing_storage_record_names_the_path(tmp_path):
    path = tmp_path / "model.bin"
    write_torch_zip(path, tensor_pickle("w", 4, 0, (4,), (1,)))  # no archive/data/0
    with pytest.raises(CheckpointError, match="archive/data/0") as excinfo:
        read_state_dict(path)
    assert str(path) in str(excinfo.value)


def test_garbage_json_names_the_file_and_position(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"in_channels": 4,,}')
    with pytest.raises(CheckpointError, match=r"UNet config .*config\.json.* is not valid JSON: .*line 1"):
        read_json(path, what="UNet config")


def test_missing_json_names_the_file(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match=r"scheduler config .*scheduler_config\.json.* does not exist"):
        read_json(tmp_path / "scheduler_config.json", what="scheduler config")


def test_unknown_extension_is_refused(tmp_path):
    path = tmp_path / "weights.ckpt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="cannot tell the format"):
        read_state_dict(path)
