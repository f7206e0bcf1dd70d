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


def pytest_collection_modifyitems(config, items):
    """Without ../shared/data, leave out the tests that need the real clips, and say so in the summary: a clone
    with nothing beside it runs everything else, and reports no skip that would hide a test that should run."""
    if SHARED_DATA.is_dir():
        return
    needs_clips = [item for item in items if "shared_data" in getattr(item, "fixturenames", ())]
    if needs_clips:
        items[:] = [item for item in items if item not in needs_clips]
        config.hook.pytest_deselected(items=needs_clips)
        config._tav_without_clips = len(needs_clips)


def pytest_terminal_summary(terminalreporter, config):
    left_out = getattr(config, "_tav_without_clips", 0)
    if left_out:
        terminalreporter.write_line(f"{left_out} tests need the real clips in {SHARED_DATA} and were deselected "
                                    "(they run where ../shared/data exists)")


@pytest.fixture(scope="module")
def sample_tool():
    """tools/sample.py as a module, so tests call its parse_args/build_request/main directly."""
    import importlib.util

    from tests.helpers import REPO_ROOT

    spec = importlib.util.spec_from_file_location("sample_tool", REPO_ROOT / "tools" / "sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def no_loading(monkeypatch):
    """Loading a model fails the test: the errors it checks must come before any."""
    from tav.pipeline import TuneAVideoPipeline

    monkeypatch.setattr(TuneAVideoPipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded a model"))
