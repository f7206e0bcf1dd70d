"""tav.text and the tiny pipeline's tokenizer/text-encoder/scheduler parts: CLIP prompts to embeddings."""
import logging
import os

import mindspore as ms
import numpy as np
import pytest

from tav.checkpoint import CheckpointMismatchError, CheckpointNotFoundError, read_state_dict, save_state_dict
from tav.text import encode_prompt_with_guidance, encode_prompts, load_text_encoder, load_tokenizer
from tav.tiny import (
    TINY_VOCAB_SIZE,
    random_text_encoder_weights,
    text_encoder_shapes,
    write_model_index,
    write_tiny_scheduler,
    write_tiny_text_encoder,
    write_tiny_tokenizer,
)

PROMPTS = ["a man is skiing", "spider man is skiing on the beach, cartoon style", "Zebra quokka!! 123 café ☃"]
LONG_PROMPT = " ".join(["a man, wearing pink clothes, is skiing at sunset"] * 12)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """Tokenizer + safetensors text encoder in the diffusers pipeline layout."""
    root = tmp_path_factory.mktemp("tiny_sd")
    write_tiny_tokenizer(root / "tokenizer")
    write_tiny_text_encoder(root / "text_encoder", vocab_size=TINY_VOCAB_SIZE)
    return root


@pytest.fixture(scope="module")
def tokenizer(pipeline_dir):
    return load_tokenizer(pipeline_dir)


@pytest.fixture(scope="module")
def text_encoder(pipeline_dir):
    return load_text_encoder(pipeline_dir)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def encode(tokenizer, text_encoder, prompts):
    return encode_prompts(tokenizer, text_encoder, prompts).asnumpy()


# --- tokenizer ---------------------------------------------------------------------------------------------------


def test_tiny_tokenizer_loads_offline_with_clip_special_tokens(pipeline_dir, offline):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(pipeline_dir / "tokenizer", local_files_only=True)
    assert len(tok) == TINY_VOCAB_SIZE
    assert tok.model_max_length == 77
    assert tok.bos_token == "<|startoftext|>"
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id == TINY_VOCAB_SIZE - 1  # highest id, as in CLIP


def test_prompts_tokenize_to_77_ids_bos_first_then_eos_padding(tokenizer):
    ids = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
    for row in ids:
        assert len(row) == 77
        assert row[0] == tokenizer.bos_token_id
        first_eos = row.index(tokenizer.eos_token_id)
        assert all(i == tokenizer.eos_token_id for i in row[first_eos:])


def test_official_prompt_words_are_single_tokens(tokenizer):
    assert tokenizer.tokenize("a man is skiing") == ["a</w>", "man</w>", "is</w>", "skiing</w>"]


def test_any_text_maps_to_ids_without_unknown_tokens(tokenizer):
    text = "Zebra quokka!! 123 café ☃ naïve"
    ids = tokenizer(text).input_ids
    assert tokenizer.eos_token_id not in ids[1:-1]  # <|endoftext|> doubles as unk
    assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == text.lower().replace(" ", "")


def test_tiny_tokenizer_is_deterministic(tmp_path):
    write_tiny_tokenizer(tmp_path / "a")
    write_tiny_tokenizer(tmp_path / "b")
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_long_prompt_truncates_to_77_and_warns_with_the_cut_text(tokenizer, text_encoder, caplog):
    with caplog.at_level(logging.WARNING, logger="tav.text"):
        embeds = encode_prompts(tokenizer, text_encoder, [LONG_PROMPT, "a man is skiing"])
    assert embeds.shape == (2, 77, 32)
    messages = [r.getMessage() for r in caplog.records if r.name == "tav.text"]
    assert len(messages) == 1 and "truncated" in messages[0] and "sunset" in messages[0]


def test_missing_tokenizer_folder_names_the_folder(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="tokenizer") as info:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_tokenizer_without_merges_names_the_file(tmp_path):
    write_tiny_tokenizer(tmp_path / "tokenizer")
    os.remove(tmp_path / "tokenizer" / "merges.txt")
    with pytest.raises(CheckpointNotFoundError, match="merges.txt") as info:
        load_tokenizer(tmp_path)
    assert str(tmp_path / "tokenizer") in str(info.value)


# --- text encoder ------------------------------------------------------------------------------------------------


@pytest.mark.parity
def test_tiny_text_encoder_keys_are_transformers_keys(pipeline_dir):
    torch = pytest.importorskip("torch", reason="parity extra not installed")
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig.from_pretrained(pipeline_dir / "text_encoder", local_files_only=True)
    with torch.device("meta"):
        reference = CLIPTextModel(config).state_dict()
    ours = text_encoder_shapes(config.to_dict())
    assert {k: tuple(v.shape) for k, v in reference.items()} == ours


@pytest.mark.parity
def test_text_encoder_matches_transformers_pytorch(ms_mode, pipeline_dir, tokenizer, text_encoder):
    torch = pytest.importorskip("torch", reason="parity extra not installed")
    from transformers import CLIPTextModel

    reference = CLIPTextModel.from_pretrained(pipeline_dir / "text_encoder", local_files_only=True).eval()
    ids = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = reference(ids)[0].numpy()
    got = encode(tokenizer, text_encoder, PROMPTS)
    assert got.shape == (3, 77, 32)
    assert np.abs(expected[0] - expected[1]).max() > 0.1  # prompts matter: the comparison can fail
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


@pytest.mark.parity
def test_exact_gelu_text_encoder_runs_on_cpu_and_matches_transformers(ms_mode, tmp_path, tokenizer):
    """SD 2.x's OpenCLIP text tower uses hidden_act "gelu", which mindone runs as an op with no CPU kernel."""
    torch = pytest.importorskip("torch", reason="parity extra not installed")
    from transformers import CLIPTextModel

    write_tiny_text_encoder(tmp_path / "text_encoder", vocab_size=TINY_VOCAB_SIZE)
    config_path = tmp_path / "text_encoder" / "config.json"
    config_path.write_text(config_path.read_text().replace('"quick_gelu"', '"gelu"'))
    reference = CLIPTextModel.from_pretrained(tmp_path / "text_encoder", local_files_only=True).eval()
    assert reference.config.hidden_act == "gelu"
    ids = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = reference(ids)[0].numpy()
    got = encode(tokenizer, load_text_encoder(tmp_path), PROMPTS)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


@pytest.mark.parity
def test_bin_only_text_encoder_loads_without_torch_and_matches_safetensors(
    tmp_path, monkeypatch, tokenizer, text_encoder
):
    torch = pytest.importorskip("torch", reason="writing the .bin fixture needs the parity extra")
    write_tiny_text_encoder(tmp_path / "text_encoder", fmt="bin")
    assert sorted(os.listdir(tmp_path / "text_encoder")) == ["config.json", "pytorch_model.bin"]
    # old checkpoints carry this buffer; the loader must drop it
    assert "text_model.embeddings.position_ids" in read_state_dict(tmp_path / "text_encoder" / "pytorch_model.bin")

    def refuse(*args, **kwargs):
        raise AssertionError("the .bin was read with torch.load")

    monkeypatch.setattr(torch, "load", refuse)
    from_bin = load_text_encoder(tmp_path)
    np.testing.assert_array_equal(encode(tokenizer, from_bin, PROMPTS), encode(tokenizer, text_encoder, PROMPTS))


def test_text_encoder_loads_in_float16(pipeline_dir, tokenizer, text_encoder):
    half = load_text_encoder(pipeline_dir, dtype=ms.float16)
    embeds = encode_prompts(tokenizer, half, PROMPTS)
    assert embeds.dtype == ms.float16
    np.testing.assert_allclose(embeds.asnumpy().astype(np.float32), encode(tokenizer, text_encoder, PROMPTS), atol=2e-2)


def test_missing_text_encoder_weights_name_the_folder_and_files(tmp_path):
    write_tiny_text_encoder(tmp_path / "text_encoder")
    os.remove(tmp_path / "text_encoder" / "model.safetensors")
    with pytest.raises(CheckpointNotFoundError, match="model.safetensors, pytorch_model.bin") as info:
        load_text_encoder(tmp_path)
    assert str(tmp_path / "text_encoder") in str(info.value)


def test_missing_text_encoder_folder_names_the_folder(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="text_encoder") as info:
        load_text_encoder(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_text_encoder_weights_missing_a_tensor_are_refused_by_name(tmp_path):
    config = write_tiny_text_encoder(tmp_path)
    weights = random_text_encoder_weights(config)
    del weights["text_model.final_layer_norm.weight"]
    save_state_dict(weights, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"text_model\.final_layer_norm\.weight"):
        load_text_encoder(tmp_path)


# --- prompts with classifier-free guidance ------------------------------------------------------------------------


def test_uncond_is_the_encoding_of_the_empty_prompt(tokenizer, text_encoder):
    cond, uncond = encode_prompt_with_guidance(tokenizer, text_encoder, PROMPTS[:2])
    np.testing.assert_allclose(cond.asnumpy(), encode(tokenizer, text_encoder, PROMPTS[:2]), rtol=0, atol=1e-6)
    empty = encode(tokenizer, text_encoder, [""])
    np.testing.assert_allclose(uncond.asnumpy(), np.concatenate([empty, empty]), rtol=0, atol=1e-6)


def test_uncond_is_the_encoding_of_the_negative_prompts(tokenizer, text_encoder):
    negatives = ["blurry", "low quality, cartoon"]
    _, uncond = encode_prompt_with_guidance(tokenizer, text_encoder, PROMPTS[:2], negative_prompt=negatives)
    np.testing.assert_allclose(uncond.asnumpy(), encode(tokenizer, text_encoder, negatives), rtol=0, atol=1e-6)
    _, shared = encode_prompt_with_guidance(tokenizer, text_encoder, PROMPTS[:2], negative_prompt="blurry")
    blurry = encode(tokenizer, text_encoder, ["blurry"])
    np.testing.assert_allclose(shared.asnumpy(), np.concatenate([blurry, blurry]), rtol=0, atol=1e-6)


def test_num_videos_per_prompt_repeats_each_prompt_in_place(tokenizer, text_encoder):
    cond, uncond = encode_prompt_with_guidance(tokenizer, text_encoder, PROMPTS[:2], num_videos_per_prompt=2)
    assert cond.shape == uncond.shape == (4, 77, 32)
    single = encode(tokenizer, text_encoder, PROMPTS[:2])
    np.testing.assert_allclose(cond.asnumpy(), single[[0, 0, 1, 1]], rtol=0, atol=1e-6)


def test_negative_prompt_count_must_match_prompts(tokenizer, text_encoder):
    with pytest.raises(ValueError, match="negative_prompt has 1 entries but there are 2 prompts"):
        encode_prompt_with_guidance(tokenizer, text_encoder, PROMPTS[:2], negative_prompt=["blurry"])


# --- the rest of the tiny pipeline's small parts -------------------------------------------------------------------


def test_tiny_scheduler_config_is_sd_v1_and_loads_in_mindone(tmp_path):
    from mindone.diffusers import DDIMScheduler

    write_tiny_scheduler(tmp_path)
    scheduler = DDIMScheduler.from_pretrained(tmp_path, local_files_only=True)
    assert scheduler.config.num_train_timesteps == 1000
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert (scheduler.config.beta_start, scheduler.config.beta_end) == (0.00085, 0.012)
    assert scheduler.config.steps_offset == 1 and not scheduler.config.set_alpha_to_one


def test_model_index_names_the_sd_components(tmp_path):
    index = write_model_index(tmp_path)
    assert (tmp_path / "model_index.json").is_file()
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert set(index) >= {"unet", "vae", "scheduler"}
