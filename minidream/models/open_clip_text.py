"""OpenCLIP's ViT-H/14 text tower, the text encoder of Stable Diffusion 2.x, as its single files name it.

SD 2.x (Rombach et al. 2022, v2 release) swapped SD 1.x's OpenAI CLIP ViT-L/14 for OpenCLIP
ViT-H/14 (Cherti et al. 2023) trained on LAION-2B: the same pre-norm causal transformer with
exact GELU, 1024 wide, 24 layers, 16 heads. LDM's `FrozenOpenCLIPEmbedder(layer="penultimate")`
stops after layer 23 of 24 and applies `ln_final`. Module names equal the keys under
`cond_stage_model.model.` so loading is a prefix strip and a strict load; the layers' math is
models/clip.py's (attention via models/layers.py, the MLP via `clip.mlp`). A transformers
`CLIPTextModel` with 23 layers (diffusers folders of SD 2.x) computes the same states;
io/open_clip_layout.py maps the names between the two.
"""

import torch
import torch.nn.functional as F
from torch import nn

from minidream.config import TextEncoderConfig
from minidream.models.clip import check_clip_skip, mlp
from minidream.models.layers import multihead_attention


class OpenCLIPAttention(nn.Module):
    """torch's nn.MultiheadAttention names: q, k and v fused in `in_proj_weight` (3*width x width)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.heads = cfg.heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * cfg.width, cfg.width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * cfg.width))
        self.out_proj = nn.Linear(cfg.width, cfg.width)
        nn.init.xavier_uniform_(self.in_proj_weight)  # nn.MultiheadAttention's init
        nn.init.zeros_(self.in_proj_bias)

    def in_projection(self, x: torch.Tensor) -> torch.Tensor:
        """B x N x width -> B x N x 3*width: q, k and v side by side (models/lora.py adds adapters here)."""
        return F.linear(x, self.in_proj_weight, self.in_proj_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.in_projection(x).chunk(3, dim=-1)  # B x N x width each
        # Causal, as SD 2.x's tower: OpenCLIP builds a -inf upper triangle as its attn_mask.
        return self.out_proj(multihead_attention(q, k, v, self.heads, causal=True))


class OpenCLIPMLP(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.activation = cfg.activation
        self.c_fc = nn.Linear(cfg.width, cfg.mlp_width)
        self.c_proj = nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mlp(self.c_fc, self.c_proj, self.activation, x)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm layer, as CLIPEncoderLayer: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = OpenCLIPAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = OpenCLIPMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """`transformer.resblocks.N`; OpenCLIPTextModel runs them, so that it can stop early."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(cfg) for _ in range(cfg.layers))


class OpenCLIPTextModel(nn.Module):
    """`text_encoder(input_ids) -> last_hidden_state`: B x N ids -> B x N x width (N <= context_length),
    the interface of models/clip.py's CLIPTextModel; `encode` adds the pooled projection (SDXL).

    `text_projection` (width x width, used as `x @ text_projection`) and `logit_scale` are in
    every SD 2.x and SDXL file. SD 2.x never uses them (they map the pooled state into CLIP's
    joint image-text space), SDXL uses the projection for its pooled vector. They are buffers, so
    a file loads strictly and is written back bit for bit, and training never changes them.
    """

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.config = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        nn.init.normal_(self.positional_embedding, std=0.01)  # OpenCLIP's init
        self.transformer = Transformer(cfg)
        self.ln_final = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.register_buffer("text_projection", torch.eye(cfg.width))
        self.register_buffer("logit_scale", torch.tensor(2.6592))  # log(1 / 0.07), CLIP's initial temperature

    def forward(self, input_ids: torch.Tensor, clip_skip: int | None = None, pooled: bool = False):
        """The conditioning states; clip_skip (default: the config's) 1 = the penultimate layer, SD 2.x's
        and SDXL's, after `ln_final` in SD 2.x and without it in SDXL (config.final_norm).
        pooled=True: (states, pooled), see `encode` (a keyword of forward so that DDP and FSDP,
        which hook forward, see the call when SDXL trains this encoder)."""
        states, projected = self._run(input_ids, clip_skip, pooled)
        return (states, projected) if pooled else states

    def encode(self, input_ids: torch.Tensor, clip_skip: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditioning states, pooled B x width): the pooled vector runs every layer, then
        `ln_final`, takes each prompt's EOS state (the largest id, open_clip's argmax) and
        projects it: SDXL's `FrozenOpenCLIPEmbedder2(always_return_pooled=True)`."""
        return self(input_ids, clip_skip, pooled=True)

    def _run(self, input_ids: torch.Tensor, clip_skip: int | None, pooled: bool):
        clip_skip = self.config.clip_skip if clip_skip is None else clip_skip
        layers = self.transformer.resblocks
        check_clip_skip(clip_skip, len(layers) - 1)
        x = self.token_embedding(input_ids) + self.positional_embedding[: input_ids.shape[1]]
        # SD 2.x's "penultimate": the last resblock never runs; clip_skip=k stops k-1 more early.
        stop = len(layers) - clip_skip
        for layer in layers[:stop]:
            x = layer(x)
        states = self.ln_final(x) if self.config.final_norm else x
        if not pooled:
            return states, None
        for layer in layers[stop:]:
            x = layer(x)
        eos = self.ln_final(x)[torch.arange(x.shape[0], device=x.device), input_ids.argmax(dim=-1)]
        return states, eos @ self.text_projection
