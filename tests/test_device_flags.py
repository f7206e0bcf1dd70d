"""Device settings (issue 12): jit level through the current API, DEVICE_ID / --device_id, a device whose backend
cannot load, and the tools' device flags."""
import pytest

import mindspore as ms

from tav import backend
from tests.helpers import load_tool


@pytest.fixture
def recorded_device(monkeypatch):
    """ms.set_device calls recorded instead of made; every device treated as loadable."""
    calls = []
    monkeypatch.setattr(ms, "set_device", lambda *args: calls.append(args))
    monkeypatch.setattr(backend, "check_device_available", lambda target: None)
    return calls


@pytest.fixture
def restored_jit_level():
    previous = backend._jit_level
    yield
    backend._jit_level = previous


def test_o2_is_refused_with_the_reason(restored_jit_level):
    with pytest.raises(backend.DeviceConfigError, match="O2 is not supported.*O0 or O1"):
        backend.configure(jit_level="O2")


def test_jit_level_goes_through_ms_jit_and_cell_jit_config_not_the_deprecated_context(restored_jit_level,
                                                                                        monkeypatch):
    context_calls = []
    real_set_context = ms.set_context
    monkeypatch.setattr(ms, "set_context", lambda **kw: context_calls.append(kw) or real_set_context(**kw))
    jitted = []
    monkeypatch.setattr(ms, "jit", lambda fn=None, **kw: jitted.append(kw) or fn)
    backend.configure(jit_level="O1")
    assert backend.jit_level() == "O1" and not any("jit_config" in kw for kw in context_calls)
    backend.jit(lambda x: x)
    assert jitted == [{"jit_level": "O1"}]
    cell = ms.nn.Cell()
    backend.apply_jit_level(cell)
    assert cell._jit_config_dict["jit_level"] == "O1"


def test_device_id_argument_and_device_id_environment_variable_choose_the_card(recorded_device, monkeypatch):
    monkeypatch.setenv("DEVICE_ID", "5")
    backend.configure(device_target="Ascend")
    backend.configure(device_target="Ascend", device_id=2)  # the argument wins
    backend.configure(device_target="CPU")  # the CPU has no cards
    assert recorded_device == [("Ascend", 5), ("Ascend", 2), ("CPU",)]
    monkeypatch.setenv("DEVICE_ID", "two")
    with pytest.raises(backend.DeviceConfigError, match="DEVICE_ID"):
        backend.configure(device_target="Ascend")


def test_an_unloadable_gpu_backend_is_refused_with_what_it_needs():
    # This machine has no CUDA 11 runtime (and MindSpore's wheel here no GPU plugin): the error path is real.
    from mindspore._c_expression import MSContext

    if MSContext.get_instance().is_pkg_support_device("GPU"):
        pytest.skip("a loadable GPU backend is present")
    with pytest.raises(backend.DeviceUnavailableError, match="CUDA 11.*libcudart.so.11.0"):
        backend.configure(device_target="GPU")


def test_sample_tool_defaults_to_mindspores_device_and_both_tools_share_the_device_flags():
    sample, train = load_tool("sample"), load_tool("train")
    sample_args = sample.parse_args([])
    assert sample_args.device_target is None  # was "CPU": an NPU host silently ran on its CPU
    flags = ["--device_target", "Ascend", "--device_id", "3", "--jit_level", "O1", "--max_device_memory", "30GB"]
    got_sample = sample.parse_args(flags)
    got_train = train.parse_args(["--config", "x.yaml"] + flags)
    for args in (got_sample, got_train):
        assert (args.device_target, args.device_id, args.jit_level, args.max_device_memory) == (
            "Ascend", 3, "O1", "30GB")


def test_train_mode_help_says_pynative_is_not_compiled(capsys):
    train = load_tool("train")
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "op by op" in text and "compiled either way" not in text
