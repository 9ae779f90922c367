"""The image towers the DreamBooth paper scores with: CLIP (ViT-B/32, ViT-L/14) and DINO ViT-S/16.

CLIP (Radford et al. 2021) embeds an image and a text into one space: the image tower's CLS
state after `post_layernorm`, times `visual_projection`; the text tower's state at EOS, times
`text_projection`. DINO (Caron et al. 2021) is a plain ViT whose CLS state after the final
norm is the image embedding. Module names are transformers' checkpoint keys (`CLIPModel`;
`ViTModel` as facebook/dino-vits16 stores it), so loading is a strict `load_state_dict`.
CLIP's transformer layers and text tower are the ones SD's text encoder uses (models/clip.py).
"""

import torch
from torch import nn

from minidream.config import CLIPConfig, VisionTransformerConfig
from minidream.models.clip import (
    CLIPEncoder,
    CLIPTextTransformer,
    activation,
    states_at_first,
)
from minidream.models.layers import multihead_attention


def patch_tokens(conv: nn.Conv2d, pixel_values: torch.Tensor, image_size: int) -> torch.Tensor:
    """B x 3 x S x S pixels -> B x (S/p)^2 x width: one token per p x p patch, row by row."""
    if pixel_values.shape[-2:] != (image_size, image_size):
        raise ValueError(f"expected {image_size}x{image_size} images, got {tuple(pixel_values.shape[-2:])}")
    return conv(pixel_values.to(conv.weight.dtype)).flatten(2).transpose(1, 2)


def num_positions(cfg: VisionTransformerConfig) -> int:
    """The CLS token plus one position per patch."""
    return 1 + (cfg.image_size // cfg.patch_size) ** 2


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionTransformerConfig):
        super().__init__()
        self.image_size = cfg.image_size
        self.class_embedding = nn.Parameter(torch.zeros(cfg.width))
        self.patch_embedding = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(num_positions(cfg), cfg.width)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """B x 3 x S x S -> B x (1 + patches) x width: CLS first, then the patches, plus positions."""
        patches = patch_tokens(self.patch_embedding, pixel_values, self.image_size)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class CLIPVisionTransformer(nn.Module):
    """The `vision_model.` part: embeddings, a norm before the layers (sic: `pre_layrnorm`, as
    the checkpoints spell it), the encoder layers without a causal mask, a norm of the CLS state."""

    def __init__(self, cfg: VisionTransformerConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.encoder = CLIPEncoder(cfg, causal=False)
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """B x 3 x S x S -> B x width: the pooled (CLS) state."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x[:, 0])


class CLIPModel(nn.Module):
    """Both CLIP towers and their projections into the shared space (transformers' `CLIPModel`)."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.config = cfg
        self.vision_model = CLIPVisionTransformer(cfg.vision)
        self.visual_projection = nn.Linear(cfg.vision.width, cfg.projection_dim, bias=False)
        self.text_model = CLIPTextTransformer(cfg.text)
        self.text_projection = nn.Linear(cfg.text.width, cfg.projection_dim, bias=False)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """B x 3 x S x S preprocessed pixels -> B x projection_dim (not normalised)."""
        return self.visual_projection(self.vision_model(pixel_values))

    def text_features(self, input_ids: torch.Tensor) -> torch.Tensor:
        """B x N token ids -> B x projection_dim (not normalised): the final layer's state at EOS."""
        hidden = self.text_model(input_ids, clip_skip=1)
        return self.text_projection(states_at_first(hidden, input_ids, self.config.text.eos_token_id))


class ViTPatchEmbeddings(nn.Module):
    def __init__(self, cfg: VisionTransformerConfig):
        super().__init__()
        self.projection = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size)


class ViTEmbeddings(nn.Module):
    def __init__(self, cfg: VisionTransformerConfig):
        super().__init__()
        self.image_size = cfg.image_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.position_embeddings = nn.Parameter(torch.zeros(1, num_positions(cfg), cfg.width))
        self.patch_embeddings = ViTPatchEmbeddings(cfg)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """B x 3 x S x S -> B x (1 + patches) x width."""
        patches = patch_tokens(self.patch_embeddings.projection, pixel_values, self.image_size)
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embeddings


class ViTSelfAttention(nn.Module):
    def __init__(self, cfg: VisionTransformerConfig):
        super().__init__()
        self.heads = cfg.heads
        self.query = nn.Linear(cfg.width, cfg.width)
        self.key = nn.Linear(cfg.width, cfg.width)
        self.value = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return multihead_attention(self.query(x), self.key(x), self.value(x), self.heads)


class ViTDense(nn.Module):
    """One Linear under the name `dense`, as the checkpoint nests its output and MLP layers."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.dense = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x)


class ViTAttention(nn.Module):
    def __init__(self, cfg: VisionTransformerConfig):
        super().__init__()
        self.attention = ViTSelfAttention(cfg)
        self.output = ViTDense(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.attention(x))


class ViTLayer(nn.Module):
    """Pre-norm layer: x + attention(norm(x)), then x + output(act(intermediate(norm(x))))."""

    def __init__(self, cfg: VisionTransformerConfig):
        super().__init__()
        self.activation = cfg.activation
        self.layernorm_before = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attention = ViTAttention(cfg)
        self.layernorm_after = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.intermediate = ViTDense(cfg.width, cfg.mlp_width)
        self.output = ViTDense(cfg.mlp_width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.layernorm_before(x))
        return x + self.output(activation(self.activation, self.intermediate(self.layernorm_after(x))))


class ViTEncoder(nn.Module):
    def __init__(self, cfg: VisionTransformerConfig):
        super().__init__()
        self.layer = nn.ModuleList(ViTLayer(cfg) for _ in range(cfg.layers))


class ViTModel(nn.Module):
    """A ViT as transformers' `ViTModel` names it (DINO: facebook/dino-vits16), without the tanh
    pooler transformers adds: DINO's embedding is the normed CLS state itself."""

    def __init__(self, cfg: VisionTransformerConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = ViTEmbeddings(cfg)
        self.encoder = ViTEncoder(cfg)
        self.layernorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """B x 3 x S x S -> B x (1 + patches) x width: the last hidden states, normed."""
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layer:
            x = layer(x)
        return self.layernorm(x)

    def cls_embedding(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """B x width: the CLS token's final state, the image embedding DINO scores with."""
        return self(pixel_values)[:, 0]
