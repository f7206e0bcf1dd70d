"""tav/memory_plan.py and tools/plan.py: the attention backends come from the model's dispatch, the parameter
counts from the config, and the prediction is monotone in the clip's size."""
import json

import pytest

from tav import backend
from tav.memory_plan import (MODEL_SHAPES, PlanError, check_fits, frames_that_fit, plan_memory,
                             unet_parameter_count)
from tests.helpers import run_tool


def test_sd15_unet_parameter_count_is_the_models():
    # tav's UNet3DConditionModel(cross_attention_dim=768) has 909,120,004 parameters (SD 1.5's 859.5 M + temporal).
    assert unet_parameter_count(MODEL_SHAPES["sd15"]["unet"]) == 909_120_004


def test_readme_sampling_command_on_a_910b_does_not_plan_math_attention_for_attn1():
    plan = plan_memory("sd15", "sample", 24, 512, 512, "fp32", device="Ascend910B")
    assert plan.attention["attn1"] != "math" and plan.fits


def test_fp16_on_a_910b_plans_flash_and_a_910a_never_does():
    assert plan_memory("sd15", "sample", 8, 512, 512, "fp16", device="Ascend910B").attention["attn1"] == "flash"
    on_910a = plan_memory("sd15", "sample", 8, 512, 512, "fp16", device="Ascend910A").attention
    assert "flash" not in on_910a.values()


def test_allow_flash_cast_plans_fp32_layers_through_flash():
    with backend.force_flash_cast(True):
        assert plan_memory("sd15", "sample", 8, 512, 512, "fp32", device="Ascend910B").attention["attn1"] == "flash"


def test_the_prediction_grows_with_frames_and_gradient_checkpointing_saves_memory():
    peaks = [plan_memory("sd15", "train", f, 512, 512, "fp16", device="GPU:80GB").peak_gib for f in (4, 8, 16)]
    assert peaks == sorted(peaks) and peaks[0] < peaks[-1]
    checkpointed = plan_memory("sd15", "train", 16, 512, 512, "fp16", True, "GPU:80GB").peak_gib
    assert checkpointed < peaks[-1]


def test_a_run_that_does_not_fit_is_refused_naming_the_frames_that_would():
    fitting = frames_that_fit("sd15", "train", 512, 512, "fp16", "Ascend910A", limit=64)
    assert 0 < fitting < 64
    with pytest.raises(PlanError, match=f"{fitting} frames would fit"):
        check_fits("sd15", "train", 64, 512, 512, "fp16", "Ascend", soc="Ascend910A")


def test_bad_inputs_are_plan_errors():
    for args in (("sd99", "sample", 8, 512, 512), ("sd15", "dance", 8, 512, 512), ("sd15", "sample", 8, 500, 512)):
        with pytest.raises(PlanError):
            plan_memory(*args)
    with pytest.raises(PlanError, match="GPU:<size>GB"):
        plan_memory("sd15", "sample", 8, 512, 512, device="GPU:lots")


def test_plan_tool_prints_the_json_the_issue_names():
    result = run_tool("plan", "--model", "sd15", "--task", "sample", "--frames", "24", "--height", "512", "--width",
                      "512", "--dtype", "fp32", "--device", "Ascend910B", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(report) >= {"peak_memory_gib", "fits", "attention"}
    assert set(report["attention"]) == {"attn1", "attn2", "attn_temp"} and report["attention"]["attn1"] != "math"
