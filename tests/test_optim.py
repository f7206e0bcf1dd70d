"""The numbers that steer an update (tav.optim): the precision plan, the learning-rate schedules against diffusers'
get_scheduler, the dynamic loss scale, AdamW against torch.optim.AdamW and clipping against clip_grad_norm_."""
import numpy as np
import pytest

import mindspore as ms

from tav import optim
from tav.config import config_from_dict
from tests.helpers import import_parity_extra


def test_precision_plan_uses_fp16_with_loss_scaling_on_ascend_and_fp32_on_cpu():
    assert optim.precision_plan("fp16", "Ascend") == optim.PrecisionPlan(ms.float16, True)
    assert optim.precision_plan("bf16", "Ascend") == optim.PrecisionPlan(ms.bfloat16, False)
    assert optim.precision_plan("no", "Ascend") == optim.PrecisionPlan(ms.float32, False)
    cpu = optim.precision_plan("fp16", "CPU")
    assert (cpu.compute_dtype, cpu.loss_scaling) == (ms.float32, False) and "fp32" in cpu.notice
    assert optim.precision_plan("bf16", "GPU").compute_dtype == ms.float32
    assert optim.precision_plan("no", "CPU").notice == ""


@pytest.mark.parity
@pytest.mark.parametrize("name", ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                                  "polynomial"])
def test_learning_rates_follow_diffusers_get_scheduler(name):
    torch, _ = import_parity_extra()
    from diffusers.optimization import get_scheduler

    total, warmup, base = 20, 4, 3e-5
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)
    config = config_from_dict(dict(pretrained_model_path="sd", output_dir="out",
                                   train_data=dict(video_path="clip.mp4", prompt="p"), validation_data=dict(),
                                   lr_scheduler=name, lr_warmup_steps=warmup, max_train_steps=total, learning_rate=base))
    for step in range(total):
        assert optim.learning_rate_at(config, step) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-9,
                                                                         abs=1e-15)
        optimizer.step()
        scheduler.step()


def test_dynamic_loss_scale_halves_on_overflow_and_grows_after_a_window():
    scale = optim.DynamicLossScale(scale=1024.0, growth_interval=3)
    scale.update(False)
    assert scale.scale == 512.0
    for _ in range(3):
        scale.update(True)
    assert scale.scale == 1024.0
    assert optim.DynamicLossScale(enabled=False).scale == 1.0


@pytest.mark.parity
def test_adamw_matches_torch_adamw(pynative):
    torch, _ = import_parity_extra()
    rng = np.random.default_rng(0)
    start = [rng.standard_normal(shape).astype(np.float32) for shape in ((3, 5), (4,))]
    grads = [[rng.standard_normal(w.shape).astype(np.float32) for w in start] for _ in range(6)]
    lrs = [3e-2, 3e-2, 1e-2, 2e-2, 5e-3, 1e-2]

    params = [(f"p{i}", ms.Parameter(ms.Tensor(w), name=f"p{i}")) for i, w in enumerate(start)]
    optimizer = optim.AdamW(params, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)

    @ms.jit
    def step(g, lr):
        return optimizer(g, lr)

    for g, lr in zip(grads, lrs):
        step(tuple(ms.Tensor(x) for x in g), ms.Tensor(lr, ms.float32))

    reference = [torch.nn.Parameter(torch.from_numpy(w.copy())) for w in start]
    torch_opt = torch.optim.AdamW(reference, lr=lrs[0], betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    for g, lr in zip(grads, lrs):
        for param, x in zip(reference, g):
            param.grad = torch.from_numpy(x)
        torch_opt.param_groups[0]["lr"] = lr
        torch_opt.step()
    for (_, param), expected in zip(params, reference):
        np.testing.assert_allclose(param.asnumpy(), expected.detach().numpy(), rtol=0, atol=1e-6)
    assert int(optimizer.step.asnumpy()) == 6


@pytest.mark.parity
@pytest.mark.parametrize("scale", [0.01, 100.0])
def test_gradient_clipping_matches_torch_clip_grad_norm(pynative, scale):
    torch, _ = import_parity_extra()
    rng = np.random.default_rng(1)
    grads = [(scale * rng.standard_normal(shape)).astype(np.float32) for shape in ((4, 3), (7,))]
    norm = optim.global_norm([ms.Tensor(g) for g in grads])
    clipped = optim.clip_by_global_norm([ms.Tensor(g) for g in grads], 1.0, norm)
    reference = [torch.nn.Parameter(torch.zeros(g.shape)) for g in grads]
    for param, g in zip(reference, grads):
        param.grad = torch.from_numpy(g.copy())
    expected_norm = torch.nn.utils.clip_grad_norm_(reference, 1.0)
    assert float(norm.asnumpy()) == pytest.approx(float(expected_norm), rel=1e-6)
    for got, param in zip(clipped, reference):
        np.testing.assert_allclose(got.asnumpy(), param.grad.numpy(), rtol=1e-6, atol=1e-9)
