"""Tiny 2-D Stable Diffusion UNets written by diffusers (the PyTorch original) for parity and loading tests."""
import numpy as np

from tests.helpers import import_parity_extra

# Two shapes: SD 1.x style (conv projections, one head count) and SD 2.x style (linear projections, a head
# count per block, upcast attention), both small enough for CPU.
TINY_UNET2D_CONFIGS = {
    "sd1": dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2,
                cross_attention_dim=16, norm_num_groups=8),
    "sd2": dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32, 32), layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                attention_head_dim=(2, 4, 4), cross_attention_dim=24, norm_num_groups=8,
                use_linear_projection=True, upcast_attention=True),
}


def write_diffusers_unet2d(folder, kind="sd1", seed=0, safe_serialization=True):
    """Save a random diffusers UNet2DConditionModel; every tensor non-trivial so wrong wiring shows up."""
    torch, diffusers = import_parity_extra()
    torch.manual_seed(seed)
    model = diffusers.UNet2DConditionModel(**TINY_UNET2D_CONFIGS[kind])
    with torch.no_grad():
        for name, param in model.named_parameters():
            if torch.count_nonzero(param) == 0:  # zero-initialised outputs would hide wiring bugs
                fan_in = param[0].numel() if param.dim() > 1 else param.numel()
                param.copy_(torch.randn_like(param) / np.sqrt(fan_in))
    model.save_pretrained(folder, safe_serialization=safe_serialization)
    return model.eval()
