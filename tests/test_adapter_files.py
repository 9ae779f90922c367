"""LyCORIS (LoHa, LoKr, LoCon), DoRA and full-diff files: minidream merges each as ComfyUI does
(tests/lycoris_reference.py transcribes ComfyUI's code), at strength 1 and 0.6, on the UNet and
text encoder(s) of SD 1.x, SD 2.x and SDXL layouts, and at SD 1.5's full layer shapes; files the
LyCORIS library (`lycoris-lora`) itself writes merge as the library merges them where it agrees
with the UIs, and where it does not the tests pin the difference; broken files are refused in one line.

Tolerance: max |minidream - reference| <= 1e-5 * max |reference| per merged weight (fp32);
untouched weights stay bit-identical.
"""

import copy
import dataclasses

import pytest
import safetensors.torch
import torch
from lycoris.modules.full import FullModule
from lycoris.modules.locon import LoConModule
from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule
from lycoris_reference import KINDS, TUCKER, adapter_tensors, comfy_merge
from pipeline_checks import assert_one_clear_line
from reference_models import relative_error

from minidream.config import SD15, TINY, TINY_SD2, TINY_SDXL
from minidream.io import convert
from minidream.io.lora_files import apply_lora_file, convert_lora_file, read_lora_file
from minidream.io.lora_names import kohya_module, kohya_prefixes, model_layers
from minidream.io.tensor_files import WeightsError
from minidream.io.weights import load_pipeline, save_pipeline
from minidream.models.adapters import changed_weight
from minidream.models.lora import layer_bias, layer_weight
from minidream.models.pipeline import random_pipeline

REL = 1e-5
STRENGTHS = (1.0, 0.6)
# Per part, the layers a test file adapts: attention (no bias), cross-attention (non-square), 3x3 and
# 1x1 convs, a ResBlock shortcut, the text encoder's attention and MLP.
UNET_LAYERS = ("attn1.to_q", "attn2.to_k", "in_layers.2", "proj_in", "skip_connection", "op")
TEXT_LAYERS = ("q_proj", "fc1", "in_proj_q", "in_proj_v", "mlp.c_fc")


def chosen_layers(cfg, kind):
    """(part, minidream name, kohya key stem) of the layers a file of `kind` adapts."""
    chosen = []
    for part, layers in model_layers(cfg).items():
        wanted = UNET_LAYERS if part == "unet" else TEXT_LAYERS
        for layer in layers:
            if not layer.minidream.endswith(wanted) or (kind in TUCKER and layer.shape[2:] != (3, 3)):
                continue
            if kind == "diff" and layer.minidream.endswith(("to_q", "to_k")):
                continue  # no bias for diff_b
            chosen.append((part, layer.minidream, kohya_prefixes(cfg)[part] + kohya_module(part, layer, cfg).replace(
                ".", "_")))
    return chosen


def write_file(path, pipe, cfg, kind, alpha, seed=0):
    """A file of `kind` on the chosen layers, random; returns {(part, name): its tensors}."""
    gen = torch.Generator().manual_seed(seed)
    per_layer, tensors = {}, {}
    for part, name, stem in chosen_layers(cfg, kind):
        rank = 2 if kind in TUCKER else 3
        t = adapter_tensors(kind, layer_weight(getattr(pipe, part), name).detach(), rank, alpha, gen)
        per_layer[part, name] = t
        tensors |= {f"{stem}.{key}": value for key, value in t.items()}
    safetensors.torch.save_file(tensors, path)
    return per_layer


def assert_merged_as_comfy(before, after, per_layer, strength):
    touched = set()
    for (part, name), t in per_layer.items():
        original, merged = (getattr(p, part) for p in (before, after))
        expected = comfy_merge(layer_weight(original, name).detach(), t, strength)
        assert relative_error(layer_weight(merged, name).detach(), expected) <= REL, (part, name)
        touched.add((part, name))
        if "diff_b" in t:
            bias = layer_bias(original, name).detach()
            assert relative_error(layer_bias(merged, name).detach(), bias + strength * t["diff_b"]) <= REL
    for part in per_layer and {p for p, _ in per_layer}:
        for (key, old), new in zip(getattr(before, part).state_dict().items(), getattr(after, part).state_dict().values()):
            if not any(key.startswith(f"{name}.") or key.startswith(name.rpartition(".")[0] + ".in_proj")
                       for p, name in touched if p == part):
                assert torch.equal(old, new), key


def trained_looking(cfg):
    """A random pipeline with no zero-initialised layer left (a trained model has none): a DoRA
    magnitude or a relative error against an all-zero weight would test nothing."""
    pipe = random_pipeline(cfg)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for model in (pipe.unet, *pipe.text_encoders):
            for param in model.parameters():
                param.add_(0.02 * torch.randn(param.shape, generator=gen))
    return pipe


@pytest.fixture(scope="module")
def tiny_pipes():
    return {"sd1": (TINY, trained_looking(TINY)), "sd2": (TINY_SD2, trained_looking(TINY_SD2)),
            "sdxl": (TINY_SDXL, trained_looking(TINY_SDXL))}


def models_copy(pipe):
    """`pipe` with its own copy of the models a file changes (the VAE and tokenizers shared)."""
    return dataclasses.replace(pipe, unet=copy.deepcopy(pipe.unet), text_encoder=copy.deepcopy(pipe.text_encoder),
                               text_encoder_2=copy.deepcopy(pipe.text_encoder_2))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_each_kind_merges_as_comfyui_does(tmp_path, tiny_pipes, family, kind):
    cfg, base = tiny_pipes[family]
    path = tmp_path / f"{kind}.safetensors"
    per_layer = write_file(path, base, cfg, kind, alpha=1.5)
    parts = {"unet"} if kind in TUCKER else set(model_layers(cfg))  # Tucker cores: 3x3 convs only
    assert {part for part, _ in per_layer} == parts  # the UNet and every text encoder
    for strength in STRENGTHS:
        merged = models_copy(base)
        apply_lora_file(merged, path, strength)
        assert_merged_as_comfy(base, merged, per_layer, strength)


@pytest.mark.parametrize("kind", ["loha", "lokr_both", "dora_out"])
def test_no_alpha_means_scale_one(tmp_path, tiny_pipes, kind):
    cfg, base = tiny_pipes["sd1"]
    path = tmp_path / "no-alpha.safetensors"
    per_layer = write_file(path, base, cfg, kind, alpha=None)
    merged = models_copy(base)
    apply_lora_file(merged, path, 0.6)
    assert_merged_as_comfy(base, merged, per_layer, 0.6)


def test_load_pipeline_and_convert_lora_merge_a_lycoris_file(tmp_path, tiny_pipes):
    """The reader paths sample.py --lora and convert --lora use take LyCORIS files as apply_lora_file does."""
    cfg, base = tiny_pipes["sd1"]
    base_file, lokr = tmp_path / "base.safetensors", tmp_path / "lokr.safetensors"
    save_pipeline(base, base_file, dtype=torch.float32)
    per_layer = write_file(lokr, base, cfg, "dora_lokr", alpha=2.0)
    loaded = load_pipeline(base_file, dtype=torch.float32, loras=[(lokr, 0.6)])
    assert_merged_as_comfy(base, loaded, per_layer, 0.6)
    assert convert.main([str(base_file), str(tmp_path / "merged.safetensors"), "--dtype", "fp32",
                         "--lora", f"{lokr}:0.6"]) == 0
    assert_merged_as_comfy(base, load_pipeline(tmp_path / "merged.safetensors"), per_layer, 0.6)


# ---- the LyCORIS library as the author of the files -------------------------------------------------

def lycoris_module(kind, base, alpha=2):
    """A LyCORIS module of `kind` on `base` (rank 2, alpha = rank by default), its weights random, as the
    library would hold them after training."""
    options = {
        "locon": (LoConModule, {}), "loha": (LohaModule, {}), "loha_tucker": (LohaModule, {"use_tucker": True}),
        "lokr": (LokrModule, {"factor": 4}), "lokr_both": (LokrModule, {"factor": 8, "decompose_both": True}),
        "lokr_tucker": (LokrModule, {"factor": 4, "use_tucker": True}), "full": (FullModule, {}),
        "dora_in": (LoConModule, {"weight_decompose": True, "wd_on_out": False}),
        "dora_out": (LoConModule, {"weight_decompose": True, "wd_on_out": True}),
    }
    cls, extra = options[kind]
    module = cls("layer", base, 1.0, **({} if cls is FullModule else {"lora_dim": 2, "alpha": alpha}), **extra)
    if cls is FullModule:  # holding the tuned weight, as after `apply_to`: the file's diff is it minus W0
        module.is_diff = False
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param_name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if param_name == "dora_scale":  # the base's norms, as initialised, moved ~10% by training
                param.mul_(1 + 0.1 * noise)
            elif param is not base.weight and param is not base.bias:
                param.copy_(0.2 * noise)
    return module


LIBRARY_KINDS = ("locon", "loha", "loha_tucker", "lokr", "lokr_both", "lokr_tucker", "full", "dora_in")
CONV_STEM = "lora_unet_down_blocks_1_resnets_0_conv2"  # input_blocks.3.0.out_layers.3, 64 x 64 x 3 x 3
LINEAR_STEM = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_2"  # 64 x 256


@pytest.mark.parametrize("kind", LIBRARY_KINDS)
def test_files_the_lycoris_library_writes_merge_as_the_library_merges_them(tmp_path, tiny_pipes, kind):
    cfg, base = tiny_pipes["sd1"]
    conv = kind in TUCKER or kind in ("locon", "full", "lokr_both")
    name = "input_blocks.3.0.out_layers.3" if conv else "input_blocks.3.1.transformer_blocks.0.ff.net.2"
    layer = copy.deepcopy(base.unet.get_submodule(name))
    module = lycoris_module(kind, layer)
    path = tmp_path / f"{kind}.safetensors"
    stem = CONV_STEM if conv else LINEAR_STEM
    state = module.custom_state_dict() if hasattr(module, "custom_state_dict") else module.state_dict()
    safetensors.torch.save_file({f"{stem}.{key}": value.detach().contiguous() for key, value in state.items()}, path)
    for strength in STRENGTHS if not kind.startswith("dora") else (1.0,):  # the library's DoRA strength differs
        merged = models_copy(base)
        apply_lora_file(merged, path, strength)
        with torch.no_grad():
            expected, expected_bias = module.get_merged_weight(multiplier=strength, shape=layer.weight.shape)
        assert relative_error(merged.unet.get_submodule(name).weight, expected) <= REL, strength
        if expected_bias is not None:
            assert relative_error(merged.unet.get_submodule(name).bias, expected_bias) <= REL


def read_change(path, stem, tensors, cfg=TINY):
    """One layer's change as minidream reads it from a file holding only `tensors` under `stem`."""
    safetensors.torch.save_file({f"{stem}.{key}": value.contiguous() for key, value in tensors.items()}, path)
    lora = read_lora_file(path, cfg)
    (change,) = [*lora.unet.values(), *lora.text_encoder.values()]
    return change


def test_where_the_lycoris_library_and_comfyui_disagree(tmp_path, tiny_pipes):
    """Pinned, so that the docs' statements stay true: ComfyUI's code cannot apply a Tucker LoKr on
    torch 2.13; the library applies alpha/rank twice to LoHa, divides a per-output DoRA by the merged rows' norm (ComfyUI: the base's), and at strength s
    scales DoRA's magnitude ratio, s·(m/‖V‖ − 1) + 1, rather than the change."""
    _, base = tiny_pipes["sd1"]
    layer = copy.deepcopy(base.unet.get_submodule("input_blocks.3.1.transformer_blocks.0.ff.net.2"))
    loha = lycoris_module("loha", layer, alpha=1)
    library = loha.get_merged_weight(multiplier=1.0)[0] - layer.weight
    tensors = {key: value.detach() for key, value in loha.custom_state_dict().items()}
    comfy = comfy_merge(layer.weight.detach(), tensors, 1.0) - layer.weight
    assert relative_error(library, 0.5 * comfy) <= REL  # (alpha/rank)^2 = 0.25 against alpha/rank = 0.5
    tucker_lokr = adapter_tensors("lokr_tucker", torch.randn(64, 64, 3, 3), 2, 2.0, torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="view size is not compatible"):  # ComfyUI logs it, leaves W as is
        comfy_merge(torch.randn(64, 64, 3, 3), tucker_lokr, 1.0, tucker_as_lycoris=False)
    for kind, strength in (("dora_out", 1.0), ("dora_in", 0.6)):
        module = lycoris_module(kind, layer)
        tensors = {key: value.detach() for key, value in module.custom_state_dict().items()}
        change = read_change(tmp_path / f"{kind}.safetensors", LINEAR_STEM, tensors)
        ours = changed_weight(layer.weight.detach(), change, strength)
        assert relative_error(ours, comfy_merge(layer.weight.detach(), tensors, strength)) <= REL
        assert relative_error(ours, module.get_merged_weight(multiplier=strength)[0].detach()) > 1e-3, kind


# Full SD 1.5 shapes, only the layers adapted: the largest 3x3 conv, cross-attention, a 1x1 conv, CLIP's q.
FULL_LAYERS = {
    "lora_unet_up_blocks_1_resnets_0_conv1": ("unet", "output_blocks.3.0.in_layers.2", (1280, 2560, 3, 3)),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (
        "unet", "input_blocks.1.1.transformer_blocks.0.attn2.to_k", (320, 768)),
    "lora_unet_down_blocks_0_attentions_0_proj_in": ("unet", "input_blocks.1.1.proj_in", (320, 320, 1, 1)),
    "lora_te_text_model_encoder_layers_11_self_attn_q_proj": (
        "text_encoder", "text_model.encoder.layers.11.self_attn.q_proj", (768, 768)),
}


@pytest.mark.sd_shapes
@pytest.mark.parametrize("kind", KINDS)
def test_full_sd15_shapes_merge_as_comfyui_does(tmp_path, kind):
    gen = torch.Generator().manual_seed(2)
    weights, tensors, file = {}, {}, {}
    for stem, (part, name, shape) in FULL_LAYERS.items():
        if kind in TUCKER and shape[2:] != (3, 3):
            continue
        weights[part, name] = torch.randn(shape, generator=gen) * 0.02
        tensors[part, name] = adapter_tensors(kind, weights[part, name], 4, 3.0, gen)
        file |= {f"{stem}.{key}": value for key, value in tensors[part, name].items()}
    safetensors.torch.save_file(file, tmp_path / "full.safetensors")
    read = read_lora_file(tmp_path / "full.safetensors", SD15).parts()
    for (part, name), weight in weights.items():
        for strength in STRENGTHS:
            expected = comfy_merge(weight, tensors[part, name], strength)
            assert relative_error(changed_weight(weight, read[part][name], strength), expected) <= REL, (name, strength)


# ---- refusals: one line naming the file and what is wrong -------------------------------------------

CONV1 = "lora_unet_down_blocks_0_resnets_0_conv1"  # 32 x 32 x 3 x 3, with a bias
TO_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # 32 x 32, no bias
LOHA = {"hada_w1_a": torch.zeros(32, 2), "hada_w1_b": torch.zeros(2, 288), "hada_w2_a": torch.zeros(32, 2),
        "hada_w2_b": torch.zeros(2, 288)}
BROKEN = {
    "loha-missing-factor": ({f"{CONV1}.{k}": v for k, v in LOHA.items() if k != "hada_w2_b"},
                            f"1 missing ({CONV1}.hada_w1_a has no hada_w2_b)"),
    "loha-half-tucker": ({**{f"{CONV1}.{k}": v for k, v in LOHA.items()}, f"{CONV1}.hada_t1": torch.zeros(2, 2, 3, 3)},
                         "has no hada_t1 and hada_t2"),
    "loha-other-model": ({f"{CONV1}.{k}": v[:, :96].clone() if k.endswith("_b") else v for k, v in LOHA.items()},
                         f"1 mis-shaped ({CONV1}.hada_w1_a [32, 2], {CONV1}.hada_w1_b [2, 96]"),
    "lokr-no-w2": ({f"{TO_Q}.lokr_w1": torch.zeros(4, 4), f"{TO_Q}.lokr_w2_a": torch.zeros(8, 2)},
                   f"{TO_Q}.lokr_w1 has no lokr_w2 or lokr_w2_a and lokr_w2_b"),
    "lokr-wrong-factors": ({f"{TO_Q}.lokr_w1": torch.zeros(4, 4), f"{TO_Q}.lokr_w2": torch.zeros(8, 4)},
                           f"{TO_Q}.lokr_w2 [8, 4]: not [32, 32]"),
    "diff-wrong-shape": ({f"{CONV1}.diff": torch.zeros(32, 32)}, f"{CONV1}.diff [32, 32]: not [32, 32, 3, 3]"),
    "dora-on-a-diff": ({f"{CONV1}.diff": torch.zeros(32, 32, 3, 3), f"{CONV1}.dora_scale": torch.ones(32, 1, 1, 1)},
                       "a full diff carries no DoRA magnitude"),
    "oft": ({f"{TO_Q}.oft_blocks": torch.zeros(4, 8, 8)}, "an OFT/BOFT (LyCORIS) file"),
    "glora": ({f"{TO_Q}.a1.weight": torch.zeros(4, 32)}, "a GLoRA (LyCORIS) file"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_or_unknown_adapter_files_are_refused_in_one_line(tmp_path, case):
    tensors, fragment = BROKEN[case]
    path = tmp_path / f"{case}.safetensors"
    safetensors.torch.save_file(tensors, path)
    with pytest.raises(WeightsError) as error:
        read_lora_file(path, TINY)
    assert_one_clear_line(error, path, fragment)


def test_a_bias_diff_for_a_layer_without_bias_and_a_layout_rewrite_are_refused(tmp_path, tiny_pipes):
    _, base = tiny_pipes["sd1"]
    path = tmp_path / "diff_b.safetensors"
    safetensors.torch.save_file({f"{TO_Q}.diff_b": torch.zeros(32)}, path)
    with pytest.raises(WeightsError) as error:
        apply_lora_file(models_copy(base), path)
    assert_one_clear_line(error, path, "input_blocks.1.1.transformer_blocks.0.attn1.to_q has no bias")
    loha = tmp_path / "loha.safetensors"
    safetensors.torch.save_file({f"{CONV1}.{k}": v for k, v in LOHA.items()}, loha)
    with pytest.raises(WeightsError) as error:
        convert_lora_file(loha, tmp_path / "out.safetensors", "diffusers", TINY)
    assert_one_clear_line(error, loha, "no kohya or diffusers LoRA layout")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("kind", ["dora_out", "dora_in"])
def test_a_one_dimensional_dora_scale_is_read_along_the_axis_its_length_names(tmp_path, kind):
    """ComfyUI broadcasts a 1-D dora_scale against out x 1 norms (its issue #12938); minidream reads
    it as the 2-D one of the same values."""
    weight = torch.randn(64, 32, 3, 3, generator=torch.Generator().manual_seed(4))
    tensors = adapter_tensors(kind, weight, 2, 2.0, torch.Generator().manual_seed(5))
    flat = {**tensors, "dora_scale": tensors["dora_scale"].flatten()}
    stem = "lora_unet_down_blocks_1_resnets_0_conv1"  # 64 x 32 x 3 x 3 in TINY
    for strength in STRENGTHS:
        two_d = changed_weight(weight, read_change(tmp_path / "2d.safetensors", stem, tensors), strength)
        one_d = changed_weight(weight, read_change(tmp_path / "1d.safetensors", stem, flat), strength)
        assert torch.equal(one_d, two_d)
        assert relative_error(two_d, comfy_merge(weight, tensors, strength)) <= REL
