"""LoRA weights from community files, fused into the inflated UNet and the text encoder.

    reports = apply_loras(pipeline.unet, pipeline.text_encoder, ["style.safetensors:0.8", "subject.safetensors"])

A LoRA pair (down: (r, in[, kh, kw]), up: (out, r[, 1, 1]), optional alpha) adds to one weight
    W += scale * (alpha / r) * up @ down          (alpha defaults to r)
and fusing it is exact, so sampling runs at the base model's speed. Three formats are read from `.safetensors`:
  - diffusers/PEFT: `unet.<module>.lora_A.weight` / `lora_B.weight` (also `.lora.down/.up.weight`), text encoder
    under `text_encoder.`; alpha from `<module>.alpha` when present;
  - diffusers' older attention processors: `<block>.processor.to_q_lora.down.weight` / `.up.weight`, and for the
    text encoder `text_encoder.<layer>.self_attn.to_q_lora.down.weight` / `<module>.lora_linear_layer.down.weight`
    (what diffusers' lora_state_dict makes of a kohya file when peft is absent);
  - kohya (sd-scripts): `lora_unet_<module with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`, and `lora_te_`
    for the text encoder. Underscores are resolved against the model's real parameter names (a module path's dots
    become underscores; two paths that collide are an error), never by guessing where dots were.
Conv LoRA (kohya's 3x3 down with a 1x1 up, or 1x1 on the 1x1 proj_in/proj_out convs) is fused the same way.
Anything else (LoCon/LoHa/LoKr `hada_`/`lokr_` tensors, SDXL's `lora_te1_`/`lora_te2_`, names the model lacks)
raises LoraError naming the keys, before any weight changes.

Training LoRA later can reuse `LoraPair` and `lora_delta`: a trainable adapter holds the same down/up Parameters
beside the frozen weight (y = x W^T + s * (x down^T) up^T), and its export is this module's diffusers format.
"""
import os
import re
from dataclasses import dataclass, field

import numpy as np

import mindspore as ms

from tav import checkpoint
from tav.checkpoint import CheckpointError, CheckpointNotFoundError


class LoraError(CheckpointError):
    """A LoRA file that does not fit the model or holds tensors tav cannot fuse."""


@dataclass
class LoraPair:
    """One low-rank update: `target` ("unet"/"text_encoder"), `module` (the key as the file names it, resolved to
    `param` later), down, up and alpha (None: alpha = rank)."""

    target: str
    module: str
    down: np.ndarray = None
    up: np.ndarray = None
    alpha: float = None
    kohya: bool = False
    param: str = None

    @property
    def rank(self):
        return int(self.down.shape[0])


@dataclass
class LoraReport:
    path: str
    scale: float
    format: str
    fused: list = field(default_factory=list)  # "unet:<param>" / "text_encoder:<param>"

    def describe(self):
        unet = sum(name.startswith("unet:") for name in self.fused)
        return (f"{os.path.basename(self.path)} ({self.format}, scale {self.scale:g}): {unet} UNet and "
                f"{len(self.fused) - unet} text-encoder weights fused")


def parse_lora_spec(spec):
    """`PATH[:SCALE]` -> (path, scale); the scale defaults to 1. A colon not followed by a number is part of the path."""
    path, sep, tail = str(spec).rpartition(":")
    if sep:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return str(spec), 1.0


# ---------------------------------------------------------------------------------------------------------------
# Reading the file: every key becomes (target, module, role) with role down / up / alpha

_DIFFUSERS_ROLES = (
    (r"\.lora_A\.weight$", "down"), (r"\.lora_B\.weight$", "up"),
    (r"\.lora\.down\.weight$", "down"), (r"\.lora\.up\.weight$", "up"),
    (r"\.lora_linear_layer\.down\.weight$", "down"), (r"\.lora_linear_layer\.up\.weight$", "up"),
    (r"\.alpha$", "alpha"),
)
_PROCESSOR = re.compile(r"^(.*?)(\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_TEXT_PROCESSOR = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_KOHYA = re.compile(r"^lora_(unet|te)_(.+?)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_KOHYA_ROLES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
_UNSUPPORTED = ("hada_", "lokr_", "lora_te1_", "lora_te2_", ".diff", "dora_scale", "lora_mid")


def _classify(key):
    """(target, module, role, format) of one tensor name, or None when no format explains it."""
    m = _KOHYA.match(key)
    if m:
        return ("unet" if m.group(1) == "unet" else "text_encoder"), m.group(2), _KOHYA_ROLES[m.group(3)], "kohya"
    m = _PROCESSOR.match(key)
    if m:
        block, proj, role = m.group(1), m.group(3), m.group(4)
        if block.startswith("text_encoder."):  # diffusers' old text-encoder patch: self_attn.to_q_lora = q_proj
            return "text_encoder", f"{block[len('text_encoder.'):]}.{_TEXT_PROCESSOR[proj]}", role, "diffusers-processor"
        module = f"{block}.{'to_out.0' if proj == 'to_out' else proj}"
        module = module[len("unet."):] if module.startswith("unet.") else module
        return "unet", module, role, "diffusers-processor"
    for pattern, role in _DIFFUSERS_ROLES:
        if re.search(pattern, key):
            module = re.sub(pattern, "", key)
            for prefix, target in (("unet.", "unet"), ("text_encoder.", "text_encoder")):
                if module.startswith(prefix):
                    return target, module[len(prefix):], role, "diffusers"
            return "unet", module, role, "diffusers"  # unprefixed diffusers UNet LoRA (older save_attn_procs)
    return None


def read_lora(path):
    """(list of LoraPair, format name) from a LoRA `.safetensors`. Unknown or unsupported tensors raise LoraError
    listing them."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"LoRA file {path!r} does not exist")
    if not path.endswith(".safetensors"):
        raise LoraError(f"LoRA {path!r}: only .safetensors LoRA files are read (pickled LoRA files can carry code)")
    tensors = checkpoint.read_state_dict(path)
    pairs, formats, unknown = {}, set(), []
    for key, value in tensors.items():
        found = None if any(marker in key for marker in _UNSUPPORTED) else _classify(key)
        if found is None:
            unknown.append(key)
            continue
        target, module, role, fmt = found
        formats.add(fmt)
        pair = pairs.setdefault((target, module), LoraPair(target, module, kohya=fmt == "kohya"))
        if role == "alpha":
            pair.alpha = float(np.asarray(value).reshape(-1)[0])
        else:
            setattr(pair, role, np.asarray(value, dtype=np.float32))
    if unknown:
        raise LoraError(f"LoRA {path!r}: {len(unknown)} tensors are in no supported format (diffusers/PEFT lora_A/"
                        f"lora_B, diffusers processor to_q_lora, kohya lora_unet_/lora_te_ lora_down/lora_up/alpha; "
                        f"LoCon/LoHa/LoKr and SDXL are not supported): {checkpoint._name_list(unknown)}")
    incomplete = [f"{p.target}:{p.module}" for p in pairs.values() if p.down is None or p.up is None]
    if incomplete:
        raise LoraError(f"LoRA {path!r}: modules without both a down and an up matrix: "
                        f"{checkpoint._name_list(incomplete)}")
    if not pairs:
        raise LoraError(f"LoRA {path!r} holds no tensors")
    return list(pairs.values()), "+".join(sorted(formats))


# ---------------------------------------------------------------------------------------------------------------
# Resolving names against the model


def weight_index(cell):
    """{module path: parameter name} of every weight a LoRA can target (2-D linear or 4-D conv weights)."""
    return {name[: -len(".weight")]: name for name, param in cell.parameters_and_names()
            if name.endswith(".weight") and len(param.shape) in (2, 4)}


def underscore_index(modules, what):
    """kohya's name for each module path (dots -> underscores), refusing collisions, which would be guesses."""
    index, clashes = {}, []
    for module in modules:
        flat = module.replace(".", "_")
        if flat in index and index[flat] != module:
            clashes.append(f"{flat} = {index[flat]} or {module}")
        index[flat] = module
    if clashes:
        raise LoraError(f"{what}: kohya names are ambiguous for {checkpoint._name_list(clashes)}")
    return index


def ldm_underscore_index(unet):
    """kohya names written with the LDM UNet's module paths (`lora_unet_input_blocks_1_1_...`, as LoRAs trained on
    the original code name them) -> the diffusers module path, through the single-file prefix table."""
    from tav.ldm_checkpoint import unet_prefix_table

    config = unet.config.to_dict() if hasattr(unet.config, "to_dict") else dict(unet.config)
    table = sorted(unet_prefix_table(config), key=lambda entry: -len(entry[1]))
    index = {}
    for module in weight_index(unet):
        for ldm, diffusers, inner in table:
            if module.startswith(diffusers + "."):
                rest = module[len(diffusers) + 1:]
                for old, new in inner.items():
                    if rest == new or rest.startswith(new + "."):
                        rest = old + rest[len(new):]
                        break
                index[f"{ldm}.{rest}".replace(".", "_")] = module
                break
    return index


def resolve_pairs(pairs, models, path):
    """Set each pair's `param` to the real parameter name in models[target]; unresolved names raise together."""
    indexes = {target: weight_index(cell) for target, cell in models.items() if cell is not None}
    kohya = {}
    if pairs and any(p.kohya and p.target == "unet" and re.match(r"(input_blocks|middle_block|output_blocks)_",
                                                                 p.module) for p in pairs) and "unet" in indexes:
        kohya["unet"] = {**underscore_index(indexes["unet"], f"unet of {path!r}"), **ldm_underscore_index(models["unet"])}
    missing = []
    for pair in pairs:
        if pair.target not in indexes:
            missing.append(f"{pair.target}:{pair.module} (no {pair.target} was given)")
            continue
        modules = indexes[pair.target]
        if pair.kohya:
            if pair.target not in kohya:
                kohya[pair.target] = underscore_index(modules, f"{pair.target} of {path!r}")
            module = kohya[pair.target].get(pair.module)
        else:
            module = pair.module if pair.module in modules else None
        if module is None:
            missing.append(f"{pair.target}:{pair.module}")
        else:
            pair.param = modules[module]
    if missing:
        raise LoraError(f"LoRA {path!r}: {len(missing)} modules are not in the model (is the LoRA for another base, "
                        f"e.g. SDXL or SD 2.x?): {checkpoint._name_list(missing)}")
    return pairs


# ---------------------------------------------------------------------------------------------------------------
# Sizes from the shapes (what a LoRA of a given rank costs, without building the model)


def lora_parameter_count(unet_config, rank, modules=("attn1.to_q", "attn2.to_q")):
    """Parameters of rank-`rank` LoRA pairs on `modules` of every transformer block of a UNet config (diffusers
    fields: block_out_channels, layers_per_block, down/up block types, cross_attention_dim). Modules are
    attn1/attn2/attn_temp . to_q/to_k/to_v/to_out.0: a (out, in) weight costs rank * (out + in)."""
    channels = list(unet_config["block_out_channels"])
    per = unet_config["layers_per_block"]
    blocks = []
    for b, kind in enumerate(unet_config["down_block_types"]):
        if "CrossAttn" in kind:
            blocks += [channels[b]] * per
    blocks.append(channels[-1])  # the mid block
    for b, kind in enumerate(unet_config["up_block_types"]):
        if "CrossAttn" in kind:
            blocks += [list(reversed(channels))[b]] * (per + 1)
    context = unet_config["cross_attention_dim"]
    total = 0
    for c in blocks:
        for module in modules:
            attention, projection = module.split(".", 1)
            fan_in = context if attention == "attn2" and projection in ("to_k", "to_v") else c
            total += rank * (c + fan_in)
    return total


# ---------------------------------------------------------------------------------------------------------------
# Fusing


def lora_delta(pair, shape, scale=1.0):
    """scale * (alpha / r) * up @ down, shaped like the weight (`shape`); conv LoRA flattens the kernel."""
    rank = pair.rank
    down = pair.down.reshape(rank, -1)
    up = pair.up.reshape(pair.up.shape[0], -1)
    if up.shape[1] != rank:
        raise LoraError(f"{pair.target}:{pair.module}: up {pair.up.shape} and down {pair.down.shape} disagree on "
                        f"the rank (a non-1x1 up convolution is not a LoRA tav can fuse)")
    delta = (up.astype(np.float64) @ down.astype(np.float64)) * (scale * (pair.alpha if pair.alpha is not None
                                                                          else rank) / rank)
    if delta.size != int(np.prod(shape)) or delta.shape[0] != shape[0]:
        raise LoraError(f"{pair.target}:{pair.module}: the LoRA gives a {delta.shape[0]}x{delta.shape[1]} update, the "
                        f"weight {pair.param} is {tuple(shape)}")
    return delta.reshape(shape)


def apply_lora(unet, text_encoder, path, scale=1.0):
    """Fuse one LoRA file into `unet` (tav's UNet3D, diffusers names) and `text_encoder` (mindone CLIPTextModel)
    in place; either may be None when the file has nothing for it. All names and shapes are checked before any
    weight changes. Returns a LoraReport."""
    pairs, fmt = read_lora(path)
    models = {"unet": unet, "text_encoder": text_encoder}
    resolve_pairs(pairs, models, path)
    params = {target: dict(cell.parameters_and_names()) for target, cell in models.items() if cell is not None}
    updates = []
    for pair in pairs:
        param = params[pair.target][pair.param]
        updates.append((param, lora_delta(pair, tuple(param.shape), scale)))
    report = LoraReport(path=os.fspath(path), scale=float(scale), format=fmt)
    for (param, delta), pair in zip(updates, pairs):
        weight = param.asnumpy()
        fused = (weight.astype(np.float64) + delta).astype(weight.dtype)
        param.set_data(ms.Tensor(fused, param.dtype))
        report.fused.append(f"{pair.target}:{pair.param}")
    return report


def apply_loras(unet, text_encoder, specs):
    """apply_lora for each `PATH[:SCALE]` string (or (path, scale) pair), in order; the reports."""
    reports = []
    for spec in specs or ():
        path, scale = parse_lora_spec(spec) if isinstance(spec, str) else spec
        reports.append(apply_lora(unet, text_encoder, path, scale))
    return reports
