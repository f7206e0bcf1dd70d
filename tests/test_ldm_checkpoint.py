"""Single-file SD checkpoints: the tiny model written in each LDM container loads as the diffusers folder does."""
import os
import re

import numpy as np
import pytest

import mindspore as ms

from tav import checkpoint, ldm_checkpoint
from tav.ldm_checkpoint import SingleFileError
from tests.ldm_fixtures import CONTAINERS, ldm_state, tiny, write_container  # noqa: F401 (fixtures)

MINDONE_LISTS = os.path.join(os.path.dirname(__import__("mindone").__file__), "tools", "sd_torch_to_mindspore")
COMPONENTS = (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model"))


def folder_weights(folder):
    return {name: checkpoint.read_state_dict(os.path.join(folder, name, stem + ".safetensors"))
            for name, stem in COMPONENTS}


def assert_same_weights(got, expected):
    for name in expected:
        assert sorted(got[name]) == sorted(expected[name]), name
        for key, value in expected[name].items():
            np.testing.assert_array_equal(got[name][key], value, err_msg=f"{name}: {key}")




# ---------------------------------------------------------------------------------------------------------------
# The real SD key sets (mindone ships the name/shape lists of SD 1.5 and 2.1 in both layouts)


def shaped_zeros(list_name):
    path = os.path.join(MINDONE_LISTS, list_name)
    if not os.path.isfile(path):
        pytest.skip(f"mindone's SD key list {path} is not installed")
    state = {}
    for line in open(path, encoding="utf-8"):
        key, shape, _ = line.strip().split("#")
        state[key] = np.broadcast_to(np.float32(0), tuple(int(d) for d in re.findall(r"\d+", shape)))
    return state


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_real_sd_layouts_infer_the_published_configs(version):
    converted = {}
    for layout in ("torch", "mindspore"):
        model = ldm_checkpoint.convert_state_dict(shaped_zeros(f"{layout}_{version}.txt"), f"{layout}_{version}")
        converted[layout] = model
    model = converted["torch"]
    unet, vae, text = (model.configs[n] for n in ("unet", "vae", "text_encoder"))
    assert model.family == ("sd1" if version == "v1" else "sd2")
    assert unet["block_out_channels"] == [320, 640, 1280, 1280] and unet["layers_per_block"] == 2
    assert unet["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert unet["up_block_types"] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    if version == "v1":
        assert (unet["cross_attention_dim"], unet["attention_head_dim"], unet["use_linear_projection"]) == (768, 8, False)
        assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"]) == (768, 12, 12)
        assert text["hidden_act"] == "quick_gelu"
    else:
        assert (unet["cross_attention_dim"], unet["attention_head_dim"], unet["use_linear_projection"]) == \
            (1024, [5, 10, 20, 20], True)
        assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"]) == (1024, 23, 16)
        assert text["hidden_act"] == "gelu"
    assert vae["block_out_channels"] == [128, 256, 512, 512] and vae["latent_channels"] == 4
    for name in ("unet", "vae", "text_encoder"):  # mindone's MindSpore names reach the same diffusers names
        assert sorted(converted["mindspore"].state_dicts[name]) == sorted(model.state_dicts[name]), name
        assert converted["mindspore"].configs[name] == model.configs[name], name


# ---------------------------------------------------------------------------------------------------------------
# The tiny model in each container


@pytest.mark.parametrize("kind", CONTAINERS)
def test_each_container_gives_the_folders_state_dicts(tiny, ldm_state, tmp_path, kind):
    path = write_container(kind, ldm_state, str(tmp_path))
    model = ldm_checkpoint.convert_single_file(path, config_from=tiny)
    assert model.container == ("mindspore" if kind == "mindspore" else kind)
    assert_same_weights(model.state_dicts, folder_weights(tiny))


@pytest.mark.parametrize("kind", CONTAINERS)
def test_shapes_give_the_tiny_configs(tiny, ldm_state, tmp_path, kind):
    """Everything but what tensors cannot hold (head counts, GroupNorm groups) is inferred."""
    model = ldm_checkpoint.convert_single_file(write_container(kind, ldm_state, str(tmp_path)))
    not_in_tensors = {"unet": {"attention_head_dim", "norm_num_groups", "sample_size"},
                      "vae": {"norm_num_groups", "sample_size"},
                      "text_encoder": {"num_attention_heads", "projection_dim", "bos_token_id", "eos_token_id",
                                       "pad_token_id"}}
    for name, skip in not_in_tensors.items():
        expected = checkpoint.read_json(os.path.join(tiny, name, "config.json"))
        for key, value in expected.items():
            if key in skip or key.startswith("_") or key not in model.configs[name]:
                continue
            assert model.configs[name][key] == value, f"{name}.{key}"


def load_pipeline(folder):
    from tav.pipeline import TuneAVideoPipeline

    ms.set_seed(0)  # the temporal layers the inflation adds are seeded, so both loads get the same ones
    return TuneAVideoPipeline.from_pretrained(folder)


def outputs(pipeline, parts=("unet", "vae", "text_encoder")):
    rng = np.random.default_rng(0)
    sample = ms.Tensor(rng.standard_normal((1, 4, 2, 8, 8)).astype(np.float32))
    context = ms.Tensor(rng.standard_normal((1, 5, 32)).astype(np.float32))
    pixels = ms.Tensor(rng.uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32))
    ids = ms.Tensor(np.array([[998, 5, 77, 300, 999, 999]], dtype=np.int64))
    run = {"unet": lambda: pipeline.unet(sample, 10, context).asnumpy(),
           "vae": lambda: pipeline.vae.decode(pipeline.vae.encode_moments(pixels)[:, :4]).asnumpy(),
           "text_encoder": lambda: pipeline.text_encoder(ids)[0].asnumpy()}
    return {part: run[part]() for part in parts}


@pytest.mark.parametrize("kind", CONTAINERS)
def test_pipeline_from_a_single_file_gives_identical_outputs(tiny, ldm_state, tmp_path, kind, pynative):
    path = write_container(kind, ldm_state, str(tmp_path))
    folder = ldm_checkpoint.resolve_pretrained(path, config_from=tiny)
    expected, got = outputs(load_pipeline(tiny)), outputs(load_pipeline(folder))
    for name in expected:
        assert np.abs(expected[name]).mean() > 1e-3, name
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_resolve_pretrained_returns_a_folder_unchanged_and_reuses_its_cache(tiny, ldm_state, tmp_path):
    assert ldm_checkpoint.resolve_pretrained(tiny) == tiny
    path = write_container("safetensors", ldm_state, str(tmp_path))
    first = ldm_checkpoint.resolve_pretrained(path, config_from=tiny, cache_dir=str(tmp_path / "cache"))
    mtime = os.stat(os.path.join(first, "unet", "config.json")).st_mtime_ns
    again = ldm_checkpoint.resolve_pretrained(path, config_from=tiny, cache_dir=str(tmp_path / "cache"))
    assert again == first and os.stat(os.path.join(again, "unet", "config.json")).st_mtime_ns == mtime
    assert ldm_checkpoint.single_file_source(first) == os.path.abspath(path)
    assert ldm_checkpoint.single_file_source(tiny) is None


def test_without_a_cache_dir_one_process_converts_a_file_once(tiny, ldm_state, tmp_path, monkeypatch):
    """Training loads the models, then validation and the export load the same file again: the temporary folder of
    the first conversion serves them while the file is unchanged; a changed file is converted again."""
    path = write_container("safetensors", ldm_state, str(tmp_path))
    first = ldm_checkpoint.resolve_pretrained(path, config_from=tiny)
    conversions = []
    real_convert = ldm_checkpoint.convert_single_file
    monkeypatch.setattr(ldm_checkpoint, "convert_single_file", lambda *a, **k: conversions.append(a) or
                        real_convert(*a, **k))
    assert ldm_checkpoint.resolve_pretrained(path, config_from=tiny) == first and not conversions
    name = next(iter(ldm_state))
    write_container("safetensors", {**ldm_state, name: ldm_state[name] * 2}, str(tmp_path))
    later = os.stat(path).st_mtime + 10
    os.utime(path, (later, later))  # the same second as the first write would otherwise look unchanged
    changed = ldm_checkpoint.resolve_pretrained(path, config_from=tiny)
    assert changed != first and len(conversions) == 1


# ---------------------------------------------------------------------------------------------------------------
# SD 2.x's OpenCLIP text layout


def test_openclip_layout_round_trips_the_text_encoder(tiny):
    text = folder_weights(tiny)["text_encoder"]
    ldm = ldm_checkpoint.folder_to_ldm(tiny, family="sd2")
    prefix = ldm_checkpoint.OPENCLIP_PREFIX
    assert f"{prefix}transformer.resblocks.0.attn.in_proj_weight" in ldm
    assert f"{prefix}transformer.resblocks.2.ln_1.weight" in ldm  # the unused last block LDM's tower has
    model = ldm_checkpoint.convert_state_dict(ldm, "openclip")
    assert model.family == "sd2"
    assert_same_weights({"text_encoder": model.state_dicts["text_encoder"]}, {"text_encoder": text})


@pytest.mark.parity
def test_openclip_split_matches_diffusers(tiny):
    torch, _ = pytest.importorskip("torch"), None
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    ldm = ldm_checkpoint.folder_to_ldm(tiny, family="sd2")
    # diffusers drops SD 2's 24th block by its fixed name; the tiny tower's unused block is removed here instead.
    last = max(int(m.group(1)) for k in ldm for m in [re.search(r"resblocks\.(\d+)\.", k)] if m)
    torch_state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in ldm.items()
                   if f"resblocks.{last}." not in k}
    expected = convert_open_clip_checkpoint(None, torch_state)
    expected.pop("text_projection.weight", None)
    got = ldm_checkpoint.convert_state_dict(ldm, "openclip").state_dicts["text_encoder"]
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value.numpy(), err_msg=key)


# ---------------------------------------------------------------------------------------------------------------
# Parity with diffusers' own conversion functions


@pytest.mark.parity
def test_conversion_matches_diffusers_converters(tiny, ldm_state):
    torch = pytest.importorskip("torch")
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)

    torch_state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in ldm_state.items()}
    configs = {name: checkpoint.read_json(os.path.join(tiny, name, "config.json")) for name, _ in COMPONENTS}
    expected = {"unet": convert_ldm_unet_checkpoint(torch_state, configs["unet"]),
                "vae": convert_ldm_vae_checkpoint(torch_state, configs["vae"]),
                "text_encoder": convert_ldm_clip_checkpoint(torch_state)}
    got = ldm_checkpoint.convert_state_dict(ldm_state, "tiny", config_from=tiny).state_dicts
    for name in expected:
        assert sorted(got[name]) == sorted(expected[name]), name
        for key, value in expected[name].items():
            np.testing.assert_array_equal(got[name][key], value.numpy(), err_msg=f"{name}: {key}")


# ---------------------------------------------------------------------------------------------------------------
# tools/convert.py


def test_convert_tool_round_trip(tiny, ldm_state, tmp_path):
    from tools.convert import main

    source = write_container("safetensors", ldm_state, str(tmp_path))
    out_dir = str(tmp_path / "converted")
    assert main([source, out_dir, "--config_from", tiny]) == 0
    assert_same_weights(folder_weights(out_dir), folder_weights(tiny))
    assert checkpoint.read_json(os.path.join(out_dir, "scheduler", "scheduler_config.json"))["prediction_type"] == "epsilon"
    back = str(tmp_path / "back.safetensors")
    assert main([out_dir, back]) == 0
    again = checkpoint.read_state_dict(back)
    assert sorted(again) == sorted(ldm_state)
    for key, value in ldm_state.items():
        np.testing.assert_array_equal(again[key], value, err_msg=key)
    mindspore_file = str(tmp_path / "back_ms.ckpt")
    assert main([out_dir, mindspore_file]) == 0
    assert main([out_dir, mindspore_file]) == 1  # an existing output is kept unless --overwrite
    assert_same_weights(ldm_checkpoint.convert_single_file(mindspore_file, config_from=tiny).state_dicts,
                        folder_weights(tiny))


def test_prediction_type_comes_from_an_ldm_yaml_beside_the_file(tiny, ldm_state, tmp_path):
    path = write_container("safetensors", ldm_state, str(tmp_path))
    with open(os.path.splitext(path)[0] + ".yaml", "w") as handle:
        handle.write("model:\n  params:\n    parameterization: v\n    unet_config:\n      params:\n        num_heads: 2\n")
    folder = ldm_checkpoint.resolve_pretrained(path, config_from=tiny)
    scheduler = checkpoint.read_json(os.path.join(folder, "scheduler", "scheduler_config.json"))
    assert scheduler["prediction_type"] == "v_prediction"
    forced = ldm_checkpoint.resolve_pretrained(path, prediction_type="epsilon", config_from=tiny)
    assert checkpoint.read_json(os.path.join(forced, "scheduler", "scheduler_config.json"))["prediction_type"] == "epsilon"
    assert ldm_checkpoint.convert_single_file(path).configs["unet"]["attention_head_dim"] == 2


# ---------------------------------------------------------------------------------------------------------------
# Clear errors


def test_a_file_of_other_tensors_names_what_it_found(tmp_path):
    path = str(tmp_path / "lora.safetensors")
    checkpoint.save_state_dict({"lora_unet_down.alpha": np.ones(1, np.float32)}, path)
    with pytest.raises(SingleFileError, match=r"found lora_unet_down\.alpha.*model\.diffusion_model"):
        ldm_checkpoint.convert_single_file(path)


def test_a_file_that_is_no_checkpoint_says_so(tmp_path):
    path = tmp_path / "notes.ckpt"
    path.write_text("not a checkpoint")
    with pytest.raises(SingleFileError, match="neither a PyTorch zip checkpoint nor a MindSpore checkpoint"):
        ldm_checkpoint.convert_single_file(str(path))


def test_the_tokenizer_must_come_from_a_folder(ldm_state, tmp_path):
    path = write_container("safetensors", ldm_state, str(tmp_path))
    with pytest.raises(checkpoint.CheckpointNotFoundError, match="--tokenizer_from"):
        ldm_checkpoint.resolve_pretrained(path)


class CodeCarrier:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parity
def test_a_code_carrying_pickle_is_refused(ldm_state, tmp_path):
    torch = pytest.importorskip("torch")
    path = str(tmp_path / "evil.ckpt")
    torch.save({"state_dict": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in ldm_state.items()},
                "payload": CodeCarrier()}, path)
    with pytest.raises(checkpoint.UnsafePickleError, match="system"):
        ldm_checkpoint.convert_single_file(path)


@pytest.mark.parity
def test_lightning_callback_state_beside_the_weights_is_skipped(tiny, ldm_state, tmp_path, monkeypatch):
    """SD's original .ckpt files pickle a Lightning ModelCheckpoint next to the weights: it becomes an inert
    placeholder (its code is never imported or run) and the weights load."""
    import sys
    import types

    torch = pytest.importorskip("torch")
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self):
            self.best_model_score = np.float64(0.5)

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module.__name__, "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    path = str(tmp_path / "lightning.ckpt")
    torch.save({"state_dict": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in ldm_state.items()},
                "callbacks": {ModelCheckpoint: ModelCheckpoint()}, "global_step": 10}, path)
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module.__name__):
        monkeypatch.delitem(sys.modules, name)
    model = ldm_checkpoint.convert_single_file(path, config_from=tiny)
    assert_same_weights(model.state_dicts, folder_weights(tiny))


def test_an_sd2_layout_file_gives_identical_outputs(tiny, tmp_path, pynative):
    """The OpenCLIP text layout (fused in_proj, the unused last block) end to end, on an SD 2-style copy of the
    tiny model (gelu text encoder). The text encoder is compared by its weights: mindone's CLIPTextModel runs
    hidden_act="gelu" as mint's GeluExt, which MindSpore 2.10 has no CPU kernel for (either mode)."""
    import shutil

    sd2 = str(tmp_path / "sd2")
    shutil.copytree(tiny, sd2)
    config_path = os.path.join(sd2, "text_encoder", "config.json")
    checkpoint.write_json_atomic({**checkpoint.read_json(config_path), "hidden_act": "gelu"}, config_path)
    path = str(tmp_path / "sd2.safetensors")
    checkpoint.save_state_dict(ldm_checkpoint.folder_to_ldm(sd2), path)
    assert any(k.startswith(ldm_checkpoint.OPENCLIP_PREFIX) for k in checkpoint.read_state_dict(path))
    folder = ldm_checkpoint.resolve_pretrained(path, prediction_type="v_prediction", config_from=sd2)
    assert checkpoint.read_json(os.path.join(folder, "scheduler", "scheduler_config.json"))["prediction_type"] == \
        "v_prediction"
    expected, got = load_pipeline(sd2), load_pipeline(folder)
    for name, want in outputs(expected, ("unet", "vae")).items():
        np.testing.assert_array_equal(outputs(got, (name,))[name], want, err_msg=name)
    want, have = dict(expected.text_encoder.parameters_and_names()), dict(got.text_encoder.parameters_and_names())
    assert sorted(want) == sorted(have)
    for name in want:
        np.testing.assert_array_equal(have[name].asnumpy(), want[name].asnumpy(), err_msg=name)
