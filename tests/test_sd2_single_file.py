"""SD 2.x single files: minidream's own round trip, diffusers' converters reading its export,
the prediction-type rule, and one line for the SD 2.x variants it does not run."""

import dataclasses
import warnings

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from pipeline_checks import assert_one_clear_line
from safetensors.torch import load_file, save_file
from test_open_clip_text import sd2_reference_config
from transformers import CLIPTextModel as TransformersCLIPTextModel

from minidream.config import SD21, SD21_BASE, TINY_SD2
from minidream.io import open_clip_layout
from minidream.io.diffusers_layout import (
    unet_config_to_diffusers,
    unet_to_diffusers,
    vae_config_to_diffusers,
    vae_to_diffusers,
)
from minidream.io.single_file import V_PREDICTION_PROBE, _config_from_metadata
from minidream.io.tensor_files import WeightsError
from minidream.io.weights import load_pipeline, save_pipeline
from minidream.models.open_clip_text import OpenCLIPTextModel
from minidream.models.pipeline import random_pipeline


@pytest.fixture(scope="module")
def tiny_sd2():
    pipe = random_pipeline(TINY_SD2, seed=3)
    with torch.no_grad():  # buffers away from their init, so the round trip is checked on real values
        pipe.text_encoder.text_projection.normal_()
        pipe.text_encoder.logit_scale.fill_(4.6052)
    return pipe


@pytest.fixture(scope="module")
def exported(tiny_sd2, tmp_path_factory):
    path = tmp_path_factory.mktemp("sd2") / "tiny-sd2.safetensors"
    save_pipeline(tiny_sd2, path, dtype=None)
    return path


@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_round_trip_is_bit_identical(tiny_sd2, tmp_path, dtype):
    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    save_pipeline(tiny_sd2, first, dtype=dtype)
    loaded = load_pipeline(first)
    assert isinstance(loaded.text_encoder, OpenCLIPTextModel) and loaded.config == TINY_SD2
    assert loaded.tokenizer.pad_token_id == 0
    save_pipeline(loaded, second, dtype=dtype)
    a, b = load_file(first), load_file(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # SD 2's layout: the OpenCLIP tower under cond_stage_model.model.*, nothing under .transformer.
    assert "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight" in a
    assert {"cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale"} <= a.keys()
    assert not any(k.startswith("cond_stage_model.transformer.") for k in a)
    if dtype is None:
        ours = tiny_sd2.text_encoder.state_dict()
        assert all(torch.equal(a["cond_stage_model.model." + k], v) for k, v in ours.items())


def assert_converters_give_our_modules(checkpoint: dict[str, torch.Tensor], pipe) -> tuple[dict, dict]:
    """diffusers' own LDM converters on `checkpoint` give exactly minidream's tensors, renamed by
    its diffusers layout and OpenCLIP table; returns their UNet and text encoder state dicts."""
    cfg = pipe.config
    unet = convert_ldm_unet_checkpoint(checkpoint, unet_config_to_diffusers(cfg.unet))
    expected = unet_to_diffusers(pipe.unet.state_dict(), cfg.unet)
    assert unet.keys() == expected.keys() and all(torch.equal(unet[k], expected[k]) for k in unet)
    vae = convert_ldm_vae_checkpoint(checkpoint, vae_config_to_diffusers(cfg.vae))
    expected = vae_to_diffusers(pipe.vae.state_dict(), cfg.vae)
    assert vae.keys() == expected.keys() and all(torch.equal(vae[k], expected[k]) for k in vae)
    stub = type("TextModel", (), {"config": sd2_reference_config(cfg.text_encoder)})()  # all the converter reads
    text = convert_open_clip_checkpoint(stub, checkpoint)
    expected = open_clip_layout.to_transformers(pipe.text_encoder.state_dict(), cfg.text_encoder.layers)
    assert text.keys() == expected.keys() and all(torch.equal(text[k], expected[k]) for k in text)
    return unet, text


def test_diffusers_converters_read_the_export(tiny_sd2, exported):
    unet, text = assert_converters_give_our_modules(load_file(exported), tiny_sd2)
    # And the modules they build compute minidream's numbers.
    text_model = TransformersCLIPTextModel(sd2_reference_config(TINY_SD2.text_encoder)).eval()
    text_model.load_state_dict({k.removeprefix("text_model."): v for k, v in text.items()}, strict=True)
    reference_unet = UNet2DConditionModel.from_config(unet_config_to_diffusers(TINY_SD2.unet)).eval()
    reference_unet.load_state_dict(unet, strict=True)
    ids = tiny_sd2.tokenizer(["a photo of sks dog", ""])
    with torch.no_grad():
        ours = tiny_sd2.text_encoder(ids)
        assert ((ours - text_model(ids).last_hidden_state).abs().max() / ours.abs().max()).item() <= 1e-5
        x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        out = tiny_sd2.unet(x, 500, ours[:1])
        theirs = reference_unet(x, 500, encoder_hidden_states=ours[:1]).sample
        assert ((out - theirs).abs().max() / theirs.abs().max()).item() <= 1e-5


def sd2_keys(probe_std: float | None) -> dict[str, torch.Tensor]:
    tensors = {
        "cond_stage_model.model.ln_final.weight": torch.ones(1024),
        "cond_stage_model.model.transformer.resblocks.23.ln_1.weight": torch.ones(1024),
        "model.diffusion_model.out.2.bias": torch.zeros(4),
    }
    if probe_std is not None:
        values = torch.randn(640, generator=torch.Generator().manual_seed(0))
        tensors[V_PREDICTION_PROBE] = values / values.std(unbiased=False) * probe_std
    return tensors


@pytest.mark.parametrize("probe_std, expected", [(0.2, "v_prediction"), (0.03, "epsilon"), (None, "epsilon")])
def test_prediction_type_rule_says_what_decided(tmp_path, probe_std, expected):
    path = tmp_path / "sd2.safetensors"
    with pytest.warns(UserWarning, match="by ComfyUI's rule") as caught:
        config = _config_from_metadata(path, {}, sd2_keys(probe_std), None)
    assert len(caught) == 1 and "\n" not in str(caught[0].message) and expected in str(caught[0].message)
    assert config == dataclasses.replace(SD21_BASE, schedule=dataclasses.replace(SD21_BASE.schedule, prediction_type=expected))
    assert (config == SD21) == (expected == "v_prediction")


def test_prediction_type_argument_decides_without_a_rule(tmp_path):
    path = tmp_path / "sd2.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _config_from_metadata(path, {}, sd2_keys(0.03), "v_prediction") == SD21
        assert _config_from_metadata(path, {}, sd2_keys(0.2), "epsilon") == SD21_BASE
    with pytest.raises(WeightsError, match="prediction_type must be one of epsilon, v_prediction"):
        _config_from_metadata(path, {}, sd2_keys(0.2), "v")


def test_metadata_decides_and_a_contradicting_argument_is_refused(exported):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no rule runs: the file records its type
        assert load_pipeline(exported, prediction_type="v_prediction").config == TINY_SD2
    with pytest.raises(WeightsError) as error:
        load_pipeline(exported, prediction_type="epsilon")
    assert_one_clear_line(error, exported, "records prediction_type 'v_prediction', not 'epsilon'")


def z(*shape):
    return torch.zeros(*shape or (1,))


SD2_VARIANTS = {
    "inpainting": ({"model.diffusion_model.input_blocks.0.0.weight": z(2, 9, 3, 3)}, "an SD 2.x inpainting model"),
    "depth": ({"model.diffusion_model.input_blocks.0.0.weight": z(2, 5, 3, 3), "depth_model.model.x": z()},
              "an SD 2.x depth-to-image model"),
    "unclip": ({"model.diffusion_model.label_emb.0.0.weight": z(), "embedder.model.visual.x": z(),
                "noise_augmentor.betas": z()}, "an SD 2.x unCLIP model"),
}


@pytest.mark.parametrize("kind", list(SD2_VARIANTS))
def test_sd2_variants_get_one_line(tmp_path, kind):
    tensors, what = SD2_VARIANTS[kind]
    tensors = {"cond_stage_model.model.ln_final.weight": z(), "model.diffusion_model.out.2.bias": z(), **tensors}
    path = tmp_path / f"{kind}.safetensors"
    save_file(tensors, path)
    with pytest.raises(WeightsError) as error:
        load_pipeline(path)
    assert_one_clear_line(error, path, f"this is {what}", "not supported", "minidream supports Stable Diffusion 1.x and 2.x")


def test_sd2_unet_without_open_clip_gets_one_line(tmp_path):
    path = tmp_path / "odd.safetensors"
    save_file({"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": z(2, 1024)}, path)
    with pytest.raises(WeightsError) as error:
        load_pipeline(path)
    assert_one_clear_line(error, path, "without the OpenCLIP text encoder")


def test_single_file_to_diffusers_folder_and_back(tiny_sd2, exported, tmp_path):
    # An SD 2.x single file written as a diffusers folder holds SD 2's transformers text encoder
    # (one layer fewer); diffusers opens it, and both layouts give the same numbers.
    folder = tmp_path / "folder"
    save_pipeline(load_pipeline(exported), folder, format="diffusers", dtype=None)
    reference = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    assert reference.text_encoder.config.num_hidden_layers == 23
    assert reference.scheduler.config.prediction_type == "v_prediction"
    back = load_pipeline(folder)
    assert back.config.text_encoder == open_clip_layout.transformers_config(TINY_SD2.text_encoder)
    assert back.tokenizer.pad_token_id == 0
    ids = back.tokenizer(["a photo of sks dog", ""])
    assert torch.equal(ids, tiny_sd2.tokenizer(["a photo of sks dog", ""]))
    with torch.no_grad():
        ours = tiny_sd2.text_encoder(ids)
        for states in (back.text_encoder(ids), reference.text_encoder(ids).last_hidden_state):
            assert ((states - ours).abs().max() / ours.abs().max()).item() <= 1e-5


def test_transformers_layout_sd2_writes_sd2_keys(tiny_sd2, tmp_path):
    # A pipeline read from an SD 2.x diffusers folder (23-layer transformers text encoder) is
    # written under SD 2's keys, without the resblock it never had, and reads back the same.
    folder, path = tmp_path / "folder", tmp_path / "from-folder.safetensors"
    save_pipeline(tiny_sd2, folder, format="diffusers", dtype=None)
    from_folder = load_pipeline(folder)
    save_pipeline(from_folder, path, dtype=None)
    written = load_file(path)
    assert not any(k.startswith("cond_stage_model.transformer.") for k in written)
    assert "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight" in written
    assert not any(k.startswith("cond_stage_model.model.transformer.resblocks.23.") for k in written)
    text = {k.removeprefix("cond_stage_model.model."): v for k, v in written.items() if k.startswith("cond_stage_model.")}
    ours = tiny_sd2.text_encoder.state_dict()
    assert len(text) == len(ours) - 2 - 12  # less text_projection, logit_scale and the last resblock
    assert all(torch.equal(tensor, ours[k]) for k, tensor in text.items())
    again = load_pipeline(path)
    assert again.config == from_folder.config
    assert all(torch.equal(a, b) for a, b in zip(again.text_encoder.state_dict().values(),
                                                 from_folder.text_encoder.state_dict().values()))
    # Without minidream's metadata (as diffusers' export script writes it), the missing last
    # resblock says: the transformers layout, 23 layers.
    bare = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in written.items()}, bare)
    with pytest.warns(UserWarning, match="ComfyUI's rule"):
        config = _config_from_metadata(bare, {}, load_file(bare), None)
    assert config.text_encoder == open_clip_layout.transformers_config(SD21.text_encoder)
