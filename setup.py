from setuptools import setup

setup(
    name="tav",
    version="0.1.0",
    description="Tune-A-Video on MindSpore: one-shot video tuning of Stable Diffusion, Ascend and CPU",
    python_requires=">=3.9",
    # tav/kernels/ sits inside the package, so a plain checkout, an editable install and a wheel all import it
    # by the same path (no package_dir mapping, no run-time alias).
    packages=["tav", "tav.models", "tav.kernels", "tav.kernels.attention_backends", "tav.kernels.cpu"],
    # The native CPU kernels ship as C++ sources and are compiled on first use (tav/kernels/cpu/build.py).
    package_data={"tav.kernels.cpu": ["*.cc", "*.h"],
                  # The trained world model (tav.world_model; tools/make_world_model.py reproduces it).
                  "tav": ["assets/world_model/*.json", "assets/world_model/*/*"]},
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
        "Pillow>=9.1",
    ],
    extras_require={"parity": ["torch==2.13.0", "diffusers==0.35.2"], "test": ["pytest", "pytest-xdist"]},
)
