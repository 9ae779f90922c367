"""The SD single-file layout: the whole pipeline in one state dict, as the original releases,
A1111 and ComfyUI have it.

    model.diffusion_model.*          the UNet        (minidream's UNet names after the prefix)
    first_stage_model.*              the VAE
    cond_stage_model.transformer.*   the CLIP text encoder
    model_ema.*                      (training checkpoints) an EMA copy of the UNet
    betas, alphas_cumprod, ...       (training checkpoints) LDM's noise-schedule buffers

Files minidream writes also carry their ModelConfig as JSON in the safetensors metadata, so a
non-SD-1.5 shape (the tiny test model) or a v-prediction schedule survives the round trip;
files without it are SD 1.x-shaped and get the SD 1.5 config.
"""

import json
from pathlib import Path

import torch

from minidream.config import (
    SD15,
    ModelConfig,
    ScheduleConfig,
    UNetConfig,
    from_dict,
    to_dict,
)
from minidream.diffusion import schedule
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
from minidream.models.pipeline import Pipeline
from minidream.models.tokenizer import CLIPTokenizer
from minidream.models.unet import UNet

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."
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


def read_single_file(path: Path, use_ema: bool) -> StoredPipeline:
    tensors, metadata = read_tensor_file(path)
    what = unsupported_kind(tensors)
    if what is not None:
        raise unsupported(path, what)
    config = _config_from_metadata(path, metadata)
    _check_schedule_buffers(path, tensors, config.schedule)
    components = (UNET_PREFIX, VAE_PREFIX, TEXT_ENCODER_PREFIX, EMA_PREFIX)
    unexpected = sorted(k for k in tensors if not k.startswith(components) and k not in SCHEDULE_BUFFERS)
    if unexpected:
        raise mismatch(str(path), "the SD single-file layout", [], unexpected, [])
    if use_ema:
        unet = _ema_unet(path, tensors, config.unet)
    else:
        unet = Tensors(_strip(tensors, UNET_PREFIX), str(path), "the SD 1.x UNet", UNET_PREFIX)
    return StoredPipeline(
        config=config,
        tokenizer=CLIPTokenizer(context_length=config.text_encoder.context_length),
        unet=unet,
        vae=Tensors(_strip(tensors, VAE_PREFIX), str(path), "the SD 1.x VAE", VAE_PREFIX),
        text_encoder=Tensors(
            with_text_model_prefix(_strip(tensors, TEXT_ENCODER_PREFIX)), str(path), "the SD 1.x CLIP text encoder",
            TEXT_ENCODER_PREFIX,
        ),
    )


def unsupported_kind(tensors: dict[str, torch.Tensor]) -> str | None:
    """What the file is when it is not an SD 1.x checkpoint minidream can load (None when it
    is one), from its key names and the shapes that tell the SD generations apart."""
    keys = tensors.keys()
    if any(marker in key for key in keys for marker in LORA_MARKERS):
        return "a LoRA (or LyCORIS) file, which modifies a model rather than being one"
    if any(key.startswith("conditioner.embedders.") for key in keys):
        return "an SDXL checkpoint"
    if any(key.startswith("cond_stage_model.model.") for key in keys):
        return "an SD 2.x checkpoint (OpenCLIP text encoder under cond_stage_model.model.*)"
    if not any(key.startswith(UNET_PREFIX) for key in keys):
        if "encoder.conv_in.weight" in keys and "decoder.conv_in.weight" in keys:
            return "a standalone VAE, not a whole pipeline"
        first = ", ".join(sorted(keys)[:3]) or "none"
        return f"not a Stable Diffusion checkpoint (no {UNET_PREFIX}* tensors; first keys: {first})"
    if any(key.startswith(UNET_PREFIX + "label_emb.") for key in keys):
        return "a UNet with class/size conditioning (label_emb), as SDXL and SD 2.x unCLIP have"
    cross_attention_keys = [k for k in keys if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")]
    if any(tensors[k].shape[-1] == 1024 for k in cross_attention_keys):
        return "an SD 2.x checkpoint (1024-wide text context)"
    conv_in = tensors.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in.ndim == 4 and conv_in.shape[1] == 9:
        return "an inpainting model (UNet with 9 input channels)"
    return None


def ema_key(unet_key: str) -> str:
    """LDM's LitEma stores the EMA of parameter `diffusion_model.<key>` as a buffer named after
    it with the dots removed: input_blocks.0.0.weight -> model_ema.diffusion_modelinput_blocks00weight."""
    return EMA_PREFIX + ("diffusion_model." + unet_key).replace(".", "")


def _ema_unet(path: Path, tensors: dict[str, torch.Tensor], cfg: UNetConfig) -> Tensors:
    """The UNet from the EMA buffers, under the UNet's names; weights.py checks them like any part."""
    if not any(k.startswith(EMA_PREFIX) and k not in EMA_BOOKKEEPING for k in tensors):
        raise WeightsError(
            f"{path}: has no EMA weights (no model_ema.* tensors); load it without use_ema / --ema "
            "(an '-emaonly' file already holds the EMA weights as its model)"
        )
    renamed = {name: ema_key(name) for name in meta_shapes(UNet, cfg)}
    present = {name: tensors[key] for name, key in renamed.items() if key in tensors}
    return Tensors(present, f"{path} (EMA weights)", "the SD 1.x UNet", renamed=renamed)


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix):]: tensor for key, tensor in tensors.items() if key.startswith(prefix)}


def _config_from_metadata(path: Path, metadata: dict[str, str]) -> ModelConfig:
    text = metadata.get(CONFIG_METADATA_KEY)
    if text is None:
        return SD15
    try:
        return from_dict(ModelConfig, json.loads(text), where=f"{path} metadata {CONFIG_METADATA_KEY}")
    except ValueError as error:  # bad JSON or a ConfigError
        raise WeightsError(f"{path}: unreadable {CONFIG_METADATA_KEY} metadata ({error})") from None


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
    """The whole pipeline under the SD prefixes, floating-point tensors cast to `dtype` (None: as is).

    Only the base weights: a model with live LoRA adapters is written without them (UIs would
    not know the keys; save_lora writes the adapters, models.lora.merge folds them in first)."""
    parts = ((UNET_PREFIX, pipe.unet), (VAE_PREFIX, pipe.vae), (TEXT_ENCODER_PREFIX, pipe.text_encoder))
    return {
        prefix + key: cast(tensor, dtype) for prefix, module in parts for key, tensor in base_state_dict(module).items()
    }


def ema_tensors(unet_ema: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """An EMA of the UNet (under the UNet's names) as LDM training checkpoints hold it: `model_ema.*`."""
    return {ema_key(key): cast(tensor, dtype) for key, tensor in unet_ema.items()}


def single_file_metadata(config: ModelConfig) -> dict[str, str]:
    # "format": "pt" is what transformers and diffusers expect in safetensors metadata.
    return {"format": "pt", CONFIG_METADATA_KEY: json.dumps(to_dict(config))}
