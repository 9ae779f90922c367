"""LoRAs and whole pipelines: saving an adapted pipeline writes only the base weights, and
load_pipeline(loras=...) merges LoRA files in as apply_lora_file does."""

import pytest
import torch
from test_lora import adapted_with_random_up
from test_lora_files import adapt

from minidream.config import TINY
from minidream.io.lora_files import save_lora
from minidream.io.single_file import single_file_tensors
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
