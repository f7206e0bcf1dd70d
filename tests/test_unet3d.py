"""The inflated UNet: parity with diffusers' 2-D UNet on one frame, multi-frame semantics against numpy
references written from the spec, and name-for-name loading/saving."""
import json
import os

import numpy as np
import pytest

import mindspore as ms

from tav import checkpoint
from tav.models import UNet3DConditionModel, UNet3DConfig
from tav.models.attention import BasicTransformerBlock, SparseCausalAttention, sparse_causal_context
from tav.nn import GroupNorm, LayerNorm
from tests.helpers import import_parity_extra
from tests.unet_fixtures import TINY_UNET2D_CONFIGS, write_diffusers_unet2d

RNG = np.random.default_rng(0)


def zero_temporal_output(unet):
    """With attn_temp's output projection zeroed (weight and bias) each temporal layer is an identity."""
    for name, param in unet.parameters_and_names():
        if "attn_temp.to_out.0." in name:
            param.set_data(ms.Tensor(np.zeros(param.shape, np.float32)))


def randomise_temporal(unet, seed=1):
    rng = np.random.default_rng(seed)
    for name, param in unet.parameters_and_names():
        if "_temp." in name:
            fan_in = param.shape[-1]
            value = rng.standard_normal(param.shape) / np.sqrt(fan_in)
            if name.endswith("norm_temp.weight"):
                value = 1 + 0.1 * rng.standard_normal(param.shape)
            param.set_data(ms.Tensor(value.astype(np.float32)))


# ---------------------------------------------------------------------------------------------------------------
# Parity with diffusers' PyTorch UNet2DConditionModel


@pytest.mark.parametrize("kind,height,width", [("sd1", 8, 8), ("sd2", 12, 20), ("sd2", 10, 14)])
def test_one_frame_matches_diffusers_unet2d(tmp_path, ms_mode, kind, height, width):
    torch, _ = import_parity_extra()
    reference = write_diffusers_unet2d(tmp_path / "unet", kind)
    unet = UNet3DConditionModel.from_pretrained_2d(str(tmp_path / "unet"))
    zero_temporal_output(unet)

    cfg = TINY_UNET2D_CONFIGS[kind]
    sample = RNG.standard_normal((2, 4, height, width)).astype(np.float32)
    context = RNG.standard_normal((2, 7, cfg["cross_attention_dim"])).astype(np.float32)
    timesteps = np.array([10, 781], dtype=np.int64)
    with torch.no_grad():
        expected = reference(torch.from_numpy(sample), torch.from_numpy(timesteps),
                             torch.from_numpy(context)).sample.numpy()

    got = unet(ms.Tensor(sample[:, :, None]), ms.Tensor(timesteps), ms.Tensor(context)).asnumpy()[:, :, 0]
    assert np.abs(expected).mean() > 0.1  # a non-trivial output, so the comparison can fail
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


class _MSELoss(ms.nn.Cell):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def construct(self, sample, timesteps, context, target):
        return ms.ops.mean(ms.ops.square(self.unet(sample, timesteps, context) - target))


class _LossAndGradients(ms.nn.Cell):
    def __init__(self, loss, weights):
        super().__init__()
        self.loss = loss
        self.grad_fn = ms.value_and_grad(loss, None, weights)

    def construct(self, *inputs):
        return self.grad_fn(*inputs)


@pytest.mark.parametrize("kind,height,width", [("sd1", 8, 8), ("sd2", 10, 14)])
def test_one_frame_gradients_of_the_tuned_projections_match_diffusers(tmp_path, ms_mode, kind, height, width):
    """Training parity: with the official trainable set selected (every other Linear/conv frozen, so their
    backward is the input-only one), the MSE gradients of every attn1.to_q / attn2.to_q weight equal torch
    autograd's through diffusers' UNet2DConditionModel. 10x14 latents make a stride-2 conv see odd sizes."""
    torch, _ = import_parity_extra()
    from tav.training import select_trainable

    reference = write_diffusers_unet2d(tmp_path / "unet", kind)
    unet = UNet3DConditionModel.from_pretrained_2d(str(tmp_path / "unet"))
    zero_temporal_output(unet)
    trainable = select_trainable(unet, ("attn1.to_q", "attn2.to_q", "attn_temp"))
    compared = [(name, param) for name, param in trainable if ".to_q." in name and "attn_temp" not in name]
    assert len(compared) >= 4

    cfg = TINY_UNET2D_CONFIGS[kind]
    sample = RNG.standard_normal((2, 4, height, width)).astype(np.float32)
    target = RNG.standard_normal(sample.shape).astype(np.float32)
    context = RNG.standard_normal((2, 7, cfg["cross_attention_dim"])).astype(np.float32)
    timesteps = np.array([10, 781], dtype=np.int64)

    reference.requires_grad_(False)
    ref_params = dict(reference.named_parameters())
    for name, _ in compared:
        ref_params[name].requires_grad_(True)
    out = reference(torch.from_numpy(sample), torch.from_numpy(timesteps), torch.from_numpy(context)).sample
    ref_loss = torch.mean((out - torch.from_numpy(target)) ** 2)
    ref_loss.backward()

    unet.set_train(True)
    step = _LossAndGradients(_MSELoss(unet), ms.ParameterTuple([param for _, param in compared]))
    loss, grads = step(ms.Tensor(sample[:, :, None]), ms.Tensor(timesteps), ms.Tensor(context),
                       ms.Tensor(target[:, :, None]))
    assert float(loss.asnumpy()) == pytest.approx(float(ref_loss.detach()), rel=1e-5)
    for (name, _), grad in zip(compared, grads):
        expected = ref_params[name].grad.numpy()
        assert np.abs(expected).max() > 1e-4, name  # a real gradient, so the comparison can fail
        np.testing.assert_allclose(grad.asnumpy(), expected, atol=2e-5 * np.abs(expected).max(), rtol=0,
                                   err_msg=name)


def test_python_number_timestep_matches_tensor_timestep(tmp_path, ms_mode):
    import_parity_extra()
    write_diffusers_unet2d(tmp_path / "unet", "sd1")
    unet = UNet3DConditionModel.from_pretrained_2d(str(tmp_path / "unet"))
    sample = ms.Tensor(RNG.standard_normal((2, 4, 2, 8, 8)).astype(np.float32))
    context = ms.Tensor(RNG.standard_normal((2, 7, 16)).astype(np.float32))
    by_number = unet(sample, 321, context).asnumpy()
    by_tensor = unet(sample, ms.Tensor(np.array([321, 321], np.int64)), context).asnumpy()
    other_step = unet(sample, 20, context).asnumpy()
    np.testing.assert_allclose(by_number, by_tensor, atol=1e-6)
    assert np.abs(by_number - other_step).max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# Multi-frame semantics against numpy references written from the spec (reference 1.5, 1.9, 1.10)


def np_layer_norm(x, weight, bias, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def np_attention(q, k, v, heads):
    b, nq, inner = q.shape
    d = inner // heads
    qh = q.reshape(b, nq, heads, d).transpose(0, 2, 1, 3)
    kh = k.reshape(b, k.shape[1], heads, d).transpose(0, 2, 1, 3)
    vh = v.reshape(b, v.shape[1], heads, d).transpose(0, 2, 1, 3)
    scores = qh @ kh.transpose(0, 1, 3, 2) / np.sqrt(d)
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    probs = scores / scores.sum(-1, keepdims=True)
    return (probs @ vh).transpose(0, 2, 1, 3).reshape(b, nq, inner)


def np_sparse_causal_attention(x, w, prefix, heads, frames):
    """Frame i's queries against the keys/values of frame 0 and frame max(i-1, 0), by explicit indexing."""
    bf, d, c = x.shape
    q = x @ w[prefix + "to_q.weight"].T
    k = (x @ w[prefix + "to_k.weight"].T).reshape(bf // frames, frames, d, -1)
    v = (x @ w[prefix + "to_v.weight"].T).reshape(bf // frames, frames, d, -1)
    out = np.zeros_like(q)
    for b in range(bf // frames):
        for i in range(frames):
            seen = [0, max(i - 1, 0)]
            keys = np.concatenate([k[b, j] for j in seen])[None]
            values = np.concatenate([v[b, j] for j in seen])[None]
            out[b * frames + i] = np_attention(q[b * frames + i][None], keys, values, heads)[0]
    return out @ w[prefix + "to_out.0.weight"].T + w[prefix + "to_out.0.bias"]


def np_cross_attention(x, context, w, prefix, heads):
    q = x @ w[prefix + "to_q.weight"].T
    k = context @ w[prefix + "to_k.weight"].T
    v = context @ w[prefix + "to_v.weight"].T
    return np_attention(q, k, v, heads) @ w[prefix + "to_out.0.weight"].T + w[prefix + "to_out.0.bias"]


def np_gelu(x):
    from math import erf

    return 0.5 * x * (1 + np.vectorize(erf)(x / np.sqrt(2)))


def np_transformer_block(x, context, w, heads, frames):
    x = np_sparse_causal_attention(np_layer_norm(x, w["norm1.weight"], w["norm1.bias"]), w, "attn1.", heads, frames) + x
    x = np_cross_attention(np_layer_norm(x, w["norm2.weight"], w["norm2.bias"]), context, w, "attn2.", heads) + x
    h = np_layer_norm(x, w["norm3.weight"], w["norm3.bias"]) @ w["ff.net.0.proj.weight"].T + w["ff.net.0.proj.bias"]
    hidden, gate = np.split(h, 2, axis=-1)
    x = (hidden * np_gelu(gate)) @ w["ff.net.2.weight"].T + w["ff.net.2.bias"] + x
    bf, d, c = x.shape
    # (b f) d c -> (b d) f c: each spatial position attends over the frames, no mask, no positions.
    t = x.reshape(bf // frames, frames, d, c).transpose(0, 2, 1, 3).reshape(-1, frames, c)
    t = np_cross_attention(np_layer_norm(t, w["norm_temp.weight"], w["norm_temp.bias"]),
                           np_layer_norm(t, w["norm_temp.weight"], w["norm_temp.bias"]), w, "attn_temp.", heads) + t
    return t.reshape(bf // frames, d, frames, c).transpose(0, 2, 1, 3).reshape(bf, d, c)


def realistic_weights(cell, seed=0):
    """Random weights of scale 1/sqrt(fan_in) (so a wrong frame choice changes the output visibly)."""
    rng = np.random.default_rng(seed)
    for name, param in cell.parameters_and_names():
        fan_in = param.shape[-1] if len(param.shape) > 1 else param.shape[0]
        value = rng.standard_normal(param.shape) / np.sqrt(fan_in)
        if "norm" in name and name.endswith("weight"):
            value = 1 + 0.1 * rng.standard_normal(param.shape)
        param.set_data(ms.Tensor(value.astype(np.float32)))
    return checkpoint.cell_state_dict(cell)


def test_sparse_causal_context_picks_frame_zero_and_previous_frame():
    b, f, d, c = 2, 5, 3, 4
    tokens = RNG.standard_normal((b * f, d, c)).astype(np.float32)
    got = sparse_causal_context(ms.Tensor(tokens), f).asnumpy().reshape(b, f, 2 * d, c)
    frames = tokens.reshape(b, f, d, c)
    for i in range(f):
        np.testing.assert_array_equal(got[:, i, :d], frames[:, 0])
        np.testing.assert_array_equal(got[:, i, d:], frames[:, max(i - 1, 0)])


@pytest.mark.parametrize("frames", [1, 2, 5])
def test_sparse_causal_attention_matches_explicit_frame_reference(ms_mode, frames):
    attn = SparseCausalAttention(16, heads=2, dim_head=8)
    w = {"attn1." + k: v for k, v in realistic_weights(attn).items()}
    x = RNG.standard_normal((2 * frames, 6, 16)).astype(np.float32)
    got = attn(ms.Tensor(x), frames).asnumpy()
    expected = np_sparse_causal_attention(x, w, "attn1.", 2, frames)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    if frames > 2:
        # Attending to frame i itself instead of frame i-1 would give a visibly different result.
        wrong = x.reshape(2, frames, 6, 16).copy()
        wrong[:, 2] = wrong[:, 2] + 1.0
        got_changed = attn(ms.Tensor(wrong.reshape(x.shape)), frames).asnumpy().reshape(2, frames, 6, 16)
        unchanged = got.reshape(2, frames, 6, 16)
        np.testing.assert_allclose(got_changed[:, :2], unchanged[:, :2], atol=1e-5)  # frames 0, 1 never see frame 2
        assert np.abs(got_changed[:, 3] - unchanged[:, 3]).max() > 1e-2  # frame 3 sees frame 2
        if frames > 4:
            np.testing.assert_allclose(got_changed[:, 4], unchanged[:, 4], atol=1e-5)  # frame 4 does not


def test_transformer_block_matches_numpy_reference(ms_mode):
    frames, heads = 3, 2
    block = BasicTransformerBlock(16, heads, 8, cross_attention_dim=12)
    w = realistic_weights(block, seed=3)
    x = RNG.standard_normal((2 * frames, 6, 16)).astype(np.float32)
    context = np.repeat(RNG.standard_normal((2, 5, 12)).astype(np.float32), frames, axis=0)
    got = block(ms.Tensor(x), ms.Tensor(context), frames).asnumpy()
    expected = np_transformer_block(x, context, w, heads, frames)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_new_temporal_layer_starts_with_zero_output_weight():
    block = BasicTransformerBlock(16, 2, 8, cross_attention_dim=12)
    assert not block.attn_temp.to_out[0].weight.asnumpy().any()
    assert block.attn_temp.to_out[0].bias.asnumpy().any()  # the official leaves the bias at its random init


def test_group_norm_statistics_span_all_frames(ms_mode):
    b, c, f, h, w, groups = 2, 8, 3, 4, 5, 4
    x = RNG.standard_normal((b, c, f, h, w)).astype(np.float32) * np.arange(1, f + 1)[None, None, :, None, None]
    norm = GroupNorm(groups, c, eps=1e-5)
    weight, bias = RNG.standard_normal(c).astype(np.float32), RNG.standard_normal(c).astype(np.float32)
    norm.weight.set_data(ms.Tensor(weight))
    norm.bias.set_data(ms.Tensor(bias))
    got = norm(ms.Tensor(x)).asnumpy()
    grouped = x.reshape(b, groups, -1)  # statistics over (C/G) x F x H x W
    expected = ((grouped - grouped.mean(-1, keepdims=True)) / np.sqrt(grouped.var(-1, keepdims=True) + 1e-5))
    expected = expected.reshape(x.shape) * weight[None, :, None, None, None] + bias[None, :, None, None, None]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    per_frame = x.transpose(0, 2, 1, 3, 4).reshape(b * f, groups, -1)
    per_frame = ((per_frame - per_frame.mean(-1, keepdims=True)) / np.sqrt(per_frame.var(-1, keepdims=True) + 1e-5))
    per_frame = per_frame.reshape(b, f, c, h, w).transpose(0, 2, 1, 3, 4) * weight[None, :, None, None, None]
    assert np.abs(got - (per_frame + bias[None, :, None, None, None])).max() > 1e-2


def tiny_unet3d(seed=0):
    cfg = dict(TINY_UNET2D_CONFIGS["sd1"])
    ms.set_seed(seed)
    unet = UNet3DConditionModel(cfg)
    randomise_temporal(unet, seed)
    return unet


def test_a_later_frame_changes_every_frame_of_the_output(ms_mode):
    unet = tiny_unet3d()
    x = RNG.standard_normal((1, 4, 4, 8, 8)).astype(np.float32)
    context = ms.Tensor(RNG.standard_normal((1, 7, 16)).astype(np.float32))
    base = unet(ms.Tensor(x), 500, context).asnumpy()
    changed = x.copy()
    changed[:, :, 3] += 1.0
    out = unet(ms.Tensor(changed), 500, context).asnumpy()
    # 5-D GroupNorm and the temporal attention couple frames; frame 0 changes too (reference 1.5).
    for frame in range(4):
        assert np.abs(out[:, :, frame] - base[:, :, frame]).max() > 1e-4


def test_identical_frames_with_zero_temporal_output_give_the_2d_result_per_frame(ms_mode):
    unet = tiny_unet3d()
    zero_temporal_output(unet)
    frame = RNG.standard_normal((1, 4, 1, 8, 8)).astype(np.float32)
    context = ms.Tensor(RNG.standard_normal((1, 7, 16)).astype(np.float32))
    single = unet(ms.Tensor(frame), 100, context).asnumpy()
    video = unet(ms.Tensor(np.repeat(frame, 3, axis=2)), 100, context).asnumpy()
    for i in range(3):
        np.testing.assert_allclose(video[:, :, i], single[:, :, 0], atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Loading and saving


def test_inflation_loads_every_2d_weight_and_adds_only_temporal_layers(tmp_path):
    import_parity_extra()
    write_diffusers_unet2d(tmp_path / "unet", "sd1")
    state_2d = checkpoint.read_state_dict(str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"))
    unet = UNet3DConditionModel.from_pretrained_2d(str(tmp_path))  # pipeline folder holding unet/
    loaded = checkpoint.cell_state_dict(unet)
    added = sorted(set(loaded) - set(state_2d))
    assert set(state_2d) <= set(loaded)
    for key, value in state_2d.items():
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)
    # 7 tensors per transformer block: attn_temp q/k/v/out weight, out bias, norm_temp weight/bias
    n_transformers = sum(1 for k in loaded if k.endswith("attn_temp.to_q.weight"))
    assert n_transformers == 4  # down 1, mid 1, up 2 (layers_per_block + 1)
    assert len(added) == 7 * n_transformers and all("_temp." in k for k in added)


def test_config_with_2d_mid_block_type_is_accepted(tmp_path):
    """The official from_pretrained_2d crashes on `mid_block_type: UNetMidBlock2DCrossAttn` (issues #56, #71)."""
    import_parity_extra()
    write_diffusers_unet2d(tmp_path / "unet", "sd1")
    assert json.loads((tmp_path / "unet" / "config.json").read_text())["mid_block_type"] == "UNetMidBlock2DCrossAttn"
    unet = UNet3DConditionModel.from_pretrained_2d(str(tmp_path / "unet"))
    assert unet.config.mid_block_type == "UNetMidBlock3DCrossAttn"


def test_bin_and_safetensors_give_identical_models(tmp_path):
    import_parity_extra()
    write_diffusers_unet2d(tmp_path / "st", "sd1", seed=4)
    write_diffusers_unet2d(tmp_path / "bin", "sd1", seed=4, safe_serialization=False)
    assert (tmp_path / "bin" / "diffusion_pytorch_model.bin").exists()
    ms.set_seed(0)
    from_st = checkpoint.cell_state_dict(UNet3DConditionModel.from_pretrained_2d(str(tmp_path / "st")))
    ms.set_seed(0)
    from_bin = checkpoint.cell_state_dict(UNet3DConditionModel.from_pretrained_2d(str(tmp_path / "bin")))
    assert from_st.keys() == from_bin.keys()
    for key in from_st:
        np.testing.assert_array_equal(from_st[key], from_bin[key], err_msg=key)


def test_missing_key_and_wrong_shape_are_named(tmp_path):
    import_parity_extra()
    write_diffusers_unet2d(tmp_path / "unet", "sd1")
    path = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    state = checkpoint.read_state_dict(str(path))
    del state["mid_block.resnets.0.conv1.weight"]
    state["conv_out.bias"] = np.zeros(5, np.float32)
    checkpoint.save_state_dict(state, str(path))
    with pytest.raises(checkpoint.CheckpointMismatchError) as err:
        UNet3DConditionModel.from_pretrained_2d(str(tmp_path / "unet"))
    assert "mid_block.resnets.0.conv1.weight" in str(err.value)
    assert "conv_out.bias" in str(err.value) and "(5,)" in str(err.value)


def test_a_2d_checkpoint_is_refused_by_from_pretrained_with_a_hint(tmp_path):
    import_parity_extra()
    write_diffusers_unet2d(tmp_path / "unet", "sd1")
    with pytest.raises(checkpoint.CheckpointError, match="from_pretrained_2d"):
        UNet3DConditionModel.from_pretrained(str(tmp_path / "unet"))


def test_save_then_load_is_bit_exact(tmp_path):
    unet = tiny_unet3d(seed=5)
    unet.save_pretrained(str(tmp_path / "tuned" / "unet"))
    config = json.loads((tmp_path / "tuned" / "unet" / "config.json").read_text())
    assert config["_class_name"] == "UNet3DConditionModel"
    assert config["down_block_types"] == ["CrossAttnDownBlock3D", "DownBlock3D"]
    again = UNet3DConditionModel.from_pretrained(str(tmp_path / "tuned"))
    before, after = checkpoint.cell_state_dict(unet), checkpoint.cell_state_dict(again)
    assert before.keys() == after.keys()
    for key in before:
        np.testing.assert_array_equal(before[key], after[key], err_msg=key)
    assert not [f for f in os.listdir(tmp_path / "tuned" / "unet") if f.startswith(".")]  # no temp files left


def test_fp16_load(tmp_path, pynative):
    unet = tiny_unet3d(seed=6)
    unet.save_pretrained(str(tmp_path / "unet"))
    half = UNet3DConditionModel.from_pretrained(str(tmp_path / "unet"), dtype=ms.float16)
    assert {p.dtype for p in half.get_parameters()} == {ms.float16}
    x = RNG.standard_normal((1, 4, 2, 8, 8)).astype(np.float32)
    context = RNG.standard_normal((1, 7, 16)).astype(np.float32)
    full = unet(ms.Tensor(x), 300, ms.Tensor(context)).asnumpy()
    out = half(ms.Tensor(x, ms.float16), 300, ms.Tensor(context, ms.float16))
    assert out.dtype == ms.float16
    np.testing.assert_allclose(out.asnumpy().astype(np.float32), full, atol=5e-2)


@pytest.mark.parametrize("field,value", [("down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]),
                                         ("class_embed_type", "timestep"), ("time_embedding_type", "fourier"),
                                         ("resnet_time_scale_shift", "ada_group")])
def test_unsupported_config_values_name_the_field(field, value):
    cfg = dict(TINY_UNET2D_CONFIGS["sd1"])
    cfg[field] = value
    with pytest.raises(ValueError, match=field):
        UNet3DConfig.from_dict(cfg)


def test_inflating_in_fp16_casts_the_new_temporal_layers_too_and_keeps_norms_fp32(tmp_path, pynative):
    import_parity_extra()
    write_diffusers_unet2d(tmp_path / "unet", "sd1")
    half = UNet3DConditionModel.from_pretrained_2d(str(tmp_path / "unet"), dtype=ms.float16)
    norm_params = {id(p) for _, cell in half.cells_and_names() if isinstance(cell, (GroupNorm, LayerNorm))
                   for p in cell.get_parameters(expand=False)}
    # Issue 12 defect 4: norm parameters stay fp32 (their statistics are fp32), everything else is fp16.
    assert norm_params and {p.dtype for p in half.get_parameters() if id(p) in norm_params} == {ms.float32}
    assert {p.dtype for p in half.get_parameters() if id(p) not in norm_params} == {ms.float16}
    sample = ms.Tensor(RNG.standard_normal((1, 4, 2, 8, 8)), ms.float16)
    context = ms.Tensor(RNG.standard_normal((1, 7, 16)), ms.float16)
    assert half(sample, 400, context).dtype == ms.float16
