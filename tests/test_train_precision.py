"""Issue 13: the one VAE-dtype rule (models.precision.vae_dtype) holds everywhere in training.

SD's VAE decoder overflows fp16: the black or NaN class images and validation grids users
report from other trainers. An fp16 run must keep the VAE in fp32 and decode in fp32, also
inside the fp16 autocast region the sampling runs in.
"""

import torch
from train_runs import train_args

import train
from minidream.config import TINY
from minidream.diffusion.sampling import decode_latents
from minidream.models.pipeline import random_pipeline
from minidream.models.precision import vae_dtype


def record_decoder_dtypes(pipe, seen: list) -> None:
    """Every convolution of the decoder appends (weight dtype, output dtype) when it runs."""
    for module in pipe.vae.decoder.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(lambda m, args, out: seen.append((m.weight.dtype, out.dtype)))


def test_an_fp16_run_generates_class_images_and_validation_grids_with_an_fp32_vae(
    tmp_path, training_data, monkeypatch, one_thread
):
    seen, load_models = [], train.load_models

    def load_and_watch(cfg, env):
        pipe = load_models(cfg, env)
        record_decoder_dtypes(pipe, seen)
        return pipe

    monkeypatch.setattr(train, "load_models", load_and_watch)
    run_dir = tmp_path / "run"
    overrides = ("train.mixed_precision=fp16", f"data.class_dir={tmp_path / 'class'}", "data.num_class_images=2",
                 "data.class_steps=2", "validation.prompts=[a photo of sks toy]", "validation.every_n_steps=2",
                 "validation.steps=2", "train.max_steps=2")
    assert train.main(train_args(run_dir, training_data, overrides)) == 0
    assert len(list((tmp_path / "class").glob("*.png"))) == 2 and (run_dir / "samples" / "step-00000002.png").is_file()
    decoder_convs = sum(isinstance(m, torch.nn.Conv2d) for m in random_pipeline(TINY).vae.decoder.modules())
    assert len(seen) >= 2 * decoder_convs  # the class images and the grid were decoded
    assert set(seen) == {(torch.float32, torch.float32)}


def test_decoding_inside_fp16_autocast_runs_the_vae_in_its_own_dtype():
    pipe = random_pipeline(TINY)
    seen = []
    record_decoder_dtypes(pipe, seen)
    latents = torch.randn(1, 4, 8, 8)
    with torch.autocast("cpu", dtype=torch.float16):
        images = decode_latents(pipe, latents)
    assert set(seen) == {(torch.float32, torch.float32)}
    assert images.dtype.name == "uint8" and images.shape == (1, 64, 64, 3)


def test_the_rule():
    assert vae_dtype(torch.float16) == torch.float32
    assert vae_dtype(torch.bfloat16) == torch.bfloat16 and vae_dtype(torch.float32) == torch.float32
    assert vae_dtype(None) is None
    assert random_pipeline(TINY).to(dtype=torch.float16).vae.decoder.conv_in.weight.dtype == torch.float32
