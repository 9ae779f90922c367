"""The evaluation models from their files: CLIP (transformers folder or open_clip file) and DINO.

A transformers folder holds `config.json` and `model.safetensors` (or, older, `pytorch_model.bin`,
read only with `torch.load(weights_only=True)`), as `save_pretrained` writes them and the Hub
serves openai/clip-vit-base-patch32, openai/clip-vit-large-patch14 and facebook/dino-vits16.
An open_clip file is one `.safetensors` of a `CLIP` state dict (`visual.transformer.resblocks.N...`);
it has no config, so the shapes are read from the tensors (`open_clip_config`) and its keys are
mapped to transformers' (`clip_from_open_clip`, the one open_clip key map).
Models are built on the meta device and take the file's tensors by assignment, strictly:
every name and shape is checked, and the few tensors that are not weights are named below.
"""

import dataclasses
import json
from pathlib import Path

import torch

from minidream.config import CLIPConfig, TextEncoderConfig, VisionTransformerConfig
from minidream.io.transformers_clip import TEXT_ENCODER_FIELDS
from minidream.io.tensor_files import Tensors, WeightsError, read_tensor_file
from minidream.io.weights import load_module
from minidream.models.vision import CLIPModel, ViTModel

CONFIG_FILE = "config.json"
WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")  # in order of preference
ACTIVATIONS = ("quick_gelu", "gelu")

# Tensors the files carry that are not weights of the embeddings minidream computes:
# transformers' constant 0..N-1 `position_ids` buffers (older files), CLIP's contrastive
# temperature (cosine similarity does not use it), and the tanh pooler transformers' ViTModel
# adds (DINO's embedding is the normed CLS state, not the pooler's output).
NOT_WEIGHTS = {
    "clip": ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids", "logit_scale"),
    "vit": ("pooler.dense.weight", "pooler.dense.bias"),
}

# transformers config.json field -> minidream config field: the text tower's as SD's text
# encoder reads them (eos_token_id aside: see clip_config), the image tower's likewise plus the
# image and patch sizes.
TEXT_FIELDS = {theirs: ours for theirs, ours in TEXT_ENCODER_FIELDS.items() if ours != "eos_token_id"}
VISION_FIELDS = {
    "image_size": "image_size",
    "patch_size": "patch_size",
    **{theirs: ours for theirs, ours in TEXT_FIELDS.items() if ours in {f.name for f in dataclasses.fields(VisionTransformerConfig)}},
}
# What transformers assumes for a field config.json leaves out.
CLIP_DEFAULTS = CLIPConfig()
VIT_DEFAULTS = VisionTransformerConfig(patch_size=16, activation="gelu", layer_norm_eps=1e-12)


def load_clip(path: str | Path, device=None, dtype: torch.dtype | None = None, open_clip_activation: str = "quick_gelu") -> CLIPModel:
    """A CLIP from a transformers `CLIPModel` folder or an open_clip `.safetensors` file.

    open_clip files do not say their activation: OpenAI's weights (the paper's CLIP) use
    quick_gelu, LAION's "gelu". Raises WeightsError naming the file and the problem.
    """
    path = Path(path)
    if path.is_file() and path.suffix != ".safetensors":
        raise WeightsError(
            f"{path}: a CLIP given as one file must be an open_clip .safetensors file "
            "(e.g. open_clip_model.safetensors); or give a transformers CLIPModel folder"
        )
    if path.is_file():
        tensors, _ = read_tensor_file(path)
        cfg = open_clip_config(tensors, str(path), open_clip_activation)
        part = Tensors(clip_from_open_clip(tensors), str(path), "a CLIP model")
    else:
        raw, weights = read_transformers_folder(path, "clip", "a CLIP model (transformers CLIPModel)")
        cfg = clip_config(raw, str(path / CONFIG_FILE))
        part = Tensors(without(read_tensor_file(weights)[0], NOT_WEIGHTS["clip"]), str(weights), "a CLIP model")
    return _built(load_module(CLIPModel, cfg, part, dtype), device)


def load_dino(path: str | Path, device=None, dtype: torch.dtype | None = None) -> ViTModel:
    """A DINO ViT from a transformers `ViTModel` folder (facebook/dino-vits16's layout)."""
    path = Path(path)
    raw, weights = read_transformers_folder(path, "vit", "a DINO ViT (transformers ViTModel, e.g. facebook/dino-vits16)")
    cfg = vision_config(raw, VIT_DEFAULTS, str(path / CONFIG_FILE))
    part = Tensors(without(read_tensor_file(weights)[0], NOT_WEIGHTS["vit"]), str(weights), "a DINO ViT")
    return _built(load_module(ViTModel, cfg, part, dtype), device)


def model_files(path: str | Path) -> list[Path]:
    """The files an evaluation model is read from (what evaluate.py hashes)."""
    path = Path(path)
    if path.is_file():
        return [path]
    return [path / CONFIG_FILE, weights_file(path)]


def read_transformers_folder(path: Path, model_type: str, what: str) -> tuple[dict, Path]:
    """(config.json as a dict, the weights file) of a transformers folder holding `model_type`."""
    if not path.exists():
        raise WeightsError(f"{path}: no such file or folder; expected {what} folder with {CONFIG_FILE}")
    config_path = path / CONFIG_FILE
    if not path.is_dir() or not config_path.is_file():
        raise WeightsError(f"{path}: not a transformers model folder (no {CONFIG_FILE}); expected {what}")
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise WeightsError(f"{config_path}: not valid JSON ({error})") from None
    found = raw.get("model_type") if isinstance(raw, dict) else None
    if found != model_type:
        raise WeightsError(f"{config_path}: model_type is {found!r}, but {what} (model_type {model_type!r}) is needed")
    return raw, weights_file(path)


def weights_file(folder: Path) -> Path:
    for name in WEIGHTS_FILES:
        if (folder / name).is_file():
            return folder / name
    if any(folder.glob("*.index.json")):
        raise WeightsError(f"{folder}: sharded checkpoints are not supported; save it as one model.safetensors")
    raise WeightsError(f"{folder}: no weights file; expected one of {', '.join(WEIGHTS_FILES)}")


def clip_config(raw: dict, source: str) -> CLIPConfig:
    """CLIPConfig from a CLIPModel config.json. Old files (transformers 4.16 era) hold a full
    `text_config` of defaults and the real values in `text_config_dict`, which wins, as in
    transformers; likewise for vision."""
    vision = {**(raw.get("vision_config") or {}), **(raw.get("vision_config_dict") or {})}
    text = {**(raw.get("text_config") or {}), **(raw.get("text_config_dict") or {})}
    return CLIPConfig(
        vision=vision_config(vision, CLIP_DEFAULTS.vision, source),
        # eos_token_id stays 49407: old files say 2, and transformers then pools at the largest
        # id, which is the same position since EOS 49407 is the largest id of the vocabulary.
        text=_fields(CLIP_DEFAULTS.text, text, TEXT_FIELDS, source),
        projection_dim=raw.get("projection_dim", CLIP_DEFAULTS.projection_dim),
    )


def vision_config(raw: dict, defaults: VisionTransformerConfig, source: str) -> VisionTransformerConfig:
    if raw.get("qkv_bias", True) is not True or raw.get("num_channels", 3) != 3:
        raise WeightsError(f"{source}: only RGB ViTs with query/key/value biases are supported")
    return _fields(defaults, raw, VISION_FIELDS, source)


def _fields(defaults, raw: dict, names: dict[str, str], source: str):
    values = {ours: raw[theirs] for theirs, ours in names.items() if theirs in raw}
    if values.get("activation", defaults.activation) not in ACTIVATIONS:
        raise WeightsError(f"{source}: hidden_act {values['activation']!r} is not supported ({' or '.join(ACTIVATIONS)})")
    if not all(isinstance(value, (int, float, str)) for value in values.values()):
        raise WeightsError(f"{source}: {', '.join(names)} must be numbers or strings")
    return dataclasses.replace(defaults, **values)


def without(tensors: dict[str, torch.Tensor], names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {key: tensor for key, tensor in tensors.items() if key not in names}


def _built(model: torch.nn.Module, device) -> torch.nn.Module:
    model.requires_grad_(False)
    return model.eval() if device is None else model.to(device).eval()


# --- open_clip ---------------------------------------------------------------------------------

# open_clip name -> transformers name, outside the transformer blocks.
OPEN_CLIP_NAMES = {
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
# open_clip multiplies by its projections (x @ proj, proj: width x dim); a Linear's weight is dim x width.
OPEN_CLIP_PROJECTIONS = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
# Per block: open_clip's name after `resblocks.N.` -> transformers' after `layers.N.`.
OPEN_CLIP_BLOCK_NAMES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}
OPEN_CLIP_TOWERS = {"visual.transformer.resblocks.": "vision_model.encoder.layers.", "transformer.resblocks.": "text_model.encoder.layers."}
# Not weights: the contrastive temperature, the causal mask buffer, and the scalars OpenAI's
# original files carry.
OPEN_CLIP_NOT_WEIGHTS = ("logit_scale", "attn_mask", "input_resolution", "context_length", "vocab_size")


def clip_from_open_clip(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open_clip CLIP state dict under transformers' CLIPModel names. Keys it does not know
    keep their name, so the strict check reports them as unexpected."""
    out = {}
    for key, tensor in tensors.items():
        if key in OPEN_CLIP_NOT_WEIGHTS:
            continue
        if key in OPEN_CLIP_NAMES:
            out[OPEN_CLIP_NAMES[key]] = tensor
        elif key in OPEN_CLIP_PROJECTIONS:
            out[OPEN_CLIP_PROJECTIONS[key]] = tensor.T
        elif not _block_tensor(key, tensor, out):
            out[key] = tensor
    return out


def _block_tensor(key: str, tensor: torch.Tensor, out: dict[str, torch.Tensor]) -> bool:
    """Map one transformer-block tensor into `out`; False if `key` is not one."""
    for theirs, ours in OPEN_CLIP_TOWERS.items():
        if not key.startswith(theirs):
            continue
        index, _, name = key.removeprefix(theirs).partition(".")
        prefix = f"{ours}{index}."
        if name in ("attn.in_proj_weight", "attn.in_proj_bias"):
            # One packed (3 * width) x width projection: rows are q, then k, then v.
            suffix = name.removeprefix("attn.in_proj_")
            for part, chunk in zip(("q", "k", "v"), tensor.chunk(3, dim=0)):
                out[f"{prefix}self_attn.{part}_proj.{suffix}"] = chunk
            return True
        module, _, param = name.rpartition(".")
        if module in OPEN_CLIP_BLOCK_NAMES:
            out[f"{prefix}{OPEN_CLIP_BLOCK_NAMES[module]}.{param}"] = tensor
            return True
    return False


def open_clip_config(tensors: dict[str, torch.Tensor], source: str, activation: str, head_width: int = 64) -> CLIPConfig:
    """CLIPConfig read from an open_clip file's shapes. Head counts are not in the shapes: every
    OpenAI and LAION ViT CLIP uses 64-wide heads (ViT-B/32: 12 image, 8 text; ViT-L/14: 16, 12)."""
    needed = (
        "visual.conv1.weight", "visual.positional_embedding", "visual.proj", "token_embedding.weight",
        "positional_embedding", "visual.transformer.resblocks.0.mlp.c_fc.weight", "transformer.resblocks.0.mlp.c_fc.weight",
    )
    missing = [key for key in needed if key not in tensors]
    if missing:
        raise WeightsError(f"{source}: not an open_clip ViT CLIP file (no {', '.join(missing)})")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    conv = tensors["visual.conv1.weight"]  # width x 3 x patch x patch
    patches_per_side = round((tensors["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    vision_width, text_width = conv.shape[0], tensors["token_embedding.weight"].shape[1]
    return CLIPConfig(
        vision=VisionTransformerConfig(
            image_size=conv.shape[-1] * patches_per_side,
            patch_size=conv.shape[-1],
            width=vision_width,
            layers=_count_blocks(tensors, "visual.transformer.resblocks."),
            heads=vision_width // head_width,
            mlp_width=tensors["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            activation=activation,
        ),
        text=TextEncoderConfig(
            vocab_size=tensors["token_embedding.weight"].shape[0],
            context_length=tensors["positional_embedding"].shape[0],
            width=text_width,
            layers=_count_blocks(tensors, "transformer.resblocks."),
            heads=text_width // head_width,
            mlp_width=tensors["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            activation=activation,
        ),
        projection_dim=tensors["visual.proj"].shape[1],
    )


def _count_blocks(tensors: dict[str, torch.Tensor], prefix: str) -> int:
    return len({key.removeprefix(prefix).split(".")[0] for key in tensors if key.startswith(prefix)})

