"""TAV_EMULATE_ASCEND: tav's own Ascend code paths built and run on the CPU (tav.backend.emulate_ascend,
tav/kernels/ascend_ops.py). These prove that tav's Ascend branches run and agree with the CPU path; they do not
prove the NPU kernels themselves."""
import numpy as np
import pytest

import mindspore as ms
from mindspore import ops

from tav import backend
from tav import nn as tnn
from tav.kernels import ascend_ops, resolve_backend
from tav.models.unet3d import UNet3DConditionModel
from tav.tiny import TINY_UNET_CONFIG
from tests.helpers import in_mode, run_tool

RNG = np.random.default_rng(0)


# --- what tav reports under the emulation -------------------------------------------------------------------


def test_emulation_reports_an_ascend_soc_while_mindspore_stays_on_the_cpu():
    with backend.emulate_ascend("910B"):
        assert backend.device_target() == "Ascend" and backend.runtime_device_target() == "CPU"
        assert backend.ascend_soc() == "Ascend910B" and backend.has_flash_attention()
        assert backend.op_flavour() == backend.FLAVOUR_MINT and not backend.native_kernels_enabled()
        assert backend.compile_optimizer_update()  # the Ascend update path: one compiled graph
        assert tnn.Linear(4, 4).use_mint and tnn.Conv2d(4, 4, 3).native is None
    with backend.emulate_ascend("910A"):
        assert backend.ascend_soc() == "Ascend910A" and not backend.has_flash_attention()
    assert backend.device_target() == "CPU" and backend.ascend_soc() is None


def test_the_emulation_variable_is_read_and_checked(monkeypatch):
    monkeypatch.setenv(backend.EMULATE_ENV, "910b")
    assert backend.emulated_soc() == "Ascend910B" and backend.is_ascend()
    monkeypatch.setenv(backend.EMULATE_ENV, "910C")
    with pytest.raises(backend.DeviceConfigError, match="910B, 910A"):
        backend.emulated_soc()
    monkeypatch.setenv(backend.EMULATE_ENV, "0")
    assert backend.emulated_soc() is None


def test_emulation_makes_configure_keep_mindspore_on_the_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(ms, "set_device", lambda *args: calls.append(args))
    with backend.emulate_ascend("910B"):
        backend.configure(device_target="Ascend", device_id=3)
        with pytest.raises(backend.DeviceConfigError, match="GPU"):
            backend.configure(device_target="GPU")
    assert calls == [("CPU",)]


# --- the emulated FlashAttentionScore ---------------------------------------------------------------------------


def numpy_attention(q, k, v, scale, mask=None):
    """q (B, N1, S1, D), k/v (B, N2, S2, D), N2 dividing N1; mask True = discard."""
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, groups, 1), np.repeat(v, groups, 1)
    scores = scale * q @ k.swapaxes(-1, -2)
    if mask is not None:
        scores = np.where(mask, -np.inf, scores)
    scores -= scores.max(-1, keepdims=True)
    p = np.exp(scores)
    return (p / p.sum(-1, keepdims=True)) @ v, scores


@pytest.mark.parametrize("layout", ["BSH", "BNSD"])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_emulated_flash_attention_score_computes_the_documented_outputs(pynative, layout, kv_heads):
    b, n1, s1, s2, d = 2, 4, 5, 7, 16
    q = RNG.standard_normal((b, n1, s1, d)).astype(np.float16)
    k = RNG.standard_normal((b, kv_heads, s2, d)).astype(np.float16)
    v = RNG.standard_normal((b, kv_heads, s2, d)).astype(np.float16)
    expected, _ = numpy_attention(q, k, v, 0.3)
    bsh = lambda x: x.transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[2], -1)  # noqa: E731
    args = (q, k, v) if layout == "BNSD" else (bsh(q), bsh(k), bsh(v))
    with backend.emulate_ascend("910B"):
        outs = ascend_ops.flash_attention_score_emulated(*(ms.Tensor(x) for x in args), n1, scale_value=0.3,
                                                         input_layout=layout)
    softmax_max, softmax_sum, _, out = outs
    assert out.dtype == ms.float16 and softmax_max.dtype == ms.float32
    assert softmax_max.shape == (b, n1, s1, 8) and softmax_sum.shape == (b, n1, s1, 8)
    got = out.asnumpy().astype(np.float64)
    if layout == "BSH":
        got = got.reshape(b, s1, n1, d).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(got, expected, atol=3e-3)


@pytest.mark.parametrize("sparse_mode", [2, 3])
def test_emulated_flash_attention_score_causal_sparse_modes(pynative, sparse_mode):
    b, n, s1, s2, d = 1, 2, 4, 6, 16
    q, k, v = (RNG.standard_normal((b, n, s, d)).astype(np.float16) for s in (s1, s2, s2))
    rows, cols = np.arange(s1)[:, None], np.arange(s2)[None, :]
    mask = cols > rows + (s2 - s1 if sparse_mode == 3 else 0)
    expected, _ = numpy_attention(q, k, v, d**-0.5, mask)
    compressed = ms.Tensor(np.triu(np.ones((2048, 2048), np.uint8), 1))
    with backend.emulate_ascend("910B"):
        out = ascend_ops.flash_attention_score(ms.Tensor(q), ms.Tensor(k), ms.Tensor(v), n, scalar_value=d**-0.5,
                                               input_layout="BNSD", sparse_mode=sparse_mode, attn_mask=compressed)
    np.testing.assert_allclose(out.asnumpy(), expected, atol=3e-3)


@pytest.mark.parametrize("soc, dtype, shape, error, match", [
    ("910B", np.float32, (1, 4, 64), TypeError, "float16 or bfloat16"),
    ("910B", np.float16, (1, 4, 520), ValueError, "D=520"),
    ("910B", np.float16, (2049, 4, 16), ValueError, "B=2049"),
    ("910A", np.float16, (1, 4, 64), ascend_ops.FlashAttentionUnsupported, "Ascend910A"),
])
def test_emulated_flash_attention_score_refuses_what_the_real_op_refuses(pynative, soc, dtype, shape, error, match):
    x = ms.Tensor(np.zeros(shape, dtype))
    with backend.emulate_ascend(soc), pytest.raises(error, match=match):
        ascend_ops.flash_attention_score(x, x, x, 1)


# --- the model on the emulated device ---------------------------------------------------------------------------


def tiny_unet_inputs(frames=2):
    x = RNG.standard_normal((1, 4, frames, 8, 8)).astype(np.float32)
    context = RNG.standard_normal((1, 7, 32)).astype(np.float32)
    return x, np.array([10], np.int64), context


def build_tiny_unet(state=None, seed=0):
    ms.set_seed(seed)
    unet = UNet3DConditionModel(dict(TINY_UNET_CONFIG))
    if state is not None:
        for name, param in unet.parameters_and_names():
            param.set_data(ms.Tensor(state[name]))
    return unet


@pytest.fixture(scope="module")
def cpu_reference():
    """The tiny UNet's weights and its fp32 CPU-path output (native kernels, classic ops)."""
    with in_mode(ms.PYNATIVE_MODE):
        unet = build_tiny_unet()
        x, t, context = tiny_unet_inputs()
        out = unet(ms.Tensor(x), ms.Tensor(t), ms.Tensor(context)).asnumpy()
    return {name: p.asnumpy() for name, p in unet.parameters_and_names()}, (x, t, context), out


def test_fp16_unet_on_an_emulated_910b_runs_flash_attention_and_agrees_with_the_cpu_path(ms_mode, cpu_reference,
                                                                                        monkeypatch):
    state, (x, t, context), expected = cpu_reference
    calls = []
    real = ascend_ops.flash_attention_score_emulated

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    if ms_mode == ms.PYNATIVE_MODE:
        monkeypatch.setattr(ascend_ops, "flash_attention_score_emulated", counting)
    with backend.emulate_ascend("910B"):
        unet = build_tiny_unet(state).to_dtype(ms.float16)
        assert resolve_backend("auto", ms.float16, (2, 64, 32), (2, 128, 32), 2) == "flash"
        out = unet(ms.Tensor(x, ms.float16), ms.Tensor(t), ms.Tensor(context, ms.float16))
    assert out.dtype == ms.float16
    np.testing.assert_allclose(out.asnumpy().astype(np.float32), expected, atol=2e-2 * np.abs(expected).max())
    if ms_mode == ms.PYNATIVE_MODE:
        assert calls, "FlashAttentionScore was never called"


def test_an_emulated_910a_never_chooses_flash_attention(pynative, cpu_reference, monkeypatch):
    state, (x, t, context), expected = cpu_reference

    def no_kernel(*args, **kwargs):
        raise AssertionError("FlashAttentionScore called on a 910A")

    monkeypatch.setattr(ascend_ops, "flash_attention_score_emulated", no_kernel)
    with backend.emulate_ascend("910A"):
        unet = build_tiny_unet(state).to_dtype(ms.float16)
        out = unet(ms.Tensor(x, ms.float16), ms.Tensor(t), ms.Tensor(context, ms.float16))
    np.testing.assert_allclose(out.asnumpy().astype(np.float32), expected, atol=2e-2 * np.abs(expected).max())


def test_fp16_models_keep_fp32_norm_parameters_and_feed_the_norms_fp32(pynative, monkeypatch):
    # Issue 12 defect 4: the mint norms took fp16 inputs and fp16 weights.
    seen = []
    real_group, real_layer = ascend_ops.group_norm, ascend_ops.layer_norm
    monkeypatch.setattr(ascend_ops, "group_norm", lambda x, g, w, b, e: seen.append((x.dtype, w.dtype))
                        or real_group(x, g, w, b, e))
    monkeypatch.setattr(ascend_ops, "layer_norm", lambda x, s, w, b, e: seen.append((x.dtype, w.dtype))
                        or real_layer(x, s, w, b, e))
    with backend.emulate_ascend("910B"):
        unet = build_tiny_unet().to_dtype(ms.float16)
        x, t, context = tiny_unet_inputs()
        out = unet(ms.Tensor(x, ms.float16), ms.Tensor(t), ms.Tensor(context, ms.float16))
    assert out.dtype == ms.float16
    norms = {name: p.dtype for name, p in unet.parameters_and_names() if ".norm" in name or "norm_" in name}
    assert norms and set(norms.values()) == {ms.float32}
    assert unet.conv_in.weight.dtype == ms.float16
    assert seen and set(seen) == {(ms.float32, ms.float32)}


def test_upsampling_and_padding_take_the_mint_ops_on_ascend(pynative, monkeypatch):
    # Issue 12 defect 9: ops.interpolate / ops.pad (ResizeNearestNeighborV2, PadV3 on Ascend) were used there.
    used = []
    real_interp, real_pad = ascend_ops.interpolate_nearest, ascend_ops.pad
    monkeypatch.setattr(ascend_ops, "interpolate_nearest", lambda x, s: used.append("interpolate")
                        or real_interp(x, s))
    monkeypatch.setattr(ascend_ops, "pad", lambda x, p: used.append("pad") or real_pad(x, p))
    x = ms.Tensor(RNG.standard_normal((1, 2, 3, 3)).astype(np.float32))
    with backend.emulate_ascend("910B"):
        up = tnn.upsample_nearest(x, (6, 6))
        padded = tnn.pad_right_bottom(x)
    assert used == ["interpolate", "pad"]
    np.testing.assert_array_equal(up.asnumpy(), np.repeat(np.repeat(x.asnumpy(), 2, 2), 2, 3))
    assert padded.shape == (1, 2, 4, 4) and float(padded[:, :, 3].abs().sum()) == 0.0
    tnn.upsample_nearest(x, (6, 6))  # off Ascend: the classic ops
    assert used == ["interpolate", "pad"]


def test_unet_gradients_under_the_emulation_agree_with_the_cpu_path(graph_mode, cpu_reference):
    state, (x, t, context), _ = cpu_reference

    def input_gradient(unet, dtype):
        def loss(sample):
            return ops.mean(ops.square(unet(sample, ms.Tensor(t), ms.Tensor(context, dtype)).astype(ms.float32)))

        return ms.jit(ms.grad(loss))(ms.Tensor(x, dtype)).astype(ms.float32).asnumpy()

    expected = input_gradient(build_tiny_unet(state), ms.float32)
    with backend.emulate_ascend("910B"):
        got = input_gradient(build_tiny_unet(state).to_dtype(ms.float16), ms.float16)
    scale = np.abs(expected).max()
    assert scale > 0
    np.testing.assert_allclose(got, expected, atol=3e-2 * scale)


def test_compiled_update_with_fp16_parameters_and_fp32_masters_executes(graph_mode, cpu_reference):
    # Issue 12 defect 5: the update Ascend uses (one compiled graph; fp16 model, fp32 masters) had never run.
    from tav.optim import AdamW
    from tav.schedulers import SD_V1_SCHEDULE, DDIMScheduler
    from tav.training import select_trainable
    from tav.train_step import TrainStep

    state, _, _ = cpu_reference
    frames = 2
    rng = np.random.default_rng(3)
    mean = ms.Tensor(rng.standard_normal((1, 4, frames, 8, 8)).astype(np.float32))
    std = ms.Tensor(np.full((1, 4, frames, 8, 8), 0.1, np.float32))
    posterior_noise = ms.Tensor(rng.standard_normal((1, 1, 4, frames, 8, 8)).astype(np.float32))
    noise = ms.Tensor(rng.standard_normal((1, 1, 4, frames, 8, 8)).astype(np.float32))
    timesteps = ms.Tensor(np.array([[500]], np.int64))
    context = ms.Tensor(rng.standard_normal((1, 7, 32)).astype(np.float32))

    def one_step(dtype):
        unet = build_tiny_unet(state)
        trainable = select_trainable(unet, ["attn1.to_q", "attn2.to_q", "attn_temp"])
        initial = {name: p.asnumpy() for name, p in trainable}
        unet.to_dtype(dtype)
        optimizer = AdamW(trainable, master_dtype=ms.float32)
        optimizer.load_master(initial)
        step = TrainStep(unet, optimizer, DDIMScheduler.from_config(SD_V1_SCHEDULE), 0.18215, None, 1.0, dtype)
        loss, finite, norm = step(mean, std, posterior_noise, noise, timesteps, context, ms.Tensor(1e-3, ms.float32),
                                  ms.Tensor(1024.0 if dtype == ms.float16 else 1.0, ms.float32))
        name, param = trainable[0]
        return step.update_path, float(loss.asnumpy()), bool(finite.asnumpy()), initial[name], param.asnumpy(), \
            optimizer.master[0].asnumpy()

    cpu_path, cpu_loss, _, before, cpu_after, _ = one_step(ms.float32)
    with backend.emulate_ascend("910B"):
        path, loss, finite, _, after, master = one_step(ms.float16)
    assert cpu_path != "compiled" and path == "compiled"
    assert finite and after.dtype == np.float16 and master.dtype == np.float32
    assert not np.array_equal(master, before)  # the fp32 master moved ...
    np.testing.assert_array_equal(after, master.astype(np.float16))  # ... and the fp16 weight is its cast
    np.testing.assert_allclose(loss, cpu_loss, rtol=2e-2)
    np.testing.assert_allclose(master - before, cpu_after - before, atol=2e-4)


def test_sampling_tool_runs_end_to_end_on_an_emulated_910b(tmp_path, monkeypatch):
    monkeypatch.setenv(backend.EMULATE_ENV, "910B")
    result = run_tool("sample", "--output_dir", tmp_path / "out", "--num_inference_steps", "2", "--num_inv_steps",
                      "2", "--video_length", "2", "--dtype", "fp16", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((tmp_path / "out").iterdir())


def test_inversion_and_sampling_under_the_emulation_agree_with_the_cpu_path(ms_mode, cpu_reference):
    from tav.inversion import ddim_invert
    from tav.sampling import denoise
    from tav.schedulers import SD_V1_SCHEDULE, DDIMScheduler

    state, (x, _, context), _ = cpu_reference
    uncond = np.zeros_like(context)

    def invert_then_sample(unet, dtype):
        scheduler = DDIMScheduler.from_config(SD_V1_SCHEDULE)
        cond = ms.Tensor(context, dtype)
        start = ddim_invert(unet, scheduler, ms.Tensor(x, dtype), ms.Tensor(uncond, dtype), 2)[-1]
        final = denoise(unet, scheduler, start.astype(dtype), cond, ms.Tensor(uncond, dtype), 2, 7.5)
        return start.astype(ms.float32).asnumpy(), final.astype(ms.float32).asnumpy()

    expected_start, expected_final = invert_then_sample(build_tiny_unet(state), ms.float32)
    with backend.emulate_ascend("910B"):
        start, final = invert_then_sample(build_tiny_unet(state).to_dtype(ms.float16), ms.float16)
    for got, expected in ((start, expected_start), (final, expected_final)):
        np.testing.assert_allclose(got, expected, atol=2e-2 * np.abs(expected).max())
