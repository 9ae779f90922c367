"""The SD single-file layout: the whole pipeline in one state dict, as the original releases,
A1111 and ComfyUI have it.

    model.diffusion_model.*          the UNet        (minidream's UNet names after the prefix)
    first_stage_model.*              the VAE
    cond_stage_model.transformer.*   the CLIP text encoder (SD 1.x)
    cond_stage_model.model.*         the OpenCLIP text encoder (SD 2.x; models/open_clip_text.py names)
    model_ema.*                      (training checkpoints) an EMA copy of the UNet
    betas, alphas_cumprod, ...       (training checkpoints) LDM's noise-schedule buffers
    conditioner.embedders.*          SDXL's two text encoders instead (sdxl_layout.py)

Files minidream writes also carry their ModelConfig as JSON in the safetensors metadata, so a
non-SD-1.5 shape (the tiny test model) or a v-prediction schedule survives the round trip.
Files without it get SD 1.5's config, SD 2.1's when they hold the OpenCLIP text encoder, or
SDXL base's when they hold SDXL's; an SD 2.x file's prediction type is not in its keys, see
`sd2_prediction_type`, an SDXL file's is in its markers, see `sdxl_layout.schedule`.
"""

import dataclasses
import json
import warnings
from pathlib import Path

import torch

from minidream.config import (
    PREDICTION_TYPES,
    SD15,
    SD21_BASE,
    SDXL,
    ModelConfig,
    ScheduleConfig,
    TextEncoderConfig,
    UNetConfig,
    from_dict,
    to_dict,
)
from minidream.diffusion import schedule
from minidream.io import open_clip_layout, sdxl_layout
from minidream.io.tensor_files import (
    StoredPipeline,
    Tensors,
    WeightsError,
    cast,
    meta_shapes,
    mismatch,
    read_tensor_file,
    unsupported,
    with_text_model_prefix,
)
from minidream.models.lora import base_state_dict
from minidream.models.pipeline import Pipeline, default_tokenizer
from minidream.models.unet import UNet

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
EMA_PREFIX = "model_ema."
EMA_BOOKKEEPING = {"model_ema.decay", "model_ema.num_updates"}
# LDM's DDPM.register_schedule: all derived from betas, so only betas and alphas_cumprod are checked.
SCHEDULE_BUFFERS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
}
CONFIG_METADATA_KEY = "minidream_config"
LORA_MARKERS = ("lora", "hada_", "lokr_")  # LoRA (kohya, PEFT, diffusers) and LyCORIS key names


def read_single_file(path: Path, use_ema: bool, prediction_type: str | None = None) -> StoredPipeline:
    """prediction_type: what a file without minidream's metadata predicts (None: SD 1.x files
    predict noise, SD 2.x files are told apart by `sd2_prediction_type`, SDXL files by their markers)."""
    tensors, metadata = read_tensor_file(path)
    what = unsupported_kind(tensors)
    if what is not None:
        raise unsupported(path, what)
    config = _config_from_metadata(path, metadata, tensors, prediction_type)
    _check_schedule_buffers(path, tensors, config.schedule)
    sdxl = config.text_encoder_2 is not None
    sd2_layout = any(key.startswith(OPEN_CLIP_PREFIX) for key in tensors)
    generation = "SDXL" if sdxl else "SD 2.x" if sd2_layout else "SD 1.x"
    sd_text_prefix = OPEN_CLIP_PREFIX if sd2_layout else TEXT_ENCODER_PREFIX
    components = (UNET_PREFIX, VAE_PREFIX, EMA_PREFIX, *(sdxl_layout.TEXT_PREFIXES if sdxl else (sd_text_prefix,)))
    extra_keys = SCHEDULE_BUFFERS | (sdxl_layout.MARKERS if sdxl else set())
    unexpected = sorted(k for k in tensors if not k.startswith(components) and k not in extra_keys)
    if unexpected:
        raise mismatch(str(path), f"the {generation} single-file layout", [], unexpected, [])
    if use_ema:
        unet = _ema_unet(path, tensors, config.unet, generation)
    else:
        unet = Tensors(_strip(tensors, UNET_PREFIX), str(path), f"the {generation} UNet", UNET_PREFIX)
    if sdxl:
        text_encoder, text_encoder_2 = sdxl_layout.text_encoders(path, tensors)
    else:
        text_encoder, text_encoder_2 = _sd_text_encoder(path, tensors, config.text_encoder, sd_text_prefix), None
    return StoredPipeline(
        config=config,
        tokenizer=default_tokenizer(config.text_encoder),
        unet=unet,
        vae=Tensors(_strip(tensors, VAE_PREFIX), str(path), f"the {generation} VAE", VAE_PREFIX),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer_2=default_tokenizer(config.text_encoder_2) if sdxl else None,
    )


def _sd_text_encoder(path: Path, tensors: dict[str, torch.Tensor], cfg: TextEncoderConfig, text_prefix: str) -> Tensors:
    """SD 1.x's CLIP or SD 2.x's OpenCLIP text encoder, under the names of the model `cfg` builds."""
    text_tensors = _strip(tensors, text_prefix)
    if cfg.open_clip:
        return Tensors(text_tensors, str(path), "the SD 2.x OpenCLIP text encoder", text_prefix)
    if text_prefix == OPEN_CLIP_PREFIX:  # SD 2.x's layers, for a transformers-layout model (see single_file_tensors)
        return Tensors(
            open_clip_layout.to_transformers(text_tensors, cfg.layers + 1, strict=False),
            str(path), "the SD 2.x text encoder (transformers layout)", text_prefix,
            renamed={theirs: ours for ours, theirs in open_clip_layout.renames(cfg.layers).items()},
        )
    return Tensors(with_text_model_prefix(text_tensors), str(path), "the SD 1.x CLIP text encoder", text_prefix)


def unsupported_kind(tensors: dict[str, torch.Tensor]) -> str | None:
    """What the file is when it is not an SD 1.x, 2.x or XL checkpoint minidream can load (None
    when it is one), from its key names and the shapes that tell the SD generations apart."""
    keys = tensors.keys()
    if any(marker in key for key in keys for marker in LORA_MARKERS):
        return "a LoRA (or LyCORIS) file, which modifies a model rather than being one"
    if not any(key.startswith(UNET_PREFIX) for key in keys):
        if "encoder.conv_in.weight" in keys and "decoder.conv_in.weight" in keys:
            return "a standalone VAE, not a whole pipeline"
        first = ", ".join(sorted(keys)[:3]) or "none"
        return f"not a Stable Diffusion checkpoint (no {UNET_PREFIX}* tensors; first keys: {first})"
    if any(key.startswith(sdxl_layout.SGM_PREFIX) for key in keys):
        return sdxl_layout.unsupported_kind(tensors)
    if any(key.startswith(("embedder.", "noise_augmentor.")) for key in keys):
        return "an SD 2.x unCLIP model (image-embedding conditioning), which is not supported"
    if any(key.startswith(UNET_PREFIX + "label_emb.") for key in keys):
        return "a UNet with class/size conditioning (label_emb), as SDXL and SD 2.x unCLIP have"
    conv_in = tensors.get(UNET_PREFIX + "input_blocks.0.0.weight")
    in_channels = conv_in.shape[1] if conv_in is not None and conv_in.ndim == 4 else 4
    generation = "an SD 2.x" if is_sd2(tensors) else "an SD 1.x"
    if in_channels == 9:
        return f"{generation} inpainting model (UNet with 9 input channels), which is not supported"
    if in_channels == 5 or any(key.startswith("depth_model.") for key in keys):
        return f"{generation} depth-to-image model (UNet with 5 input channels), which is not supported"
    return None


def is_sd2(tensors: dict[str, torch.Tensor]) -> bool:
    """SD 2.x by its keys (OpenCLIP's text tower) or shapes (a 1024-wide cross-attention context)."""
    if any(key.startswith(OPEN_CLIP_PREFIX) for key in tensors):
        return True
    cross_attention = [k for k in tensors if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")]
    return any(tensors[k].shape[-1] == 1024 for k in cross_attention)


# ComfyUI's rule (comfy/supported_models.py, SD20.model_type): in SD 2.x's UNet, the first
# layer norm of the last output transformer has biases spread out in the 768-v models and
# close to zero in the 512 epsilon ones. A1111 (sd_models_config.py) runs a test forward pass
# instead; this rule needs no model built.
LAST_RESBLOCK = "transformer.resblocks.23.ln_1.weight"  # ViT-H/14's 24th, which SD 2.x never runs
V_PREDICTION_PROBE = UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
V_PREDICTION_MIN_STD = 0.09


def sd2_prediction_type(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """An SD 2.x file's prediction type from its weights, saying in one line which rule decided."""
    probe = tensors.get(V_PREDICTION_PROBE)
    if probe is None:
        decided, why = "epsilon", f"it has no {V_PREDICTION_PROBE}"
    else:
        std = probe.float().std(unbiased=False).item()
        decided = "v_prediction" if std > V_PREDICTION_MIN_STD else "epsilon"
        why = f"the std of {V_PREDICTION_PROBE} is {std:.3f} ({'>' if std > V_PREDICTION_MIN_STD else '<='} 0.09)"
    warnings.warn(
        f"{path}: an SD 2.x file without a recorded prediction type; loading it as {decided} by ComfyUI's rule: "
        f"{why}. Pass prediction_type (sample.py/train.py: --prediction-type) if that is wrong.",
        stacklevel=2,
    )
    return decided


def ema_key(unet_key: str) -> str:
    """LDM's LitEma stores the EMA of parameter `diffusion_model.<key>` as a buffer named after
    it with the dots removed: input_blocks.0.0.weight -> model_ema.diffusion_modelinput_blocks00weight."""
    return EMA_PREFIX + ("diffusion_model." + unet_key).replace(".", "")


def _ema_unet(path: Path, tensors: dict[str, torch.Tensor], cfg: UNetConfig, generation: str) -> Tensors:
    """The UNet from the EMA buffers, under the UNet's names; weights.py checks them like any part."""
    if not any(k.startswith(EMA_PREFIX) and k not in EMA_BOOKKEEPING for k in tensors):
        raise WeightsError(
            f"{path}: has no EMA weights (no model_ema.* tensors); load it without use_ema / --ema "
            "(an '-emaonly' file already holds the EMA weights as its model)"
        )
    renamed = {name: ema_key(name) for name in meta_shapes(UNet, cfg)}
    present = {name: tensors[key] for name, key in renamed.items() if key in tensors}
    return Tensors(present, f"{path} (EMA weights)", f"the {generation} UNet", renamed=renamed)


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix):]: tensor for key, tensor in tensors.items() if key.startswith(prefix)}


def _config_from_metadata(
    path: Path, metadata: dict[str, str], tensors: dict[str, torch.Tensor], prediction_type: str | None
) -> ModelConfig:
    """The file's recorded config; else SD 1.5's, SD 2.1's or SDXL base's, with the prediction type
    given or detected."""
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise WeightsError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
    text = metadata.get(CONFIG_METADATA_KEY)
    if text is not None:
        try:
            config = from_dict(ModelConfig, json.loads(text), where=f"{path} metadata {CONFIG_METADATA_KEY}")
        except ValueError as error:  # bad JSON or a ConfigError
            raise WeightsError(f"{path}: unreadable {CONFIG_METADATA_KEY} metadata ({error})") from None
        recorded = config.schedule.prediction_type
        if prediction_type is not None and prediction_type != recorded:
            raise WeightsError(f"{path}: its metadata records prediction_type {recorded!r}, not {prediction_type!r}")
        return config
    if sdxl_layout.has_sdxl_keys(tensors):
        unet_keys = [key[len(UNET_PREFIX):] for key in tensors if key.startswith(UNET_PREFIX)]
        what = sdxl_layout.distilled_kind(unet_keys, list(meta_shapes(UNet, SDXL.unet)))
        if what is not None:
            raise unsupported(path, what)
        schedule_cfg = sdxl_layout.schedule(path, tensors, metadata, prediction_type, SDXL.schedule)
        return dataclasses.replace(SDXL, schedule=schedule_cfg)
    if not is_sd2(tensors):
        config = SD15
    elif not any(key.startswith(OPEN_CLIP_PREFIX) for key in tensors):
        raise WeightsError(f"{path}: an SD 2.x UNet (1024-wide context) without the OpenCLIP text encoder "
                           f"({OPEN_CLIP_PREFIX}*); SD 2.x single files hold both")
    else:
        config = SD21_BASE
        if OPEN_CLIP_PREFIX + LAST_RESBLOCK not in tensors:  # written without it, as diffusers' export script does
            config = dataclasses.replace(config, text_encoder=open_clip_layout.transformers_config(config.text_encoder))
        prediction_type = prediction_type or sd2_prediction_type(path, tensors)
    if prediction_type is None:
        return config
    return dataclasses.replace(config, schedule=dataclasses.replace(config.schedule, prediction_type=prediction_type))


def _check_schedule_buffers(path: Path, tensors: dict[str, torch.Tensor], cfg: ScheduleConfig) -> None:
    """A training checkpoint's betas must be the schedule the sampler will use; fp16 files
    store them to ~5e-4 relative precision, hence the tolerance."""
    betas = schedule.betas_of(cfg)
    for name, expected in (("betas", betas), ("alphas_cumprod", schedule.alphas_cumprod(betas))):
        found = tensors.get(name)
        if found is None:
            continue
        if found.shape != expected.shape or not torch.allclose(found.float(), expected, rtol=1e-3, atol=0):
            raise WeightsError(
                f"{path}: its {name} buffer is not SD 1.x's noise schedule ({cfg.beta_schedule} "
                f"{cfg.beta_start}..{cfg.beta_end} over {cfg.num_train_timesteps} steps)"
            )


def single_file_tensors(pipe: Pipeline, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The whole pipeline under the SD or SDXL prefixes, floating-point tensors cast to `dtype`
    (None: as is); an SDXL pipeline's v-prediction markers beside them.

    Only the base weights: a model with live LoRA adapters is written without them (UIs would
    not know the keys; save_lora writes the adapters, models.lora.merge folds them in first)."""
    if pipe.text_encoder_2 is not None:
        text = sdxl_layout.text_tensors(pipe) | sdxl_layout.marker_tensors(pipe.config.schedule)
    else:
        text = _sd_text_tensors(pipe)
    parts = ((UNET_PREFIX, pipe.unet), (VAE_PREFIX, pipe.vae))
    tensors = {prefix + key: tensor for prefix, module in parts for key, tensor in base_state_dict(module).items()}
    return {key: cast(tensor, dtype) for key, tensor in (tensors | text).items()}


def _sd_text_tensors(pipe: Pipeline) -> dict[str, torch.Tensor]:
    cfg = pipe.config.text_encoder
    text = base_state_dict(pipe.text_encoder)
    if cfg.open_clip:
        return {OPEN_CLIP_PREFIX + key: tensor for key, tensor in text.items()}
    if cfg.activation == "gelu":
        # An OpenCLIP tower in transformers' layout (an SD 2.x diffusers folder): SD 2's names, so
        # that UIs open it, with the layers SD 2.x runs (its last resblock is not in such folders).
        text = open_clip_layout.to_open_clip(text, cfg.layers)
        return {OPEN_CLIP_PREFIX + key: tensor for key, tensor in text.items()}
    return {TEXT_ENCODER_PREFIX + key: tensor for key, tensor in text.items()}


def ema_tensors(unet_ema: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """An EMA of the UNet (under the UNet's names) as LDM training checkpoints hold it: `model_ema.*`."""
    return {ema_key(key): cast(tensor, dtype) for key, tensor in unet_ema.items()}


def single_file_metadata(config: ModelConfig) -> dict[str, str]:
    # "format": "pt" is what transformers and diffusers expect in safetensors metadata.
    metadata = {"format": "pt", CONFIG_METADATA_KEY: json.dumps(to_dict(config))}
    return metadata | (sdxl_layout.marker_metadata(config.schedule) if config.text_encoder_2 is not None else {})
