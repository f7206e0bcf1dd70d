"""tools/world.py: a seeded clip of the world on disk, and the pixel reader's verdict on an edit of it."""
import json

import pytest

from tests.helpers import load_tool


@pytest.fixture(scope="module")
def world_tool():
    return load_tool("world")


def test_a_clip_is_written_and_judged_against_itself(world_tool, tmp_path, capsys):
    clip = tmp_path / "clip.mp4"
    assert world_tool.main(["clip", str(clip), "--caption", "a red square on a white background", "--frames", "12",
                            "--seed", "4"]) == 0
    assert capsys.readouterr().out.strip() == "a red square on a white background"
    out = tmp_path / "scores.json"
    assert world_tool.main(["judge", "--source", str(clip), "--edit", str(clip), "--prompt",
                            "a red square on a white background", "--json", str(out)]) == 0
    scores = json.loads(out.read_text())
    assert scores["frames"] == 12 and scores["edit_accuracy"] == 1.0 and scores["motion_px"] < 0.5
    assert scores["temporal_iou"] > 0.5 and scores["frames_on_path"] == 1.0
    wrong = world_tool.judge(str(clip), str(clip), "a blue circle on a black background")
    assert wrong["edit_accuracy"] == 0.0 and wrong["frames_on_path"] == 0.0


def test_the_same_seed_writes_the_same_clip(world_tool, tmp_path):
    from tav.evaluation import read_frames

    a, b = tmp_path / "a.gif", tmp_path / "b.gif"
    assert world_tool.write_clip(str(a), seed=9) == world_tool.write_clip(str(b), seed=9)
    assert (read_frames(a) == read_frames(b)).all()


def test_a_caption_outside_the_world_is_one_error_line(tmp_path, capsys):
    from tests.helpers import run_tool

    done = run_tool("world", "clip", str(tmp_path / "c.mp4"), "--caption", "a purple square on a white background")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == ("error: unknown color 'purple'; expected one of red, green, "
                                                    "blue, yellow")
    assert not (tmp_path / "c.mp4").exists()
