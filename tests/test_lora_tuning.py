"""LoRA tuning: low-rank adapters train instead of the projections, the delta holds only them (a few MB at SD 1.5
shapes), and loading the delta into a fresh UNet reproduces the tuned model's output."""
import numpy as np
import pytest

import mindspore as ms

from tav import checkpoint, delta, lora_tuning, tiny, training
from tav.config import ConfigError
from tav.models.unet3d import UNet3DConditionModel
from tests.test_training import clip, graph_mode_module, run_config, small_pipeline  # noqa: F401 (fixtures)

# SD 1.5's 16 transformer blocks by width (down 2+2+2, mid 1, up 3+3+3), cross-attention width 768.
SD15_BLOCK_WIDTHS = [320] * 2 + [640] * 2 + [1280] * 2 + [1280] + [1280] * 3 + [640] * 3 + [320] * 3
SD15_TEXT_WIDTH = 768


def sd15_shapes(modules):
    """(out, in) of the SD 1.5 Linears a set of LoRA targets names (attn2's k/v read the text embeddings)."""
    shapes = []
    for d in SD15_BLOCK_WIDTHS:
        for attention in ("attn1", "attn2", "attn_temp"):
            for projection in ("to_q", "to_k", "to_v", "to_out"):
                name = f"{attention}.{projection}"
                if any(name.endswith(m) or attention == m for m in modules):
                    reads_text = attention == "attn2" and projection in ("to_k", "to_v")
                    shapes.append((d, SD15_TEXT_WIDTH if reads_text else d))
    return shapes


def test_a_lora_delta_for_sd15_is_a_few_megabytes():
    default = lora_tuning.adapter_size_bytes(sd15_shapes(["attn1.to_q", "attn2.to_q"]), rank=4)
    assert len(sd15_shapes(["attn1.to_q", "attn2.to_q"])) == 32 and default == 798_720  # 0.8 MB
    wide = lora_tuning.adapter_size_bytes(sd15_shapes(["attn1", "attn2", "attn_temp"]), rank=8)
    assert wide < 10_000_000  # every projection of all three attentions at rank 8: 9.3 MB
    assert 74_354_880 * 4 / default > 300  # the official full tuning's delta is ~297 MB


def test_adapters_start_as_the_base_and_keep_the_layer_names(pynative):
    ms.set_seed(0)
    unet = UNet3DConditionModel(dict(tiny.TINY_UNET_CONFIG))
    names = [name for name, _ in unet.parameters_and_names()]
    x = ms.Tensor(np.random.default_rng(0).standard_normal((1, 4, 2, 8, 8)).astype(np.float32))
    t, context = ms.Tensor(np.array([10], np.int64)), ms.Tensor(np.ones((1, 77, 32), np.float32))
    before = unet(x, t, context).asnumpy()
    adapted = lora_tuning.add_lora_adapters(unet, 2, ["attn1.to_q", "attn_temp"], seed=1)
    assert all(n.endswith(("attn1.to_q", "attn_temp.to_q", "attn_temp.to_k", "attn_temp.to_v", "attn_temp.to_out.0"))
               for n in adapted)
    after_names = [name for name, _ in unet.parameters_and_names()]
    assert set(names) <= set(after_names)
    assert sorted(set(after_names) - set(names)) == sorted(f"{n}.{part}.weight" for n in adapted
                                                          for part in ("lora_down", "lora_up"))
    np.testing.assert_array_equal(unet(x, t, context).asnumpy(), before)  # up starts at zero
    with pytest.raises(ValueError, match="lora_modules \\['attn9'\\] match no Linear"):
        lora_tuning.add_lora_adapters(unet, 2, ["attn9"])


@pytest.fixture(scope="module")
def lora_run(small_pipeline, clip, graph_mode_module, tmp_path_factory):
    config = run_config(small_pipeline, tmp_path_factory.mktemp("lora"), clip, lora_rank=4,
                        lora_modules=["attn1.to_q", "attn2.to_q", "attn_temp"], mixed_precision="no",
                        learning_rate=1e-2)
    return config, training.train(config)


def test_lora_tuning_lowers_the_loss_and_trains_only_the_adapters(lora_run):
    config, result = lora_run
    losses = [loss for _, loss in result.losses]
    assert len(losses) == 24 and np.mean(losses[-6:]) < 0.9 * np.mean(losses[:6]), losses
    tensors, metadata = delta.read_delta(result.delta_path)
    assert tensors and all(".lora_down." in n or ".lora_up." in n for n in tensors)
    assert any(np.abs(v).max() > 0 for n, v in tensors.items() if ".lora_up." in n)  # the up halves moved
    shapes = [tuple(v.shape) for n, v in tensors.items() if ".lora_up." in n]
    adapters = lora_tuning.adapter_size_bytes([(out, tensors[n.replace("lora_up", "lora_down")].shape[1])
                                               for n, (out, _) in zip([n for n in tensors if ".lora_up." in n],
                                                                      shapes)], rank=4)
    assert sum(v.nbytes for v in tensors.values()) == adapters
    assert __import__("os").path.getsize(result.delta_path) < adapters + 40_000  # + the header (config, ...)


def test_loading_a_lora_delta_reproduces_the_tuned_model(lora_run, small_pipeline):
    from tav.pipeline import load_unet

    _, result = lora_run
    ms.set_seed(999)  # another temporal init than training's: the delta's seed must replace it
    loaded = load_unet(small_pipeline, result.delta_path)
    assert not any(".lora_" in name for name, _ in loaded.parameters_and_names())  # fused into plain Linears
    rng = np.random.default_rng(4)
    x = ms.Tensor(rng.standard_normal((1, 4, 4, 8, 8)).astype(np.float32))
    t, context = ms.Tensor(np.array([300], np.int64)), ms.Tensor(rng.standard_normal((1, 77, 32)).astype(np.float32))
    expected = result.unet(x, t, context).asnumpy()
    np.testing.assert_allclose(loaded(x, t, context).asnumpy(), expected, atol=1e-4, rtol=1e-4)
    base = UNet3DConditionModel.from_pretrained_2d(small_pipeline, init_seed=0)
    assert np.abs(base(x, t, context).asnumpy() - expected).max() > 1e-3  # the tuning changed the output


def test_a_lora_delta_refuses_another_base(lora_run, small_pipeline):
    _, result = lora_run
    unet = UNet3DConditionModel.from_pretrained_2d(small_pipeline)
    name, param = next((n, p) for n, p in unet.parameters_and_names() if n.endswith("conv_in.weight"))
    param.set_data(param + 1.0)
    with pytest.raises(checkpoint.CheckpointMismatchError, match="other base weights"):
        delta.apply_delta(unet, result.delta_path)


def test_lora_modules_that_match_nothing_are_a_config_error(small_pipeline, clip, tmp_path):
    config = run_config(small_pipeline, tmp_path / "out", clip, lora_rank=2, lora_modules=["attn9.to_q"])
    with pytest.raises(ConfigError, match="lora_modules .*match no Linear"):
        training.train(config)
