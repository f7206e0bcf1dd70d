"""tav's models: the inflated 3-D UNet and the Stable Diffusion VAE."""
from tav.models.unet3d import UNet3DConditionModel, UNet3DConfig
from tav.models.vae import AutoencoderKL
