"""The evaluation models equal their references given the same random weights, and load strictly.

CLIP: transformers' CLIPModel.get_image_features / get_text_features (projected, then
normalised as the scores use them); DINO: ViTModel's last_hidden_state[:, 0]; open_clip's
encode_image / encode_text through the open_clip key map. transformers runs its eager attention
(an independent implementation; minidream uses SDPA). Tolerance: fp32, max |ours - ref| <=
1e-5 x max |ref|; measured max relative errors 1.7e-7 to 6.5e-7 (tiny, ViT-B/32, ViT-L/14,
ViT-S/16), and at most 8.2e-8 between the unit-normalised features.
"""

import json

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from eval_references import (
    PHOTOS,
    TINY_CLIP,
    TINY_DINO,
    max_relative_error,
    open_clip_model_module,
    randomise,
    reference_clip,
    reference_vit,
)
from PIL import Image

from minidream.config import (
    CLIP_PREPROCESS,
    CLIP_VIT_B32,
    CLIP_VIT_L14,
    DINO_PREPROCESS,
    DINO_VIT_S16,
)
from minidream.io.eval_models import clip_from_open_clip, load_clip, load_dino
from minidream.io.tensor_files import WeightsError
from minidream.models.preprocess import preprocess
from minidream.models.tokenizer import CLIPTokenizer
from minidream.models.vision import CLIPModel

REL_TOL = 1e-5
PROMPTS = ["a sks dog in the jungle", "a cube shaped backpack", ""]


def photos(count: int) -> list[Image.Image]:
    return [Image.open(path).convert("RGB") for path in sorted(PHOTOS.glob("*/*.jpg"))[:count]]


def check_clip(ours: CLIPModel, reference, pixels: torch.Tensor, ids: torch.Tensor) -> None:
    with torch.no_grad():
        image, image_ref = ours.image_features(pixels), reference.get_image_features(pixel_values=pixels).pooler_output
        text, text_ref = ours.text_features(ids), reference.get_text_features(input_ids=ids).pooler_output
    assert image.shape == image_ref.shape and text.shape == text_ref.shape
    assert max_relative_error(image, image_ref) <= REL_TOL
    assert max_relative_error(text, text_ref) <= REL_TOL
    # As the scores use them: unit vectors, compared entry by entry.
    assert (F.normalize(image, dim=-1) - F.normalize(image_ref, dim=-1)).abs().max() <= 1e-6
    assert (F.normalize(text, dim=-1) - F.normalize(text_ref, dim=-1)).abs().max() <= 1e-6


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    """Tiny random CLIPModel and ViTModel folders as transformers' save_pretrained writes them."""
    root = tmp_path_factory.mktemp("eval-models")
    clip, dino = reference_clip(TINY_CLIP, seed=1), reference_vit(TINY_DINO, seed=2)
    clip.save_pretrained(root / "clip")
    dino.save_pretrained(root / "dino")
    return root, clip, dino


def test_tiny_clip_from_folder_equals_transformers(tiny_folders):
    root, reference, _ = tiny_folders
    ours = load_clip(root / "clip")
    assert ours.config == TINY_CLIP  # read back from config.json
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    check_clip(ours, reference, pixels, CLIPTokenizer()(PROMPTS))


def test_tiny_dino_from_folder_equals_transformers_cls(tiny_folders):
    root, _, reference = tiny_folders
    ours = load_dino(root / "dino")  # the file also holds transformers' pooler, which DINO does not use
    assert ours.config == TINY_DINO
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cls, cls_ref = ours.cls_embedding(pixels), reference(pixel_values=pixels).last_hidden_state[:, 0]
    assert max_relative_error(cls, cls_ref) <= REL_TOL


def test_pytorch_model_bin_folder_loads_the_same(tmp_path, tiny_folders):
    """As older Hub releases store it: the same names, pickled (read with weights_only=True)."""
    root, reference, _ = tiny_folders
    torch.save(safetensors.torch.load_file(root / "clip" / "model.safetensors"), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((root / "clip" / "config.json").read_text())
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    check_clip(load_clip(tmp_path), reference, pixels, CLIPTokenizer()(PROMPTS[:1]))


def test_old_config_with_text_config_dict_is_read_as_transformers_does(tmp_path, tiny_folders):
    """Files of the transformers 4.16 era (openai/clip-vit-*) keep the real values in *_config_dict."""
    root, _, _ = tiny_folders
    raw = json.loads((root / "clip" / "config.json").read_text())
    raw["text_config_dict"], raw["text_config"] = raw["text_config"], {"hidden_size": 512, "num_hidden_layers": 12}
    raw["text_config_dict"]["eos_token_id"] = 2
    (tmp_path / "config.json").write_text(json.dumps(raw))
    (tmp_path / "model.safetensors").symlink_to(root / "clip" / "model.safetensors")
    assert load_clip(tmp_path).config == TINY_CLIP


def test_open_clip_key_map_equals_open_clip(tmp_path):
    """A random open_clip CLIP saved as safetensors, through the key map, equals open_clip itself."""
    oc = open_clip_model_module()
    vision = oc.CLIPVisionCfg(layers=2, width=128, head_width=64, mlp_ratio=2, image_size=32, patch_size=8)
    text = oc.CLIPTextCfg(context_length=77, vocab_size=49408, width=128, heads=2, layers=2, mlp_ratio=2)
    torch.manual_seed(0)
    reference = randomise(oc.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text, quick_gelu=True), seed=4)
    state = {key: value.contiguous() for key, value in reference.state_dict().items()}
    assert any(".attn.in_proj_weight" in key for key in state) and "visual.proj" in state
    safetensors.torch.save_file(state, tmp_path / "open_clip_model.safetensors")
    ours = load_clip(tmp_path / "open_clip_model.safetensors")
    assert (ours.config.vision.heads, ours.config.text.heads, ours.config.projection_dim) == (2, 2, 16)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    ids = CLIPTokenizer()(PROMPTS)
    with torch.no_grad():
        assert max_relative_error(ours.image_features(pixels), reference.encode_image(pixels)) <= REL_TOL
        assert max_relative_error(ours.text_features(ids), reference.encode_text(ids)) <= REL_TOL


def test_open_clip_map_names_every_tensor_of_a_block():
    tensors = {
        "transformer.resblocks.3.attn.in_proj_weight": torch.arange(6.0).reshape(6, 1),
        "transformer.resblocks.3.attn.in_proj_bias": torch.arange(6.0),
        "transformer.resblocks.3.mlp.c_fc.weight": torch.zeros(1),
        "visual.transformer.resblocks.0.ln_2.bias": torch.zeros(1),
        "visual.proj": torch.zeros(4, 2),
        "attn_mask": torch.zeros(1),
        "visual.unknown": torch.zeros(1),
    }
    mapped = clip_from_open_clip(tensors)
    assert sorted(mapped) == sorted([
        "text_model.encoder.layers.3.self_attn.q_proj.weight", "text_model.encoder.layers.3.self_attn.k_proj.weight",
        "text_model.encoder.layers.3.self_attn.v_proj.weight", "text_model.encoder.layers.3.self_attn.q_proj.bias",
        "text_model.encoder.layers.3.self_attn.k_proj.bias", "text_model.encoder.layers.3.self_attn.v_proj.bias",
        "text_model.encoder.layers.3.mlp.fc1.weight", "vision_model.encoder.layers.0.layer_norm2.bias",
        "visual_projection.weight", "visual.unknown",
    ])  # fmt: skip
    assert mapped["text_model.encoder.layers.3.self_attn.k_proj.bias"].tolist() == [2.0, 3.0]
    assert mapped["visual_projection.weight"].shape == (2, 4)


@pytest.mark.sd_shapes
@pytest.mark.parametrize("name, cfg, batch", [("ViT-B/32", CLIP_VIT_B32, 2), ("ViT-L/14", CLIP_VIT_L14, 1)])
def test_full_size_clip_equals_transformers(name, cfg, batch):
    """The real shapes (random weights), on real photos as CLIP's processor prepares them."""
    reference = reference_clip(cfg, seed=7)
    with torch.device("meta"):
        ours = CLIPModel(cfg)
    state = {key: value for key, value in reference.state_dict().items() if key != "logit_scale"}
    ours.load_state_dict(state, strict=True, assign=True)  # shares the reference's tensors: no second copy
    check_clip(ours.eval(), reference, preprocess(photos(batch), CLIP_PREPROCESS), CLIPTokenizer()(PROMPTS[:batch]))


@pytest.mark.sd_shapes
def test_full_size_dino_vits16_equals_transformers(tmp_path):
    reference = reference_vit(DINO_VIT_S16, seed=8)
    reference.save_pretrained(tmp_path)
    ours = load_dino(tmp_path)
    assert ours.config == DINO_VIT_S16
    pixels = preprocess(photos(2), DINO_PREPROCESS)
    with torch.no_grad():
        cls, cls_ref = ours.cls_embedding(pixels), reference(pixel_values=pixels).last_hidden_state[:, 0]
    assert cls.shape == (2, 384)
    assert max_relative_error(cls, cls_ref) <= REL_TOL


# --- Bad files: one line naming the file and what is wrong ---------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(WeightsError, match=f"{tmp_path / 'nope'}: no such file or folder"):
        load_clip(tmp_path / "nope")


def test_folder_without_config(tmp_path):
    with pytest.raises(WeightsError, match="not a transformers model folder \\(no config.json\\)"):
        load_dino(tmp_path)


def test_wrong_model_type_is_named(tiny_folders):
    root, _, _ = tiny_folders
    with pytest.raises(WeightsError, match="model_type is 'vit', but a CLIP model"):
        load_clip(root / "dino")
    with pytest.raises(WeightsError, match="model_type is 'clip', but a DINO ViT"):
        load_dino(root / "clip")


def test_mismatched_shapes_name_the_weights_file(tmp_path, tiny_folders):
    root, _, _ = tiny_folders
    raw = json.loads((root / "dino" / "config.json").read_text())
    raw["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(raw))
    (tmp_path / "model.safetensors").symlink_to(root / "dino" / "model.safetensors")
    with pytest.raises(WeightsError) as error:
        load_dino(tmp_path)
    message = str(error.value)
    assert "\n" not in message and str(tmp_path / "model.safetensors") in message
    assert "mis-shaped" in message and "encoder.layer.0.intermediate.dense.weight [64, 32], expected [96, 32]" in message


def test_missing_tensor_is_named(tmp_path, tiny_folders):
    root, _, _ = tiny_folders
    state = safetensors.torch.load_file(root / "clip" / "model.safetensors")
    del state["visual_projection.weight"]
    safetensors.torch.save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((root / "clip" / "config.json").read_text())
    with pytest.raises(WeightsError, match="1 missing \\(visual_projection.weight\\)"):
        load_clip(tmp_path)


def test_folder_without_weights(tmp_path, tiny_folders):
    root, _, _ = tiny_folders
    (tmp_path / "config.json").write_text((root / "clip" / "config.json").read_text())
    with pytest.raises(WeightsError, match="no weights file; expected one of model.safetensors, pytorch_model.bin"):
        load_clip(tmp_path)


def test_safetensors_that_is_not_open_clip(tmp_path, tiny_folders):
    root, _, _ = tiny_folders
    with pytest.raises(WeightsError, match="not an open_clip ViT CLIP file \\(no visual.conv1.weight"):
        load_clip(root / "clip" / "model.safetensors")


def test_a_single_clip_file_must_be_open_clip_safetensors(tmp_path):
    (tmp_path / "open_clip_pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(WeightsError, match="must be an open_clip .safetensors file"):
        load_clip(tmp_path / "open_clip_pytorch_model.bin")
