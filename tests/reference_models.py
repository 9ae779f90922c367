"""Reference diffusers models with seeded random weights, and the inputs and tolerances the
UNet / VAE parity tests share."""

import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers import UNet2DConditionModel

from minidream.config import UNetConfig, VAEConfig
from minidream.io.diffusers_layout import (
    unet_config_to_diffusers,
    unet_from_diffusers,
    vae_config_to_diffusers,
    vae_from_diffusers,
)
from minidream.models.unet import UNet
from minidream.models.vae import AutoencoderKL

# runwayml/stable-diffusion-v1-5's unet/config.json and vae/config.json, as published (the VAE
# file predates the scaling_factor field; 0.18215 is diffusers' default for it).
SD15_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD15_VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# Parity tolerance: max |minidream - reference| <= REL_TOL * max |reference|.
REL_TOL = 1e-4


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def _perturb_vectors(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Norm weights start at exactly 1 and biases at 0, where a swapped or dropped tensor would
    go unnoticed: add seeded noise to every 1-D parameter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model


def seeded_diffusers_model(model_class, config: dict, seed: int) -> torch.nn.Module:
    """diffusers' model of this config with its own random initialisation, seeded."""
    torch.manual_seed(seed)
    return _perturb_vectors(model_class.from_config(config), seed).eval()


def unet_pair(cfg: UNetConfig, seed: int) -> tuple[UNet2DConditionModel, UNet]:
    """A random diffusers UNet and a minidream UNet sharing its weight storage (no copy of 3.4 GB)."""
    reference = seeded_diffusers_model(UNet2DConditionModel, unet_config_to_diffusers(cfg), seed)
    with torch.device("meta"):
        model = UNet(cfg)
    model.load_state_dict(unet_from_diffusers(reference.state_dict(), cfg), strict=True, assign=True)
    return reference, model.eval()


def vae_pair(cfg: VAEConfig, seed: int) -> tuple[DiffusersAutoencoderKL, AutoencoderKL]:
    """A random diffusers VAE and a minidream VAE sharing its weight storage."""
    reference = seeded_diffusers_model(DiffusersAutoencoderKL, vae_config_to_diffusers(cfg), seed)
    with torch.device("meta"):
        model = AutoencoderKL(cfg)
    model.load_state_dict(vae_from_diffusers(reference.state_dict(), cfg), strict=True, assign=True)
    return reference, model.eval()


def unet_inputs(cfg: UNetConfig, timesteps: list[float], height: int, width: int, seed: int):
    """Latents B x 4 x height x width, timesteps B, and a context whose rows after the 'prompt'
    nearly repeat, as CLIP's outputs at padding positions do."""
    generator = torch.Generator().manual_seed(seed)
    batch = len(timesteps)
    x = torch.randn(batch, cfg.in_channels, height, width, generator=generator)
    context = torch.randn(batch, 77, cfg.context_dim, generator=generator)
    context[:, 9:] = context[:, 8:9] + 0.05 * torch.randn(batch, 77 - 9, cfg.context_dim, generator=generator)
    return x, torch.tensor(timesteps), context


def images(batch: int, height: int, width: int, seed: int) -> torch.Tensor:
    """Smooth-ish images in [-1, 1]: upsampled noise, so the VAE sees structure, not just pixels."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, height // 4, width // 4, generator=generator) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)


class SavedTensorBytes(torch.autograd.graph.saved_tensors_hooks):
    """Counts the bytes autograd keeps for backward while the block runs (in `.total`)."""

    def __init__(self):
        self.total = 0
        super().__init__(self._count, lambda tensor: tensor)

    def __enter__(self) -> "SavedTensorBytes":
        super().__enter__()
        return self

    def _count(self, tensor: torch.Tensor) -> torch.Tensor:
        self.total += tensor.numel() * tensor.element_size()
        return tensor
