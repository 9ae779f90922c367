"""`python -m minidream.convert`: formats inferred or chosen, dtypes, EMA, and one-line errors."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pipeline_checks import assert_same_weights
from safetensors.torch import save_file

from minidream import load_pipeline, save_pipeline
from minidream.config import TINY
from minidream.io.convert import main
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
    explained = ("SRC", "DST", "--format", "single-file", "diffusers", "--dtype", "fp16", "fp32", "--ema", "weights_only")
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
