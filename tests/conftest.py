"""Shared fixtures: execution modes, the real clips in ../shared/data, and the optional PyTorch originals."""
import os
from pathlib import Path

import pytest

import mindspore as ms

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

ms.set_device("CPU")


@pytest.fixture(params=[ms.GRAPH_MODE, ms.PYNATIVE_MODE], ids=["graph", "pynative"])
def ms_mode(request):
    """Run the test once in GRAPH_MODE and once in PYNATIVE_MODE, restoring the previous mode after."""
    previous = ms.get_context("mode")
    ms.set_context(mode=request.param)
    yield request.param
    ms.set_context(mode=previous)


def _in_mode(mode):
    previous = ms.get_context("mode")
    ms.set_context(mode=mode)
    yield
    ms.set_context(mode=previous)


@pytest.fixture
def pynative():
    yield from _in_mode(ms.PYNATIVE_MODE)


@pytest.fixture
def graph_mode():
    yield from _in_mode(ms.GRAPH_MODE)


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real clips not found at {SHARED_DATA} (they live beside the repository in ../shared/data)")
    return SHARED_DATA


def import_parity_extra():
    """torch + diffusers (the test-only parity extra); skip with the reason when they cannot be imported."""
    torch = pytest.importorskip("torch", reason="parity extra not installed: pip install -r requirements-parity.txt")
    diffusers = pytest.importorskip("diffusers", reason="parity extra not installed: pip install -r requirements-parity.txt")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    return torch, diffusers
