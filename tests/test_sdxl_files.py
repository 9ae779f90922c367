"""SDXL files: the SAI single file and the diffusers folder, read and written, against diffusers
as the oracle; the v-prediction markers; one line for the SDXL variants minidream does not run;
the key layout at SDXL base's full shapes (on the meta device: no memory)."""

import dataclasses
import math
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    infer_diffusers_model_type,
)
from pipeline_checks import assert_one_clear_line, assert_same_weights
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from sdxl_reference import bigg, clip_config, clip_l, diffusers_pipeline, diffusers_unet, diffusers_vae, spread_weights

from minidream.config import SDXL, TINY_SDXL
from minidream.io import single_file
from minidream.io.convert import main as convert
from minidream.io.diffusers_layout import unet_config_to_diffusers, vae_config_to_diffusers
from minidream.io.single_file import _config_from_metadata, single_file_metadata, single_file_tensors
from minidream.io.tensor_files import WeightsError
from minidream.io.weights import (
    assemble_pipeline,
    load_pipeline,
    model_config,
    read_weights,
    save_pipeline,
)
from minidream.models.open_clip_text import OpenCLIPTextModel
from minidream.models.pipeline import Pipeline, default_tokenizer, random_pipeline, text_encoder_class
from minidream.models.unet import UNet
from minidream.models.vae import AutoencoderKL as MinidreamVAE

BIGG = "conditioner.embedders.1.model."
CLIP_L = "conditioner.embedders.0.transformer."
ALL_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
# diffusers tells SDXL's two encoders apart by width (create_diffusers_clip_model_from_ldm), as
# real SDXL files have them (768, 1280); TINY_SDXL's are both 32 wide, so from_single_file gets this.
TWO_WIDTHS = dataclasses.replace(
    TINY_SDXL,
    text_encoder_2=dataclasses.replace(TINY_SDXL.text_encoder_2, width=48, mlp_width=96),
    unet=dataclasses.replace(TINY_SDXL.unet, context_dim=32 + 48, adm_in_channels=48 + 6 * 8),
)


def sdxl_pipeline(config=TINY_SDXL, seed=1) -> Pipeline:
    pipe = spread_weights(random_pipeline(config, seed=seed), seed=seed)
    with torch.no_grad():  # the one 0-dim tensor spread_weights leaves: away from its init, to be carried
        pipe.text_encoder_2.logit_scale.fill_(3.25)
    return pipe


@pytest.fixture(scope="module")
def tiny_sdxl():
    return sdxl_pipeline()


@pytest.fixture(scope="module")
def folder(tiny_sdxl, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sdxl") / "folder"
    save_pipeline(tiny_sdxl, path, format="diffusers", dtype=None)
    return path


def assert_same_tensors(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]):
    assert got.keys() == expected.keys()
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key


# ---- the single file -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_single_file_round_trip_is_bit_identical(tiny_sdxl, tmp_path, dtype):
    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    save_pipeline(tiny_sdxl, first, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # minidream's metadata decides: no marker rule runs
        loaded = load_pipeline(first)
    assert loaded.config == TINY_SDXL and isinstance(loaded.text_encoder_2, OpenCLIPTextModel)
    assert loaded.tokenizer.pad_token_id == 49407 and loaded.tokenizer_2.pad_token_id == 0
    assert_same_weights(loaded, tiny_sdxl, dtype=dtype, parts=ALL_PARTS)
    save_pipeline(loaded, second, dtype=dtype)
    written = load_file(first)
    assert_same_tensors(load_file(second), written)
    # Every key SAI's release has: label_emb, CLIP-L's position ids (int64), bigG's projection and logit_scale.
    assert {"model.diffusion_model.label_emb.0.0.weight", "model.diffusion_model.label_emb.0.2.bias",
            BIGG + "text_projection", BIGG + "logit_scale"} <= written.keys()
    assert torch.equal(written[CLIP_L + "text_model.embeddings.position_ids"], torch.arange(77)[None])
    assert torch.equal(written[BIGG + "text_projection"], tiny_sdxl.text_encoder_2.text_projection.to(dtype))
    assert written[BIGG + "logit_scale"].item() == 3.25
    assert not any(key.startswith("cond_stage_model.") for key in written)
    assert not {"v_pred", "ztsnr"} & written.keys()  # an epsilon model: no markers


def test_diffusers_from_single_file_reads_the_export(tmp_path):
    # diffusers' own single-file loader, given a folder of configs only (no weights to fall back on),
    # builds modules holding exactly minidream's tensors, fp32 and fp16, text_projection transposed.
    pipe = sdxl_pipeline(TWO_WIDTHS)
    configs = tmp_path / "configs"
    save_pipeline(pipe, configs, format="diffusers")
    for weights in configs.glob("*/*.safetensors"):
        weights.unlink()
    oracles = {"unet": diffusers_unet(pipe), "vae": diffusers_vae(pipe), "text_encoder": clip_l(pipe),
               "text_encoder_2": bigg(pipe)}
    references = {}
    for dtype in (torch.float32, torch.float16):
        path = tmp_path / f"sdxl-{dtype}.safetensors"
        save_pipeline(pipe, path, dtype=dtype)
        references[dtype] = StableDiffusionXLPipeline.from_single_file(
            str(path), config=str(configs), local_files_only=True, torch_dtype=dtype
        )
        for name, oracle in oracles.items():
            expected = {key: t.to(dtype) for key, t in oracle.state_dict().items()}
            assert_same_tensors(getattr(references[dtype], name).state_dict(), expected)
    # The orientation, by computation: the pooled projection diffusers computes from the file is minidream's x @ P.
    ids = pipe.tokenizer_2(["a photo of sks dog", ""])
    with torch.no_grad():
        _, pooled = pipe.text_encoder_2.encode(ids)
        theirs = references[torch.float32].text_encoder_2(ids).text_embeds
    assert ((pooled - theirs).abs().max() / theirs.abs().max()).item() <= 1e-5


# ---- the diffusers folder ------------------------------------------------------------------------


def assert_loaded_from_folder(loaded: Pipeline, source: Pipeline):
    """The folder's weights are the source's; a folder holds no logit_scale: CLIP's trained ln 100."""
    assert loaded.config == TINY_SDXL
    assert_same_weights(loaded, source, parts=("unet", "vae", "text_encoder"))
    got, expected = loaded.text_encoder_2.state_dict(), source.text_encoder_2.state_dict()
    assert got.pop("logit_scale").item() == pytest.approx(math.log(100))
    del expected["logit_scale"]
    assert_same_tensors(got, expected)
    prompts = ["a photo of sks dog!", ""]
    assert torch.equal(loaded.tokenizer(prompts), source.tokenizer(prompts))
    assert torch.equal(loaded.tokenizer_2(prompts), source.tokenizer_2(prompts))


def test_diffusers_folder_round_trip(tiny_sdxl, folder, tmp_path):
    loaded = load_pipeline(folder)
    assert_loaded_from_folder(loaded, tiny_sdxl)
    again = tmp_path / "again"
    save_pipeline(loaded, again, format="diffusers", dtype=None)
    for weights in folder.glob("*/*.safetensors"):
        assert_same_tensors(load_file(again / weights.relative_to(folder)), load_file(weights))


def test_diffusers_opens_the_folder_as_sdxl(tiny_sdxl, folder):
    reference = StableDiffusionXLPipeline.from_pretrained(folder)
    assert reference.config.force_zeros_for_empty_prompt is True
    assert type(reference.scheduler).__name__ == "EulerDiscreteScheduler"
    assert reference.scheduler.config.timestep_spacing == "leading"
    assert reference.tokenizer_2.pad_token == "!"
    oracles = {"unet": diffusers_unet, "vae": diffusers_vae, "text_encoder": clip_l, "text_encoder_2": bigg}
    for name, oracle in oracles.items():
        assert_same_tensors(getattr(reference, name).state_dict(), oracle(tiny_sdxl).state_dict())


def test_folder_written_by_diffusers_loads(tiny_sdxl, tmp_path):
    # diffusers' save_pretrained: transformers 5 names text_encoder/ without `text_model.`, keeps it
    # in text_encoder_2/, and writes tokenizer.json alone.
    tiny_sdxl.tokenizer.save_folder(tmp_path / "tokenizer")
    written = tmp_path / "by-diffusers"
    diffusers_pipeline(tiny_sdxl, tmp_path / "tokenizer").save_pretrained(written)
    assert not any(key.startswith("text_model.") for key in load_file(written / "text_encoder" / "model.safetensors"))
    assert_loaded_from_folder(load_pipeline(written), tiny_sdxl)


# ---- both layouts of transformers' CLIP names, and position ids -----------------------------------


def test_text_encoders_without_the_text_model_level_load(tiny_sdxl, folder, tmp_path):
    variant = tmp_path / "no-prefix"
    variant.mkdir()
    for part in folder.iterdir():
        (variant / part.name).symlink_to(part)
    for part in ("text_encoder", "text_encoder_2"):
        (variant / part).unlink()
        (variant / part).mkdir()
        (variant / part / "config.json").symlink_to(folder / part / "config.json")
        tensors = load_file(folder / part / "model.safetensors")
        unprefixed = {key.removeprefix("text_model."): t for key, t in tensors.items()}
        save_file(unprefixed, variant / part / "model.safetensors")
    assert_loaded_from_folder(load_pipeline(variant), tiny_sdxl)


def test_single_file_variants_of_clip_names_load(tiny_sdxl, tmp_path):
    # CLIP-L without `text_model.`, its position ids as floats, and old ComfyUI's bigG position ids.
    tensors = single_file_tensors(tiny_sdxl, None)
    tensors = {key.replace(CLIP_L + "text_model.", CLIP_L): t for key, t in tensors.items()}
    tensors[CLIP_L + "embeddings.position_ids"] = torch.arange(77, dtype=torch.float32)[None]
    tensors[BIGG + "transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    path = tmp_path / "variant.safetensors"
    save_file(tensors, path, metadata=single_file_metadata(TINY_SDXL))
    assert_same_weights(load_pipeline(path), tiny_sdxl, parts=ALL_PARTS)


# ---- v-prediction markers ------------------------------------------------------------------------


def v_config(zero_snr: bool):
    return dataclasses.replace(TINY_SDXL, schedule=dataclasses.replace(
        TINY_SDXL.schedule, prediction_type="v_prediction", rescale_betas_zero_snr=zero_snr))


@pytest.mark.parametrize("config, markers, modelspec", [
    (TINY_SDXL, set(), "epsilon"),
    (v_config(zero_snr=False), {"v_pred"}, "v"),
    (v_config(zero_snr=True), {"v_pred", "ztsnr"}, "v"),
])
def test_markers_are_written(tiny_sdxl, tmp_path, config, markers, modelspec):
    pipe = dataclasses.replace(tiny_sdxl, config=config)
    path = tmp_path / "model.safetensors"
    save_pipeline(pipe, path)
    written = load_file(path)
    assert {"v_pred", "ztsnr"} & written.keys() == markers
    assert all(written[key].numel() == 0 for key in markers)
    with safe_open(path, framework="pt") as f:
        assert f.metadata()["modelspec.prediction_type"] == modelspec
    assert load_pipeline(path).config == config


def sdxl_keys(**markers: torch.Tensor) -> dict[str, torch.Tensor]:
    """Enough of an SDXL file for the config rule (its shapes are SDXL base's, by its keys)."""
    return {BIGG + "ln_final.weight": torch.ones(1280), "model.diffusion_model.out.2.bias": torch.zeros(4), **markers}


MARKED = {
    "v_pred": ({"v_pred": torch.tensor([])}, {}, "v_prediction", False, "its v_pred key"),
    "v_pred+ztsnr": ({"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])}, {}, "v_prediction", True,
                     "its v_pred key (ComfyUI's and A1111's v-prediction marker) and its ztsnr key"),
    "modelspec-v": ({}, {"modelspec.prediction_type": "v"}, "v_prediction", False,
                    "its modelspec.prediction_type metadata 'v' (kohya's marker)"),
    "modelspec-epsilon": ({}, {"modelspec.prediction_type": "epsilon"}, "epsilon", False, "metadata 'epsilon'"),
    "key-before-metadata": ({"v_pred": torch.tensor([])}, {"modelspec.prediction_type": "epsilon"}, "v_prediction",
                            False, "its v_pred key"),
}


@pytest.mark.parametrize("name", list(MARKED))
def test_markers_are_read_and_say_which_decided(tmp_path, name):
    markers, metadata, prediction_type, zero_snr, rule = MARKED[name]
    path = tmp_path / "sdxl.safetensors"
    with pytest.warns(UserWarning, match="loading this SDXL file as") as caught:
        config = _config_from_metadata(path, metadata, sdxl_keys(**markers), None)
    message = str(caught[0].message)
    assert len(caught) == 1 and "\n" not in message and rule in message and f"as {prediction_type}" in message
    assert config == dataclasses.replace(SDXL, schedule=dataclasses.replace(
        SDXL.schedule, prediction_type=prediction_type, rescale_betas_zero_snr=zero_snr))


def test_unmarked_sdxl_is_epsilon_without_a_warning(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _config_from_metadata(tmp_path / "sdxl.safetensors", {}, sdxl_keys(), None) == SDXL
        assert _config_from_metadata(tmp_path / "sdxl.safetensors", {"modelspec.prediction_type": "v"}, sdxl_keys(),
                                     "v_prediction").schedule.prediction_type == "v_prediction"


@pytest.mark.parametrize("markers, metadata, argument, fragment", [
    ({"v_pred": torch.tensor([])}, {}, "epsilon", "its v_pred key (ComfyUI's and A1111's v-prediction marker) "
                                                  "records prediction_type 'v_prediction', not 'epsilon'"),
    ({}, {"modelspec.prediction_type": "x0"}, None, "unknown modelspec.prediction_type metadata 'x0'"),
])
def test_contradicting_or_unknown_markers_are_refused(tmp_path, markers, metadata, argument, fragment):
    path = tmp_path / "sdxl.safetensors"
    with pytest.raises(WeightsError) as error:
        _config_from_metadata(path, metadata, sdxl_keys(**markers), argument)
    assert_one_clear_line(error, path, fragment)


def test_ckpt_markers_are_read(tmp_path):
    # A pickled SDXL checkpoint (sgm's Lightning layout), read weights-only; its config without building it.
    path = tmp_path / "sdxl.ckpt"
    torch.save({"state_dict": sdxl_keys(v_pred=torch.tensor([]), ztsnr=torch.tensor([]))}, path)
    with pytest.warns(UserWarning, match="as v_prediction with zero terminal SNR"):
        config = model_config(path)
    assert config.schedule.prediction_type == "v_prediction" and config.schedule.rescale_betas_zero_snr
    assert config.unet == SDXL.unet


# ---- what minidream does not run: one line each --------------------------------------------------


def z(*shape):
    return torch.zeros(*shape or (1,))


VARIANTS = {
    "refiner": ({"conditioner.embedders.0.model.ln_final.weight": z(),
                 "model.diffusion_model.label_emb.0.0.weight": z()}, "an SDXL refiner"),
    "inpainting": ({BIGG + "ln_final.weight": z(), "model.diffusion_model.input_blocks.0.0.weight": z(2, 9, 3, 3)},
                   "an SDXL inpainting model (UNet with 9 input channels)"),
    "edm": ({BIGG + "ln_final.weight": z(), "edm_mean": z(4), "edm_std": z(4)}, "an SDXL model trained with EDM"),
    "edm-vpred": ({BIGG + "ln_final.weight": z(), "edm_vpred.sigma_max": z()}, "an SDXL model with EDM v-prediction"),
    "sgm-sd2": ({"conditioner.embedders.0.model.ln_final.weight": z()}, "an SD 2.x model in sgm's layout"),
    "distilled": ({BIGG + "ln_final.weight": z(),
                   "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight": z()},
                  "an SDXL-style model with 1 transformer blocks in its UNet, not SDXL base's 70"),
}


@pytest.mark.parametrize("kind", list(VARIANTS))
def test_sdxl_variants_get_one_line(tmp_path, kind):
    tensors, what = VARIANTS[kind]
    path = tmp_path / f"{kind}.safetensors"
    save_file({"model.diffusion_model.out.2.bias": z(), **tensors}, path)
    with pytest.raises(WeightsError) as error:
        load_pipeline(path)
    assert_one_clear_line(error, path, f"this is {what}", "not supported", "SDXL base 1.0")


def test_refiner_folder_gets_one_line(folder, tmp_path):
    refiner = tmp_path / "refiner"
    refiner.mkdir()
    for part in folder.iterdir():
        if part.name not in ("text_encoder", "tokenizer"):
            (refiner / part.name).symlink_to(part)
    with pytest.raises(WeightsError) as error:
        load_pipeline(refiner)
    assert_one_clear_line(error, refiner, "this is an SDXL refiner", "not supported")


def test_convert_either_way(tiny_sdxl, tmp_path):
    first, back = tmp_path / "first.safetensors", tmp_path / "back.safetensors"
    save_pipeline(tiny_sdxl, first, dtype=None)
    assert convert([str(first), str(tmp_path / "folder"), "--dtype", "fp32"]) == 0
    assert (tmp_path / "folder" / "text_encoder_2" / "model.safetensors").is_file()
    assert convert([str(tmp_path / "folder"), str(back), "--dtype", "fp32"]) == 0
    expected = load_file(first)
    expected[BIGG + "logit_scale"] = torch.tensor(math.log(100))  # the one tensor a diffusers folder has no place for
    assert_same_tensors(load_file(back), expected)


# ---- SDXL base's full shapes, on the meta device -------------------------------------------------


@pytest.fixture(scope="module")
def sdxl_meta_file() -> dict[str, torch.Tensor]:
    """What minidream writes for an fp16 SDXL base pipeline: keys, shapes and dtypes, no data."""
    with torch.device("meta"):
        pipe = Pipeline(
            UNet(SDXL.unet), MinidreamVAE(SDXL.vae), text_encoder_class(SDXL.text_encoder)(SDXL.text_encoder),
            default_tokenizer(SDXL.text_encoder), SDXL, OpenCLIPTextModel(SDXL.text_encoder_2),
            default_tokenizer(SDXL.text_encoder_2),
        )
    return single_file_tensors(pipe, torch.float16)


def shapes(state: dict[str, torch.Tensor]) -> dict[str, torch.Size]:
    return {key: t.shape for key, t in state.items()}


def test_full_shape_export_is_what_comfyui_and_diffusers_detect(sdxl_meta_file):
    keys = sdxl_meta_file.keys()
    unet = "model.diffusion_model."
    # ComfyUI's model_detection.detect_unet_config, matched against supported_models.SDXL.unet_config.
    depth = [sum(f"{unet}input_blocks.{block}.1.transformer_blocks.{n}.attn1.to_q.weight" in keys for n in range(20))
             for block in range(1, 9) if f"{unet}input_blocks.{block}.0.in_layers.0.weight" in keys]
    assert depth == [0, 0, 2, 2, 10, 10]
    assert sdxl_meta_file[f"{unet}input_blocks.0.0.weight"].shape[0] == 320  # model_channels
    assert sdxl_meta_file[f"{unet}label_emb.0.0.weight"].shape[1] == 2816  # adm_in_channels
    assert sdxl_meta_file[f"{unet}input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"].shape[1] == 2048
    assert sdxl_meta_file[f"{unet}input_blocks.4.1.proj_in.weight"].ndim == 2  # use_linear_in_transformer
    # diffusers' single-file model type, and its converters consuming every key into its modules.
    assert infer_diffusers_model_type(sdxl_meta_file) == "xl_base"
    with torch.device("meta"):
        unet_model = UNet2DConditionModel.from_config(unet_config_to_diffusers(SDXL.unet))
        vae_model = AutoencoderKL.from_config(vae_config_to_diffusers(SDXL.vae))
        clip_l_model = transformers.CLIPTextModel(clip_config(SDXL.text_encoder, 12))
        bigg_model = transformers.CLIPTextModelWithProjection(clip_config(SDXL.text_encoder_2, 32))
    converted = convert_ldm_unet_checkpoint(sdxl_meta_file, unet_config_to_diffusers(SDXL.unet))
    assert shapes(converted) == shapes(unet_model.state_dict())
    vae_state = convert_ldm_vae_checkpoint(sdxl_meta_file, vae_config_to_diffusers(SDXL.vae))
    assert shapes(vae_state) == shapes(vae_model.state_dict())
    clip_l_state = {key.removeprefix("text_model."): t
                    for key, t in convert_ldm_clip_checkpoint(sdxl_meta_file).items()}
    assert shapes(clip_l_state) == shapes(clip_l_model.state_dict()) | {"embeddings.position_ids": torch.Size([1, 77])}
    bigg_state = convert_open_clip_checkpoint(bigg_model, sdxl_meta_file, prefix=BIGG)
    assert shapes(bigg_state) == shapes(bigg_model.state_dict())
    # Nothing outside the four parts; the UNet, VAE and CLIP-L converters map key for key.
    prefixes = (unet, "first_stage_model.", CLIP_L, BIGG)
    counts = {prefix: sum(key.startswith(prefix) for key in keys) for prefix in prefixes}
    assert sum(counts.values()) == len(keys) == 2515  # 1680 UNet + 248 VAE + 197 CLIP-L (position ids too) + 390 bigG
    assert list(counts.values())[:3] == [len(converted), len(vae_state), len(clip_l_state)]


def test_full_shape_file_loads_as_sdxl_base(sdxl_meta_file, tmp_path, monkeypatch):
    # The whole reading path, key checks and assignment included, on meta tensors standing in for the file's.
    path = tmp_path / "sd_xl_base.safetensors"
    path.touch()
    monkeypatch.setattr(single_file, "read_tensor_file", lambda _: (sdxl_meta_file, {}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe = assemble_pipeline(read_weights(path, use_ema=False), None)
    assert pipe.config == SDXL and pipe.unet.label_emb[0][0].weight.dtype == torch.float16
    assert shapes(single_file_tensors(pipe, torch.float16)) == shapes(sdxl_meta_file)
