"""LoRA tuning: trainable low-rank adapters on the UNet's attention projections instead of the projections themselves.

    adapted = add_lora_adapters(unet, rank=4, modules=["attn1.to_q", "attn2.to_q"], seed=33)
    trainable = select_trainable(unet, LORA_TRAINABLE_MODULES)      # only the adapters train

Each chosen Linear W becomes W x + (alpha / rank) * B A x with A (rank, in) and B (out, rank): A drawn from a normal of
std 1/rank, B zero, so the adapted UNet starts as the base. The Linear keeps its own weight and bias Parameters
(same names: checkpoints and the base fingerprint see the base model unchanged), and the adapters are two bias-free
Linears named `lora_down` and `lora_up` under it: `...attn1.to_q.lora_down.weight`. A layer is adapted when a
module containing it ends with one of `modules` (the official trainable-modules rule), so `attn_temp` adapts its
to_q, to_k, to_v and to_out.0, and `attn1.to_out` adapts attn1.to_out.0.

The delta of a LoRA run holds the adapters only (tav.delta: a few MB for SD 1.5 at rank 4, where full tuning
stores ~300 MB), with the rank, alpha and the temporal layers' init seed in its header; loading fuses
W + (alpha / rank) B A into a plain UNet.
"""
import numpy as np

import mindspore as ms

from tav.config import DEFAULT_LORA_MODULES
from tav.nn import Linear
from tav.train_step import is_trainable

LORA_TRAINABLE_MODULES = ("lora_down", "lora_up")


class LoRALinear(Linear):
    """A Linear with a trainable low-rank adapter beside its frozen weight: y = W x + b + scale * up(down(x))."""

    def __init__(self, base, rank, alpha, rng):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, dtype=base.weight.dtype)
        self.weight, self.bias = base.weight, base.bias  # the base's Parameters, not copies
        self.lora_down = Linear(base.in_features, rank, bias=False)
        self.lora_up = Linear(rank, base.out_features, bias=False)
        down = rng.standard_normal((rank, base.in_features)) / rank
        self.lora_down.weight.set_data(ms.Tensor(down.astype(np.float32)))
        self.lora_up.weight.set_data(ms.Tensor(np.zeros((base.out_features, rank), np.float32)))
        self.lora_scale = float(alpha) / rank

    def construct(self, x):
        return super().construct(x) + self.lora_up(self.lora_down(x)) * self.lora_scale


def lora_targets(unet, modules):
    """The qualified names of the Linears that `modules` selects (see the module docstring), in model order."""
    # A Linear is a target when the official rule would train its weight (the name's prefixes end with a module).
    return [name for name, cell in unet.cells_and_names()
            if isinstance(cell, Linear) and not isinstance(cell, LoRALinear) and "lora_" not in name
            and is_trainable(f"{name}.weight", modules)]


def add_lora_adapters(unet, rank, modules=DEFAULT_LORA_MODULES, alpha=None, seed=0):
    """Replace each selected Linear of `unet` by a LoRALinear of `rank` (alpha None: alpha = rank, scale 1), the
    adapters' initial values drawn from numpy's Generator(seed) in model order. Returns the adapted names; raises
    ValueError when `modules` selects no Linear."""
    targets = lora_targets(unet, modules)
    if not targets:
        raise ValueError(f"lora_modules {list(modules)} match no Linear layer of the UNet; expected suffixes of "
                         f"module names such as attn1.to_q, attn2.to_k, attn1.to_out, attn_temp")
    rng = np.random.default_rng(seed)
    cells = dict(unet.cells_and_names())
    for name in targets:
        parent_name, _, attribute = name.rpartition(".")
        parent = cells[parent_name] if parent_name else unet
        adapted = LoRALinear(cells[name], rank, rank if alpha is None else alpha, rng)
        if isinstance(parent, (ms.nn.SequentialCell, ms.nn.CellList)):  # to_out is [Linear, Dropout]
            parent[int(attribute)] = adapted
        else:
            setattr(parent, attribute, adapted)
    for name, param in unet.parameters_and_names():
        if ".lora_" in name:  # a ParameterTuple (the optimiser's) needs unique names; a new Cell's are relative
            param.name = name
    return targets


def adapter_size_bytes(shapes, rank, bytes_per_value=4):
    """The bytes a delta of rank-`rank` adapters takes for Linears of weight `shapes` [(out, in), ...]."""
    return sum(rank * (out_features + in_features) for out_features, in_features in shapes) * bytes_per_value
