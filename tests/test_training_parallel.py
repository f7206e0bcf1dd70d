"""Data-parallel tuning under msrun: 2 CPU ranks with train_batch_size 1 give the losses and weights of one process
with train_batch_size 2 (the same draws, the gradients averaged over ranks), and only rank 0 writes output_dir."""
import json
import subprocess

import numpy as np
import pytest

from tav import checkpoint, training
from tav.delta import DELTA_NAME
from tav.train_step import DataParallel
from tests.helpers import REPO_ROOT
from tests.test_training import clip, graph_mode_module, run_config, small_pipeline  # noqa: F401 (fixtures)

STEPS = 3


def losses_of(output_dir):
    state = json.loads((output_dir / f"checkpoint-{STEPS}" / "training_state.json").read_text())
    return np.array([loss for _, loss in state["losses"]])


def test_a_rank_trains_on_its_own_rows_of_the_draw():
    first, second = DataParallel(0, 2), DataParallel(1, 2)
    draw = np.arange(8).reshape(1, 8)
    assert draw[:, first.rows(4)].tolist() == [[0, 1, 2, 3]]
    assert draw[:, second.rows(4)].tolist() == [[4, 5, 6, 7]]
    with pytest.raises(ValueError, match="rank 2 is outside 0..1"):
        DataParallel(2, 2)


def test_two_msrun_ranks_equal_one_process_with_twice_the_batch(small_pipeline, clip, graph_mode_module, tmp_path):
    common = dict(max_train_steps=STEPS, checkpointing_steps=STEPS, validation_steps=STEPS, mixed_precision="no",
                  learning_rate=1e-2)
    parallel_out = tmp_path / "parallel"
    config_path = tmp_path / "parallel.yaml"
    config_path.write_text(run_config(small_pipeline, parallel_out, clip, train_batch_size=1, **common).to_yaml())
    command = ["msrun", "--worker_num=2", "--local_worker_num=2", "--master_port=8137", "--join=True",
               f"--log_dir={tmp_path / 'msrun'}", str(REPO_ROOT / "tools" / "train.py"), "--config", str(config_path),
               "--use_parallel", "True"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=900)
    logs = {p.name: p.read_text(errors="replace") for p in sorted((tmp_path / "msrun").glob("*.log"))}
    assert result.returncode == 0, "".join(text[-3000:] for text in logs.values())

    single = training.train(run_config(small_pipeline, tmp_path / "single", clip, train_batch_size=2, **common))

    np.testing.assert_allclose(losses_of(parallel_out), [loss for _, loss in single.losses], rtol=1e-4, atol=1e-6)
    tuned = checkpoint.read_state_dict(str(parallel_out / DELTA_NAME))
    expected = checkpoint.read_state_dict(single.delta_path)
    assert sorted(tuned) == sorted(expected)
    # AdamW divides by the gradients' root mean square, so a summation-order difference of 1e-7 in a near-zero
    # gradient can move a weight by ~lr x 1e-3 after a few steps: the weights compare at 1e-4.
    for name in expected:
        np.testing.assert_allclose(tuned[name], expected[name], rtol=1e-4, atol=1e-4, err_msg=name)
    # One log per rank: rank 0's train.log (and its console), rank 1's console in msrun's log; rank 1 wrote nothing.
    assert "step 3 loss" in (parallel_out / "train.log").read_text()
    assert any("[rank 1] step 3 loss" in text for text in logs.values())
    assert "rank 1" not in (parallel_out / "train.log").read_text()
