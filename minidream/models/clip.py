"""The CLIP text transformer that turns prompt ids into Stable Diffusion's cross-attention context.

SD 1.x uses OpenAI CLIP ViT-L/14's text tower (Radford et al. 2021): token + learned position
embeddings, pre-norm transformer layers with a causal mask, a final layer norm. Module names
follow the SD checkpoint keys under `cond_stage_model.transformer.` (which are also
transformers' `CLIPTextModel` names), so loading is a prefix strip and a strict load.
"""

import torch
import torch.nn.functional as F
from torch import nn

from minidream.config import TextEncoderConfig, VisionTransformerConfig
from minidream.models.layers import multihead_attention


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's "quick_gelu" x * sigmoid(1.702 x), or the exact "gelu" of OpenCLIP (SD 2.x)."""
    if name == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    if name == "gelu":
        return F.gelu(x)
    raise ValueError(f"unknown text encoder activation {name!r}: expected 'quick_gelu' or 'gelu'")


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.context_length, cfg.width)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """B x N ids -> B x N x width; positions are 0..N-1, read straight from the table."""
        return self.token_embedding(input_ids) + self.position_embedding.weight[: input_ids.shape[1]]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # Many SD checkpoints carry transformers' constant `position_ids` buffer (0..76), some as
        # floats; positions are computed here instead, so drop it and keep the load strict.
        state_dict.pop(prefix + "position_ids", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)


class CLIPAttention(nn.Module):
    def __init__(self, cfg: TextEncoderConfig | VisionTransformerConfig, causal: bool):
        super().__init__()
        self.heads = cfg.heads
        self.causal = causal
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Text is causal: token i sees tokens <= i, so the EOS position summarises the whole
        # prompt and padding after it never changes the outputs before it. Image patches see all.
        out = multihead_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, causal=self.causal)
        return self.out_proj(out)


class CLIPMLP(nn.Module):
    def __init__(self, cfg: TextEncoderConfig | VisionTransformerConfig):
        super().__init__()
        self.activation = cfg.activation
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_width)
        self.fc2 = nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mlp(self.fc1, self.fc2, self.activation, x)


def mlp(fc1: nn.Linear, fc2: nn.Linear, name: str, x: torch.Tensor) -> torch.Tensor:
    """CLIP's MLP, width -> mlp_width -> width, whatever the checkpoint calls its two linears
    (fc1/fc2 in OpenAI CLIP and transformers, c_fc/c_proj in OpenCLIP)."""
    return fc2(activation(name, fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer layer: x + attn(norm(x)), then x + mlp(norm(x)). The same layer
    serves CLIP's text tower (causal) and its image tower (models/vision.py, not causal)."""

    def __init__(self, cfg: TextEncoderConfig | VisionTransformerConfig, causal: bool = True):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg, causal)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    """Holds the layers under their checkpoint names `encoder.layers.N`; CLIPTextTransformer
    runs them, so that clip_skip can stop early."""

    def __init__(self, cfg: TextEncoderConfig | VisionTransformerConfig, causal: bool = True):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg, causal) for _ in range(cfg.layers))


class CLIPTextTransformer(nn.Module):
    """The `text_model.` part of the checkpoint: embeddings, encoder layers, final norm."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.final_norm = cfg.final_norm

    def forward(self, input_ids: torch.Tensor, clip_skip: int) -> torch.Tensor:
        layers = self.encoder.layers
        check_clip_skip(clip_skip, len(layers))
        x = self.embeddings(input_ids)
        # clip_skip=k stops k-1 layers early; the final norm is applied either way, as UIs do,
        # except in SDXL, whose penultimate states go unnormed.
        for layer in layers[: len(layers) - (clip_skip - 1)]:
            x = layer(x)
        return self.final_layer_norm(x) if self.final_norm else x


def check_clip_skip(clip_skip: int, layers: int) -> None:
    if not 1 <= clip_skip <= layers:
        raise ValueError(f"clip_skip must be in 1..{layers}, got {clip_skip}")


class CLIPTextModel(nn.Module):
    """`text_encoder(input_ids) -> last_hidden_state`: B x N ids -> B x N x width (N <= context_length)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.config = cfg
        self.text_model = CLIPTextTransformer(cfg)

    def forward(self, input_ids: torch.Tensor, clip_skip: int | None = None) -> torch.Tensor:
        """Hidden states after the final layer norm; `clip_skip` (default: the config's) 2 = penultimate layer."""
        return self.text_model(input_ids, self.config.clip_skip if clip_skip is None else clip_skip)

    def pooled(self, hidden_states: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """B x width: each prompt's hidden state at its first EOS token (CLIP's sentence embedding).

        transformers picks the first `eos_token_id` (and, for old configs with eos_token_id=2,
        the argmax id, which is the same position since EOS 49407 is the largest id).
        """
        return states_at_first(hidden_states, input_ids, self.config.eos_token_id)


def states_at_first(hidden_states: torch.Tensor, input_ids: torch.Tensor, token_id: int) -> torch.Tensor:
    """B x N x width -> B x width: each row's state at the first position holding `token_id`."""
    first = (input_ids == token_id).int().argmax(dim=1)
    return hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), first]
