"""tav: Tune-A-Video on MindSpore (Ascend first, CPU and GPU as fallbacks)."""

__version__ = "0.1.0"
