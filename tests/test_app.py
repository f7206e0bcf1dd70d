"""The web app's jobs (tav.app), without the page: the checks a Tune form gets before any model loads, the tune ->
invert -> sample path on the tiny model, the inversion cache shared by edits, and cancelling."""
import os

import numpy as np
import pytest

from tav import app
from tav.config import ConfigError
from tav.evaluation import read_frames
from tav.tiny import make_demo_clip
from tav.video import VideoError


def tiny_settings(clip, **overrides):
    values = dict(video=str(clip), prompt="a square is moving", base_model=app.TINY_BASE, n_frames=4, stride=1,
                  size=32, steps=2, learning_rate=1e-3, seed=0)
    values.update(overrides)
    return app.TuneSettings(**values)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    clip = make_demo_clip(root / "upload.mp4", n_frames=6, height=32, width=32)
    return root / "work", clip


def test_a_clip_with_too_few_frames_is_refused_naming_the_frames(work):
    work_dir, clip = work
    with pytest.raises(VideoError, match=r"has 6 frames.*frames=8 requested \(too few frames\)"):
        app.tune_config(tiny_settings(clip, n_frames=8), work_dir)
    assert not (work_dir / "models").exists()


def test_an_upload_that_is_not_a_video_is_refused(work, tmp_path):
    work_dir, _ = work
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    with pytest.raises(VideoError, match="notes"):
        app.tune_config(tiny_settings(text), work_dir)


def test_a_bad_form_value_is_refused_naming_the_key(work):
    work_dir, clip = work
    with pytest.raises(ConfigError, match="max_train_steps"):
        app.tune_config(tiny_settings(clip, steps=0), work_dir)
    with pytest.raises(ConfigError, match="train_data.prompt must be a non-empty string"):
        app.tune_config(tiny_settings(clip, prompt="  "), work_dir)


def test_the_same_upload_is_stored_once_under_its_content(work, tmp_path):
    work_dir, clip = work
    copy = tmp_path / "other-name.mp4"
    copy.write_bytes(open(clip, "rb").read())
    assert app.store_clip(str(clip), work_dir) == app.store_clip(str(copy), work_dir)


def test_cancel_stops_the_run_and_leaves_no_model(work):
    work_dir, clip = work
    config = app.tune_config(tiny_settings(clip), work_dir, name="cancelled")
    progress = app.JobProgress()
    progress.cancel()
    with pytest.raises(app.JobCancelled, match="step 1"):
        app.run_tune(config, progress)
    assert progress.state == "cancelled" and len(progress.snapshot()) == 1
    assert not os.path.exists(config.output_dir)
    assert [m.name for m in app.list_tuned_models(work_dir)] == []


class MessageLog(app.JobProgress):
    """A JobProgress that keeps every message it was given (the page shows the latest)."""

    def __init__(self):
        self.messages = []
        super().__init__()

    @property
    def message(self):
        return self.messages[-1] if self.messages else ""

    @message.setter
    def message(self, text):
        if text:
            self.messages.append(text)


def test_tune_then_two_edits_invert_the_clip_once(work):
    work_dir, clip = work
    progress = app.JobProgress()
    app.run_tune(app.tune_config(tiny_settings(clip), work_dir, name="tuned"), progress)
    assert [step for step, _, _ in progress.snapshot()] == [1, 2] and "step 2/2" in progress.summary()
    assert [m.name for m in app.list_tuned_models(work_dir)] == ["tuned"]

    edit = app.EditSettings("tuned", ["a red square", "a blue ball"], steps=2, seed=0)
    progress = MessageLog()
    outputs = app.run_edit(app.edit_request(edit, work_dir, stamp="first"), progress=progress)
    assert [o.prompt for o in outputs] == edit.prompts
    assert progress.messages == ["loading the model", "inversion, DDIM step 1/2", "inversion, DDIM step 2/2",
                                 "prompt 1/2, DDIM step 1/2", "prompt 1/2, DDIM step 2/2", "prompt 2/2, DDIM step 1/2",
                                 "prompt 2/2, DDIM step 2/2", "writing the grids and downloads", "2 edit(s)"]
    assert progress.state == "done"
    for output in outputs:
        assert read_frames(output.mp4).shape[:3] == (4, 32, 32)
        assert read_frames(output.grid).shape[:3] == (4, 32, 32 + 2 + 32)
        assert os.path.getsize(output.frames_zip) > 0
    inversions = sorted(os.listdir(work_dir / "inversions"))
    app.run_edit(app.edit_request(app.EditSettings("tuned", ["a green square"], steps=2, seed=0), work_dir, stamp="second"))
    assert sorted(os.listdir(work_dir / "inversions")) == inversions  # the cached inversion was reused
    assert [o.prompt for o in app.list_edits("tuned", work_dir)] == ["a green square"] + edit.prompts


def test_an_unknown_model_is_refused_before_sampling(work):
    work_dir, _ = work
    with pytest.raises(FileNotFoundError, match="tuned model 'missing' not found"):
        app.edit_request(app.EditSettings("missing", ["a prompt"]), work_dir)


def test_scores_are_tabled_per_edit():
    outputs = [app.EditOutput("a cat", "a.gif", "a.mp4", "a.zip", "g.gif", {"text_alignment": 0.25}),
               app.EditOutput("a dog", "b.gif", "b.mp4", "b.zip", "h.gif", {})]
    table = app.scores_table(outputs)
    assert "| a cat | 0.2500 |" in table and "| a dog | - |" in table
    assert app.split_prompts("a\n\n  b  \n") == ["a", "b"]
