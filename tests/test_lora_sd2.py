"""LoRA on SD 2.x, text encoder included, against diffusers + PEFT on a tiny SD 2-style pipeline.

minidream's text encoder is OpenCLIP's tower (q, k, v fused in in_proj_weight, SD 2.x single
files' layout); diffusers' is transformers' 23-layer CLIPTextModel with separate q/k/v_proj, the
layout kohya and diffusers train SD 2 LoRAs on. A kohya-format and a diffusers-format file give
the same text states and UNet outputs in both, both ways (minidream writes, diffusers reads;
PEFT writes, minidream reads). Tolerance: max |minidream - diffusers| <= 1e-6 * max |diffusers|
(fp32) for the text states, 1e-5 for the UNet's v predictions (test_lora_files' bound).
"""

import dataclasses
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from lora_helpers import load_adapters
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from reference_models import relative_error, seeded_diffusers_model, unet_inputs
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_lora_files import TEXT_PEFT_TARGETS, UNET_PEFT_TARGETS
from test_open_clip_text import build_ours, build_reference, random_open_clip_state
from train_runs import train_args
from transformers import CLIPTokenizer as TransformersCLIPTokenizer

import train
from minidream.config import TINY_SD2
from minidream.io import open_clip_layout
from minidream.io.diffusers_layout import (
    unet_config_to_diffusers,
    unet_from_diffusers,
    vae_config_to_diffusers,
)
from minidream.io.lora_files import (
    apply_lora_file,
    lora_merged,
    read_lora_file,
    save_lora,
)
from minidream.models import lora
from minidream.models.clip import CLIPTextModel
from minidream.models.pipeline import Pipeline, random_pipeline
from minidream.models.tokenizer import CLIPTokenizer
from minidream.models.unet import UNet

TOL = 1e-6
CFG = TINY_SD2
PROMPTS = ["a photo of sks dog", "a castle on a hill"]
PARTS = ("unet", "text encoder")
UNET_TOL = 1e-5  # test_lora_files' tolerance: merged UNet weights are rounded once more than PEFT's live layers


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    CLIPTokenizer(pad_token_id=0).save_folder(folder)
    return folder


@pytest.fixture
def pair(tokenizer_folder):
    """(diffusers' StableDiffusionPipeline with transformers' 23-layer text encoder, minidream's
    Pipeline with OpenCLIP's 24-resblock tower) holding the same random weights."""
    reference_unet = seeded_diffusers_model(UNet2DConditionModel, unet_config_to_diffusers(CFG.unet), 0)
    unet = UNet(CFG.unet)
    unet.load_state_dict(unet_from_diffusers(reference_unet.state_dict(), CFG.unet))
    state = random_open_clip_state(CFG.text_encoder, seed=1)
    reference = StableDiffusionPipeline(
        unet=reference_unet,
        vae=seeded_diffusers_model(DiffusersAutoencoderKL, vae_config_to_diffusers(CFG.vae), 2),
        text_encoder=build_reference(CFG.text_encoder, open_clip_layout.to_transformers(state, CFG.text_encoder.layers)),
        tokenizer=TransformersCLIPTokenizer.from_pretrained(tokenizer_folder),
        scheduler=DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    ours = dataclasses.replace(random_pipeline(CFG), unet=unet.eval(), text_encoder=build_ours(CFG.text_encoder, state))
    return reference, ours


UNET_INPUTS = unet_inputs(CFG.unet, [15.0, 640.0], height=16, width=16, seed=0)
IDS = CLIPTokenizer(pad_token_id=0)(PROMPTS)  # SD 2's padding


@torch.no_grad()
def outputs(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """(UNet v prediction, text states) of either pipeline on fixed inputs."""
    if isinstance(pipe, Pipeline):
        return pipe.unet(*UNET_INPUTS), pipe.text_encoder(IDS)
    return pipe.unet(*UNET_INPUTS).sample, pipe.text_encoder(IDS).last_hidden_state


def assert_close(actual, expected, base=None):
    errors = {part: relative_error(ours, theirs) for part, ours, theirs in zip(PARTS, actual, expected)}
    assert errors["text encoder"] <= TOL and errors["unet"] <= UNET_TOL, errors
    if base is not None:  # the adapters must matter, or the comparison proves nothing
        changes = {part: relative_error(before, after) for part, before, after in zip(PARTS, base, expected)}
        assert min(changes.values()) > 1e-3, changes


def with_random_adapters(pipe: Pipeline, seed: int) -> Pipeline:
    """UNet: every kohya target, rank 4 alpha 2; text encoder (q/k/v slices, out_proj, MLP) rank 2
    alpha 3; the zero-initialised ups made random so that every adapter changes the output."""
    lora.add_lora(pipe.unet, "all", rank=4, alpha=2, generator=seed)
    lora.add_lora(pipe.text_encoder, "all", rank=2, alpha=3, generator=seed + 1)
    generator = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for model in (pipe.unet, pipe.text_encoder):
            for layer in lora.adapter_branches(model).values():
                layer.lora_up.weight.copy_(0.3 * torch.randn(layer.lora_up.weight.shape, generator=generator))
    return pipe


def assert_opens_as_in_diffusers(path: Path, pair):
    """The file through diffusers' load_lora_weights, and through minidream as live adapters and
    merged into the weights (as UIs apply it), gives the same outputs."""
    reference, ours = pair
    base = outputs(ours)
    reference.load_lora_weights(str(path))
    expected = outputs(reference)
    read = read_lora_file(path, CFG)
    assert len(read.text_encoder) == 6 * (CFG.text_encoder.layers - 1)  # q, k, v, out, fc1, fc2 of 23 layers
    merged = dataclasses.replace(ours, unet=UNet(CFG.unet), text_encoder=build_ours(CFG.text_encoder, ours.text_encoder.state_dict()))
    merged.unet.load_state_dict(ours.unet.state_dict())
    load_adapters(ours.unet, read.unet)
    load_adapters(ours.text_encoder, read.text_encoder)
    assert_close(outputs(ours), expected, base)
    apply_lora_file(merged, path)
    assert_close(outputs(merged), expected)


# ---- minidream writes, diffusers reads ------------------------------------------------------------


@pytest.mark.parametrize("format", ["kohya", "diffusers"])
def test_minidreams_file_loads_in_diffusers_as_minidreams_adapted_models(pair, tmp_path, format):
    reference, ours = pair
    base = outputs(ours)
    with_random_adapters(ours, seed=10)
    path = tmp_path / "lora.safetensors"
    save_lora(path, ours.unet, ours.text_encoder, format=format, dtype=torch.float32)
    keys = load_file(path).keys()
    q = {"kohya": "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
         "diffusers": "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"}[format]
    assert q in keys and not any("resblocks" in key or "layers_23" in key or "layers.23." in key for key in keys)
    reference.load_lora_weights(str(path))
    assert_close(outputs(ours), outputs(reference), base)


# ---- PEFT writes (diffusers layout, and renamed to kohya's), minidream reads -----------------------


def peft_adapters(reference: StableDiffusionPipeline) -> tuple[dict, dict, LoraConfig, LoraConfig]:
    """PEFT adapters, random lora_B too, on copies of the reference's UNet and text encoder."""
    torch.manual_seed(20)
    unet = UNet2DConditionModel.from_config(reference.unet.config)
    text_encoder = type(reference.text_encoder)(reference.text_encoder.config)
    unet_config = LoraConfig(r=4, lora_alpha=6, init_lora_weights=False, target_modules=UNET_PEFT_TARGETS)
    text_config = LoraConfig(r=2, lora_alpha=5, init_lora_weights=False, target_modules=TEXT_PEFT_TARGETS)
    unet.add_adapter(unet_config)
    text_encoder.add_adapter(text_config)
    return get_peft_model_state_dict(unet), get_peft_model_state_dict(text_encoder), unet_config, text_config


def test_peft_written_diffusers_file_opens_in_minidream_as_in_diffusers(pair, tmp_path):
    unet_layers, text_layers, unet_config, text_config = peft_adapters(pair[0])
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=unet_layers, text_encoder_lora_layers=text_layers,
        unet_lora_adapter_metadata=unet_config.to_dict(), text_encoder_lora_adapter_metadata=text_config.to_dict(),
    )
    assert_opens_as_in_diffusers(tmp_path / "pytorch_lora_weights.safetensors", pair)


def kohya_name(module: str, prefix: str) -> str:
    """kohya's rule: the transformers / diffusers module path, "." -> "_", under lora_te_ / lora_unet_."""
    return prefix + module.replace(".", "_")


def test_kohya_file_opens_in_minidream_as_in_diffusers(pair, tmp_path):
    """PEFT's adapters renamed as kohya's sd-scripts names SD 2 layers (`lora_te_text_model_encoder_
    layers_N_self_attn_q_proj`, from transformers' text encoder), with kohya's `.alpha`."""
    unet_layers, text_layers, unet_config, text_config = peft_adapters(pair[0])
    tensors = {}
    for layers, prefix, alpha in ((unet_layers, "lora_unet_", unet_config.lora_alpha),
                                  (text_layers, "lora_te_text_model_", text_config.lora_alpha)):
        for key, tensor in layers.items():
            # transformers 5 names the text modules without `text_model.`; kohya's names have it
            module, role = key.removeprefix("base_model.model.").removeprefix("text_model.").rsplit(".lora_", 1)
            name = kohya_name(module, prefix)
            tensors[f"{name}.lora_{'down' if role.startswith('A') else 'up'}.weight"] = tensor.contiguous()
            tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    assert "lora_te_text_model_encoder_layers_22_mlp_fc2.alpha" in tensors
    save_file(tensors, tmp_path / "kohya.safetensors")
    assert_opens_as_in_diffusers(tmp_path / "kohya.safetensors", pair)


# ---- the fused in_proj's adapters -----------------------------------------------------------------


def test_open_clip_adapters_are_those_of_the_transformers_layout():
    """Same seed, same draws: OpenCLIP's tower and minidream's 23-layer transformers-layout twin get
    the same adapters under the mapped names, and compute the same states with them."""
    cfg = CFG.text_encoder
    state = random_open_clip_state(cfg, seed=3)
    ours = build_ours(cfg, state)
    twin = CLIPTextModel(open_clip_layout.transformers_config(cfg)).eval()
    twin.load_state_dict(open_clip_layout.to_transformers(state, cfg.layers))
    names = lora.add_lora(ours, "all", rank=2, alpha=4, generator=5)
    twin_names = lora.add_lora(twin, "all", rank=2, alpha=4, generator=5)
    mapping = {ours_name: theirs for ours_name, (theirs, _) in open_clip_layout.lora_layers(cfg, lora.lora_resblocks(cfg)).items()}
    assert [mapping[name] for name in names] == twin_names
    theirs = lora.adapters_of(twin)
    for name, adapter in lora.adapters_of(ours).items():
        assert torch.equal(adapter.down, theirs[mapping[name]].down)
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for model in (ours, twin):  # the same random ups in the same order
            generator.manual_seed(6)
            for name in (names if model is ours else twin_names):
                up = lora.adapter_branches(model)[name].lora_up.weight
                up.copy_(torch.randn(up.shape, generator=generator))
        assert relative_error(ours(IDS), twin(IDS)) <= TOL


def test_merge_unmerge_and_adapters_off():
    pipe = with_random_adapters(random_pipeline(CFG, seed=4), seed=7)
    text_encoder = pipe.text_encoder.eval()
    weight = text_encoder.transformer.resblocks[0].attn.in_proj_weight
    before = weight.detach().clone()
    with torch.no_grad():
        live = text_encoder(IDS)
        with lora.adapters_off(text_encoder):
            base = text_encoder(IDS)
        lora.merge(text_encoder)
        assert not torch.equal(weight, before)
        merged = text_encoder(IDS)
        lora.unmerge(text_encoder)
        after = text_encoder(IDS)
    assert relative_error(live, base) > 1e-2
    assert relative_error(merged, live) <= 1e-5  # one rounding of the merged weights
    torch.testing.assert_close(weight, before, rtol=0, atol=1e-6)
    assert relative_error(after, live) <= 1e-5
    # the adapters of q, k and v change only their rows: each delta is its slice's alone
    attn = text_encoder.transformer.resblocks[0].attn
    lora.merge(text_encoder)
    width = CFG.text_encoder.width
    for i, (_, branch) in enumerate(attn.slices()):
        rows = slice(i * width, (i + 1) * width)
        torch.testing.assert_close(weight[rows] - before[rows], branch.delta(), rtol=0, atol=1e-6)


def test_lora_merged_applies_a_file_to_the_fused_weights_and_restores_them_bit_for_bit(tmp_path):
    """What train.py renders its validation grids with: the exported file merged as UIs merge it."""
    donor = with_random_adapters(random_pipeline(CFG, seed=4), seed=7)
    path = tmp_path / "lora.safetensors"
    save_lora(path, donor.unet, donor.text_encoder, dtype=torch.float32)
    pipe = random_pipeline(CFG, seed=4)
    before = {key: tensor.clone() for key, tensor in pipe.text_encoder.state_dict().items()}
    with torch.no_grad():
        with lora_merged(pipe, read_lora_file(path, CFG)):
            merged = pipe.text_encoder(IDS)
        live = donor.text_encoder.eval()(IDS)
    assert relative_error(merged, live) <= 1e-5  # the merged weights are rounded once
    assert all(torch.equal(before[key], tensor) for key, tensor in pipe.text_encoder.state_dict().items())


def test_checkpoint_state_round_trips_and_refuses_other_targets():
    donor = with_random_adapters(random_pipeline(CFG, seed=4), seed=7).text_encoder
    state = lora.lora_state_dict(donor)
    assert "transformer.resblocks.0.attn.in_proj_q.lora_down.weight" in state
    assert "transformer.resblocks.0.attn.in_proj_weight" not in state
    fresh = random_pipeline(CFG, seed=4).text_encoder
    lora.add_lora(fresh, "all", rank=2, alpha=3)
    lora.load_lora_state_dict(fresh, state)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(IDS), donor.eval()(IDS))
    other = random_pipeline(CFG, seed=4).text_encoder
    lora.add_lora(other, "attention", rank=2, alpha=3)
    with pytest.raises(lora.AdapterMismatch, match="unexpected"):
        lora.load_lora_state_dict(other, state)


# ---- train.py -------------------------------------------------------------------------------------


def test_two_step_lora_train_of_tiny_sd2_with_text_encoder_adapters_resumes_bit_identically(tmp_path, training_data, one_thread):
    common = ("model.architecture=tiny-sd2", "train.prediction_type=v_prediction", "lora.rank=2",
              "lora.text_encoder_rank=2", "train.lr=1e-3", "train.batch_size=1", "checkpoint.every_n_steps=1",
              "train.ema_decay=0.9")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train.main(train_args(straight, training_data, (*common, "train.max_steps=2"))) == 0
    assert train.main(train_args(resumed, training_data, (*common, "train.max_steps=1"))) == 0
    assert train.main(train_args(resumed, training_data, (*common, "train.max_steps=2", "run.resume=latest"))) == 0
    first, second = load_file(straight / "lora.safetensors"), load_file(resumed / "lora.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    up = first["lora_te_text_model_encoder_layers_0_self_attn_k_proj.lora_up.weight"]
    assert up.abs().max() > 0  # trained: the ups start at zero
    with safe_open(straight / "lora.safetensors", "pt") as f:
        assert f.metadata()["ss_v2"] == "True"
    assert len([k for k in first if k.startswith("lora_te_")]) == 3 * 6 * (CFG.text_encoder.layers - 1)
