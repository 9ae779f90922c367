"""The Stable Diffusion VAE: LDM's AutoencoderKL (8x spatial compression to 4 latent channels).

Follows `ldm/models/autoencoder.py`, `ldm/modules/diffusionmodules/model.py` (Encoder, Decoder)
and `ldm/modules/distributions/distributions.py` of the CompVis code. Module names are the
checkpoint's: the state dict of `AutoencoderKL(VAEConfig())` is an SD 1.x file's
`first_stage_model.*` with that prefix stripped. The latent scale (0.18215) is applied by
the caller, not here.
"""

import torch
import torch.nn.functional as F
from torch import nn

from minidream.config import VAEConfig
from minidream.models.layers import (
    GroupNorm32,
    Upsample,
    maybe_recompute,
    multihead_attention,
)


class DiagonalGaussian:
    """q(z | x) = N(mean, exp(logvar)) per latent element, from the encoder's 2 * latent channels."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)  # B x 2C x h x w -> two B x C x h x w
        self.logvar = logvar.clamp(-30.0, 20.0)  # keeps exp() finite, as LDM does

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * noise, the noise drawn on the generator's device (a CPU generator gives
        the same draw whatever device the latents are on)."""
        device = self.mean.device if generator is None else generator.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over channels and positions: B."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar, dim=[1, 2, 3])


class ResnetBlock(nn.Module):
    """Two GroupNorm-SiLU-3x3 conv steps, plus a skip (a 1x1 `nin_shortcut` where the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, cfg: VAEConfig):
        super().__init__()
        self.norm1 = GroupNorm32(cfg.norm_groups, in_channels, eps=cfg.norm_eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = GroupNorm32(cfg.norm_groups, out_channels, eps=cfg.norm_eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions; q, k, v, proj_out are 1x1 convs."""

    def __init__(self, channels: int, cfg: VAEConfig):
        super().__init__()
        self.norm = GroupNorm32(cfg.norm_groups, channels, eps=cfg.norm_eps)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        normed = self.norm(x)
        # B x C x H x W -> B x HW x C for each projection; one head as wide as the channels.
        # Contiguous, because SDPA's fused kernels need a unit stride on the channel dim; a
        # transposed view falls back to the math path and materialises the HW x HW matrix.
        q, k, v = (proj(normed).flatten(2).transpose(1, 2).contiguous() for proj in (self.q, self.k, self.v))
        out = multihead_attention(q, k, v, heads=1)
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding only right and bottom by one (LDM's asymmetric padding)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


def resnet_stack(in_channels: int, out_channels: int, count: int, cfg: VAEConfig) -> nn.ModuleList:
    """`count` ResnetBlocks, the first changing the width."""
    return nn.ModuleList(
        ResnetBlock(in_channels if i == 0 else out_channels, out_channels, cfg) for i in range(count)
    )


class EncoderLevel(nn.Module):
    """`encoder.down.N`: ResnetBlocks at one resolution, then a Downsample unless it is the last level."""

    def __init__(self, in_channels: int, out_channels: int, cfg: VAEConfig, downsample: bool):
        super().__init__()
        self.block = resnet_stack(in_channels, out_channels, cfg.num_res_blocks, cfg)
        self.downsample = Downsample(out_channels) if downsample else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return self.downsample(x)


class DecoderLevel(nn.Module):
    """`decoder.up.N`: one more ResnetBlock than the encoder's level, then an Upsample unless N is 0."""

    def __init__(self, in_channels: int, out_channels: int, cfg: VAEConfig, upsample: bool):
        super().__init__()
        self.block = resnet_stack(in_channels, out_channels, cfg.num_res_blocks + 1, cfg)
        self.upsample = Upsample(out_channels) if upsample else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return self.upsample(x)


class MidBlock(nn.Module):
    """ResnetBlock, self-attention, ResnetBlock at the lowest resolution."""

    def __init__(self, channels: int, cfg: VAEConfig):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, cfg)
        self.attn_1 = AttnBlock(channels, cfg)
        self.block_2 = ResnetBlock(channels, channels, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image B x 3 x H x W -> moments B x 2*latent x H/8 x W/8 (before quant_conv)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.gradient_checkpointing = False
        widths = [cfg.channels * mult for mult in cfg.channel_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.channels, 3, padding=1)
        in_widths = [cfg.channels] + widths[:-1]
        self.down = nn.ModuleList(
            EncoderLevel(in_widths[i], widths[i], cfg, downsample=i != len(widths) - 1) for i in range(len(widths))
        )
        self.mid = MidBlock(widths[-1], cfg)
        self.norm_out = GroupNorm32(cfg.norm_groups, widths[-1], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in (*self.down, self.mid):
            h = maybe_recompute(self.gradient_checkpointing, stage, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent B x latent x h x w (after post_quant_conv) -> image B x 3 x 8h x 8w."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.gradient_checkpointing = False
        widths = [cfg.channels * mult for mult in cfg.channel_mult]
        self.conv_in = nn.Conv2d(cfg.latent_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1], cfg)
        # `up` is indexed by level, as in LDM, but runs deepest first: up.N takes up.(N+1)'s output.
        in_widths = widths[1:] + widths[-1:]
        self.up = nn.ModuleList(
            DecoderLevel(in_widths[i], widths[i], cfg, upsample=i != 0) for i in range(len(widths))
        )
        self.norm_out = GroupNorm32(cfg.norm_groups, widths[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(widths[0], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for stage in (self.mid, *reversed(self.up)):
            h = maybe_recompute(self.gradient_checkpointing, stage, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """encode(img in [-1, 1]) -> DiagonalGaussian over latents; decode(latents) -> img in about [-1, 1].

    Set `gradient_checkpointing = True` to recompute each level's activations during backward.
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    @property
    def gradient_checkpointing(self) -> bool:
        return self.encoder.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        self.encoder.gradient_checkpointing = enabled
        self.decoder.gradient_checkpointing = enabled

    def encode(self, img: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.quant_conv(self.encoder(img)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))
