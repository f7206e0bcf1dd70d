"""The delta format is inference's, not training's: the pipeline reads deltas without importing the training code."""
import subprocess
import sys

from tests.helpers import REPO_ROOT


def test_the_pipeline_does_not_import_training():
    code = ("import sys, tav.pipeline; "
            "loaded = sorted(m for m in sys.modules if m.startswith(('tav.training', 'tav.train_', 'tav.optim'))); "
            "assert not loaded, loaded")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
