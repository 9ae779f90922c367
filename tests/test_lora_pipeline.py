"""LoRAs and whole pipelines: saving an adapted pipeline writes only the base weights, and
load_pipeline(loras=...) merges LoRA files in as apply_lora_file does."""

import pytest
import safetensors.torch
import torch
from pipeline_checks import assert_one_clear_line, assert_same_weights
from test_lora import adapted_with_random_up
from test_lora_files import adapt

from minidream.config import TINY
from minidream.io.lora_files import apply_lora_file, save_lora
from minidream.io.single_file import single_file_tensors
from minidream.io.tensor_files import WeightsError
from minidream.io.weights import load_pipeline, save_pipeline
from minidream.models import lora
from minidream.models.pipeline import random_pipeline


def test_an_adapted_pipeline_is_saved_without_its_adapters(tmp_path):
    pipe = random_pipeline(TINY, seed=4)
    plain = {key: tensor.clone() for key, tensor in single_file_tensors(pipe, None).items()}
    adapt(pipe)
    adapted = single_file_tensors(pipe, None)
    assert adapted.keys() == plain.keys()
    assert all(torch.equal(adapted[key], tensor) for key, tensor in plain.items())
    save_pipeline(pipe, tmp_path / "model.safetensors", dtype=None)
    assert load_pipeline(tmp_path / "model.safetensors").unet.state_dict().keys() == random_pipeline(TINY).unet.state_dict().keys()
    # merged, the same file holds the adapted weights
    lora.merge(pipe.unet)
    merged = single_file_tensors(pipe, None)
    assert merged.keys() == plain.keys()
    name = next(iter(lora.adapted_layers(pipe.unet)))
    key = f"model.diffusion_model.{name}.weight"
    assert torch.equal(merged[key], pipe.unet.get_submodule(name).weight)
    assert not torch.equal(merged[key], plain[key])


def test_an_adapted_pipeline_is_saved_as_a_diffusers_folder_without_its_adapters(tmp_path):
    pipe = adapt(random_pipeline(TINY, seed=4))
    save_pipeline(pipe, tmp_path / "folder", format="diffusers", dtype=None)
    assert_same_weights(load_pipeline(tmp_path / "folder"), random_pipeline(TINY, seed=4))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny fp16 single file (as SD releases are) and two LoRA files for it: every kohya target
    with the text encoder, and the UNet's attention only."""
    root = tmp_path_factory.mktemp("loras")
    save_pipeline(random_pipeline(TINY, seed=5), root / "model.safetensors")
    donor = adapt(random_pipeline(TINY))
    save_lora(root / "all.safetensors", donor.unet, donor.text_encoder)
    attention = adapted_with_random_up(random_pipeline(TINY).unet, "attention", rank=2, alpha=1, seed=20)
    save_lora(root / "attention.safetensors", attention)
    return root


@pytest.mark.parametrize("dtype", [None, torch.float32], ids=["file-fp16", "fp32"])
def test_loading_with_loras_equals_loading_then_applying_them(files, dtype):
    loras = [(files / "all.safetensors", 0.5), (files / "attention.safetensors", 1.0)]
    loaded = load_pipeline(files / "model.safetensors", dtype=dtype, loras=loras)
    expected = load_pipeline(files / "model.safetensors", dtype=dtype)
    plain = {part: getattr(expected, part).state_dict() for part in ("unet", "text_encoder")}
    plain = {part: {key: tensor.clone() for key, tensor in state.items()} for part, state in plain.items()}
    for path, scale in loras:
        apply_lora_file(expected, path, scale)
    assert_same_weights(loaded, expected)
    assert loaded.unet.get_submodule("input_blocks.0.0").weight.dtype == (dtype or torch.float16)
    for part in ("unet", "text_encoder"):  # the LoRAs changed both models
        state = getattr(loaded, part).state_dict()
        assert any(not torch.equal(state[key], tensor) for key, tensor in plain[part].items()), part


def test_loading_with_loras_onto_a_device_gives_the_same_weights(files):
    loras = [(files / "all.safetensors", 0.8)]
    on_cpu = load_pipeline(files / "model.safetensors", device="cpu", loras=loras)
    assert_same_weights(on_cpu, load_pipeline(files / "model.safetensors", loras=loras))


@pytest.mark.parametrize("case", ["missing", "not-a-lora", "broken"])
def test_a_lora_that_cannot_be_used_is_one_line_naming_it(files, tmp_path, case):
    path = tmp_path / f"{case}.safetensors"
    if case == "not-a-lora":
        safetensors.torch.save_file({"model.diffusion_model.conv_in.weight": torch.zeros(2, 2)}, path)
    elif case == "broken":
        tensors = safetensors.torch.load_file(files / "attention.safetensors")
        tensors.pop(next(key for key in tensors if key.endswith(".lora_up.weight")))
        safetensors.torch.save_file(tensors, path)
    with pytest.raises(WeightsError) as error:
        load_pipeline(files / "model.safetensors", loras=[(files / "all.safetensors", 1.0), (path, 1.0)])
    assert_one_clear_line(error, path, {"missing": "no such LoRA file", "not-a-lora": "no LoRA tensors",
                                        "broken": "has no up"}[case])
