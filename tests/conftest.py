"""Fixtures only (execution modes, the optional real clips); shared helpers live in tests/helpers.py."""
import pytest

import mindspore as ms

from tests.helpers import SHARED_DATA, in_mode

ms.set_device("CPU")


@pytest.fixture(params=[ms.GRAPH_MODE, ms.PYNATIVE_MODE], ids=["graph", "pynative"])
def ms_mode(request):
    """Run the test once in GRAPH_MODE and once in PYNATIVE_MODE, restoring the previous mode after."""
    with in_mode(request.param):
        yield request.param


@pytest.fixture
def pynative():
    with in_mode(ms.PYNATIVE_MODE):
        yield


@pytest.fixture
def graph_mode():
    with in_mode(ms.GRAPH_MODE):
        yield


@pytest.fixture(scope="session")
def shared_data():
    """The official clips beside the repository. Every other test generates its inputs; the few that add value only
    on the real clips are deselected where the clips are absent (pytest_collection_modifyitems), not skipped."""
    return SHARED_DATA


# The slow tier (`make test-slow`; CI runs it after `make test`): whole modules and single tests that each take
# tens of seconds on a 2-core machine (measured with --durations), where a faster test of the same code stays in
# `make test`: msrun and LOVEU runs, the Ascend emulation's compiled fp16 graphs, graph-mode parity against
# diffusers on the larger configs, end-to-end tool and app runs. Entries are node-id prefixes.
SLOW_TESTS = (
    "tests/test_sample_sources.py",
    "tests/test_loveu.py::test_writes_the_submission_layout_and_scores",
    "tests/test_loveu.py::test_a_rerun_after_a_kill",
    "tests/test_loveu.py::test_two_ranks_under_msrun",
    "tests/test_training_parallel.py",
    "tests/test_bench_smoke.py",
    "tests/test_app.py::test_cancel_stops_the_run",
    "tests/test_app.py::test_tune_then_two_edits",
    "tests/test_ascend_emulation.py::test_fp16_unet_on_an_emulated_910b_runs_flash_attention_and_agrees_with_the_"
    "cpu_path[graph]",
    "tests/test_ascend_emulation.py::test_unet_gradients_under_the_emulation",
    "tests/test_ascend_emulation.py::test_compiled_update_with_fp16_parameters",
    "tests/test_ascend_emulation.py::test_sampling_tool_runs_end_to_end",
    "tests/test_ascend_emulation.py::test_inversion_and_sampling_under_the_emulation_agree_with_the_cpu_path[graph]",
    "tests/test_train_step_device.py::test_an_emulated_ascend_step",
    "tests/test_unet3d.py::test_one_frame_gradients_of_the_tuned_projections_match_diffusers[graph",
    "tests/test_unet3d.py::test_one_frame_matches_diffusers_unet2d[graph-sd2",
    "tests/test_unet3d.py::test_python_number_timestep_matches_tensor_timestep[graph]",
    "tests/test_unet3d.py::test_identical_frames_with_zero_temporal_output_give_the_2d_result_per_frame[graph]",
    "tests/test_unet3d.py::test_a_later_frame_changes_every_frame_of_the_output[graph]",
    "tests/test_unet3d.py::test_fp16_load",
    "tests/test_pipeline.py::test_every_component_runs_in_graph_mode",
    "tests/test_pipeline.py::test_invert_then_sample_two_prompts_to_gif_and_mp4",
    "tests/test_vae.py::test_matches_diffusers[graph]",
    "tests/test_lora_tuning.py::test_loading_a_lora_delta_reproduces_the_tuned_model",
    "tests/test_training_long_clips.py::test_validation_samples_in_windows",
    "tests/test_training_frame_policy.py::test_a_run_and_its_delta_keep_the_setting[frame_policy]",
    "tests/test_training.py::test_sd1_unet_trains_112_tensors",
    "tests/test_sample_cli.py::test_loading_a_model_prints_no_library_import_noise",
    "tests/test_ldm_checkpoint.py::test_pipeline_from_a_single_file_gives_identical_outputs[torch]",
    "tests/test_ldm_checkpoint.py::test_pipeline_from_a_single_file_gives_identical_outputs[mindspore]",
    "tests/test_evaluation.py::test_the_tool_prints_a_table",
    "tests/test_world.py::test_a_retrain_writes_a_loadable_pipeline",
    "tests/test_world.py::test_the_recipe_runs_its_stages_in_order",
)


def pytest_collection_modifyitems(config, items):
    """Mark the slow tier (SLOW_TESTS); then, without ../shared/data, leave out the tests that need the real clips,
    and say so in the summary: a clone with nothing beside it runs everything else, and reports no skip that would
    hide a test that should run."""
    for item in items:
        if item.nodeid.startswith(SLOW_TESTS):
            item.add_marker(pytest.mark.slow)
    if SHARED_DATA.is_dir():
        return
    needs_clips = [item for item in items if "shared_data" in getattr(item, "fixturenames", ())]
    if needs_clips:
        items[:] = [item for item in items if item not in needs_clips]
        config.hook.pytest_deselected(items=needs_clips)
        config._tav_without_clips = len(needs_clips)


def pytest_terminal_summary(terminalreporter, config):
    if SHARED_DATA.is_dir():
        return
    # Under pytest-xdist the workers collect, so this (controlling) process does not know how many were left out.
    left_out = getattr(config, "_tav_without_clips", None)
    which = f"{left_out} tests" if left_out else "the tests"
    terminalreporter.write_line(f"{which} that need the real clips in {SHARED_DATA} were deselected (they run "
                                "where ../shared/data exists)")


@pytest.fixture(scope="module")
def sample_tool():
    """tools/sample.py as a module, so tests call its parse_args/build_request/main directly."""
    from tests.helpers import load_tool

    return load_tool("sample")


@pytest.fixture
def no_loading(monkeypatch):
    """Loading a model fails the test: the errors it checks must come before any."""
    from tav.pipeline import TuneAVideoPipeline

    monkeypatch.setattr(TuneAVideoPipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded a model"))
