"""One-shot tuning: what trains, the optimiser and schedules against PyTorch/diffusers, the compiled step (gradients
with and without recompute, overflow skipping, fp16 master weights), and whole runs on a generated clip: the loss
falls, only the intended tensors change, the delta reproduces the tuned model, resume reproduces the loss sequence,
and a run refuses to mix with another run's outputs."""
import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

import mindspore as ms

from tav import checkpoint, delta, optim, tiny, train_state, train_step, training
from tav.config import ConfigError, config_from_dict
from tav.models.unet3d import UNet3DConditionModel, is_temporal_key
from tav.schedulers import DDIMScheduler
from tav.tiny import make_demo_clip
from tav.video import output_name
from tests.helpers import import_parity_extra

OFFICIAL_MODULES = ["attn1.to_q", "attn2.to_q", "attn_temp"]

# Smaller than tav.tiny's UNet (one block, no down/up-sampling) so each compiled train step builds quickly; it still
# has every kind of trainable layer: attn1/attn2/attn_temp in the down, mid and up transformers.
SMALL_UNET = dict(tiny.TINY_UNET_CONFIG, block_out_channels=[32], down_block_types=["CrossAttnDownBlock2D"],
                  up_block_types=["CrossAttnUpBlock2D"])


@pytest.fixture(scope="module")
def graph_mode_module():
    """train() leaves the execution mode to its caller (tools/train.py sets it from the config); these runs use
    GRAPH_MODE, as the CLI does by default."""
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=previous)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A generated 16-frame 64x64 clip (a disc moving over a drifting gradient): the runs need nothing beside the
    repository."""
    return make_demo_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", n_frames=16, height=64, width=64, seed=3)


@pytest.fixture(scope="module")
def small_pipeline(tmp_path_factory):
    """The tiny SD pipeline with the one-block UNet in unet/ (written as a 2-D SD checkpoint)."""
    root = str(tmp_path_factory.mktemp("tiny-sd"))
    tiny.write_tiny_pipeline(root)
    ms.set_seed(0)
    model = UNet3DConditionModel(dict(SMALL_UNET))
    weights = {k: v for k, v in checkpoint.cell_state_dict(model).items() if not is_temporal_key(k)}
    checkpoint.write_json_atomic(SMALL_UNET, os.path.join(root, "unet", "config.json"))
    checkpoint.save_state_dict(weights, os.path.join(root, "unet", "diffusion_pytorch_model.safetensors"))
    return root


def run_config(pipeline, output_dir, video, **overrides):
    values = dict(
        pretrained_model_path=pipeline, output_dir=str(output_dir),
        train_data=dict(video_path=str(video), prompt="a man is skiing", n_sample_frames=4, width=64, height=64,
                        sample_frame_rate=2),
        validation_data=dict(prompts=[], num_inference_steps=1, num_inv_steps=1),
        learning_rate=1e-2, train_batch_size=2, max_train_steps=24, checkpointing_steps=12, validation_steps=24,
        seed=7, mixed_precision="fp16", gradient_checkpointing=False, mode=0)
    for key, value in overrides.items():
        if isinstance(value, dict):
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    return config_from_dict(values)


# ---------------------------------------------------------------------------------------------------------------
# What trains


def test_trainable_rule_is_the_official_module_suffix_match():
    block = "down_blocks.0.attentions.0.transformer_blocks.0"
    assert train_step.is_trainable(f"{block}.attn1.to_q.weight", OFFICIAL_MODULES)
    assert train_step.is_trainable(f"{block}.attn2.to_q.weight", OFFICIAL_MODULES)
    for leaf in ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "to_out.0.bias"):
        assert train_step.is_trainable(f"{block}.attn_temp.{leaf}", OFFICIAL_MODULES)
    for name in (f"{block}.attn1.to_k.weight", f"{block}.attn2.to_v.weight", f"{block}.norm_temp.weight",
                 f"{block}.attn1.to_out.0.weight", f"{block}.ff.net.0.proj.weight", "conv_in.weight"):
        assert not train_step.is_trainable(name, OFFICIAL_MODULES)


def test_sd1_unet_trains_112_tensors_and_74m_parameters():
    unet = UNet3DConditionModel(dict(cross_attention_dim=768))  # SD 1.x architecture, random weights
    selected = training.select_trainable(unet, OFFICIAL_MODULES)
    assert len(selected) == 112
    assert sum(int(np.prod(p.shape)) for _, p in selected) == 74_354_880
    assert all(p.requires_grad == (name in dict(selected)) for name, p in unet.parameters_and_names())


def test_trainable_modules_matching_nothing_is_an_error():
    unet = UNet3DConditionModel(dict(SMALL_UNET))
    with pytest.raises(ConfigError, match="match no UNet module"):
        training.select_trainable(unet, ["attn9.to_q"])


# ---------------------------------------------------------------------------------------------------------------
# The compiled step


def step_inputs(seed=0, frames=4, size=8, context_dim=32):
    rng = np.random.default_rng(seed)
    latent = (1, 4, frames, size, size)
    return dict(
        mean=ms.Tensor(rng.standard_normal(latent).astype(np.float32)),
        std=ms.Tensor(np.full(latent, 0.1, np.float32)),
        posterior_noise=ms.Tensor(rng.standard_normal((1,) + latent).astype(np.float32)),
        noise=ms.Tensor(rng.standard_normal((1,) + latent).astype(np.float32)),
        timesteps=ms.Tensor(np.array([[400]], np.int64)),
        context=ms.Tensor(rng.standard_normal((1, 77, context_dim)).astype(np.float32)),
    )


def prepared_unet(pipeline, recompute, dtype=ms.float32):
    unet = UNet3DConditionModel.from_pretrained_2d(pipeline)
    # A fresh temporal layer has a zero output weight, so its q/k/v get no gradient at step 0 (as in the official
    # code); give it a non-zero one, as after the first update.
    rng = np.random.default_rng(3)
    for name, param in unet.parameters_and_names():
        if name.endswith("attn_temp.to_out.0.weight"):
            param.set_data(ms.Tensor((0.1 * rng.standard_normal(param.shape)).astype(np.float32)))
    trainable = training.select_trainable(unet, OFFICIAL_MODULES)
    initial = {name: param.asnumpy().copy() for name, param in trainable}
    unet.to_dtype(dtype)
    if recompute:
        unet.enable_gradient_checkpointing()
    optimizer = optim.AdamW(trainable, weight_decay=0.0)  # no decay: a tensor moves only if it has a gradient
    optimizer.load_master(initial)
    step = train_step.TrainStep(unet, optimizer, DDIMScheduler.from_config(pipeline), 0.18215,
                                compute_dtype=dtype)
    return unet, optimizer, step, initial


class ScaleModel(ms.nn.Cell):
    """prediction = w * noisy latents: small enough to check the step's arithmetic by hand."""

    def __init__(self):
        super().__init__()
        self.w = ms.Parameter(ms.Tensor(np.array([0.3], np.float32)), name="w")

    def construct(self, sample, timestep, context):
        return sample * self.w


def test_step_averages_micro_steps_unscales_and_reports_the_pre_clip_norm(pynative):
    model = ScaleModel()
    optimizer = optim.AdamW([("w", model.w)], weight_decay=0.0)
    scheduler = DDIMScheduler()
    step = train_step.TrainStep(model, optimizer, scheduler, scaling_factor=0.5, max_grad_norm=1e-3)
    rng = np.random.default_rng(0)
    latent = (1, 4, 2, 2, 2)
    mean, std = rng.standard_normal(latent).astype(np.float32), np.full(latent, 0.2, np.float32)
    posterior, noise = (rng.standard_normal((2,) + latent).astype(np.float32) for _ in range(2))
    timesteps = np.array([[100], [900]], np.int64)
    loss, finite, norm = step(ms.Tensor(mean), ms.Tensor(std), ms.Tensor(posterior), ms.Tensor(noise),
                              ms.Tensor(timesteps), ms.Tensor(np.zeros((1, 77, 8), np.float32)),
                              ms.Tensor(1e-2, ms.float32), ms.Tensor(1024.0, ms.float32))
    losses, grads = [], []
    for i in range(2):  # the same thing by hand, per micro-step
        a = scheduler.alphas_cumprod[timesteps[i, 0]].astype(np.float64)
        noisy = np.sqrt(a) * (mean + std * posterior[i]) * 0.5 + np.sqrt(1 - a) * noise[i]
        residual = 0.3 * noisy - noise[i]
        losses.append(np.mean(residual ** 2))
        grads.append(np.mean(2 * residual * noisy))
    assert bool(finite.asnumpy())
    assert float(loss.asnumpy()) == pytest.approx(np.mean(losses), rel=1e-5)
    assert float(norm.asnumpy()) == pytest.approx(abs(np.mean(grads)), rel=1e-4)
    # clipped to 1e-3 then one Adam step: the first step moves w by lr against the gradient's sign
    assert float(model.w.asnumpy()[0]) == pytest.approx(0.3 - 1e-2 * np.sign(np.mean(grads)), rel=1e-4)


def test_host_compiled_and_eager_updates_agree(graph_mode, monkeypatch):
    """TrainStep's three update paths -- on the host through optim.cc (CPU), op by op (CPU without the native
    kernels, fp16 masters), compiled (Ascend/GPU; tav.backend decides) -- must give the same loss, norm, weights
    and moments over two clipped steps, and all must skip a non-finite update and leave the weights alone."""
    rng = np.random.default_rng(1)
    latent = (1, 4, 2, 2, 2)
    mean, std = rng.standard_normal(latent).astype(np.float32), np.full(latent, 0.2, np.float32)
    posterior, noise = (rng.standard_normal((2,) + latent).astype(np.float32) for _ in range(2))
    inputs = [ms.Tensor(a) for a in (mean, std, posterior, noise, np.array([[100], [900]], np.int64),
                                     np.zeros((1, 77, 8), np.float32))]
    runs = {}
    for path in ("host", "eager", "compiled"):
        monkeypatch.setattr(train_step.backend, "compile_optimizer_update", lambda path=path: path == "compiled")
        model = ScaleModel()
        optimizer = optim.AdamW([("w", model.w)], weight_decay=0.01)
        if path == "host":
            assert optimizer.host_kernels is not None  # CPU with the native kernels: the default path here
        else:
            optimizer.host_kernels = None
        step = train_step.TrainStep(model, optimizer, DDIMScheduler(), scaling_factor=0.5, max_grad_norm=0.1)
        assert (step.host_update, step.compiled_update) == (path == "host", path == "compiled")
        results = []
        for _ in range(2):
            loss, finite, norm = step(*inputs, ms.Tensor(1e-2, ms.float32), ms.Tensor(8.0, ms.float32))
            results.append((float(loss.asnumpy()), bool(finite.asnumpy()), float(norm.asnumpy()),
                            float(model.w.asnumpy()[0]), float(optimizer.exp_avg[0].asnumpy()[0]),
                            float(optimizer.exp_avg_sq[0].asnumpy()[0])))
        _, finite, _ = step(*inputs, ms.Tensor(1e-2, ms.float32), ms.Tensor(float("inf"), ms.float32))
        assert not bool(finite.asnumpy())
        assert float(model.w.asnumpy()[0]) == results[-1][3] and int(optimizer.step.asnumpy()) == 2
        runs[path] = np.array(results)
    assert runs["host"][0, 1] and runs["host"][1, 3] != runs["host"][0, 3]  # finite, and w moved again
    np.testing.assert_allclose(runs["eager"], runs["host"], rtol=2e-6)
    np.testing.assert_allclose(runs["compiled"], runs["host"], rtol=2e-6)


@pytest.mark.parity
def test_host_update_matches_torch_clip_and_adamw(pynative):
    """The host path against torch itself: unscale, clip_grad_norm_ (clipping every step) and AdamW with weight
    decay over several tensors and steps."""
    torch, _ = import_parity_extra()
    rng = np.random.default_rng(5)
    shapes = [(6, 5), (7,), (3, 4, 2)]
    initial = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    params = [ms.Parameter(ms.Tensor(a.copy()), name=f"p{i}") for i, a in enumerate(initial)]
    optimizer = optim.AdamW([(p.name, p) for p in params], weight_decay=0.05)
    assert optimizer.host_kernels is not None
    ref = [torch.tensor(a.copy(), requires_grad=True) for a in initial]
    ref_optimizer = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.05)
    for step in range(3):
        scale = 2.0 ** (4 + step)
        grads = [(rng.standard_normal(s) * scale).astype(np.float32) for s in shapes]
        finite, norm = train_step.update_on_host(optimizer, [g.copy() for g in grads], np.float32(scale), 1e-2, 0.5)
        for p, g in zip(ref, grads):
            p.grad = torch.tensor(g) / scale
        ref_norm = torch.nn.utils.clip_grad_norm_(ref, 0.5)
        ref_optimizer.step()
        assert finite and float(norm) == pytest.approx(float(ref_norm), rel=1e-6)
        for p, r in zip(params, ref):
            np.testing.assert_allclose(p.asnumpy(), r.detach().numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("recompute", [False, True], ids=["recompute-off", "recompute-on"])
def test_every_trainable_tensor_gets_a_gradient(small_pipeline, recompute):
    unet, optimizer, step, initial = prepared_unet(small_pipeline, recompute)
    frozen = {name: p.asnumpy().copy() for name, p in unet.parameters_and_names() if name not in initial}
    inputs = step_inputs()
    loss, finite, norm = step(*inputs.values(), ms.Tensor(1e-3, ms.float32), ms.Tensor(1.0, ms.float32))
    assert bool(finite.asnumpy()) and np.isfinite(float(loss.asnumpy())) and float(norm.asnumpy()) > 0
    params = dict(unet.parameters_and_names())
    no_gradient = [name for name in initial if np.array_equal(params[name].asnumpy(), initial[name])]
    assert no_gradient == [], f"no gradient reached {no_gradient}"
    assert any("down_blocks" in name for name in initial)  # the blocks the official loses under checkpointing
    assert all(np.array_equal(params[name].asnumpy(), value) for name, value in frozen.items())

    if not recompute:
        # An infinite loss scale makes the gradients non-finite (as an fp16 overflow): no update, nothing moves.
        before = {name: params[name].asnumpy().copy() for name in initial}
        _, finite, _ = step(*inputs.values(), ms.Tensor(1e-3, ms.float32), ms.Tensor(float("inf"), ms.float32))
        assert not bool(finite.asnumpy())
        assert all(np.array_equal(params[name].asnumpy(), before[name]) for name in initial)
        assert int(optimizer.step.asnumpy()) == 1


def test_fp16_step_keeps_fp32_master_weights(small_pipeline):
    """The Ascend fp16 path, run on CPU: fp16 UNet, fp32 masters updated, the fp16 copies follow them."""
    unet, optimizer, step, initial = prepared_unet(small_pipeline, recompute=False, dtype=ms.float16)
    loss, finite, _ = step(*step_inputs().values(), ms.Tensor(1e-3, ms.float32), ms.Tensor(2.0 ** 16, ms.float32))
    assert bool(finite.asnumpy()) and np.isfinite(float(loss.asnumpy()))
    masters = optimizer.master_state()
    params = dict(unet.parameters_and_names())
    for name in initial:
        assert masters[name].dtype == np.float32 and params[name].dtype == ms.float16
        assert not np.array_equal(masters[name], initial[name])
        np.testing.assert_array_equal(params[name].asnumpy(), masters[name].astype(np.float16))


# ---------------------------------------------------------------------------------------------------------------
# Whole runs on a generated clip


@pytest.fixture(scope="module")
def tuned(small_pipeline, clip, graph_mode_module, tmp_path_factory):
    """24 steps on 4 frames of the generated clip at 64x64, checkpoints at 12 and 24, validation at the end."""
    out = tmp_path_factory.mktemp("run")
    config = run_config(small_pipeline, out, clip,
                        validation_data=dict(prompts=["a bear is skiing", "a man is skiing, cartoon style"]))
    before = checkpoint.cell_state_dict(UNet3DConditionModel.from_pretrained_2d(small_pipeline))
    result = training.train(config)
    return config, result, before


def test_tuning_lowers_the_loss(tuned):
    _, result, _ = tuned
    losses = [loss for _, loss in result.losses]
    assert len(losses) == 24 and all(np.isfinite(losses))
    assert np.mean(losses[-6:]) < 0.85 * np.mean(losses[:6]), losses


def test_only_the_trainable_tensors_change(tuned):
    _, result, before = tuned
    after = checkpoint.cell_state_dict(result.unet)
    changed = sorted(name for name in before if not np.array_equal(before[name], after[name]))
    expected = sorted(name for name in before if train_step.is_trainable(name, OFFICIAL_MODULES))
    assert changed == expected
    assert len(expected) == 4 * 7  # 4 transformer blocks x (attn1.to_q, attn2.to_q, 5 attn_temp tensors)


def test_run_writes_log_checkpoints_delta_and_samples(tuned):
    config, result, _ = tuned
    out = config.output_dir
    assert [os.path.basename(p) for _, p in train_state.list_checkpoints(out)] == ["checkpoint-12", "checkpoint-24"]
    assert result.delta_path == os.path.join(out, "unet_delta.safetensors")
    assert os.path.getsize(result.delta_path) < 2_000_000
    assert os.path.isfile(os.path.join(out, "inv_latents", "ddim_latent-24.safetensors"))
    for prompt in ("a bear is skiing", "a man is skiing, cartoon style"):  # named as tools/sample.py names them
        assert os.path.isfile(os.path.join(out, "samples", "step-24", f"{output_name(prompt)}.gif"))
    assert os.path.isfile(os.path.join(out, "samples", "step-24.gif"))
    with open(result.log_path, encoding="utf-8") as handle:
        log = handle.read()
    assert "trainable: 28 tensors" in log and "step 24 loss" in log and "notice: mixed_precision: fp16" in log
    assert log.strip().splitlines()[-1].split(" INFO ")[1].startswith(f"done: 24 steps. Outputs in {out}")
    assert os.path.isfile(os.path.join(out, "config.yaml"))


def test_run_plots_its_loss_and_writes_a_source_edit_grid(tuned):
    from PIL import Image

    from tav.loss_plot import LOSS_COLOR, LR_COLOR

    config, _, _ = tuned
    with Image.open(os.path.join(config.output_dir, "loss.png")) as plot:
        assert plot.format == "PNG"
        colors = {color for _, color in plot.convert("RGB").getcolors(1 << 20)}
    assert LOSS_COLOR in colors and LR_COLOR in colors
    # One row: the 4-frame 64x64 source, then the two edits, 2 px of padding around and between (save_videos_grid).
    with Image.open(os.path.join(config.output_dir, "samples", "step-24-source_edit.gif")) as grid:
        assert grid.size == (3 * 64 + 4 * 2, 64 + 2 * 2) and grid.n_frames == 4
        grid.seek(0)
        frame = np.asarray(grid.convert("RGB"), np.float32)
    source = (training.read_clip(config)[0, :, 0].transpose(1, 2, 0) + 1) * 127.5
    assert np.abs(frame[2:66, 2:66] - source).mean() < 12  # the first tile is the source clip (gif palette)


def test_delta_reproduces_the_tuned_model_exactly(tuned, small_pipeline):
    _, result, _ = tuned
    from tav.pipeline import load_unet

    ms.set_seed(12345)  # a different temporal init than training's: the delta must override all of it
    loaded = load_unet(small_pipeline, unet=result.delta_path)  # what tools/sample.py --unet does
    _, metadata = delta.read_delta(result.delta_path)
    assert json.loads(metadata["tav_step"]) == 24
    rng = np.random.default_rng(5)
    sample = ms.Tensor(rng.standard_normal((1, 4, 4, 8, 8)).astype(np.float32))
    context = ms.Tensor(rng.standard_normal((1, 77, 32)).astype(np.float32))
    t = ms.Tensor(np.array([321], np.int64))
    np.testing.assert_array_equal(loaded(sample, t, context).asnumpy(), result.unet(sample, t, context).asnumpy())


def test_delta_refuses_a_different_base_model(tuned, small_pipeline, tmp_path):
    _, result, _ = tuned
    other = UNet3DConditionModel.from_pretrained_2d(small_pipeline)
    param = dict(other.parameters_and_names())["conv_in.weight"]
    param.set_data(param + 1.0)
    with pytest.raises(checkpoint.CheckpointMismatchError, match="other base weights"):
        delta.apply_delta(other, result.delta_path)
    wrong_shape = UNet3DConditionModel(dict(SMALL_UNET, cross_attention_dim=16))
    with pytest.raises(checkpoint.CheckpointMismatchError, match="architecture"):
        delta.apply_delta(wrong_shape, result.delta_path)
    not_a_delta = tmp_path / "plain.safetensors"
    checkpoint.save_state_dict({"x": np.zeros(2, np.float32)}, not_a_delta)
    with pytest.raises(checkpoint.CheckpointError, match="not a tav UNet delta"):
        delta.apply_delta(other, not_a_delta)


def test_resume_reproduces_the_uninterrupted_loss_sequence(tuned, small_pipeline, clip, tmp_path):
    config, result, _ = tuned
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(os.path.join(config.output_dir, "checkpoint-12"), out / "checkpoint-12")
    resumed_config = run_config(small_pipeline, out, clip, resume_from_checkpoint="latest", checkpoints_total_limit=1)
    resumed = training.train(resumed_config)
    assert resumed.losses[:12] == result.losses[:12]  # carried over from the checkpoint
    np.testing.assert_array_equal(np.array(resumed.losses[12:]), np.array(result.losses[12:]))
    assert [os.path.basename(p) for _, p in train_state.list_checkpoints(out)] == ["checkpoint-24"]
    tuned_tensors, _ = delta.read_delta(result.delta_path)
    resumed_tensors, _ = delta.read_delta(resumed.delta_path)
    assert all(np.array_equal(tuned_tensors[k], resumed_tensors[k]) for k in tuned_tensors)


# ---------------------------------------------------------------------------------------------------------------
# Bad input


class FakeStep:
    """Stands in for TrainStep: loss 1.0 every update except a NaN at update `nan_at`."""

    def __init__(self, nan_at):
        self.calls = 0
        self.nan_at = nan_at

    def report(self, *inputs):
        self.calls += 1
        loss = float("nan") if self.calls == self.nan_at else 1.0  # nan_at=None: never
        return loss, bool(np.isfinite(loss)), 0.5


def fake_train_step(monkeypatch, nan_at):
    fake = FakeStep(nan_at)
    monkeypatch.setattr(training, "TrainStep", lambda *args, **kwargs: fake)
    return fake


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(small_pipeline, clip, tmp_path, monkeypatch):
    """The loop's reaction to a non-finite loss; the step itself is replaced (its overflow check is tested above)."""
    fake_train_step(monkeypatch, nan_at=3)
    config = run_config(small_pipeline, tmp_path / "out", clip, checkpointing_steps=2)
    with pytest.raises(training.TrainingError, match=r"loss is nan .* step 3.*checkpoint-2"):
        training.train(config)
    assert [step for step, _ in train_state.list_checkpoints(config.output_dir)] == [2]


def test_nan_loss_error_is_logged_and_advises_only_what_applies(small_pipeline, clip, tmp_path, monkeypatch):
    """On CPU mixed_precision: fp16 trains in fp32, so 'mixed_precision: no' would change nothing."""
    fake_train_step(monkeypatch, nan_at=1)
    config = run_config(small_pipeline, tmp_path / "out", clip)
    with pytest.raises(training.TrainingError) as caught:
        training.train(config)
    assert "learning_rate" in str(caught.value) and "mixed_precision" not in str(caught.value)
    with open(os.path.join(config.output_dir, "train.log"), encoding="utf-8") as handle:
        assert f"ERROR error: {caught.value}" in handle.read()
    plan = optim.PrecisionPlan(ms.float16, True)
    assert "mixed_precision: no" in training.non_finite_message(config, plan, float("nan"), False, 1, None)


def test_missing_base_model_names_the_key(tmp_path, clip):
    config = run_config(str(tmp_path / "no-model"), tmp_path / "out", clip)
    with pytest.raises(ConfigError, match="pretrained_model_path.*does not exist"):
        training.train(config)


def test_incomplete_base_model_names_the_missing_parts(tmp_path, clip):
    (tmp_path / "sd" / "unet").mkdir(parents=True)
    config = run_config(str(tmp_path / "sd"), tmp_path / "out", clip)
    with pytest.raises(ConfigError, match="missing vae/, text_encoder/, tokenizer/, scheduler/"):
        training.train(config)


def test_missing_video_names_the_key(small_pipeline, tmp_path):
    config = run_config(small_pipeline, tmp_path / "out", tmp_path / "nothing.mp4")
    with pytest.raises(ConfigError, match="train_data.video_path.*does not exist"):
        training.train(config)


def test_too_short_video_is_an_error(small_pipeline, clip, tmp_path):
    config = run_config(small_pipeline, tmp_path / "out", clip,
                        train_data=dict(n_sample_frames=50, sample_frame_rate=2),
                        validation_data=dict(use_inv_latent=False))
    with pytest.raises(ConfigError, match="train_data.video_path.*too few frames"):
        training.train(config)


def test_unwritable_output_dir_is_an_error(small_pipeline, clip, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    config = run_config(small_pipeline, blocker / "out", clip)
    with pytest.raises(ConfigError, match="output_dir.*not writable"):
        training.train(config)


def test_resume_from_a_folder_that_is_not_a_checkpoint(small_pipeline, clip, tmp_path):
    config = run_config(small_pipeline, tmp_path / "out", clip,
                        resume_from_checkpoint=str(tmp_path))
    with pytest.raises(ConfigError, match="resume_from_checkpoint.*not a checkpoint folder"):
        training.train(config)


def test_full_pipeline_export_holds_the_tuned_unet(tuned, tmp_path):
    config, result, _ = tuned
    export = dataclasses.replace(config, output_dir=str(tmp_path / "export"))
    os.makedirs(export.output_dir)
    training.save_full_pipeline(export, result.unet)
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert os.path.isdir(os.path.join(export.output_dir, part))
    assert checkpoint.read_json(os.path.join(export.output_dir, "model_index.json"))["_class_name"] == \
        "TuneAVideoPipeline"
    loaded = checkpoint.cell_state_dict(UNet3DConditionModel.from_pretrained(export.output_dir))
    tuned_state = checkpoint.cell_state_dict(result.unet)
    assert loaded.keys() == tuned_state.keys()
    assert all(np.array_equal(loaded[name], tuned_state[name]) for name in loaded)


# ---------------------------------------------------------------------------------------------------------------
# One run per output folder; nothing written before the inputs are known good


def test_a_new_run_refuses_a_folder_holding_another_run(tuned, small_pipeline, clip):
    config, _, _ = tuned
    before = sorted(os.listdir(config.output_dir))
    with open(os.path.join(config.output_dir, "config.yaml"), encoding="utf-8") as handle:
        saved = handle.read()
    again = run_config(small_pipeline, config.output_dir, clip, seed=8)
    with pytest.raises(ConfigError, match=r"holds another run's outputs \(checkpoint-12, checkpoint-24, "
                                          r"unet_delta.safetensors.*--resume_from_checkpoint latest.*"
                                          r"--overwrite_output_dir"):
        training.train(again)
    assert sorted(os.listdir(config.output_dir)) == before
    with open(os.path.join(config.output_dir, "config.yaml"), encoding="utf-8") as handle:
        assert handle.read() == saved


def test_latest_resumes_only_a_checkpoint_written_under_a_compatible_config(tuned, small_pipeline, clip, tmp_path):
    config, _, _ = tuned
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(os.path.join(config.output_dir, "checkpoint-12"), out / "checkpoint-12")
    longer = run_config(small_pipeline, out, clip, resume_from_checkpoint="latest", max_train_steps=30,
                        checkpointing_steps=6, validation_steps=30)
    assert training.resolve_resume(longer) == str(out / "checkpoint-12")  # cadence and length may change
    other = run_config(small_pipeline, out, clip, resume_from_checkpoint="latest", trainable_modules=["attn1.to_q"],
                       train_data=dict(n_sample_frames=6))
    with pytest.raises(ConfigError, match=r"cannot resume .*checkpoint-12: it was trained with a different "
                                          r"train_data.n_sample_frames, trainable_modules \(train_data.n_sample_"
                                          r"frames: 4 in the checkpoint, 6 now"):
        training.train(other)
    assert sorted(os.listdir(out)) == ["checkpoint-12"]


def test_overwrite_output_dir_starts_over_and_interrupted_writes_are_removed(small_pipeline, clip, tmp_path,
                                                                            monkeypatch):
    out = tmp_path / "out"
    (out / "checkpoint-50").mkdir(parents=True)
    (out / "checkpoint-50" / "training_state.json").write_text("{}")
    (out / "unet_delta.safetensors").write_text("the old run's delta")
    (out / "notes.txt").write_text("not a run output")
    interrupted = out / ".checkpoint-60.x1y2.tmp"
    interrupted.mkdir()
    (interrupted / "optimizer.safetensors").write_text("half written")
    fake_train_step(monkeypatch, nan_at=None)
    # validation_steps beyond the run: no samples, even at the final step (the delta is exported regardless)
    config = run_config(small_pipeline, out, clip, overwrite_output_dir=True, max_train_steps=2,
                        checkpointing_steps=2, validation_steps=5, validation_data=dict(prompts=["a bear is skiing"]))
    result = training.train(config)
    assert sorted(os.listdir(out)) == ["checkpoint-2", "config.yaml", "loss.png", "notes.txt", "train.log",
                                       "unet_delta.safetensors"]
    assert result.samples == [] and json.loads(delta.read_delta(result.delta_path)[1]["tav_step"]) == 2
    with open(result.log_path, encoding="utf-8") as handle:
        log = handle.read()
    assert "overwrite_output_dir: removed the previous run's checkpoint-50, unet_delta.safetensors" in log
    assert f"removed {interrupted}, left by an interrupted checkpoint write" in log


def test_a_run_failing_on_its_inputs_leaves_output_dir_untouched(small_pipeline, clip, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text("the previous run's config\n")
    bad_resume = run_config(small_pipeline, out, clip, resume_from_checkpoint=str(tmp_path / "nowhere"))
    short_clip = run_config(small_pipeline, out, clip, overwrite_output_dir=True,
                            train_data=dict(n_sample_frames=50, sample_frame_rate=2),
                            validation_data=dict(use_inv_latent=False))
    for config in (bad_resume, short_clip):
        with pytest.raises(ConfigError):
            training.train(config)
        assert os.listdir(out) == ["config.yaml"]
        assert (out / "config.yaml").read_text() == "the previous run's config\n"


def test_a_delta_on_other_base_weights_names_the_way_out(tuned, small_pipeline):
    _, result, _ = tuned
    other = UNet3DConditionModel.from_pretrained_2d(small_pipeline)
    param = dict(other.parameters_and_names())["conv_in.weight"]
    param.set_data(param + 1.0)
    with pytest.raises(checkpoint.CheckpointMismatchError, match="pass --no_check_base to tools/sample.py"):
        delta.apply_delta(other, result.delta_path)
    delta.apply_delta(other, result.delta_path, check_base=False)
    tensors, _ = delta.read_delta(result.delta_path)
    params = dict(other.parameters_and_names())
    assert all(np.array_equal(params[name].asnumpy(), value) for name, value in tensors.items())


def test_resuming_another_folders_checkpoint_into_an_occupied_output_dir_is_refused(tuned, small_pipeline, clip,
                                                                                    tmp_path):
    config, _, _ = tuned
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.log").write_text("another run's log\n")
    elsewhere = run_config(small_pipeline, out, clip,
                           resume_from_checkpoint=os.path.join(config.output_dir, "checkpoint-12"))
    with pytest.raises(ConfigError, match=r"holds another run's outputs \(train.log\)"):
        training.train(elsewhere)
    assert os.listdir(out) == ["train.log"]


# ---------------------------------------------------------------------------------------------------------------
# A loop of your own


def test_loss_and_gradients_takes_select_trainables_pairs(graph_mode):
    """The documented fast path for a user's loop: a loss Cell and the (name, Parameter) pairs, in GRAPH_MODE."""
    model = ScaleModel()

    class Loss(ms.nn.Cell):
        def __init__(self):
            super().__init__()
            self.model = model

        def construct(self, x, target):
            return ms.ops.mean(ms.ops.square(self.model(x, None, None) - target))

    x = np.arange(1.0, 5.0, dtype=np.float32)
    target = np.zeros(4, np.float32)
    loss, grads = train_step.LossAndGradients(Loss(), [("w", model.w)])(ms.Tensor(x), ms.Tensor(target))
    assert float(loss.asnumpy()) == pytest.approx(np.mean((0.3 * x) ** 2), rel=1e-6)
    assert float(grads[0].asnumpy()[0]) == pytest.approx(np.mean(2 * 0.3 * x * x), rel=1e-6)


def test_train_leaves_the_process_as_it_found_it(small_pipeline, clip, tmp_path, monkeypatch, pynative):
    """The execution mode and console logging belong to the caller (tools/train.py): a config asking for
    GRAPH_MODE does not switch it, and the train.log handler is gone once train() returns."""
    import logging

    fake_train_step(monkeypatch, nan_at=None)
    handlers = list(logging.getLogger("tav.train").handlers)
    training.train(run_config(small_pipeline, tmp_path / "out", clip, max_train_steps=1, mode=0))
    assert ms.get_context("mode") == ms.PYNATIVE_MODE
    assert logging.getLogger("tav.train").handlers == handlers


def test_the_temporal_init_follows_the_config_seed_not_the_global_rng(small_pipeline, clip, tmp_path):
    config = run_config(small_pipeline, tmp_path / "out", clip)
    plan = optim.precision_plan(config.mixed_precision, "CPU")
    temporal = []
    for global_seed, seed in ((1, 7), (2, 7), (1, 8)):
        ms.set_seed(global_seed)
        unet = training.load_models(config, plan, seed)[0]
        temporal.append({name: p.asnumpy() for name, p in unet.parameters_and_names() if is_temporal_key(name)})
    assert all(np.array_equal(temporal[0][name], temporal[1][name]) for name in temporal[0])
    assert not all(np.array_equal(temporal[0][name], temporal[2][name]) for name in temporal[0])
