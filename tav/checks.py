"""Value checks shared by every edge that takes user input (the training config, the sampling request, the video
reader, the pipeline): one definition of each rule, so every edge refuses the same values with the same words.

Each predicate answers True/False; the caller raises its own error class with the option's name and the value.
Imports nothing from tav.
"""
import math
import numbers

# The VAE halves the size three times: pixel sizes must divide into whole latents.
SIZE_MULTIPLE = 8
SIZE_RULE = f"a positive multiple of {SIZE_MULTIPLE}"

# The formats tav writes videos in (tav.video.write_video; a config's and the tools' choices).
WRITE_FORMATS = ("gif", "mp4", "png")


def is_int(value):
    """An integer that is not a bool (YAML and argparse both turn `true` into something int-like)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value):
    """A real number that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_pixel_size(value):
    """A height or width the VAE maps to whole latents."""
    return is_int(value) and value >= SIZE_MULTIPLE and value % SIZE_MULTIPLE == 0


def in_range(value, low=None, high=None, low_open=False, high_open=False):
    """A finite real number within [low, high] (an open end where asked); NaN and +-inf are never in range."""
    if not is_number(value) or not math.isfinite(value):
        return False
    if low is not None and (value <= low if low_open else value < low):
        return False
    if high is not None and (value >= high if high_open else value > high):
        return False
    return True


def describe_range(low=None, high=None, low_open=False, high_open=False):
    """The words of an in_range rule, for error messages: 'a finite number in (0, 1]'."""
    if low is None and high is None:
        return "a finite number"
    if high is None:
        return f"a finite number {'>' if low_open else '>='} {low:g}"
    if low is None:
        return f"a finite number {'<' if high_open else '<='} {high:g}"
    return f"a finite number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
