"""tav.loveu on a generated mini dataset in the benchmark's layout, with the tiny random SD model and tiny random
CLIP models: the CSV's sections, the submission layout, scores.json, and resuming after a kill."""
import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tav import loveu, tiny
from tav.evaluation import Scorers
from tests.clip_fixtures import synthetic_frames, write_clip_folder, write_jpg_folder
from tests.helpers import REPO_ROOT

CSV_VIDEOS = [("DAVIS_480p", "blackswan"), ("DAVIS_480p", "car-turn"), ("youtube_480p", "cat-in-the-sun")]
VIDEOS = [CSV_VIDEOS[0], CSV_VIDEOS[2]]  # the runs: two videos, two subsets
FAST = ["max_train_steps=1", "learning_rate=1e-3", "mixed_precision=no", "gradient_checkpointing=false",
        "train_data.width=64", "train_data.height=64", "validation_data.width=64", "validation_data.height=64",
        "validation_data.num_inference_steps=2", "validation_data.num_inv_steps=2"]


def write_dataset(root, videos=VIDEOS, frames=3):
    """The benchmark's CSV (header, subset rows, blank rows between sections) and jpg frame folders."""
    header = [loveu.NAME_COLUMN, loveu.CAPTION_COLUMN, *loveu.EDIT_COLUMNS.values()]
    rows, subset = [header], None
    for i, (video_subset, name) in enumerate(videos):
        if video_subset != subset:
            if subset is not None:
                rows.append([""] * len(header))
            rows.append([video_subset] + [""] * (len(header) - 1))
            subset = video_subset
        rows.append([name, f"a {name} video", f"a {name}, van gogh style", f"a dog instead of {name}",
                     f"a {name} on the moon", f"a dog on the moon, cartoon style {i}"])
        write_jpg_folder(root / video_subset / loveu.FRAMES_FOLDER / name, synthetic_frames(frames, 48, 64, seed=i))
    with open(root / loveu.CSV_NAME, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(rows)
    return root


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("loveu")
    return {"data": write_dataset(root / "data"), "sd": tiny.write_tiny_pipeline(str(root / "tiny-sd")),
            "clip": write_clip_folder(root / "clip"), "pick": write_clip_folder(root / "pick", kind="laion", seed=5)}


def run(assets, out, **kwargs):
    scorers = Scorers.load(assets["clip"], assets["pick"])
    return loveu.run_benchmark(assets["data"], assets["sd"], out, FAST, scorers, **kwargs)


def frame_files(out):
    return {str(p.relative_to(out)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in sorted((out / "submission").rglob("*.jpg"))}


def test_the_csv_sections_name_each_videos_subset(tmp_path):
    videos = loveu.read_dataset(write_dataset(tmp_path, CSV_VIDEOS))
    assert [(v.subset, v.name) for v in videos] == CSV_VIDEOS
    assert videos[2].prompts["background"] == "a cat-in-the-sun on the moon"
    assert videos[0].frame_count() == 3


def test_shards_cover_every_video_once():
    items = list(range(7))
    assert sorted(sum((loveu.shard(items, r, 3) for r in range(3)), [])) == items


def test_overrides_win_over_the_baseline_and_sampling_follows_the_clip(tmp_path):
    video = loveu.read_dataset(write_dataset(tmp_path))[0]
    config = loveu.tuning_config(video, tmp_path, tmp_path / "out", ["train_data.n_sample_frames=2"])
    assert config.max_train_steps == 500 and config.learning_rate == 3e-5
    assert config.validation_data.guidance_scale == 12.5 and config.validation_data.num_inv_steps == 50
    assert (config.train_data.width, config.train_data.height) == (480, 480)
    assert config.train_data.n_sample_frames == 2 and config.validation_data.video_length == 2


@pytest.fixture(scope="module")
def clean_run(assets, tmp_path_factory):
    ms = pytest.importorskip("mindspore")
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    out = tmp_path_factory.mktemp("clean")
    summary = run(assets, out)
    ms.set_context(mode=previous)
    return out, summary


@pytest.mark.parity
def test_writes_the_submission_layout_and_scores(clean_run):
    out, summary = clean_run
    for subset, name in VIDEOS:
        for kind in loveu.EDIT_TYPES:
            files = sorted(os.listdir(out / "submission" / subset / name / kind))
            assert files == ["00000.jpg", "00001.jpg", "00002.jpg"]
    assert not (out / "work").exists()
    written = json.loads((out / "scores.json").read_text())
    assert written == summary and summary["num_edits"] == 8
    assert set(summary["mean"]) == {"frame_consistency", "text_alignment", "pickscore"}
    pairs = [s for v in summary["videos"].values() for s in v.values()]
    assert summary["mean"]["pickscore"] == pytest.approx(np.mean([s["pickscore"] for s in pairs]))
    assert set(summary["edit_types"]) == set(loveu.EDIT_TYPES)


@pytest.mark.parity
def test_a_rerun_after_a_kill_finishes_without_redoing_finished_videos(assets, clean_run, tmp_path, pynative):
    out = tmp_path / "out"
    shutil.copytree(clean_run[0], out)
    (out / "scores.json").unlink()
    # The second video was killed half-way: no done marker, nothing in submission/, a partial tuning run and
    # some frames in its work folder.
    subset, name = VIDEOS[1]
    shutil.rmtree(out / "submission" / subset / name)
    (out / "done" / subset / f"{name}.json").unlink()
    work = out / "work" / subset / name
    (work / "submission" / "style").mkdir(parents=True)
    (work / "submission" / "style" / "00000.jpg").write_bytes(b"half a jpeg")
    (work / "tune" / "checkpoint-1").mkdir(parents=True)
    first = frame_files(out)

    generated = {}
    summary = run(assets, out, on_video=lambda video, g: generated.update({video.name: g}))
    assert generated == {VIDEOS[0][1]: False, name: True}
    after = frame_files(out)
    assert {k: after[k] for k in first} == first  # nothing finished was rewritten
    assert summary == clean_run[1]  # the same scores as the uninterrupted run: deterministic and resumed cleanly
    assert not (out / "work").exists()

    # Killed between the rename into submission/ and the done marker: scored from its frames, not redone.
    (out / "done" / subset / f"{name}.json").unlink()
    generated.clear()
    assert run(assets, out, on_video=lambda video, g: generated.update({video.name: g})) == summary
    assert not any(generated.values()) and frame_files(out) == after


def test_loveu_reports_a_missing_dataset_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "loveu.py"), "--data_path", str(tmp_path),
         "--pretrained_model_path", str(tmp_path), "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error:") and "LOVEU-TGVE-2023_Dataset.csv" in result.stderr


@pytest.mark.parity
def test_two_ranks_under_msrun_give_the_single_process_scores(assets, clean_run, tmp_path):
    out = tmp_path / "out"
    command = ["msrun", "--worker_num=2", "--local_worker_num=2", "--master_port=8131", "--join=True",
               f"--log_dir={tmp_path / 'msrun'}", str(REPO_ROOT / "tools" / "loveu.py"), "--use_parallel", "True",
               "--mode", "1", "--data_path", str(assets["data"]), "--pretrained_model_path", str(assets["sd"]),
               "--output_dir", str(out), "--clip_model", str(assets["clip"]), "--pickscore_model",
               str(assets["pick"]), *FAST]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=1200)
    logs = "".join(p.read_text(errors="replace")[-3000:] for p in sorted((tmp_path / "msrun").glob("*.log")))
    assert result.returncode == 0, logs
    assert json.loads((out / "scores.json").read_text()) == clean_run[1]
    # Each rank edited its own video and logged to its own file.
    assert "blackswan: editing" in (out / "logs" / "rank_0.log").read_text()
    assert "cat-in-the-sun: editing" in (out / "logs" / "rank_1.log").read_text()
    assert not (out / "work").exists()
