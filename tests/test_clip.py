"""tav's CLIP against transformers' CLIPModel and CLIPImageProcessor (PyTorch), on tiny random folders."""
import numpy as np
import pytest

from tav.clip import Clip, ClipImageProcessor, load_clip_model
from tav.checkpoint import CheckpointMismatchError
from tests.clip_fixtures import synthetic_frames, write_clip_folder
from tests.helpers import import_parity_extra

PROMPTS = ["a red square moving over a sunset", "a cat, in the style of van gogh"]


def torch_clip(folder):
    import_parity_extra()
    import transformers

    return transformers.CLIPModel.from_pretrained(folder).eval(), transformers.CLIPProcessor.from_pretrained(folder)


@pytest.mark.parity
@pytest.mark.parametrize("shape", [(48, 64), (64, 48), (31, 31), (20, 90)])
def test_image_preprocessing_equals_clip_image_processor(tmp_path, shape):
    import_parity_extra()
    import transformers

    ref = transformers.CLIPImageProcessor(size={"shortest_edge": 33}, crop_size={"height": 30, "width": 30})
    ref.save_pretrained(tmp_path)
    frames = synthetic_frames(2, *shape)
    expected = ref(images=list(frames), return_tensors="np").pixel_values
    np.testing.assert_array_equal(ClipImageProcessor.from_folder(tmp_path)(frames), expected)


@pytest.mark.parity
def test_preprocessing_pads_when_the_crop_is_larger(tmp_path):
    import_parity_extra()
    import transformers

    ref = transformers.CLIPImageProcessor(size={"height": 20, "width": 24}, crop_size={"height": 26, "width": 22})
    ref.save_pretrained(tmp_path)
    frames = synthetic_frames(1, 40, 40)
    expected = ref(images=list(frames), return_tensors="np").pixel_values
    np.testing.assert_array_equal(ClipImageProcessor.from_folder(tmp_path)(frames), expected)


@pytest.mark.parity
@pytest.mark.parametrize("kind,safe", [("openai", True), ("laion", False)], ids=["openai-safetensors", "laion-bin"])
def test_embeddings_equal_transformers(tmp_path, pynative, kind, safe):
    import torch

    folder = write_clip_folder(tmp_path / "clip", kind=kind, safe_serialization=safe)
    ref_model, ref_processor = torch_clip(folder)
    frames = synthetic_frames(3)
    with torch.no_grad():
        inputs = ref_processor(text=PROMPTS, images=list(frames), return_tensors="pt", padding=True)
        out = ref_model(**inputs)
    clip = Clip.from_folder(folder)
    image = clip.model.get_image_features(inputs["pixel_values"].numpy()).asnumpy()
    np.testing.assert_allclose(image, ref_model.get_image_features(inputs["pixel_values"]).detach().numpy(),
                               rtol=1e-4, atol=1e-5)
    text = clip.text_embeddings(PROMPTS)
    np.testing.assert_allclose(text, out.text_embeds.numpy(), rtol=1e-4, atol=1e-5)
    logits = clip.logit_scale * clip.image_embeddings(frames) @ text.T
    np.testing.assert_allclose(logits, out.logits_per_image.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parity
def test_padded_text_pools_the_same_token(tmp_path, pynative):
    folder = write_clip_folder(tmp_path / "clip", kind="laion")
    clip = Clip.from_folder(folder)
    ids = clip.token_ids(PROMPTS[0])
    padded = np.concatenate([ids, np.full((1, 5), ids[0, -1])], 1)
    np.testing.assert_allclose(clip.model.get_text_features(padded).asnumpy(),
                               clip.model.get_text_features(ids).asnumpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parity
def test_graph_mode_gives_the_same_features(tmp_path, graph_mode):
    import torch

    folder = write_clip_folder(tmp_path / "clip")
    ref_model, ref_processor = torch_clip(folder)
    inputs = ref_processor(text=PROMPTS[:1], images=list(synthetic_frames(2)), return_tensors="pt")
    with torch.no_grad():
        expected_image = ref_model.get_image_features(inputs["pixel_values"]).numpy()
        expected_text = ref_model.get_text_features(inputs["input_ids"]).numpy()
    model = load_clip_model(folder)
    np.testing.assert_allclose(model.get_image_features(inputs["pixel_values"].numpy()).asnumpy(), expected_image,
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(model.get_text_features(inputs["input_ids"].numpy()).asnumpy(), expected_text,
                               rtol=1e-4, atol=1e-5)


def test_config_dicts_win_over_config_sections_as_in_transformers():
    from tav.models.clip import ClipConfig

    raw = {"text_config": {"hidden_size": 512, "eos_token_id": 2, "num_hidden_layers": 3},
           "text_config_dict": {"hidden_size": 768}, "vision_config": {"patch_size": 14}, "projection_dim": 768}
    config = ClipConfig.from_dict(raw)
    assert (config.text.hidden_size, config.text.num_hidden_layers, config.text.eos_token_id) == (768, 12, 49407)
    assert config.vision.patch_size == 14 and config.projection_dim == 768


@pytest.mark.parity
def test_config_dicts_are_read_as_transformers_reads_them():
    import_parity_extra()
    import transformers
    from tav.models.clip import ClipConfig

    raw = {"text_config": {"hidden_size": 512, "eos_token_id": 2, "num_hidden_layers": 3},
           "text_config_dict": {"hidden_size": 768}, "vision_config": {"patch_size": 14},
           "vision_config_dict": {"image_size": 336}, "projection_dim": 768}
    ref, ours = transformers.CLIPConfig(**raw), ClipConfig.from_dict(raw)
    for section, ref_section in ((ours.text, ref.text_config), (ours.vision, ref.vision_config)):
        for field in section.__dataclass_fields__:
            assert getattr(section, field) == getattr(ref_section, field), field


@pytest.mark.parity
def test_a_checkpoint_of_another_shape_is_refused(tmp_path):
    import json

    folder = write_clip_folder(tmp_path / "clip")
    config = json.loads((folder / "config.json").read_text())
    config["projection_dim"] = 8
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError, match="projection"):
        load_clip_model(folder)


@pytest.mark.parity
def test_preprocessing_of_real_frames(tmp_path, shared_data):
    import_parity_extra()
    import transformers
    from tav.evaluation import read_frames

    clips = sorted(shared_data.glob("*.mp4"))
    if not clips:
        pytest.skip(f"no mp4 in {shared_data}")
    frames = read_frames(clips[0])[:4]
    ref = transformers.CLIPImageProcessor()  # clip-vit-large-patch14's settings are the defaults
    ref.save_pretrained(tmp_path)
    expected = ref(images=list(frames), return_tensors="np").pixel_values
    np.testing.assert_array_equal(ClipImageProcessor.from_folder(tmp_path)(frames), expected)
