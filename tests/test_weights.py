"""Loading and saving whole pipelines with the tiny model: every format, option and error.
(The SD 1.5-shaped round trips and the diffusers converters are in test_weights_sd15.py.)"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from pipeline_checks import assert_one_clear_line, assert_same_weights
from safetensors.torch import load_file, save_file

from minidream import WeightsError, load_pipeline, save_pipeline
from minidream.config import TINY, ScheduleConfig
from minidream.diffusion.sampling import (
    denoise,
    encode_prompts,
    generate,
    image_generators,
)
from minidream.diffusion.schedule import alphas_cumprod, alphas_cumprod_of, make_betas
from minidream.io.diffusers_layout import unet_config_to_diffusers, unet_to_diffusers
from minidream.io.single_file import ema_key, single_file_metadata, single_file_tensors
from minidream.io.tensor_files import read_torch_checkpoint
from minidream.models.pipeline import random_pipeline

PROMPTS = ["a photo of sks dog on the beach", "an oil painting of a lighthouse"]
SEEDS = [11, 12]
STEPS = 4
GUIDANCE = 7.5
SIZE = 64  # pixels: 8 x 8 latents, which the tiny UNet's two levels divide


def distinct_pipeline(seed: int, config=TINY):
    """A tiny pipeline whose every tensor differs from the others: norm weights of exactly 1 and
    zero biases would let a swapped or dropped tensor pass a comparison."""
    pipe = random_pipeline(config, seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            for param in module.parameters():
                if param.ndim == 1:
                    param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return pipe


@pytest.fixture(scope="module")
def tiny():
    return distinct_pipeline(0)


@pytest.fixture(scope="module")
def tiny_file(tiny, tmp_path_factory) -> Path:
    """The tiny pipeline as an fp32 single file."""
    path = tmp_path_factory.mktemp("single") / "tiny.safetensors"
    save_pipeline(tiny, path, dtype=None)
    return path


@pytest.fixture(scope="module")
def tiny_folder(tiny, tmp_path_factory) -> Path:
    """The tiny pipeline as an fp32 diffusers folder."""
    path = tmp_path_factory.mktemp("diffusers") / "tiny"
    save_pipeline(tiny, path, format="diffusers", dtype=None)
    return path


def tiny_tensors(tiny) -> dict[str, torch.Tensor]:
    return {key: t.clone() for key, t in single_file_tensors(tiny, None).items()}


def edit_json(file: Path, changes: dict):
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def write(path: Path, tensors: dict[str, torch.Tensor], config=TINY) -> Path:
    save_file(tensors, path, metadata=single_file_metadata(config))
    return path


# ---- single file --------------------------------------------------------------------------------


def test_single_file_round_trip_is_bit_identical_and_keeps_the_config(tmp_path):
    v_trailing = ScheduleConfig(prediction_type="v_prediction", timestep_spacing="trailing")
    config = dataclasses.replace(TINY, schedule=v_trailing)
    pipe = distinct_pipeline(1, config)
    save_pipeline(pipe, tmp_path / "model.safetensors", dtype=None)
    loaded = load_pipeline(tmp_path / "model.safetensors")
    assert_same_weights(loaded, pipe)
    assert loaded.config == config
    assert loaded.tokenizer(["a dog"]).tolist() == pipe.tokenizer(["a dog"]).tolist()


def test_single_file_export_is_fp16_by_default_with_all_three_parts_under_the_sd_prefixes(tiny, tmp_path):
    save_pipeline(tiny, tmp_path / "model.safetensors")
    tensors = load_file(tmp_path / "model.safetensors")
    expected = {
        prefix + key
        for prefix, module in (("model.diffusion_model.", tiny.unet), ("first_stage_model.", tiny.vae),
                               ("cond_stage_model.transformer.", tiny.text_encoder))
        for key in module.state_dict()
    }
    assert tensors.keys() == expected
    assert {t.dtype for t in tensors.values()} == {torch.float16}

    save_pipeline(tiny, tmp_path / "fp32.safetensors", dtype=torch.float32)
    assert {t.dtype for t in load_file(tmp_path / "fp32.safetensors").values()} == {torch.float32}


def test_fp16_file_stays_fp16_and_casts_on_request(tiny, tmp_path):
    path = tmp_path / "model.safetensors"
    save_pipeline(tiny, path)  # fp16
    assert_same_weights(load_pipeline(path), tiny, dtype=torch.float16)

    as_fp32 = load_pipeline(path, dtype=torch.float32, device="cpu")
    for name in ("unet", "vae", "text_encoder"):
        for key, tensor in getattr(tiny, name).state_dict().items():
            assert torch.equal(getattr(as_fp32, name).state_dict()[key], tensor.half().float())

    as_fp16 = load_pipeline(tmp_path / "model.safetensors", dtype=torch.float16)
    assert as_fp16.unet.out[2].weight.dtype == torch.float16
    assert as_fp16.vae.decoder.conv_out.weight.dtype == torch.float32  # as Pipeline.to(fp16) keeps it


def test_a_model_whose_file_mixes_dtypes_loads_in_fp32(tiny, tmp_path):
    tensors = tiny_tensors(tiny)
    unet_keys = [k for k in tensors if k.startswith("model.diffusion_model.")]
    for key in unet_keys[::2]:
        tensors[key] = tensors[key].half()
    loaded = load_pipeline(write(tmp_path / "mixed.safetensors", tensors))
    assert {p.dtype for p in loaded.unet.parameters()} == {torch.float32}


def test_text_encoder_keys_without_the_text_model_level_load(tiny, tmp_path):
    """Some SD 1.x files, saved with an old transformers, say cond_stage_model.transformer.encoder.*"""
    old_names = {key.replace("transformer.text_model.", "transformer."): t for key, t in tiny_tensors(tiny).items()}
    assert_same_weights(load_pipeline(write(tmp_path / "old.safetensors", old_names)), tiny)


def test_a_run_folder_loads_from_its_model_safetensors(tiny, tmp_path):
    save_pipeline(tiny, tmp_path / "run" / "model.safetensors", dtype=None)
    (tmp_path / "run" / "checkpoints").mkdir()
    assert_same_weights(load_pipeline(tmp_path / "run"), tiny)


def test_changing_a_loaded_model_in_place_never_changes_the_file(tiny_file):
    """The weights are the file's memory map, copy-on-write: training in place is safe."""
    before = tiny_file.read_bytes()
    pipe = load_pipeline(tiny_file)
    with torch.no_grad():
        for param in pipe.unet.parameters():
            param.add_(1.0)
    assert tiny_file.read_bytes() == before
    assert torch.equal(load_pipeline(tiny_file).unet.out[2].weight + 1.0, pipe.unet.out[2].weight)


# ---- EMA and the training checkpoint's extras ----------------------------------------------------


def training_checkpoint(model, ema) -> dict[str, torch.Tensor]:
    """A tiny file laid out as an LDM training checkpoint: the model, an EMA copy of the UNet
    under LDM's dotless names, the EMA bookkeeping and the noise-schedule buffers."""
    tensors = tiny_tensors(model)
    for key, tensor in ema.unet.state_dict().items():
        tensors[ema_key(key)] = tensor.clone()
    betas = make_betas("scaled_linear", 1000, 0.00085, 0.012)
    cumprod = alphas_cumprod(betas)
    tensors.update({
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(470000, dtype=torch.int32),
        "betas": betas.half(),  # pruned files store them in fp16
        "alphas_cumprod": cumprod,
        "alphas_cumprod_prev": torch.cat([torch.ones(1), cumprod[:-1]]),
        "sqrt_alphas_cumprod": cumprod.sqrt(),
        "posterior_variance": betas * 0.5,
    })
    return tensors


def test_ema_option_picks_the_ema_weights_and_otherwise_the_model(tiny, tmp_path):
    ema = distinct_pipeline(5)
    path = write(tmp_path / "train.safetensors", training_checkpoint(tiny, ema))

    assert_same_weights(load_pipeline(path), tiny)
    with_ema = load_pipeline(path, use_ema=True)
    assert_same_weights(with_ema, ema, parts=["unet"])
    assert_same_weights(with_ema, tiny, parts=["vae", "text_encoder"])  # LDM keeps an EMA of the UNet only


def test_ema_names_agree_with_diffusers_converter(tiny, tmp_path):
    """diffusers' convert_ldm_unet_checkpoint(extract_ema=True) picks the same tensors."""
    ema = distinct_pipeline(5)
    tensors = training_checkpoint(tiny, ema)
    converted = convert_ldm_unet_checkpoint(tensors, unet_config_to_diffusers(TINY.unet), extract_ema=True)
    loaded = load_pipeline(write(tmp_path / "t.safetensors", tensors), use_ema=True)
    ours = unet_to_diffusers(loaded.unet.state_dict(), TINY.unet)
    assert converted.keys() == ours.keys()
    assert all(torch.equal(converted[k], ours[k]) for k in ours)


def test_ema_requested_from_a_file_without_ema_is_refused(tiny_file, tiny_folder):
    with pytest.raises(WeightsError) as error:
        load_pipeline(tiny_file, use_ema=True)
    assert_one_clear_line(error, tiny_file, "has no EMA weights", "model_ema.*")
    with pytest.raises(WeightsError) as error:
        load_pipeline(tiny_folder, use_ema=True)
    assert_one_clear_line(error, tiny_folder, "diffusers folder holds one UNet")


def test_incomplete_ema_is_refused_naming_the_missing_ema_tensors(tiny, tmp_path):
    tensors = training_checkpoint(tiny, tiny)
    del tensors[ema_key("out.2.weight")]
    with pytest.raises(WeightsError) as error:
        load_pipeline(write(tmp_path / "t.safetensors", tensors), use_ema=True)
    assert_one_clear_line(error, tmp_path / "t.safetensors", "1 missing", "model_ema.diffusion_modelout2weight")


def test_schedule_buffers_of_another_schedule_are_refused(tiny, tmp_path):
    tensors = training_checkpoint(tiny, tiny)
    tensors["betas"] = make_betas("linear", 1000, 0.0001, 0.02)
    with pytest.raises(WeightsError) as error:
        load_pipeline(write(tmp_path / "t.safetensors", tensors))
    assert_one_clear_line(error, tmp_path / "t.safetensors", "betas buffer is not SD 1.x's noise schedule")


# ---- diffusers folder ---------------------------------------------------------------------------


def test_diffusers_folder_round_trip_is_bit_identical(tiny, tiny_folder):
    assert sorted(p.name for p in tiny_folder.iterdir()) == [
        "model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    loaded = load_pipeline(tiny_folder)
    assert_same_weights(loaded, tiny)
    assert loaded.config == TINY


def test_fp16_variant_files_are_read_when_they_are_the_only_weights(tiny, tmp_path):
    folder = tmp_path / "variant"
    save_pipeline(tiny, folder, format="diffusers")
    names = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
    for part, name in names.items():
        (folder / part / f"{name}.safetensors").rename(folder / part / f"{name}.fp16.safetensors")
    assert_same_weights(load_pipeline(folder), tiny, dtype=torch.float16)


def test_diffusers_export_opens_in_diffusers_and_gives_the_same_image(tiny_folder):
    pipe = load_pipeline(tiny_folder)
    reference = StableDiffusionPipeline.from_pretrained(tiny_folder, local_files_only=True)
    reference.set_progress_bar_config(disable=True)
    assert isinstance(reference.scheduler, DDIMScheduler) and reference.safety_checker is None

    def diffusers_run(output_type):
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in SEEDS]
        return reference(PROMPTS, generator=generators, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                         height=SIZE, width=SIZE, output_type=output_type).images

    cond, uncond = encode_prompts(pipe, PROMPTS), encode_prompts(pipe, [""] * len(PROMPTS))
    latents = denoise(pipe, cond, uncond, image_generators(SEEDS), (4, SIZE // 8, SIZE // 8), "ddim", STEPS, GUIDANCE)
    assert torch.equal(latents, diffusers_run("latent"))  # the same denoising, bit for bit

    images = generate(pipe, PROMPTS, SEEDS, steps=STEPS, sampler="ddim", guidance=GUIDANCE, height=SIZE, width=SIZE)
    for ours, theirs in zip(images, diffusers_run("pil"), strict=True):
        difference = np.abs(np.asarray(ours, dtype=int) - np.asarray(theirs, dtype=int))
        assert difference.max() <= 1  # one 8-bit level: float rounding in the two VAE decoders
        assert np.asarray(ours).std() > 10  # an image, not a constant


def test_scheduler_settings_are_read_and_written(tiny_folder, tmp_path):
    folder = tmp_path / "v"
    shutil.copytree(tiny_folder, folder)
    settings = {"prediction_type": "v_prediction", "timestep_spacing": "trailing", "steps_offset": 0,
                "set_alpha_to_one": True, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
                "num_train_timesteps": 500, "clip_sample": False, "rescale_betas_zero_snr": True}
    config_file = folder / "scheduler" / "scheduler_config.json"
    edit_json(config_file, settings)
    pipe = load_pipeline(folder)
    assert pipe.config.schedule == ScheduleConfig(**settings)

    save_pipeline(pipe, tmp_path / "out", format="diffusers")
    written = DDIMScheduler.from_pretrained(tmp_path / "out" / "scheduler")
    assert {key: written.config[key] for key in settings} == settings
    # The betas minidream samples with are diffusers' (zero-terminal-SNR rescaled: the last alpha_bar is 0).
    assert torch.equal(alphas_cumprod_of(pipe.config.schedule), written.alphas_cumprod)
    assert alphas_cumprod_of(pipe.config.schedule)[-1] == 0


def test_sd15_release_scheduler_config_reads_as_sd_defaults(tiny_folder, tmp_path):
    folder = tmp_path / "pndm"
    shutil.copytree(tiny_folder, folder)
    # stable-diffusion-v1-5's scheduler/scheduler_config.json, as published (no prediction_type, no spacing).
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
        "steps_offset": 1, "trained_betas": None, "clip_sample": False,
    }))
    assert load_pipeline(folder).config.schedule == ScheduleConfig()


@pytest.mark.parametrize("change, fragment", [
    ({"trained_betas": [0.1, 0.2]}, "trained_betas=[0.1, 0.2]"),
    ({"prediction_type": "sample"}, "unknown prediction type 'sample'"),
    ({"beta_schedule": "sigmoid"}, "unknown beta schedule 'sigmoid'"),
])
def test_scheduler_settings_minidream_cannot_honour_are_refused(tiny_folder, tmp_path, change, fragment):
    folder = tmp_path / "s"
    shutil.copytree(tiny_folder, folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    edit_json(config_file, change)
    with pytest.raises(WeightsError) as error:
        load_pipeline(folder)
    assert_one_clear_line(error, config_file, fragment)


# ---- what is not SD 1.x (SD 2.x: test_sd2_single_file.py; SDXL: test_sdxl_files.py) -----------------

def z():
    return torch.zeros(1)  # a fresh tensor each time: safetensors refuses to write one tensor twice


NOT_SD1 = {
    "label-emb": ({"model.diffusion_model.label_emb.0.0.weight": z()}, "a UNet with class/size conditioning"),
    "inpainting": ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 9, 3, 3)}, "an SD 1.x inpainting model"),
    "lora-kohya": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": z()}, "a LoRA"),
    "lora-peft": ({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": z()}, "a LoRA"),
    "vae": ({"encoder.conv_in.weight": z(), "decoder.conv_in.weight": z()}, "a standalone VAE"),
    "other": ({"layer.weight": z()}, "not a Stable Diffusion checkpoint"),
}


@pytest.mark.parametrize("kind", list(NOT_SD1))
def test_other_architectures_get_one_line_saying_what_they_are(tmp_path, kind):
    tensors, what = NOT_SD1[kind]
    path = tmp_path / f"{kind}.safetensors"
    save_file(tensors, path)
    with pytest.raises(WeightsError) as error:
        load_pipeline(path)
    assert_one_clear_line(error, path, f"this is {what}", "minidream supports Stable Diffusion 1.x")


@pytest.mark.parametrize("change, what", [
    (lambda f: edit_json(f / "unet" / "config.json", {"in_channels": 9}), "an inpainting pipeline"),
    (lambda f: edit_json(f / "unet" / "config.json", {"in_channels": 5}), "a depth-to-image pipeline"),
])
def test_other_architectures_in_diffusers_folders_are_named(tiny_folder, tmp_path, change, what):
    folder = tmp_path / "other"
    shutil.copytree(tiny_folder, folder)
    change(folder)
    with pytest.raises(WeightsError) as error:
        load_pipeline(folder)
    assert_one_clear_line(error, folder, f"this is {what}", "minidream supports Stable Diffusion 1.x")



# ---- broken files and folders -------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(WeightsError) as error:
        load_pipeline(tmp_path / "nowhere.safetensors")
    assert_one_clear_line(error, tmp_path / "nowhere.safetensors", "no such file or folder")


def test_folder_without_the_expected_parts(tiny_folder, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError) as error:
        load_pipeline(tmp_path / "empty")
    assert_one_clear_line(error, tmp_path / "empty", "neither a diffusers folder", "nor a minidream run folder")

    partial = tmp_path / "partial"
    shutil.copytree(tiny_folder, partial)
    shutil.rmtree(partial / "vae")
    shutil.rmtree(partial / "tokenizer")
    with pytest.raises(WeightsError) as error:
        load_pipeline(partial)
    assert_one_clear_line(error, partial, "incomplete diffusers folder: no vae/, tokenizer/")

    (partial / "vae").mkdir()
    shutil.copytree(tiny_folder / "tokenizer", partial / "tokenizer")
    shutil.copy(tiny_folder / "vae" / "config.json", partial / "vae")
    with pytest.raises(WeightsError) as error:
        load_pipeline(partial)
    assert_one_clear_line(error, partial / "vae", "no weights file", "diffusion_pytorch_model.safetensors")


def test_a_file_that_is_not_safetensors(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("these are my notes, not a model")
    with pytest.raises(WeightsError) as error:
        load_pipeline(path)
    assert_one_clear_line(error, path, "not a safetensors file")

    (tmp_path / "model.onnx").write_bytes(b"\x08\x07")
    with pytest.raises(WeightsError) as error:
        load_pipeline(tmp_path / "model.onnx")
    assert_one_clear_line(error, tmp_path / "model.onnx", "unknown file type '.onnx'")


def test_truncated_safetensors_say_so(tiny_file, tmp_path):
    data = tiny_file.read_bytes()
    for name, length in (("half.safetensors", len(data) // 2), ("header.safetensors", 40)):
        (tmp_path / name).write_bytes(data[:length])
        with pytest.raises(WeightsError) as error:
            load_pipeline(tmp_path / name)
        assert_one_clear_line(error, tmp_path / name, "truncated", f"{length:,}")


def test_missing_keys_are_counted_and_named_with_the_files_prefix(tiny, tmp_path):
    tensors = tiny_tensors(tiny)
    removed = sorted(k for k in tensors if k.startswith("model.diffusion_model.output_blocks."))
    for key in removed:
        del tensors[key]
    path = write(tmp_path / "m.safetensors", tensors)
    with pytest.raises(WeightsError) as error:
        load_pipeline(path)
    assert_one_clear_line(error, path, f"{len(removed)} missing", "the SD 1.x UNet",
                          "model.diffusion_model.output_blocks.", f"{len(removed) - 3} more")


def test_unexpected_keys_are_counted_and_named(tiny, tmp_path):
    tensors = {**tiny_tensors(tiny), "first_stage_model.loss.logvar": z(), "first_stage_model.extra.weight": z()}
    path = write(tmp_path / "u.safetensors", tensors)
    with pytest.raises(WeightsError) as error:
        load_pipeline(path)
    assert_one_clear_line(error, path, "2 unexpected", "first_stage_model.extra.weight", "the SD 1.x VAE")

    path = write(tmp_path / "top.safetensors", {**tiny_tensors(tiny), "something_else": z()})
    with pytest.raises(WeightsError) as error:
        load_pipeline(path)
    assert_one_clear_line(error, path, "1 unexpected (something_else)")


def test_shape_mismatches_name_both_shapes(tiny, tmp_path):
    tensors = tiny_tensors(tiny)
    tensors["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.zeros(33)
    path = write(tmp_path / "s.safetensors", tensors)
    with pytest.raises(WeightsError) as error:
        load_pipeline(path)
    assert_one_clear_line(error, path, "1 mis-shaped",
                          "cond_stage_model.transformer.text_model.final_layer_norm.weight [33], expected [32]")


def test_a_single_file_without_config_metadata_is_read_as_sd15(tiny, tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file(tiny_tensors(tiny), path)  # tiny shapes, no minidream_config: the SD 1.5 shapes are expected
    with pytest.raises(WeightsError) as error:
        load_pipeline(path)
    assert_one_clear_line(error, path, "mis-shaped (model.diffusion_model.time_embed.0.weight [128, 32], expected [1280, 320]")

    save_file(tiny_tensors(tiny), path, metadata={"minidream_config": "{not json"})
    with pytest.raises(WeightsError) as error:
        load_pipeline(path)
    assert_one_clear_line(error, path, "unreadable minidream_config metadata")


def test_diffusers_folder_key_errors_name_the_component_file(tiny_folder, tmp_path):
    folder = tmp_path / "k"
    shutil.copytree(tiny_folder, folder)
    unet_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(unet_file)
    del tensors["conv_in.weight"]
    save_file(tensors, unet_file)
    with pytest.raises(WeightsError) as error:
        load_pipeline(folder)
    assert_one_clear_line(error, unet_file, "1 missing (conv_in.weight)", "the diffusers UNet")


# ---- .ckpt / .pt --------------------------------------------------------------------------------


class RunsCodeWhenUnpickled:
    """An object whose unpickling would call os.makedirs(marker): proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (str(self.marker),)


def test_pickled_checkpoint_with_arbitrary_objects_is_refused_without_running_them(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.ckpt"
    unet_tensor = {"model.diffusion_model.out.2.bias": torch.zeros(4)}
    torch.save({"state_dict": unet_tensor, "payload": RunsCodeWhenUnpickled(marker)}, path)
    with pytest.raises(WeightsError) as error:
        load_pipeline(path)
    assert_one_clear_line(error, path, "refused", "Python objects other than tensors", "os.makedirs",
                          "weights_only=True")
    assert not marker.exists()


def test_a_legacy_non_zip_ckpt_is_read_weights_only_and_refused_by_name_when_it_holds_objects(tiny, tmp_path):
    """torch.save's pre-1.6 format cannot be memory-mapped; torch's own message for it was
    "mmap can only be used with files saved with ...". It loads (weights only) without mmap."""
    legacy = tmp_path / "legacy.ckpt"
    tensors = tiny_tensors(tiny)
    torch.save({"state_dict": tensors}, legacy, _use_new_zipfile_serialization=False)
    read = read_torch_checkpoint(legacy)
    assert read.keys() == tensors.keys() and all(torch.equal(read[k], tensors[k]) for k in tensors)
    with pytest.raises(WeightsError) as error:  # read, then checked against SD 1.5 (no config metadata in a .ckpt)
        load_pipeline(legacy)
    assert_one_clear_line(error, legacy, "tensors do not match the SD 1.x")

    marker = tmp_path / "ran"
    evil = tmp_path / "evil-legacy.ckpt"
    torch.save({"state_dict": {}, "payload": RunsCodeWhenUnpickled(marker)}, evil, _use_new_zipfile_serialization=False)
    with pytest.raises(WeightsError) as error:
        load_pipeline(evil)
    assert_one_clear_line(error, evil, "refused: a legacy (pre-zip) PyTorch checkpoint", "weights_only=True")
    assert not marker.exists()


def test_a_ckpt_that_is_not_a_torch_file(tmp_path):
    path = tmp_path / "garbage.ckpt"
    path.write_bytes(b"definitely not a zip or a pickle")
    with pytest.raises(WeightsError) as error:
        load_pipeline(path)
    assert_one_clear_line(error, path, "not a readable PyTorch checkpoint")


# ---- saving -------------------------------------------------------------------------------------


def test_single_file_must_be_named_safetensors(tiny, tmp_path):
    with pytest.raises(WeightsError) as error:
        save_pipeline(tiny, tmp_path / "model.ckpt")
    assert_one_clear_line(error, tmp_path / "model.ckpt", "*.safetensors")
    assert not any(tmp_path.iterdir())


def test_existing_non_empty_folder_is_not_replaced(tiny, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    with pytest.raises(WeightsError) as error:
        save_pipeline(tiny, tmp_path / "out", format="diffusers")
    assert_one_clear_line(error, tmp_path / "out", "already exists")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def fail_after_writing_some(monkeypatch, calls_before_failure: int):
    """safetensors' writer that, on call number `calls_before_failure`, writes half a file and
    then fails as a full disk would."""
    real_save = safetensors.torch.save_file
    calls = []

    def save_file_then_fail(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) > calls_before_failure:
            Path(filename).write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file_then_fail)


@pytest.mark.parametrize("format, name, calls_before_failure", [
    ("single-file", "model.safetensors", 0),
    ("diffusers", "model", 2),  # the UNet and the VAE are written, then the text encoder fails
])
def test_a_failed_export_leaves_nothing_behind(tiny, tmp_path, monkeypatch, format, name, calls_before_failure):
    fail_after_writing_some(monkeypatch, calls_before_failure)
    with pytest.raises(OSError, match="No space left"):
        save_pipeline(tiny, tmp_path / name, format=format)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_overwrite_keeps_the_previous_file(tiny_file, tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    shutil.copy(tiny_file, path)
    before = path.read_bytes()
    fail_after_writing_some(monkeypatch, 0)
    with pytest.raises(OSError):
        save_pipeline(distinct_pipeline(3), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_a_pipeline_diffusers_cannot_express_is_refused_before_writing(tmp_path):
    config = dataclasses.replace(TINY, vae=dataclasses.replace(TINY.vae, norm_eps=1e-5))
    with pytest.raises(WeightsError) as error:
        save_pipeline(random_pipeline(config), tmp_path / "out", format="diffusers")
    assert_one_clear_line(error, tmp_path / "out", "cannot write a diffusers folder", "GroupNorm eps")
    assert list(tmp_path.iterdir()) == []


def test_importing_the_config_does_not_import_torch():
    """minidream.load_pipeline is loaded on first use, so configs stay cheap to import."""
    code = "import sys, minidream.config; assert 'torch' not in sys.modules; import minidream; minidream.load_pipeline"
    subprocess.run([sys.executable, "-c", code], check=True)
