"""LoRA files: the kohya/A1111 layout (what ComfyUI and AUTOMATIC1111 map) and the diffusers/PEFT
layout, both ways, and merging a file into a pipeline's weights. LyCORIS (LoHa, LoKr), DoRA
(`dora_scale`) and full-diff tensors in the kohya layout are read too (io/adapter_files.py) and
merged as ComfyUI merges them (models/adapters.py); only plain LoRA files are written.

kohya names a layer by its diffusers module path with every "." as "_" under `lora_unet_` or
`lora_te_` (`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`), with
`.lora_down.weight`, `.lora_up.weight` and a scalar `.alpha`; some tools write minidream's own
(LDM) module paths the same way (`lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q`).
The underscores cannot be turned back into dots by rule (`to_q`, `proj_in`, `transformer_blocks`),
so names are matched against a table of every Linear/Conv2d of the model written both ways.
diffusers writes `unet.<diffusers path>.lora_A.weight` / `.lora_B.weight` (older files:
`.lora.down.weight`, `.processor.to_q_lora.down.weight`, `.lora_linear_layer.down.weight`);
its files carry no alpha (scale 1) unless `lora_adapter_metadata` gives PEFT's `lora_alpha`.
minidream writes diffusers files with alpha/rank folded into lora_B, so every reader of that
layout, with or without the metadata, applies the same change as the kohya file.

SD 2.x's text encoder is trained by kohya and diffusers as transformers' 23-layer CLIPTextModel,
so its files name `text_model.encoder.layers.N.self_attn.q_proj` etc. (kohya:
`lora_te_text_model_encoder_layers_N_self_attn_q_proj`) whichever layout the base model has;
in OpenCLIP's tower (SD 2.x single files) those are the slices `attn.in_proj_q/k/v` of the fused
in_proj_weight, `attn.out_proj`, `mlp.c_fc`, `mlp.c_proj` (io/open_clip_layout.py's table).
A1111 and kohya map to OpenCLIP names (`model_transformer_resblocks_N_attn_q_proj`) only in
memory; no file layout with them is read.

SDXL files add a second text encoder, OpenCLIP ViT-bigG/14, trained as transformers' 32-layer
CLIPTextModelWithProjection: `lora_te1_` (CLIP-L) and `lora_te2_` (bigG) in kohya's layout,
`text_encoder.` and `text_encoder_2.` in diffusers'; kohya names an SDXL UNet's layers by their
SAI paths (io/lora_names.py has the names). minidream writes SDXL files as kohya does, with its
`ss_*` and `modelspec.*` metadata, and never `lora_te2_text_projection` (OneTrainer wrote it;
diffusers and SD.Next refused those files, OneTrainer issues #47 and #314). A file for SDXL on
an SD 1.x/2.x model, or the reverse, is refused in one line naming the family it is for.
"""

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import safetensors
import torch
from torch import nn

from minidream.config import SD15, ModelConfig, ScheduleConfig, TrainConfig, TrainSection, optimizer_settings
from minidream.files import file_sha256
from minidream.io.adapter_files import (
    LYCORIS_ROLES,
    Problem,
    Roles,
    kind_of,
    lycoris_change,
    merge_change,
    touched_tensors,
    with_magnitude,
)
from minidream.io.lora_names import (
    DIFFUSERS_PREFIXES,
    KOHYA_PREFIXES,
    Layer,
    family,
    file_modules,
    kohya_module,
    kohya_prefixes,
    model_layers,
    refuse_other_text_encoders,
    refuse_other_widths,
)
from minidream.io.single_file import LORA_MARKERS
from minidream.io.tensor_files import (
    WeightsError,
    mismatch,
    read_tensor_file,
    write_safetensors,
)
from minidream.models.clip import CLIPTextModel
from minidream.models.adapters import Change
from minidream.models.lora import (
    Adapter,
    adapters_of,
    adapters_off,
    lora_scale,
)
from minidream.models.open_clip_text import OpenCLIPTextModel
from minidream.models.pipeline import Pipeline
from minidream.models.unet import UNet

FORMATS = ("kohya", "diffusers")
# Keys of adapter kinds that are not LoRA, and the one line that names them.
NOT_LORA = "minidream reads LoRA, LoCon, LoHa, LoKr, DoRA (dora_scale) and full-diff files (docs/lora.md)"
OTHER_KINDS = [
    ("lora_magnitude_vector", f"a diffusers/PEFT DoRA file (lora_magnitude_vector keys, which ComfyUI does "
                              f"not read either); {NOT_LORA}"),
    ("lora_mid", f"a LyCORIS LoCon with Tucker-decomposed convs (lora_mid keys); {NOT_LORA}"),
    ("oft_", f"an OFT/BOFT (LyCORIS) file; {NOT_LORA}"),
    (".a1.weight", f"a GLoRA (LyCORIS) file; {NOT_LORA}"),
]
# What kohya's sai_model_spec.py records in an SDXL LoRA (ModelSpec, github.com/Stability-AI/ModelSpec).
SDXL_MODELSPEC = {
    "modelspec.sai_model_spec": "1.0.0",
    "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
    "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
    "modelspec.resolution": "1024x1024",  # kohya's default for SDXL
}


class LoRAFile(NamedTuple):
    """A LoRA file's adapters under minidream's layer names, in minidream's shapes: `Adapter`s
    (LoRA, LoCon), or for a LyCORIS/DoRA file any of minidream.models.adapters' kinds."""

    unet: dict[str, Change]
    text_encoder: dict[str, Change]
    metadata: dict[str, str]
    text_encoder_2: dict[str, Change] = {}  # SDXL's bigG; the shared empty default is never mutated

    def parts(self) -> dict[str, dict[str, Change]]:
        """The adapters of each model part, by the part's Pipeline attribute name."""
        return {"unet": self.unet, "text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}

    def is_lora(self) -> bool:
        """Only plain LoRA (and LoCon) adapters: what the kohya and diffusers writers can write."""
        return all(isinstance(change, Adapter) for part in self.parts().values() for change in part.values())


# ---- writing ------------------------------------------------------------------------------------


def save_lora(
    path: str | Path,
    unet: UNet,
    text_encoder: CLIPTextModel | OpenCLIPTextModel | None = None,
    format: str = "kohya",
    dtype: torch.dtype = torch.float16,
    settings: dict[str, str] | None = None,
    *,
    text_encoder_2: OpenCLIPTextModel | None = None,
    schedule: ScheduleConfig | None = None,
) -> None:
    """Write the adapters of `unet` (and of `text_encoder`, and SDXL's `text_encoder_2`) as a LoRA
    file; see `write_lora_file`. schedule: the base model's (an SDXL file records its prediction
    type; default: noise prediction)."""
    adapters = [adapters_of(model) if model is not None else {} for model in (text_encoder, text_encoder_2)]
    lora = LoRAFile(adapters_of(unet), adapters[0], {}, adapters[1])
    cfg = ModelConfig(
        text_encoder=text_encoder.config if text_encoder is not None else SD15.text_encoder,
        unet=unet.config,
        schedule=schedule or ScheduleConfig(),
        text_encoder_2=text_encoder_2.config if text_encoder_2 is not None else None,
    )
    write_lora_file(path, lora, cfg, format, dtype, settings)


def write_lora_file(
    path: str | Path,
    lora: LoRAFile,
    cfg: ModelConfig,
    format: str = "kohya",
    dtype: torch.dtype = torch.float16,
    settings: dict[str, str] | None = None,
) -> None:
    """Write `lora` atomically as safetensors in the kohya (default) or diffusers layout.

    dtype: of the down/up tensors (fp16 as kohya writes them); a kohya `.alpha` stays fp32.
    settings: extra metadata (str -> str), e.g. the training settings kohya records as `ss_*`;
    they win over the computed metadata.
    """
    path = Path(path)
    if format not in FORMATS:
        raise ValueError(f"LoRA format must be one of {', '.join(FORMATS)}, got {format!r}")
    if path.suffix != ".safetensors":
        raise WeightsError(f"{path}: a LoRA file must be named *.safetensors (UIs choose the reader by the suffix)")
    settings = dict(settings or {})
    bad = [key for key, value in settings.items() if not (isinstance(key, str) and isinstance(value, str))]
    if bad:
        raise ValueError(f"LoRA metadata must map str to str; not: {', '.join(map(repr, bad[:3]))}")
    layers = {part: {layer.minidream: layer for layer in part_layers} for part, part_layers in model_layers(cfg).items()}
    tensors = {}
    for part, adapters in lora.parts().items():
        for name, adapter in adapters.items():
            layer = layers[part][name]
            if format == "kohya":
                key = kohya_prefixes(cfg)[part] + kohya_module(part, layer, cfg).replace(".", "_")
                tensors[f"{key}.lora_down.weight"] = adapter.down.to(dtype).contiguous()
                tensors[f"{key}.lora_up.weight"] = adapter.up.to(dtype).contiguous()
                tensors[f"{key}.alpha"] = torch.tensor(float(adapter.alpha))
            else:  # lora_B carries the scale: diffusers' own files mean alpha = rank
                key = DIFFUSERS_PREFIXES[part] + layer.diffusers
                tensors[f"{key}.lora_A.weight"] = adapter.down.to(dtype).contiguous()
                tensors[f"{key}.lora_B.weight"] = (lora_scale(adapter.alpha, adapter.rank) * adapter.up.float()).to(
                    dtype).contiguous()
    metadata = kohya_metadata(lora, cfg, title=path.stem) if format == "kohya" else {"format": "pt"}
    write_safetensors(tensors, path, {**metadata, **settings})


def kohya_metadata(lora: LoRAFile, cfg: ModelConfig, title: str = "LoRA") -> dict[str, str]:
    """What kohya's train_network.py records about the network, from the adapters themselves;
    for SDXL also its ModelSpec (sd-scripts library/sai_model_spec.py), titled `title`."""
    adapters = [adapter for part in lora.parts().values() for adapter in part.values()]
    if not adapters:
        raise ValueError("no adapters to write: add_lora the model first")
    first = adapters[0]
    v2 = cfg.unet.context_dim == 1024 or cfg.text_encoder.open_clip  # SD 2.x (the tiny SD 2 too)
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(first.rank),
        "ss_network_alpha": _number(first.alpha),
        "ss_base_model_version": "sdxl_base_v1-0" if cfg.is_sdxl else "sd_v2" if v2 else "sd_v1",
        "ss_v2": str(v2),
    }
    if cfg.is_sdxl:
        v_prediction = cfg.schedule.prediction_type == "v_prediction"
        metadata |= {**SDXL_MODELSPEC, "modelspec.title": title,
                     "modelspec.prediction_type": "v" if v_prediction else "epsilon"}
    convs = [a for a in adapters if a.down.ndim == 4 and a.down.shape[-1] > 1]
    if convs:  # kohya's LoCon: the 3x3 convs' own dim and alpha
        metadata["ss_network_args"] = json.dumps(
            {"conv_dim": str(convs[0].rank), "conv_alpha": _number(convs[0].alpha)})
    return metadata


# The class each train.optimizer builds (training/optimizers.py), as kohya records it: module.ClassName.
KOHYA_OPTIMIZERS = {
    "adamw": "torch.optim.adamw.AdamW", "adamw8bit": "bitsandbytes.optim.adamw.AdamW8bit", "prodigy": "prodigyopt.prodigy.Prodigy",
    "lion": "lion_pytorch.lion_pytorch.Lion", "adamw-schedulefree": "schedulefree.adamw_schedulefree.AdamWScheduleFree",
    "adafactor": "torch.optim.Adafactor",
}


def kohya_settings(
    cfg: TrainConfig, num_instance_images: int, num_class_images: int, instance_prompts: list[str]
) -> dict[str, str]:
    """The training settings kohya's train_network.py records (`ss_*`), from a minidream run config,
    for `save_lora(settings=...)`; UIs show them in their LoRA info panels. `instance_prompts`:
    every subject's (data.subjects), or the one data.instance_prompt."""
    train = cfg.train
    return {
        "ss_sd_model_name": Path(cfg.model.weights).name if cfg.model.weights else cfg.model.architecture,
        "ss_resolution": f"({cfg.data.resolution}, {cfg.data.resolution})",
        "ss_num_train_images": str(num_instance_images),
        "ss_num_reg_images": str(num_class_images),
        "ss_prior_loss_weight": str(train.prior_loss_weight),
        "ss_learning_rate": str(train.lr),
        "ss_unet_lr": str(train.lr),
        "ss_text_encoder_lr": str(train.text_encoder_lr if train.text_encoder_lr is not None else train.lr),
        "ss_lr_scheduler": train.lr_schedule,
        "ss_lr_warmup_steps": str(train.warmup_steps),
        "ss_max_train_steps": str(train.max_steps),
        "ss_batch_size_per_device": str(train.batch_size),
        "ss_gradient_accumulation_steps": str(train.gradient_accumulation_steps),
        "ss_gradient_checkpointing": str(train.gradient_checkpointing),
        "ss_mixed_precision": train.mixed_precision,
        "ss_max_grad_norm": str(train.max_grad_norm),
        "ss_optimizer": kohya_optimizer(train),
        "ss_seed": str(train.seed),
        "ss_training_comment": f"minidream DreamBooth: {', '.join(map(repr, instance_prompts))}",
    }


def kohya_optimizer(train: TrainSection) -> str:
    """kohya's ss_optimizer: the class and the keyword settings it was built with, "Class(key=value,...)"."""
    settings = ",".join(f"{key}={value}" for key, value in optimizer_settings(train).items())
    return f"{KOHYA_OPTIMIZERS[train.optimizer]}({settings})"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


# ---- reading ------------------------------------------------------------------------------------


def is_lora_file(path: str | Path) -> bool:
    """Whether `path` is a .safetensors file of LoRA (or LyCORIS) tensors rather than a model, from
    its header's key names alone (no tensor is read): how convert tells what SRC is."""
    path = Path(path)
    if not path.is_file() or path.suffix != ".safetensors":
        return False
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            keys = list(f.keys())
    except (safetensors.SafetensorError, OSError):
        return False  # not readable as safetensors: the model reader names what is wrong
    return any(marker in key for key in keys for marker in LORA_MARKERS)


def read_lora_file(path: str | Path, cfg: ModelConfig = SD15) -> LoRAFile:
    """The adapters of a kohya (diffusers- or LDM/SAI-style names) or diffusers/PEFT LoRA file, or
    of a LyCORIS/DoRA/full-diff file in the kohya layout, for a model of `cfg`. Raises
    WeightsError, one line naming the file, for anything else."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such LoRA file")
    tensors, metadata = read_tensor_file(path)
    for marker, what in OTHER_KINDS:
        if any(marker in key for key in tensors):
            raise WeightsError(f"{path}: this is {what}")
    refuse_other_text_encoders(path, tensors, cfg)
    if any(key.startswith(KOHYA_PREFIXES) for key in tensors):
        parts = _parse_kohya(path, tensors, cfg)
    elif any(".lora" in key or "_lora." in key for key in tensors):
        parts = _parse_diffusers(path, tensors, cfg, _peft_alphas(path, metadata))
    else:
        raise WeightsError(
            f"{path}: no LoRA tensors (lora_unet_*/lora_te*_* or *.lora_A/lora_B keys); is it a full model?")
    return LoRAFile(parts["unet"], parts["text_encoder"], metadata, parts.get("text_encoder_2", {}))


def _parse_kohya(path: Path, tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, dict[str, Adapter]]:
    layers = model_layers(cfg)
    # kohya name -> (part, minidream name), from every module path a file may use (lora_names)
    table = {}
    for part, prefix in kohya_prefixes(cfg).items():
        for layer in layers[part]:
            for module in file_modules(part, layer, kohya=True):
                table[prefix + module.replace(".", "_")] = (part, layer.minidream)
    roles = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha", **LYCORIS_ROLES}
    found, unknown = {}, []
    for key, tensor in tensors.items():
        stem, role = _split_role(key, roles)
        if role is None or stem not in table:
            unknown.append(key)
            continue
        found.setdefault(table[stem], {})[role] = (key, tensor)
    return _adapters(path, found, unknown, layers, cfg)


# diffusers' suffixes -> the role; old attention-processor names -> the layer they adapt.
DIFFUSERS_ROLES = {
    ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".lora.down.weight": "down", ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",
    ".down.weight": "down", ".up.weight": "up",  # after an old `to_q_lora` processor name
    ".alpha": "alpha",
}
OLD_PROCESSOR_LAYERS = {
    "unet": {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"},
    "text_encoder": {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj", "to_out_lora": "out_proj"},
}


def _parse_diffusers(
    path: Path, tensors: dict[str, torch.Tensor], cfg: ModelConfig, alphas: dict[str, "_PeftAlpha"]
) -> dict[str, dict[str, Adapter]]:
    layers = model_layers(cfg)
    table = {(part, module): (part, layer.minidream) for part, part_layers in layers.items()
             for layer in part_layers for module in file_modules(part, layer, kohya=False)}
    found, unknown = {}, []
    for key, tensor in tensors.items():
        part, name = _diffusers_part(key.removeprefix("base_model.model."))
        stem, role = _split_role(name, DIFFUSERS_ROLES)
        if role is not None and role != "alpha":
            stem = stem.replace(".processor.", ".")
            parent, _, last = stem.rpartition(".")
            old_names = OLD_PROCESSOR_LAYERS["unet" if part == "unet" else "text_encoder"]
            if last in old_names:
                stem = f"{parent}.{old_names[last]}"
        if role is None or (part, stem) not in table:
            unknown.append(key)
            continue
        found.setdefault(table[part, stem], {})[role] = (key, tensor)
    for (part, name), roles in found.items():
        if "alpha" not in roles and part in alphas and "down" in roles:
            diffusers_name = next(layer.diffusers for layer in layers[part] if layer.minidream == name)
            roles["alpha"] = ("", torch.tensor(alphas[part].alpha(diffusers_name, roles["down"][1].shape[0])))
    return _adapters(path, found, unknown, layers, cfg)


def _diffusers_part(key: str) -> tuple[str, str]:
    """(the model part, the key without its prefix); unprefixed keys (PEFT's own
    state dicts, diffusers' oldest attention-processor files) are told apart by their names."""
    for part, prefix in DIFFUSERS_PREFIXES.items():
        if key.startswith(prefix):
            return part, key.removeprefix(prefix)
    return ("text_encoder" if key.startswith(("text_model.", "encoder.layers.")) else "unet"), key


def _split_role(key: str, roles: dict[str, str]) -> tuple[str, str | None]:
    for suffix, role in roles.items():
        if key.endswith(suffix):
            return key.removesuffix(suffix), role
    return key, None


class _PeftAlpha(NamedTuple):
    """PEFT's LoraConfig as diffusers stores it in `lora_adapter_metadata`, for one model part."""

    lora_alpha: float
    alpha_pattern: dict[str, float]
    rslora: bool

    def alpha(self, module: str, rank: int) -> float:
        alpha = next((value for pattern, value in self.alpha_pattern.items()
                      if re.fullmatch(rf"(.*\.)?{pattern}", module)), self.lora_alpha)
        # rsLoRA scales by alpha / sqrt(rank): the same change as kohya's alpha / rank with this alpha
        return alpha * rank**0.5 if self.rslora else alpha


def _peft_alphas(path: Path, metadata: dict[str, str]) -> dict[str, _PeftAlpha]:
    raw = metadata.get("lora_adapter_metadata")
    if raw is None:
        return {}
    try:
        config = json.loads(raw)
        return {
            part: _PeftAlpha(float(config[f"{prefix}lora_alpha"]), dict(config.get(f"{prefix}alpha_pattern") or {}),
                             bool(config.get(f"{prefix}use_rslora", False)))
            for part, prefix in DIFFUSERS_PREFIXES.items()
            if f"{prefix}lora_alpha" in config
        }
    except (ValueError, TypeError, AttributeError):
        raise WeightsError(f"{path}: its lora_adapter_metadata is not diffusers' LoraConfig JSON") from None


def _adapters(
    path: Path,
    found: dict[tuple[str, str], dict[str, tuple[str, torch.Tensor]]],
    unknown: list[str],
    layers: dict[str, list[Layer]],
    cfg: ModelConfig,
) -> dict[str, dict[str, Adapter]]:
    """Check every layer's tensors against the model and build the adapters; one line otherwise."""
    shapes = {(part, layer.minidream): layer.shape for part, part_layers in layers.items() for layer in part_layers}
    refuse_other_widths(path, found, shapes, cfg)
    missing, misshaped = [], []
    parts = {part: {} for part in layers}
    for (part, name), roles in found.items():
        change = _layer_change(roles, shapes[part, name])
        if isinstance(change, Problem):
            (missing if change.missing else misshaped).append(change.message)
        else:
            parts[part][name] = change
    if missing or unknown or misshaped:
        raise mismatch(str(path), f"the LoRA layers of this model ({family(cfg)})", missing, unknown, misshaped)
    return parts


def _layer_change(roles: Roles, shape: torch.Size) -> Change | Problem:
    """One layer's adapter from its tensors (any kind, with DoRA's magnitude), or what is wrong."""
    kind = kind_of(roles)
    if isinstance(kind, Problem):
        return kind
    alpha = roles["alpha"][1].float().reshape(-1)[0].item() if "alpha" in roles else None
    change = _lora_adapter(roles, shape, alpha) if kind == "LoRA" else lycoris_change(kind, roles, shape, alpha)
    if "dora_scale" in roles and not isinstance(change, Problem):
        return with_magnitude(change, roles, shape)
    return change


def _lora_adapter(roles: Roles, shape: torch.Size, alpha: float | None) -> Adapter | Problem:
    if "down" not in roles or "up" not in roles:
        present = (roles.get("down") or roles.get("up") or next(iter(roles.values())))[0]
        return Problem(", ".join(f"{present} has no {role}" for role in ("down", "up") if role not in roles), True)
    (down_key, down), (up_key, up) = roles["down"], roles["up"]
    down, up = _as_layer(down, shape), _as_layer(up, shape)
    expected_down, expected_up = _adapter_shapes(shape, down.shape[0])
    if down.shape != expected_down or up.shape != expected_up:
        return Problem(f"{down_key} {list(down.shape)} / {up_key} {list(up.shape)}, expected "
                       f"{list(expected_down)} / {list(expected_up)}")
    return Adapter(down, up, alpha if alpha else float(down.shape[0]))


def _as_layer(tensor: torch.Tensor, weight_shape: torch.Size) -> torch.Tensor:
    """A 1x1 conv's adapter stored as a Linear's (SD 2.x style proj_in) or the reverse, in the layer's form."""
    if len(weight_shape) == 4 and tensor.ndim == 2 and weight_shape[2:] == (1, 1):
        return tensor[:, :, None, None]
    if len(weight_shape) == 2 and tensor.ndim == 4 and tensor.shape[2:] == (1, 1):
        return tensor[:, :, 0, 0]
    return tensor


def _adapter_shapes(weight_shape: torch.Size, rank: int) -> tuple[torch.Size, torch.Size]:
    """(down, up) shapes for a layer of `weight_shape`: out x in [x kh x kw]."""
    out, inp, *kernel = weight_shape
    if kernel:
        return torch.Size([rank, inp, *kernel]), torch.Size([out, rank, 1, 1])
    return torch.Size([rank, inp]), torch.Size([out, rank])


# ---- using them ---------------------------------------------------------------------------------


@torch.no_grad()
def merge_lora(pipe: Pipeline, lora: LoRAFile, scale: float = 1.0) -> None:
    """W += scale * (alpha / rank) * up . down for every LoRA adapter, and each LyCORIS/DoRA kind
    as ComfyUI folds it (minidream.models.adapters), in fp32, rounded once to W's dtype: what
    ComfyUI and A1111 do when they apply the file at strength `scale`."""
    for model, adapters in _models_and_adapters(pipe, lora):
        for name, change in adapters.items():
            merge_change(model, name, change, scale)


@contextlib.contextmanager
def lora_merged(pipe: Pipeline, lora: LoRAFile, scale: float = 1.0) -> Iterator[Pipeline]:
    """`pipe` with `lora` merged into its weights as UIs merge it, and any live adapters off, for the
    block (e.g. to render validation grids from the exported file); afterwards every weight is
    restored bit for bit from a host copy of the layers the file touches."""
    weights = [tensor for model, adapters in _models_and_adapters(pipe, lora)
               for name, change in adapters.items() for tensor in touched_tensors(model, name, change)]
    saved = [weight.detach().to("cpu", copy=True) for weight in weights]
    with contextlib.ExitStack() as live_adapters_off:
        for model in (pipe.unet, *pipe.text_encoders):
            live_adapters_off.enter_context(adapters_off(model))
        try:
            merge_lora(pipe, lora, scale)
            yield pipe
        finally:
            with torch.no_grad():
                for weight, copy in zip(weights, saved):
                    weight.copy_(copy)


def _models_and_adapters(pipe: Pipeline, lora: LoRAFile) -> list[tuple[nn.Module, dict[str, Change]]]:
    """(model, its adapters) for each part the file adapts (read_lora_file checked that `pipe` has it)."""
    return [(getattr(pipe, part), adapters) for part, adapters in lora.parts().items() if adapters]


def lora_argument(text: str) -> tuple[Path, float]:
    """`PATH[:SCALE]` (sample.py --lora, convert --lora) as (path, scale); scale 1 when absent.
    Only a number after the last colon is a scale, so `C:/loras/x.safetensors` stays a path."""
    path, _, scale = text.rpartition(":")
    try:
        return (Path(path), float(scale)) if path else (Path(text), 1.0)
    except ValueError:
        return Path(text), 1.0


def lora_hash(path: str | Path) -> str:
    """A1111's short hash of a LoRA file (its "Lora hashes" PNG text, Civitai's lookup key): the first
    12 hex digits of the SHA-256 of a .safetensors file's tensor bytes, after the header (kohya's and
    A1111's `addnet_hash_safetensors`, so editing the metadata keeps the hash); of the whole file otherwise."""
    start = 0
    if Path(path).suffix == ".safetensors":
        with open(path, "rb") as f:
            start = 8 + int.from_bytes(f.read(8), "little")  # u64 little-endian header length, then the header
    return file_sha256(path, start)[:12]


def apply_lora_file(pipe: Pipeline, path: str | Path, scale: float = 1.0) -> LoRAFile:
    """Merge the LoRA file at `path` into `pipe`'s UNet and text encoders' weights at strength
    `scale` (what load_pipeline(loras=...) and convert --lora do); returns what was read."""
    lora = read_lora_file(path, pipe.config)
    try:
        merge_lora(pipe, lora, scale)
    except ValueError as error:  # a diff_b for a layer without a bias
        raise WeightsError(f"{path}: {error}") from None
    return lora


def convert_lora_file(
    src: str | Path, dst: str | Path, format: str, cfg: ModelConfig = SD15, dtype: torch.dtype = torch.float16
) -> None:
    """Rewrite a LoRA file of any readable layout in the kohya or diffusers layout; the source's
    own `ss_*` training metadata is kept in a kohya output."""
    lora = read_lora_file(src, cfg)
    if not lora.is_lora():
        raise WeightsError(f"{src}: a LyCORIS/DoRA/full-diff file has no kohya or diffusers LoRA layout to be "
                           "rewritten in; merge it with convert --lora, or extract a LoRA from the merged model")
    kept = {key: value for key, value in lora.metadata.items() if key.startswith("ss_")} if format == "kohya" else {}
    computed = kohya_metadata(lora, cfg) if format == "kohya" else {}
    write_lora_file(dst, lora, cfg, format, dtype, {key: value for key, value in kept.items() if key not in computed})
