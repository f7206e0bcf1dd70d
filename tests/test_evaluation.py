"""tav.evaluation and tools/evaluate.py against the LOVEU-TGVE benchmark's formulas computed as its script computes
them (transformers + PyTorch, PIL), on the same tiny model folders and frames."""
import json
import subprocess
import sys

import numpy as np
import pytest

from tav import evaluation
from tav.evaluation import Scorers, evaluate_video, frame_consistency, read_frames
from tests.clip_fixtures import synthetic_frames, write_clip_folder, write_jpg_folder
from tests.helpers import REPO_ROOT, import_parity_extra

PROMPT = "a red square moving over a sunset"


# The benchmark's way, in PyTorch: PIL frames resized to 480 x 480, then CLIPProcessor + CLIPModel.
def reference_frames(folder):
    from PIL import Image

    return [Image.open(p).convert("RGB").resize((480, 480)) for p in sorted(folder.glob("*.jpg"))]


def reference_clip_scores(model_dir, frames, prompt):
    import torch
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(model_dir).eval(), CLIPProcessor.from_pretrained(model_dir)
    with torch.no_grad():
        inputs = processor(text=[prompt], images=frames, return_tensors="pt", padding=True)
        text_alignment = model(**inputs).logits_per_image.mean().item()
        features = model.get_image_features(pixel_values=inputs["pixel_values"])
        features = features / features.norm(dim=-1, keepdim=True)
        similarity = (features @ features.T).numpy()
    np.fill_diagonal(similarity, 0)
    n = len(frames)
    return similarity.sum() / (n * (n - 1)), text_alignment


def reference_pickscore(model_dir, processor_dir, frames, prompt):
    import torch
    from transformers import AutoModel, AutoProcessor

    model, processor = AutoModel.from_pretrained(model_dir).eval(), AutoProcessor.from_pretrained(processor_dir)
    with torch.no_grad():
        image_inputs = processor(images=frames, padding=True, truncation=True, max_length=77, return_tensors="pt")
        text_inputs = processor(text=prompt, padding=True, truncation=True, max_length=77, return_tensors="pt")
        image_embs = model.get_image_features(**image_inputs)
        image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
        text_embs = model.get_text_features(**text_inputs)
        text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
        scores = model.logit_scale.exp() * (text_embs @ image_embs.T)[0]
    return scores.mean().item()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    return {
        "clip": write_clip_folder(root / "clip", kind="openai", seed=1),
        "pick": write_clip_folder(root / "pick", kind="laion", seed=2, logit_scale=4.6, safe_serialization=False),
        # A processor folder of its own, as laion's is for PickScore: other sizes, so using the wrong one shows.
        "pick_processor": write_clip_folder(root / "pick_proc", kind="laion", seed=3, shortest_edge=30),
        "frames": write_jpg_folder(root / "video", synthetic_frames(5, 60, 80, seed=4)),
    }


@pytest.mark.parity
def test_scores_equal_the_benchmarks_formulas(folders, pynative):
    scores = evaluate_video(folders["frames"], PROMPT,
                            Scorers.load(folders["clip"], folders["pick"], folders["pick_processor"]))
    frames = reference_frames(folders["frames"])
    consistency, alignment = reference_clip_scores(folders["clip"], frames, PROMPT)
    pick = reference_pickscore(folders["pick"], folders["pick_processor"], frames, PROMPT)
    assert scores.keys() == {"frame_consistency", "text_alignment", "pickscore"}
    np.testing.assert_allclose(scores["frame_consistency"], consistency, rtol=1e-4)
    np.testing.assert_allclose(scores["text_alignment"], alignment, rtol=1e-4)
    np.testing.assert_allclose(scores["pickscore"], pick, rtol=1e-4)


@pytest.mark.parity
def test_score_videos_scores_each_written_video_for_its_prompt(folders, pynative):
    scorers = Scorers.load(folders["clip"])
    (path, scores), = evaluation.score_videos([(folders["frames"], PROMPT)], scorers)
    assert path == folders["frames"] and scores == evaluate_video(folders["frames"], PROMPT, scorers)


def test_frame_consistency_excludes_the_diagonal():
    e = np.array([[1.0, 0.0], [0.0, 1.0], [np.sqrt(0.5), np.sqrt(0.5)]])
    # pairs: (0,1)=0, (0,2)=(1,2)=sqrt(.5), each counted twice, over 3*2 ordered pairs
    assert frame_consistency(e) == pytest.approx(4 * np.sqrt(0.5) / 6)


def test_folder_gif_and_mp4_read_the_same_frames(tmp_path):
    from tav.video import write_video

    frames = synthetic_frames(3, 32, 48)
    folder = tmp_path / "frames"
    folder.mkdir()
    from PIL import Image

    for i, frame in enumerate(frames[::-1]):  # names, not write order, decide the order
        Image.fromarray(frame).save(folder / f"{2 - i:05d}.png")
    np.testing.assert_array_equal(read_frames(folder), frames)
    write_video(frames, tmp_path / "clip.gif")
    assert read_frames(tmp_path / "clip.gif").shape == frames.shape
    write_video(frames, tmp_path / "clip.mp4")
    assert read_frames(tmp_path / "clip.mp4").shape == frames.shape


@pytest.mark.parity
def test_the_tool_prints_a_table_and_writes_only_the_computed_keys(folders, tmp_path):
    out = tmp_path / "scores.json"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "evaluate.py"), "--video", str(folders["frames"]),
         "--prompt", PROMPT, "--clip_model", str(folders["clip"]), "--json", str(out)],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "frame consistency" in result.stdout and "PickScore" not in result.stdout
    scores = json.loads(out.read_text())
    assert set(scores) == {"frame_consistency", "text_alignment"}
    consistency, alignment = reference_clip_scores(folders["clip"], reference_frames(folders["frames"]), PROMPT)
    np.testing.assert_allclose([scores["frame_consistency"], scores["text_alignment"]], [consistency, alignment],
                               rtol=1e-4)


def test_the_tool_reports_a_missing_video_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "evaluate.py"), "--video", str(tmp_path / "none"),
         "--prompt", PROMPT, "--clip_model", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error:") and "none" in result.stderr


@pytest.mark.parity
def test_scores_of_real_frames_equal_the_benchmarks(folders, tmp_path, shared_data, pynative):
    """A real clip's first frames as the benchmark's jpg folder; only this test needs ../shared/data."""
    clips = sorted(shared_data.glob("*.mp4"))
    if not clips:
        pytest.skip(f"no mp4 in {shared_data}")
    video = write_jpg_folder(tmp_path / "real", read_frames(clips[0])[:4])
    scores = evaluate_video(video, PROMPT, Scorers.load(folders["clip"]))
    consistency, alignment = reference_clip_scores(folders["clip"], reference_frames(video), PROMPT)
    np.testing.assert_allclose([scores["frame_consistency"], scores["text_alignment"]], [consistency, alignment],
                               rtol=1e-4)

