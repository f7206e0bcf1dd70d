from setuptools import setup

setup(
    name="tav",
    version="0.1.0",
    description="Tune-A-Video on MindSpore: one-shot video tuning of Stable Diffusion, Ascend and CPU",
    python_requires=">=3.9",
    packages=["tav", "tav.models", "tav.kernels"],
    # kernels/ lives at the repository root (the agreed layout) but installs as tav.kernels,
    # so no top-level module called `kernels` lands in site-packages.
    package_dir={"tav": "tav", "tav.models": "tav/models", "tav.kernels": "kernels"},
    # The native CPU kernels ship as C++ sources and are compiled on first use (kernels/native.py).
    package_data={"tav.kernels": ["cpu/*.cc", "cpu/*.h"]},
    install_requires=[
        "mindspore>=2.5",
        "mindone>=0.5.0",
        "numpy",
        "omegaconf",
        "opencv-python-headless",
        "imageio",
        "imageio-ffmpeg",
        "safetensors",
        "tqdm",
    ],
    extras_require={"parity": ["torch==2.13.0", "diffusers==0.35.2"], "test": ["pytest"]},
)
