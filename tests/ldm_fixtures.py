"""A tiny model, its LDM state dict, and that state written in each single-file container (shared by the loader
and the tool tests: import the fixtures `tiny` and `ldm_state` by name)."""
import os

import numpy as np
import pytest

import mindspore as ms

from tav import checkpoint, ldm_checkpoint
from tav.tiny import write_tiny_pipeline


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny diffusers-layout pipeline folder, once per test module."""
    return write_tiny_pipeline(str(tmp_path_factory.mktemp("tiny") / "sd"))


@pytest.fixture(scope="module")
def ldm_state(tiny):
    """`tiny`'s weights under the original LDM single-file names."""
    return ldm_checkpoint.folder_to_ldm(tiny)


def write_container(kind, ldm_state, folder):
    """The tiny model's LDM state dict as a .safetensors, a Lightning-style torch .ckpt or a mindone .ckpt."""
    if kind == "safetensors":
        path = os.path.join(folder, "tiny.safetensors")
        checkpoint.save_state_dict(ldm_state, path)
    elif kind == "torch":
        torch = pytest.importorskip("torch", reason="writing a PyTorch .ckpt needs torch (the parity extra)")
        path = os.path.join(folder, "tiny_torch.ckpt")
        torch.save({"state_dict": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in ldm_state.items()},
                    "global_step": 470000, "epoch": 3}, path)
    else:
        path = os.path.join(folder, "tiny_mindone.ckpt")
        ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in
                            ldm_checkpoint.to_mindone_names(ldm_state).items()], path)
    return path


CONTAINERS = ["safetensors", pytest.param("torch", marks=pytest.mark.parity), "mindspore"]
