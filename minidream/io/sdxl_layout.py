"""SDXL's single-file layout (Stability AI's sgm `DiffusionEngine`, as the SDXL releases, A1111,
ComfyUI and the community fine-tunes have it), beside SD 1.x/2.x's in single_file.py:

    model.diffusion_model.*                  the UNet, with `label_emb.0.{0,2}` (the vector conditioning)
    conditioner.embedders.0.transformer.*    CLIP ViT-L/14 under transformers' names (`text_model.*`)
    conditioner.embedders.1.model.*          OpenCLIP ViT-bigG/14 under OpenCLIP's names, with
                                             text_projection (P, used as x @ P) and logit_scale
    first_stage_model.*                      the VAE
    v_pred, ztsnr                            (empty tensors) the community's v-prediction markers

Research note: shared/research/sdxl.md sections 2 and 6.
"""

import dataclasses
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch

from minidream.config import ScheduleConfig
from minidream.io.tensor_files import POSITION_IDS, Tensors, WeightsError, with_text_model_prefix
from minidream.models.lora import base_state_dict
from minidream.models.pipeline import Pipeline

CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
BIGG_PREFIX = "conditioner.embedders.1.model."
SGM_PREFIX = "conditioner.embedders."  # every sgm text encoder, SDXL's and others'
REFINER_PREFIX = "conditioner.embedders.0.model."  # an OpenCLIP tower as the first (only) encoder
TEXT_PREFIXES = (CLIP_L_PREFIX, BIGG_PREFIX)
UNET_INPUT = "model.diffusion_model.input_blocks.0.0.weight"
# transformers' constant 0..76 `position_ids` buffer. SAI's release carries CLIP-L's (ComfyUI
# reports only bigG's as missing when loading it, Comfy-Org/ComfyUI#818) and ComfyUI's SDXL
# export writes it (supported_models.py, SDXL.process_clip_state_dict_for_saving), so exports
# carry it too; files saved by old ComfyUI versions also hold one for bigG (kohya's
# sdxl_model_util.py drops it). Neither is a weight: both are read and dropped.
BIGG_POSITION_IDS = "transformer." + POSITION_IDS

# The v-prediction markers (research note section 6). ComfyUI (supported_models.py SDXL.model_type)
# and A1111 (PR #16567, #16569) read the keys; SimpleTuner writes both, OneTrainer `v_pred`;
# kohya writes only the modelspec metadata (library/sai_model_spec.py), which ComfyUI does
# not read (Comfy-Org/ComfyUI#12579). Keys decide before metadata, as in ComfyUI.
V_PRED = "v_pred"
ZTSNR = "ztsnr"
MARKERS = frozenset({V_PRED, ZTSNR})
MODELSPEC_PREDICTION = "modelspec.prediction_type"
MODELSPEC_VALUES = {"epsilon": "epsilon", "v": "v_prediction"}  # kohya's PRED_TYPE_EPSILON, PRED_TYPE_V
MODELSPEC_NAMES = {ours: theirs for theirs, ours in MODELSPEC_VALUES.items()}


def has_sdxl_keys(keys: Iterable[str]) -> bool:
    return any(key.startswith(TEXT_PREFIXES) for key in keys)


def unsupported_kind(tensors: dict[str, torch.Tensor]) -> str | None:
    """What a file with sgm's `conditioner.embedders.*` keys is when it is not an SDXL base-style
    text-to-image model (None when it is one), by the markers ComfyUI and diffusers read."""
    keys = tensors.keys()
    if "edm_mean" in keys or "edm_std" in keys:
        return "an SDXL model trained with EDM (edm_mean/edm_std keys, as Playground v2.5), which is not supported"
    if any(key.startswith("edm_vpred.") for key in keys):
        return "an SDXL model with EDM v-prediction (edm_vpred.* keys, as CosXL), which is not supported"
    if any(key.startswith(REFINER_PREFIX) for key in keys):
        if any(key.startswith("model.diffusion_model.label_emb.") for key in keys):
            return ("an SDXL refiner (OpenCLIP ViT-bigG alone, under conditioner.embedders.0.model.*, no CLIP "
                    "ViT-L), which is not supported")
        return "an SD 2.x model in sgm's layout (conditioner.embedders.0.model.*, as SD-Turbo), which is not supported"
    conv_in = tensors.get(UNET_INPUT)
    in_channels = conv_in.shape[1] if conv_in is not None and conv_in.ndim == 4 else 4
    if in_channels == 9:
        return "an SDXL inpainting model (UNet with 9 input channels), which is not supported"
    if in_channels != 4:
        return f"an SDXL model with {in_channels} UNet input channels (not text-to-image), which is not supported"
    return None


def schedule(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], prediction_type: str | None,
    base: ScheduleConfig,
) -> ScheduleConfig:
    """`base` with the prediction type and zero-terminal-SNR setting the file's markers record
    (none: SDXL base's epsilon), saying in one line which marker decided. prediction_type, when
    given, decides instead; a marker that records another one is refused."""
    recorded, rule = _recorded_prediction(path, tensors, metadata)
    if prediction_type is not None and recorded is not None and prediction_type != recorded:
        raise WeightsError(f"{path}: {rule} records prediction_type {recorded!r}, not {prediction_type!r}")
    decided = prediction_type or recorded or base.prediction_type
    zero_snr = ZTSNR in tensors  # on its own too (ComfyUI reads it only beside v_pred; SimpleTuner writes both)
    rules = [rule] if prediction_type is None and rule is not None else []
    if zero_snr:
        rules.append("its ztsnr key (zero terminal SNR: the betas rescaled)")
    if rules:
        warnings.warn(
            f"{path}: loading this SDXL file as {decided}{' with zero terminal SNR' if zero_snr else ''} by "
            f"{' and '.join(rules)}. Pass prediction_type (sample.py/train.py: --prediction-type) if that is wrong.",
            stacklevel=3,
        )
    return dataclasses.replace(base, prediction_type=decided, rescale_betas_zero_snr=zero_snr)


def _recorded_prediction(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> tuple[str | None, str | None]:
    """(prediction type, the rule that gives it), or (None, None) when the file does not say."""
    if V_PRED in tensors:
        return "v_prediction", "its v_pred key (ComfyUI's and A1111's v-prediction marker)"
    value = metadata.get(MODELSPEC_PREDICTION)
    if value is None:
        return None, None
    if value not in MODELSPEC_VALUES:
        raise WeightsError(f"{path}: unknown {MODELSPEC_PREDICTION} metadata {value!r}; expected one of "
                           f"{', '.join(map(repr, MODELSPEC_VALUES))}")
    return MODELSPEC_VALUES[value], f"its {MODELSPEC_PREDICTION} metadata {value!r} (kohya's marker)"


def marker_tensors(cfg: ScheduleConfig) -> dict[str, torch.Tensor]:
    """The marker keys for `cfg`, empty tensors as ComfyUI's checkpoint export writes them (model_base.py)."""
    markers = {V_PRED: cfg.prediction_type == "v_prediction", ZTSNR: cfg.rescale_betas_zero_snr}
    return {key: torch.tensor([]) for key, present in markers.items() if present}


def marker_metadata(cfg: ScheduleConfig) -> dict[str, str]:
    return {MODELSPEC_PREDICTION: MODELSPEC_NAMES[cfg.prediction_type]}


def text_encoders(path: Path, tensors: dict[str, torch.Tensor]) -> tuple[Tensors, Tensors]:
    """CLIP-L and bigG under minidream's names: the file's, after the prefix (and CLIP-L's
    `text_model.` level, which some writers leave out)."""
    clip_l = {key[len(CLIP_L_PREFIX):]: t for key, t in tensors.items() if key.startswith(CLIP_L_PREFIX)}
    bigg = {key[len(BIGG_PREFIX):]: t for key, t in tensors.items() if key.startswith(BIGG_PREFIX)}
    bigg.pop(BIGG_POSITION_IDS, None)
    return (
        Tensors(with_text_model_prefix(clip_l), str(path), "SDXL's CLIP ViT-L text encoder", CLIP_L_PREFIX),
        Tensors(bigg, str(path), "SDXL's OpenCLIP ViT-bigG text encoder", BIGG_PREFIX),
    )


def text_tensors(pipe: Pipeline) -> dict[str, torch.Tensor]:
    """Both text encoders under SDXL's prefixes, with every key SAI's release has."""
    positions = torch.arange(pipe.config.text_encoder.context_length).unsqueeze(0)  # int64, as transformers'
    clip_l = base_state_dict(pipe.text_encoder) | {POSITION_IDS: positions}
    bigg = base_state_dict(pipe.text_encoder_2)
    return {CLIP_L_PREFIX + key: t for key, t in clip_l.items()} | {BIGG_PREFIX + key: t for key, t in bigg.items()}


TRANSFORMER_BLOCK = ".attn1.to_q.weight"  # one per transformer block


def distilled_kind(unet_keys: list[str], base_keys: list[str]) -> str | None:
    """SDXL's distilled siblings differ from SDXL base in their transformer depths alone (ComfyUI's
    SSD1B, Segmind_Vega and KOALA_* in supported_models.py): name one (None for base's depths)."""
    found = sum(key.endswith(TRANSFORMER_BLOCK) for key in unet_keys)
    expected = sum(key.endswith(TRANSFORMER_BLOCK) for key in base_keys)
    if found in (0, expected):  # none at all is no SDXL sibling: the key check names what is missing
        return None
    return (f"an SDXL-style model with {found} transformer blocks in its UNet, not SDXL base's {expected} "
            "(a distilled SDXL such as SSD-1B, Segmind Vega or KOALA), which is not supported")
