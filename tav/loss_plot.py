"""loss.png beside train.log: the training loss and the learning rate over the updates, drawn with Pillow.

    write_loss_plot("out/loss.png", steps, losses, learning_rates)

Two lines on one pair of axes: the loss in blue against the left scale, the learning rate in orange against the
right scale (a constant learning rate is a flat line at mid height). matplotlib is not a dependency; the plot is
a few lines, ticks and labels, written atomically (a reader never sees half a PNG).
"""
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tav.checkpoint import write_file_atomic

WIDTH, HEIGHT = 720, 400
LEFT, RIGHT, TOP, BOTTOM = 70, 80, 30, 45  # margins: room for the tick labels of both scales
LOSS_COLOR, LR_COLOR, AXIS_COLOR, GRID_COLOR = (31, 119, 180), (255, 127, 14), (40, 40, 40), (225, 225, 225)
TICKS = 5


def _scale(values, low_pixel, high_pixel):
    """Map values linearly onto [low_pixel, high_pixel]; returns (pixels, low value, high value)."""
    values = np.asarray(values, np.float64)
    low, high = float(values.min()), float(values.max())
    if high - low <= 1e-9 * max(abs(high), 1e-30):  # a flat series sits at mid height, its scale around it
        half = abs(high) * 0.5 or 1.0
        return np.full(values.shape, (low_pixel + high_pixel) / 2), low - half, high + half
    return low_pixel + (values - low) / (high - low) * (high_pixel - low_pixel), low, high


def _line(draw, xs, ys, color):
    points = list(zip(xs.tolist(), ys.tolist()))
    if len(points) == 1:
        x, y = points[0]
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
    else:
        draw.line(points, fill=color, width=2)


def render_loss_plot(steps, losses, learning_rates):
    """The plot as an RGB PIL image. steps, losses, learning_rates: equal-length sequences (one entry per update)."""
    if not (len(steps) == len(losses) == len(learning_rates)) or not len(steps):
        raise ValueError(f"steps, losses and learning_rates must be equally long and not empty; got {len(steps)}, "
                         f"{len(losses)}, {len(learning_rates)}")
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    x0, x1, y0, y1 = LEFT, WIDTH - RIGHT, HEIGHT - BOTTOM, TOP  # y0 is the bottom (pixel rows grow downwards)
    steps = np.asarray(steps, np.float64)
    first, last = float(steps.min()), float(steps.max())
    xs = x0 + (steps - first) / max(last - first, 1.0) * (x1 - x0) if last > first else np.full(steps.shape,
                                                                                                 (x0 + x1) / 2)
    loss_y, loss_low, loss_high = _scale(losses, y0, y1)
    lr_y, lr_low, lr_high = _scale(learning_rates, y0, y1)
    for i in range(TICKS + 1):
        fraction = i / TICKS
        y = y0 + fraction * (y1 - y0)
        draw.line([(x0, y), (x1, y)], fill=GRID_COLOR)
        draw.text((4, y - 6), f"{loss_low + fraction * (loss_high - loss_low):.4g}", fill=LOSS_COLOR, font=font)
        draw.text((x1 + 6, y - 6), f"{lr_low + fraction * (lr_high - lr_low):.2e}", fill=LR_COLOR, font=font)
        x = x0 + fraction * (x1 - x0)
        draw.line([(x, y0), (x, y0 + 4)], fill=AXIS_COLOR)
        draw.text((x - 10, y0 + 8), f"{first + fraction * max(last - first, 0):.0f}", fill=AXIS_COLOR, font=font)
    draw.rectangle([x0, y1, x1, y0], outline=AXIS_COLOR)
    _line(draw, xs, lr_y, LR_COLOR)
    _line(draw, xs, loss_y, LOSS_COLOR)
    draw.text((x0, 8), "loss", fill=LOSS_COLOR, font=font)
    draw.text((x0 + 50, 8), "learning rate", fill=LR_COLOR, font=font)
    draw.text(((x0 + x1) / 2 - 15, HEIGHT - 18), "step", fill=AXIS_COLOR, font=font)
    return image


def write_loss_plot(path, steps, losses, learning_rates):
    """Render the plot and write it to `path` as PNG, atomically. Returns the path."""
    image = render_loss_plot(steps, losses, learning_rates)
    write_file_atomic(path, lambda tmp: image.save(tmp, format="PNG"))
    return path
