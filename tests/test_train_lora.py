"""Issue 14: `train.py lora.rank=R` trains adapters only, checkpoints them alone, resumes only
into the same adapters, and renders its validation grids from the exported file merged the way
the UIs merge it. (Resume after SIGTERM and torchrun equality with LoRA: test_resume.py and
test_train_distributed.py, setups "lora" and "torchrun-lora".)"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from train_runs import ENVIRONMENT, TRAIN, metrics, output, train_args

import train
from minidream import load_pipeline, save_pipeline
from minidream.config import TINY
from minidream.diffusion.sampling import generate, image_grid
from minidream.io.lora_files import apply_lora_file
from minidream.models.lora import is_adapter_key
from minidream.models.pipeline import random_pipeline
from minidream.training.config_file import load_train_config

REAL_PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "dreambooth" / "dog"


def test_the_embedded_default_with_lora_writes_a_kohya_file_and_adapter_only_checkpoints(tmp_path):
    run_dir = tmp_path / "run"
    overrides = [f"run.output_dir={run_dir}", f"data.class_dir={tmp_path / 'class'}", "lora.rank=4",
                 "train.max_steps=10", "checkpoint.every_n_steps=10", "validation.every_n_steps=10"]
    result = subprocess.run([sys.executable, TRAIN, *overrides], capture_output=True, text=True, env=ENVIRONMENT,
                            cwd=tmp_path, timeout=600)
    assert result.returncode == 0, output(result)
    with safe_open(run_dir / "lora.safetensors", "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    layers = {key.rsplit(".", 2)[0] for key in keys}
    assert all(key.startswith("lora_unet_") for key in keys) and len(keys) == 3 * len(layers)
    assert {f"{layer}.{part}" for layer in layers for part in ("lora_down.weight", "lora_up.weight", "alpha")} == keys
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in layers
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "4"
    checkpoint = load_file(run_dir / "checkpoints" / "step-00000010" / "unet.safetensors")
    assert checkpoint and all(is_adapter_key(key) for key in checkpoint)  # never the frozen base
    # The base is random (no model.weights), so the merged model is exported beside the LoRA.
    merged = load_pipeline(run_dir / "model.safetensors").unet.state_dict()
    base = random_pipeline(TINY, seed=0).unet.state_dict()
    assert merged.keys() == base.keys() and any(not torch.equal(merged[k], base[k]) for k in base)
    assert "Fine-tuned LoRA" in result.stdout


def test_lora_on_real_photos_renders_validation_from_the_exported_file_merged_as_uis_do(tmp_path, monkeypatch, one_thread):
    base_file = tmp_path / "base.safetensors"
    save_pipeline(random_pipeline(TINY, seed=3), base_file, dtype=None)  # fp32, as trained
    run_dir = tmp_path / "run"
    prompts = ["a photo of sks dog", "a photo of sks dog on the beach"]
    overrides = [f"model.weights={base_file}", f"data.instance_dir={REAL_PHOTOS}", "data.class_dir=null",
                 "lora.rank=4", "lora.text_encoder_rank=2", "lora.targets=all", "train.lr=1e-3", "train.max_steps=4",
                 f"validation.prompts=[{', '.join(prompts)}]", "validation.every_n_steps=4", "validation.steps=4",
                 "checkpoint.every_n_steps=4", f"run.output_dir={run_dir}"]
    assert train.main(["--config", str(train.DEFAULT_CONFIG), *overrides]) == 0
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4]
    assert not (run_dir / "model.safetensors").exists()  # a LoRA on a base file: the LoRA alone

    # What a UI does: the base file, the LoRA file merged in, then sample.
    pipe = load_pipeline(base_file)
    apply_lora_file(pipe, run_dir / "lora.safetensors")
    cfg = load_train_config(run_dir / "config.yaml", []).validation
    images = generate(pipe, prompts, seeds=[cfg.seed + i for i in range(len(prompts))], steps=cfg.steps,
                      guidance=cfg.guidance, height=64, width=64)
    ui_grid = np.asarray(image_grid(images, columns=2))
    training_grid = np.asarray(Image.open(run_dir / "samples" / "step-00000004.png"))
    assert np.array_equal(ui_grid, training_grid)
    untrained = generate(load_pipeline(base_file), prompts, seeds=[0, 1], steps=cfg.steps, guidance=cfg.guidance,
                         height=64, width=64)
    assert not np.array_equal(np.asarray(image_grid(untrained, columns=2)), training_grid)  # the LoRA did something


def test_resuming_with_other_adapters_is_refused_naming_both(tmp_path, training_data, capsys, one_thread):
    run_dir = tmp_path / "run"
    common = ("train.max_steps=2", "checkpoint.every_n_steps=2")
    assert train.main(train_args(run_dir, training_data, (*common, "lora.rank=4"))) == 0
    capsys.readouterr()
    assert train.main(train_args(run_dir, training_data, (*common, "train.max_steps=4", "lora.rank=8", "run.resume=latest"))) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "was written with lora={'rank': 4," in error and "but this run has lora={'rank': 8," in error


def test_lora_with_accumulation_and_gradient_checkpointing_trains_the_same_steps(tmp_path, training_data, one_thread):
    """Recompute-in-backward changes no number, also through the adapters, across accumulated micro-batches."""
    common = ("lora.rank=4", "lora.text_encoder_rank=2", "train.batch_size=1", "train.gradient_accumulation_steps=2",
              "train.max_steps=3", "checkpoint.every_n_steps=3")
    runs = {}
    for switch in ("false", "true"):
        run_dir = tmp_path / switch
        assert train.main(train_args(run_dir, training_data, (*common, f"train.gradient_checkpointing={switch}"))) == 0
        runs[switch] = [(r["loss"], r["grad_norm"]) for r in metrics(run_dir)]
    assert runs["false"] == runs["true"] and len(runs["true"]) == 3
