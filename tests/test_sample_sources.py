"""What tools/sample.py samples from and what it adds: a single-file checkpoint in each container gives the videos
of its diffusers folder, --lora files are fused after the UNet is built, and --eval_clip_model scores every
written video into scores.json."""
import json
import logging
import os

import numpy as np
import pytest

from tav import checkpoint, generate
from tav.evaluation import Scorers, evaluate_video, read_frames
from tav.ldm_checkpoint import SingleFileError
from tav.pipeline import TuneAVideoPipeline
from tests.ldm_fixtures import CONTAINERS, ldm_state, tiny, write_container  # noqa: F401 (fixtures)

LORA_MODULE = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # a (32, 32) weight in the tiny UNet
TEXT_MODULE = "text_model.encoder.layers.0.self_attn.q_proj"  # (32, 32) in the tiny text encoder


def tool_request(sample_tool, model, out, *flags):
    """The request tools/sample.py builds from its command line: 2 frames, 64x64, 2 steps, png frames."""
    args = sample_tool.parse_args(["--pretrained_model_path", str(model), "--prompt", "a cat", "--video_length", "2",
                                   "--height", "64", "--width", "64", "--num_inference_steps", "2", "--format",
                                   "png", "--output_dir", str(out), *map(str, flags)])
    request = sample_tool.build_request(args)
    request.progress = False
    return request


def written_frames(paths):
    return [read_frames(path) for path in paths if not str(path).endswith(generate.SCORES_FILE)]


def component_outputs(pipeline):
    rng = np.random.default_rng(0)
    import mindspore as ms

    sample = ms.Tensor(rng.standard_normal((1, 4, 2, 8, 8)).astype(np.float32))
    context = ms.Tensor(rng.standard_normal((1, 5, 32)).astype(np.float32))
    pixels = ms.Tensor(rng.uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32))
    ids = ms.Tensor(np.array([[998, 5, 77, 300, 999, 999]], dtype=np.int64))
    return {"unet": pipeline.unet(sample, 10, context).asnumpy(),
            "vae": pipeline.vae.decode(pipeline.vae.encode_moments(pixels)[:, :4]).asnumpy(),
            "text_encoder": pipeline.text_encoder(ids)[0].asnumpy()}


# ------------------------------------------------------------------------------------------------ single files
@pytest.mark.parametrize("kind", CONTAINERS)
def test_from_pretrained_takes_a_single_file_in_each_container(tiny, ldm_state, tmp_path, kind, pynative):
    path = write_container(kind, ldm_state, str(tmp_path))
    expected = component_outputs(TuneAVideoPipeline.from_pretrained(tiny, init_seed=3))
    pipeline = TuneAVideoPipeline.from_pretrained(path, init_seed=3, config_from=tiny)
    got = component_outputs(pipeline)
    for name in expected:
        assert np.abs(expected[name]).mean() > 1e-3, name
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    assert pipeline.identity["pretrained_model_path"] == os.path.abspath(path)  # not the temporary folder


def test_the_tool_samples_the_same_videos_from_a_single_file(sample_tool, tiny, ldm_state, tmp_path, pynative):
    """One container end to end (the loader test above shows the three give the same modules)."""
    path = write_container("safetensors", ldm_state, str(tmp_path))
    expected = written_frames(generate.run_sampling(tool_request(sample_tool, tiny, tmp_path / "folder")))
    got = written_frames(generate.run_sampling(
        tool_request(sample_tool, path, tmp_path / "file", "--config_from", tiny, "--tokenizer_from",
                     os.path.join(tiny, "tokenizer"), "--converted_cache_dir", tmp_path / "converted")))
    assert len(got) == len(expected) == 1 and expected[0].std() > 0
    np.testing.assert_array_equal(got[0], expected[0])
    assert len(os.listdir(tmp_path / "converted")) == 1  # the converted folder was kept where asked


def test_prediction_type_reaches_the_single_files_scheduler(tiny, ldm_state, tmp_path):
    path = write_container("safetensors", ldm_state, str(tmp_path))
    cache = tmp_path / "converted"
    TuneAVideoPipeline.from_pretrained(path, config_from=tiny, prediction_type="v_prediction",
                                       converted_cache_dir=str(cache))
    (folder,) = os.listdir(cache)
    scheduler = checkpoint.read_json(str(cache / folder / "scheduler" / "scheduler_config.json"))
    assert scheduler["prediction_type"] == "v_prediction"


def test_the_single_file_flags_reach_the_loader(sample_tool, tiny, ldm_state, tmp_path, monkeypatch):
    seen = {}

    def from_pretrained(*args, **kwargs):
        seen.update(kwargs)
        raise generate.PipelineError("stop here")

    monkeypatch.setattr(TuneAVideoPipeline, "from_pretrained", from_pretrained)
    path = write_container("safetensors", ldm_state, str(tmp_path))
    request = tool_request(sample_tool, path, tmp_path / "out", "--prediction_type", "v_prediction",
                           "--tokenizer_from", tiny, "--converted_cache_dir", tmp_path / "c")
    with pytest.raises(generate.PipelineError, match="stop here"):
        generate.run_sampling(request)
    assert (seen["prediction_type"], seen["tokenizer_from"], seen["converted_cache_dir"]) == \
        ("v_prediction", tiny, str(tmp_path / "c"))


def test_a_file_that_is_no_checkpoint_is_refused_by_name_before_loading(sample_tool, tmp_path, no_loading):
    notes = tmp_path / "model.txt"
    notes.write_text("not weights")
    with pytest.raises(SingleFileError, match=r"--pretrained_model_path .*model\.txt.*\.safetensors"):
        generate.run_sampling(tool_request(sample_tool, notes, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_single_file_without_a_tokenizer_says_to_pass_tokenizer_from(sample_tool, ldm_state, tmp_path, no_loading):
    path = write_container("safetensors", ldm_state, str(tmp_path))
    with pytest.raises(checkpoint.CheckpointNotFoundError, match="--tokenizer_from"):
        generate.run_sampling(tool_request(sample_tool, path, tmp_path / "out"))


def test_a_folder_refuses_the_single_file_options(sample_tool, tiny, tmp_path, no_loading):
    with pytest.raises(SingleFileError, match="--prediction_type .*single-file checkpoint only"):
        generate.run_sampling(tool_request(sample_tool, tiny, tmp_path / "out", "--prediction_type", "epsilon"))


# ------------------------------------------------------------------------------------------------ LoRA
def write_lora(path, seed, rank=2):
    rng = np.random.default_rng(seed)
    tensors = {}
    for target, module in (("unet", LORA_MODULE), ("text_encoder", TEXT_MODULE)):
        tensors[f"{target}.{module}.lora_A.weight"] = rng.normal(0, 0.1, (rank, 32)).astype(np.float32)
        tensors[f"{target}.{module}.lora_B.weight"] = rng.normal(0, 0.1, (32, rank)).astype(np.float32)
    checkpoint.save_state_dict(tensors, str(path))
    return tensors


def lora_update(tensors, target, module, scale):
    up, down = tensors[f"{target}.{module}.lora_B.weight"], tensors[f"{target}.{module}.lora_A.weight"]
    return scale * (up.astype(np.float64) @ down.astype(np.float64))


def test_the_tool_fuses_each_lora_with_its_scale(sample_tool, tiny, tmp_path, monkeypatch, pynative):
    built = []
    original = TuneAVideoPipeline.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        built.append(original(cls, *args, **kwargs))
        return built[-1]

    monkeypatch.setattr(TuneAVideoPipeline, "from_pretrained", classmethod(from_pretrained))
    a, b = write_lora(tmp_path / "a.safetensors", 1), write_lora(tmp_path / "b.safetensors", 2)
    request = tool_request(sample_tool, tiny, tmp_path / "out", "--lora", f"{tmp_path / 'a.safetensors'}:0.5",
                           "--lora", tmp_path / "b.safetensors", "--seed", "4")
    with_loras = written_frames(generate.run_sampling(request))
    plain = written_frames(generate.run_sampling(tool_request(sample_tool, tiny, tmp_path / "plain", "--seed", "4")))
    fused, base = built
    for target, module, cell in (("unet", LORA_MODULE, "unet"), ("text_encoder", TEXT_MODULE, "text_encoder")):
        weights = [dict(getattr(p, cell).parameters_and_names())[module + ".weight"].asnumpy() for p in (fused, base)]
        expected = weights[1] + lora_update(a, target, module, 0.5) + lora_update(b, target, module, 1.0)
        np.testing.assert_allclose(weights[0], expected, rtol=0, atol=1e-6, err_msg=module)
    assert [entry[1] for entry in fused.identity["loras"]] == [0.5, 1.0]  # the inversion cache tells them apart
    assert not np.array_equal(with_loras[0], plain[0])


def test_a_missing_lora_is_named_before_loading(sample_tool, tiny, tmp_path, no_loading):
    with pytest.raises(FileNotFoundError, match=r"--lora .*none\.safetensors:0\.5"):
        generate.run_sampling(tool_request(sample_tool, tiny, tmp_path / "out", "--lora",
                                           f"{tmp_path / 'none.safetensors'}:0.5"))


# ------------------------------------------------------------------------------------------------ scoring
@pytest.mark.parity
def test_the_tool_scores_every_written_video(sample_tool, tiny, tmp_path, caplog, pynative):
    from tests.clip_fixtures import write_clip_folder

    clip = write_clip_folder(tmp_path / "clip", seed=1)
    request = tool_request(sample_tool, tiny, tmp_path / "out", "--prompt", "a dog", "--format", "gif",
                           "--eval_clip_model", clip)
    with caplog.at_level(logging.INFO, logger="tav.generate"):
        written = generate.run_sampling(request)
    scores_path = os.path.join(request.output_dir, generate.SCORES_FILE)
    assert written[-1] == scores_path
    scores = json.loads(open(scores_path, encoding="utf-8").read())
    videos = written[:-1]
    assert len(videos) == 4 and set(scores["videos"]) == {os.path.relpath(v, request.output_dir) for v in videos}
    scorers = Scorers.load(clip)
    for path in videos:
        entry = scores["videos"][os.path.relpath(path, request.output_dir)]
        expected = evaluate_video(path, entry["prompt"], scorers)
        assert set(entry) == {"prompt", "frame_consistency", "text_alignment"}
        assert entry["prompt"] == ("a cat" if "cat" in os.path.basename(path) else "a dog")
        np.testing.assert_allclose([entry[k] for k in expected], list(expected.values()), rtol=1e-6)
    assert scores["mean"]["text_alignment"] == pytest.approx(
        np.mean([v["text_alignment"] for v in scores["videos"].values()]))
    assert "frame consistency" in caplog.text and "mean" in caplog.text


def test_scoring_models_are_checked_before_loading(sample_tool, tiny, tmp_path, no_loading):
    with pytest.raises(FileNotFoundError, match="--eval_clip_model .*no config.json"):
        generate.run_sampling(tool_request(sample_tool, tiny, tmp_path / "out", "--eval_clip_model", tmp_path))
