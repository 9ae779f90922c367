"""Building blocks shared by the text encoder, the UNet and the VAE."""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import (
    checkpoint as recompute_in_backward,  # "checkpoint" in minidream is the training state
)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with fp32 statistics whatever the dtypes, returning the input's dtype.

    LDM upcasts every norm input because half-precision variance over large groups is too
    coarse. torch's kernels already accumulate half inputs in fp32, so when input and weights
    share a dtype the plain call is as exact and saves two passes over the activation. Mixed
    dtypes (half activations, fp32 weights under autocast) are computed in fp32 and cast back.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype:
            return super().forward(x)
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


HALF = (torch.float16, torch.bfloat16)


def multihead_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, causal: bool = False, upcast: bool = False
) -> torch.Tensor:
    """Scaled dot-product attention over B x N x (heads * d) projections.

    Splits heads to B x heads x N x d for `F.scaled_dot_product_attention` (flash / memory-
    efficient kernels where available) and merges them back to B x N x (heads * d).
    upcast (SD 2.1's upcast_attention): half q and k go through `attention_scores_fp32` instead.
    """
    b, n, inner = q.shape
    d = inner // heads
    q, k, v = (x.reshape(b, -1, heads, d).transpose(1, 2) for x in (q, k, v))
    if upcast and q.dtype in HALF:
        out = attention_scores_fp32(q, k, v, causal)
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return out.transpose(1, 2).reshape(b, n, inner)


def attention_scores_fp32(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v with q k^T and the softmax in fp32, the probabilities rounded to v's
    dtype for the product with v: diffusers' `Attention.get_attention_scores` with upcast_attention
    (SD 2.1's 768-v UNet overflows fp16 scores). Autocast is off inside, or it would round the
    fp32 product back to half."""
    b, heads, n, d = q.shape
    q, k, v = (x.reshape(b * heads, -1, d) for x in (q, k, v))  # diffusers' batched products: the same kernels
    with torch.autocast(q.device.type, enabled=False):
        unset = torch.empty(b * heads, n, k.shape[1], dtype=torch.float32, device=q.device)  # beta=0: never read
        scores = torch.baddbmm(unset, q.float(), k.float().transpose(1, 2), beta=0, alpha=d**-0.5)
        if causal:
            scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
        return torch.bmm(scores.softmax(dim=-1).to(v.dtype), v).reshape(b, heads, n, d)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, B -> B x dim.

    LDM's convention: frequencies exp(-ln(max_period) * i / half) for i < half, and the
    cosines come before the sines (diffusers: flip_sin_to_cos=True, freq_shift=0).
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    args = timesteps.float()[:, None] * torch.exp(exponent)[None, :]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv (the UNet's and the VAE decoder's `upsample.conv`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: torch.Size | None = None) -> torch.Tensor:
        """size: the UNet's skip connection's, when an odd side was rounded up on the way down
        (diffusers' upsample_size); the upsampled map then takes that size instead of twice its own."""
        if size is None or tuple(size) == (2 * x.shape[-2], 2 * x.shape[-1]):
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))


def maybe_recompute(enabled: bool, block: nn.Module, *inputs: torch.Tensor | None) -> torch.Tensor:
    """block(*inputs), recomputing its activations during backward instead of storing them when enabled.

    Non-reentrant checkpointing replays the same ops, so it trades compute for memory and
    never changes the numbers. Without autograd there is nothing to save, so it is skipped.
    """
    if enabled and torch.is_grad_enabled():
        return recompute_in_backward(block, *inputs, use_reentrant=False)
    return block(*inputs)
