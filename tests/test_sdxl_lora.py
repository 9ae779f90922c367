"""SDXL LoRA files against diffusers' StableDiffusionXLPipeline.load_lora_weights at TINY_SDXL,
on the same spread weights (tests/sdxl_reference.py): kohya files with SAI UNet names (what
minidream writes) and with diffusers' names, and diffusers/PEFT files, give the same UNet output
(with y) and the same encode_prompt states and pooled vector in minidream, merged into the
weights or as live adapters; minidream's files are used whole by diffusers and named by ComfyUI's
rules; a file for the other family is refused in one line.

Tolerance: max |minidream - diffusers| <= 1e-5 * max |diffusers| (fp32), test_lora_files' bound.
"""

import contextlib
import dataclasses
import logging
import re
import warnings
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
import transformers
from diffusers import StableDiffusionXLPipeline
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
from lora_helpers import load_adapters
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from pipeline_checks import assert_one_clear_line
from reference_models import relative_error, unet_inputs
from sdxl_reference import clip_config, diffusers_pipeline, spread_weights
from test_lora_files import TEXT_PEFT_TARGETS, UNET_PEFT_TARGETS

from minidream.config import SD15, SDXL, TINY, TINY_SD2, TINY_SDXL, ModelConfig
from minidream.io.lora_files import (
    LoRAFile,
    apply_lora_file,
    convert_lora_file,
    lora_merged,
    read_lora_file,
    save_lora,
    write_lora_file,
)
from minidream.io.lora_names import model_layers
from minidream.io.tensor_files import WeightsError
from minidream.models import lora
from minidream.models.open_clip_text import OpenCLIPTextModel
from minidream.models.pipeline import Pipeline, random_pipeline
from minidream.models.unet import UNet, size_conditioning

CFG = TINY_SDXL
# SDXL's own block structure, two ResBlocks per level (TINY_SDXL has one): diffusers maps the SAI
# input/output block numbers to its down/up blocks through layers_per_block.
TWO_RESBLOCKS = dataclasses.replace(TINY_SDXL, unet=dataclasses.replace(TINY_SDXL.unet, num_res_blocks=2))
TOL = 1e-5
PROMPTS = ["a photo of sks dog on the beach", "a castle, trending on artstation"]
# The UNet's own inputs, so that its comparison sees only its adapters: latents, timesteps, a
# context, a pooled vector and SDXL's six size-and-crop ids per row.
X, T, CONTEXT = unet_inputs(CFG.unet, [15.0, 640.0], height=16, width=8, seed=0)
POOLED = torch.randn(2, CFG.text_encoder_2.width, generator=torch.Generator().manual_seed(1))
SIZE_IDS = torch.tensor([[1024.0, 768, 0, 0, 1024, 1024], [512, 896, 32, 64, 768, 1344]])


def base(cfg: ModelConfig = CFG) -> Pipeline:
    """The base model, built afresh (merging and adapting change it) with the same weights."""
    return spread_weights(random_pipeline(cfg, seed=0))


@torch.no_grad()
def outputs(pipe: Pipeline | StableDiffusionXLPipeline) -> dict[str, torch.Tensor]:
    """The UNet's noise prediction, and the prompts' states and pooled vector (encode_prompt's)."""
    if isinstance(pipe, Pipeline):
        states_2, pooled = pipe.text_encoder_2.encode(pipe.tokenizer_2(PROMPTS))
        return {
            "unet": pipe.unet(X, T, CONTEXT, size_conditioning(POOLED, SIZE_IDS, pipe.config.unet.size_embed_dim)),
            "prompt_embeds": torch.cat([pipe.text_encoder(pipe.tokenizer(PROMPTS)), states_2], dim=-1),
            "pooled_prompt_embeds": pooled,
        }
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    return {
        "unet": pipe.unet(X, T, CONTEXT, added_cond_kwargs={"text_embeds": POOLED, "time_ids": SIZE_IDS}).sample,
        "prompt_embeds": embeds,
        "pooled_prompt_embeds": pooled,
    }


def assert_close(actual, expected, base_outputs=None) -> dict[str, float]:
    errors = {name: relative_error(actual[name], expected[name]) for name in expected}
    assert max(errors.values()) <= TOL, errors
    if base_outputs is not None:  # the adapters must matter, or the comparison proves nothing
        changes = {name: relative_error(base_outputs[name], expected[name]) for name in expected}
        assert min(changes.values()) > 1e-3, changes
    return errors


def adapt(pipe: Pipeline, seed: int = 10) -> Pipeline:
    """Every kohya target (the UNet's LoCon convs too) with alpha != rank: UNet rank 4 alpha 2,
    CLIP-L rank 2 alpha 3, bigG rank 3 alpha 5; the zero-initialised ups made random."""
    for model, rank, alpha in ((pipe.unet, 4, 2), (pipe.text_encoder, 2, 3), (pipe.text_encoder_2, 3, 5)):
        lora.add_lora(model, "all", rank, alpha, generator=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for model in (pipe.unet, *pipe.text_encoders):
            for branch in lora.adapter_branches(model).values():
                branch.lora_up.weight.copy_(0.3 * torch.randn(branch.lora_up.weight.shape, generator=generator))
    return pipe


class Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def nothing_ignored():
    """diffusers raises on a key it cannot rename, but warns about (or silently drops) others: no
    warning may come, from Python's warnings or from diffusers', transformers' and PEFT's loggers
    (the first two do not propagate to the root logger, so the handler goes on each)."""
    handler = Warnings()
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers", "peft")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert [str(w.message) for w in caught] + handler.messages == []


def peft_layers(model: torch.nn.Module) -> int:
    return sum(isinstance(module, LoraLayer) for module in model.modules())


def diffusers_with(path: Path, tokenizer_folder, cfg: ModelConfig = CFG) -> StableDiffusionXLPipeline:
    """diffusers' pipeline over the base with the file loaded by load_lora_weights, which must use
    all of it: no warning, and in each part as many PEFT layers as the file has adapters."""
    reference = diffusers_pipeline(base(cfg), tokenizer_folder)
    with nothing_ignored():
        reference.load_lora_weights(str(path))
    for part, adapters in read_lora_file(path, cfg).parts().items():
        assert len(adapters) == peft_layers(getattr(reference, part)) > 0, part
    return reference


def assert_opens_as_in_diffusers(path: Path, tokenizer_folder) -> dict[str, dict[str, float]]:
    """The oracle: the file through diffusers' load_lora_weights, and through minidream both merged
    into the weights (apply_lora_file, as UIs apply it) and as live adapters, gives the same outputs."""
    reference = diffusers_with(path, tokenizer_folder)
    expected = outputs(reference)
    merged = base()
    base_outputs = outputs(merged)
    apply_lora_file(merged, path)
    errors = assert_close(outputs(merged), expected, base_outputs)
    live = base()
    for part, adapters in read_lora_file(path, CFG).parts().items():
        load_adapters(getattr(live, part), adapters)
    return {"merged": errors, "live": assert_close(outputs(live), expected)}


def test_the_base_models_agree_with_diffusers(tokenizer_folder):
    assert_close(outputs(base()), outputs(diffusers_pipeline(base(), tokenizer_folder)))


# ---- minidream writes, diffusers reads ------------------------------------------------------------


@pytest.mark.parametrize("format, cfg", [("kohya", CFG), ("diffusers", CFG), ("kohya", TWO_RESBLOCKS)],
                         ids=["kohya", "diffusers", "kohya-two-resblocks"])
def test_minidreams_sdxl_file_is_used_whole_by_diffusers_as_minidreams_adapted_models(
    tokenizer_folder, tmp_path, format, cfg
):
    ours = adapt(base(cfg))
    path = tmp_path / "lora.safetensors"
    save_lora(path, ours.unet, ours.text_encoder, format=format, dtype=torch.float32, text_encoder_2=ours.text_encoder_2)
    read = read_lora_file(path, cfg)
    for part, adapters in read.parts().items():
        assert adapters.keys() == lora.adapters_of(getattr(ours, part)).keys(), part
    live = outputs(ours)
    assert_close(live, outputs(diffusers_with(path, tokenizer_folder, cfg)), outputs(base(cfg)))
    with lora_merged(ours, read):  # live adapters off, the file merged: the same model
        assert_close(outputs(ours), live)
    assert all(torch.equal(outputs(ours)[name], value) for name, value in live.items())  # restored


def test_minidreams_fp16_kohya_file_opens_in_minidream_as_in_diffusers(tokenizer_folder, tmp_path):
    donor = adapt(base(), seed=30)
    path = tmp_path / "lora.safetensors"
    save_lora(path, donor.unet, donor.text_encoder, text_encoder_2=donor.text_encoder_2)  # fp16, the default
    assert_opens_as_in_diffusers(path, tokenizer_folder)


# The names ComfyUI maps for SDXL (comfy/lora.py): model_lora_keys_unet's `lora_unet_<key>` for
# every `diffusion_model.<key>.weight` (SAI names), model_lora_keys_clip's LORA_CLIP_MAP for
# CLIP-L (`lora_te1_`) and bigG (`lora_te2_`) in its transformers layout, layers 0..31.
LORA_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                 "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                 "self_attn.out_proj": "self_attn_out_proj"}


def comfyui_lora_names(cfg: ModelConfig) -> set[str]:
    """From the SAI UNet's keys and transformers' CLIP-L and bigG (ComfyUI's clip_l / clip_g
    layout), built on the meta device: any size, nothing allocated."""
    with torch.device("meta"):
        unet_keys = UNet(cfg.unet).state_dict().keys()
        clip_l = transformers.CLIPTextModel(clip_config(cfg.text_encoder, cfg.text_encoder.layers))
        bigg = transformers.CLIPTextModelWithProjection(clip_config(cfg.text_encoder_2, cfg.text_encoder_2.layers))
    names = {"lora_unet_" + key.removesuffix(".weight").replace(".", "_") for key in unet_keys if key.endswith(".weight")}
    for prefix, model in (("lora_te1_", clip_l), ("lora_te2_", bigg)):
        keys = {"text_model." + key.removeprefix("text_model.") for key in model.state_dict()}  # transformers 5 drops it in CLIP-L
        names |= {f"{prefix}text_model_encoder_layers_{b}_{name}" for b in range(32)
                  for module, name in LORA_CLIP_MAP.items() if f"text_model.encoder.layers.{b}.{module}.weight" in keys}
    return names


def file_stems(path: Path) -> dict[str, set[str]]:
    """A kohya file's layer names and, for each, the tensor roles it has (lora_down.weight, ...)."""
    with safetensors.safe_open(path, framework="pt") as f:
        keys = list(f.keys())
    stems = {}
    for key in keys:
        stem, _, role = key.partition(".")
        stems.setdefault(stem, set()).add(role)
    return stems


def rank_one(weight_shape: torch.Size) -> lora.Adapter:
    out, inp, *kernel = weight_shape
    return lora.Adapter(torch.zeros(1, inp, *kernel), torch.zeros(out, 1, *[1 for _ in kernel]), 1.0)


def test_every_layer_of_full_sdxl_gets_a_name_comfyui_maps_and_reads_back(tmp_path):
    """Rank-1 zero adapters on every Linear and conv of SDXL base's shapes (a few MB), written by
    minidream: every name is one ComfyUI maps, and minidream reads each adapter back."""
    layers = model_layers(SDXL)
    adapters = {part: {layer.minidream: rank_one(layer.shape) for layer in part_layers}
                for part, part_layers in layers.items()}
    path = tmp_path / "every-layer.safetensors"
    write_lora_file(path, LoRAFile(adapters["unet"], adapters["text_encoder"], {}, adapters["text_encoder_2"]), SDXL)
    stems = file_stems(path)
    assert len(stems) == sum(map(len, layers.values())) and set(stems) <= comfyui_lora_names(SDXL)
    assert sum(1 for stem in stems if stem.startswith("lora_te2_")) == 6 * 32  # every bigG layer
    read = read_lora_file(path, SDXL)
    assert {part: part_adapters.keys() for part, part_adapters in read.parts().items()} == {
        part: part_adapters.keys() for part, part_adapters in adapters.items()}


def a1111_layer_names(cfg: ModelConfig) -> set[str]:
    """AUTOMATIC1111's `network_layer_mapping` for an SDXL model (extensions-builtin/Lora/networks.py,
    assign_network_names_to_compvis_modules): every module of the SAI model, dots made underscores,
    the embedders' numbered: CLIP-L as `0_transformer_<transformers' names>`, bigG as
    `1_model_<open_clip's names>` (minidream's OpenCLIPTextModel keeps them). Built on the meta device."""
    with torch.device("meta"):
        unet = UNet(cfg.unet)
        clip_l = transformers.CLIPTextModel(clip_config(cfg.text_encoder, cfg.text_encoder.layers))
        bigg = OpenCLIPTextModel(cfg.text_encoder_2)
    names = {"diffusion_model_" + name.replace(".", "_") for name, _ in unet.named_modules() if name}
    names |= {"0_transformer_text_model_" + name.removeprefix("text_model.").replace(".", "_")  # transformers 5 drops text_model.
              for name, _ in clip_l.named_modules() if name and name != "text_model"}
    return names | {"1_model_" + name.replace(".", "_") for name, _ in bigg.named_modules() if name}


A1111_X_PROJ = re.compile(r"(.*)_([qkv]_proj)$")


def a1111_layer(stem: str, names: set[str]) -> str | None:
    """The layer AUTOMATIC1111 applies a kohya SDXL adapter to, or None (it then reports the key as
    failed to match), read off networks.load_network: lora_convert.convert_diffusers_name_to_compvis
    first (for SDXL's te2: bigG's open_clip names), then q/k/v projections onto their fused
    attention, then `lora_unet` -> `diffusion_model`, `lora_te1_text_model` -> `0_transformer_text_model`."""
    key = stem
    if match := re.match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", stem):
        part = match[2].replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
        key = f"1_model_transformer_resblocks_{match[1]}_{part}"
    if key in names:
        return key
    if (match := A1111_X_PROJ.match(key)) and match[1] in names:
        return match[1]
    for prefix, compvis in (("lora_unet", "diffusion_model"), ("lora_te1_text_model", "0_transformer_text_model")):
        if prefix in stem and stem.replace(prefix, compvis) in names:
            return stem.replace(prefix, compvis)
    return None


def test_every_layer_of_full_sdxl_gets_a_name_a1111_applies(tmp_path):
    """The same every-layer file at SDXL base's shapes: AUTOMATIC1111's key resolution finds a layer
    for each of its adapters, each its own (bigG's q, k and v share their fused attention, as A1111
    applies them to its in_proj)."""
    layers = model_layers(SDXL)
    adapters = {part: {layer.minidream: rank_one(layer.shape) for layer in part_layers} for part, part_layers in layers.items()}
    path = tmp_path / "every-layer.safetensors"
    write_lora_file(path, LoRAFile(adapters["unet"], adapters["text_encoder"], {}, adapters["text_encoder_2"]), SDXL)
    names = a1111_layer_names(SDXL)
    resolved = {stem: a1111_layer(stem, names) for stem in file_stems(path)}
    assert None not in resolved.values(), [stem for stem, layer in resolved.items() if layer is None][:5]
    fused = [layer for stem, layer in resolved.items() if re.search(r"lora_te2_.*_self_attn_[qkv]_proj$", stem)]
    assert len(fused) == 3 * 32 and len(set(fused)) == 32 and all(layer.endswith("_attn") for layer in fused)
    others = [layer for layer in resolved.values() if layer not in set(fused)]
    assert len(others) == len(set(others)) == len(resolved) - 3 * 32


def test_kohya_sdxl_file_names_layout_and_metadata_follow_kohya_and_comfyui(tmp_path):
    donor = adapt(base())
    path = tmp_path / "sks.safetensors"
    save_lora(path, donor.unet, donor.text_encoder, text_encoder_2=donor.text_encoder_2)
    with safetensors.safe_open(path, framework="pt") as f:
        metadata, tensors = f.metadata(), {key: f.get_tensor(key) for key in f.keys()}
    stems = file_stems(path)
    assert set(map(frozenset, stems.values())) == {frozenset({"lora_down.weight", "lora_up.weight", "alpha"})}
    assert len(stems) == sum(len(lora.adapter_branches(model)) for model in (donor.unet, *donor.text_encoders))
    assert set(stems) <= comfyui_lora_names(CFG)  # and so every key names a module that exists
    # SAI names, as kohya's SDXL files (TINY_SDXL: one ResBlock per level, two blocks deep at the last)
    assert "lora_unet_input_blocks_5_1_transformer_blocks_1_attn1_to_q" in stems
    assert "lora_unet_input_blocks_2_0_op" in stems and "lora_unet_output_blocks_3_2_conv" in stems
    last = CFG.text_encoder_2.layers - 1  # bigG's last layer: it runs for the pooled projection
    assert f"lora_te2_text_model_encoder_layers_{last}_self_attn_q_proj" in stems
    assert not any("text_projection" in stem for stem in stems)
    assert tensors["lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha"].item() == 5.0
    assert tensors["lora_te1_text_model_encoder_layers_0_self_attn_out_proj.alpha"].item() == 3.0
    assert {t.dtype for k, t in tensors.items() if not k.endswith(".alpha")} == {torch.float16}
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0" and metadata["ss_v2"] == "False"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert metadata["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert (metadata["modelspec.title"], metadata["modelspec.prediction_type"]) == ("sks", "epsilon")


def test_convert_sdxl_kohya_to_diffusers_and_back_keeps_every_adapter(tmp_path):
    donor = adapt(base())
    kohya, diffusers_file, back = (tmp_path / f"{name}.safetensors" for name in ("kohya", "diffusers", "back"))
    save_lora(kohya, donor.unet, donor.text_encoder, dtype=torch.float32, text_encoder_2=donor.text_encoder_2)
    convert_lora_file(kohya, diffusers_file, "diffusers", CFG, dtype=torch.float32)
    convert_lora_file(diffusers_file, back, "kohya", CFG, dtype=torch.float32)
    assert safetensors.torch.load_file(back).keys() == safetensors.torch.load_file(kohya).keys()
    first, last = read_lora_file(kohya, CFG), read_lora_file(back, CFG)
    for part, adapters in first.parts().items():
        for name, adapter in adapters.items():
            again = last.parts()[part][name]
            delta = lora.weight_delta(adapter.down, adapter.up, lora.lora_scale(adapter.alpha, adapter.rank))
            delta_again = lora.weight_delta(again.down, again.up, lora.lora_scale(again.alpha, again.rank))
            assert relative_error(delta_again, delta) <= 1e-6, name


# ---- diffusers / PEFT write, minidream reads ------------------------------------------------------


def peft_written_file(folder: Path, tokenizer_folder, alpha_equals_rank: bool, metadata: bool) -> Path:
    """A LoRA as diffusers' SDXL training script saves it: PEFT adapters (lora_B random too) on
    diffusers' UNet and transformers' CLIP-L and bigG, StableDiffusionXLPipeline.save_lora_weights."""
    reference = diffusers_pipeline(base(), tokenizer_folder)
    torch.manual_seed(20)
    configs = {
        "unet": LoraConfig(r=4, lora_alpha=4 if alpha_equals_rank else 6, target_modules=UNET_PEFT_TARGETS,
                           init_lora_weights=False),
        "text_encoder": LoraConfig(r=2, lora_alpha=2 if alpha_equals_rank else 5, target_modules=TEXT_PEFT_TARGETS,
                                   init_lora_weights=False),
        "text_encoder_2": LoraConfig(r=3, lora_alpha=3 if alpha_equals_rank else 7, target_modules=TEXT_PEFT_TARGETS,
                                     init_lora_weights=False),
    }
    for part, config in configs.items():
        getattr(reference, part).add_adapter(config)
    StableDiffusionXLPipeline.save_lora_weights(
        folder,
        **{f"{part}_lora_layers": get_peft_model_state_dict(getattr(reference, part)) for part in configs},
        **{f"{part}_lora_adapter_metadata": config.to_dict() if metadata else None for part, config in configs.items()},
    )
    return folder / "pytorch_lora_weights.safetensors"


@pytest.mark.parametrize("alpha_equals_rank, metadata", [(True, False), (False, True)],
                         ids=["no-metadata", "lora_alpha-in-metadata"])
def test_peft_written_sdxl_file_opens_in_minidream_as_in_diffusers(tokenizer_folder, tmp_path, alpha_equals_rank,
                                                                   metadata):
    path = peft_written_file(tmp_path, tokenizer_folder, alpha_equals_rank, metadata)
    assert any(key.startswith("text_encoder_2.") for key in safetensors.torch.load_file(path))
    read = read_lora_file(path, CFG)
    assert {a.alpha for a in read.text_encoder_2.values()} == {3.0 if alpha_equals_rank else 7.0}
    assert_opens_as_in_diffusers(path, tokenizer_folder)


@pytest.mark.parametrize("clip_l_names", ["text_model", "transformers-5"])
def test_kohya_file_with_diffusers_names_opens_in_minidream_as_in_diffusers(tokenizer_folder, tmp_path, clip_l_names):
    """diffusers' convert_state_dict_to_kohya (--output_kohya_format): `lora_unet_down_blocks_...`,
    alpha = rank, made != rank here. Through transformers 5 CLIP-L's keys lack `text_model`; the
    files in circulation, written before it, have it."""
    peft_file = peft_written_file(tmp_path, tokenizer_folder, alpha_equals_rank=True, metadata=False)
    kohya = convert_state_dict_to_kohya(safetensors.torch.load_file(peft_file))
    kohya = {key: torch.tensor(value.item() + 1.5) if key.endswith(".alpha") else value for key, value in kohya.items()}
    if clip_l_names == "text_model":
        kohya = {key.replace("lora_te1_encoder_", "lora_te1_text_model_encoder_"): value for key, value in kohya.items()}
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in kohya
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.alpha" in kohya
    path = tmp_path / "kohya.safetensors"
    safetensors.torch.save_file(kohya, path)
    assert {a.alpha for a in read_lora_file(path, CFG).unet.values()} == {5.5}
    assert_opens_as_in_diffusers(path, tokenizer_folder)


# ---- live adapters --------------------------------------------------------------------------------


def test_live_adapters_cover_every_bigg_resblock_and_the_last_one_moves_only_the_pooled_vector():
    """SDXL runs bigG's last resblock for the pooled projection only (kohya and diffusers adapt it);
    SD 2.x's never runs and is left out."""
    pipe = base()
    names = lora.target_layers(pipe.text_encoder_2, "all")
    assert len(names) == 6 * CFG.text_encoder_2.layers
    assert len(lora.target_layers(random_pipeline(TINY_SD2).text_encoder, "all")) == 6 * 23
    ids = pipe.tokenizer_2(PROMPTS)
    with torch.no_grad():
        states, pooled = pipe.text_encoder_2.encode(ids)
    last = f"transformer.resblocks.{CFG.text_encoder_2.layers - 1}.mlp.c_fc"
    branch = lora.adapt_layer(pipe.text_encoder_2, last, rank=2, alpha=2, dropout=0.0)
    with torch.no_grad():
        branch.lora_down.weight.normal_()
        branch.lora_up.weight.normal_()
        states_after, pooled_after = pipe.text_encoder_2.encode(ids)
    assert torch.equal(states_after, states) and relative_error(pooled_after, pooled) > 1e-3


# ---- refusals: one line naming the file and the family it is for ----------------------------------


def one_adapter_file(path: Path, stem: str, down: tuple[int, int], up: tuple[int, int]) -> Path:
    safetensors.torch.save_file({f"{stem}.lora_down.weight": torch.zeros(down), f"{stem}.lora_up.weight":
                                 torch.zeros(up), f"{stem}.alpha": torch.tensor(4.0)}, path)
    return path


def test_sd1_loras_on_sdxl_and_sdxl_loras_on_sd1_are_refused_in_one_line(tmp_path):
    sd1 = random_pipeline(TINY)
    lora.add_lora(sd1.unet, "attention", 2)
    lora.add_lora(sd1.text_encoder, "all", 2)
    sd1_file = tmp_path / "sd1.safetensors"
    save_lora(sd1_file, sd1.unet, sd1.text_encoder)
    sdxl = adapt(base())
    sdxl_file = tmp_path / "sdxl.safetensors"
    save_lora(sdxl_file, sdxl.unet, sdxl.text_encoder, text_encoder_2=sdxl.text_encoder_2)
    sdxl_diffusers = tmp_path / "sdxl-diffusers.safetensors"
    save_lora(sdxl_diffusers, sdxl.unet, sdxl.text_encoder, "diffusers", text_encoder_2=sdxl.text_encoder_2)
    # full shapes, one adapter each (layer tables are built on the meta device): the UNet's widths
    sdxl_unet_only = one_adapter_file(tmp_path / "sdxl-unet.safetensors",
                                      "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", (4, 2048), (640, 4))
    sd1_unet_only = one_adapter_file(tmp_path / "sd1-unet.safetensors",
                                     "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", (4, 768), (640, 4))
    sd2_text = one_adapter_file(tmp_path / "sd2-te.safetensors", "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
                                (4, 1024), (1024, 4))
    cases = [
        (sd1_file, CFG, "an SD 1.x or 2.x LoRA (lora_te_ keys: one 32-wide text encoder); the base model is SDXL"),
        (sdxl_file, TINY, "an SDXL LoRA (lora_te1_ keys: two text encoders); the base model is a 32-wide model"),
        (sdxl_diffusers, TINY, "an SDXL LoRA (text_encoder_2. keys: two text encoders)"),
        (sdxl_unet_only, SD15, "an SDXL LoRA (2048-wide cross-attention in lora_unet_input_blocks_4_1_"),
        (sd1_unet_only, SDXL, "an SD 1.x LoRA (768-wide cross-attention in lora_unet_down_blocks_1_attentions_0_"),
        (sd2_text, SDXL, "an SD 2.x LoRA (lora_te_ keys: one 1024-wide text encoder); the base model is SDXL (2048-wide)"),
    ]
    for path, cfg, fragment in cases:
        with pytest.raises(WeightsError) as error:
            read_lora_file(path, cfg)
        assert_one_clear_line(error, path, fragment)
