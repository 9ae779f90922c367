"""The diffusers folder layout: one subfolder per component, each with a config.json and weights.

    model_index.json           the pipeline class and which library builds each component
    unet/  vae/                config.json + diffusion_pytorch_model.safetensors (diffusers names)
    text_encoder/              config.json (transformers' CLIPTextConfig) + model.safetensors
    tokenizer/                 vocab.json + merges.txt, or tokenizer.json
    scheduler/                 scheduler_config.json: the noise schedule and timestep spacing
    text_encoder_2/ tokenizer_2/   (SDXL) OpenCLIP ViT-bigG as CLIPTextModelWithProjection, its tokenizer

The UNet and VAE tensor names and config.json fields are translated by `diffusers_layout`; the
text encoder's names are minidream's already (transformers >= 5 writes them without the
`text_model.` level, which is put back on reading); SDXL's bigG is OpenCLIP's tower in
minidream, translated by `open_clip_layout`. Written folders open with diffusers'
`StableDiffusionPipeline` / `StableDiffusionXLPipeline.from_pretrained(folder)`; the scheduler
written is DDIM for SD 1.x/2.x (minidream's default sampler) and Euler for SDXL (SDXL's own),
with the pipeline's schedule settings.
"""

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import torch

from minidream.config import (
    SDXL,
    ModelConfig,
    ScheduleConfig,
    TextEncoderConfig,
    UNetConfig,
    VAEConfig,
)
from minidream.diffusion import schedule
from minidream.files import atomic_folder
from minidream.io import open_clip_layout
from minidream.io.diffusers_layout import (
    TensorName,
    diffusers_key_map,
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    unet_from_diffusers,
    unet_names,
    unet_to_diffusers,
    vae_config_from_diffusers,
    vae_config_to_diffusers,
    vae_from_diffusers,
    vae_names,
    vae_to_diffusers,
)
from minidream.io.transformers_clip import (
    sdxl_conditioning,
    text_encoder_config_from_transformers,
    text_encoder_config_to_transformers,
    with_projection_shapes,
)
from minidream.io.tensor_files import (
    POSITION_IDS,
    StoredPipeline,
    Tensors,
    WeightsError,
    cast,
    check_tensors,
    read_tensor_file,
    unsupported,
    with_text_model_prefix,
    write_safetensors,
)
from minidream.models.lora import base_state_dict
from minidream.models.pipeline import Pipeline
from minidream.models.tokenizer import CLIPTokenizer

PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_PARTS = ("text_encoder_2", "tokenizer_2")
# Weights file names in order of preference; the fp16 "variants" are what some repositories hold alone.
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                     "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")
TRANSFORMERS_WEIGHTS = ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin")
DIFFUSERS_VERSION = "0.42.1"  # the diffusers release the written folders are tested with

# Scheduler options diffusers offers that SD 1.x does not use, with their off values.
SCHEDULER_OFF = {"trained_betas": None, "thresholding": False}


def is_diffusers_folder(path: Path) -> bool:
    return (path / "model_index.json").is_file() or (path / "unet").is_dir()


def read_diffusers_folder(path: Path) -> StoredPipeline:
    model_index = _read_json(path / "model_index.json") if (path / "model_index.json").is_file() else {}
    sdxl = "XL" in str(model_index.get("_class_name", "")) or (path / "text_encoder_2").is_dir()
    parts = PARTS + (SDXL_PARTS if sdxl else ())
    missing = [f"{part}/" for part in parts if not (path / part).is_dir()]
    if sdxl and missing == ["text_encoder/", "tokenizer/"]:  # SDXL's refiner: bigG alone, as text_encoder_2
        raise unsupported(path, "an SDXL refiner (text_encoder_2/ without text_encoder/), which is not supported")
    if missing:
        raise WeightsError(
            f"{path}: incomplete diffusers folder: no {', '.join(missing)} "
            f"({'an SDXL' if sdxl else 'a'} diffusers folder has {', '.join(part + '/' for part in parts)})"
        )
    unet_json = _read_json(path / "unet" / "config.json")
    what = _unsupported_kind(path, model_index, unet_json)
    if what is not None:
        raise unsupported(path, what)

    config = ModelConfig(
        text_encoder=_read_text_encoder_config(path / "text_encoder"),
        unet=_parse(path / "unet" / "config.json", unet_config_from_diffusers, unet_json),
        vae=_parse(path / "vae" / "config.json", vae_config_from_diffusers, _read_json(path / "vae" / "config.json")),
        schedule=_parse(
            path / "scheduler" / "scheduler_config.json",
            schedule_config_from_diffusers,
            _read_json(path / "scheduler" / "scheduler_config.json"),
        ),
        text_encoder_2=_read_text_encoder_config(path / "text_encoder_2", with_projection=True) if sdxl else None,
    )
    if sdxl:
        config = dataclasses.replace(config, text_encoder=sdxl_conditioning(config.text_encoder, SDXL.text_encoder),
                                     text_encoder_2=sdxl_conditioning(config.text_encoder_2, SDXL.text_encoder_2))
    return StoredPipeline(
        config=config,
        tokenizer=_read_tokenizer(path / "tokenizer", config.text_encoder),
        unet=_read_renamed(path / "unet", "UNet", unet_names(config.unet), unet_from_diffusers, config.unet),
        vae=_read_renamed(path / "vae", "AutoencoderKL", vae_names(config.vae), vae_from_diffusers, config.vae),
        text_encoder=_read_text_encoder(path / "text_encoder"),
        text_encoder_2=_read_text_encoder_2(path / "text_encoder_2", config.text_encoder_2) if sdxl else None,
        tokenizer_2=_read_tokenizer(path / "tokenizer_2", config.text_encoder_2) if sdxl else None,
    )


def _unsupported_kind(path: Path, model_index: dict, unet_json: dict) -> str | None:
    """What the folder is when it is not an SD 1.x/2.x/XL text-to-image pipeline (None when it is one)."""
    pipeline_class = str(model_index.get("_class_name", ""))
    if "Inpaint" in pipeline_class or unet_json.get("in_channels") == 9:
        return "an inpainting pipeline (UNet with 9 input channels)"
    if "Depth2Img" in pipeline_class or unet_json.get("in_channels") == 5:
        return "a depth-to-image pipeline (UNet with 5 input channels), which is not supported"
    if "UnCLIP" in pipeline_class or (path / "image_normalizer").is_dir():
        return "an SD 2.x unCLIP pipeline (image-embedding conditioning), which is not supported"
    return None


def _read_renamed(
    folder: Path, model_name: str, names: tuple[TensorName, ...], from_diffusers: Callable, cfg: UNetConfig | VAEConfig
) -> Tensors:
    """A UNet or VAE file renamed to minidream's names; weights.py checks it, naming keys as the file does."""
    file = _weights_file(folder, DIFFUSERS_WEIGHTS)
    tensors, _ = read_tensor_file(file)
    return Tensors(
        from_diffusers(tensors, cfg), str(file), f"the diffusers {model_name} of {folder.name}/config.json",
        renamed=diffusers_key_map(names),
    )


def _read_text_encoder(folder: Path) -> Tensors:
    file = _weights_file(folder, TRANSFORMERS_WEIGHTS)
    tensors, _ = read_tensor_file(file)
    return Tensors(with_text_model_prefix(tensors), str(file), "the CLIP text encoder")


def _read_text_encoder_2(folder: Path, cfg: TextEncoderConfig) -> Tensors:
    """SDXL's bigG, checked under the file's (transformers') names, then given OpenCLIP's."""
    file = _weights_file(folder, TRANSFORMERS_WEIGHTS)
    tensors, _ = read_tensor_file(file)
    tensors = {key: t for key, t in with_text_model_prefix(tensors).items() if key != POSITION_IDS}
    what = f"the CLIPTextModelWithProjection of {folder.name}/config.json"
    check_tensors(Tensors(tensors, str(file), what), with_projection_shapes(cfg))
    return Tensors(open_clip_layout.from_with_projection(tensors, cfg.layers), str(file), what)


def _read_tokenizer(folder: Path, cfg: TextEncoderConfig) -> CLIPTokenizer:
    try:
        return CLIPTokenizer.from_folder(folder, context_length=cfg.context_length)
    except (OSError, ValueError, KeyError) as error:
        raise WeightsError(f"{folder}: unreadable tokenizer ({error})") from None


def _read_text_encoder_config(folder: Path, with_projection: bool = False) -> TextEncoderConfig:
    file = folder / "config.json"
    return _parse(file, lambda data: text_encoder_config_from_transformers(data, with_projection), _read_json(file))


def _weights_file(folder: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise WeightsError(f"{folder}: no weights file (looked for {', '.join(names)})")


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WeightsError(f"{file}: missing") from None
    except (OSError, ValueError) as error:
        raise WeightsError(f"{file}: unreadable JSON ({error})") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def _parse(file: Path, parse: Callable, data: dict):
    """`parse(data)`, its ValueError turned into one line that names the file."""
    try:
        return parse(data)
    except (ValueError, TypeError) as error:
        raise WeightsError(f"{file}: " + " ".join(str(error).split())) from None


def schedule_config_from_diffusers(config: dict) -> ScheduleConfig:
    """ScheduleConfig's fields have diffusers' names; absent ones take SD 1.x's values."""
    refused = [f"{key}={config[key]!r}" for key, off in SCHEDULER_OFF.items() if config.get(key, off) != off]
    if refused:
        raise ValueError(f"unsupported scheduler options {', '.join(refused)}")
    names = [field.name for field in dataclasses.fields(ScheduleConfig)]
    cfg = ScheduleConfig(**{name: config[name] for name in names if name in config})
    schedule.check_prediction_type(cfg.prediction_type)
    if cfg.timestep_spacing not in (None, *schedule.TIMESTEP_SPACINGS):
        raise ValueError(f"unsupported timestep_spacing {cfg.timestep_spacing!r}: expected one of {schedule.TIMESTEP_SPACINGS}")
    schedule.betas_of(cfg)  # raises if the beta schedule is unknown
    return cfg


def schedule_config_to_diffusers(cfg: ScheduleConfig, scheduler_class: str = "DDIMScheduler") -> dict:
    return {
        "_class_name": scheduler_class,
        "_diffusers_version": DIFFUSERS_VERSION,
        # A spacing the model's config did not give stays unsaid, so that diffusers' schedulers take
        # their own defaults from the file as minidream's samplers do.
        **{key: value for key, value in dataclasses.asdict(cfg).items() if value is not None},
        **SCHEDULER_OFF,
    }


def model_index(sdxl: bool = False) -> dict:
    """An SD 1.x/2.x pipeline without safety checker, or an SDXL one, as diffusers' save_pretrained
    writes them (null components for the optional parts left out)."""
    components = {
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
    }
    if sdxl:
        return {
            "_class_name": "StableDiffusionXLPipeline",
            "_diffusers_version": DIFFUSERS_VERSION,
            **components,
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            # SDXL base's: the negative prompt's embeddings and pooled vector are zeros when none is given.
            "force_zeros_for_empty_prompt": True,
        }
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        **components,
        "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": [None, None],
        "requires_safety_checker": False,
    }


def write_diffusers_folder(pipe: Pipeline, path: Path, dtype: torch.dtype | None) -> None:
    """All of the folder, written under a temporary name and renamed into place when complete."""
    cfg = pipe.config
    try:  # configs first: a pipeline diffusers cannot express fails before anything is written
        unet_json = {**unet_config_to_diffusers(cfg.unet), "_diffusers_version": DIFFUSERS_VERSION}
        vae_json = {**vae_config_to_diffusers(cfg.vae), "_diffusers_version": DIFFUSERS_VERSION}
    except ValueError as error:
        raise WeightsError(f"{path}: cannot write a diffusers folder: {error}") from None
    components = [
        # base_state_dict: a model with live LoRA adapters is written without them (merge them first).
        ("unet", unet_json, unet_to_diffusers(base_state_dict(pipe.unet), cfg.unet), DIFFUSERS_WEIGHTS[0]),
        ("vae", vae_json, vae_to_diffusers(pipe.vae.state_dict(), cfg.vae), DIFFUSERS_WEIGHTS[0]),
        ("text_encoder", *_text_encoder_component(pipe), TRANSFORMERS_WEIGHTS[0]),
    ]
    if pipe.text_encoder_2 is not None:
        bigg = cfg.text_encoder_2
        components.append((
            "text_encoder_2", text_encoder_config_to_transformers(bigg, with_projection=True),
            open_clip_layout.to_with_projection(base_state_dict(pipe.text_encoder_2), bigg.layers),
            TRANSFORMERS_WEIGHTS[0],
        ))
    try:
        _write_folder(path, components, pipe, dtype)
    except FileExistsError as error:  # a non-empty folder is never replaced: it may hold the user's files
        raise WeightsError(str(error)) from None


def _text_encoder_component(pipe: Pipeline) -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json and tensors of text_encoder/: an OpenCLIP tower (SD 2.x single files) becomes
    the transformers model of the layers SD 2.x runs, as SD 2.x's own diffusers folders hold it."""
    cfg = pipe.config.text_encoder
    tensors = base_state_dict(pipe.text_encoder)
    if cfg.open_clip:
        tensors = open_clip_layout.to_transformers(tensors, cfg.layers)
        cfg = open_clip_layout.transformers_config(cfg)
    return text_encoder_config_to_transformers(cfg), tensors


def _write_folder(path: Path, components: list[tuple], pipe: Pipeline, dtype: torch.dtype | None) -> None:
    sdxl = pipe.text_encoder_2 is not None
    with atomic_folder(path) as folder:
        for name, config_json, tensors, weights_name in components:
            (folder / name).mkdir()
            _write_json(folder / name / "config.json", config_json)
            cast_tensors = {key: cast(tensor, dtype) for key, tensor in tensors.items()}
            write_safetensors(cast_tensors, folder / name / weights_name, {"format": "pt"})
        pipe.tokenizer.save_folder(folder / "tokenizer")
        if sdxl:
            pipe.tokenizer_2.save_folder(folder / "tokenizer_2")
        (folder / "scheduler").mkdir()
        # SDXL's own scheduler is Euler (its scheduler_config.json); SD 1.x/2.x get minidream's default, DDIM.
        scheduler_class = "EulerDiscreteScheduler" if sdxl else "DDIMScheduler"
        _write_json(folder / "scheduler" / "scheduler_config.json",
                    schedule_config_to_diffusers(pipe.config.schedule, scheduler_class))
        _write_json(folder / "model_index.json", model_index(sdxl))


def _write_json(file: Path, data: dict) -> None:
    file.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
