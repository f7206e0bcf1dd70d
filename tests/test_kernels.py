"""tav.kernels: attention backends agree with a float64 reference, and the dispatch picks what the docs allow."""
import warnings

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

import tav.backend
from tav.kernels import (
    ATTENTION_BACKENDS,
    attention,
    default_chunk_size,
    flash_unsupported_reason,
    math_attention,
    pad_head_dim,
    padded_head_dim,
    resolve_backend,
    unpad_head_dim,
)
from tav.kernels.attention_backends import chunked as chunked_backend
from tav.kernels.attention_backends import dispatch
from tav.kernels.cpu import build as native

@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(dispatch, "_warned", set())


class AttentionCell(nn.Cell):
    """attention() inside construct, the way the UNet and VAE call it."""

    def __init__(self, num_heads, backend="auto", upcast=False, chunk_size=None):
        super().__init__()
        self.num_heads = num_heads
        self.backend = backend
        self.upcast = upcast
        self.chunk_size = chunk_size

    def construct(self, q, k, v):
        return attention(q, k, v, self.num_heads, self.backend, self.upcast, self.chunk_size)


def reference_attention(q, k, v, num_heads, scale=None):
    """float64 numpy diffusers-0.11 attention: heads batch-major/head-minor, softmax(scale q k^T) v."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, nq, inner = q.shape
    d = inner // num_heads
    scale = d**-0.5 if scale is None else scale

    def split(x):
        return x.reshape(b, x.shape[1], num_heads, d).transpose(0, 2, 1, 3)

    scores = scale * split(q) @ split(k).transpose(0, 1, 3, 2)
    scores -= scores.max(-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(-1, keepdims=True)
    return (probs @ split(v)).transpose(0, 2, 1, 3).reshape(b, nq, inner)


def random_qkv(batch, nq, nk, num_heads, head_dim, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    inner = num_heads * head_dim
    q = rng.standard_normal((batch, nq, inner)).astype(dtype)
    k = rng.standard_normal((batch, nk, inner)).astype(dtype)
    v = rng.standard_normal((batch, nk, inner)).astype(dtype)
    return q, k, v


def run(cell, q, k, v):
    return cell(ms.Tensor(q), ms.Tensor(k), ms.Tensor(v))


# (batch, Nq, Nk, heads, D): Nq != Nk, heads 1/2/8, D 40 (SD 1.x) and 64 (SD 2.x)
SHAPES = [(2, 5, 7, 1, 40), (1, 12, 9, 2, 64), (2, 6, 11, 8, 40), (1, 8, 3, 8, 64)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}-q{}-k{}-h{}-d{}".format(*s))
def test_math_matches_float64_reference(ms_mode, shape):
    batch, nq, nk, heads, d = shape
    q, k, v = random_qkv(batch, nq, nk, heads, d)
    out = run(AttentionCell(heads, "math"), q, k, v)
    assert out.shape == (batch, nq, heads * d)
    assert out.dtype == ms.float32
    np.testing.assert_allclose(out.asnumpy(), reference_attention(q, k, v, heads), atol=1e-5, rtol=0)


def test_math_fp16_inputs_return_fp16(ms_mode):
    q, k, v = random_qkv(2, 6, 10, 2, 40, dtype=np.float16)
    out = run(AttentionCell(2, "math"), q, k, v)
    assert out.dtype == ms.float16
    np.testing.assert_allclose(out.asnumpy().astype(np.float64), reference_attention(q, k, v, 2), atol=5e-3)


def test_auto_on_cpu_matches_the_reference(ms_mode):
    q, k, v = random_qkv(1, 7, 5, 2, 64)
    out = run(AttentionCell(2, "auto"), q, k, v)
    np.testing.assert_allclose(out.asnumpy(), reference_attention(q, k, v, 2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk_size", [3, 5, 64])  # ragged 3+3+3+1, exact 5+5, one chunk
def test_chunked_equals_math_including_ragged_last_chunk(ms_mode, chunk_size):
    q, k, v = random_qkv(2, 10, 13, 2, 40, seed=1)
    chunked = run(AttentionCell(2, "chunked", chunk_size=chunk_size), q, k, v).asnumpy()
    exact = run(AttentionCell(2, "math"), q, k, v).asnumpy()
    np.testing.assert_allclose(chunked, exact, atol=1e-6, rtol=0)


def test_chunked_default_chunk_size_equals_math(ms_mode, monkeypatch):
    # a 64-element budget with 1 batch * 2 heads * 13 keys = 26 scores per query -> 2-query chunks
    monkeypatch.setattr(chunked_backend, "SCORE_BLOCK_ELEMENTS", 64)
    assert default_chunk_size(1, 2, 9, 13) == 2
    q, k, v = random_qkv(1, 9, 13, 2, 40, seed=2)
    chunked = run(AttentionCell(2, "chunked"), q, k, v).asnumpy()
    np.testing.assert_allclose(chunked, reference_attention(q, k, v, 2), atol=1e-5, rtol=0)


def test_default_chunk_size_keeps_score_block_under_budget():
    # Tune-A-Video attn1 at 512 px with CFG: (2 videos * 8 frames) batch, 8 heads, 4096 queries, 8192 keys
    chunk = default_chunk_size(16, 8, 4096, 8192, budget=2**27)
    assert chunk == 2**27 // (16 * 8 * 8192) == 128
    assert default_chunk_size(1, 1, 10, 10, budget=2**27) == 10
    assert default_chunk_size(4, 8, 100, 10**9, budget=2**27) == 1


def test_chunk_size_must_be_positive():
    q, k, v = (ms.Tensor(x) for x in random_qkv(1, 4, 4, 1, 16))
    with pytest.raises(ValueError, match="chunk_size"):
        attention(q, k, v, 1, backend="chunked", chunk_size=0)


def upcast_probe(head_dim=64, nk=8, nq=5, offset=40.0, seed=3):
    """fp16 q, k whose scores are all ~200 +- O(1) and v = identity, so the output columns are the probabilities.

    Scores near 200 have fp16 spacing 0.125, so fp16 scores misplace the softmax by percents; fp32 scores do not.
    """
    rng = np.random.default_rng(seed)
    q = 0.5 * rng.standard_normal((1, nq, head_dim))
    k = 0.5 * rng.standard_normal((1, nk, head_dim))
    q[..., 0] = offset
    k[..., 0] = offset
    v = np.zeros((1, nk, head_dim))
    v[0, np.arange(nk), np.arange(nk)] = 1.0
    return tuple(x.astype(np.float16) for x in (q, k, v))


def test_upcast_gives_fp32_accurate_scores_for_fp16_inputs(ms_mode):
    q, k, v = upcast_probe()
    expected = reference_attention(q, k, v, 1)[..., :8]
    upcast = run(AttentionCell(1, "math", upcast=True), q, k, v)
    assert upcast.dtype == ms.float16
    upcast_err = np.abs(upcast.asnumpy()[..., :8] - expected).max()
    plain_err = np.abs(run(AttentionCell(1, "math"), q, k, v).asnumpy()[..., :8] - expected).max()
    assert upcast_err < 1e-3  # only the final fp16 rounding of probabilities ~0.1
    assert plain_err > 5 * upcast_err  # the probe does tell fp16 scores from fp32 scores


def test_chunked_honours_upcast():
    q, k, v = upcast_probe(nq=7)
    expected = reference_attention(q, k, v, 1)[..., :8]
    out = attention(*(ms.Tensor(x) for x in (q, k, v)), 1, backend="chunked", upcast=True, chunk_size=3)
    assert np.abs(out.asnumpy()[..., :8] - expected).max() < 1e-3


# --- dispatch ---------------------------------------------------------------------------------------------


def test_backends_are_exported():
    assert ATTENTION_BACKENDS == ("auto", "math", "chunked", "flash", "native")


def test_auto_on_cpu_resolves_to_native_for_fp32():
    expected = "native" if native.available("attention") else "math"
    assert resolve_backend("auto", ms.float32, (2, 4096, 320), (2, 77, 320), 8, False) == expected
    assert resolve_backend("auto", ms.float32, (2, 4096, 320), (2, 77, 320), 8, False, native_allowed=False) == "math"


def test_auto_on_cpu_without_native_kernels_resolves_to_math(monkeypatch):
    monkeypatch.setenv(tav.backend.NATIVE_KERNELS_ENV, "0")
    assert resolve_backend("auto", ms.float32, (2, 4096, 320), (2, 77, 320), 8, False) == "math"
    assert resolve_backend("auto", ms.float16, (2, 4096, 320), (2, 77, 320), 8, False) == "math"


def test_auto_on_cpu_keeps_fp16_off_the_native_kernel():
    assert resolve_backend("auto", ms.float16, (2, 4096, 320), (2, 77, 320), 8, False) == "math"


def test_explicit_native_falls_back_with_a_warning_where_it_cannot_run(monkeypatch):
    monkeypatch.setattr(dispatch, "_warned", set())
    with pytest.warns(UserWarning, match="'native' unavailable"):
        assert resolve_backend("native", ms.float16, (2, 64, 320), (2, 64, 320), 8, False) == "math"


@pytest.mark.parametrize("requested", ["math", "chunked"])
def test_explicit_portable_backends_resolve_to_themselves(requested):
    assert resolve_backend(requested, ms.float16, (2, 64, 320), (2, 64, 320), 5, False) == requested


def test_flash_requested_on_cpu_runs_math_without_calling_the_kernel(ms_mode, monkeypatch, fresh_warnings):
    def kernel_must_not_run(*args, **kwargs):
        raise AssertionError("ops.flash_attention_score was called on CPU")

    monkeypatch.setattr(ops, "flash_attention_score", kernel_must_not_run)
    q, k, v = random_qkv(2, 6, 9, 2, 40, dtype=np.float16)
    with pytest.warns(UserWarning, match="'flash' unavailable.*CPU"):
        out = run(AttentionCell(2, "flash"), q, k, v)
    assert out.dtype == ms.float16
    np.testing.assert_allclose(out.asnumpy().astype(np.float64), reference_attention(q, k, v, 2), atol=5e-3)


def test_flash_on_cpu_graph_mode_never_compiles_the_real_kernel(fresh_warnings):
    # The real op has no CPU kernel: if the flash branch survived into the graph, compiling would fail.
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        q, k, v = random_qkv(1, 16, 16, 1, 64, dtype=np.float16)
        with pytest.warns(UserWarning):
            out = run(AttentionCell(1, "flash"), q, k, v)
    finally:
        ms.set_context(mode=previous)
    np.testing.assert_allclose(out.asnumpy().astype(np.float64), reference_attention(q, k, v, 1), atol=5e-3)


def test_flash_fallback_warns_once(fresh_warnings):
    q, k, v = (ms.Tensor(x) for x in random_qkv(1, 4, 4, 1, 16, dtype=np.float16))
    with pytest.warns(UserWarning):
        attention(q, k, v, 1, backend="flash")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attention(q, k, v, 1, backend="flash")


@pytest.fixture
def simulated_ascend(monkeypatch):
    """The dispatch answers as on an Ascend 910B (tav.backend.assume_device); nothing is run on it."""
    monkeypatch.setattr(dispatch, "_warned", set())
    with tav.backend.assume_device("Ascend", "Ascend910B"):
        yield


SD_CASES = {  # (q_shape, k_shape, heads) of real Tune-A-Video calls at 512 px, 8 frames, CFG
    "sd2-attn1-d64": ((16, 4096, 320), (16, 8192, 320), 5),
    "sd1-attn1-d40": ((16, 4096, 320), (16, 8192, 320), 8),
    "sd1-attn2-d80": ((16, 1024, 640), (16, 77, 640), 8),
    "sd1-attn2-d160": ((16, 256, 1280), (16, 77, 1280), 8),
    "sd1-temporal": ((8192, 8, 320), (8192, 8, 320), 8),
    "vae-mid-d512": ((8, 4096, 512), (8, 4096, 512), 1),
}


@pytest.mark.parametrize("case", ["sd2-attn1-d64", "sd1-attn1-d40", "sd1-attn2-d80", "sd1-attn2-d160"])
@pytest.mark.parametrize("dtype", [ms.float16, ms.bfloat16])
def test_simulated_ascend_auto_picks_flash_for_fp16_and_bf16(simulated_ascend, case, dtype):
    q_shape, k_shape, heads = SD_CASES[case]
    assert resolve_backend("auto", dtype, q_shape, k_shape, heads, False) == "flash"


def test_simulated_ascend_auto_keeps_fp32_off_flash_and_chunks_large_scores(simulated_ascend):
    # Issue 12 defect 1: it was math, a whole (B*H, Nq, Nk) fp32 score tensor (51.5 GB at 24 frames, 512 px).
    q_shape, k_shape, heads = SD_CASES["sd2-attn1-d64"]
    assert resolve_backend("auto", ms.float32, q_shape, k_shape, heads, False) == "chunked"
    q_shape, k_shape, heads = SD_CASES["sd1-attn2-d160"]  # a small score tensor: math
    assert resolve_backend("auto", ms.float32, q_shape, k_shape, heads, False) == "math"


def test_simulated_ascend_explicit_flash_casts_fp32(simulated_ascend):
    q_shape, k_shape, heads = SD_CASES["sd2-attn1-d64"]
    assert resolve_backend("flash", ms.float32, q_shape, k_shape, heads, False) == "flash"


def test_simulated_ascend_upcast_falls_back_off_flash(simulated_ascend):
    q_shape, k_shape, heads = SD_CASES["sd2-attn1-d64"]
    assert resolve_backend("auto", ms.float16, q_shape, k_shape, heads, True) == "chunked"  # large: chunked
    # Asked for by name, the kernel runs upcast layers too: its softmax accumulates in fp32.
    assert resolve_backend("flash", ms.float16, q_shape, k_shape, heads, True) == "flash"


@pytest.mark.parametrize(
    "q_shape, k_shape, heads, limit",
    [
        ((8, 4096, 520), (8, 4096, 520), 1, "head dim"),  # D 520 pads to 528 > 512
        ((4096, 8, 320), (4096, 8, 320), 8, "batch"),  # B > 2k
        ((1, 600_000, 64), (1, 77, 64), 1, "sequence"),  # S1 > 512k
        ((1, 77, 64), (1, 600_000, 64), 1, "sequence"),  # S2 > 512k
        ((1, 16, 16 * 300), (1, 16, 16 * 300), 300, "num_heads"),  # N > 256
        ((1, 16, 64), (1, 16, 64), 1, None),  # D 64 is fine
        ((8, 4096, 512), (8, 4096, 512), 1, None),  # D 512 is the documented maximum
        ((2048, 8, 320), (2048, 8, 320), 8, None),  # B = 2k is the documented maximum
    ],
)
def test_flash_constraints_follow_the_documented_limits(simulated_ascend, q_shape, k_shape, heads, limit):
    reason = flash_unsupported_reason("Ascend", ms.float16, q_shape, k_shape, heads, upcast=False)
    if limit is None:
        assert reason is None
    else:
        assert limit in reason


@pytest.mark.parametrize("dtype, allow_cast, ok", [
    (ms.float16, False, True), (ms.bfloat16, False, True), (ms.float32, False, False),
    (ms.float32, True, True), (ms.float64, True, False),
])
def test_flash_constraints_on_dtype(simulated_ascend, dtype, allow_cast, ok):
    reason = flash_unsupported_reason("Ascend", dtype, (1, 16, 64), (1, 16, 64), 1, False, allow_cast)
    assert (reason is None) == ok


@pytest.mark.parametrize("device", ["CPU", "GPU"])
def test_flash_constraints_reject_non_ascend_devices(device):
    assert device in flash_unsupported_reason(device, ms.float16, (1, 16, 64), (1, 16, 64), 1)


def test_simulated_ascend_temporal_attention_batch_over_2k_falls_back(simulated_ascend):
    # attn_temp folds every spatial position into the batch: 2*4096 = 8192 sequences of 8 frames.
    q_shape, k_shape, heads = SD_CASES["sd1-temporal"]
    assert resolve_backend("auto", ms.float16, q_shape, k_shape, heads, False) == "math"


def test_unknown_backend_raises_listing_valid_names():
    with pytest.raises(ValueError, match="auto, math, chunked, flash, native"):
        resolve_backend("xformers", ms.float32, (1, 4, 16), (1, 4, 16), 1, False)
    q, k, v = (ms.Tensor(x) for x in random_qkv(1, 4, 4, 1, 16))
    with pytest.raises(ValueError, match="'xformers'"):
        attention(q, k, v, 1, backend="xformers")


def test_heads_must_divide_hidden_size():
    q, k, v = (ms.Tensor(x) for x in random_qkv(1, 4, 4, 1, 30))
    with pytest.raises(ValueError, match="num_heads=4"):
        attention(q, k, v, 4)


@pytest.mark.parametrize("dtype, upcast", [(ms.float32, False), (ms.float16, True), (ms.float32, True)])
def test_simulated_ascend_auto_runs_fp32_and_upcast_layers_through_flash_where_the_user_allows(simulated_ascend,
                                                                                                 dtype, upcast):
    # Issue 12 defect 1: allow_flash_cast (TAV_FLASH_CAST=1) is the user's permission, off by default.
    q_shape, k_shape, heads = SD_CASES["sd2-attn1-d64"]
    assert resolve_backend("auto", dtype, q_shape, k_shape, heads, upcast) != "flash"
    with tav.backend.force_flash_cast(True):
        assert resolve_backend("auto", dtype, q_shape, k_shape, heads, upcast) == "flash"


@pytest.mark.parametrize("device", ["GPU", "Ascend"])
def test_auto_chunks_large_score_tensors_on_every_device(device):
    # Issue 12 defect 1: chunking was CPU-only, so GPU/Ascend fp32 layers built the whole score tensor.
    q_shape, k_shape, heads = SD_CASES["sd1-attn1-d40"]
    with tav.backend.assume_device(device, "Ascend910A" if device == "Ascend" else None):
        assert resolve_backend("auto", ms.float32, q_shape, k_shape, heads, False) == "chunked"
        assert resolve_backend("auto", ms.float16, q_shape, k_shape, heads, False) == "chunked"


@pytest.mark.parametrize("soc, flash", [("Ascend910B", True), ("Ascend910B2", True), ("Ascend910_9391", True),
                                        ("Ascend910A", False), ("ascend910", False), ("Ascend310P", False)])
def test_flash_attention_is_gated_on_the_soc(soc, flash):
    # Issue 12 defect 3: any Ascend chip used to get FlashAttentionScore; the 910A has no kernel for it.
    q_shape, k_shape, heads = SD_CASES["sd1-attn2-d80"]
    with tav.backend.assume_device("Ascend", soc):
        chosen = resolve_backend("auto", ms.float16, q_shape, k_shape, heads, False)
    assert (chosen == "flash") is flash
    reason = flash_unsupported_reason("Ascend", ms.float16, q_shape, k_shape, heads, soc=tav.backend.normalise_soc(soc))
    assert (reason is None) is flash


def math_standin_for_flash_kernel(query, key, value, head_num, keep_prob=1.0, scalar_value=1.0, input_layout="BSH",
                                  **unused):
    """ops.flash_attention_score's documented BSH contract, computed with math_attention (for CPU tests)."""
    return math_attention(query, key, value, head_num, scale=scalar_value)


@pytest.mark.parametrize("pad", [False, True], ids=["unpadded", "padding-fallback"])
@pytest.mark.parametrize("heads, d", [(8, 40), (2, 64), (1, 100)])
def test_simulated_ascend_flash_path_casts_keeps_the_true_scale_and_pads_only_as_fallback(ms_mode, monkeypatch,
                                                                                          heads, d, pad):
    calls = []

    def recording_kernel(query, key, value, head_num, keep_prob=1.0, scalar_value=1.0, input_layout="BSH",
                         **unused):
        calls.append((query.shape, query.dtype, head_num, scalar_value, input_layout))
        return math_standin_for_flash_kernel(query, key, value, head_num, keep_prob, scalar_value, input_layout)

    monkeypatch.setattr(tav.backend, "ascend_soc", lambda: "Ascend910B")
    monkeypatch.setattr(tav.backend, "is_ascend", lambda: True)
    if pad:
        monkeypatch.setenv("TAV_FLASH_PAD_HEAD_DIM", "1")
    kernel = recording_kernel if ms_mode == ms.PYNATIVE_MODE else math_standin_for_flash_kernel
    monkeypatch.setattr(ops, "flash_attention_score", kernel)
    q, k, v = random_qkv(2, 6, 9, heads, d, seed=5)
    out = run(AttentionCell(heads, "flash"), q, k, v)  # fp32 in: cast to fp16 for the kernel, back after
    assert out.dtype == ms.float32 and out.shape == (2, 6, heads * d)
    np.testing.assert_allclose(out.asnumpy(), reference_attention(q, k, v, heads), atol=5e-3)
    if ms_mode == ms.PYNATIVE_MODE:
        # Issue 12 defect 10: D is passed as it is (40 stays 40); the zero-padding is the TAV_FLASH_PAD_HEAD_DIM fallback.
        called_d = padded_head_dim(d) if pad else d
        assert calls == [((2, 6, heads * called_d), ms.float16, heads, d**-0.5, "BSH")]


# --- head-dim padding for the flash kernel ------------------------------------------------------------------


@pytest.mark.parametrize("d, padded", [(40, 48), (64, 64), (80, 80), (160, 160), (1, 16), (512, 512), (520, 528)])
def test_padded_head_dim_is_the_next_multiple_of_16(d, padded):
    assert padded_head_dim(d) == padded


def test_pad_head_dim_appends_zeros_per_head_and_unpad_inverts_it():
    x = np.arange(2 * 3 * 2 * 40, dtype=np.float32).reshape(2, 3, 80)
    padded = pad_head_dim(ms.Tensor(x), 2, 48).asnumpy()
    per_head = padded.reshape(2, 3, 2, 48)
    np.testing.assert_array_equal(per_head[..., :40], x.reshape(2, 3, 2, 40))
    np.testing.assert_array_equal(per_head[..., 40:], 0)
    np.testing.assert_array_equal(unpad_head_dim(ms.Tensor(padded), 2, 40).asnumpy(), x)


@pytest.mark.parametrize("heads, d", [(8, 40), (2, 40), (1, 100)])
def test_padded_attention_with_true_scale_equals_unpadded(heads, d):
    q, k, v = (ms.Tensor(x) for x in random_qkv(2, 6, 9, heads, d, seed=4))
    dp = padded_head_dim(d)
    qp, kp, vp = (pad_head_dim(x, heads, dp) for x in (q, k, v))
    unpadded = math_attention(q, k, v, heads).asnumpy()
    true_scale = unpad_head_dim(math_attention(qp, kp, vp, heads, scale=d**-0.5), heads, d).asnumpy()
    padded_scale = unpad_head_dim(math_attention(qp, kp, vp, heads), heads, d).asnumpy()
    np.testing.assert_allclose(true_scale, unpadded, atol=1e-6, rtol=0)
    assert np.abs(padded_scale - unpadded).max() > 1e-2  # the D^-0.5 of the padded D would be wrong
