"""LoRA files against diffusers + PEFT, at the tiny config: minidream's kohya and diffusers
files load in diffusers' `load_lora_weights` to the same outputs as minidream's adapted models,
files that diffusers/PEFT wrote (current and older layouts) open in minidream to the same outputs,
and every file minidream cannot use is refused in one line that names it.

Tolerance: max |minidream - diffusers| <= 1e-5 * max |diffusers| (fp32) for UNet noise
predictions and text-encoder hidden states; the UNet agrees bit for bit in these runs, the text
encoder to ~3e-7 (transformers' eager attention against SDPA).
"""

import dataclasses
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from lora_helpers import load_adapters, remove_lora
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from pipeline_checks import assert_one_clear_line
from reference_models import relative_error, seeded_diffusers_model
from test_clip import build_pair
from test_lora import adapted_with_random_up
from transformers import CLIPTokenizer as TransformersCLIPTokenizer

from minidream.config import OPTIMIZERS, TINY, ModelConfig, TrainConfig
from minidream.io.diffusers_layout import (
    unet_config_to_diffusers,
    unet_from_diffusers,
    vae_config_to_diffusers,
)
from minidream.io.lora_files import (
    KOHYA_OPTIMIZERS,
    LoRAFile,
    apply_lora_file,
    convert_lora_file,
    kohya_settings,
    lora_argument,
    lora_merged,
    read_lora_file,
    save_lora,
    write_lora_file,
)
from minidream.io.tensor_files import WeightsError
from minidream.io.weights import load_pipeline, save_pipeline
from minidream.models import lora
from minidream.models.pipeline import Pipeline, random_pipeline
from minidream.models.tokenizer import CLIPTokenizer
from minidream.models.unet import UNet
from minidream.training.config_file import load_train_config
from minidream.training.subjects import subjects_of

TOL = 1e-5
PROMPTS = ["a photo of sks dog", "a castle on a hill"]
UNET_PEFT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                     "conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv"]
TEXT_PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


@pytest.fixture
def pair(tokenizer_folder):
    """(diffusers' StableDiffusionPipeline, minidream's Pipeline) with the same random UNet and
    text encoder weights, in separate storage (merging into one leaves the other alone)."""
    reference_unet = seeded_diffusers_model(UNet2DConditionModel, unet_config_to_diffusers(TINY.unet), 0)
    unet = UNet(TINY.unet)
    unet.load_state_dict(unet_from_diffusers(reference_unet.state_dict(), TINY.unet))
    text_encoder, reference_text_encoder = build_pair(TINY.text_encoder, seed=1)
    reference = StableDiffusionPipeline(
        unet=reference_unet,
        vae=seeded_diffusers_model(DiffusersAutoencoderKL, vae_config_to_diffusers(TINY.vae), 2),
        text_encoder=reference_text_encoder,
        tokenizer=TransformersCLIPTokenizer.from_pretrained(tokenizer_folder),
        scheduler=DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    ours = dataclasses.replace(random_pipeline(TINY), unet=unet.eval(), text_encoder=text_encoder.eval())
    return reference, ours


@torch.no_grad()
def outputs(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """(UNet noise prediction, text-encoder hidden states) of either pipeline on fixed inputs."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=generator)
    t = torch.tensor([15.0, 640.0])
    context = torch.randn(2, 77, TINY.unet.context_dim, generator=generator)
    ids = CLIPTokenizer()(PROMPTS)
    if isinstance(pipe, Pipeline):
        return pipe.unet(x, t, context), pipe.text_encoder(ids)
    return pipe.unet(x, t, context).sample, pipe.text_encoder(ids).last_hidden_state


def assert_close(actual, expected, base=None):
    for ours, theirs, name in zip(actual, expected, ("unet", "text encoder")):
        assert relative_error(ours, theirs) <= TOL, name
    if base is not None:  # the adapters must matter, or the comparison proves nothing
        for before, after, name in zip(base, expected, ("unet", "text encoder")):
            assert relative_error(before, after) > 1e-3, name


def assert_opens_as_in_diffusers(path: Path, pair, parts=("unet", "text encoder")):
    """The oracle: the file through diffusers' load_lora_weights, and through minidream both as
    live adapters and merged into the weights (as UIs apply it), give the same outputs."""
    reference, ours = pair
    base = outputs(ours)
    reference.load_lora_weights(str(path))
    expected = outputs(reference)
    read = read_lora_file(path, TINY)
    load_adapters(ours.unet, read.unet)
    load_adapters(ours.text_encoder, read.text_encoder)
    assert_close(outputs(ours), expected, base)
    remove_lora(ours.unet)
    remove_lora(ours.text_encoder)
    apply_lora_file(ours, path)
    assert_close(outputs(ours), expected)


def adapt(pipe: Pipeline) -> Pipeline:
    """UNet: every kohya target incl. LoCon 3x3 convs, rank 4 alpha 2; text encoder rank 2 alpha 3."""
    adapted_with_random_up(pipe.unet, "all", rank=4, alpha=2, seed=10)
    adapted_with_random_up(pipe.text_encoder, "all", rank=2, alpha=3, seed=11)
    return pipe


# ---- minidream writes, diffusers reads ------------------------------------------------------------


@pytest.mark.parametrize("format", ["kohya", "diffusers"])
def test_exported_file_loads_in_diffusers_as_minidreams_adapted_models(pair, tmp_path, format):
    reference, ours = pair
    base = outputs(ours)
    adapt(ours)
    path = tmp_path / "lora.safetensors"
    save_lora(path, ours.unet, ours.text_encoder, format=format, dtype=torch.float32)
    reference.load_lora_weights(str(path))
    assert_close(outputs(ours), outputs(reference), base)


@pytest.mark.parametrize("format", ["kohya", "diffusers"])
def test_exported_fp16_file_opens_in_minidream_as_in_diffusers(pair, tmp_path, format):
    _, ours = pair
    donor = adapt(random_pipeline(TINY))
    path = tmp_path / "lora.safetensors"
    save_lora(path, donor.unet, donor.text_encoder, format=format)  # fp16, the default
    assert_opens_as_in_diffusers(path, pair)


def test_kohya_file_layout_dtype_and_metadata(tmp_path):
    donor = adapt(random_pipeline(TINY))
    path = tmp_path / "lora.safetensors"
    settings = {"ss_learning_rate": "0.0001", "ss_max_train_steps": "400"}
    save_lora(path, donor.unet, donor.text_encoder, settings=settings)
    with safetensors.safe_open(path, framework="pt") as f:
        metadata, keys = f.metadata(), list(f.keys())
        tensors = {key: f.get_tensor(key) for key in keys}
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys
    layers = len(lora.adapted_layers(donor.unet)) + len(lora.adapted_layers(donor.text_encoder))
    assert len(keys) == 3 * layers
    for key, tensor in tensors.items():
        if key.endswith(".alpha"):
            assert tensor.ndim == 0 and tensor.dtype == torch.float32
        else:
            assert tensor.dtype == torch.float16, key
    assert tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"].item() == 3.0
    assert metadata["ss_network_module"] == "networks.lora"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("4", "2")
    assert metadata["ss_base_model_version"] == "sd_v1"
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "2"}
    assert metadata["ss_learning_rate"] == "0.0001" and metadata["ss_max_train_steps"] == "400"
    assert [p.name for p in tmp_path.iterdir()] == ["lora.safetensors"]  # no temporary left behind


def test_kohya_settings_record_the_run_config_as_strings(tmp_path):
    settings = kohya_settings(TrainConfig(), num_instance_images=5, num_class_images=200, instance_prompts=["a photo of sks dog"])
    assert settings["ss_learning_rate"] == "2e-06" and settings["ss_max_train_steps"] == "800"
    assert settings["ss_resolution"] == "(512, 512)" and settings["ss_num_reg_images"] == "200"
    donor = adapt(random_pipeline(TINY))
    save_lora(tmp_path / "lora.safetensors", donor.unet, settings=settings)  # all str -> str: accepted
    assert settings.items() <= read_lora_file(tmp_path / "lora.safetensors", TINY).metadata.items()


def test_kohya_settings_record_the_optimizer_and_every_subjects_prompt():
    """kohya's ss_optimizer names the class that stepped (module.ClassName, as train_network.py
    writes it), and the comment holds each subject's instance prompt, not data.instance_prompt."""
    cfg = load_train_config(None, ["train.optimizer=adamw8bit", "data.subjects=[{instance_dir: dog, instance_prompt: "
                                   "a photo of sks dog}, {instance_dir: cat, instance_prompt: a photo of zwx cat}]"])
    settings = kohya_settings(cfg, 10, 0, [s.instance_prompt for s in subjects_of(cfg)])
    assert settings["ss_optimizer"].startswith("bitsandbytes.optim.adamw.AdamW8bit(weight_decay=0.01,")
    assert settings["ss_training_comment"] == "minidream DreamBooth: 'a photo of sks dog', 'a photo of zwx cat'"
    adamw = kohya_settings(TrainConfig(), 5, 0, ["a photo of sks dog"])["ss_optimizer"]
    assert adamw == f"{torch.optim.AdamW.__module__}.AdamW(weight_decay=0.01,betas=(0.9, 0.999),eps=1e-08)"
    assert set(KOHYA_OPTIMIZERS) == set(OPTIMIZERS)  # every train.optimizer has its record


def test_writing_refuses_bad_names_formats_and_metadata(tmp_path):
    donor = adapt(random_pipeline(TINY))
    with pytest.raises(WeightsError, match="must be named"):
        save_lora(tmp_path / "lora.pt", donor.unet)
    with pytest.raises(ValueError, match="kohya, diffusers"):
        save_lora(tmp_path / "lora.safetensors", donor.unet, format="comfy")
    with pytest.raises(ValueError, match="str to str"):
        save_lora(tmp_path / "lora.safetensors", donor.unet, settings={"ss_steps": 400})
    assert list(tmp_path.iterdir()) == []


# ---- diffusers / PEFT write, minidream reads ------------------------------------------------------


def peft_written_file(folder: Path, alpha_equals_rank: bool, metadata: bool) -> Path:
    """A LoRA as diffusers' training scripts save it: PEFT adapters on diffusers' UNet and
    transformers' CLIP, get_peft_model_state_dict, StableDiffusionPipeline.save_lora_weights."""
    torch.manual_seed(20)
    unet = UNet2DConditionModel.from_config(unet_config_to_diffusers(TINY.unet))
    _, text_encoder = build_pair(TINY.text_encoder, seed=1)
    # init_lora_weights=False: random lora_B too, so the adapters change the outputs
    unet_config = LoraConfig(r=4, lora_alpha=4 if alpha_equals_rank else 6, init_lora_weights=False,
                             target_modules=UNET_PEFT_TARGETS)
    text_config = LoraConfig(r=2, lora_alpha=2 if alpha_equals_rank else 5, init_lora_weights=False,
                             target_modules=TEXT_PEFT_TARGETS)
    unet.add_adapter(unet_config)
    text_encoder.add_adapter(text_config)
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=get_peft_model_state_dict(text_encoder),
        unet_lora_adapter_metadata=unet_config.to_dict() if metadata else None,
        text_encoder_lora_adapter_metadata=text_config.to_dict() if metadata else None,
    )
    return folder / "pytorch_lora_weights.safetensors"


@pytest.mark.parametrize("alpha_equals_rank, metadata", [(True, False), (False, True)],
                         ids=["no-metadata", "lora_alpha-in-metadata"])
def test_peft_written_file_opens_in_minidream_as_in_diffusers(pair, tmp_path, alpha_equals_rank, metadata):
    path = peft_written_file(tmp_path, alpha_equals_rank, metadata)
    read = read_lora_file(path, TINY)
    assert len(read.unet) == len(lora.target_layers(pair[1].unet, "all"))
    assert len(read.text_encoder) == len(lora.target_layers(pair[1].text_encoder, "all"))
    assert {a.alpha for a in read.unet.values()} == {4.0 if alpha_equals_rank else 6.0}
    assert_opens_as_in_diffusers(path, pair)


OLD_UNET_ATTENTION = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}


def older_diffusers_layout(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same adapters as diffusers < 0.22 wrote them: attention processors' `to_q_lora.down`
    in the UNet, LoRACompatible layers' `.lora.down` elsewhere, `lora_linear_layer` in CLIP."""
    old = {}
    for key, tensor in tensors.items():
        stem, role = key.rsplit(".lora_", 1)
        direction = "down" if role.startswith("A") else "up"
        parent, _, layer = stem.rpartition(".")
        attention = next((k for k in OLD_UNET_ATTENTION if stem.endswith("." + k)), None)
        if stem.startswith("unet.") and attention and ".attn" in stem:
            prefix = stem.removesuffix("." + attention)
            old[f"{prefix}.processor.{OLD_UNET_ATTENTION[attention]}.{direction}.weight"] = tensor
        elif stem.startswith("unet."):
            old[f"{stem}.lora.{direction}.weight"] = tensor
        else:
            old[f"{stem}.lora_linear_layer.{direction}.weight"] = tensor
    return old


def test_older_diffusers_layouts_open_in_minidream_as_in_diffusers(pair, tmp_path):
    current = peft_written_file(tmp_path, alpha_equals_rank=True, metadata=False)
    old = tmp_path / "old.safetensors"
    safetensors.torch.save_file(older_diffusers_layout(safetensors.torch.load_file(current)), old)
    assert any(".processor.to_q_lora.down.weight" in key for key in safetensors.torch.load_file(old))
    assert_opens_as_in_diffusers(old, pair)


def test_kohya_file_without_alpha_means_scale_one(pair, tmp_path):
    donor = adapt(random_pipeline(TINY))
    full = tmp_path / "full.safetensors"
    save_lora(full, donor.unet, donor.text_encoder, dtype=torch.float32)
    path = tmp_path / "no-alpha.safetensors"
    tensors = safetensors.torch.load_file(full)
    safetensors.torch.save_file({k: v for k, v in tensors.items() if not k.endswith(".alpha")}, path)
    read = read_lora_file(path, TINY)
    assert all(adapter.alpha == adapter.rank for adapter in read.unet.values())
    assert_opens_as_in_diffusers(path, pair)


def test_kohya_file_with_ldm_names_reads_as_the_diffusers_named_one(pair, tmp_path):
    """Some tools write kohya keys from the SD checkpoint's own module paths (minidream's names)."""
    _, ours = pair
    adapt(ours)
    ldm = {}
    for prefix, model in (("lora_unet_", ours.unet), ("lora_te_", ours.text_encoder)):
        for name, adapter in lora.adapters_of(model).items():
            key = prefix + name.replace(".", "_")
            ldm |= {f"{key}.lora_down.weight": adapter.down, f"{key}.lora_up.weight": adapter.up,
                    f"{key}.alpha": torch.tensor(adapter.alpha)}
    assert "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in ldm
    assert "lora_unet_input_blocks_2_0_op.lora_down.weight" in ldm  # tiny: a Downsample: LDM `op`, diffusers `conv`
    path = tmp_path / "ldm.safetensors"
    safetensors.torch.save_file(ldm, path)
    expected = outputs(ours)
    read = read_lora_file(path, TINY)
    assert read.unet.keys() == lora.adapters_of(ours.unet).keys()
    remove_lora(ours.unet)
    remove_lora(ours.text_encoder)
    apply_lora_file(ours, path)
    assert_close(outputs(ours), expected)


def test_lora_merged_is_diffusers_fused_file_and_restores_every_bit(pair, tmp_path):
    """Validation grids from the exported file merged as UIs merge it, while training's live
    adapters are off; afterwards the base weights and the live model are exactly as before."""
    reference, ours = pair
    adapt(ours)
    path = tmp_path / "lora.safetensors"
    save_lora(path, ours.unet, ours.text_encoder)  # fp16, as exported after training
    before = {key: value.clone() for key, value in lora.base_state_dict(ours.unet).items()}
    live = outputs(ours)
    reference.load_lora_weights(str(path))
    reference.fuse_lora()  # diffusers folds the file into the weights, as UIs do
    with lora_merged(ours, read_lora_file(path, TINY)):
        assert_close(outputs(ours), outputs(reference))
    after = lora.base_state_dict(ours.unet)
    assert all(torch.equal(after[key], value) for key, value in before.items())
    assert all(torch.equal(a, b) for a, b in zip(outputs(ours), live))


def test_apply_lora_file_merges_into_a_loaded_fp16_checkpoint(tmp_path):
    """What load_pipeline(loras=...) will do: merge into the memory-mapped weights of a loaded
    single file, in fp32, rounded once to fp16, at the given strength; the file stays as it was."""
    pipe = random_pipeline(TINY)
    save_pipeline(pipe, tmp_path / "model.safetensors")
    donor = adapt(random_pipeline(TINY))
    save_lora(tmp_path / "lora.safetensors", donor.unet, donor.text_encoder)
    loaded = load_pipeline(tmp_path / "model.safetensors")
    apply_lora_file(loaded, tmp_path / "lora.safetensors", scale=0.5)
    expected = load_pipeline(tmp_path / "model.safetensors", dtype=torch.float32)
    read = read_lora_file(tmp_path / "lora.safetensors", TINY)
    for name, adapter in read.unet.items():
        weight = expected.unet.get_submodule(name).weight
        delta = lora.weight_delta(adapter.down, adapter.up, 0.5 * adapter.alpha / adapter.rank)
        merged = loaded.unet.get_submodule(name).weight
        assert merged.dtype == torch.float16
        assert torch.equal(merged, (weight + delta).half()), name
    fresh = load_pipeline(tmp_path / "model.safetensors").unet.get_submodule(name).weight  # the file is untouched
    assert torch.equal(fresh, expected.unet.get_submodule(name).weight.half())


def test_lora_argument_splits_an_optional_scale():
    assert lora_argument("loras/sks.safetensors") == (Path("loras/sks.safetensors"), 1.0)
    assert lora_argument("loras/sks.safetensors:0.7") == (Path("loras/sks.safetensors"), 0.7)
    assert lora_argument("C:/loras/sks.safetensors") == (Path("C:/loras/sks.safetensors"), 1.0)
    assert lora_argument("C:/loras/sks.safetensors:-1") == (Path("C:/loras/sks.safetensors"), -1.0)


# ---- converting between the layouts ---------------------------------------------------------------


def test_convert_kohya_to_diffusers_and_back(pair, tmp_path):
    donor = adapt(random_pipeline(TINY))
    kohya, diffusers_file, back = (tmp_path / f"{n}.safetensors" for n in ("kohya", "diffusers", "back"))
    save_lora(kohya, donor.unet, donor.text_encoder, dtype=torch.float32, settings={"ss_output_name": "sks"})
    convert_lora_file(kohya, diffusers_file, "diffusers", TINY, dtype=torch.float32)
    convert_lora_file(diffusers_file, back, "kohya", TINY, dtype=torch.float32)
    first, last = read_lora_file(kohya, TINY), read_lora_file(back, TINY)
    for part in ("unet", "text_encoder"):
        for name, adapter in getattr(first, part).items():
            again = getattr(last, part)[name]
            delta = lora.weight_delta(adapter.down, adapter.up, lora.lora_scale(adapter.alpha, adapter.rank))
            delta_again = lora.weight_delta(again.down, again.up, lora.lora_scale(again.alpha, again.rank))
            assert relative_error(delta_again, delta) <= 1e-6, name
    assert_opens_as_in_diffusers(diffusers_file, pair)
    convert_lora_file(kohya, tmp_path / "kohya-fp16.safetensors", "kohya", TINY)  # kohya -> kohya keeps ss_*
    assert read_lora_file(tmp_path / "kohya-fp16.safetensors", TINY).metadata["ss_output_name"] == "sks"


# ---- refusals: one line naming the file and what it is --------------------------------------------

TO_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
TO_K_CROSS = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
TE_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


def with_key(key, tensor):
    return lambda tensors: {**tensors, key: tensor}


def without(suffix):
    return lambda tensors: {k: v for k, v in tensors.items() if not k.endswith(suffix)}


def renamed(old, new):
    return lambda tensors: {k.replace(old, new): v for k, v in tensors.items()}


def reshaped(key, shape):
    return lambda tensors: {**tensors, key: torch.zeros(shape)}


REFUSALS = {
    "loha-beside-lora": (with_key(f"{TO_Q}.hada_w1_a", torch.zeros(4, 32)),
                         f"1 mis-shaped ({TO_Q}.hada_w1_a mixes LoHa and LoRA tensors on one layer)"),
    "lokr-beside-lora": (with_key(f"{TO_Q}.lokr_w1", torch.zeros(4, 4)), f"{TO_Q}.lokr_w1 mixes LoKr and LoRA"),
    "dora-wrong-shape": (with_key(f"{TO_Q}.dora_scale", torch.zeros(1, 48)),
                         f"{TO_Q}.dora_scale [1, 48]: neither 32 rows nor 32 inputs"),
    "peft-dora": (with_key(f"unet.{TO_Q}.lora_magnitude_vector", torch.zeros(32)), "a diffusers/PEFT DoRA file"),
    "tucker-locon": (with_key(f"{TO_Q}.lora_mid.weight", torch.zeros(4, 4, 3, 3)), "(lora_mid keys)"),
    "sdxl-two-text-encoders": (renamed("lora_te_", "lora_te1_"), "an SDXL LoRA"),
    "sdxl-context": (reshaped(f"{TO_K_CROSS}.lora_down.weight", (4, 2048)), "an SDXL LoRA (2048-wide cross-attention"),
    "sd2-context": (reshaped(f"{TO_K_CROSS}.lora_down.weight", (4, 1024)), "an SD 2.x LoRA (1024-wide cross-attention"),
    "sd2-text-encoder": (reshaped(f"{TE_Q}.lora_down.weight", (2, 1024)), "an SD 2.x LoRA (1024-wide text encoder"),
    "missing-up": (without(f"{TO_Q}.lora_up.weight"), f"1 missing ({TO_Q}.lora_down.weight has no up)"),
    "unknown-module": (with_key("lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight", torch.zeros(4, 32)),
                       "1 unexpected (lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight)"),
    "wrong-width": (reshaped(f"{TO_Q}.lora_down.weight", (4, 48)), f"1 mis-shaped ({TO_Q}.lora_down.weight [4, 48]"),
    "rank-mismatch": (reshaped(f"{TO_Q}.lora_up.weight", (32, 3)), f"1 mis-shaped ({TO_Q}.lora_down.weight [4, 32]"),
    "full-model": (lambda tensors: {"model.diffusion_model.out.2.weight": torch.zeros(4)}, "no LoRA tensors"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_files_minidream_cannot_use_are_refused_in_one_line(tmp_path, case):
    donor = adapt(random_pipeline(TINY))
    good = tmp_path / "good.safetensors"
    save_lora(good, donor.unet, donor.text_encoder, dtype=torch.float32)
    edit, fragment = REFUSALS[case]
    path = tmp_path / f"{case}.safetensors"
    safetensors.torch.save_file(edit(safetensors.torch.load_file(good)), path)
    with pytest.raises(WeightsError) as error:
        read_lora_file(path, TINY)
    assert_one_clear_line(error, path, fragment)


def test_broken_diffusers_metadata_and_missing_file_are_refused_in_one_line(tmp_path):
    donor = adapt(random_pipeline(TINY))
    path = tmp_path / "diffusers.safetensors"
    write_lora_file(path, LoRAFile(lora.adapters_of(donor.unet), {}, {}), TINY, "diffusers",
                    settings={"lora_adapter_metadata": "{not json"})
    with pytest.raises(WeightsError) as error:
        read_lora_file(path, TINY)
    assert_one_clear_line(error, path, "lora_adapter_metadata")
    with pytest.raises(WeightsError) as error:
        read_lora_file(tmp_path / "absent.safetensors", TINY)
    assert_one_clear_line(error, tmp_path / "absent.safetensors", "no such LoRA file")


def test_sd2_base_reads_an_sd2_width_lora(tmp_path):
    """The family check is against the base's config, not a fixed SD 1.x width."""
    cfg = ModelConfig(unet=dataclasses.replace(TINY.unet, context_dim=1024), text_encoder=TINY.text_encoder)
    unet = adapted_with_random_up(UNet(cfg.unet), "attention", rank=2, alpha=2, seed=0)
    path = tmp_path / "lora.safetensors"
    save_lora(path, unet)
    read = read_lora_file(path, cfg)
    assert read.unet.keys() == lora.adapters_of(unet).keys()
    assert next(a for n, a in read.unet.items() if n.endswith("attn2.to_k")).down.shape == (2, 1024)
