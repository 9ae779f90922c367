"""`python -m minidream.convert`: formats inferred or chosen, dtypes, EMA, LoRAs merged into a model
or converted between layouts, and one-line errors."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pipeline_checks import assert_same_weights
from safetensors.torch import save_file
from test_lora_files import adapt, assert_opens_as_in_diffusers, pair  # noqa: F401 (a fixture)

from minidream import load_pipeline, save_pipeline
from minidream.config import TINY
from minidream.io.convert import main
from minidream.io.lora_files import read_lora_file, save_lora
from minidream.io.single_file import ema_key, single_file_metadata, single_file_tensors
from minidream.models.pipeline import random_pipeline


@pytest.fixture(scope="module")
def tiny():
    return random_pipeline(TINY, seed=0)


@pytest.fixture(scope="module")
def tiny_file(tiny, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("convert") / "tiny.safetensors"
    save_pipeline(tiny, path, dtype=None)
    return path


def run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minidream.convert", *args], capture_output=True, text=True)


def test_help_explains_the_formats_and_options():
    result = run_module("--help")
    assert result.returncode == 0
    explained = ("SRC", "DST", "--format", "single-file", "diffusers", "--dtype", "fp16", "fp32", "--ema", "weights_only",
                 "--lora", "PATH[:SCALE]", "kohya", "LoRA file", "--base", "load_lora_weights")
    for text in explained:
        assert text in result.stdout


def test_single_file_to_diffusers_folder_and_back(tiny, tiny_file, tmp_path, capsys):
    assert main([str(tiny_file), str(tmp_path / "folder"), "--dtype", "fp32"]) == 0  # no suffix: a diffusers folder
    assert (tmp_path / "folder" / "model_index.json").is_file()
    assert main([str(tmp_path / "folder"), str(tmp_path / "back.safetensors"), "--dtype", "fp32"]) == 0
    assert_same_weights(load_pipeline(tmp_path / "back.safetensors"), tiny)
    assert "wrote" in capsys.readouterr().out


def test_fp16_is_the_default_and_format_can_be_forced(tiny, tiny_file, tmp_path):
    assert main([str(tiny_file), str(tmp_path / "half.safetensors")]) == 0
    assert_same_weights(load_pipeline(tmp_path / "half.safetensors"), tiny, dtype=torch.float16)
    assert main([str(tiny_file), str(tmp_path / "forced.safetensors"), "--format", "diffusers"]) == 0
    assert (tmp_path / "forced.safetensors" / "unet" / "config.json").is_file()


def test_ema_flag_exports_the_ema_unet(tiny, tmp_path):
    ema = random_pipeline(TINY, seed=1)
    tensors = single_file_tensors(tiny, None) | {ema_key(k): t for k, t in ema.unet.state_dict().items()}
    save_file(tensors, tmp_path / "train.safetensors", metadata=single_file_metadata(TINY))
    argv = [str(tmp_path / "train.safetensors"), str(tmp_path / "ema.safetensors"), "--ema", "--dtype", "fp32"]
    assert main(argv) == 0
    converted = load_pipeline(tmp_path / "ema.safetensors")
    assert_same_weights(converted, ema, parts=["unet"])
    assert_same_weights(converted, tiny, parts=["vae", "text_encoder"])


def test_bad_input_gives_one_line_and_exit_code_2(tmp_path):
    result = run_module(str(tmp_path / "missing.safetensors"), str(tmp_path / "out.safetensors"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'missing.safetensors'}: no such file or folder"
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("args, message", [
    (["{src}", "{tmp}/model.ckpt", "--format", "single-file"], "a single file must be named *.safetensors"),
    (["{src}", "{tmp}/out", "--ema"], "has no EMA weights"),
    (["{tmp}", "{tmp}/out.safetensors"], "neither a diffusers folder"),
])
def test_each_bad_input_is_one_line_naming_the_path(tiny_file, tmp_path, capsys, args, message):
    argv = [a.format(src=tiny_file, tmp=tmp_path) for a in args]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and message in error
    assert "Traceback" not in error


def test_usage_errors_exit_2():
    result = run_module("only-one-argument")
    assert result.returncode == 2 and "usage:" in result.stderr


# ---- LoRAs --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory) -> tuple[Path, Path]:
    """Two kohya LoRAs for the tiny model: every target with the text encoder (fp16, as exported),
    and the same adapters in fp32."""
    root = tmp_path_factory.mktemp("loras")
    donor = adapt(random_pipeline(TINY))
    save_lora(root / "half.safetensors", donor.unet, donor.text_encoder)
    save_lora(root / "full.safetensors", donor.unet, donor.text_encoder, dtype=torch.float32)
    return root / "half.safetensors", root / "full.safetensors"


def test_lora_merged_model_equals_load_pipeline_with_the_loras(tiny_file, lora_files, tmp_path, capsys):
    half, full = lora_files
    loras = [(half, 0.7), (full, -0.2)]
    assert main([str(tiny_file), str(tmp_path / "fp32.safetensors"), "--lora", f"{half}:0.7", "--lora", f"{full}:-0.2",
                 "--dtype", "fp32"]) == 0
    merged = load_pipeline(tiny_file, loras=loras)
    assert_same_weights(load_pipeline(tmp_path / "fp32.safetensors"), merged)
    assert "+ half.safetensors:0.7 + full.safetensors:-0.2" in capsys.readouterr().out
    # fp16 (the default): the fp32 sum rounded once
    assert main([str(tiny_file), str(tmp_path / "fp16.safetensors"), "--lora", f"{half}:0.7", "--lora", f"{full}:-0.2"]) == 0
    assert_same_weights(load_pipeline(tmp_path / "fp16.safetensors"), merged, dtype=torch.float16)
    # the LoRAs changed the model
    unet, base = merged.unet.state_dict(), load_pipeline(tiny_file).unet.state_dict()
    assert sum(not torch.equal(unet[key], base[key]) for key in base) > 10


def test_lora_converted_kohya_to_diffusers_and_back_merges_to_the_same_weights(
    tiny_file, lora_files, tmp_path, pair  # noqa: F811 (the fixture imported above)
):
    _, kohya = lora_files
    diffusers_file, back = tmp_path / "diffusers.safetensors", tmp_path / "back.safetensors"
    assert main([str(kohya), str(diffusers_file), "--format", "diffusers", "--base", str(tiny_file), "--dtype", "fp32"]) == 0
    assert main([str(diffusers_file), str(back), "--base", str(tiny_file), "--dtype", "fp32"]) == 0  # kohya: the default
    assert set(read_lora_file(back, TINY).unet) == set(read_lora_file(kohya, TINY).unet)
    expected = load_pipeline(tiny_file, loras=[(kohya, 1.0)])
    for converted in (diffusers_file, back):
        merged = load_pipeline(tiny_file, loras=[(converted, 1.0)])
        for part in ("unet", "text_encoder"):
            ours, theirs = getattr(merged, part).state_dict(), getattr(expected, part).state_dict()
            for key in theirs:  # diffusers files carry alpha / rank inside lora_B: fp32 rounding only
                torch.testing.assert_close(ours[key], theirs[key], rtol=1e-6, atol=1e-7, msg=key)
    assert_opens_as_in_diffusers(diffusers_file, pair)  # and diffusers' load_lora_weights reads it the same


@pytest.mark.parametrize("case, message", [
    ("lora-as-model", "this is a LoRA file; convert it to --format kohya or diffusers"),
    ("lora-with-lora", "this is a LoRA file; --lora and --ema apply to a model SRC"),
    ("model-as-kohya", "--format kohya is a LoRA layout, and SRC is a model"),
    ("broken-lora", "no LoRA tensors"),
    ("missing-lora", "no such LoRA file"),
    ("lora-for-another-model", "the base model is SD 1.x (768-wide)"),
])
def test_each_bad_lora_input_is_one_line_naming_the_file(tiny_file, lora_files, tmp_path, capsys, case, message):
    half, _ = lora_files
    out = tmp_path / "out.safetensors"
    argv, named = {
        "lora-as-model": ([half, out, "--format", "single-file"], half),
        "lora-with-lora": ([half, out, "--lora", half], half),
        "model-as-kohya": ([tiny_file, out, "--format", "kohya"], tiny_file),
        "broken-lora": ([tiny_file, out, "--lora", tiny_file], tiny_file),
        "missing-lora": ([tiny_file, out, "--lora", tmp_path / "missing.safetensors"], tmp_path / "missing.safetensors"),
        "lora-for-another-model": ([half, out], half),  # checked against SD 1.5's shapes without --base
    }[case]
    assert main([str(a) for a in argv]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {named}") and error.count("\n") == 1 and message in error, error
    assert not out.exists()
