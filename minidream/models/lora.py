"""Low-rank adapters (LoRA, Hu et al. 2021, eq. 3): a layer computes W x + b + scale * up(down(x)).

`down` maps the layer's input to `rank` features and `up` maps them to its output; W and b stay
frozen. scale = alpha / rank, the convention of kohya's sd-scripts (networks/lora.py), ComfyUI and
AUTOMATIC1111, so one (down, up, alpha) means the same change to the model in every one of them.
A 3x3 conv is adapted LoCon-style: `down` is a conv with the layer's kernel, stride and padding
into `rank` channels and `up` a 1x1 conv, so up(down(x)) is itself one conv of the layer's shape.

The adapted layers subclass `nn.Linear` / `nn.Conv2d` and keep the base's `weight` and `bias`
Parameters under their names, with `lora_down`, `lora_up` and `alpha` beside them: the base
checkpoint keys, strict loading and export are unchanged, and the adapter's keys are the
kohya file's (`<module>.lora_down.weight`, `.lora_up.weight`, `.alpha`) under minidream's
module names. Adapters are fp32 whatever the base's dtype: the low-rank branch runs on the
input cast to fp32 (autocast, when on, decides the matmul dtype as for any layer) and its
output is cast to the base output's dtype before the sum.

SD 2.x's OpenCLIP text tower fuses q, k and v in one `in_proj_weight` (3*width x width), while
kohya and diffusers train SD 2 with transformers' separate q_proj / k_proj / v_proj. The fused
weight gets one adapter per row-block (rows 0:w, w:2w, 2w:3w), named `<attn>.in_proj_q`,
`in_proj_k`, `in_proj_v`: the same three low-rank changes, applied, merged and saved exactly.
SDXL's OpenCLIP ViT-bigG/14 tower (its second text encoder) is adapted the same way, on every
resblock (`lora_resblocks`).
"""

import contextlib
import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import nn

from minidream.config import UNET_TARGETS, TextEncoderConfig
from minidream.models.clip import CLIPMLP, CLIPAttention, CLIPTextModel
from minidream.models.layers import Upsample
from minidream.models.open_clip_text import OpenCLIPAttention, OpenCLIPTextModel
from minidream.models.unet import (
    CrossAttention,
    Downsample,
    ResBlock,
    SpatialTransformer,
    UNet,
)

TEXT_ENCODER_TARGETS = ("attention", "all")
ADAPTER_DTYPE = torch.float32
IN_PROJ_SLICES = ("in_proj_q", "in_proj_k", "in_proj_v")  # the row-blocks of in_proj_weight, in order


class Adapter(NamedTuple):
    """One layer's adapter, as files hold it: the change to its weight is (alpha / rank) * up . down."""

    down: torch.Tensor  # rank x in (Linear), rank x in x kh x kw (Conv2d)
    up: torch.Tensor  # out x rank (Linear), out x rank x 1 x 1 (Conv2d)
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def lora_scale(alpha: float | None, rank: int) -> float:
    """alpha / rank; an alpha of None or 0 means alpha = rank (scale 1), as kohya reads old files."""
    return 1.0 if not alpha else alpha / rank


def weight_delta(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * up . down in the base weight's shape (fp32): out x in for a Linear, out x in x kh x kw
    for a conv, where a 1x1 `up` after a kh x kw `down` composes into one kh x kw kernel."""
    down, up = down.float(), up.float()
    if down.ndim == 2:
        return scale * (up @ down)
    return scale * torch.einsum("or,rihw->oihw", up.flatten(1), down)  # up: out x rank x 1 x 1 -> out x rank


def fold_into(weight: torch.Tensor, delta: torch.Tensor) -> None:
    """weight += delta, summed in fp32 and rounded once to the weight's dtype (in place: views too)."""
    weight.copy_((weight.float() + delta).to(weight.dtype))


class LowRankBranch:
    """The adapter itself: scale * up(down(x)) and its alpha; where it is added is its owner's business."""

    lora_down: nn.Module
    lora_up: nn.Module
    lora_dropout: nn.Module
    alpha: torch.Tensor
    lora_alpha: float
    scale: float

    def _attach(self, down: nn.Module, up: nn.Module, alpha: float, dropout: float) -> None:
        with torch.no_grad():  # built with to_empty: start from zeros (the identity) until initialised
            down.weight.zero_()
            up.weight.zero_()
        self.lora_down, self.lora_up = down, up
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # alpha is saved with the adapter (a kohya file's `.alpha`); the scale is kept as a Python
        # number too, so that the forward never reads a device tensor back to the host.
        rank = down.weight.shape[0]
        self.lora_alpha = float(alpha) if alpha else float(rank)
        self.scale = self.lora_alpha / rank
        self.register_buffer("alpha", torch.tensor(self.lora_alpha, dtype=ADAPTER_DTYPE, device=down.weight.device))

    @property
    def rank(self) -> int:
        return self.lora_down.weight.shape[0]

    def low_rank(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.lora_up(self.lora_down(self.lora_dropout(x.to(self.lora_down.weight.dtype))))

    def adapter(self) -> Adapter:
        return Adapter(self.lora_down.weight.detach(), self.lora_up.weight.detach(), self.lora_alpha)

    def delta(self, sign: float = 1.0) -> torch.Tensor:
        return weight_delta(self.lora_down.weight, self.lora_up.weight, sign * self.scale)


class Mergeable:
    """A layer whose adapters can be folded into its weight and switched off; the layer class
    defines `_add_to_weight(sign)`, which adds sign * its adapters' change to its weight."""

    merged: bool = False  # folded into the weight: the forward skips the adapters
    active: bool = True  # False inside `adapters_off`

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapters into the weight (in fp32, rounded once to the weight's dtype)."""
        if not self.merged:
            self._add_to_weight(1.0)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the folded adapters back out of the weight (exact up to the rounding of two adds)."""
        if self.merged:
            self._add_to_weight(-1.0)
            self.merged = False


class LowRankAdapted(LowRankBranch, Mergeable):
    """What LoRALinear and LoRAConv2d share: the branch added to the base layer's output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.merged or not self.active:
            return out
        return out + self.low_rank(x).to(out.dtype)

    def _add_to_weight(self, sign: float) -> None:
        fold_into(self.weight, self.delta(sign))


class LoRALinear(LowRankAdapted, nn.Linear):
    """nn.Linear + scale * lora_up(lora_down(x)); down: in -> rank, up: rank -> out."""

    @classmethod
    def around(cls, base: nn.Linear, rank: int, alpha: float, dropout: float) -> "LoRALinear":
        with torch.device("meta"):  # the base's Parameters are taken below, not allocated
            layer = cls(base.in_features, base.out_features, bias=base.bias is not None)
            down = nn.Linear(base.in_features, rank, bias=False, dtype=ADAPTER_DTYPE)
            up = nn.Linear(rank, base.out_features, bias=False, dtype=ADAPTER_DTYPE)
        layer.weight, layer.bias = base.weight, base.bias
        layer._attach(down.to_empty(device=base.weight.device), up.to_empty(device=base.weight.device), alpha, dropout)
        return layer.train(base.training)


class InProjSlice(LowRankBranch, nn.Module):
    """The adapter of one row-block (q, k or v) of a fused in_proj_weight: width -> rank -> width."""

    def __init__(self, width: int, rank: int, alpha: float, dropout: float, device: torch.device):
        super().__init__()
        down = nn.Linear(width, rank, bias=False, dtype=ADAPTER_DTYPE, device=device)
        up = nn.Linear(rank, width, bias=False, dtype=ADAPTER_DTYPE, device=device)
        self._attach(down, up, alpha, dropout)


class LoRAOpenCLIPAttention(Mergeable, OpenCLIPAttention):
    """OpenCLIPAttention whose in-projection adds the adapters of its q, k, v row-blocks (children
    `in_proj_q`, `in_proj_k`, `in_proj_v`, any of them); merging folds each into its rows."""

    @classmethod
    def around(cls, base: OpenCLIPAttention) -> "LoRAOpenCLIPAttention":
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)  # the base's Parameters and out_proj are taken, in its order: nothing allocated
        layer.heads = base.heads
        layer.in_proj_weight, layer.in_proj_bias, layer.out_proj = base.in_proj_weight, base.in_proj_bias, base.out_proj
        return layer.train(base.training)

    def slices(self) -> list[tuple[int, InProjSlice]]:
        return [(i, getattr(self, name)) for i, name in enumerate(IN_PROJ_SLICES) if name in self._modules]

    def in_projection(self, x: torch.Tensor) -> torch.Tensor:
        out = super().in_projection(x)
        if self.merged or not self.active:
            return out
        blocks = list(out.chunk(3, dim=-1))
        for i, branch in self.slices():
            blocks[i] = blocks[i] + branch.low_rank(x).to(out.dtype)
        return torch.cat(blocks, dim=-1)

    def _add_to_weight(self, sign: float) -> None:
        for i, branch in self.slices():
            fold_into(self.in_proj_weight.chunk(3)[i], branch.delta(sign))


class LoRAConv2d(LowRankAdapted, nn.Conv2d):
    """nn.Conv2d + scale * lora_up(lora_down(x)); down: the layer's kernel/stride/padding into rank
    channels, up: a 1x1 conv from rank channels to the output's."""

    @classmethod
    def around(cls, base: nn.Conv2d, rank: int, alpha: float, dropout: float) -> "LoRAConv2d":
        if base.groups != 1 or base.dilation != (1, 1) or base.padding_mode != "zeros":
            raise ValueError("LoRA adapts plain convs only (groups=1, dilation=1, zero padding)")
        with torch.device("meta"):
            layer = cls(base.in_channels, base.out_channels, base.kernel_size, base.stride, base.padding,
                        bias=base.bias is not None)
            down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False,
                             dtype=ADAPTER_DTYPE)
            up = nn.Conv2d(rank, base.out_channels, 1, bias=False, dtype=ADAPTER_DTYPE)
        layer.weight, layer.bias = base.weight, base.bias
        layer._attach(down.to_empty(device=base.weight.device), up.to_empty(device=base.weight.device), alpha, dropout)
        return layer.train(base.training)


ADAPTABLE = (nn.Linear, nn.Conv2d)


def target_layers(model: nn.Module, targets: str) -> list[str]:
    """Names of the Linear / Conv2d layers `targets` selects, in module order.

    UNet (kohya's target modules, named as minidream names them):
      "attention"   to_q, to_k, to_v, to_out.0 of every attn1/attn2;
      "transformer" every Linear and 1x1 conv inside the SpatialTransformers (kohya's default:
                    proj_in, proj_out, the attentions, the feed-forward);
      "all"         also every layer of the ResBlocks (3x3 convs, time-embedding Linear, 1x1
                    shortcut) and the Downsample / Upsample convs (kohya's LoCon `conv_dim`).
    Text encoder: "attention" q/k/v/out_proj; "all" also mlp.fc1 / fc2 (kohya's default); in
    OpenCLIP's tower the same layers (`_open_clip_targets`).
    """
    if isinstance(model, UNet):
        containers = _unet_containers(targets)
    elif isinstance(model, CLIPTextModel):
        containers = _text_encoder_containers(targets)
    elif isinstance(model, OpenCLIPTextModel):
        return _open_clip_targets(model, targets)
    else:
        raise ValueError(f"LoRA targets are defined for the UNet and the CLIP text encoder, not {type(model).__name__}")
    inside = [name for name, module in model.named_modules() if isinstance(module, containers)]
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, ADAPTABLE) and any(name.startswith(prefix + ".") for prefix in inside)
    ]


def _unet_containers(targets: str) -> tuple[type, ...]:
    if targets == "attention":
        return (CrossAttention,)
    if targets == "transformer":
        return (SpatialTransformer,)
    if targets == "all":
        return (SpatialTransformer, ResBlock, Downsample, Upsample)
    raise ValueError(f"UNet LoRA targets must be one of {', '.join(UNET_TARGETS)}, got {targets!r}")


def _text_encoder_containers(targets: str) -> tuple[type, ...]:
    if targets == "attention":
        return (CLIPAttention,)
    if targets == "all":
        return (CLIPAttention, CLIPMLP)
    raise ValueError(f"text encoder LoRA targets must be one of {', '.join(TEXT_ENCODER_TARGETS)}, got {targets!r}")


def _open_clip_targets(model: OpenCLIPTextModel, targets: str) -> list[str]:
    """The layers kohya adapts in transformers' layout of the tower, under OpenCLIP's names:
    in_proj_q/k/v (q/k/v_proj), attn.out_proj; "all" also mlp.c_fc / c_proj (fc1 / fc2); in the
    resblocks `lora_resblocks` counts."""
    _text_encoder_containers(targets)  # the same target names, checked the same way
    names = []
    for n in range(lora_resblocks(model.config)):
        attn, mlp = f"transformer.resblocks.{n}.attn.", f"transformer.resblocks.{n}.mlp."
        names += [attn + part for part in IN_PROJ_SLICES] + [attn + "out_proj"]
        names += [mlp + "c_fc", mlp + "c_proj"] if targets == "all" else []
    return names


def lora_resblocks(cfg: TextEncoderConfig) -> int:
    """How many of an OpenCLIP tower's resblocks (the first ones) LoRAs adapt. SD 2.x's last
    resblock never runs (its states are the penultimate layer's, it has no pooled output), and
    kohya and diffusers train its 23-layer transformers twin: no file names it. SDXL's bigG
    (told apart by its unnormed states, sgm's legacy=False) runs all 32 for the pooled
    projection, and kohya's lora_te2_ and diffusers' text_encoder_2 adapters cover all 32."""
    return cfg.layers - 1 if cfg.final_norm else cfg.layers


def add_lora(
    model: nn.Module,
    targets: str,
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    generator: torch.Generator | int = 0,
) -> list[str]:
    """Adapt the `targets` layers of `model` in place; returns their names.

    alpha None = rank. dropout: on the adapter's input during training (PEFT's lora_dropout).
    Initialised as kohya and PEFT do: down kaiming-uniform(a=sqrt(5)), up zero, so the model's
    output is unchanged at first. The draws come from `generator` (or a CPU generator seeded
    with it), layer after layer in module order, so the same seed gives the same adapters.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)
    names = target_layers(model, targets)
    for name in names:
        layer = adapt_layer(model, name, rank, rank if alpha is None else alpha, dropout)
        _initialise(layer, generator)
    return names


def adapt_layer(model: nn.Module, name: str, rank: int, alpha: float, dropout: float) -> LowRankBranch:
    """Replace layer `name` of `model` by its LoRA-capable twin holding the same weight and bias
    (an in_proj slice: adapt the attention, once, and give it that slice's adapter)."""
    parent, _, child = name.rpartition(".")
    if child in IN_PROJ_SLICES:
        return _adapt_in_proj(model, parent, child, rank, alpha, dropout)
    base = model.get_submodule(name)
    if isinstance(base, LowRankAdapted):
        raise ValueError(f"{name} already holds a LoRA adapter")
    adapted = (LoRAConv2d if isinstance(base, nn.Conv2d) else LoRALinear).around(base, rank, alpha, dropout)
    setattr(model.get_submodule(parent), child, adapted)  # Sequential children are named "0", "1", ...
    return adapted


def _adapt_in_proj(model: nn.Module, name: str, part: str, rank: int, alpha: float, dropout: float) -> InProjSlice:
    attention = model.get_submodule(name)
    if not isinstance(attention, OpenCLIPAttention):
        raise ValueError(f"{name}.{part}: {part} names a row-block of an OpenCLIP attention's in_proj_weight")
    if not isinstance(attention, LoRAOpenCLIPAttention):
        attention = LoRAOpenCLIPAttention.around(attention)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, attention)
    if part in attention._modules:
        raise ValueError(f"{name}.{part} already holds a LoRA adapter")
    weight = attention.in_proj_weight
    branch = InProjSlice(weight.shape[1], rank, alpha, dropout, weight.device).train(attention.training)
    setattr(attention, part, branch)
    return branch


def layer_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The weight the LoRA layer `name` changes: the layer's, or its rows of in_proj_weight (a view)."""
    return _layer_tensor(model, name, "weight")


def layer_bias(model: nn.Module, name: str) -> torch.Tensor | None:
    """The bias beside `layer_weight(model, name)`: the layer's, or its part of in_proj_bias; None without one."""
    return _layer_tensor(model, name, "bias")


def _layer_tensor(model: nn.Module, name: str, kind: str) -> torch.Tensor | None:
    """The layer's `kind` ("weight" or "bias"); for a q/k/v slice, its third of the fused in_proj_<kind>."""
    parent, _, child = name.rpartition(".")
    if child in IN_PROJ_SLICES:
        fused = getattr(model.get_submodule(parent), f"in_proj_{kind}")
        return fused.chunk(3)[IN_PROJ_SLICES.index(child)] if fused is not None else None
    return getattr(model.get_submodule(name), kind)


@torch.no_grad()
def _initialise(layer: LowRankBranch, generator: torch.Generator) -> None:
    down = torch.empty(layer.lora_down.weight.shape, dtype=ADAPTER_DTYPE)  # on the CPU, the generator's device
    nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
    layer.lora_down.weight.copy_(down)
    layer.lora_up.weight.zero_()


def adapted_layers(model: nn.Module) -> dict[str, LowRankAdapted]:
    """The adapted Linear / Conv2d layers (not the in_proj slices: see `adapter_branches`)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LowRankAdapted)}


def adapter_branches(model: nn.Module) -> dict[str, LowRankBranch]:
    """Every adapter of `model` by layer name, in_proj slices included."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LowRankBranch)}


def adapters_of(model: nn.Module) -> dict[str, Adapter]:
    """Every adapter of `model` by layer name (what a LoRA file stores)."""
    return {name: layer.adapter() for name, layer in adapter_branches(model).items()}


def _mergeable(model: nn.Module) -> list[Mergeable]:
    return [module for module in model.modules() if isinstance(module, Mergeable)]


def merge(model: nn.Module) -> None:
    """Fold every adapter into its base weight; the forward then skips the adapter branch."""
    for layer in _mergeable(model):
        layer.merge()


def unmerge(model: nn.Module) -> None:
    for layer in _mergeable(model):
        layer.unmerge()


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """Run `model` as its base inside the block (e.g. while a LoRA file is merged into the weights)."""
    layers = _mergeable(model)
    for layer in layers:
        layer.active = False
    try:
        yield
    finally:
        for layer in layers:
            layer.active = True


def is_adapter_key(key: str) -> bool:
    """Whether a state-dict key belongs to an adapter rather than to the base model."""
    return ".lora_down." in key or ".lora_up." in key or key.endswith(".alpha")


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors only (`<layer>.lora_down.weight`, `.lora_up.weight`, `.alpha`):
    what a LoRA training checkpoint holds."""
    return {key: tensor for key, tensor in model.state_dict().items() if is_adapter_key(key)}


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's tensors under their checkpoint names, without the adapters'."""
    return {key: tensor for key, tensor in model.state_dict().items() if not is_adapter_key(key)}


class AdapterMismatch(ValueError):
    """Saved adapters that are not the model's (another rank, alpha or target set)."""


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load saved adapters into a model adapted the same way; refuses anything else in one line
    (callers prefix the checkpoint's path)."""
    expected = lora_state_dict(model)
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    different = [
        f"{key} {_describe(state[key])}, expected {_describe(tensor)}"
        for key, tensor in expected.items()
        if key in state and (state[key].shape != tensor.shape or (key.endswith(".alpha") and state[key] != tensor))
    ]
    problems = [
        f"{len(keys)} {label} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("different", different))
        if keys
    ]
    if problems:
        raise AdapterMismatch(
            "saved adapters do not match this model's LoRA settings (rank, alpha, targets): " + "; ".join(problems)
        )
    with torch.no_grad():
        for key, tensor in expected.items():
            tensor.copy_(state[key])


def _describe(tensor: torch.Tensor) -> str:
    return f"= {tensor.item():g}" if tensor.ndim == 0 else str(list(tensor.shape))


def train_adapters_only(model: nn.Module, base_dtype: torch.dtype | None = None) -> list[nn.Parameter]:
    """Freeze the base (cast to `base_dtype` when given, e.g. bf16 for AMP training) and keep the
    adapters fp32 and trainable; returns the adapters' parameters for the optimizer."""
    trainable = []
    for name, param in model.named_parameters():
        is_adapter = is_adapter_key(name)
        param.requires_grad_(is_adapter)
        if is_adapter:
            trainable.append(param)
        elif base_dtype is not None and param.is_floating_point():
            param.data = param.data.to(base_dtype)
    return trainable
