"""Reference diffusers configs and models with seeded random weights, and the inputs and
tolerances the UNet / VAE parity tests share. The minidream/diffusers twins come from
bench.models (one builder for the benchmarks and the tests)."""

import torch

from bench.models import perturb_vectors
from minidream.config import UNetConfig

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


def seeded_diffusers_model(model_class, config: dict, seed: int) -> torch.nn.Module:
    """diffusers' model of this config with its own random initialisation, seeded (for the tests
    that need a diffusers model alone; twins come from bench.models)."""
    torch.manual_seed(seed)
    return perturb_vectors(model_class.from_config(config), seed).eval()


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
