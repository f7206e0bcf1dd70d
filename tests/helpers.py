"""What the tests share that is not a fixture: the repository root, the optional real clips, the optional PyTorch
parity extra, and running a block in one MindSpore execution mode. Import it (`from tests.helpers import ...`);
tests/conftest.py keeps only what must be a pytest fixture."""
import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mindspore as ms

REPO_ROOT = Path(__file__).resolve().parents[1]
# The official clips live beside a development checkout, never inside the repository. Only tests that add value
# with them use them (and skip without them); every other test generates its clips (tav.tiny.make_demo_clip).
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
PARITY_REASON = "parity extra not installed: pip install -r requirements-parity.txt"


def import_parity_extra():
    """torch + diffusers (the test-only parity extra); skip with the reason when they cannot be imported.
    Tests that call it carry @pytest.mark.parity (select them with `pytest -m parity`)."""
    torch = pytest.importorskip("torch", reason=PARITY_REASON)
    diffusers = pytest.importorskip("diffusers", reason=PARITY_REASON)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    return torch, diffusers


@contextlib.contextmanager
def in_mode(mode):
    """Run the block in MindSpore `mode` (GRAPH_MODE / PYNATIVE_MODE), restoring the previous mode after."""
    previous = ms.get_context("mode")
    ms.set_context(mode=mode)
    try:
        yield mode
    finally:
        ms.set_context(mode=previous)


def load_tool(name):
    """tools/<name>.py as a module, so tests call its parse_args / main / helpers directly in this process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO_ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tool(name, *args, timeout=600, cwd=None):
    """Run tools/<name>.py in a fresh interpreter (its own process state, as a user runs it); returns the
    CompletedProcess with text stdout and stderr."""
    return subprocess.run([sys.executable, str(REPO_ROOT / "tools" / f"{name}.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=cwd)
