"""The Stable Diffusion UNet: LDM's `UNetModel` with cross-attention to the text encoding.

Follows `ldm/modules/diffusionmodules/openaimodel.py` and `ldm/modules/attention.py` of the
CompVis latent-diffusion / stable-diffusion code (Rombach et al. 2022), and sgm's copy of them
for SDXL (Podell et al. 2023: deeper transformers per level, and `label_emb` for the vector
conditioning y). Module names are the checkpoint's: the state dict of `UNet(UNetConfig())` is
an SD 1.x file's `model.diffusion_model.*` with that prefix stripped.
"""

import torch
import torch.nn.functional as F
from torch import nn

from minidream.config import UNetConfig
from minidream.models.layers import (
    GroupNorm32,
    Upsample,
    maybe_recompute,
    multihead_attention,
    timestep_embedding,
)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm with fp32 statistics whatever the dtypes, returning the input's dtype (as GroupNorm32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype:
            return super().forward(x)
        return F.layer_norm(
            x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps
        ).to(x.dtype)


class ResBlock(nn.Module):
    """Two 3x3 convs with the timestep embedding added between them, plus a skip connection."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, cfg: UNetConfig):
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(cfg.norm_groups, in_channels, eps=cfg.norm_eps),
            nn.SiLU(),
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(cfg.norm_groups, out_channels, eps=cfg.norm_eps),
            nn.SiLU(),
            nn.Identity(),  # LDM's dropout (p=0 in SD); holds the slot so the conv is `out_layers.3`
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        # A 1x1 conv only where the width changes; the identity has no weights in the checkpoint.
        self.skip_connection = (
            nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]  # B x C -> B x C x 1 x 1, one shift per channel
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """Multi-head attention from x (B x N x dim) to context (B x M x context_dim); self-attention if no context."""

    def __init__(self, dim: int, context_dim: int, heads: int, head_dim: int, upcast: bool = False):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.upcast = upcast  # UNetConfig.upcast_attention
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim))  # LDM's Sequential(Linear, Dropout): `to_out.0`

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        out = multihead_attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads, upcast=self.upcast)
        return self.to_out(out)


class GEGLU(nn.Module):
    """Linear to twice the width; one half gated by GELU of the other (Shazeer 2020, "GLU variants")."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU to 4x the width and back."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # LDM's Sequential(GEGLU, Dropout, Linear): the checkpoint says `net.0.proj` and `net.2`.
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the context, and feed-forward, each residual."""

    def __init__(self, dim: int, context_dim: int, heads: int, head_dim: int, upcast: bool = False):
        super().__init__()
        self.norm1 = LayerNorm32(dim)
        self.attn1 = CrossAttention(dim, dim, heads, head_dim, upcast)
        self.norm2 = LayerNorm32(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, head_dim, upcast)
        self.norm3 = LayerNorm32(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


def attention_heads(channels: int, cfg: UNetConfig) -> tuple[int, int]:
    """(number of heads, head size) at this width: SD 1.x fixes the head count, SD 2.x the head size."""
    if cfg.head_dim is None:
        return cfg.num_heads, channels // cfg.num_heads
    return channels // cfg.head_dim, cfg.head_dim


class SpatialTransformer(nn.Module):
    """Transformer blocks over the H*W positions of a feature map, as a residual around them."""

    def __init__(self, channels: int, cfg: UNetConfig, depth: int):
        super().__init__()
        heads, head_dim = attention_heads(channels, cfg)
        if heads * head_dim != channels:
            raise ValueError(f"{channels} channels do not split into {heads} heads of size {head_dim}")
        # LDM's Normalize(): eps 1e-6 here, unlike the ResBlocks' norm_eps (1e-5).
        self.norm = GroupNorm32(cfg.norm_groups, channels, eps=1e-6)
        # SD 1.x projects with 1x1 convs on B x C x H x W, SD 2.x with linears on B x HW x C.
        self.use_linear_proj = cfg.use_linear_proj
        self.proj_in = nn.Linear(channels, channels) if cfg.use_linear_proj else nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, cfg.context_dim, heads, head_dim, cfg.upcast_attention)
            for _ in range(depth)
        )
        self.proj_out = nn.Linear(channels, channels) if cfg.use_linear_proj else nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x)
        if not self.use_linear_proj:
            tokens = self.proj_in(tokens)
        tokens = tokens.flatten(2).transpose(1, 2)  # B x C x H x W -> B x HW x C
        if self.use_linear_proj:
            tokens = self.proj_in(tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        if self.use_linear_proj:
            tokens = self.proj_out(tokens)
        tokens = tokens.transpose(1, 2).reshape(b, c, h, w)  # B x HW x C -> B x C x H x W
        if not self.use_linear_proj:
            tokens = self.proj_out(tokens)
        return x + tokens


class Downsample(nn.Module):
    """Stride-2 3x3 conv, padded by 1 on every side (the VAE pads asymmetrically instead)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class TimestepEmbedSequential(nn.ModuleList):
    """One entry of input_blocks / middle_block / output_blocks: its layers in order, each given
    what it consumes — ResBlocks the timestep embedding, transformers the context."""

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, upsample_size: torch.Size | None = None
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, upsample_size)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    """eps = unet(x, t, context, y): the noise in latents x (B x 4 x h x w) at timesteps t, given the
    text encoding context (B x 77 x context_dim) and, for SDXL, the vector conditioning y
    (B x adm_in_channels, see `size_conditioning`; SD 1.x and 2.x take none).

    Set `gradient_checkpointing = True` to recompute each block's activations during backward.
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        self.gradient_checkpointing = False
        base = cfg.model_channels
        emb_channels = 4 * base
        self.time_embed = nn.Sequential(nn.Linear(base, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels))
        if cfg.adm_in_channels is not None:
            # sgm's num_classes="sequential": an MLP from y into the timestep embedding, `label_emb.0.{0,2}`.
            self.label_emb = nn.Sequential(nn.Sequential(
                nn.Linear(cfg.adm_in_channels, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels)
            ))

        def level_layers(level: int, in_channels: int, out_channels: int) -> list[nn.Module]:
            layers = [ResBlock(in_channels, out_channels, emb_channels, cfg)]
            if level in cfg.attention_levels:
                layers.append(SpatialTransformer(out_channels, cfg, cfg.depth(level)))
            return layers

        # Encoder half: every block's output is kept for the decoder half (skip_channels tracks widths).
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential([nn.Conv2d(cfg.in_channels, base, 3, padding=1)])])
        skip_channels = [base]
        channels = base
        last_level = len(cfg.channel_mult) - 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.input_blocks.append(TimestepEmbedSequential(level_layers(level, channels, mult * base)))
                channels = mult * base
                skip_channels.append(channels)
            if level != last_level:
                self.input_blocks.append(TimestepEmbedSequential([Downsample(channels)]))
                skip_channels.append(channels)

        self.middle_block = TimestepEmbedSequential([
            ResBlock(channels, channels, emb_channels, cfg),
            SpatialTransformer(channels, cfg, cfg.depth(None)),
            ResBlock(channels, channels, emb_channels, cfg),
        ])

        # Decoder half, deepest level first: each block takes one skip, concatenated on channels;
        # the last block of every level but the top one ends with an Upsample.
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = level_layers(level, channels + skip_channels.pop(), mult * base)
                channels = mult * base
                if level != 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(channels))
                self.output_blocks.append(TimestepEmbedSequential(layers))

        self.out = nn.Sequential(
            GroupNorm32(cfg.norm_groups, channels, eps=cfg.norm_eps),
            nn.SiLU(),
            nn.Conv2d(channels, cfg.out_channels, 3, padding=1),
        )

    def forward(
        self, x: torch.Tensor, t: torch.Tensor | int | float, context: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        if (y is None) != (self.config.adm_in_channels is None):
            wants = "needs the vector conditioning y (SDXL)" if y is None else "takes no y (only SDXL does)"
            raise ValueError(f"this UNet {wants}")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])  # one timestep for the whole batch
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(x.dtype))
        if y is not None:
            emb = emb + self.label_emb(y.to(x.dtype))

        skips = []
        h = x
        for block in self.input_blocks:
            h = maybe_recompute(self.gradient_checkpointing, block, h, emb, context)
            skips.append(h)
        h = maybe_recompute(self.gradient_checkpointing, self.middle_block, h, emb, context)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            # A side that was odd on the way down was rounded up by the stride-2 conv: upsample to
            # the next skip's size, as diffusers does, so any latent size works.
            upsample_size = skips[-1].shape[-2:] if skips else None
            h = maybe_recompute(self.gradient_checkpointing, block, h, emb, context, upsample_size)
        return self.out(h)


def size_conditioning(pooled: torch.Tensor, size_ids: torch.Tensor, embed_dim: int) -> torch.Tensor:
    """SDXL's y: the pooled text embedding (B x P), then each of the six size-and-crop ids
    (B x 6: original height, width, crop top, left, target height, width; Podell et al. 2023,
    sec. 2.2) as `embed_dim` Fourier features (cos first, as sgm's ConcatTimestepEmbedderND)."""
    features = timestep_embedding(size_ids.flatten(), embed_dim).reshape(size_ids.shape[0], -1)
    return torch.cat([pooled, features.to(pooled.dtype)], dim=1)
