"""LoRA files in the diffusers, diffusers-processor and kohya formats fuse into the inflated UNet and the text encoder."""
import numpy as np
import pytest

from tav import checkpoint
from tav.lora import LoraError, apply_lora, apply_loras, parse_lora_spec, read_lora
from tav.models import UNet3DConditionModel
from tav.text import load_text_encoder
from tav.tiny import write_tiny_pipeline

BLOCK = "down_blocks.0.attentions.0"
UNET_TARGETS = {  # module -> (out, in) of its weight in the tiny UNet, or a conv's full shape
    f"{BLOCK}.transformer_blocks.0.attn1.to_q": (32, 32),
    f"{BLOCK}.transformer_blocks.0.attn2.to_k": (32, 32),
    f"{BLOCK}.transformer_blocks.0.attn1.to_out.0": (32, 32),
}
UNET_CONVS = {f"{BLOCK}.proj_in": (32, 32, 1, 1), "down_blocks.0.resnets.0.conv1": (32, 32, 3, 3)}
TEXT_TARGETS = {"text_model.encoder.layers.0.self_attn.q_proj": (32, 32), "text_model.encoder.layers.1.mlp.fc1": (37, 32)}
RANK = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_pipeline(str(tmp_path_factory.mktemp("tiny") / "sd"))


@pytest.fixture
def models(tiny):
    return UNet3DConditionModel.from_pretrained_2d(tiny), load_text_encoder(tiny)


def weights(cell):
    return {name: param.asnumpy().copy() for name, param in cell.parameters_and_names()}


def random_pairs(targets, seed, conv=False):
    rng = np.random.default_rng(seed)
    pairs = {}
    for module, shape in targets.items():
        down_shape = (RANK,) + tuple(shape[1:]) if conv else (RANK, shape[1])
        up_shape = (shape[0], RANK, 1, 1) if conv else (shape[0], RANK)
        pairs[module] = (rng.normal(0, 0.1, down_shape).astype(np.float32),
                         rng.normal(0, 0.1, up_shape).astype(np.float32))
    return pairs


def write_lora(path, fmt, unet_pairs, text_pairs, alpha=None):
    tensors = {}
    for target, pairs in (("unet", unet_pairs), ("text_encoder", text_pairs)):
        for module, (down, up) in pairs.items():
            if fmt == "diffusers":
                tensors[f"{target}.{module}.lora_A.weight"] = down
                tensors[f"{target}.{module}.lora_B.weight"] = up
                if alpha is not None:
                    tensors[f"{target}.{module}.alpha"] = np.array(alpha, np.float32)
            elif fmt == "processor":
                if target == "unet":
                    block, proj = module.rsplit(".", 1) if not module.endswith("to_out.0") else (module[:-9], "to_out")
                    tensors[f"{block}.processor.{proj}_lora.down.weight"] = down
                    tensors[f"{block}.processor.{proj}_lora.up.weight"] = up
                else:
                    tensors[f"text_encoder.{module}.lora_linear_layer.down.weight"] = down
                    tensors[f"text_encoder.{module}.lora_linear_layer.up.weight"] = up
            else:
                flat = f"lora_{'unet' if target == 'unet' else 'te'}_{module.replace('.', '_')}"
                tensors[f"{flat}.lora_down.weight"] = down
                tensors[f"{flat}.lora_up.weight"] = up
                tensors[f"{flat}.alpha"] = np.array(alpha if alpha is not None else RANK, np.float32)
    checkpoint.save_state_dict(tensors, str(path))
    return str(path)


def expected_weight(base, down, up, scale, alpha):
    delta = up.reshape(up.shape[0], -1).astype(np.float64) @ down.reshape(RANK, -1).astype(np.float64)
    return (base.astype(np.float64) + scale * (alpha / RANK) * delta.reshape(base.shape)).astype(np.float32)


@pytest.mark.parametrize("fmt,alpha", [("diffusers", None), ("diffusers", 2.0), ("processor", None), ("kohya", 1.0)])
def test_fusing_equals_the_formula(models, tmp_path, fmt, alpha):
    unet, text = models
    unet_pairs, text_pairs = random_pairs(UNET_TARGETS, 1), random_pairs(TEXT_TARGETS, 2)
    convs = random_pairs(UNET_CONVS, 3, conv=True) if fmt == "kohya" else {}
    path = write_lora(tmp_path / "lora.safetensors", fmt, {**unet_pairs, **convs}, text_pairs, alpha)
    before_unet, before_text = weights(unet), weights(text)

    report = apply_lora(unet, text, path, scale=0.7)

    after_unet, after_text = weights(unet), weights(text)
    effective_alpha = RANK if alpha is None else alpha
    for module, (down, up) in {**unet_pairs, **convs}.items():
        name = module + ".weight"
        np.testing.assert_array_equal(after_unet[name], expected_weight(before_unet[name], down, up, 0.7,
                                                                        effective_alpha), err_msg=name)
    for module, (down, up) in text_pairs.items():
        name = module + ".weight"
        np.testing.assert_array_equal(after_text[name], expected_weight(before_text[name], down, up, 0.7,
                                                                        effective_alpha), err_msg=name)
    touched = {f"unet:{m}.weight" for m in {**unet_pairs, **convs}} | {f"text_encoder:{m}.weight" for m in text_pairs}
    assert set(report.fused) == touched
    for name in before_unet:  # nothing else moved, the temporal layers included
        if f"unet:{name}" not in touched:
            np.testing.assert_array_equal(after_unet[name], before_unet[name], err_msg=name)


def test_several_loras_add_up(models, tmp_path):
    unet, text = models
    first, second = random_pairs(UNET_TARGETS, 4), random_pairs(UNET_TARGETS, 5)
    a = write_lora(tmp_path / "a.safetensors", "diffusers", first, {})
    b = write_lora(tmp_path / "b.safetensors", "kohya", second, {})
    before = weights(unet)
    reports = apply_loras(unet, text, [f"{a}:0.5", b])
    assert [r.scale for r in reports] == [0.5, 1.0]
    after = weights(unet)
    for module in UNET_TARGETS:
        name = module + ".weight"
        once = expected_weight(before[name], *first[module], 0.5, RANK)
        np.testing.assert_allclose(after[name], expected_weight(once, *second[module], 1.0, RANK), rtol=0, atol=1e-7)


def test_specs_parse_path_and_scale():
    assert parse_lora_spec("style.safetensors:0.8") == ("style.safetensors", 0.8)
    assert parse_lora_spec("style.safetensors") == ("style.safetensors", 1.0)
    assert parse_lora_spec("C:/loras/style.safetensors") == ("C:/loras/style.safetensors", 1.0)
    assert parse_lora_spec("a:b.safetensors:-1") == ("a:b.safetensors", -1.0)


def test_unknown_tensors_are_named(models, tmp_path):
    path = str(tmp_path / "loha.safetensors")
    checkpoint.save_state_dict({"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": np.ones((2, 2), np.float32),
                                "something.else": np.ones(1, np.float32)}, path)
    with pytest.raises(LoraError, match=r"2 tensors are in no supported format.*hada_w1_a"):
        read_lora(path)


def test_modules_the_model_lacks_are_named_and_nothing_changes(models, tmp_path):
    unet, text = models
    pairs = {**random_pairs(UNET_TARGETS, 6), "down_blocks.9.attentions.0.proj_in": random_pairs({"x": (32, 32)}, 7)["x"]}
    path = write_lora(tmp_path / "other.safetensors", "kohya", pairs, {})
    before = weights(unet)
    with pytest.raises(LoraError, match=r"not in the model.*lora_unet_down_blocks_9|down_blocks_9_attentions_0_proj_in"):
        apply_lora(unet, text, path)
    after = weights(unet)
    assert all(np.array_equal(after[k], before[k]) for k in before)


def test_a_shape_mismatch_is_an_error(models, tmp_path):
    unet, text = models
    module = f"{BLOCK}.transformer_blocks.0.attn1.to_q"
    path = write_lora(tmp_path / "wide.safetensors", "diffusers", random_pairs({module: (64, 32)}, 8), {})
    with pytest.raises(LoraError, match="64x32 update"):
        apply_lora(unet, text, path)


def test_kohya_names_in_the_ldm_layout_resolve_too(models, tmp_path):
    unet, text = models
    from tav.checkpoint import save_state_dict

    rng = np.random.default_rng(11)
    down, up = rng.normal(size=(RANK, 32)).astype(np.float32), rng.normal(size=(32, RANK)).astype(np.float32)
    # input_blocks.1.1 is down_blocks.0.attentions.0 for layers_per_block=1 (the LDM numbering)
    flat = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    path = str(tmp_path / "ldm_kohya.safetensors")
    save_state_dict({f"{flat}.lora_down.weight": down, f"{flat}.lora_up.weight": up,
                     f"{flat}.alpha": np.array(RANK, np.float32)}, path)
    name = f"{BLOCK}.transformer_blocks.0.attn1.to_q.weight"
    before = weights(unet)[name]
    assert apply_lora(unet, text, path).fused == [f"unet:{name}"]
    np.testing.assert_array_equal(weights(unet)[name], expected_weight(before, down, up, 1.0, RANK))


def test_a_to_q_lora_of_sd15_shapes_is_a_few_megabytes():
    from tav.ldm_checkpoint import SD_UNET
    from tav.lora import lora_parameter_count

    sd15 = {**SD_UNET, "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "cross_attention_dim": 768}
    # 16 transformer blocks: 5 at 320 channels, 5 at 640, 6 at 1280; to_q of attn1 and attn2 is (C, C) in each
    assert lora_parameter_count(sd15, 1) == 4 * (5 * 320 + 5 * 640 + 6 * 1280)
    assert lora_parameter_count(sd15, 16) * 4 < 10 * 2**20  # fp32 bytes: rank 16 is 3.0 MiB
    everything = [f"{a}.{p}" for a in ("attn1", "attn2", "attn_temp") for p in ("to_q", "to_k", "to_v", "to_out.0")]
    assert lora_parameter_count(sd15, 8, everything) * 4 < 10 * 2**20


@pytest.mark.parity
def test_kohya_fuses_as_diffusers_converts_it(models, tmp_path):
    """diffusers' own kohya conversion (lora_state_dict, in its peft-free processor format) and network alphas,
    fused by the formula, give tav's fused weights; its output file also reads back in tav."""
    pytest.importorskip("torch")
    from diffusers import StableDiffusionPipeline

    unet_pairs, text_pairs = random_pairs(UNET_TARGETS, 9), random_pairs(TEXT_TARGETS, 10)
    path = write_lora(tmp_path / "kohya.safetensors", "kohya", unet_pairs, text_pairs, alpha=2.0)
    state, alphas = StableDiffusionPipeline.lora_state_dict(path)
    unet, text = models
    before = {"unet": weights(unet), "text_encoder": weights(text)}
    apply_lora(unet, text, path, scale=1.0)
    after = {"unet": weights(unet), "text_encoder": weights(text)}

    converted = {k: v.numpy() for k, v in state.items()}
    checkpoint.save_state_dict(converted, str(tmp_path / "diffusers_made.safetensors"))
    pairs, fmt = read_lora(str(tmp_path / "diffusers_made.safetensors"))
    assert fmt == "diffusers" or "diffusers-processor" in fmt
    from tav.lora import resolve_pairs

    resolve_pairs(pairs, {"unet": unet, "text_encoder": text}, path)
    assert {f"{p.target}:{p.param}" for p in pairs} == \
        {f"unet:{m}.weight" for m in unet_pairs} | {f"text_encoder:{m}.weight" for m in text_pairs}
    down_keys = {k[: -len(".down.weight")]: k for k in converted if k.endswith(".down.weight")}
    assert len(down_keys) == len(pairs)
    for pair in pairs:
        key = next(k for k in down_keys.values() if np.array_equal(converted[k], pair.down))
        alpha = alphas[key + ".alpha"] if key + ".alpha" in alphas else alphas.get(key.replace(".down.weight", ".alpha"))
        up = converted[key.replace(".down.weight", ".up.weight")]
        base = before[pair.target][pair.param]
        np.testing.assert_array_equal(after[pair.target][pair.param],
                                      expected_weight(base, converted[key], up, 1.0, alpha), err_msg=pair.param)
