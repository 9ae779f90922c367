"""LoRA at the full SD 1.5 shapes (random weights, fp32): minidream's adapted UNet and text
encoder equal diffusers' UNet2DConditionModel and transformers' CLIPTextModel with the same
adapters loaded by diffusers from minidream's kohya file and from its diffusers file; and the
size and keys of the file kohya's default settings give at rank 4.

Lean: minidream's models share the references' weight storage (one copy of SD 1.5's UNet and
text encoder, about 4 GB), one forward each at a 8x8 latent. Tolerance: 1e-5 relative (max |diff| / max |reference|).
"""

import pytest
import torch
from diffusers import StableDiffusionPipeline
from lora_helpers import remove_lora
from reference_models import relative_error, unet_inputs
from test_lora import adapted_with_random_up
from test_sampling_parity import sharing_weights
from test_weights_sd15 import seeded_text_encoder

from bench.models import unet_twins
from minidream.config import SD15
from minidream.io.lora_files import read_lora_file, save_lora
from minidream.io.single_file import with_text_model_prefix
from minidream.models import lora
from minidream.models.clip import CLIPTextModel
from minidream.models.tokenizer import CLIPTokenizer

pytestmark = pytest.mark.sd_shapes  # full SD 1.5 shapes: `-m "not sd_shapes"` leaves them out of a quick run

TOL = 1e-5


@pytest.fixture(scope="module")
def models():
    """(diffusers UNet, minidream UNet, transformers CLIP, minidream CLIP), weights shared pairwise."""
    unet, reference_unet = unet_twins(SD15.unet, seed=0)
    reference_text_encoder = seeded_text_encoder(2)
    text_encoder = sharing_weights(CLIPTextModel, SD15.text_encoder,
                                   with_text_model_prefix(reference_text_encoder.state_dict()))
    return reference_unet, unet, reference_text_encoder, text_encoder


@torch.no_grad()
def test_sd15_adapters_equal_diffusers_loading_minidreams_files(models, tmp_path):
    reference_unet, unet, reference_text_encoder, text_encoder = models
    x, t, context = unet_inputs(SD15.unet, [500.0], 8, 8, seed=1)
    ids = CLIPTokenizer()(["a photo of sks dog"])
    base_eps, base_hidden = unet(x, t, context), text_encoder(ids)
    adapted_with_random_up(unet, "all", rank=4, alpha=8, seed=2)  # LoCon: every target kind
    adapted_with_random_up(text_encoder, "all", rank=4, alpha=4, seed=3)
    eps, hidden = unet(x, t, context), text_encoder(ids)
    assert relative_error(base_eps, eps) > 1e-3 and relative_error(base_hidden, hidden) > 1e-3
    for format in ("kohya", "diffusers"):
        path = tmp_path / f"{format}.safetensors"
        save_lora(path, unet, text_encoder, format=format, dtype=torch.float32)
        state_dict, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
        StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, reference_unet, adapter_name=format)
        StableDiffusionPipeline.load_lora_into_text_encoder(state_dict, alphas, reference_text_encoder,
                                                            adapter_name=format)
        assert relative_error(eps, reference_unet(x, t, context).sample) <= TOL, format
        assert relative_error(hidden, reference_text_encoder(ids).last_hidden_state) <= TOL, format
        reference_unet.delete_adapters(format)
        reference_text_encoder.delete_adapter(format)
    remove_lora(unet)
    remove_lora(text_encoder)


def test_sd15_rank4_kohya_file_size_and_keys(models, tmp_path):
    """kohya's defaults (UNet `transformer` targets, text encoder attention + MLP), rank 4, fp16."""
    _, unet, _, text_encoder = models
    names = lora.add_lora(unet, "transformer", rank=4) + lora.add_lora(text_encoder, "all", rank=4)
    path = tmp_path / "lora.safetensors"
    save_lora(path, unet, text_encoder)
    groups = ((unet, names[:192]), (text_encoder, names[192:]))
    shapes = [model.get_submodule(name).weight.shape for model, group in groups for name in group]
    remove_lora(unet)
    remove_lora(text_encoder)
    read = read_lora_file(path, SD15)
    assert (len(names), len(read.unet), len(read.text_encoder)) == (264, 192, 72)
    # rank x (in [x kh x kw]) down + out x rank up per layer, fp16, and one fp32 alpha
    data = sum(2 * 4 * (shape[1:].numel() + shape[0]) + 4 for shape in shapes)
    size = path.stat().st_size
    print(f"SD 1.5 rank-4 kohya LoRA: {3 * len(names)} keys, {data:,} tensor bytes, file {size:,} bytes "
          f"({size / 2**20:.2f} MiB)")
    assert data < size < data + 200_000  # the rest is the JSON header
