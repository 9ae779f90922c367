"""The diffusers folder layout of the UNet and the VAE: parameter names and config.json fields.

minidream's modules carry the SD single-file names (LDM's); diffusers names the same tensors
differently (`input_blocks.1.0.in_layers.0` is `down_blocks.0.resnets.0.norm1`). One table per
model, built from the config by the same loops over levels as the model, pairs each minidream
module with its diffusers twin; every tensor below a pair keeps its relative name, and the
table serves both directions. The text encoder needs no map: its names agree in both layouts.
"""

import functools
from collections.abc import Mapping
from typing import NamedTuple

import torch

from minidream.config import PIXELS_PER_LATENT, UNetConfig, VAEConfig
from minidream.io.tensor_files import meta_shapes
from minidream.models.unet import UNet
from minidream.models.vae import AutoencoderKL


class Rename(NamedTuple):
    """A minidream module and the diffusers module that holds the same tensors."""

    minidream: str
    diffusers: str
    conv1x1_as_linear: bool = False  # weight C x C x 1 x 1 in minidream, C x C (a Linear) in diffusers


def _inside(
    minidream: str, diffusers: str, names: list[tuple[str, str]], conv1x1_as_linear: bool = False
) -> list[Rename]:
    """Renames of the modules inside one block, given as names relative to the block."""
    return [Rename(f"{minidream}.{a}", f"{diffusers}.{b}", conv1x1_as_linear) for a, b in names]


# Inside one block: (minidream name, diffusers name). Shortcuts exist only where the width changes.
UNET_RESBLOCK = [
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
]
VAE_RESBLOCK = [
    ("norm1", "norm1"),
    ("conv1", "conv1"),
    ("norm2", "norm2"),
    ("conv2", "conv2"),
    ("nin_shortcut", "conv_shortcut"),
]
VAE_ATTENTION_PROJECTIONS = [("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")]


def unet_renames(cfg: UNetConfig) -> list[Rename]:
    """The UNet's key table. A SpatialTransformer maps as a whole: its inner names agree."""
    renames = [
        Rename("time_embed.0", "time_embedding.linear_1"),
        Rename("time_embed.2", "time_embedding.linear_2"),
        Rename("input_blocks.0.0", "conv_in"),
    ]
    if cfg.adm_in_channels is not None:  # SDXL's vector conditioning (diffusers: addition_embed_type "text_time")
        renames += [Rename("label_emb.0.0", "add_embedding.linear_1"), Rename("label_emb.0.2", "add_embedding.linear_2")]
    levels = len(cfg.channel_mult)
    block = 1
    for level in range(levels):
        for j in range(cfg.num_res_blocks):
            renames += _inside(f"input_blocks.{block}.0", f"down_blocks.{level}.resnets.{j}", UNET_RESBLOCK)
            if level in cfg.attention_levels:
                renames.append(Rename(f"input_blocks.{block}.1", f"down_blocks.{level}.attentions.{j}"))
            block += 1
        if level != levels - 1:
            renames.append(Rename(f"input_blocks.{block}.0.op", f"down_blocks.{level}.downsamplers.0.conv"))
            block += 1

    renames += _inside("middle_block.0", "mid_block.resnets.0", UNET_RESBLOCK)
    renames.append(Rename("middle_block.1", "mid_block.attentions.0"))
    renames += _inside("middle_block.2", "mid_block.resnets.1", UNET_RESBLOCK)

    block = 0
    for up, level in enumerate(reversed(range(levels))):  # diffusers' up_blocks.0 is the deepest level
        attention = level in cfg.attention_levels
        for j in range(cfg.num_res_blocks + 1):
            renames += _inside(f"output_blocks.{block}.0", f"up_blocks.{up}.resnets.{j}", UNET_RESBLOCK)
            if attention:
                renames.append(Rename(f"output_blocks.{block}.1", f"up_blocks.{up}.attentions.{j}"))
            block += 1
        if level != 0:  # the Upsample follows the ResBlock (and transformer) in the level's last block
            upsample = f"output_blocks.{block - 1}.{1 + attention}.conv"
            renames.append(Rename(upsample, f"up_blocks.{up}.upsamplers.0.conv"))

    renames += [Rename("out.0", "conv_norm_out"), Rename("out.2", "conv_out")]
    return renames


def vae_renames(cfg: VAEConfig) -> list[Rename]:
    """The VAE's key table, including the mid-attention's 1x1 convs that diffusers stores as Linears."""
    renames = [Rename("quant_conv", "quant_conv"), Rename("post_quant_conv", "post_quant_conv")]
    for part in ("encoder", "decoder"):
        renames += [
            Rename(f"{part}.conv_in", f"{part}.conv_in"),
            Rename(f"{part}.norm_out", f"{part}.conv_norm_out"),
            Rename(f"{part}.conv_out", f"{part}.conv_out"),
            Rename(f"{part}.mid.attn_1.norm", f"{part}.mid_block.attentions.0.group_norm"),
        ]
        renames += _inside(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", VAE_RESBLOCK)
        renames += _inside(
            f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", VAE_ATTENTION_PROJECTIONS, conv1x1_as_linear=True
        )
        renames += _inside(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", VAE_RESBLOCK)

    levels = len(cfg.channel_mult)
    for level in range(levels):
        ours, theirs = f"encoder.down.{level}", f"encoder.down_blocks.{level}"
        for j in range(cfg.num_res_blocks):
            renames += _inside(f"{ours}.block.{j}", f"{theirs}.resnets.{j}", VAE_RESBLOCK)
        if level != levels - 1:
            renames.append(Rename(f"{ours}.downsample.conv", f"{theirs}.downsamplers.0.conv"))

        # LDM indexes decoder.up by level; diffusers' decoder.up_blocks.0 is the deepest level.
        ours, theirs = f"decoder.up.{level}", f"decoder.up_blocks.{levels - 1 - level}"
        for j in range(cfg.num_res_blocks + 1):
            renames += _inside(f"{ours}.block.{j}", f"{theirs}.resnets.{j}", VAE_RESBLOCK)
        if level != 0:
            renames.append(Rename(f"{ours}.upsample.conv", f"{theirs}.upsamplers.0.conv"))
    return renames


class TensorName(NamedTuple):
    """One tensor in both layouts."""

    minidream: str
    diffusers: str
    minidream_shape: torch.Size
    diffusers_shape: torch.Size
    conv1x1_as_linear: bool


def tensor_names(renames: list[Rename], shapes: Mapping[str, torch.Size]) -> tuple[TensorName, ...]:
    """Every tensor of a model (`shapes`: its names and shapes) named in both layouts through the
    rename of the module holding it; raises if a tensor has none or two share a diffusers name."""
    by_prefix = {rename.minidream: rename for rename in renames}
    names = []
    for key, shape in shapes.items():
        parts = key.split(".")
        prefixes = (".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1))
        rename = next((by_prefix[p] for p in prefixes if p in by_prefix), None)
        if rename is None:
            raise KeyError(f"no diffusers name for {key}")
        reshaped = rename.conv1x1_as_linear and key.endswith(".weight")
        names.append(TensorName(
            minidream=key,
            diffusers=rename.diffusers + key[len(rename.minidream):],
            minidream_shape=shape,
            diffusers_shape=shape[:2] if reshaped else shape,
            conv1x1_as_linear=reshaped,
        ))
    if len({name.diffusers for name in names}) != len(names):
        raise KeyError("two minidream tensors map to one diffusers name")
    return tuple(names)


@functools.cache
def unet_names(cfg: UNetConfig) -> tuple[TensorName, ...]:
    return tensor_names(unet_renames(cfg), meta_shapes(UNet, cfg))


@functools.cache
def vae_names(cfg: VAEConfig) -> tuple[TensorName, ...]:
    return tensor_names(vae_renames(cfg), meta_shapes(AutoencoderKL, cfg))


def _convert(
    state_dict: dict[str, torch.Tensor], names: tuple[TensorName, ...], to_diffusers: bool
) -> dict[str, torch.Tensor]:
    """Rename every tensor the table knows, reshaping 1x1 convs <-> linears. Keys it does not
    know pass through unchanged and shapes are not checked: the loader checks the result once,
    naming the keys as the file does (tensor_files.check_tensors)."""
    table = {(n.minidream if to_diffusers else n.diffusers): n for n in names}
    converted = {}
    for key, tensor in state_dict.items():
        name = table.get(key)
        if name is None:
            converted[key] = tensor
            continue
        if name.conv1x1_as_linear:  # C x C x 1 x 1 <-> C x C
            if to_diffusers and tensor.dim() == 4:
                tensor = tensor[:, :, 0, 0]
            elif not to_diffusers and tensor.dim() == 2:
                tensor = tensor[:, :, None, None]
        converted[name.diffusers if to_diffusers else name.minidream] = tensor
    return converted


def diffusers_key_map(names: tuple[TensorName, ...]) -> dict[str, str]:
    """minidream name -> diffusers name, for error messages that name keys as the file does."""
    return {n.minidream: n.diffusers for n in names}


def unet_to_diffusers(state_dict: dict[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    return _convert(state_dict, unet_names(cfg), to_diffusers=True)


def unet_from_diffusers(state_dict: dict[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    return _convert(state_dict, unet_names(cfg), to_diffusers=False)


def vae_to_diffusers(state_dict: dict[str, torch.Tensor], cfg: VAEConfig) -> dict[str, torch.Tensor]:
    return _convert(state_dict, vae_names(cfg), to_diffusers=True)


def vae_from_diffusers(state_dict: dict[str, torch.Tensor], cfg: VAEConfig) -> dict[str, torch.Tensor]:
    return _convert(state_dict, vae_names(cfg), to_diffusers=False)


# ---- config.json ----------------------------------------------------------------------------
#
# Options diffusers offers but SD (and minidream) has one value for: written as is, and a file
# with any other value is refused rather than silently computed differently.
UNET_FIXED = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dropout": 0.0,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
}
VAE_FIXED = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}
# Read and ignored: the training resolution and the VAE's precision hint (minidream's norms
# always run in fp32), besides diffusers' bookkeeping fields, whose names start with "_"
# (`_diffusers_version`, `_name_or_path`, ...).
IGNORED = {"sample_size", "force_upcast"}
DIFFUSERS_VAE_NORM_EPS = 1e-6  # fixed inside diffusers' AutoencoderKL, not a config field

# Fields read into minidream's configs; the optional ones are absent from older files (SD 1.5's
# own config.json lacks them) and take diffusers' defaults.
UNET_FIELDS = {
    "in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types",
    "up_block_types", "attention_head_dim", "cross_attention_dim", "norm_num_groups", "norm_eps",
}
UNET_OPTIONAL = {
    "transformer_layers_per_block": 1, "use_linear_projection": False, "upcast_attention": False,
    # SDXL's y (UNetConfig.adm_in_channels): "text_time" is the only addition embedding minidream has.
    "addition_embed_type": None, "addition_time_embed_dim": None, "projection_class_embeddings_input_dim": None,
}
VAE_FIELDS = {
    "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
    "layers_per_block", "latent_channels", "norm_num_groups",
}
VAE_OPTIONAL = {"scaling_factor": 0.18215}


def unet_config_to_diffusers(cfg: UNetConfig, sample_size: int = 64) -> dict:
    """The UNet's config.json. sample_size is the latent size trained at (64 for SD 1.x's 512 px);
    diffusers pipelines derive their default image size from it."""
    widths = [cfg.model_channels * mult for mult in cfg.channel_mult]
    down_types, up_types = _unet_block_types(len(widths), cfg.attention_levels)
    return {
        **UNET_FIXED,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "block_out_channels": widths,
        "layers_per_block": cfg.num_res_blocks,
        "down_block_types": down_types,
        "up_block_types": up_types,
        # diffusers' "attention_head_dim" is the number of heads (a historical misnomer): one
        # count for SD 1.x, one per level for SD 2.x's fixed head size.
        "attention_head_dim": cfg.num_heads if cfg.head_dim is None else [w // cfg.head_dim for w in widths],
        "transformer_layers_per_block": (
            cfg.transformer_depth if isinstance(cfg.transformer_depth, int) else list(cfg.transformer_depth)
        ),
        "addition_embed_type": None if cfg.adm_in_channels is None else "text_time",
        "addition_time_embed_dim": None if cfg.adm_in_channels is None else cfg.size_embed_dim,
        "projection_class_embeddings_input_dim": cfg.adm_in_channels,
        "cross_attention_dim": cfg.context_dim,
        "use_linear_projection": cfg.use_linear_proj,
        "upcast_attention": cfg.upcast_attention,
        "norm_num_groups": cfg.norm_groups,
        "norm_eps": cfg.norm_eps,
        "sample_size": sample_size,
    }


def unet_config_from_diffusers(config: dict) -> UNetConfig:
    config = _read_fields(config, UNET_FIXED, UNET_FIELDS, UNET_OPTIONAL)
    widths = list(config["block_out_channels"])
    base, channel_mult = _base_and_multipliers(widths)
    down_types, up_types = list(config["down_block_types"]), list(config["up_block_types"])
    attention_levels = tuple(i for i, kind in enumerate(down_types) if kind == "CrossAttnDownBlock2D")
    if (down_types, up_types) != _unet_block_types(len(widths), attention_levels):
        raise ValueError(
            f"unsupported block types {down_types} / {up_types}: "
            "expected (CrossAttn)DownBlock2D levels mirrored by (CrossAttn)UpBlock2D"
        )
    depth = config["transformer_layers_per_block"]
    if isinstance(depth, list):  # one per level (SDXL); one number when they agree, as SD's presets say
        depth = depth[0] if len(set(depth)) == 1 else tuple(depth)
    if config["addition_embed_type"] not in (None, "text_time"):
        raise ValueError(f"unsupported addition_embed_type {config['addition_embed_type']!r}: "
                         "minidream has SDXL's \"text_time\" only")
    text_time = config["addition_embed_type"] == "text_time"
    num_heads, head_dim = _heads_from_diffusers(config["attention_head_dim"], widths)
    return UNetConfig(
        in_channels=config["in_channels"],
        out_channels=config["out_channels"],
        model_channels=base,
        channel_mult=channel_mult,
        num_res_blocks=config["layers_per_block"],
        attention_levels=attention_levels,
        num_heads=num_heads,
        head_dim=head_dim,
        transformer_depth=depth,
        context_dim=config["cross_attention_dim"],
        use_linear_proj=config["use_linear_projection"],
        norm_groups=config["norm_num_groups"],
        norm_eps=config["norm_eps"],
        upcast_attention=config["upcast_attention"],
        adm_in_channels=config["projection_class_embeddings_input_dim"] if text_time else None,
        size_embed_dim=config["addition_time_embed_dim"] if text_time else UNetConfig.size_embed_dim,
    )


def _unet_block_types(levels: int, attention_levels: tuple[int, ...]) -> tuple[list[str], list[str]]:
    """diffusers' down_block_types and up_block_types (deepest level first) for these levels."""
    down = ["CrossAttnDownBlock2D" if level in attention_levels else "DownBlock2D" for level in range(levels)]
    return down, [kind.replace("Down", "Up") for kind in reversed(down)]


def _heads_from_diffusers(heads: int | list[int], widths: list[int]) -> tuple[int, int | None]:
    """(num_heads, head_dim) from diffusers' per-model or per-level head counts."""
    if isinstance(heads, int) or len(set(heads)) == 1:
        return (heads if isinstance(heads, int) else heads[0]), None
    head_dims = {w // h for w, h in zip(widths, heads, strict=True)}
    if len(head_dims) != 1 or any(w % h for w, h in zip(widths, heads)):
        raise ValueError(f"attention_head_dim {heads} gives neither one head count nor one head size for {widths}")
    return UNetConfig.num_heads, head_dims.pop()  # num_heads unused once head_dim is set: the default


def _base_and_multipliers(widths: list[int]) -> tuple[int, tuple[int, ...]]:
    """diffusers' block_out_channels as LDM's base width and per-level multipliers."""
    base = widths[0]
    if any(w % base for w in widths):
        raise ValueError(f"block_out_channels {widths} are not multiples of the first")
    return base, tuple(w // base for w in widths)


def vae_config_to_diffusers(cfg: VAEConfig, sample_size: int = 512) -> dict:
    """The VAE's config.json. sample_size is the image size trained at (512 for SD 1.x)."""
    if cfg.norm_eps != DIFFUSERS_VAE_NORM_EPS:
        raise ValueError(f"diffusers' AutoencoderKL fixes GroupNorm eps at {DIFFUSERS_VAE_NORM_EPS}, "
                         f"not {cfg.norm_eps}")
    levels = len(cfg.channel_mult)
    return {
        **VAE_FIXED,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [cfg.channels * mult for mult in cfg.channel_mult],
        "layers_per_block": cfg.num_res_blocks,
        "latent_channels": cfg.latent_channels,
        "norm_num_groups": cfg.norm_groups,
        "scaling_factor": cfg.scaling_factor,
        "sample_size": sample_size,
    }


def vae_config_from_diffusers(config: dict) -> VAEConfig:
    config = _read_fields(config, VAE_FIXED, VAE_FIELDS, VAE_OPTIONAL)
    base, channel_mult = _base_and_multipliers(list(config["block_out_channels"]))
    down_types, up_types = list(config["down_block_types"]), list(config["up_block_types"])
    if down_types != ["DownEncoderBlock2D"] * len(channel_mult) or up_types != ["UpDecoderBlock2D"] * len(channel_mult):
        raise ValueError(f"unsupported VAE block types {down_types} / {up_types}")
    if 2 ** (len(channel_mult) - 1) != PIXELS_PER_LATENT:  # the size rule and the samplers assume SD's 8x
        raise ValueError(f"unsupported VAE: {len(channel_mult)} levels downsample {2 ** (len(channel_mult) - 1)}x; "
                         f"SD's VAEs have 4 levels ({PIXELS_PER_LATENT}x)")
    return VAEConfig(
        in_channels=config["in_channels"],
        out_channels=config["out_channels"],
        channels=base,
        channel_mult=channel_mult,
        num_res_blocks=config["layers_per_block"],
        latent_channels=config["latent_channels"],
        norm_groups=config["norm_num_groups"],
        norm_eps=DIFFUSERS_VAE_NORM_EPS,
        scaling_factor=config["scaling_factor"],
    )


def _listing(label: str, items: list[str], limit: int = 20) -> str:
    if not items:
        return ""
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"\n  {label} ({len(items)}):\n    " + "\n    ".join(items[:limit]) + more


def _read_fields(config: dict, fixed: dict, required: set[str], optional: dict) -> dict:
    """config with optional fields defaulted; refuses missing or unknown fields and fixed
    options set to another value."""
    missing = sorted(required - config.keys())
    known = fixed.keys() | required | optional.keys() | IGNORED
    unknown = sorted(key for key in config if key not in known and not key.startswith("_"))
    different = [
        f"{key}={config[key]!r} (supported: {value!r})"
        for key, value in fixed.items()
        if key in config and config[key] != value
    ]
    if missing or unknown or different:
        raise ValueError(
            f"unsupported diffusers {fixed['_class_name']} config:"
            + _listing("missing fields", missing)
            + _listing("unknown fields", unknown)
            + _listing("unsupported values", different)
        )
    return {**optional, **config}
