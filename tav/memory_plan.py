"""Will my clip fit? A prediction of a Tune-A-Video run's peak device memory, and the attention backend of each
kind of layer, before anything is loaded.

    plan = plan_memory("sd15", task="sample", frames=24, height=512, width=512, dtype="fp32", device="Ascend910B")
    plan.attention  -> {"attn1": "chunked", "attn2": "math", "attn_temp": "math"}
    plan.peak_gib, plan.fits, plan.breakdown_gib (weights, optimizer state, activations, attention workspace, runtime)

The attention backends come from the model's own dispatch (tav.kernels.resolve_backend, asked under
tav.backend.assume_device for the target device and chip), at the UNet's real shapes for each layer kind and
resolution, so the plan and the model cannot disagree. Memory is a model of what is alive at the peak, not a
measurement:

    weights          UNet (+ Tune-A-Video's temporal layers), VAE, text encoder; parameter counts from the config
                     (norm parameters fp32 always)
    optimizer state  train only: AdamW's two fp32 moments, fp32 masters in fp16 training, gradients
    activations      sample/invert: the skip features the up path waits for + the largest block's working set;
                     train: every block's saved tensors (gradient checkpointing: the block inputs + one block)
    attention        the score workspace of the backend chosen (math: the whole (B*H, Nq, Nk) scores and
                     probabilities; chunked: one block; flash/native: per-row statistics only), at the worst layer;
                     in training the probabilities autodiff keeps for math layers
    runtime          a fixed reserve: the device runtime's own workspace (Ascend/GPU), the MindSpore process (CPU)

The coefficients (tensors alive per position, TRANSFORMER_* / RESNET_*, and the reserves) are estimates checked
against measured peak RSS on the CPU (bench/plan_vs_measured.py; bench/README.md's `small` rows) and against the
published figures quoted in docs/ascend.md, which only bound them from above; the result is a prediction, labelled
as such everywhere. Not modelled: MindSpore's memory-pool fragmentation on a card, graph-compile workspace, and the
VAE's per-frame decode (small beside the UNet at SD sizes).
"""
import json
import math
import os
from dataclasses import dataclass, field

GIB = 1024 ** 3
BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}

# Named model shapes: the UNet configs of SD 1.5 and SD 2.1 (diffusers' unet/config.json fields), and the frozen
# parts' parameter counts (SD's AutoencoderKL: 83.65 M; CLIP ViT-L/14 text: 123.06 M; OpenCLIP ViT-H/14 text:
# 340.39 M).
MODEL_SHAPES = {
    "sd15": {"unet": {"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
                      "attention_head_dim": 8, "cross_attention_dim": 768, "upcast_attention": False,
                      "in_channels": 4, "out_channels": 4, "norm_num_groups": 32},
             "vae_params": 83_653_863, "text_params": 123_060_480, "text_length": 77},
    "sd21": {"unet": {"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
                      "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "upcast_attention": True,
                      "use_linear_projection": True, "in_channels": 4, "out_channels": 4, "norm_num_groups": 32},
             "vae_params": 83_653_863, "text_params": 340_387_840, "text_length": 77},
}

# Device memory (GiB) and the reserve its runtime keeps for itself. Ascend: 910B (Atlas A2) 64 GB HBM, 910A 32 GB;
# CANN's workspace and MindSpore's pool overhead ~2 GiB. GPU:<N>GB: CUDA context + cuDNN workspace ~1 GiB.
# CPU: the host's RAM; the reserve is the MindSpore process before any model (~0.75 GiB RSS measured here).
RUNTIME_RESERVE_GIB = {"Ascend": 2.0, "GPU": 1.0, "CPU": 0.75}
ASCEND_MEMORY_GIB = {"Ascend910B": 64.0, "Ascend910A": 32.0}

# Tensors (of the block's channel width, per position) alive at the peak of one transformer block's forward,
# and saved for its backward; the same for a resnet. Estimates (see the module docstring).
TRANSFORMER_WORKING = 14
TRANSFORMER_SAVED = 34
RESNET_WORKING = 5
RESNET_SAVED = 9
TRAINABLE_SUFFIXES = ("attn1.to_q", "attn2.to_q", "attn_temp")


class PlanError(ValueError):
    """A bad model name, task, device or size given to the planner."""


@dataclass
class Device:
    name: str
    target: str  # CPU / GPU / Ascend
    soc: object
    memory_gib: float


def parse_device(name):
    """"Ascend910B", "Ascend910A", "GPU:80GB" (any size), "CPU" (this host's RAM) -> Device."""
    text = str(name).strip()
    if text in ASCEND_MEMORY_GIB:
        return Device(text, "Ascend", text, ASCEND_MEMORY_GIB[text])
    if text.upper().startswith("GPU"):
        size = text[3:].lstrip(":").upper().replace("GIB", "").replace("GB", "")
        try:
            memory = float(size) if size else 80.0
        except ValueError:
            raise PlanError(f"device {name!r}: expected GPU:<size>GB, e.g. GPU:80GB") from None
        return Device(text, "GPU", None, memory)
    if text.upper() == "CPU":
        return Device("CPU", "CPU", None, host_memory_gib())
    raise PlanError(f"device must be Ascend910B, Ascend910A, GPU:<N>GB or CPU, got {name!r}")


def host_memory_gib():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    except (ValueError, OSError, AttributeError):
        return 16.0


def load_model_shape(model):
    """A named shape (sd15, sd21) or a diffusers folder (its unet/config.json; the frozen parts' sizes from their
    weight files' headers when present, else SD's), or a shape dict like MODEL_SHAPES' values (the bench)."""
    if isinstance(model, dict):
        return model
    if model in MODEL_SHAPES:
        return MODEL_SHAPES[model]
    unet_config = os.path.join(model, "unet", "config.json")
    if not os.path.isfile(unet_config):
        unet_config = os.path.join(model, "config.json")
    if not os.path.isfile(unet_config):
        raise PlanError(f"--model {model!r} is neither {', '.join(MODEL_SHAPES)} nor a folder with unet/config.json")
    with open(unet_config, encoding="utf-8") as handle:
        unet = json.load(handle)
    base = MODEL_SHAPES["sd21" if unet.get("cross_attention_dim", 768) == 1024 else "sd15"]
    shape = {"unet": unet, "vae_params": base["vae_params"], "text_params": base["text_params"],
             "text_length": 77}
    for part, key in (("vae", "vae_params"), ("text_encoder", "text_params")):
        count = _safetensors_parameter_count(os.path.join(model, part))
        if count:
            shape[key] = count
    return shape


def _safetensors_parameter_count(folder):
    if not os.path.isdir(folder):
        return 0
    total = 0
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            with open(os.path.join(folder, name), "rb") as handle:
                size = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(size))
            total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


# ---------------------------------------------------------------------------------------------------------------
# The UNet's shape: its blocks per level, parameter counts

def _heads(unet, level):
    heads = unet.get("num_attention_heads") or unet.get("attention_head_dim", 8)
    return heads[level] if isinstance(heads, (list, tuple)) else heads


def unet_levels(unet):
    """[(level, channels, heads, transformer blocks, resnets)] over the whole UNet (down, mid, up), plus totals."""
    channels = list(unet.get("block_out_channels", [320, 640, 1280, 1280]))
    layers = unet.get("layers_per_block", 2)
    levels = len(channels)
    down_attn = [i < levels - 1 for i in range(levels)]  # CrossAttnDown x3 + Down
    out = []
    for i, c in enumerate(channels):
        out.append(("down", i, c, _heads(unet, i), layers if down_attn[i] else 0, layers))
    out.append(("mid", levels - 1, channels[-1], _heads(unet, levels - 1), 1, 2))
    for j, c in enumerate(reversed(channels)):
        level = levels - 1 - j
        out.append(("up", level, c, _heads(unet, level), (layers + 1) if j > 0 else 0, layers + 1))
    return out


def unet_parameter_count(unet):
    """Parameters of tav's UNet3DConditionModel for this config (SD's 2-D UNet + attn_temp/norm_temp)."""
    channels = list(unet.get("block_out_channels", [320, 640, 1280, 1280]))
    layers = unet.get("layers_per_block", 2)
    cross = unet.get("cross_attention_dim", 768)
    c0, temb = channels[0], channels[0] * 4

    def resnet(cin, cout):
        return 2 * cin + cin * cout * 9 + cout + temb * cout + cout + 2 * cout + cout * cout * 9 + cout + (
            cin * cout + cout if cin != cout else 0)

    def transformer(c):
        block = (2 * c + 4 * c * c + c  # norm1, attn1
                 + 2 * c + 2 * c * c + 2 * cross * c + c  # norm2, attn2
                 + 2 * c + c * 8 * c + 8 * c + 4 * c * c + c  # norm3, GEGLU ff
                 + 4 * c * c + c + 2 * c)  # attn_temp, norm_temp
        return 2 * c + (c * c + c) * 2 + block

    total = unet.get("in_channels", 4) * c0 * 9 + c0 + (c0 * temb + temb) + (temb * temb + temb)
    previous = c0
    n = len(channels)
    for i, c in enumerate(channels):
        for j in range(layers):
            total += resnet(previous if j == 0 else c, c)
            if i < n - 1:
                total += transformer(c)
        if i < n - 1:
            total += c * c * 9 + c
        previous = c
    total += resnet(channels[-1], channels[-1]) * 2 + transformer(channels[-1])
    rev = list(reversed(channels))
    prev_out = rev[0]
    for i, c in enumerate(rev):
        skip_in = rev[min(i + 1, n - 1)]
        for j in range(layers + 1):
            res_skip = skip_in if j == layers else c
            res_in = prev_out if j == 0 else c
            total += resnet(res_in + res_skip, c)
            if i > 0:
                total += transformer(c)
        if i < n - 1:
            total += c * c * 9 + c
        prev_out = c
    total += 2 * c0 + c0 * unet.get("out_channels", 4) * 9 + unet.get("out_channels", 4)
    return total


def trainable_parameter_count(unet):
    """Tune-A-Video's default trainable set: attn1.to_q, attn2.to_q and attn_temp of every transformer block."""
    return sum(blocks * (6 * c * c + c) for _, _, c, _, blocks, _ in unet_levels(unet))


# ---------------------------------------------------------------------------------------------------------------
# The plan

@dataclass
class MemoryPlan:
    model: str
    task: str
    frames: int
    height: int
    width: int
    dtype: str
    gradient_checkpointing: bool
    device: str
    capacity_gib: float
    attention: dict
    breakdown_gib: dict = field(default_factory=dict)

    @property
    def peak_gib(self):
        return sum(self.breakdown_gib.values())

    @property
    def fits(self):
        return self.peak_gib <= self.capacity_gib

    def as_json(self):
        return {"peak_memory_gib": round(self.peak_gib, 2), "fits": self.fits, "attention": dict(self.attention),
                "capacity_gib": round(self.capacity_gib, 2),
                "breakdown_gib": {k: round(v, 3) for k, v in self.breakdown_gib.items()}, "prediction": True}

    def describe(self):
        lines = [f"{self.model} {self.task}: {self.frames} frames at {self.height}x{self.width}, {self.dtype}"
                 + (", gradient checkpointing" if self.gradient_checkpointing else "") + f", on {self.device}",
                 "attention backends (tav's own dispatch, at the worst resolution):"]
        lines += [f"  {kind:<10} {backend}" for kind, backend in self.attention.items()]
        lines.append("predicted peak memory (a model, not a measurement):")
        lines += [f"  {name:<20} {gib:8.2f} GiB" for name, gib in self.breakdown_gib.items()]
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(f"  {'total':<20} {self.peak_gib:8.2f} GiB of {self.capacity_gib:.1f} GiB: {verdict}")
        return "\n".join(lines)


TASKS = ("train", "sample", "invert")


def attention_backends(unet, device, batch, frames, latent_h, latent_w, dtype, text_length=77, attention="auto"):
    """{"attn1": .., "attn2": .., "attn_temp": ..} as the model's dispatch chooses them on `device` at the largest
    resolution that has attention (level 0), plus {(kind, level): backend} for every level."""
    import mindspore as ms

    from tav import backend
    from tav.kernels import resolve_backend

    ms_dtype = {"fp32": ms.float32, "fp16": ms.float16, "bf16": ms.bfloat16}[dtype]
    upcast = bool(unet.get("upcast_attention", False))
    per_level = {}
    with backend.assume_device(device.target, device.soc):
        for _, level, c, heads, blocks, _ in unet_levels(unet):
            if not blocks or ("attn1", level) in per_level:
                continue
            n = (latent_h >> level) * (latent_w >> level)
            bf = batch * frames
            shapes = {"attn1": ((bf, n, c), (bf, 2 * n, c)), "attn2": ((bf, n, c), (bf, text_length, c)),
                      "attn_temp": ((batch * n, frames, c), (batch * n, frames, c))}
            for kind, (q, k) in shapes.items():
                per_level[(kind, level)] = (resolve_backend(attention, ms_dtype, q, k, heads, upcast), q, k, heads,
                                            upcast)
    top = {kind: per_level[(kind, 0)][0] for kind in ("attn1", "attn2", "attn_temp")}
    return top, per_level


def _attention_workspace_bytes(choice, q, k, heads, upcast, dtype, device_target):
    from tav.kernels.attention_backends.chunked import score_budget

    backend_name = choice
    rows, nq, nk = q[0] * heads, q[1], k[1]
    score_bytes = 4 if (upcast or dtype == "fp32") else 2
    scores = rows * nq * nk
    if backend_name == "math":
        return 2 * scores * score_bytes
    if backend_name == "chunked":
        return 2 * min(scores, score_budget(device_target)) * score_bytes
    if backend_name == "flash":
        cast = 0 if dtype != "fp32" else 4 * q[0] * q[1] * q[2] * 2  # q, k, v, out cast to fp16
        return rows * nq * 8 * 4 * 2 + cast
    return rows * nq * 4 * 2  # native: row statistics


def plan_memory(model, task, frames, height, width, dtype="fp32", gradient_checkpointing=False, device="CPU",
                batch=1, guidance=True, attention="auto"):
    """The MemoryPlan of one run. task: train | sample | invert; sample runs the UNet at batch 2 (classifier-free
    guidance in one call) unless guidance=False; dtype: fp32 | fp16 (train fp16 = mixed precision: fp16 UNet,
    fp32 masters of the trainable tensors)."""
    if task not in TASKS:
        raise PlanError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if dtype not in BYTES:
        raise PlanError(f"dtype must be fp32, fp16 or bf16, got {dtype!r}")
    for name, value in (("frames", frames), ("height", height), ("width", width)):
        if not isinstance(value, int) or value < 1:
            raise PlanError(f"{name} must be a positive integer, got {value!r}")
    if height % 8 or width % 8:
        raise PlanError(f"height and width must be multiples of 8, got {height}x{width}")
    dev = parse_device(device) if isinstance(device, str) else device
    shape = load_model_shape(model)
    unet = shape["unet"]
    b = BYTES[dtype]
    unet_batch = batch * (2 if task == "sample" and guidance else 1)
    lh, lw = height // 8, width // 8
    top, per_level = attention_backends(unet, dev, unet_batch, frames, lh, lw, dtype, shape["text_length"], attention)

    params = unet_parameter_count(unet)
    frozen = shape["vae_params"] + shape["text_params"]
    weights = params * b + frozen * b
    breakdown = {"weights": weights}

    # Activations: positions per level, B*F*h*w.
    positions = lambda level: unet_batch * frames * (lh >> level) * (lw >> level)  # noqa: E731
    levels = unet_levels(unet)
    workspace = 0
    if task == "train":
        trainable = trainable_parameter_count(unet)
        masters = 4 * trainable if dtype != "fp32" else 0
        breakdown["optimizer state"] = trainable * (8 + 4) + masters  # two fp32 moments + fp32 gradients
        saved = 0
        largest_block = 0
        for _, level, c, heads, blocks, resnets in levels:
            p = positions(level)
            block_t = TRANSFORMER_SAVED * p * c * b
            block_r = RESNET_SAVED * p * c * b
            largest_block = max(largest_block, block_t if blocks else block_r)
            if gradient_checkpointing:
                saved += (blocks + resnets) * p * c * b
            else:
                saved += blocks * block_t + resnets * block_r
                if blocks:
                    for kind in ("attn1", "attn2", "attn_temp"):
                        choice, q, k, h, up = per_level[(kind, level)]
                        if choice == "math":  # autodiff keeps the probabilities for the backward
                            saved += blocks * q[0] * h * q[1] * k[1] * (4 if up or dtype == "fp32" else b)
        breakdown["activations"] = saved + (largest_block if gradient_checkpointing else 0)
    else:
        skips = sum(positions(level) * c * b * (resnets - (1 if kind == "up" else 0))
                    for kind, level, c, _, _, resnets in levels if kind == "down")
        working = max(positions(level) * c * b * (TRANSFORMER_WORKING if blocks else RESNET_WORKING)
                      for _, level, c, _, blocks, _ in levels)
        breakdown["activations"] = skips + working
    for (kind, level), (choice, q, k, h, up) in per_level.items():
        workspace = max(workspace, _attention_workspace_bytes(choice, q, k, h, up, dtype, dev.target))
    breakdown["attention workspace"] = workspace
    breakdown = {name: value / GIB for name, value in breakdown.items()}
    breakdown["runtime reserve"] = RUNTIME_RESERVE_GIB[dev.target]
    return MemoryPlan(model if isinstance(model, str) else "custom", task, frames, height, width, dtype, bool(gradient_checkpointing), dev.name,
                      dev.memory_gib, top, breakdown)


def frames_that_fit(model, task, height, width, dtype, device, gradient_checkpointing=False, limit=128, **kwargs):
    """The largest frame count (1..limit) predicted to fit, or 0."""
    best = 0
    for frames in range(1, limit + 1):
        if not plan_memory(model, task, frames, height, width, dtype, gradient_checkpointing, device, **kwargs).fits:
            break
        best = frames
    return best


def check_fits(model, task, frames, height, width, dtype, device_target, max_device_memory_gib=None,
               gradient_checkpointing=False, soc=None):
    """For the tools, before loading weights: raise PlanError naming the frame count that would fit when the run is
    predicted not to fit in `max_device_memory_gib` (default: the device's memory). Returns the plan."""
    target = device_target
    if target == "Ascend":
        dev = parse_device(soc if soc in ASCEND_MEMORY_GIB else "Ascend910B" if backend_has_flash(soc) else "Ascend910A")
    elif target == "GPU":
        dev = parse_device("GPU:80GB")
    else:
        dev = parse_device("CPU")
    if max_device_memory_gib is not None:
        dev = Device(dev.name, dev.target, dev.soc, float(max_device_memory_gib))
    plan = plan_memory(model, task, frames, height, width, dtype, gradient_checkpointing, dev)
    if not plan.fits:
        best = frames_that_fit(model, task, height, width, dtype, dev, gradient_checkpointing, limit=frames)
        raise PlanError(
            f"predicted peak {plan.peak_gib:.1f} GiB exceeds {dev.memory_gib:.1f} GiB on {dev.name} for {frames} "
            f"frames at {height}x{width} ({task}, {dtype}); "
            + (f"{best} frames would fit" if best else "not even 1 frame would fit at this size")
            + " (a prediction: python tools/plan.py shows the breakdown)")
    return plan


def backend_has_flash(soc):
    from tav import backend

    return soc is None or backend.soc_has_flash_attention(soc)


def parse_memory_gib(text):
    """"32GB", "30GiB", "64" -> GiB as a float (MindSpore's max_device_memory spelling)."""
    value = str(text).strip().upper().replace("GIB", "").replace("GB", "").replace("G", "")
    try:
        gib = float(value)
    except ValueError:
        raise PlanError(f"max_device_memory must be like 30GB, got {text!r}") from None
    if gib <= 0 or not math.isfinite(gib):
        raise PlanError(f"max_device_memory must be positive, got {text!r}")
    return gib


def check_run_fits(model_path, task, frames, height, width, dtype="fp32", max_device_memory=None,
                   gradient_checkpointing=False):
    """What tools/train.py and tools/sample.py call before loading weights: on the device tav is configured for
    (tav.backend; the Ascend chip from its SoC), refuse with PlanError, naming the frame count that would fit, a run
    predicted not to fit in `max_device_memory` ("30GB"; default the device's memory). On the CPU it checks only
    when max_device_memory is given (the host can swap). A model folder without unet/config.json is not checked."""
    from tav import backend

    target = backend.device_target()
    if target == "CPU" and max_device_memory is None:
        return None
    try:
        load_model_shape(model_path)
    except PlanError:
        return None
    budget = parse_memory_gib(max_device_memory) if max_device_memory is not None else None
    return check_fits(model_path, task, frames, height, width, dtype if dtype in BYTES else "fp32", target, budget,
                      gradient_checkpointing, soc=backend.ascend_soc())
