"""The device path of a train step (issue 12, defect 11) under the Ascend emulation: the fp16 gradients' fp32 casts
run inside the compiled graphs, not as one eager op per tensor, and the loop reads its loss, applied flag and
gradient norm from the device once per step."""
import numpy as np

import mindspore as ms

from tav import backend, optim, tiny, train_step
from tav.models.unet3d import UNet3DConditionModel
from tav.schedulers import SD_V1_SCHEDULE, DDIMScheduler
from tav.training import select_trainable

# One block and no down/up-sampling, so the emulated fp16 graphs compile in seconds.
SMALL_UNET = dict(tiny.TINY_UNET_CONFIG, block_out_channels=[32], down_block_types=["CrossAttnDownBlock2D"],
                  up_block_types=["CrossAttnUpBlock2D"])


class Counter:
    def __init__(self, monkeypatch, name):
        self.calls, original = [], getattr(ms.Tensor, name)

        def counted(tensor, *args, **kwargs):
            self.calls.append(args)
            return original(tensor, *args, **kwargs)

        monkeypatch.setattr(ms.Tensor, name, counted)


def test_an_emulated_ascend_step_casts_in_the_graph_and_syncs_once(graph_mode, monkeypatch):
    rng = np.random.default_rng(0)
    latent = (1, 4, 2, 8, 8)
    inputs = [ms.Tensor(a) for a in (
        rng.standard_normal(latent).astype(np.float32), np.full(latent, 0.1, np.float32),
        rng.standard_normal((2,) + latent).astype(np.float32), rng.standard_normal((2,) + latent).astype(np.float32),
        np.array([[100], [700]], np.int64), rng.standard_normal((1, 77, 32)).astype(np.float32))]
    lr, scale = ms.Tensor(1e-3, ms.float32), ms.Tensor(1024.0, ms.float32)
    with backend.emulate_ascend("910B"):
        ms.set_seed(0)
        unet = UNet3DConditionModel(dict(SMALL_UNET))
        trainable = select_trainable(unet, ["attn1.to_q", "attn2.to_q", "attn_temp"])
        initial = {name: p.asnumpy() for name, p in trainable}
        unet.to_dtype(ms.float16)
        optimizer = optim.AdamW(trainable, master_dtype=ms.float32)
        optimizer.load_master(initial)
        step = train_step.TrainStep(unet, optimizer, DDIMScheduler.from_config(SD_V1_SCHEDULE), 0.18215, None, 1.0,
                                    ms.float16)
        assert step.update_path == "compiled"
        step.report(*inputs, lr, scale)  # compiles the gradient, accumulation and update graphs
        casts, reads = Counter(monkeypatch, "astype"), Counter(monkeypatch, "asnumpy")
        loss, applied, norm = step.report(*inputs, lr, scale)
    assert len(trainable) > 10 and casts.calls == [] and len(reads.calls) == 1
    assert applied and np.isfinite(loss) and loss > 0 and norm > 0
    assert all(m.dtype == ms.float32 for m in optimizer.master)
