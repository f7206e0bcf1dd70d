"""loss.png: the loss and the learning rate as two lines over the steps, drawn with Pillow."""
import numpy as np
import pytest
from PIL import Image

from tav.loss_plot import LEFT, LOSS_COLOR, LR_COLOR, RIGHT, WIDTH, render_loss_plot, write_loss_plot


def pixels_of(image, color):
    rows, cols = np.nonzero(np.all(np.asarray(image) == color, axis=-1))
    return rows, cols


def test_a_falling_loss_runs_from_top_left_to_bottom_right_and_warmup_rises():
    steps = np.arange(1, 51)
    image = render_loss_plot(steps, 1.0 / steps, np.minimum(steps / 10, 1.0) * 1e-4)
    rows, cols = pixels_of(image, LOSS_COLOR)
    plotted = (cols > LEFT + 2) & (cols < WIDTH - RIGHT - 2)  # the line, not the legend text
    left, right = rows[plotted & (cols < LEFT + 40)], rows[plotted & (cols > WIDTH - RIGHT - 40)]
    assert left.size and right.size and left.mean() < right.mean()  # row 0 is the top
    rows, cols = pixels_of(image, LR_COLOR)
    plotted = (cols > LEFT + 2) & (cols < LEFT + 60) & (rows > 20)
    assert rows[plotted & (cols < LEFT + 20)].mean() > rows[plotted & (cols > LEFT + 40)].mean()


def test_one_step_and_flat_series_still_plot(tmp_path):
    path = write_loss_plot(tmp_path / "loss.png", [1], [0.5], [1e-3])
    with Image.open(path) as image:
        assert image.format == "PNG" and pixels_of(image.convert("RGB"), LOSS_COLOR)[0].size
    assert [p.name for p in tmp_path.iterdir()] == ["loss.png"]  # no temporary file left


def test_mismatched_series_are_refused():
    with pytest.raises(ValueError, match="equally long"):
        render_loss_plot([1, 2], [0.5], [1e-3, 1e-3])
