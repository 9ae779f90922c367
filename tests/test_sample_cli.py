"""sample.py end to end on the CPU: reproducibility, seeds, batching, file names, PNG metadata,
prompt files, dtypes and its errors. (Its images against diffusers': test_sampling_parity.py.)"""

import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from sample_runs import (
    REPO,
    max_difference,
    one_torch_thread,
    read_pngs,
    save_tiny_diffusers_pipeline,
)
from test_lora_files import adapt

from minidream import load_pipeline, save_pipeline
from minidream.config import TINY
from minidream.io.lora_files import save_lora
from minidream.models.pipeline import random_pipeline

PROMPT = "a photo of sks dog on the beach"
SMALL = ["--steps", "4", "--height", "32", "--width", "48", "--dtype", "fp32", "--device", "cpu"]


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """The tiny diffusers-made pipeline as an SD single file, as most users' checkpoints are."""
    folder = save_tiny_diffusers_pipeline(tmp_path_factory.mktemp("tiny") / "tiny-sd")
    path = folder.parent / "tiny-sd.safetensors"
    save_pipeline(load_pipeline(folder), path, dtype=None)
    return path


def run(sample, weights, out, *args: str) -> list[np.ndarray]:
    assert sample.main(["--weights", str(weights), "--out", str(out), *SMALL, *args]) == 0
    return read_pngs(out)


def png_bytes(folder) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*.png"))}


def test_the_same_command_twice_gives_byte_identical_pngs(sample, weights, tmp_path):
    args = ["--prompt", PROMPT, "--seed", "3", "--num-images", "2", "--sampler", "euler-a"]
    run(sample, weights, tmp_path / "first", *args)
    run(sample, weights, tmp_path / "second", *args)
    first = png_bytes(tmp_path / "first")
    assert list(first) == ["00000-3.png", "00001-4.png"]
    assert first == png_bytes(tmp_path / "second")


def test_changing_only_the_seed_changes_the_image(sample, weights, tmp_path):
    seed_0 = run(sample, weights, tmp_path / "a", "--prompt", PROMPT, "--seed", "0")
    seed_1 = run(sample, weights, tmp_path / "b", "--prompt", PROMPT, "--seed", "1")
    assert max_difference(seed_0, seed_1) > 20


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_each_image_of_a_run_is_reproduced_alone_by_its_seed(sample, weights, tmp_path, sampler):
    """Image i of --seed S --num-images N is image 0 of --seed S+i: the same PNG, byte for byte
    (its parameters text names seed S+i either way). DDPM also draws noise on every step."""
    run(sample, weights, tmp_path / "run", "--prompt", PROMPT, "--seed", "20", "--num-images", "3", "--sampler", sampler)
    together = png_bytes(tmp_path / "run")
    assert list(together) == ["00000-20.png", "00001-21.png", "00002-22.png"]
    for i in range(3):
        run(sample, weights, tmp_path / f"alone-{i}", "--prompt", PROMPT, "--seed", str(20 + i), "--sampler", sampler)
        assert png_bytes(tmp_path / f"alone-{i}") == {f"00000-{20 + i}.png": together[f"0000{i}-{20 + i}.png"]}


@pytest.mark.parametrize("sampler", ["ddim", "euler-a"])
def test_the_batch_size_does_not_change_the_images(sample, weights, tmp_path, sampler):
    """Batch 1, 2 (the last batch short) and 3. Not bitwise: the UNet's matmuls round differently
    at other batch sizes. Measured (torch 2.13 CPU): latents within 1.3e-5, pixels within 1 level."""
    args = ["--prompt", PROMPT, "--seed", "7", "--num-images", "3", "--sampler", sampler]
    one_by_one = run(sample, weights, tmp_path / "b1", *args, "--batch-size", "1")
    for batch_size in ("2", "3"):
        batched = run(sample, weights, tmp_path / f"b{batch_size}", *args, "--batch-size", batch_size)
        assert max_difference(batched, one_by_one) <= 1


def test_prompts_from_a_file_are_numbered_in_order_and_match_single_prompt_runs(sample, weights, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of sks dog on the beach\n\n  an oil painting of a lighthouse  \n")
    run(sample, weights, tmp_path / "all", "--from-file", str(prompts), "--seed", "40", "--num-images", "2", "--batch-size", "3")
    names = sorted(path.name for path in (tmp_path / "all").glob("*.png"))
    # Prompt by prompt, each with seeds 40 and 41; sorting the names gives this order.
    assert names == ["00000-40.png", "00001-41.png", "00002-40.png", "00003-41.png"]
    images = read_pngs(tmp_path / "all")
    lighthouse = run(sample, weights, tmp_path / "one", "--prompt", "an oil painting of a lighthouse", "--seed", "40",
                     "--num-images", "2")
    assert max_difference(images[2:], lighthouse) <= 1  # batched with the other prompt: see the batch-size test
    assert max_difference(images[:1], images[2:3]) > 20  # same seed, other prompt
    assert Image.open(tmp_path / "all" / "00002-40.png").text["parameters"].startswith("an oil painting of a lighthouse\n")


def test_pngs_carry_the_generation_parameters(sample, weights, tmp_path):
    run(sample, weights, tmp_path, "--prompt", PROMPT, "--negative-prompt", "blurry, low quality", "--seed", "12",
        "--num-images", "2", "--sampler", "dpmpp-2m", "--karras", "--guidance", "5")
    text = Image.open(tmp_path / "00001-13.png").text["parameters"]
    assert text == (
        f"{PROMPT}\nNegative prompt: blurry, low quality\n"
        "Steps: 4, Sampler: DPM++ 2M Karras, CFG scale: 5.0, Seed: 13, Size: 48x32, Eta: 0.0, Model: tiny-sd.safetensors"
    )
    assert Image.open(tmp_path / "00001-13.png").size == (48, 32)


@pytest.fixture(scope="module")
def lora_file(weights):
    """A LoRA for the tiny model: every kohya target and the text encoder, random ups."""
    donor = adapt(random_pipeline(TINY))
    path = weights.parent / "sks-dog.safetensors"
    save_lora(path, donor.unet, donor.text_encoder)
    return path


def test_a_lora_at_strength_0_changes_nothing_and_at_1_changes_the_image(sample, weights, lora_file, tmp_path):
    args = ["--prompt", PROMPT, "--seed", "3", "--num-images", "2"]
    plain = run(sample, weights, tmp_path / "plain", *args)
    assert max_difference(run(sample, weights, tmp_path / "zero", *args, "--lora", f"{lora_file}:0"), plain) == 0
    full = run(sample, weights, tmp_path / "one", *args, "--lora", str(lora_file))
    assert max_difference(full, plain) > 20
    # the same as sampling the model the LoRA was merged into
    merged = weights.parent / "merged.safetensors"
    save_pipeline(load_pipeline(weights, loras=[(lora_file, 1.0)]), merged, dtype=None)
    assert max_difference(run(sample, merged, tmp_path / "merged", *args), full) == 0


def test_pngs_name_the_loras_as_a1111_does(sample, weights, lora_file, tmp_path):
    second = weights.parent / "second.safetensors"
    second.write_bytes(lora_file.read_bytes())
    run(sample, weights, tmp_path, "--prompt", PROMPT, "--lora", f"{lora_file}:0.75", "--lora", str(second))
    data = lora_file.read_bytes()
    short_hash = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]  # after the header
    assert Image.open(tmp_path / "00000-0.png").text["parameters"] == (
        f"{PROMPT} <lora:sks-dog:0.75> <lora:second:1>\nNegative prompt: \n"
        "Steps: 4, Sampler: DDIM, CFG scale: 7.5, Seed: 0, Size: 48x32, Eta: 0.0, Model: tiny-sd.safetensors, "
        f'Lora hashes: "sks-dog: {short_hash}, second: {short_hash}"'
    )


def test_a_file_that_is_not_a_lora_is_one_line_and_exit_2(sample, weights, tmp_path, capsys):
    assert sample.main(["--weights", str(weights), "--prompt", PROMPT, "--out", str(tmp_path / "out"), *SMALL,
                        "--lora", str(weights)]) == 2
    assert_one_error_line(capsys.readouterr().err, f"{weights}: no LoRA tensors")
    assert not (tmp_path / "out").exists()


def test_a_lora_given_as_the_weights_says_to_use_lora(sample, lora_file, tmp_path, capsys):
    assert sample.main(["--weights", str(lora_file), "--prompt", PROMPT, "--out", str(tmp_path / "out"), *SMALL]) == 2
    assert_one_error_line(capsys.readouterr().err, f"{lora_file}: this is a LoRA (or LyCORIS) file")
    assert not (tmp_path / "out").exists()


def test_bf16_on_the_cpu_gives_nearly_the_fp32_image(sample, weights, tmp_path, monkeypatch):
    loaded = []

    def load_and_keep(*args, **kwargs):
        loaded.append(load_pipeline(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(sample, "load_pipeline", load_and_keep)
    args = ["--prompt", PROMPT, "--seed", "5", "--num-images", "2"]
    fp32 = run(sample, weights, tmp_path / "fp32", *args)
    assert sample.main(["--weights", str(weights), "--out", str(tmp_path / "bf16"), *SMALL, *args, "--dtype", "bf16"]) == 0
    bf16 = read_pngs(tmp_path / "bf16")
    assert loaded[-1].dtype == torch.bfloat16
    assert loaded[-1].vae.decoder.conv_out.weight.dtype == torch.bfloat16  # bf16 has fp32's range: no overflow
    # bf16 keeps 8 significant bits. Measured: mean difference 0.7 levels, max 5 (another seed: > 20).
    differences = [np.abs(a.astype(int) - b.astype(int)) for a, b in zip(bf16, fp32, strict=True)]
    assert max(d.mean() for d in differences) < 2
    assert max(d.max() for d in differences) < 20


# ---- errors: one line, exit code 2, no traceback ----------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--height", "0"], "--height and --width must be positive, got 0x48"),
    (["--width", "-32"], "--height and --width must be positive, got 32x-32"),
    (["--sampler", "euler-a", "--eta", "0.5"], "eta applies only to the ddim sampler, not euler-a; leave it at 0"),
    (["--sampler", "ddim", "--karras"], "karras sigmas apply only to the euler, heun, lms, dpmpp-2m, dpmpp-2m-sde, unipc samplers, not ddim"),
    (["--sampler", "dpm-fast"], "argument --sampler: invalid choice: 'dpm-fast'"),
    (["--num-images", "0"], "--num-images must be at least 1"),
    (["--eta", "1.5"], "eta must be in [0, 1]"),
    (["--guidance-rescale", "1.5"], "--guidance-rescale must be in [0, 1], got 1.5"),
    (["--clip-skip", "0"], "--clip-skip must be at least 1, got 0"),
    (["--lora", "missing.safetensors"], "--lora missing.safetensors: no such LoRA file"),
    (["--lora", "sks.safetensors:strong"], "--lora sks.safetensors:strong: no such LoRA file"),
    (["--lora", "sks.safetensors:nan"], "--lora sks.safetensors:nan: the strength must be a finite number"),
], ids=["height", "width", "eta-not-ddim", "karras-not-dpmpp", "unknown-sampler", "no-images", "eta-above-1",
        "rescale-above-1", "clip-skip-0", "lora-missing", "lora-bad-scale", "lora-nan"])
def test_usage_errors_exit_2_with_one_line(sample, weights, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["--weights", str(weights), "--prompt", PROMPT, "--out", str(tmp_path), *SMALL, *args])
    assert exit_info.value.code == 2
    assert_one_error_line(capsys.readouterr().err, message)
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("args, message", [
    # sides are multiples of the VAE's 8 (issue 32: checked before the model loads)
    (["--height", "60"], "--width 48 --height 60: image sides must be multiples of 8 (the VAE's downsampling); nearest: 48x56 or 48x64"),
    (["--width", "100"], "--width 100 --height 32: image sides must be multiples of 8 (the VAE's downsampling); nearest: 96x32 or 104x32"),
    (["--steps", "1000"], "num_steps must be in [1, 999], got 1000"),
    (["--clip-skip", "3"], "--clip-skip 3: the text encoder has 2 layers"),
    (["--from-file", "missing.txt"], "--from-file missing.txt: no such file"),
    (["--from-file", "empty.txt"], "--from-file empty.txt holds no prompts"),
], ids=["height", "width", "too-many-steps", "clip-skip-deeper-than-the-model", "missing-prompt-file", "empty-prompt-file"])
def test_settings_the_checkpoint_or_the_prompt_file_refuse_exit_2_before_any_image(
    sample, weights, tmp_path, capsys, monkeypatch, args, message
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.txt").write_text("\n  \n")
    prompt = [] if "--from-file" in args else ["--prompt", PROMPT]
    assert sample.main(["--weights", str(weights), *prompt, "--out", "out", *SMALL, *args]) == 2
    assert_one_error_line(capsys.readouterr().err, message)
    assert not (tmp_path / "out").exists()


def test_a_missing_weights_file_is_one_line_and_exit_2_from_the_command_line(tmp_path):
    missing = tmp_path / "v1-5-pruned-emaonly.safetensors"
    result = subprocess.run(
        [sys.executable, str(REPO / "sample.py"), "--weights", str(missing), "--prompt", PROMPT, "--out", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr == f"error: {missing}: no such file or folder\n"
    assert not (tmp_path / "out").exists()


def test_help_explains_every_flag(sample, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--weights", "--prompt", "--negative-prompt", "--num-images", "--batch-size", "--seed", "--steps",
                 "--sampler", "ddim", "ddpm", "euler-a", "dpmpp-2m", "euler", "heun", "plms", "lms", "dpmpp-2m-sde", "unipc", "--karras", "--guidance", "--eta", "--height",
                 "--width", "--dtype", "bf16", "--device", "--from-file", "--out", "--guidance-rescale", "--clip-skip",
                 "--lora", "PATH[:SCALE]"):
        assert flag in text


def assert_one_error_line(stderr: str, message: str):
    """argparse's usage lines may come first; the error itself is one line, and nothing else."""
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and stderr.endswith(errors[0] + "\n"), stderr
    assert message in errors[0], stderr
