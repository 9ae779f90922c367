"""bench/lora_train_step.py end to end at the tiny config: both implementations' rows, their
first-step losses agreeing, and a LoRA checkpoint holding the adapters alone. No timing is checked."""

import re

import pytest
import torch
from safetensors.torch import load_file

from bench import lora_train_step
from bench.common import settings_from
from bench.lora_checkpoint import FULL_BYTES_PER_PARAMETER, lora_checkpoint
from bench.lora_models import lora_pair
from bench.models import unet_forward
from bench.unet_train_step import training_inputs, vector_inputs
from minidream.config import TINY
from minidream.models.lora import adapters_off, is_adapter_key

TINIEST = ["--device", "cpu", "--config", "tiny", "--resolution", "64", "--warmup", "0", "--repeats", "1", "--threads", "1"]


def test_bench_prints_both_implementations_and_their_agreeing_losses(capsys):
    results = lora_train_step.main([*TINIEST, "--parts", "speed", "memory"])
    printed = capsys.readouterr().out
    losses = results["losses"]
    assert losses["minidream"] == pytest.approx(losses["diffusers"], rel=lora_train_step.LOSS_RTOL[torch.bfloat16])
    assert re.search(r"First-step loss: minidream \d+\.\d+, diffusers \d+\.\d+", printed)
    [row] = results["speed"]
    assert row.minidream_s > 0 and row.diffusers_s > 0 and row.items == 2
    assert "Command: `python -m bench.lora_train_step " in printed and "minidream/diffusers" in printed
    memory = results["memory"]
    for impl in ("minidream", "diffusers"):
        assert memory["peaks"][impl]["peak_mb"] > memory["peaks"][impl]["resident_mb"] > 0  # the steps add to the weights
        assert memory["saved"][impl]["activations"] > 0
        assert printed.count(f"| {impl} |") == 1  # its memory row
    # Same architecture and targets: the same base bytes and adapter state in both.
    assert memory["arithmetic"]["minidream"].base_mb == memory["arithmetic"]["diffusers"].base_mb
    assert memory["arithmetic"]["minidream"].adapters_mb == memory["arithmetic"]["diffusers"].adapters_mb


# How far the adapters must move the loss for the check at that dtype to catch adapters that differ.
# tiny-sdxl's adapters move it by 6.9e-4 (relative), under the bf16 tolerance: there the fp32 check catches them.
ADAPTERS_SEEN_AT = {"tiny": torch.bfloat16, "tiny-sdxl": torch.float32}


@pytest.mark.parametrize("config", ["tiny", "tiny-sdxl"])
def test_fp32_losses_agree_closely_and_the_adapters_change_them(config):
    """The agreement is the adapters' too: without them the loss moves by far more than the
    tolerance (bf16's for tiny, fp32's for tiny-sdxl), so the check would catch adapters that differ.
    SDXL shapes: minidream takes the pooled vector and time ids as y, diffusers as added_cond_kwargs."""
    args = lora_train_step.options().parse_args([*TINIEST, "--config", config, "--dtype", "fp32"])
    settings = settings_from(args)
    pair = lora_pair(settings, rank=4, gradient_checkpointing=False)
    inputs = training_inputs(settings, 2, 8)
    vector = vector_inputs(settings, 2, 8)
    assert (vector is not None) == (config == "tiny-sdxl")
    losses = lora_train_step.first_losses(lora_train_step.lora_runs(pair, inputs, settings, vector), torch.float32)
    assert losses["minidream"] == pytest.approx(losses["diffusers"], rel=1e-5)
    x, t, context, target = inputs
    with torch.no_grad(), adapters_off(pair.unet):
        base = unet_forward("minidream", pair.unet, pair.twin, vector)(x, t, context)
        base_loss = torch.nn.functional.mse_loss(base, target).item()
    assert abs(base_loss - losses["minidream"]) / losses["minidream"] > 5 * lora_train_step.LOSS_RTOL[ADAPTERS_SEEN_AT[config]]


def test_checkpoint_holds_only_the_adapters_and_their_optimizer_state(tmp_path):
    sizes = lora_checkpoint(tmp_path, TINY.unet, "attention", rank=4)
    assert sorted(path.name for path in sizes.folder.iterdir()) == ["checksums.json", "optimizer.pt", "trainer.pt", "unet.safetensors"]
    tensors = load_file(sizes.folder / "unet.safetensors")
    assert tensors and all(is_adapter_key(key) for key in tensors)
    assert sum(t.numel() for key, t in tensors.items() if not key.endswith(".alpha")) == sizes.adapter_parameters
    optimizer = torch.load(sizes.folder / "optimizer.pt", weights_only=True)
    moments = sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel() for s in optimizer["state"].values())
    assert moments == 2 * sizes.adapter_parameters  # one real AdamW step: every moment allocated
    assert sizes.lora_total == sum(path.stat().st_size for path in sizes.folder.iterdir())
    assert sizes.full_total == sizes.unet_parameters * FULL_BYTES_PER_PARAMETER + sizes.lora_bytes["trainer.pt"]
    assert sizes.ratio > 1
