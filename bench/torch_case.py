"""One PyTorch case: diffusers' UNet2DConditionModel with the 2-D version of the bench config, frames folded into
the batch ((B F), 4, h, w), the text repeated per frame. A fair, slightly cheaper stand-in for the official 3-D
model: it has no temporal attention (attn_temp) and its attn1 is plain per-frame self-attention over d keys
where the official sparse-causal attn1 sees 2d.

sample  eager forward under torch.inference_mode on the classifier-free-guidance batch (2B videos).
train   noise the latents, forward, MSE, backward, torch.optim.AdamW over to_q of attn1 and attn2 (diffusers
        has no attn_temp, so the trainable set is smaller than tav's).
attn1   diffusers' Attention (SDPA processor) on one frame's d tokens per (b f) item: the per-frame attention
        the sparse-causal attn1 replaces.
Attention: "sdpa" (diffusers' default AttnProcessor2_0, torch's fused CPU kernel) or "math" (AttnProcessor:
baddbmm + softmax + bmm, the same arithmetic as tav's math backend).
"""
import numpy as np

from bench.configs import TEXT_TOKENS
from bench.measure import measure_case

TORCH_TRAINABLE = ("attn1.to_q", "attn2.to_q")


def configure(case):
    import torch

    torch.set_num_threads(case["threads"])
    torch.manual_seed(0)
    return {"torch_threads": torch.get_num_threads(), "torch": torch.__version__}


def build_unet(case, config):
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unet = UNet2DConditionModel(**config.unet)
    if case.get("weights"):
        from safetensors.torch import load_file

        state = {k: v for k, v in load_file(case["weights"]).items() if "_temp." not in k}
        unet.load_state_dict(state, strict=True)
    unet.set_attn_processor(AttnProcessor() if case["attention"] == "math" else AttnProcessor2_0())
    return unet.to(torch.float32)


def folded_inputs(config, batch, seed=0):
    import torch

    rng = np.random.default_rng(seed)
    frames = config.frames
    sample = torch.from_numpy(rng.standard_normal((batch * frames, 4, config.latent, config.latent), dtype=np.float32))
    context = torch.from_numpy(rng.standard_normal((batch, TEXT_TOKENS, config.cross_attention_dim), dtype=np.float32))
    return sample, context.repeat_interleave(frames, dim=0)


def sample_step(case, config):
    import torch

    unet = build_unet(case, config).eval()
    batch = 2 * config.batch
    sample, context = folded_inputs(config, batch)
    timestep = torch.full((sample.shape[0],), 500, dtype=torch.int64)

    def step():
        with torch.inference_mode():
            return unet(sample, timestep, context).sample

    return step, {}


def train_step(case, config):
    import torch

    unet = build_unet(case, config).train()
    trainable = []
    for name, param in unet.named_parameters():
        param.requires_grad_(any(f"{suffix}." in name for suffix in TORCH_TRAINABLE))
        if param.requires_grad:
            trainable.append(param)
    optimizer = torch.optim.AdamW(trainable, lr=3e-5, weight_decay=1e-2)
    latents, context = folded_inputs(config, config.batch)
    noise = torch.randn_like(latents)
    alphas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - alphas, 0).to(torch.float32)
    timestep = torch.randint(0, 1000, (config.batch,)).repeat_interleave(config.frames)
    a = alphas_cumprod[timestep].reshape(-1, 1, 1, 1)

    def step():
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        loss = torch.nn.functional.mse_loss(unet(noisy, timestep, context).sample.float(), noise.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        return loss.item()

    info = {"trainable_tensors": len(trainable), "trainable_params": int(sum(p.numel() for p in trainable)),
            "train_impl": "diffusers UNet2DConditionModel + torch.optim.AdamW (to_q of attn1/attn2; no attn_temp)"}
    return step, info


def attn1_step(case, config):
    import torch
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    heads = config.unet["attention_head_dim"]
    heads = heads[0] if isinstance(heads, (list, tuple)) else heads
    channels = config.unet["block_out_channels"][0]
    layer = Attention(channels, heads=heads, dim_head=channels // heads,
                      processor=AttnProcessor() if case["attention"] == "math" else AttnProcessor2_0()).eval()
    tokens = torch.from_numpy(np.random.default_rng(0).standard_normal(
        (2 * config.batch * config.frames, config.latent * config.latent, channels), dtype=np.float32))

    def step():
        with torch.inference_mode():
            return layer(tokens)

    return step, {}


STEPS = {"sample": sample_step, "train": train_step, "attn1": attn1_step}


def run(case, config):
    import diffusers

    versions = dict(configure(case), diffusers=diffusers.__version__)
    return measure_case(versions, STEPS, case, config)
