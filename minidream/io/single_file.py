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

from minidream.config import SD15, ModelConfig, ScheduleConfig, UNetConfig
from minidream.diffusion import schedule
from minidream.io.tensor_files import Checkpoint, Tensors, WeightsError, mismatch, read_tensor_file, unsupported
from minidream.models.pipeline import Pipeline
from minidream.models.tokenizer import CLIPTokenizer
from minidream.models.unet import UNet
from minidream.training.config_file import from_dict, to_dict

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."
TEXT_MODEL_PREFIX = "text_model."
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


def read_single_file(path: Path, use_ema: bool) -> Checkpoint:
    tensors, metadata = read_tensor_file(path)
    what = identify(tensors)
    if what is not None:
        raise unsupported(path, what)
    config = _config_from_metadata(path, metadata)
    _check_schedule_buffers(path, tensors, config.schedule)
    components = (UNET_PREFIX, VAE_PREFIX, TEXT_ENCODER_PREFIX, EMA_PREFIX)
    unexpected = sorted(k for k in tensors if not k.startswith(components) and k not in SCHEDULE_BUFFERS)
    if unexpected:
        raise mismatch(str(path), "the SD single-file layout", [], unexpected, [])
    if use_ema:
        unet = Tensors(_ema_unet(path, tensors, config.unet), f"{path} (EMA weights)", UNET_PREFIX)
    else:
        unet = Tensors(_strip(tensors, UNET_PREFIX), str(path), UNET_PREFIX)
    return Checkpoint(
        config=config,
        tokenizer=CLIPTokenizer(context_length=config.text_encoder.context_length),
        unet=unet,
        vae=Tensors(_strip(tensors, VAE_PREFIX), str(path), VAE_PREFIX),
        text_encoder=Tensors(
            with_text_model_prefix(_strip(tensors, TEXT_ENCODER_PREFIX)), str(path), TEXT_ENCODER_PREFIX
        ),
    )


def identify(tensors: dict[str, torch.Tensor]) -> str | None:
    """What the file is when it is not an SD 1.x checkpoint (None when it is one), from its
    key names and the shapes that tell the SD generations apart."""
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


def _ema_unet(path: Path, tensors: dict[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    if not any(k.startswith(EMA_PREFIX) and k not in EMA_BOOKKEEPING for k in tensors):
        raise WeightsError(
            f"{path}: has no EMA weights (no model_ema.* tensors); load it without use_ema / --ema "
            "(an '-emaonly' file already holds the EMA weights as its model)"
        )
    with torch.device("meta"):
        names = list(UNet(cfg).state_dict())
    missing = [ema_key(name) for name in names if ema_key(name) not in tensors]
    if missing:
        raise mismatch(f"{path} (EMA weights)", "the SD 1.x UNet", missing, [], [])
    return {name: tensors[ema_key(name)] for name in names}


def with_text_model_prefix(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP text-encoder tensors under transformers' `text_model.` level, which some SD 1.x
    files (saved with old transformers) and transformers >= 5 folders leave out."""
    if any(key.startswith(TEXT_MODEL_PREFIX) for key in tensors):
        return tensors
    return {TEXT_MODEL_PREFIX + key: tensor for key, tensor in tensors.items()}


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
    betas = schedule.make_betas(cfg.beta_schedule, cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end)
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
    """The whole pipeline under the SD prefixes, floating-point tensors cast to `dtype` (None: as is)."""
    parts = ((UNET_PREFIX, pipe.unet), (VAE_PREFIX, pipe.vae), (TEXT_ENCODER_PREFIX, pipe.text_encoder))
    return {
        prefix + key: cast(tensor, dtype) for prefix, module in parts for key, tensor in module.state_dict().items()
    }


def single_file_metadata(config: ModelConfig) -> dict[str, str]:
    # "format": "pt" is what transformers and diffusers expect in safetensors metadata.
    return {"format": "pt", CONFIG_METADATA_KEY: json.dumps(to_dict(config))}


def cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Floating-point tensors to `dtype`; integer ones (and everything when dtype is None) as they are."""
    tensor = tensor.detach()
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
