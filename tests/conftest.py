"""Fixtures only (execution modes, the optional real clips); shared helpers live in tests/helpers.py."""
import pytest

import mindspore as ms

# Test files of other modules still import these from here; new code imports them from tests.helpers.
from tests.helpers import REPO_ROOT, SHARED_DATA, import_parity_extra, in_mode  # noqa: F401

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
    """The official clips beside the repository; tests that need them skip without them (they add value only
    there: every other test generates its inputs)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real clips not found at {SHARED_DATA} (they live beside the repository in ../shared/data)")
    return SHARED_DATA
