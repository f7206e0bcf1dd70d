"""Resumable state on disk: atomic folder replacement, the leftovers of interrupted writes, which run a folder
holds, and which config changes a resumed run may make."""
import os

import pytest

from tav import checkpoint, train_state


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def test_replace_directory_atomically_swaps_in_a_complete_folder(tmp_path):
    final = tmp_path / "checkpoint-3"
    checkpoint.replace_directory_atomically(final, lambda tmp: write(os.path.join(tmp, "a"), "first"))
    checkpoint.replace_directory_atomically(final, lambda tmp: write(os.path.join(tmp, "b"), "second"))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-3"] and os.listdir(final) == ["b"]
    assert os.stat(final).st_mode & 0o777 == checkpoint.default_directory_mode()  # not mkdtemp's private 0700


def test_a_failing_fill_leaves_the_old_folder_and_no_leftovers(tmp_path):
    final = tmp_path / "unet"
    checkpoint.replace_directory_atomically(final, lambda tmp: write(os.path.join(tmp, "weights"), "old"))

    def fail(tmp):
        write(os.path.join(tmp, "weights"), "half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        checkpoint.replace_directory_atomically(final, fail)
    assert sorted(os.listdir(tmp_path)) == ["unet"]
    assert (final / "weights").read_text() == "old"


def test_interrupted_writes_are_the_hidden_tmp_and_old_folders(tmp_path):
    for name in (".checkpoint-4.ab12.tmp", ".unet.cd34.old", "checkpoint-2", ".hidden-notes"):
        (tmp_path / name).mkdir()
    (tmp_path / ".config.yaml.ef56.tmp").write_text("a file, not a folder: left alone")
    removed = train_state.remove_interrupted_writes(tmp_path)
    assert [os.path.basename(p) for p in removed] == [".checkpoint-4.ab12.tmp", ".unet.cd34.old"]
    assert sorted(os.listdir(tmp_path)) == [".config.yaml.ef56.tmp", ".hidden-notes", "checkpoint-2"]


def test_previous_run_outputs_lists_checkpoints_then_outputs(tmp_path):
    assert train_state.previous_run_outputs(tmp_path / "absent") == []
    write(str(tmp_path / "checkpoint-10" / train_state.STATE_NAME), "{}")
    (tmp_path / "checkpoint-5").mkdir()  # no training_state.json: not a complete checkpoint
    write(str(tmp_path / "train.log"), "")
    write(str(tmp_path / "my-notes.txt"), "")
    assert train_state.previous_run_outputs(tmp_path) == ["checkpoint-10", "train.log"]
    assert train_state.clear_previous_run(tmp_path) == ["checkpoint-10", "train.log"]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-5", "my-notes.txt"]


def test_config_differences_allow_cadence_and_refuse_what_shapes_the_weights():
    recorded = {"max_train_steps": 10, "learning_rate": 3e-5, "output_dir": "/a", "seed": 1,
                "train_data": {"n_sample_frames": 8, "prompt": "p"}, "validation_data": {"prompts": ["a"]}}
    current = {"max_train_steps": 20, "learning_rate": 1e-4, "output_dir": "/b", "seed": 1,
               "train_data": {"n_sample_frames": 8, "prompt": "q"}, "validation_data": {"prompts": ["b"]}}
    refused, allowed = train_state.config_differences(recorded, current)
    assert refused == ["learning_rate", "train_data.prompt"]
    assert allowed == ["max_train_steps", "output_dir", "validation_data.prompts"]
