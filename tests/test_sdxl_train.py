"""DreamBooth on SDXL: train.py on a tiny SDXL-style model (model.architecture=tiny-sdxl).

- The micro-conditioning comes from what the data path did to each photo: its size before
  resizing, its crop's corner in the resized image (in the flipped image when flipped, as SDXL
  was trained), the bucket it trains at; class images carry their own; validation doubles them
  for guidance as StableDiffusionXLPipeline does.
- One step equals a step written by hand on diffusers' UNet with `added_cond_kwargs` (loss and
  gradient norm to 1e-6), for cropped and flipped non-square photos; a full fine-tune exports the
  frozen text encoders and the VAE bit for bit.
- Resume after SIGTERM is bit-identical with LoRA on both text encoders, buckets and EMA
  (tests/test_resume.py, setup "sdxl-lora"); 2 ranks train what one process trains, and fsdp
  what DDP trains.
- The LoRA file the run writes is kohya's SDXL layout, loads whole in diffusers'
  load_lora_weights and gives what minidream's load_pipeline(base, loras=[...]) gives.
"""

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from PIL import Image
from photo_sets import write_crops
from safetensors import safe_open
from safetensors.torch import load_file
from sdxl_reference import diffusers_pipeline, diffusers_unet
from test_fsdp import LOG_TOLERANCE, WEIGHT_TOLERANCE
from test_sdxl_lora import nothing_ignored, outputs, peft_layers
from train_runs import STEPS, exported_weights, max_difference, metrics, train_args

import train
from minidream import load_pipeline, save_pipeline
from minidream.config import TINY_SDXL
from minidream.diffusion import sampling
from minidream.diffusion.sampling import Conditioning, generate
from minidream.io.lora_files import read_lora_file
from minidream.models.pipeline import random_pipeline
from minidream.models.unet import size_conditioning
from minidream.training.batches import LatentSource, PromptEncoder
from minidream.training.data import Example, pixels_of, place

SDXL = ("model.architecture=tiny-sdxl",)
WIDE = (128, 80)  # photos wider than tall, larger than data.resolution=64: placed at 64 x 64 they are resized to 102 x 64
UNET = "model.diffusion_model."


# ---- the size ids -------------------------------------------------------------------------------


@pytest.mark.parametrize("flip", [False, True])
def test_size_ids_are_height_first_and_the_crop_corner_is_in_the_image_as_trained(flip):
    """A 100 x 60 photo placed at 64 x 64: resized to 107 x 64, cropped at a drawn left; the ids
    are (original h, w, crop top, left, target h, w), and a flipped sample's left is where its
    crop starts in the flipped resized image (diffusers #6234 was the unflipped left)."""
    image = random_image(100, 60, torch.Generator().manual_seed(0))
    placement = place((100, 60), (64, 64), center_crop=False, flip=flip, generator=torch.Generator().manual_seed(3))
    assert placement.resized == (107, 64) and 0 < placement.left < 107 - 64
    original_h, original_w, top, left, target_h, target_w = placement.size_ids((100, 60))
    assert (original_h, original_w, top, target_h, target_w) == (60, 100, 0, 64, 64)
    assert left == (107 - 64 - placement.left if flip else placement.left)
    # What the sample's pixels are: the resized image, flipped if so, cropped at (left, top).
    resized = image.resize(placement.resized, Image.Resampling.BICUBIC)
    seen = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else resized
    expected = pixels_of(seen.crop((left, top, left + 64, top + 64)))
    assert torch.equal(pixels_of(placement.apply(image)), expected)


def random_image(width: int, height: int, generator: torch.Generator) -> Image.Image:
    return Image.fromarray(torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8).numpy())


def test_each_sample_carries_its_own_ids_and_class_images_theirs(tmp_path, training_data):
    """Samples of 128 x 80 photos randomly cropped and flipped, and of 64 x 64 class images, placed
    at 64 x 64: each row is what its own placement did (Placement.size_ids), the class rows
    (64, 64) uncropped."""
    photos = write_crops(tmp_path / "wide", "dog", [WIDE] * 4)
    classes = sorted((training_data / "class").glob("*.png"))[:4]
    examples = [Example(p, "", WIDE) for p in photos] + [Example(p, "", (64, 64)) for p in classes]
    source = LatentSource(random_pipeline(TINY_SDXL, seed=0).vae, center_crop=False, random_flip=True,
                          scaling_factor=TINY_SDXL.vae.scaling_factor, store=None)
    generators = [torch.Generator().manual_seed(i) for i in range(8)]
    _, _, size_ids = source.latents(examples, (64, 64), generators, masks=False)
    replayed = [torch.Generator().manual_seed(i) for i in range(8)]
    placements = [source.placement(example, (64, 64), g) for example, g in zip(examples, replayed)]
    assert size_ids.tolist() == [p.size_ids(e.size) for p, e in zip(placements, examples)]
    assert {p.flip for p in placements[:4]} == {False, True} and len({row[3] for row in size_ids[:4].tolist()}) > 1
    assert all(row[:3] == [80, 128, 0] and row[4:] == [64, 64] for row in size_ids[:4].tolist())
    assert size_ids[4:].tolist() == [[64, 64, 0, 0, 64, 64]] * 4


def test_validation_doubles_the_ids_for_guidance_as_the_sdxl_pipeline_does(monkeypatch):
    """Under guidance the UNet sees 2B rows, negative half first, each with the sizes of the image
    drawn: (h, w), crop (0, 0), (h, w) — StableDiffusionXLPipeline's defaults, and the y the
    guidance test of tests/test_sdxl_sampling.py compares with diffusers image for image."""
    pipe = random_pipeline(TINY_SDXL, seed=0)
    seen = []
    forward = pipe.unet.forward

    def recording_forward(x, t, context, y):
        seen.append((context, y))
        return forward(x, t, context, y)

    monkeypatch.setattr(pipe.unet, "forward", recording_forward)
    generate(pipe, ["a", "b"], seeds=[0, 1], steps=1, guidance=5.0, height=64, width=32)
    context, y = seen[0]
    ids = torch.tensor([[64.0, 32, 0, 0, 64, 32]] * 4)
    pooled = y[:, : TINY_SDXL.text_encoder_2.width]
    assert torch.equal(y, size_conditioning(pooled, ids, TINY_SDXL.unet.size_embed_dim))
    assert not pooled[:2].any() and not context[:2].any()  # no negative prompt: SDXL's zeros
    assert pooled[2:].abs().sum() > 0


def test_dropped_captions_condition_on_zeros_frozen_or_trained():
    """SDXL's caption dropout trains the zeros its pipeline guides from; the frozen-encoder cache
    gives what the encoders give."""
    pipe = random_pipeline(TINY_SDXL, seed=0)
    prompts = ["a photo of sks dog", "", "a dog"]
    frozen = PromptEncoder(pipe.tokenizers, pipe.text_encoders, trainable=False)(prompts, torch.device("cpu"))
    trained = PromptEncoder(pipe.tokenizers, pipe.text_encoders, trainable=True)(prompts, torch.device("cpu"))
    direct = sampling.encode_prompts(pipe, prompts, clip_skip=1)
    for ours in (frozen, trained):
        assert isinstance(ours, Conditioning)
        assert not ours.context[1].any() and not ours.pooled[1].any()
        for row in (0, 2):  # the cache encodes its prompts in another batch order: 1 ulp allowed
            for part, expected in zip(ours, direct):
                assert torch.allclose(part[row], expected[row], rtol=0, atol=1e-6 * expected.abs().max().item())
    assert trained.context.requires_grad


# ---- one step against diffusers ------------------------------------------------------------------


def test_one_step_equals_a_reference_step_on_diffusers_with_added_cond_kwargs(tmp_path, training_data, monkeypatch, one_thread):
    """Non-square photos, random crops and flips: train.py's first step equals the step written on
    diffusers' UNet2DConditionModel with text_embeds and time_ids built, as diffusers'
    train_dreambooth_lora_sdxl.py builds them, from each photo's size and the crop and flip drawn."""
    write_crops(tmp_path / "wide", "dog", [WIDE] * 4)
    seen, placements = {}, []

    def recording_noisy_latents(latents, noise, input_noise, t, *rest):
        seen.update(latents=latents, noise=noise, t=t)
        return noisy_latents(latents, noise, input_noise, t, *rest)

    class RecordingPromptEncoder(train.PromptEncoder):
        def __call__(self, prompts, device):
            seen["conditioning"] = super().__call__(prompts, device)
            return seen["conditioning"]

    placement = LatentSource.placement

    def recording_placement(self, example, size, generator):
        placements.append((example, placement(self, example, size, generator)))
        return placements[-1][1]

    noisy_latents = train.noisy_latents_and_target
    monkeypatch.setattr(train, "noisy_latents_and_target", recording_noisy_latents)
    monkeypatch.setattr(train, "PromptEncoder", RecordingPromptEncoder)
    monkeypatch.setattr(LatentSource, "placement", recording_placement)
    run_dir = tmp_path / "run"
    overrides = (*SDXL, f"data.instance_dir={tmp_path / 'wide'}", "data.random_flip=true", "data.center_crop=false",
                 "train.batch_size=2", "train.max_steps=1", "checkpoint.every_n_steps=1")
    assert train.main(train_args(run_dir, training_data, overrides)) == 0
    (logged,) = metrics(run_dir)

    # diffusers' script: original_size = (h, w) before resizing; crop (y1, x1) after the flip; target = the size trained at.
    time_ids = []
    for example, p in placements:
        width, height = example.size
        x1 = p.resized[0] - p.left - p.size[0] if p.flip else p.left
        time_ids.append([height, width, p.top, x1, p.size[1], p.size[0]])
    time_ids = torch.tensor(time_ids, dtype=torch.float32)
    assert [p.flip for _, p in placements[:2]] != [False, False] and any(p.left for _, p in placements[:2])  # the case at hand
    assert time_ids[:2, :2].tolist() == [[80, 128]] * 2 and time_ids[2:, :2].tolist() == [[64, 64]] * 2

    reference = diffusers_unet(random_pipeline(TINY_SDXL, seed=0)).train()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    latents, noise, t, conditioning = seen["latents"], seen["noise"], seen["t"], seen["conditioning"]
    prediction = reference(scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=conditioning.context,
                           added_cond_kwargs={"text_embeds": conditioning.pooled, "time_ids": time_ids}).sample
    loss = F.mse_loss(prediction[:2], noise[:2]) + F.mse_loss(prediction[2:], noise[2:])  # Ruiz et al. eq. 2
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm=1.0)
    # Measured: loss and gradient norm bit-identical.
    assert abs(logged["loss"] - loss.item()) <= 1e-6 * loss.item()
    assert abs(logged["grad_norm"] - grad_norm.item()) <= 1e-6 * grad_norm.item()

    # The full fine-tune leaves what it does not train as it was: both text encoders and the VAE.
    base = tmp_path / "base.safetensors"
    save_pipeline(random_pipeline(TINY_SDXL, seed=0), base, dtype=None)  # fp32, tiny.yaml's run.export_dtype
    exported, initial = load_file(run_dir / "model.safetensors"), load_file(base)
    assert exported.keys() == initial.keys()
    frozen = [k for k in initial if not k.startswith(UNET)]
    assert any(k.startswith("conditioner.embedders.1.") for k in frozen) and any(k.startswith("first_stage_model.") for k in frozen)
    assert all(torch.equal(exported[k], initial[k]) for k in frozen)
    assert any(not torch.equal(exported[k], initial[k]) for k in initial if k.startswith(UNET))


# ---- ranks, fsdp --------------------------------------------------------------------------------


@pytest.mark.parametrize("one_process, others", [
    ("sdxl-lora", ["torchrun-sdxl-lora"]),
    ("sdxl-text-encoder-ema", ["torchrun-sdxl-text-encoder-ema", "fsdp-sdxl-text-encoder-ema"]),
], ids=["lora on the UNet and both encoders + EMA + buckets: batch 2 vs 2x1", "both encoders + EMA: 1 vs ddp vs fsdp"])
def test_ranks_and_fsdp_train_what_one_process_trains(one_process, others, uninterrupted):
    single = exported_weights(uninterrupted(one_process))
    tolerance = WEIGHT_TOLERANCE * max(v.abs().max().item() for v in single.values())
    worst = 0.0
    for other in others:
        worst = max(worst, max_difference(single, exported_weights(uninterrupted(other))))
        assert worst <= tolerance, other
        for a, b in zip(metrics(uninterrupted(one_process)), metrics(uninterrupted(other)), strict=True):
            for key in ("loss", "loss_instance", "loss_prior", "grad_norm"):
                assert abs(a[key] - b[key]) <= LOG_TOLERANCE * abs(a[key]), (other, key)
    initial = {UNET + k: v for k, v in random_pipeline(TINY_SDXL, seed=0).unet.state_dict().items()}
    assert max_difference({k: single[k] for k in initial}, initial) > 10 * worst  # training moved it much further
    assert [r["step"] for r in metrics(uninterrupted(one_process))] == list(range(1, STEPS + 1))


# ---- the LoRA file ------------------------------------------------------------------------------


def test_the_runs_lora_file_is_kohyas_sdxl_layout_and_loads_whole_in_diffusers(uninterrupted, tokenizer_folder, tmp_path):
    path = uninterrupted("sdxl-lora") / "lora.safetensors"
    with safe_open(path, framework="pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
        alphas = [f.get_tensor(k).item() for k in keys if k.endswith(".alpha")]
    assert alphas and set(alphas) == {8.0}  # lora.alpha, on every layer
    for prefix in ("lora_unet_", "lora_te1_text_model_encoder_layers_", "lora_te2_text_model_encoder_layers_"):
        assert any(k.startswith(prefix) for k in keys), prefix
    for part in ("te1", "te2"):  # kohya's targets: diffusers drops q/k/v without out_proj
        assert any(k.startswith(f"lora_{part}_") and "_self_attn_out_proj." in k for k in keys), part
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"

    base_pipe = random_pipeline(TINY_SDXL, seed=0)
    base = tmp_path / "base.safetensors"
    save_pipeline(base_pipe, base, dtype=None)
    ours = load_pipeline(base, loras=[(path, 1.0)])
    reference = diffusers_pipeline(random_pipeline(TINY_SDXL, seed=0), tokenizer_folder)
    with nothing_ignored():
        reference.load_lora_weights(str(path))
    for part, adapters in read_lora_file(path, TINY_SDXL).parts().items():
        assert len(adapters) == peft_layers(getattr(reference, part)) > 0, part
    expected, actual, before = outputs(reference), outputs(ours), outputs(base_pipe)
    errors = {k: ((actual[k] - expected[k]).abs().max() / expected[k].abs().max()).item() for k in expected}
    changes = {k: ((before[k] - expected[k]).abs().max() / expected[k].abs().max()).item() for k in expected}
    # Measured: UNet 9.6e-7, states 1.3e-7, pooled 9.0e-8; the adapters changed them by 0.21, 0.015, 0.023.
    assert max(errors.values()) <= 1e-5, errors
    assert min(changes.values()) > 100 * max(max(errors.values()), 1e-7), changes  # the adapters matter


# ---- the full model's file ----------------------------------------------------------------------


def test_a_v_prediction_run_exports_the_sai_file_with_its_markers(tmp_path, training_data, one_thread):
    """Trained with the v target and zero-terminal SNR (the v-pred community models), the export
    says so in the keys ComfyUI reads (`v_pred`, `ztsnr`) and opens as what was trained."""
    run_dir = tmp_path / "run"
    overrides = (*SDXL, "train.max_steps=1", "train.prediction_type=v_prediction", "model.zero_terminal_snr=true")
    assert train.main(train_args(run_dir, training_data, overrides)) == 0
    with safe_open(run_dir / "model.safetensors", framework="pt") as f:
        assert {"v_pred", "ztsnr"} <= set(f.keys())
    schedule = load_pipeline(run_dir / "model.safetensors").config.schedule
    assert schedule.prediction_type == "v_prediction" and schedule.rescale_betas_zero_snr
