"""Whole Stable Diffusion 1.x, 2.x and XL pipelines from and to checkpoint files: `load_pipeline`, `save_pipeline`.

In: an SD single file (`.safetensors`, or `.ckpt`/`.pt` read weights-only; see single_file.py),
a diffusers folder (diffusers_folder.py), or a minidream run folder (its `model.safetensors`).
Out: the SD single file (what A1111 and ComfyUI open) or a diffusers folder.

Models are built on the meta device, without random initialisation, and take the file's
memory-mapped tensors by assignment, so loading costs about one copy of the weights in RAM
(none more until the weights are used; a dtype cast makes the one copy in the new dtype).
"""

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from minidream.config import ModelConfig
from minidream.io.diffusers_folder import (
    is_diffusers_folder,
    read_diffusers_folder,
    write_diffusers_folder,
)
from minidream.io.lora_files import apply_lora_file
from minidream.io.single_file import (
    ema_tensors,
    read_single_file,
    single_file_metadata,
    single_file_tensors,
)
from minidream.io.tensor_files import (
    POSITION_IDS,
    StoredPipeline,
    Tensors,
    WeightsError,
    cast,
    check_tensors,
    meta_shapes,
    write_safetensors,
)
from minidream.models.open_clip_text import OpenCLIPTextModel
from minidream.models.pipeline import Pipeline, text_encoder_class
from minidream.models.precision import vae_dtype
from minidream.models.unet import UNet
from minidream.models.vae import AutoencoderKL

FORMATS = ("single-file", "diffusers")
RUN_FOLDER_WEIGHTS = "model.safetensors"  # what train.py exports into its run folder


def load_pipeline(
    path: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    use_ema: bool = False,
    loras: Sequence[tuple[str | Path, float]] = (),
    prediction_type: str | None = None,
) -> Pipeline:
    """The pipeline stored at `path` (a single file, a diffusers folder or a run folder).

    dtype: cast while loading (fp16 keeps the VAE fp32, as `Pipeline.to` does); None keeps the
    file's dtypes. use_ema: take the UNet from a training checkpoint's `model_ema.*` tensors.
    loras: (LoRA file, strength) pairs merged into the weights in order, as UIs apply them:
    each in fp32 and rounded once into the loaded dtype (io/lora_files.py `merge_lora`).
    prediction_type: "epsilon" | "v_prediction" for a single file that does not record it (SD 2.x
    files do not say; without it single_file.sd2_prediction_type decides and says how; SDXL files
    may carry markers, sdxl_layout.schedule); a file or folder that records another one is refused.
    Raises WeightsError, whose one-line message names the file and what is wrong with it.
    """
    pipe = assemble_pipeline(read_weights(Path(path), use_ema, prediction_type), dtype)
    for lora_path, scale in loras:  # on the host, before any move: the same weights on every device
        apply_lora_file(pipe, lora_path, scale)
    return pipe if device is None else pipe.to(device)


def save_pipeline(
    pipe: Pipeline, path: str | Path, format: str = "single-file", dtype: torch.dtype | None = torch.float16,
    unet_ema: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write `pipe` as an SD single file (`path` ends in .safetensors) or as a diffusers folder.

    dtype: floating-point tensors are written in it (fp16 by default, as SD releases are);
    None writes them as they are in memory. unet_ema: an EMA of the UNet's weights (its names),
    written beside the model as LDM's `model_ema.*`, which `load_pipeline(use_ema=True)` reads
    (single files only: a diffusers folder holds one UNet). The write is atomic: on failure
    nothing is left.
    """
    path = Path(path)
    if format == "single-file":
        if path.suffix != ".safetensors":
            raise WeightsError(
                f"{path}: a single file must be named *.safetensors (UIs choose the reader by the suffix)"
            )
        tensors = single_file_tensors(pipe, dtype) | ema_tensors(unet_ema or {}, dtype)
        write_safetensors(tensors, path, single_file_metadata(pipe.config))
    elif unet_ema is not None:
        raise WeightsError(f"{path}: a diffusers folder holds one UNet; write the EMA weights as a single file")
    elif format == "diffusers":
        write_diffusers_folder(pipe, path, dtype)
    else:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")


def model_config(path: str | Path) -> ModelConfig:
    """The architecture of the pipeline stored at `path`, without building it (its tensors are
    only memory-mapped): what a LoRA for it must fit."""
    return read_weights(Path(path), use_ema=False).config


def read_weights(path: Path, use_ema: bool, prediction_type: str | None = None) -> StoredPipeline:
    if not path.exists():
        raise WeightsError(f"{path}: no such file or folder")
    if path.is_file():
        return read_single_file(path, use_ema, prediction_type)
    if is_diffusers_folder(path):
        if use_ema:
            raise WeightsError(
                f"{path}: a diffusers folder holds one UNet; use_ema applies to single files with model_ema.* tensors"
            )
        stored = read_diffusers_folder(path)
        recorded = stored.config.schedule.prediction_type
        if prediction_type is not None and prediction_type != recorded:
            raise WeightsError(f"{path}: its scheduler config records prediction_type {recorded!r}, not {prediction_type!r}")
        return stored
    if (path / RUN_FOLDER_WEIGHTS).is_file():
        return read_single_file(path / RUN_FOLDER_WEIGHTS, use_ema, prediction_type)
    raise WeightsError(
        f"{path}: neither a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/) "
        f"nor a minidream run folder ({RUN_FOLDER_WEIGHTS})"
    )


def assemble_pipeline(stored: StoredPipeline, dtype: torch.dtype | None) -> Pipeline:
    cfg = stored.config
    text_encoder = stored.text_encoder._replace(
        tensors={key: tensor for key, tensor in stored.text_encoder.tensors.items() if key != POSITION_IDS}
    )
    second = stored.text_encoder_2
    return Pipeline(
        unet=load_module(UNet, cfg.unet, stored.unet, dtype),
        vae=load_module(AutoencoderKL, cfg.vae, stored.vae, vae_dtype(dtype)),
        text_encoder=load_module(text_encoder_class(cfg.text_encoder), cfg.text_encoder, text_encoder, dtype),
        tokenizer=stored.tokenizer,
        config=cfg,
        text_encoder_2=None if second is None else load_module(OpenCLIPTextModel, cfg.text_encoder_2, second, dtype),
        tokenizer_2=stored.tokenizer_2,
    )


def load_module(model_class: type[nn.Module], cfg, part: Tensors, dtype: torch.dtype | None) -> nn.Module:
    """A model holding `part`'s tensors, after the one check of every name and shape. Built on the
    meta device (no random init) and given the tensors by assignment, not copied: it uses the
    file's memory map."""
    check_tensors(part, meta_shapes(model_class, cfg))
    with torch.device("meta"):
        model = model_class(cfg)
    dtype = dtype if dtype is not None else _common_dtype(part.tensors)
    model.load_state_dict({key: cast(t, dtype) for key, t in part.tensors.items()}, strict=True, assign=True)
    return model


def _common_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype | None:
    """The floating-point dtype all tensors share (None: keep them), or fp32 for a model whose
    file mixes dtypes (some merged checkpoints do): its layers must agree to run."""
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    return None if len(dtypes) <= 1 else torch.float32
