"""Issue 15, what an export says: an SD 1.x run trained with the v-prediction target (and zero-terminal SNR) exports a
model that says so — in the single file's metadata that load_pipeline reads, and in the diffusers
scheduler config written from it — so sample.py and diffusers sample it with the right target."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from safetensors.torch import load_file
from sample_runs import load_sample_script, max_difference, read_pngs
from train_runs import train_args

import train
from minidream import load_pipeline, save_pipeline
from minidream.diffusion.schedule import alphas_cumprod_of


@pytest.fixture(scope="module")
def v_run(tmp_path_factory, training_data):
    run_dir = tmp_path_factory.mktemp("v") / "run"
    overrides = ("train.prediction_type=v_prediction", "model.zero_terminal_snr=true", "train.max_steps=2",
                 "checkpoint.every_n_steps=2")
    assert train.main(train_args(run_dir, training_data, overrides)) == 0
    return run_dir


def test_the_export_says_v_prediction_and_zero_terminal_snr_to_minidream_and_diffusers(v_run, tmp_path):
    pipe = load_pipeline(v_run / "model.safetensors")
    assert pipe.config.schedule.prediction_type == "v_prediction" and pipe.config.schedule.rescale_betas_zero_snr
    assert alphas_cumprod_of(pipe.config.schedule)[-1] == 0
    save_pipeline(pipe, tmp_path / "folder", format="diffusers", dtype=None)
    scheduler = DDIMScheduler.from_pretrained(tmp_path / "folder" / "scheduler")
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.rescale_betas_zero_snr
    assert torch.equal(scheduler.alphas_cumprod, alphas_cumprod_of(pipe.config.schedule))


def test_sample_py_samples_it_as_diffusers_does(v_run, tmp_path):
    folder = tmp_path / "folder"
    save_pipeline(load_pipeline(v_run / "model.safetensors"), folder, format="diffusers", dtype=None)
    flags = ["--prompt", "a photo of sks toy", "--seed", "3", "--num-images", "2", "--steps", "6",
             "--guidance", "7.5", "--guidance-rescale", "0.7", "--height", "64", "--width", "64", "--dtype", "fp32"]
    assert load_sample_script().main(["--weights", str(folder), "--out", str(tmp_path / "ours"), *flags]) == 0
    reference = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    reference.set_progress_bar_config(disable=True)
    theirs = reference(
        "a photo of sks toy", num_images_per_prompt=2, num_inference_steps=6, guidance_scale=7.5, guidance_rescale=0.7,
        height=64, width=64, generator=[torch.Generator("cpu").manual_seed(3 + i) for i in range(2)],
    ).images
    assert max_difference(read_pngs(tmp_path / "ours"), [np.asarray(image) for image in theirs]) <= 2


def test_export_ema_both_writes_the_raw_model_and_the_unets_ema_that_use_ema_reads(tmp_path, training_data, one_thread):
    run_dir = tmp_path / "run"
    overrides = ("train.ema_decay=0.5", "run.export_ema=both", "train.max_steps=2", "checkpoint.every_n_steps=2")
    assert train.main(train_args(run_dir, training_data, overrides)) == 0
    step = run_dir / "checkpoints" / "step-00000002"
    raw, ema = load_file(step / "unet.safetensors"), load_file(step / "ema.safetensors")
    model, averaged = load_pipeline(run_dir / "model.safetensors"), load_pipeline(run_dir / "model.safetensors", use_ema=True)
    assert all(torch.equal(model.unet.state_dict()[k], raw[k]) for k in raw)
    assert all(torch.equal(averaged.unet.state_dict()[k], ema[f"unet.{k}"]) for k in raw)
    assert any(not torch.equal(raw[k], ema[f"unet.{k}"]) for k in raw)  # two different sets of weights
